"""Thin ctypes layer over the mount syscalls.

Knows nothing about extensions: it opens file systems, mounts, moves and detaches them.
Every function raises OSError with the errno of the failing call.
"""

from __future__ import annotations

import ctypes
import os

from overlayctl.resources import ExitStack

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# The numbers of the "new" syscalls are the same on every architecture (unified table).
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_mount_setattr = 442

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6

OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100

MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_BENEATH = 0x200

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MS_PRIVATE = 1 << 18

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# VFS (per-mount) flags that may appear in an option string; they are not overlayfs options.
VFS_FLAGS: dict[str, tuple[int, int]] = {
    # word: (MOUNT_ATTR_* to set, MS_* for mount(2))
    "ro": (MOUNT_ATTR_RDONLY, MS_RDONLY),
    "nosuid": (MOUNT_ATTR_NOSUID, MS_NOSUID),
    "nodev": (MOUNT_ATTR_NODEV, MS_NODEV),
    "noexec": (MOUNT_ATTR_NOEXEC, MS_NOEXEC),
    "noatime": (MOUNT_ATTR_NOATIME, MS_NOATIME),
    "relatime": (MOUNT_ATTR_RELATIME, MS_RELATIME),
    "strictatime": (MOUNT_ATTR_STRICTATIME, MS_STRICTATIME),
    "nodiratime": (MOUNT_ATTR_NODIRATIME, MS_NODIRATIME),
}
# Words that cancel a flag.
VFS_CLEAR: dict[str, str] = {"rw": "ro", "suid": "nosuid", "dev": "nodev", "exec": "noexec",
                             "atime": "noatime", "diratime": "nodiratime"}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def kernel_at_least(major: int, minor: int) -> bool:
    try:
        have = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


def can_mount_beneath() -> bool:
    """MOVE_MOUNT_BENEATH appeared in Linux 6.5."""
    return kernel_at_least(6, 5)


CLONE_NEWNS = 0x00020000


