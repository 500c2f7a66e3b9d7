"""Making one overlayfs mount from layer paths: the mount flags, and fsopen/fsconfig/fsmount
with one lowerdir+ per layer (so no path needs escaping)."""

from __future__ import annotations

import os

from overlayctl import kernel as k


def vfs_flags(vfs: tuple[str, ...]) -> tuple[int, int]:
    """(MOUNT_ATTR_*, MS_*) for mount flag words such as ro, nodev, noatime."""
    attr = ms = 0
    for w in vfs:
        if w in k.VFS_FLAGS:
            a, m = k.VFS_FLAGS[w]
            if w in ("noatime", "relatime", "strictatime"):
                attr &= ~k.MOUNT_ATTR__ATIME
                ms &= ~(k.MS_NOATIME | k.MS_RELATIME | k.MS_STRICTATIME)
            attr |= a
            ms |= m
        elif w in k.VFS_CLEAR:
            a, m = k.VFS_FLAGS[k.VFS_CLEAR[w]]
            attr &= ~a
            ms &= ~m
    return attr, ms



def overlay_new_api(source: str, lowers: list[str], upper: str | None, work: str | None,
                    fs_options: tuple[str, ...], vfs_options: tuple[str, ...]) -> int:
    """A detached overlay of LOWERS (top first), with UPPER and WORK if given."""
    fd = k.fsopen("overlay")
    try:
        k.fsconfig_string(fd, "source", source)
        for p in lowers:
            k.fsconfig_string(fd, "lowerdir+", p)
        if upper and work:
            # overlayfs unescapes backslashes in these two (not in lowerdir+).
            k.fsconfig_string(fd, "upperdir", upper.replace("\\", "\\\\"))
            k.fsconfig_string(fd, "workdir", work.replace("\\", "\\\\"))
        for opt in fs_options:
            key, sep, value = opt.partition("=")
            if sep:
                k.fsconfig_string(fd, key, value)
            else:
                k.fsconfig_flag(fd, key)
        k.fsconfig_create(fd)
        attr, _ = vfs_flags(vfs_options)
        return k.fsmount(fd, attr)
    finally:
        os.close(fd)


class OverlaySpec:
    """What making one overlay needs: its layers as paths (detached mounts as
    /proc/self/fd/N/...), its options, and the binds to make read-only inside it."""

    __slots__ = ("target", "hierarchy", "lowers", "upper", "work", "fs_options", "vfs_options",
                 "meta_rel", "eph_base", "eph_rel")

    def __init__(self, target: str, hierarchy: str, lowers: list[str], upper: str | None,
                 work: str | None, fs_options: tuple[str, ...], vfs_options: tuple[str, ...],
                 meta_rel: str | None, eph_base: str | None, eph_rel: str | None) -> None:
        self.target = target
        self.hierarchy = hierarchy
        self.lowers = lowers
        self.upper = upper
        self.work = work
        self.fs_options = fs_options
        self.vfs_options = vfs_options
        self.meta_rel = meta_rel          # the metadata dir, bound read-only onto itself
        self.eph_base = eph_base          # the ephemeral tmpfs ...
        self.eph_rel = eph_rel            # ... exposed read-only there
