"""/proc/self/mountinfo, parsed."""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(s: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), s)


@dataclass(frozen=True)
class Mount:
    id: int
    parent: int
    dev: str
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str   # raw: octal escapes kept so that ',' separates

    def super_option(self, key: str) -> str | None:
        """An option of the file system (e.g. upperdir) with overlayfs' escapes undone."""
        for item in self.super_options.split(","):
            k, sep, v = item.partition("=")
            if _unescape(k) == key and sep:
                return _unescape(v)
        return None


def read(path: str = "/proc/self/mountinfo") -> list[Mount]:
    mounts: list[Mount] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            sep = fields.index("-")
            mounts.append(Mount(
                id=int(fields[0]), parent=int(fields[1]), dev=fields[2],
                root=_unescape(fields[3]), mountpoint=_unescape(fields[4]), options=fields[5],
                fstype=_unescape(fields[sep + 1]), source=_unescape(fields[sep + 2]),
                super_options=fields[sep + 3] if len(fields) > sep + 3 else ""))
    return mounts


def top_mount(mounts: list[Mount], path: str) -> Mount | None:
    """The mount that is visible at PATH (the last one stacked there), if PATH is a mount point."""
    here = [m for m in mounts if m.mountpoint == path]
    if not here:
        return None
    tops = [m for m in here if not any(o.parent == m.id for o in here)]
    return tops[-1] if tops else here[-1]


def is_mountpoint(path: str, mounts: list[Mount] | None = None) -> bool:
    return top_mount(mounts if mounts is not None else read(), path) is not None


def submounts(mounts: list[Mount], path: str) -> list[Mount]:
    """The mounts nested below PATH (not on PATH itself) that are visible there and not
    themselves nested in another of them, in mount order."""
    prefix = path.rstrip("/") + "/"
    top = top_mount(mounts, path)
    if top is not None:
        return [m for m in mounts if m.parent == top.id and m.mountpoint.startswith(prefix)]
    below = [m for m in mounts if m.mountpoint.startswith(prefix)]
    ids = {m.id for m in below}
    return [m for m in below if m.parent not in ids]
