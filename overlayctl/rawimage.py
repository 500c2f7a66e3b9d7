"""Raw extension images: a squashfs, erofs or ext4 file system in a file, or a GPT disk image
with a root or /usr partition (Discoverable Partitions Specification). The image is attached
read-only to a loop device (LOOP_CONFIGURE, auto-clear, the partition selected by offset and
size, so no partition devices or udev are needed) and mounted as a detached mount: nothing
appears anywhere, and both the mount and the loop device go away with the last user."""

from __future__ import annotations

import os
import struct
import uuid

from overlayctl import devices
from overlayctl import kernel as k
from overlayctl.errors import die
from overlayctl.record import Record
from overlayctl.resources import ExitStack

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


class Region(Record):
    """The part of an image file that holds the file system to mount."""

    __slots__ = ("fstype", "offset", "size", "what", "usr_only")
    fstype: str
    offset: int
    size: int          # 0: to the end of the file
    what: str          # "file system" or "partition N (usr)"
    usr_only: bool     # a /usr partition: its root is the image's /usr

    def __init__(self, fstype: str, offset: int, size: int, what: str,
                 usr_only: bool = False) -> None:
        self._fill(locals())


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


def mount_image(path: str, stack: ExitStack) -> tuple[int, bool]:
    """Attach and mount the image read-only; returns a detached mount fd (owned by STACK),
    and whether its root is the image's /usr (a /usr partition). The loop device clears
    itself once the mount (and every overlay using it) is gone."""
    region = dissect(path)
    with ExitStack() as own:
        try:
            dev = devices.loop_device(path, region.offset, region.size, own)
        except OSError as e:
            raise die(f"cannot attach {path} to a loop device: {e.strerror}",
                      "load the loop module (modprobe loop) and run as root") from None
        try:
            fd = k.owned(own, k.fsopen(region.fstype))
        except OSError as e:
            raise die(f"the kernel cannot mount {region.fstype} ({path}): {e.strerror}",
                      f"modprobe {region.fstype}") from None
        try:
            k.fsconfig_string(fd, "source", dev)
            k.fsconfig_flag(fd, "ro")
            if region.fstype == "ext4":
                k.fsconfig_flag(fd, "noload")
            k.fsconfig_create(fd)
            mfd = k.fsmount(fd, k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOSUID)
        except OSError as e:
            raise die(f"{path}: the {region.fstype} {region.what} cannot be mounted: "
                      f"{e.strerror} (truncated or damaged?)", "rebuild the image") from None
    return k.owned(stack, mfd), region.usr_only
