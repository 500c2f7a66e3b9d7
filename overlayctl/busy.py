"""Who still uses a hierarchy: processes whose root, working directory, executable, open
files or mapped files live below a path, or on a given (detached) file system."""

from __future__ import annotations

import os

import psutil


def _paths(p: psutil.Process) -> list[str]:
    out: list[str] = []
    for getter in (p.cwd, p.exe, p.open_files):
        try:
            v = getter()
        except (psutil.Error, OSError):
            continue
        if isinstance(v, str):
            out.append(v)
        else:
            out.extend(getattr(x, "path", "") for x in v)
    try:
        out.append(os.readlink(f"/proc/{p.pid}/root"))
        # Mapped files (libraries, executables) from /proc/PID/maps: psutil's memory_maps()
        # reads smaps, which costs a lot more for the same paths.
        with open(f"/proc/{p.pid}/maps", encoding="utf-8", errors="replace") as f:
            out.extend(line.split(None, 5)[5].rstrip("\n") for line in f
                       if line.count(" ") >= 5 and "/" in line)
    except (OSError, IndexError):
        pass
    return out


def users_below(path: str) -> list[tuple[int, str]]:
    """(pid, name) of the processes that use something below PATH (this one excluded)."""
    prefix = path.rstrip("/") + "/"
    me = os.getpid()
    found: list[tuple[int, str]] = []
    for p in psutil.process_iter(["pid", "name"]):
        if p.pid == me:
            continue
        if any(x == path or x.startswith(prefix) for x in _paths(p)):
            found.append((p.pid, p.info["name"] or "?"))
    return found


def users_of_dev(dev: int) -> list[tuple[int, str]]:
    """(pid, name) of the processes holding a cwd, root or open file on device DEV."""
    found: list[tuple[int, str]] = []
    for p in psutil.process_iter(["pid", "name"]):
        base = f"/proc/{p.pid}"
        links = [f"{base}/cwd", f"{base}/root"]
        try:
            links += [f"{base}/fd/{n}" for n in os.listdir(f"{base}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                if os.stat(link).st_dev == dev:
                    found.append((p.pid, p.info["name"] or "?"))
                    break
            except OSError:
                continue
    return found


def describe(users: list[tuple[int, str]], limit: int = 8) -> str:
    shown = ", ".join(f"{pid} ({name})" for pid, name in users[:limit])
    more = f" and {len(users) - limit} more" if len(users) > limit else ""
    return shown + more
