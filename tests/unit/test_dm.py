"""dm.py on a host without device-mapper: the struct layouts and ioctl numbers against the
kernel's own header (compiled with the host's C compiler), the table packing, the probe, and
the keyring calls (which work without device-mapper). Activation itself runs in the QEMU
guests: vm-tests/verity_smoke.py."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from overlayctl import dm

HEADER = Path("/usr/include/linux/dm-ioctl.h")

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <linux/types.h>
#include <linux/dm-ioctl.h>
int main(void) {
    printf("sizeof_dm_ioctl %zu\n", sizeof(struct dm_ioctl));
    printf("sizeof_dm_target_spec %zu\n", sizeof(struct dm_target_spec));
    printf("off_data_size %zu\n", offsetof(struct dm_ioctl, data_size));
    printf("off_flags %zu\n", offsetof(struct dm_ioctl, flags));
    printf("off_dev %zu\n", offsetof(struct dm_ioctl, dev));
    printf("off_name %zu\n", offsetof(struct dm_ioctl, name));
    printf("off_uuid %zu\n", offsetof(struct dm_ioctl, uuid));
    printf("off_next %zu\n", offsetof(struct dm_target_spec, next));
    printf("off_target_type %zu\n", offsetof(struct dm_target_spec, target_type));
    printf("DM_VERSION %lu\n", (unsigned long) DM_VERSION);
    printf("DM_LIST_DEVICES %lu\n", (unsigned long) DM_LIST_DEVICES);
    printf("DM_DEV_CREATE %lu\n", (unsigned long) DM_DEV_CREATE);
    printf("DM_DEV_REMOVE %lu\n", (unsigned long) DM_DEV_REMOVE);
    printf("DM_DEV_SUSPEND %lu\n", (unsigned long) DM_DEV_SUSPEND);
    printf("DM_DEV_STATUS %lu\n", (unsigned long) DM_DEV_STATUS);
    printf("DM_TABLE_LOAD %lu\n", (unsigned long) DM_TABLE_LOAD);
    printf("DM_TABLE_STATUS %lu\n", (unsigned long) DM_TABLE_STATUS);
    printf("DM_LIST_VERSIONS %lu\n", (unsigned long) DM_LIST_VERSIONS);
    printf("DM_TARGET_MSG %lu\n", (unsigned long) DM_TARGET_MSG);
    printf("DM_READONLY_FLAG %lu\n", (unsigned long) DM_READONLY_FLAG);
    printf("DM_SUSPEND_FLAG %lu\n", (unsigned long) DM_SUSPEND_FLAG);
    printf("DM_STATUS_TABLE_FLAG %lu\n", (unsigned long) DM_STATUS_TABLE_FLAG);
    printf("DM_BUFFER_FULL_FLAG %lu\n", (unsigned long) DM_BUFFER_FULL_FLAG);
    printf("DM_UUID_FLAG %lu\n", (unsigned long) DM_UUID_FLAG);
    printf("DM_DEFERRED_REMOVE %lu\n", (unsigned long) DM_DEFERRED_REMOVE);
    printf("DM_NAME_LEN %d\n", DM_NAME_LEN);
    printf("DM_UUID_LEN %d\n", DM_UUID_LEN);
    printf("DM_VERSION_MAJOR %d\n", DM_VERSION_MAJOR);
    printf("NR_add_key %d\n", SYS_add_key);
    printf("NR_keyctl %d\n", SYS_keyctl);
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_header(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and the kernel's linux/dm-ioctl.h")
    d = tmp_path_factory.mktemp("dmh")
    (d / "p.c").write_text(C_PROGRAM)
    subprocess.run([cc, "-o", str(d / "p"), str(d / "p.c")], check=True)
    out = subprocess.run([str(d / "p")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_layout_matches_the_kernel_header(kernel_header: dict[str, int]) -> None:
    h = kernel_header
    assert dm._IOCTL.size == h["sizeof_dm_ioctl"]
    assert dm._SPEC.size == h["sizeof_dm_target_spec"]
    assert (h["off_data_size"], h["off_flags"], h["off_dev"], h["off_name"], h["off_uuid"]) == \
        (12, 28, 40, 48, 176)
    assert (h["off_next"], h["off_target_type"]) == (20, 24)
    for name in ("DM_VERSION", "DM_LIST_DEVICES", "DM_DEV_CREATE", "DM_DEV_REMOVE",
                 "DM_DEV_SUSPEND", "DM_DEV_STATUS", "DM_TABLE_LOAD", "DM_TABLE_STATUS",
                 "DM_LIST_VERSIONS", "DM_TARGET_MSG", "DM_READONLY_FLAG", "DM_SUSPEND_FLAG",
                 "DM_STATUS_TABLE_FLAG", "DM_BUFFER_FULL_FLAG", "DM_UUID_FLAG",
                 "DM_DEFERRED_REMOVE", "DM_NAME_LEN", "DM_UUID_LEN", "DM_VERSION_MAJOR"):
        assert getattr(dm, name) == h[name], name
    assert dm._KEY_SYSCALLS[os.uname().machine] == (h["NR_add_key"], h["NR_keyctl"])


def test_pack_ioctl_fields() -> None:
    buf = dm.pack_ioctl(name="abc-verity", uuid="CRYPT-VERITY-00-abc-verity",
                        flags=dm.DM_READONLY_FLAG, target_count=1, payload=b"xyz", size=1000)
    assert len(buf) == 1000
    info = dm.unpack_ioctl(buf)
    assert info.version == (4, 0, 0)
    assert info.data_size == 1000 and info.data_start == 312
    assert info.name == "abc-verity" and info.uuid == "CRYPT-VERITY-00-abc-verity"
    assert info.flags == dm.DM_READONLY_FLAG and info.target_count == 1
    assert bytes(buf[312:315]) == b"xyz"
    assert len(dm.pack_ioctl(payload=b"q" * 50)) == 362
    for bad in ({"name": "x" * 128}, {"name": "a/b"}, {"uuid": "u" * 129}, {"name": "a\0b"}):
        with pytest.raises(ValueError):
            dm.pack_ioctl(**bad)      # type: ignore[arg-type]
    dm.pack_ioctl(name="x" * 127, uuid="u" * 128)


def test_targets_round_trip() -> None:
    targets = [(0, 2048, "verity", "1 7:0 7:1 4096 4096 256 1 sha256 ab -"),
               (2048, 8, "zero", ""),
               (2056, 16, "linear", "7:2 0")]
    blob = dm.pack_targets(targets)
    # Every spec starts 8-aligned and "next" counts from that spec.
    off = 0
    for start, length, ttype, params in targets:
        s, ln, st, nxt, tt = dm._SPEC.unpack_from(blob, off)
        assert (s, ln, st, tt.rstrip(b"\0").decode()) == (start, length, 0, ttype)
        assert nxt % 8 == 0 and nxt >= dm._SPEC.size + len(params) + 1
        p = blob[off + 40:off + 40 + len(params) + 1]
        assert p == params.encode() + b"\0"
        off += nxt
    assert off == len(blob)
    # What DM_TABLE_STATUS returns: "next" counts from the start of the data area.
    status = bytearray()
    rel = 0
    for start, length, ttype, params in targets:
        p = params.encode() + b"\0"
        entry = 40 + len(p) + (-(40 + len(p)) % 8)
        rel += entry
        status += dm._SPEC.pack(start, length, 0, rel, ttype.encode()) + p + \
            bytes(entry - 40 - len(p))
    buf = dm.pack_ioctl(target_count=3, payload=bytes(status))
    assert dm.unpack_targets(buf, dm.unpack_ioctl(buf)) == targets
    with pytest.raises(ValueError):
        dm.pack_targets([(0, 1, "a-target-type-name", "")])


def test_no_device_mapper_here() -> None:
    """This kernel has a /dev/mapper/control node but no device-mapper: the probe says so."""
    misc = Path("/proc/misc").read_text()
    if "device-mapper" in misc:
        pytest.skip("this kernel has device-mapper")
    assert not dm.dm_available()
    with pytest.raises(OSError):
        dm.version()
    # And nothing is left when creating fails.
    with pytest.raises(OSError):
        with dm.device("overlayctl-test", [(0, 8, "zero", "")]):
            pass


def test_probe_reads_the_kernel_lists(tmp_path: Path) -> None:
    (tmp_path / "misc").write_text("237 loop-control\n229 fuse\n")
    (tmp_path / "devices").write_text("Character devices:\n  1 mem\n\nBlock devices:\n7 loop\n")
    assert not dm.dm_available(str(tmp_path)) or dm.dm_available()
    (tmp_path / "misc").write_text("237 loop-control\n236 device-mapper\n")
    assert dm.dm_available(str(tmp_path))
    (tmp_path / "misc").write_text("")
    (tmp_path / "devices").write_text("Block devices:\n  7 loop\n253 device-mapper\n")
    assert dm.dm_available(str(tmp_path))


def test_keyring_user_key() -> None:
    """The signature travels as a "user" key in the thread keyring, as libcryptsetup puts it."""
    payload = struct.pack("<Q", 12345) + os.urandom(200)
    try:
        key = dm.add_user_key("cryptsetup:overlayctl-test-key", payload)
    except OSError as e:
        pytest.skip(f"no kernel keyring here: {e}")
    try:
        assert dm.read_key(key) == payload
    finally:
        dm.unlink_key(key)
    with pytest.raises(OSError):
        dm.read_key(key)


def test_device_argument_checks() -> None:
    with pytest.raises(ValueError):
        with dm.device("x", [], signature=b"s"):
            pass
