"""A thin layer over the device-mapper ioctls (linux/dm-ioctl.h) and the kernel keyring.

Knows nothing about images: it creates a device from a table, resumes it, reads its status,
and removes it (deferred, so that a device in use goes away with its last user). The
signature of a verity root hash reaches the kernel as libcryptsetup hands it over: a "user"
key in the thread keyring, named in the table's ``root_hash_sig_key_desc``, unlinked again
once the table is loaded.

Every ioctl raises OSError with the kernel's errno. ``dm_available()`` asks the kernel; a
/dev/mapper/control node alone proves nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct

from overlayctl.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

CONTROL = "/dev/mapper/control"

DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16
DM_VERSION_MAJOR = 4

# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7]
_IOCTL = struct.Struct("<3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]
_SPEC = struct.Struct("<QQiI16s")
assert _IOCTL.size == 312 and _SPEC.size == 40

# Commands (enum in dm-ioctl.h) and the ioctl numbers _IOWR(0xfd, cmd, struct dm_ioctl).
DM_VERSION_CMD = 0
DM_LIST_DEVICES_CMD = 2
DM_DEV_CREATE_CMD = 3
DM_DEV_REMOVE_CMD = 4
DM_DEV_SUSPEND_CMD = 6
DM_DEV_STATUS_CMD = 7
DM_TABLE_LOAD_CMD = 9
DM_TABLE_STATUS_CMD = 12
DM_LIST_VERSIONS_CMD = 13
DM_TARGET_MSG_CMD = 14


def _iowr(nr: int) -> int:
    return (3 << 30) | (_IOCTL.size << 16) | (0xFD << 8) | nr


DM_VERSION = _iowr(DM_VERSION_CMD)
DM_LIST_DEVICES = _iowr(DM_LIST_DEVICES_CMD)
DM_DEV_CREATE = _iowr(DM_DEV_CREATE_CMD)
DM_DEV_REMOVE = _iowr(DM_DEV_REMOVE_CMD)
DM_DEV_SUSPEND = _iowr(DM_DEV_SUSPEND_CMD)
DM_DEV_STATUS = _iowr(DM_DEV_STATUS_CMD)
DM_TABLE_LOAD = _iowr(DM_TABLE_LOAD_CMD)
DM_TABLE_STATUS = _iowr(DM_TABLE_STATUS_CMD)
DM_LIST_VERSIONS = _iowr(DM_LIST_VERSIONS_CMD)
DM_TARGET_MSG = _iowr(DM_TARGET_MSG_CMD)

DM_READONLY_FLAG = 1 << 0
DM_SUSPEND_FLAG = 1 << 1
DM_PERSISTENT_DEV_FLAG = 1 << 3
DM_STATUS_TABLE_FLAG = 1 << 4
DM_ACTIVE_PRESENT_FLAG = 1 << 5
DM_INACTIVE_PRESENT_FLAG = 1 << 6
DM_BUFFER_FULL_FLAG = 1 << 8
DM_UUID_FLAG = 1 << 14
DM_DEFERRED_REMOVE = 1 << 17

_BUFSIZE = 16 * 1024


# ---------------------------------------------------------------------------------------------
# Packing (pure)

def _cstr(s: str, size: int, what: str) -> bytes:
    b = s.encode()
    if len(b) >= size or b"\0" in b:
        raise ValueError(f"device-mapper {what} {s!r} is longer than {size - 1} bytes")
    return b


def pack_ioctl(*, name: str = "", uuid: str = "", flags: int = 0, dev: int = 0,
               target_count: int = 0, payload: bytes = b"", size: int = 0) -> bytearray:
    """A struct dm_ioctl followed by PAYLOAD, in a buffer of at least SIZE bytes (room for
    what the kernel writes back)."""
    if "/" in name:
        raise ValueError(f"device-mapper name {name!r} contains '/'")
    total = max(_IOCTL.size + len(payload), size)
    buf = bytearray(total)
    _IOCTL.pack_into(buf, 0, DM_VERSION_MAJOR, 0, 0, total, _IOCTL.size, target_count, 0,
                     flags, 0, 0, dev, _cstr(name, DM_NAME_LEN, "name"),
                     _cstr(uuid, DM_UUID_LEN, "UUID"), b"")
    buf[_IOCTL.size:_IOCTL.size + len(payload)] = payload
    return buf


class DmInfo(Record):
    __slots__ = ("version", "data_size", "data_start", "target_count", "open_count", "flags",
                 "event_nr", "dev", "name", "uuid")
    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    event_nr: int
    dev: int
    name: str
    uuid: str

    def __init__(self, version: tuple[int, int, int], data_size: int, data_start: int,
                 target_count: int, open_count: int, flags: int, event_nr: int, dev: int,
                 name: str, uuid: str) -> None:
        self._fill(locals())


def unpack_ioctl(buf: bytes | bytearray) -> DmInfo:
    (v0, v1, v2, data_size, data_start, target_count, open_count, flags, event_nr, _pad,
     dev, name, uuid, _data) = _IOCTL.unpack_from(buf)
    return DmInfo((v0, v1, v2), data_size, data_start, target_count, open_count, flags,
                  event_nr, dev, name.split(b"\0")[0].decode(errors="replace"),
                  uuid.split(b"\0")[0].decode(errors="replace"))


def pack_targets(targets: Sequence[tuple[int, int, str, str]]) -> bytes:
    """The table of DM_TABLE_LOAD: per target a struct dm_target_spec, its parameter string
    and NUL, padded to 8 bytes; ``next`` is the offset from this spec to the next."""
    out = bytearray()
    for start, length, ttype, params in targets:
        p = params.encode() + b"\0"
        entry = _SPEC.size + len(p)
        entry += -entry % 8
        spec = _SPEC.pack(start, length, 0, entry, _cstr(ttype, DM_MAX_TYPE_NAME, "target"))
        out += spec + p + bytes(entry - _SPEC.size - len(p))
    return bytes(out)


def unpack_targets(buf: bytes | bytearray, info: DmInfo) -> list[tuple[int, int, str, str]]:
    """The targets DM_TABLE_STATUS returned: ``next`` counts from the start of the data."""
    out = []
    base = info.data_start
    off = 0
    for _ in range(info.target_count):
        start, length, _status, nxt, ttype = _SPEC.unpack_from(buf, base + off)
        p = base + off + _SPEC.size
        end = buf.index(b"\0", p)
        out.append((start, length, ttype.split(b"\0")[0].decode(),
                    bytes(buf[p:end]).decode(errors="replace")))
        off = nxt
    return out


# ---------------------------------------------------------------------------------------------
# The control device

def _open_control() -> int:
    return os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)


def _ioctl(req: int, buf: bytearray) -> bytearray:
    fd = _open_control()
    try:
        fcntl.ioctl(fd, req, buf, True)
    finally:
        os.close(fd)
    return buf


def dm_available(proc: str = "/proc") -> bool:
    """Whether the kernel has device-mapper: listed in /proc/misc or /proc/devices, or (the
    module not loaded yet; opening the control node loads it) DM_VERSION on
    /dev/mapper/control works. The node's existence decides nothing."""
    for f in ("misc", "devices"):
        try:
            with open(os.path.join(proc, f), encoding="ascii", errors="replace") as fh:
                if any(line.split()[-1:] == ["device-mapper"] for line in fh):
                    return True
        except OSError:
            pass
    try:
        version()
    except OSError:
        return False
    return True


