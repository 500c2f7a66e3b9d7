"""Whole-tree snapshots for comparing what a directory holds (raw, or as a merged overlay
shows it): every entry's type, mode, owner, device number, content or link target and
xattrs, and optionally its times. Shared by the import, commit and cleanup tests."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any

META = {".systemd-sysext", ".systemd-confext"}


def xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in sorted(names):
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def entry(path: str, *, times: bool = False, overlay_xattrs: bool = True) -> tuple[Any, ...]:
    st = os.lstat(path)
    body: str | None = None
    if stat.S_ISREG(st.st_mode):
        # O_NOATIME: taking a snapshot does not change what a later one compares.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
        with open(fd, "rb") as f:
            body = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        body = os.readlink(path)
    xa = xattrs(path)
    if not overlay_xattrs:
        xa = {k: v for k, v in xa.items()
              if not k.startswith(("trusted.overlay.", "user.overlay."))}
    rec: tuple[Any, ...] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                            st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                            else 0, body, tuple(xa.items()))
    if times:
        rec += (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return rec


def tree(top: str, *, times: bool = False, skip_meta: bool = True,
         overlay_xattrs: bool = True) -> dict[str, tuple[Any, ...]]:
    """rel -> entry() of everything below TOP, and "." for TOP itself (never following a
    symlink; the overlay's metadata dir left out unless SKIP_META is false)."""
    out = {".": entry(top, times=times, overlay_xattrs=overlay_xattrs)}
    for dirpath, dirnames, filenames in os.walk(top):
        if skip_meta and dirpath == top:
            dirnames[:] = [d for d in dirnames if d not in META]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, top)] = entry(p, times=times, overlay_xattrs=overlay_xattrs)
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """rel -> (a, b) for every entry that is not the same in both."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
