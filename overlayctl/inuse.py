"""Entries of an upper layer that a process is writing to, or working in, right now; and a
read lease that keeps it that way while overlayctl removes the entry.

The lease (fcntl F_SETLEASE, F_RDLCK on the raw file) is granted only while nobody has the
file open for writing, through the overlay or directly: overlayfs opens the real file with the
caller's flags. While it is held, an open for writing waits for it (the kernel "breaks" it),
which overlayctl sees (F_GETLEASE says F_UNLCK) before it lets go."""

from __future__ import annotations

import errno
import fcntl
import os

F_SETLEASE = 1024
F_GETLEASE = 1025

_WRITE = os.O_WRONLY | os.O_RDWR


def _procs() -> list[int]:
    me = os.getpid()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != me]


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _below(p: str, paths: set[str]) -> str | None:
    for q in paths:
        if p == q or p.startswith(q.rstrip("/") + "/"):
            return q
    return None


def users(files: dict[str, str], dirs: dict[str, str],
          idents: dict[tuple[int, int], str] | None = None) -> dict[str, list[tuple[int, str]]]:
    """Who is in the way of removing entries, in one pass over /proc. FILES maps a path (as
    processes see it) to a key: processes holding it open for writing; IDENTS does the same
    by (st_dev, st_ino). DIRS maps a directory to a key: processes with a file below it open
    for writing, or their working directory or root in it."""
    out: dict[str, list[tuple[int, str]]] = {}

    def add(key: str, pid: int) -> None:
        who = (pid, _name(pid))
        if who not in out.setdefault(key, []):
            out[key].append(who)

    dir_set = set(dirs)
    for pid in _procs():
        for link in ("cwd", "root"):
            try:
                target = os.readlink(f"/proc/{pid}/{link}")
            except OSError:
                continue
            hit = _below(target, dir_set) if dir_set else None
            if hit is not None:
                add(dirs[hit], pid)
        base = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{base}/{fd}")
                key = files.get(target)
                if key is None and dir_set:
                    hit = _below(target, dir_set)
                    key = dirs[hit] if hit is not None else None
                if key is None and idents:
                    st = os.stat(f"{base}/{fd}")
                    key = idents.get((st.st_dev, st.st_ino))
                if key is None:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                    flags = next((int(line.split()[1], 8) for line in f
                                  if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                continue
            if flags & _WRITE:
                add(key, pid)
    return out


class Lease:
    """A read lease on a file: granted only when nobody writes to it; an open for writing
    while it is held waits, and shows as broken()."""

    __slots__ = ("fd",)

    def __init__(self, path: str) -> None:
        # The kernel tells the holder of a lease that is being broken with SIGIO, whose
        # default action ends the process: overlayctl asks with broken() instead.
        import signal
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(self.fd, F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            os.close(self.fd)
            raise

    def broken(self) -> bool:
        """Is a process waiting to open the file for writing?"""
        return fcntl.fcntl(self.fd, F_GETLEASE) != fcntl.F_RDLCK

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            fcntl.fcntl(self.fd, F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def try_lease(path: str) -> Lease | None:
    """A lease on PATH, or None when somebody has it open for writing (EAGAIN)."""
    try:
        return Lease(path)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            return None
        raise


def describe(users: list[tuple[int, str]]) -> str:
    return ", ".join(f"{pid} ({name})" for pid, name in users[:8]) + (
        f" and {len(users) - 8} more" if len(users) > 8 else "")