def version() -> tuple[int, int, int]:
    """The kernel's device-mapper interface version (DM_VERSION)."""
    return unpack_ioctl(_ioctl(DM_VERSION, pack_ioctl())).version


def create(name: str, uuid: str = "") -> int:
    """DM_DEV_CREATE: a device without a table; returns its dev_t."""
    return unpack_ioctl(_ioctl(DM_DEV_CREATE, pack_ioctl(name=name, uuid=uuid))).dev


def load_table(name: str, targets: Sequence[tuple[int, int, str, str]], *,
               readonly: bool = True) -> None:
    """DM_TABLE_LOAD into the inactive slot (resume() makes it live)."""
    _ioctl(DM_TABLE_LOAD, pack_ioctl(name=name, flags=DM_READONLY_FLAG if readonly else 0,
                                     target_count=len(targets), payload=pack_targets(targets)))


def resume(name: str) -> None:
    """DM_DEV_SUSPEND without DM_SUSPEND_FLAG: the loaded table goes live."""
    _ioctl(DM_DEV_SUSPEND, pack_ioctl(name=name))


def remove(name: str, *, deferred: bool = False) -> bool:
    """DM_DEV_REMOVE. DEFERRED: a device still open is removed when its last user closes
    it. Returns True when the removal was deferred (the device is still there)."""
    info = unpack_ioctl(_ioctl(DM_DEV_REMOVE, pack_ioctl(
        name=name, flags=DM_DEFERRED_REMOVE if deferred else 0)))
    return bool(info.flags & DM_DEFERRED_REMOVE)


