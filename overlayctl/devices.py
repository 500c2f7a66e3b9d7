"""Block devices overlayctl creates for images, each owned by a context (an ExitStack):
read-only, auto-clearing loop devices (LOOP_CONFIGURE, no udev needed). A device is gone
once its last user is: the loop device with the mount made from it."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from overlayctl import kernel as k
from overlayctl.resources import ExitStack

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * LO_KEY_SIZE), ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", _LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


def loop_device(path: str, offset: int, size: int, stack: ExitStack) -> str:
    """A read-only, auto-clearing loop device over SIZE bytes (0: all) of PATH from OFFSET;
    its fd is owned by STACK (the device clears itself once that is closed and no mount
    uses it). Returns the device's path."""
    with ExitStack() as own:
        backing = k.owned(own, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        ctl = k.owned(own, os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC))
        for _ in range(16):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{n}"
            if not os.path.exists(dev):
                os.mknod(dev, 0o660 | 0o060000, os.makedev(7, n))
            lfd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            cfg = _LoopConfig()
            cfg.fd = backing
            cfg.block_size = 0
            cfg.info.lo_offset = offset
            cfg.info.lo_sizelimit = size
            cfg.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
            try:
                fcntl.ioctl(lfd, LOOP_CONFIGURE, cfg)
            except OSError as e:
                os.close(lfd)
                if e.errno == errno.EBUSY:
                    continue   # somebody took it first
                raise
            k.owned(stack, lfd)
            return os.readlink(f"/proc/self/fd/{lfd}")
        raise OSError(errno.EBUSY, "no free loop device")
