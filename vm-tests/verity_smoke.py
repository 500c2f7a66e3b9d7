#!/usr/bin/env python3
"""Smoke test of verity activation through overlayctl.dm and overlayctl.verity, for a kernel
with device-mapper (the QEMU guests; the development host has none).

    vm-tests/verity_smoke.py build DIR    # on the host: images, keys, manifest (needs
                                          # mksquashfs, veritysetup, openssl, sfdisk)
    vm-tests/verity_smoke.py run DIR      # in the guest, as root, with the overlayctl
                                          # package importable (PYTHONPATH=...)

`run` needs dm-mod and dm-verity (modprobe'd if missing), loop devices, losetup and mount,
and for the userspace signature check python3-cryptography and python3-asn1crypto. It prints
one line per check and ends with "N passed, N failed"; the exit status is 0 only if nothing
failed. What it checks, per image (sidecar unsigned, sidecar signed, DDI signed, sidecar with
a flipped data byte):

* verity data found (sidecars or GPT partitions and signature JSON), the default sysext
  policy allows it, the root hash matches the hash tree's top block;
* signed images: the kernel refuses the signature (the throw-away certificate is in no
  kernel keyring: EKEYREJECTED or ENOKEY), userspace verification against verity.d accepts
  it, a signature by another key is refused;
* the device is created as <roothash>-verity with the libcryptsetup-style dm UUID, its table
  reads back as built, its status is "V"; a second activation under the same name fails
  with EBUSY while the first is in use (the shared device stays one);
* the file system mounts (detached, as overlayctl mounts raw images) from the dm device and
  its file reads back; for the flipped image
  the damaged file fails with EIO, another file still reads, and the status turns "C";
* after the mount's last fd is closed and the context manager's deferred removal, no dm
  device and no loop device is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The package next to this script (the guest's /payload) or in the checkout.
sys.path[:0] = [str(HERE), str(REPO)]
results: list[tuple[str, bool]] = []


def check(name: str, ok: object, detail: str = "") -> bool:
    results.append((name, bool(ok)))
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}",
          flush=True)
    return bool(ok)


# ---------------------------------------------------------------------------------------------
# build (host)

def build(out: Path) -> int:
    from tests import veritybuild as vb

    out.mkdir(parents=True, exist_ok=True)
    keys = out / "keys"
    a, b = vb.make_key(keys, "alpha"), vb.make_key(keys, "bravo")
    files = {"usr/share/verity-smoke/hello": "hello from verity\n",
             "usr/share/verity-smoke/other": "other block\n" * 2000}
    cases = []
    s = vb.sidecar_image(out / "plain", "plain", files=files)
    cases.append({"name": "plain", "kind": "sidecar", "image": "plain/plain.raw",
                  "root_hash": s.root_hash.hex(), "signed": False})
    s = vb.sidecar_image(out / "signed", "signed", a, files=files)
    vb.sign(s.root_hash, b, out / "signed" / "by-bravo.p7s")
    cases.append({"name": "signed", "kind": "sidecar", "image": "signed/signed.raw",
                  "root_hash": s.root_hash.hex(), "signed": True,
                  "other_signature": "signed/by-bravo.p7s"})
    d = vb.ddi(out / "ddi", "ddi", sign_with=a, files=files)
    cases.append({"name": "ddi", "kind": "ddi", "image": "ddi/ddi.raw",
                  "root_hash": d.root_hash.hex(), "signed": True})
    # A flipped byte in the data of one file, after the hash tree was made. Uncompressed
    # squashfs, so the byte is the file's own; each file is in blocks of its own.
    big = {"usr/share/verity-smoke/damaged": "D" * 65536,
           "usr/share/verity-smoke/intact": "I" * 65536}
    tree = out / "flip" / "flip.tree"
    (tree / "usr/lib/extension-release.d").mkdir(parents=True)
    (tree / "usr/lib/extension-release.d/extension-release.flip").write_text("ID=_any\n")
    for p, text in big.items():
        (tree / p).parent.mkdir(parents=True, exist_ok=True)
        (tree / p).write_text(text)
    img = out / "flip" / "flip.raw"
    vb.run("mksquashfs", tree, img, "-quiet", "-noappend", "-all-root", "-noI", "-noD",
           "-noF", "-noX")
    rh = vb.verity_format(img, out / "flip" / "flip.verity")
    (out / "flip" / "flip.roothash").write_text(rh.hex() + "\n")
    data = bytearray(img.read_bytes())
    at = data.index(b"D" * 8192) + 4096
    data[at] ^= 0x01
    img.write_bytes(bytes(data))
    cases.append({"name": "flip", "kind": "sidecar", "image": "flip/flip.raw",
                  "root_hash": rh.hex(), "signed": False,
                  "damaged": "usr/share/verity-smoke/damaged",
                  "intact": "usr/share/verity-smoke/intact"})
    (out / "manifest.json").write_text(json.dumps({
        "trusted_cert": "keys/alpha.crt", "cases": cases}, indent=1) + "\n")
    print(f"built {len(cases)} images in {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# run (guest)

def sh(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, check=False,
                              **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(list(cmd), 127, "", str(e))


@contextlib.contextmanager
def loop(path: str, offset: int = 0, size: int = 0):  # type: ignore[no-untyped-def]
    args = ["losetup", "--show", "-f", "-r", "-o", str(offset)]
    if size:
        args += ["--sizelimit", str(size)]
    p = sh(*args, path)
    if p.returncode != 0:
        raise OSError(errno.EIO, f"losetup {path}: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        sh("losetup", "-d", dev)


def gone(dmname: str) -> bool:
    """The device is removed (the deferred removal runs when its last user lets go)."""
    from overlayctl import dm

    for _ in range(100):
        if dmname not in dm.list_devices():
            return True
        time.sleep(0.01)
    return False


def devnum(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def prepare(base: Path, case: dict[str, object], trust_root: str) -> dict[str, object]:
    """Everything before activation (runs without device-mapper, too)."""
    from overlayctl import policy, verity

    name = str(case["name"])
    image = str(base / str(case["image"]))
    rh_expected = bytes.fromhex(str(case["root_hash"]))
    if case["kind"] == "sidecar":
        v = verity.load_sidecars(image, {})
        check(f"{name}: sidecars found", v.root_hash == rh_expected and v.data_path,
              repr(v))
        data_off, data_size = 0, 0
        hash_path, hash_off = str(v.data_path), 0
        prot = "signed" if v.root_hash_sig else "verity"
        try:
            policy.check_single_filesystem(policy.SYSEXT_POLICY, image, prot)
            check(f"{name}: default sysext policy allows {prot}", True)
        except policy.PolicyRefused as e:
            check(f"{name}: default sysext policy allows {prot}", False, str(e))
    else:
        parts = verity.read_gpt(image)
        assert parts is not None
        r = verity.ddi_verity(image, parts, verity.load_sidecars(image, {}), environ={})
        v = r.verity
        check(f"{name}: DDI verity found, UUID rule holds",
              v.root_hash == rh_expected and r.uuid_rule, repr(v))
        d = v.designator or "root"
        data_off, data_size = r.partitions[d].offset, r.partitions[d].size
        hp = r.partitions[f"{d}-verity"]
        hash_path, hash_off = image, hp.offset
        found = {k: policy.Partition(read_only=p.read_only, growfs=p.growfs)
                 for k, p in r.partitions.items()}
        policy.check_partitions(policy.SYSEXT_POLICY, image, found)
    assert v.root_hash is not None
    params = verity.read_superblock(hash_path, base=hash_off)
    verity.check_root_hash(params, v.root_hash, hash_path, image, hash_base=hash_off,
                           data_base=data_off)
    check(f"{name}: root hash matches the hash tree", True)
    if v.root_hash_sig is not None:
        try:
            res = verity.verify_signature(v.root_hash, v.root_hash_sig, root=trust_root,
                                          environ={})
            check(f"{name}: userspace accepts the signature", res.ok, res.reason)
            other = case.get("other_signature")
            if other:
                res = verity.verify_signature(v.root_hash, (base / str(other)).read_bytes(),
                                              root=trust_root, environ={})
                check(f"{name}: userspace refuses another key", not res.ok, res.reason)
        except ImportError as e:
            check(f"{name}: userspace signature check", False,
                  f"{e} (install python3-cryptography python3-asn1crypto)")
    return {"v": v, "params": params, "image": image, "data": (data_off, data_size),
            "hash": (hash_path, hash_off, 0 if case["kind"] == "sidecar" else hp.size)}


def activate(case: dict[str, object], prep: dict[str, object]) -> None:
    from overlayctl import dm, verity
    from overlayctl import kernel as k

    name = str(case["name"])
    v: verity.VeritySettings = prep["v"]  # type: ignore[assignment]
    params: verity.VerityParams = prep["params"]  # type: ignore[assignment]
    image = str(prep["image"])
    data_off, data_size = prep["data"]  # type: ignore[misc]
    hash_path, hash_off, hash_size = prep["hash"]  # type: ignore[misc]
    assert v.root_hash is not None
    dmname = verity.device_name(v.root_hash)
    uuid = verity.dm_uuid(params, dmname)
    with loop(image, data_off, data_size) as ddev, \
            loop(hash_path, hash_off, hash_size) as hdev:
        sig = v.root_hash_sig
        if sig is not None:
            desc = verity.key_description(params, dmname)
            table = [verity.verity_table(params, devnum(ddev), devnum(hdev), v.root_hash,
                                         sig_key_desc=desc)]
            try:
                with dm.device(dmname, table, uuid=uuid, signature=sig, key_desc=desc):
                    check(f"{name}: kernel refuses a throw-away key", False, "it accepted it")
            except OSError as e:
                check(f"{name}: kernel refuses a throw-away key ({errno.errorcode.get(e.errno)})",
                      e.errno in (errno.EKEYREJECTED, errno.ENOKEY, errno.EINVAL,
                                  errno.EOPNOTSUPP, errno.EPERM, errno.EBADMSG), str(e))
            check(f"{name}: no device left after the kernel's refusal",
                  dmname not in dm.list_devices())
        table = [verity.verity_table(params, devnum(ddev), devnum(hdev), v.root_hash)]
        with dm.device(dmname, table, uuid=uuid) as dev:
            st = dm.status(dmname)
            check(f"{name}: device {dmname[:16]}... created with its dm UUID",
                  st.uuid == uuid and st.dev == dev.dev, repr(st))
            loaded = dm.table_status(dmname, table=True)
            check(f"{name}: table reads back", loaded and loaded[0][3].split()[7:9] ==
                  [params.algorithm, v.root_hash.hex()], repr(loaded))
            check(f"{name}: status V", dm.table_status(dmname)[0][3].startswith("V"))
            try:
                with dm.device(dmname, table, uuid=uuid):
                    check(f"{name}: a second device under the same name fails", False)
            except OSError as e:
                check(f"{name}: a second device under the same name fails (EBUSY)",
                      e.errno == errno.EBUSY, str(e))
            # Mounted as overlayctl mounts raw images: a detached mount, never attached.
            fd = dev.open()
            mfd = -1
            try:
                sfd = k.fsopen("squashfs")
                try:
                    k.fsconfig_string(sfd, "source", f"/proc/self/fd/{fd}")
                    k.fsconfig_flag(sfd, "ro")
                    k.fsconfig_create(sfd)
                    mfd = k.fsmount(sfd, k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NODEV)
                finally:
                    os.close(sfd)
                check(f"{name}: mounts", True)
            except OSError as e:
                check(f"{name}: mounts", False, str(e))
            finally:
                os.close(fd)
            if mfd >= 0:
                mnt = f"/proc/self/fd/{mfd}"
                try:
                    if "damaged" in case:
                        try:
                            Path(mnt, str(case["damaged"])).read_bytes()
                            check(f"{name}: the damaged file fails with EIO", False, "it read")
                        except OSError as e:
                            check(f"{name}: the damaged file fails with EIO",
                                  e.errno == errno.EIO, str(e))
                        ok = Path(mnt, str(case["intact"])).read_text() == "I" * 65536
                        check(f"{name}: the intact file still reads", ok)
                        check(f"{name}: status C",
                              dm.table_status(dmname)[0][3].startswith("C"))
                    else:
                        # A DDI's usr partition holds what is below usr/.
                        rel = "share" if case["kind"] == "ddi" else "usr/share"
                        text = Path(mnt, rel, "verity-smoke/hello").read_text()
                        check(f"{name}: the file reads back", text == "hello from verity\n")
                finally:
                    os.close(mfd)      # the detached mount goes with its last fd
        check(f"{name}: no dm device left after unmount", gone(dmname),
              repr(dm.list_devices()))


def run(base: Path) -> int:
    from overlayctl import dm

    manifest = json.loads((base / "manifest.json").read_text())
    trust_root = tempfile.mkdtemp(prefix="verity-trust-")
    os.makedirs(f"{trust_root}/etc/verity.d")
    Path(trust_root, "etc/verity.d/alpha.crt").write_bytes(
        (base / manifest["trusted_cert"]).read_bytes())
    prepared = []
    for case in manifest["cases"]:
        try:
            prepared.append((case, prepare(base, case, trust_root)))
        except Exception as e:
            check(f"{case['name']}: prepared", False, f"{type(e).__name__}: {e}")
    for mod in ("dm_mod", "dm_verity"):
        sh("modprobe", mod)
    if not check("device-mapper available", dm.dm_available()):
        return summary()
    check("dm interface version 4", dm.version()[0] == 4)
    loops_before = sh("losetup", "-a").stdout
    for case, prep in prepared:
        try:
            activate(case, prep)
        except Exception as e:
            check(f"{case['name']}: ran through", False, f"{type(e).__name__}: {e}")
    check("no loop device left", sh("losetup", "-a").stdout == loops_before)
    check("no dm device left", not [n for n in dm.list_devices() if n.endswith("-verity")],
          repr(dm.list_devices()))
    return summary()


def summary() -> int:
    passed = sum(ok for _, ok in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return build(Path(sys.argv[2])) if sys.argv[1] == "build" else run(Path(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