def message(name: str, text: str, sector: int = 0) -> None:
    """DM_TARGET_MSG: e.g. "@cancel_deferred_remove"."""
    _ioctl(DM_TARGET_MSG, pack_ioctl(name=name, payload=struct.pack("<Q", sector)
                                     + text.encode() + b"\0"))


def cancel_deferred_remove(name: str) -> None:
    message(name, "@cancel_deferred_remove")


def status(name: str) -> DmInfo:
    """DM_DEV_STATUS: dev_t, open count, flags (DM_DEFERRED_REMOVE set while pending)."""
    return unpack_ioctl(_ioctl(DM_DEV_STATUS, pack_ioctl(name=name)))


def table_status(name: str, *, table: bool = False) -> list[tuple[int, int, str, str]]:
    """DM_TABLE_STATUS: per target (start, length, type, status), or with TABLE the table
    lines as loaded. For verity the status is "V" (verified so far) or "C" (corruption)."""
    size = _BUFSIZE
    while True:
        buf = _ioctl(DM_TABLE_STATUS, pack_ioctl(
            name=name, flags=DM_STATUS_TABLE_FLAG if table else 0, size=size))
        info = unpack_ioctl(buf)
        if not info.flags & DM_BUFFER_FULL_FLAG:
            return unpack_targets(buf, info)
        size *= 4


def list_devices() -> dict[str, int]:
    """DM_LIST_DEVICES: name -> dev_t of every device-mapper device."""
    buf = _ioctl(DM_LIST_DEVICES, pack_ioctl(size=_BUFSIZE))
    info = unpack_ioctl(buf)
    out: dict[str, int] = {}
    off = info.data_start
    if info.data_size <= off + 12:
        return out
    while True:
        dev, nxt = struct.unpack_from("<QI", buf, off)
        end = buf.index(b"\0", off + 12)
        out[bytes(buf[off + 12:end]).decode(errors="replace")] = dev
        if not nxt:
            return out
        off += nxt


def target_versions() -> dict[str, tuple[int, int, int]]:
    """DM_LIST_VERSIONS: the targets the kernel has loaded (verity once dm-verity is)."""
    buf = _ioctl(DM_LIST_VERSIONS, pack_ioctl(size=_BUFSIZE))
    info = unpack_ioctl(buf)
    out: dict[str, tuple[int, int, int]] = {}
    off = info.data_start
    while True:
        nxt, a, b, c = struct.unpack_from("<4I", buf, off)
        end = buf.index(b"\0", off + 16)
        out[bytes(buf[off + 16:end]).decode(errors="replace")] = (a, b, c)
        if not nxt:
            return out
        off += nxt


# ---------------------------------------------------------------------------------------------
# The kernel keyring (add_key(2), keyctl(2))

KEY_SPEC_THREAD_KEYRING = -1
KEYCTL_UNLINK = 9
KEYCTL_READ = 11

# (add_key, keyctl) syscall numbers.
_KEY_SYSCALLS = {
    "x86_64": (248, 250), "i386": (286, 288), "i686": (286, 288),
    "aarch64": (217, 219), "riscv64": (217, 219), "loongarch64": (217, 219),
    "armv7l": (309, 311), "armv8l": (309, 311),
    "ppc64le": (269, 271), "ppc64": (269, 271), "s390x": (278, 280),
}


