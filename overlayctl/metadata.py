"""The metadata layer (.systemd-sysext / .systemd-confext) as upstream writes it, plus
overlayctl's own record of how a hierarchy was merged."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from overlayctl.settings import ExtClass

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

RECORD = "overlayctl.json"


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def c_escape(s: str) -> str:
    out = []
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif o < 32 or o == 127:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return "".join(out)


def c_unescape(s: str) -> str:
    out: list[str] = []
    i = 0
    simple = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            c = s[i + 1]
            if c in simple:
                out.append(simple[c])
                i += 2
                continue
            if c == "x" and i + 3 < len(s) + 0:
                out.append(chr(int(s[i + 2:i + 4], 16)))
                i += 4
                continue
        out.append(s[i])
        i += 1
    return "".join(out)


def write_meta(meta_root: str, cls: ExtClass, *, names: list[str], work_dir_rel: str | None,
               origin: dict[str, Any], backing: str | None, record: dict[str, Any]) -> str:
    """Write everything but 'dev' into META_ROOT/.systemd-*; return the directory."""
    d = os.path.join(meta_root, cls.meta_dir)
    os.mkdir(d, 0o755)
    _write(os.path.join(d, cls.list_file), "".join(n + "\n" for n in names))
    if work_dir_rel is not None:
        _write(os.path.join(d, "work_dir"), c_escape(work_dir_rel) + "\n")
    if backing:
        _write(os.path.join(d, "backing"), backing + "\n")
    # Compact: with indent, json falls back to its slow pure-Python encoder (500 extensions).
    _write(os.path.join(d, "origin"), json.dumps(origin, sort_keys=True) + "\n")
    _write(os.path.join(d, RECORD), json.dumps(record, sort_keys=True) + "\n")
    return d


def write_dev(meta_dir: str, st_dev: int) -> None:
    _write(os.path.join(meta_dir, "dev"), f"{os.major(st_dev)}:{os.minor(st_dev)}\n")


@dataclass
class Merged:
    """What the metadata of a merged hierarchy says."""

    names: list[str]
    work_dir: str | None
    origin: dict[str, Any] | None
    record: dict[str, Any] | None


def read_dev(path: str, cls: ExtClass) -> tuple[int, int] | None:
    try:
        with open(os.path.join(path, cls.meta_dir, "dev"), encoding="utf-8") as f:
            text = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    major, sep, minor = text.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        from overlayctl.errors import die
        raise die(f"{path}/{cls.meta_dir}/dev is not MAJOR:MINOR: '{text}'",
                  f"unmount {path} by hand (umount -l {path})")
    return int(major), int(minor)


def read_merged(path: str, cls: ExtClass) -> Merged:
    d = os.path.join(path, cls.meta_dir)

    def text(name: str) -> str | None:
        try:
            with open(os.path.join(d, name), encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None

    def js(name: str) -> dict[str, Any] | None:
        t = text(name)
        if t is None:
            return None
        try:
            v = json.loads(t)
        except ValueError:
            return None
        return v if isinstance(v, dict) else None

    lst = text(cls.list_file) or ""
    wd = text("work_dir")
    return Merged([n for n in lst.splitlines() if n], c_unescape(wd.strip()) if wd else None,
                  js("origin"), js(RECORD))