def unshare_mount_ns() -> None:
    """A private mount namespace for this process: nothing mounted here propagates back."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)


def have_new_mount_api() -> bool:
    """fsopen() for overlay with 'lowerdir+' (Linux 6.8+)."""
    return os.environ.get("OVERLAYCTL_LEGACY_MOUNT") != "1" and kernel_at_least(6, 8)


_detached_ok: bool | None = None


def detached_layers_ok() -> bool:
    """Can a detached mount (fsmount, open_tree clone) be an overlay layer? Newer kernels
    allow it; older ones refuse with "failed to clone lowerpath". Probed once where in doubt
    (Linux 6.8 to 6.16), assumed from 6.17 on."""
    global _detached_ok
    if os.environ.get("OVERLAYCTL_NO_DETACHED_LAYERS") == "1" or not have_new_mount_api():
        return False
    if _detached_ok is None:
        _detached_ok = kernel_at_least(6, 17) or _probe_detached_layers()
    return _detached_ok


def _probe_detached_layers() -> bool:
    try:
        fd = fsopen("tmpfs")
        try:
            fsconfig_create(fd)
            t = fsmount(fd, 0)
        finally:
            os.close(fd)
        try:
            for d in ("a", "b"):
                os.mkdir(f"/proc/self/fd/{t}/{d}")
            fd = fsopen("overlay")
            try:
                for d in ("a", "b"):
                    fsconfig_string(fd, "lowerdir+", f"/proc/self/fd/{t}/{d}")
                fsconfig_create(fd)
                return True
            finally:
                os.close(fd)
        finally:
            os.close(t)
    except OSError:
        return False


def fsopen(fstype: str) -> int:
    return _check(_syscall(SYS_fsopen, _b(fstype), FSOPEN_CLOEXEC), f"fsopen({fstype})")


def fsconfig_string(fd: int, key: str, value: str) -> None:
    _check(_syscall(SYS_fsconfig, fd, FSCONFIG_SET_STRING, _b(key), _b(value), 0),
           f"fsconfig({key})", value)


def fsconfig_flag(fd: int, key: str) -> None:
    _check(_syscall(SYS_fsconfig, fd, FSCONFIG_SET_FLAG, _b(key), None, 0), f"fsconfig({key})")


def fsconfig_create(fd: int) -> None:
    _check(_syscall(SYS_fsconfig, fd, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig(create)")


def fsmount(fd: int, attrs: int) -> int:
    return _check(_syscall(SYS_fsmount, fd, FSMOUNT_CLOEXEC, ctypes.c_uint(attrs)), "fsmount")


def open_tree(path: str, *, dirfd: int = -100, clone: bool = True, recursive: bool = False,
              empty_path: bool = False) -> int:
    flags = OPEN_TREE_CLOEXEC | (OPEN_TREE_CLONE if clone else 0)
    if recursive:
        flags |= AT_RECURSIVE
    if empty_path:
        flags |= AT_EMPTY_PATH
    return _check(_syscall(SYS_open_tree, dirfd, _b(path), ctypes.c_uint(flags)), "open_tree", path)


def move_mount(from_fd: int, to_path: str, *, to_dirfd: int = -100, beneath: bool = False) -> None:
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
    if not to_path:
        flags |= MOVE_MOUNT_T_EMPTY_PATH
    _check(_syscall(SYS_move_mount, from_fd, b"", to_dirfd, _b(to_path), ctypes.c_uint(flags)),
           "move_mount", to_path)


def mount_setattr(fd: int, path: str, attr_set: int, attr_clr: int = 0, *,
                  recursive: bool = False, propagation: int = 0) -> None:
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = (AT_EMPTY_PATH if not path else 0) | (AT_RECURSIVE if recursive else 0)
    _check(_syscall(SYS_mount_setattr, fd, _b(path), ctypes.c_uint(flags), ctypes.byref(attr),
                    ctypes.sizeof(attr)), "mount_setattr", path)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                            ctypes.c_char_p]
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount(target: str, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    _check(_libc.umount2(_b(target), flags), "umount", target)


def tmpfs(mode: str = "0700") -> int:
    """A new tmpfs as a detached mount (reachable only through the returned fd)."""
    fd = fsopen("tmpfs")
    try:
        fsconfig_string(fd, "mode", mode)
        fsconfig_create(fd)
        return fsmount(fd, MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID)
    finally:
        os.close(fd)


def fd_path(fd: int, rel: str = "") -> str:
    """A path through which FD (a directory or detached mount) is reached."""
    base = f"/proc/self/fd/{fd}"
    return f"{base}/{rel}" if rel else base


def uname_architecture() -> str:
    """The kernel architecture in systemd's naming (x86-64, arm64, ...)."""
    m = os.uname().machine
    return {
        "x86_64": "x86-64", "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86",
        "aarch64": "arm64", "aarch64_be": "arm64-be", "armv7l": "arm", "armv8l": "arm",
        "ppc64le": "ppc64-le", "ppc64": "ppc64", "ppc": "ppc", "s390x": "s390x", "s390": "s390",
        "riscv64": "riscv64", "riscv32": "riscv32", "loongarch64": "loongarch64",
        "mips64": "mips64", "mips": "mips", "alpha": "alpha", "parisc": "parisc",
        "sparc64": "sparc64", "sparc": "sparc", "sh": "sh", "ia64": "ia64",
    }.get(m, m)


STATX_BTIME = 0x800
AT_FDCWD = -100


def birth_time_us(path: str) -> int:
    """When PATH was created, in µs, as systemd takes an image's crtime: statx's btime, else
    its user.crtime_usec xattr, else 0 (not known)."""
    import struct
    buf = ctypes.create_string_buffer(256)
    statx = _libc.statx
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                      ctypes.c_void_p]
    if statx(AT_FDCWD, os.fsencode(path), 0, STATX_BTIME, buf) == 0:
        mask: int = struct.unpack_from("<I", buf, 0)[0]
        sec: int
        nsec: int
        sec, nsec = struct.unpack_from("<qI", buf, 80)                 # stx_btime
        if mask & STATX_BTIME and sec > 0:
            return sec * 1_000_000 + nsec // 1000
    try:
        raw = os.getxattr(path, "user.crtime_usec")
    except OSError:
        return 0
    return int.from_bytes(raw, "little") if len(raw) == 8 else 0


def owned(stack: ExitStack, fd: int) -> int:
    """Hand FD to STACK: it is closed when the stack unwinds, whatever happens."""
    stack.callback(os.close, fd)
    return fd
