"""Raw extension images: a squashfs, erofs or ext4 file system in a file, or a GPT disk image
with a root or /usr partition (Discoverable Partitions Specification). The image is attached
read-only to a loop device (LOOP_CONFIGURE, auto-clear, the partition selected by offset and
size, so no partition devices or udev are needed) and mounted as a detached mount: nothing
appears anywhere, and both the mount and the loop device go away with the last user."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import uuid
from dataclasses import dataclass

from overlayctl import kernel as k
from overlayctl.errors import die

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

# Partition type UUIDs (root and /usr) of the Discoverable Partitions Specification.
DPS_TYPES: dict[str, tuple[str, str]] = {
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": ("root", "x86-64"),
    "8484680c-9521-48c6-9c11-b0720656f69e": ("usr", "x86-64"),
    "44479540-f297-41b2-9af7-d131d5f0458a": ("root", "x86"),
    "75250d76-8cc6-458e-bd66-bd47cc81a812": ("usr", "x86"),
    "b921b045-1df0-41c3-af44-4c6f280d3fae": ("root", "arm64"),
    "b0e01050-ee5f-4390-949a-9101b17104e9": ("usr", "arm64"),
    "69dad710-2ce4-4e3c-b16c-21a1d49abed3": ("root", "arm"),
    "7d0359a3-02b3-4f0a-865c-654403e70625": ("usr", "arm"),
    "72ec70a6-cf74-40e6-bd49-4bda08e8f224": ("root", "riscv64"),
    "beaec34b-8442-439b-a40b-984381ed097d": ("usr", "riscv64"),
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": ("esp", ""),
}


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


def _detect_fs(f: int, offset: int) -> str | None:
    head = os.pread(f, 2048, offset)
    if head[:4] == b"hsqs":
        return "squashfs"
    if len(head) >= 1028 and struct.unpack_from("<I", head, 1024)[0] == 0xE0F5E1E2:
        return "erofs"
    if len(head) >= 1082 and struct.unpack_from("<H", head, 1080)[0] == 0xEF53:
        return "ext4"
    return None


def _fs_size(f: int, offset: int, fstype: str) -> int:
    """The size the file system's superblock claims (0 when unknown)."""
    head = os.pread(f, 2048, offset)
    if fstype == "squashfs" and len(head) >= 48:
        return int(struct.unpack_from("<Q", head, 40)[0])          # bytes_used
    if fstype == "erofs" and len(head) >= 1064:
        blkszbits = head[1024 + 12]
        return int(struct.unpack_from("<I", head, 1024 + 36)[0]) << blkszbits
    if fstype == "ext4" and len(head) >= 1048:
        count = struct.unpack_from("<I", head, 1024 + 4)[0]
        log_bs = struct.unpack_from("<I", head, 1024 + 24)[0]
        return int(count) << (10 + int(log_bs))
    return 0


def _check_size(f: int, path: str, region: Region, avail: int) -> None:
    need = _fs_size(f, region.offset, region.fstype)
    if need > avail:
        raise die(f"{path} is truncated: its {region.fstype} {region.what} needs {need} bytes, "
                  f"{avail} are there", "copy the image again")


@dataclass
class Region:
    fstype: str
    offset: int
    size: int          # 0: to the end of the file
    what: str          # "file system" or "partition N (usr)"
    usr_only: bool = False   # a /usr partition: its root is the image's /usr


def _gpt_region(f: int, path: str, size: int) -> Region | None:
    """The partition to use of a GPT image: /usr wins over root, as for system extensions."""
    for sector in (512, 4096):
        hdr = os.pread(f, 92, sector)
        if hdr[:8] != b"EFI PART":
            continue
        entries_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
        if esize < 128 or count > 1024:
            raise die(f"{path}: the partition table is damaged", "rebuild the image")
        table = os.pread(f, count * esize, entries_lba * sector)
        found: dict[str, Region] = {}
        for i in range(count):
            e = table[i * esize:(i + 1) * esize]
            if len(e) < 128:
                break
            tid = str(uuid.UUID(bytes_le=bytes(e[:16])))
            kind = DPS_TYPES.get(tid)
            if kind is None or kind[0] == "esp":
                continue
            first, last = struct.unpack_from("<QQ", e, 32)
            off, length = first * sector, (last - first + 1) * sector
            if off + length > size:
                raise die(f"{path}: partition {i + 1} lies beyond the end of the image "
                          "(truncated?)", "copy the image again")
            fs = _detect_fs(f, off)
            if fs is None:
                continue
            found.setdefault(kind[0], Region(fs, off, length, f"partition {i + 1} ({kind[0]})",
                                             usr_only=kind[0] == "usr"))
        return found.get("usr") or found.get("root")
    return None


