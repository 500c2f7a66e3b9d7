"""The metadata layer (.systemd-sysext / .systemd-confext) as upstream writes it
(extensions/confexts, dev, work_dir, backing, origin), plus a copy of overlayctl's merge
record (overlayctl.json), and reading them back from a merged hierarchy."""

from __future__ import annotations

import os

from overlayctl.errors import die
from overlayctl.jsontext import dumps
from overlayctl.record import Record
from overlayctl.settings import ExtClass
from overlayctl.state import MergeRecord, dump

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

RECORD = "overlayctl.json"


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


_ESCAPES = {7: "a", 8: "b", 12: "f", 10: "n", 13: "r", 9: "t", 11: "v", 92: "\\", 34: '"',
            39: "'"}
_UNESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34,
              "'": 39, "s": 32}


def c_escape(s: str) -> str:
    """systemd's cescape() of the path's bytes: C escapes for the usual control characters,
    octal for every other byte below 32 or from 127 on (so UTF-8 comes out as octal)."""
    out: list[str] = []
    for b in os.fsencode(s):
        e = _ESCAPES.get(b)
        if e is not None:
            out.append("\\" + e)
        elif b < 32 or b >= 127:
            out.append(f"\\{b:03o}")
        else:
            out.append(chr(b))
    return "".join(out)


def c_unescape(s: str) -> str:
    """systemd's cunescape(): every escape cescape() writes, plus \\s, \\xNN, \\uNNNN,
    \\UNNNNNNNN; a malformed escape or a NUL is an error (ValueError)."""
    if "\\" not in s:
        return s
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError(f"a lone backslash at the end of {s!r}")
        e = s[i + 1]
        if e in _UNESCAPES:
            out.append(_UNESCAPES[e])
            i += 2
            continue
        if e == "x" or e in "uU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = s[i + 2:i + 2 + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError(f"malformed \\{e} escape in {s!r}")
            v = int(digits, 16)
            if v == 0 or v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
                raise ValueError(f"\\{e}{digits} in {s!r} is not an allowed character")
            out += bytes([v]) if e == "x" else chr(v).encode("utf-8")
            i += 2 + width
            continue
        if "0" <= e <= "3":
            digits = s[i + 1:i + 4]
            if len(digits) != 3 or any(d not in "01234567" for d in digits):
                raise ValueError(f"malformed octal escape in {s!r}")
            v = int(digits, 8)
            if v == 0:
                raise ValueError(f"\\000 in {s!r}: NUL is not allowed")
            out.append(v)
            i += 4
            continue
        raise ValueError(f"unknown escape \\{e} in {s!r}")
    return os.fsdecode(bytes(out))


class Origin(Record):
    """What a merge was made from, written as 'origin'. A refresh whose origin equals the
    merged one is skipped (as upstream v260+; the content is overlayctl's own: identity of
    each extension, mutable mode and dirs, options, hierarchies, defaults)."""

    __slots__ = ("mode", "mutable_dirs", "extensions", "mount_options", "noexec",
                 "hierarchies", "defaults")
    mode: str
    mutable_dirs: dict[str, str]
    extensions: dict[str, dict[str, Any]]    # name -> path, inode, dev, mtime
    mount_options: str | None
    noexec: bool | None
    hierarchies: tuple[str, ...]
    defaults: dict[str, dict[str, Any]]      # hierarchy -> path, inode, mtime

    def __init__(self, *, mode: str, mutable_dirs: dict[str, str],
                 extensions: dict[str, dict[str, Any]], mount_options: str | None,
                 noexec: bool | None, hierarchies: tuple[str, ...],
                 defaults: dict[str, dict[str, Any]]) -> None:
        self._fill(locals())

    def to_json(self) -> dict[str, Any]:
        mutable: dict[str, Any] = {"mode": self.mode}
        if self.mutable_dirs:
            mutable["mutableDirs"] = self.mutable_dirs
        j: dict[str, Any] = {"mutable": mutable, "extensions": self.extensions}
        if self.mount_options is not None:
            j["mountOptions"] = self.mount_options
        j["noexec"] = self.noexec
        j["hierarchies"] = list(self.hierarchies)
        if self.defaults:
            j["defaults"] = self.defaults
        return j


def write_meta(meta_root: str, cls: ExtClass, *, names: tuple[str, ...],
               work_dir_rel: str | None, origin: Origin, backing: str | None,
               record: MergeRecord) -> str:
    """Write everything but 'dev' into META_ROOT/.systemd-*; return the directory."""
    d = os.path.join(meta_root, cls.meta_dir)
    os.mkdir(d, 0o755)
    _write(os.path.join(d, cls.list_file), "".join(n + "\n" for n in names))
    if work_dir_rel is not None:
        _write(os.path.join(d, "work_dir"), c_escape(work_dir_rel) + "\n")
    if backing:
        _write(os.path.join(d, "backing"), backing + "\n")
    _write(os.path.join(d, "origin"), origin_text(origin))
    _write(os.path.join(d, RECORD), dump(record.to_json()))
    return d


def origin_text(origin: Origin) -> str:
    """The 'origin' file's text: canonical, so that a refresh compares texts, not parses."""
    return dumps(origin.to_json()) + "\n"


def write_dev(meta_dir: str, st_dev: int) -> None:
    _write(os.path.join(meta_dir, "dev"), f"{os.major(st_dev)}:{os.minor(st_dev)}\n")


def read_origin_text(path: str, cls: ExtClass) -> str | None:
    """The 'origin' file of a merged hierarchy as it is (for the refresh-skip decision)."""
    try:
        with open(os.path.join(path, cls.meta_dir, "origin"), encoding="utf-8",
                  errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


class Merged(Record):
    """What the metadata of a merged hierarchy says."""

    __slots__ = ("names", "work_dir", "origin", "record")
    names: list[str]
    work_dir: str | None        # relative to the root
    origin: dict[str, Any] | None
    record: MergeRecord | None  # None: merged by upstream (or an older overlayctl)

    def __init__(self, names: list[str], work_dir: str | None, origin: dict[str, Any] | None,
                 record: MergeRecord | None) -> None:
        self._fill(locals())


def read_dev(path: str, cls: ExtClass) -> tuple[int, int] | None:
    try:
        with open(os.path.join(path, cls.meta_dir, "dev"), encoding="utf-8") as f:
            text = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    major, sep, minor = text.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise die(f"{path}/{cls.meta_dir}/dev is not MAJOR:MINOR: '{text}'",
                  f"unmount {path} by hand (umount -l {path})")
    return int(major), int(minor)


def read_merged(path: str, cls: ExtClass) -> Merged:
    d = os.path.join(path, cls.meta_dir)

    def text(name: str) -> str | None:
        try:
            with open(os.path.join(d, name), encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except OSError:
            return None

    def js(name: str) -> dict[str, Any] | None:
        t = text(name)
        if t is None:
            return None
        import json
        try:
            v = json.loads(t)
        except ValueError:
            return None
        return v if isinstance(v, dict) else None

    lst = text(cls.list_file) or ""
    wd = text("work_dir")
    work_dir = None
    if wd and wd.strip():
        try:
            work_dir = c_unescape(wd.strip())
        except ValueError as e:
            raise die(f"{d}/work_dir cannot be read: {e}",
                      f"unmount {path} by hand (umount -l {path})") from None
    rec = js(RECORD)
    return Merged([n for n in lst.splitlines() if n], work_dir, js("origin"),
                  MergeRecord.from_json(rec) if rec is not None else None)
