"""Block devices overlayctl creates for images, each owned by a context (an ExitStack):
read-only, auto-clearing loop devices (LOOP_CONFIGURE, no udev needed), and dm-verity
devices on top of them (dm.py), named ``<roothash>-verity`` as systemd names shared ones,
shared with a live device of the same root hash, and released with deferred removal. A
device is gone once its last user is: the dm device with the mount made from it, the loop
devices with the dm device."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from overlayctl import kernel as k
from overlayctl.resources import ExitStack

TYPE_CHECKING = False
if TYPE_CHECKING:
    from overlayctl.verity import VerityParams

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


def _devnum(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def verity_name(root_hash: bytes) -> str:
    from overlayctl.verity import device_name
    return device_name(root_hash)


def _release(name: str) -> None:
    """Deferred removal: the device goes when its last user (a mount) lets go; at once if
    nothing uses it."""
    from overlayctl import dm
    try:
        dm.remove(name, deferred=True)
    except OSError as e:
        if e.errno != errno.ENXIO:      # already gone
            raise


def shared_verity_device(name: str, root_hash: bytes,
                         stack: ExitStack) -> tuple[int, bool] | None:
    """The live verity device NAME, if it maps ROOT_HASH (set up by an earlier merge that is
    still mounted, by systemd, or by veritysetup): an fd of it owned by STACK (released with
    deferred removal when STACK closes), and whether the kernel checked a signature for it.
    None when there is none, or it vanished before it could be opened."""
    from overlayctl import dm
    from overlayctl.verity import reusable
    dev = dm.lookup(name)
    if dev is None:
        return None
    try:
        table = dm.table_status(name, table=True)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise
    if len(table) != 1 or table[0][2] != "verity":
        raise OSError(errno.EBUSY, f"device-mapper device {name} exists and is not dm-verity")
    params = table[0][3]
    if not (reusable(params, root_hash, signed=True) or reusable(params, root_hash, False)):
        raise OSError(errno.EBUSY, f"device-mapper device {name} maps another root hash")
    try:
        fd = dev.open()
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT, errno.ENODEV):
            return None         # its deferred removal ran meanwhile
        raise
    stack.callback(_release, name)
    k.owned(stack, fd)
    return fd, reusable(params, root_hash, signed=True)


def verity_device(name: str, data: tuple[str, int, int], hashdev: tuple[str, int, int],
                  params: VerityParams, root_hash: bytes, *, signature: bytes | None,
                  stack: ExitStack) -> int:
    """A new dm-verity device NAME over DATA and HASHDEV ((file, offset, size), each on a
    read-only loop device of its own), owned by STACK: an fd of it. With SIGNATURE, the
    kernel checks it against its keyrings while the table loads (root_hash_sig_key_desc)
    and refuses the table if it cannot (OSError: EKEYREJECTED, ENOKEY, EINVAL without
    signature support, ...). On the way out the device is removed with deferred removal,
    and the loop devices clear themselves once it is gone; a failure on the way in leaves
    nothing behind."""
    from overlayctl import dm
    from overlayctl import verity as V
    with ExitStack() as own:
        ddev = loop_device(data[0], data[1], data[2], own)
        hdev = loop_device(hashdev[0], hashdev[1], hashdev[2], own)
        desc = V.key_description(params, name) if signature is not None else None
        table = [V.verity_table(params, _devnum(ddev), _devnum(hdev), root_hash,
                                sig_key_desc=desc)]
        dev = own.enter_context(dm.device(name, table, uuid=V.dm_uuid(params, name),
                                          signature=signature, key_desc=desc))
        fd = k.owned(own, dev.open())
        stack.enter_context(own.pop_all())
        return fd