def dissect(path: str) -> Region:
    """What in the image file to mount, or a clear error."""
    try:
        f = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise die(f"cannot open image {path}: {e.strerror}", "check the file") from None
    try:
        size = os.fstat(f).st_size
        if size < 1024:
            raise die(f"{path} is too small to be an image ({size} bytes)",
                      "use a squashfs, erofs or GPT disk image")
        fs = _detect_fs(f, 0)
        if fs:
            whole = Region(fs, 0, 0, "file system")
            _check_size(f, path, whole, size)
            return whole
        region = _gpt_region(f, path, size)
        if region is not None:
            _check_size(f, path, region, region.size)
        if region is None:
            has_gpt = any(os.pread(f, 8, s) == b"EFI PART" for s in (512, 4096))
            if has_gpt:
                raise die(f"{path}: the partition table has no root or /usr partition with a "
                          "file system overlayctl can mount",
                          "use the partition types of the Discoverable Partitions Specification")
            raise die(f"{path} is neither a squashfs, erofs or ext4 image nor a GPT disk image",
                      "build it with mksquashfs, mkfs.erofs or systemd-repart")
        return region
    finally:
        os.close(f)


def _attach(path: str, region: Region) -> int:
    """A read-only, auto-clearing loop device over the region; returns its open fd."""
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(16):
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{n}"
                if not os.path.exists(dev):
                    os.mknod(dev, 0o660 | 0o060000, os.makedev(7, n))
                lfd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
                cfg = _LoopConfig()
                cfg.fd = backing
                cfg.block_size = 0
                cfg.info.lo_offset = region.offset
                cfg.info.lo_sizelimit = region.size
                cfg.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
                try:
                    fcntl.ioctl(lfd, LOOP_CONFIGURE, cfg)
                except OSError as e:
                    os.close(lfd)
                    if e.errno == errno.EBUSY:
                        continue   # somebody took it first
                    raise
                return lfd
            raise OSError(errno.EBUSY, "no free loop device")
        finally:
            os.close(ctl)
    finally:
        os.close(backing)


def mount_image(path: str) -> tuple[int, bool]:
    """Attach and mount the image read-only; returns a detached mount fd, and whether its
    root is the image's /usr (a /usr partition). The loop device clears itself once the
    mount (and every overlay using it) is gone."""
    region = dissect(path)
    try:
        lfd = _attach(path, region)
    except OSError as e:
        raise die(f"cannot attach {path} to a loop device: {e.strerror}",
                  "load the loop module (modprobe loop) and run as root") from None
    try:
        dev = f"/proc/self/fd/{lfd}"
        try:
            fd = k.fsopen(region.fstype)
        except OSError as e:
            raise die(f"the kernel cannot mount {region.fstype} ({path}): {e.strerror}",
                      f"modprobe {region.fstype}") from None
        try:
            k.fsconfig_string(fd, "source", os.readlink(dev))
            k.fsconfig_flag(fd, "ro")
            if region.fstype == "ext4":
                k.fsconfig_flag(fd, "noload")
            k.fsconfig_create(fd)
            mfd = k.fsmount(fd, k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOSUID)
            return mfd, region.usr_only
        except OSError as e:
            raise die(f"{path}: the {region.fstype} {region.what} cannot be mounted: "
                      f"{e.strerror} (truncated or damaged?)", "rebuild the image") from None
        finally:
            os.close(fd)
    finally:
        os.close(lfd)

