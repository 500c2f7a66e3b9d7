"""/proc/self/mountinfo, parsed: the one parser of it in overlayctl (and its tests)."""

from __future__ import annotations

from overlayctl.record import Record


def unescape(s: str) -> str:
    r"""Undo the kernel's octal escapes (\040 for a space, \134 for a backslash)."""
    if "\\" not in s:
        return s
    out: list[str] = []
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 3 < n and all("0" <= d <= "7" for d in s[i + 1:i + 4]):
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
            continue
        out.append(c)
        i += 1
    return "".join(out)


class Mount(Record):
    """One line of mountinfo."""

    __slots__ = ("id", "parent", "dev", "root", "mountpoint", "options", "fstype", "source",
                 "super_options")
    id: int
    parent: int
    dev: str
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str   # raw: octal escapes kept so that ',' separates

    def __init__(self, id: int, parent: int, dev: str, root: str, mountpoint: str,
                 options: str, fstype: str, source: str, super_options: str) -> None:
        self._fill(locals())

    def super_option(self, key: str) -> str | None:
        """An option of the file system (e.g. upperdir) with overlayfs' escapes undone."""
        for item in self.super_options.split(","):
            k, sep, v = item.partition("=")
            if sep and unescape(k) == key:
                return unescape(v)
        return None

    @property
    def identity(self) -> tuple[str, str, str, str]:
        """What makes two mounts the same file system view (a clone has the same)."""
        return (self.dev, self.root, self.fstype, self.source)


def parse(text: str) -> list[Mount]:
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        sep = fields.index("-")
        mounts.append(Mount(
            int(fields[0]), int(fields[1]), fields[2], unescape(fields[3]),
            unescape(fields[4]), fields[5], unescape(fields[sep + 1]), unescape(fields[sep + 2]),
            fields[sep + 3] if len(fields) > sep + 3 else ""))
    return mounts


def read(path: str = "/proc/self/mountinfo") -> list[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


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
    themselves nested in another of them, in mount order. For a point with several mounts
    stacked, this is the lowest of them (see stack_at)."""
    prefix = path.rstrip("/") + "/"
    top = top_mount(mounts, path)
    if top is not None:
        return [m for m in mounts if m.parent == top.id and m.mountpoint.startswith(prefix)]
    below = [m for m in mounts if m.mountpoint.startswith(prefix)]
    ids = {m.id for m in below}
    return [m for m in below if m.parent not in ids]


def stack_at(mounts: list[Mount], bottom: Mount) -> list[Mount]:
    """BOTTOM and the mounts stacked on its mount point above it, bottom first."""
    out = [bottom]
    while True:
        nxt = [m for m in mounts if m.parent == out[-1].id and m.mountpoint == bottom.mountpoint]
        if not nxt:
            return out
        out.append(nxt[-1])