def _syscall(nr: int, *args: object) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    r = int(fn(ctypes.c_long(nr), *args))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def add_user_key(description: str, payload: bytes,
                 keyring: int = KEY_SPEC_THREAD_KEYRING) -> int:
    """add_key("user", DESCRIPTION, PAYLOAD, KEYRING): the key's serial number."""
    nrs = _KEY_SYSCALLS.get(os.uname().machine)
    if nrs is None:
        raise OSError(errno.ENOSYS, f"add_key: unknown syscall number on {os.uname().machine}")
    buf = ctypes.create_string_buffer(payload, len(payload))
    return _syscall(nrs[0], ctypes.c_char_p(b"user"), ctypes.c_char_p(description.encode()),
                    buf, ctypes.c_size_t(len(payload)), ctypes.c_int(keyring))


def _keyctl(*args: object) -> int:
    nrs = _KEY_SYSCALLS.get(os.uname().machine)
    if nrs is None:
        raise OSError(errno.ENOSYS, f"keyctl: unknown syscall number on {os.uname().machine}")
    return _syscall(nrs[1], *args)


def unlink_key(key: int, keyring: int = KEY_SPEC_THREAD_KEYRING) -> None:
    _keyctl(ctypes.c_int(KEYCTL_UNLINK), ctypes.c_int(key), ctypes.c_int(keyring))


def read_key(key: int, size: int = 65536) -> bytes:
    """keyctl(KEYCTL_READ): the payload of a key this process may read."""
    buf = ctypes.create_string_buffer(size)
    n = _keyctl(ctypes.c_int(KEYCTL_READ), ctypes.c_int(key), buf, ctypes.c_size_t(size))
    return buf.raw[:min(n, size)]


# ---------------------------------------------------------------------------------------------
# A device owned by a context manager

class DmDevice(Record):
    __slots__ = ("name", "dev")
    name: str
    dev: int

    def __init__(self, name: str, dev: int) -> None:
        self._fill(locals())

    def open(self) -> int:
        """An O_RDONLY fd on the device: /dev/dm-N where devtmpfs has it, else through a
        node made for the moment (and unlinked at once) in /dev. The fd's /proc/self/fd/N is
        a path the kernel accepts as a mount source."""
        node = f"/dev/dm-{os.minor(self.dev)}"
        try:
            st = os.stat(node)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == self.dev:
                return os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        tmp = f"/dev/.overlayctl-dm-{os.getpid()}-{os.minor(self.dev)}"
        os.mknod(tmp, 0o600 | stat.S_IFBLK, self.dev)
        try:
            return os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.unlink(tmp)


def lookup(name: str) -> DmDevice | None:
    """The live device NAME, or None when there is none."""
    try:
        return DmDevice(name, status(name).dev)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


@contextlib.contextmanager
def device(name: str, targets: Sequence[tuple[int, int, str, str]], *, uuid: str = "",
           signature: bytes | None = None, key_desc: str | None = None,
           readonly: bool = True) -> Iterator[DmDevice]:
    """Create NAME with TARGETS and make it live; yields the device. With SIGNATURE, it sits
    in the thread keyring as the "user" key KEY_DESC while the table loads (the table names
    it in root_hash_sig_key_desc); the kernel checks it against its trusted keyrings then,
    and refuses the table (EKEYREJECTED, ENOKEY, ...) when it cannot. On the way out the
    device is removed with deferred removal: a mount using it keeps it until unmounted. A
    failure on the way in removes it at once; nothing is left behind."""
    if (signature is None) != (key_desc is None):
        raise ValueError("signature and key_desc go together")
    dev = create(name, uuid)
    try:
        key = add_user_key(key_desc, signature) if signature is not None and key_desc else None
        try:
            load_table(name, targets, readonly=readonly)
        finally:
            if key is not None:
                with contextlib.suppress(OSError):
                    unlink_key(key)
        resume(name)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(name)
        raise
    try:
        yield DmDevice(name, dev)
    finally:
        try:
            remove(name, deferred=True)
        except OSError as e:
            if e.errno != errno.ENXIO:      # already gone
                raise
