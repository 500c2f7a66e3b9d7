"""verity.py: sidecars, DDIs, the superblock and table line, userspace signature checks, on
real images (mksquashfs, veritysetup format, sfdisk) and real signatures (openssl, with
throw-away keys made here). Nothing is mounted and no device is created."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from overlayctl import policy, verity
from overlayctl.errors import OverlayctlError
from tests import veritybuild as vb
from tests.data import policy_oracle as oracle

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("veritysetup", "mksquashfs", "openssl", "sfdisk")),
    reason="needs veritysetup, mksquashfs, openssl and sfdisk (tools/setup.sh installs them)")

NOENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, vb.Key]:
    d = tmp_path_factory.mktemp("keys")
    return {"a": vb.make_key(d, "alpha"), "b": vb.make_key(d, "bravo"),
            "ec": vb.make_key(d, "charlie", "ec")}


def trust(root: Path, *certs: Path, where: str = "etc/verity.d") -> None:
    d = root / where
    d.mkdir(parents=True, exist_ok=True)
    for c in certs:
        shutil.copy(c, d / c.name)


# ---------------------------------------------------------------------------------------------
# (a) sidecars

def test_sidecar_files(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    s = vb.sidecar_image(tmp_path, "foo", keys["a"])
    v = verity.load_sidecars(str(s.image), NOENV)
    assert v.designator == "root" and v.root_hash == s.root_hash
    assert v.data_path == str(tmp_path / "foo.verity")
    assert v.root_hash_sig == (tmp_path / "foo.roothash.p7s").read_bytes()
    assert v.root_hash_source == str(tmp_path / "foo.roothash")
    assert v.covers("root") and not v.covers("usr")
    # Switched off: nothing.
    assert verity.load_sidecars(str(s.image), {"SYSTEMD_DISSECT_VERITY_SIDECAR": "0"}) == \
        verity.VeritySettings()
    assert verity.load_sidecars(str(s.image), {"SYSTEMD_DISSECT_VERITY_SIDECAR": "maybe"}) == v
    assert verity.load_sidecars("/dev/loop0", NOENV) == verity.VeritySettings()


def test_usrhash_and_its_signature(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    s = vb.sidecar_image(tmp_path, "u", keys["a"], designator="usr")
    # A stray .roothash.p7s is not for /usr.
    (tmp_path / "u.roothash.p7s").write_bytes(b"junk")
    v = verity.load_sidecars(str(s.image), NOENV)
    assert v.designator == "usr" and v.root_hash == s.root_hash
    assert v.root_hash_sig == (tmp_path / "u.usrhash.p7s").read_bytes()
    assert v.covers("usr") and not v.covers("root")


def test_roothash_wins_over_usrhash_and_xattr_over_file(tmp_path: Path) -> None:
    s = vb.sidecar_image(tmp_path, "x")
    (tmp_path / "x.usrhash").write_text("00" * 32)
    assert verity.load_sidecars(str(s.image), NOENV).designator == "root"
    other = "ab" * 32
    try:
        os.setxattr(s.image, "user.verity.roothash", other.encode())
    except OSError:
        pytest.skip("no user xattrs on this file system")
    v = verity.load_sidecars(str(s.image), NOENV)
    assert v.root_hash == bytes.fromhex(other)
    assert v.root_hash_source == f"xattr user.verity.roothash of {s.image}"


def test_hex_as_systemd_reads_it(tmp_path: Path) -> None:
    """Observed with systemd-sysext 262: case and whitespace do not matter, only the first
    line counts, an odd digit count or a hash under 16 bytes is an error."""
    img = vb.squashfs(tmp_path / "t", tmp_path / "h.raw", "h")
    h = "f4ee9e76446d05b24d1b3e853001d465f4e2215f12dbefb8ccbe33ed2e7f729e"
    for text in (h, h.upper(), h[:10] + " " + h[10:], h + "   ", "  " + h, h + "\ngarbage"):
        (tmp_path / "h.roothash").write_text(text)
        assert verity.load_sidecars(str(img), NOENV).root_hash == bytes.fromhex(h)
    for text in (h[:63], h[:30], h[:62] + "zz"):
        (tmp_path / "h.roothash").write_text(text)
        with pytest.raises(OverlayctlError, match=r"h\.roothash"):
            verity.load_sidecars(str(img), NOENV)
    (tmp_path / "h.roothash").write_text(h)
    (tmp_path / "h.roothash.p7s").write_bytes(b"")
    with pytest.raises(OverlayctlError, match="empty"):
        verity.load_sidecars(str(img), NOENV)


def test_sidecar_names_for_non_raw_names(tmp_path: Path) -> None:
    img = vb.squashfs(tmp_path / "t", tmp_path / "img.sqfs", "img")
    (tmp_path / "img.sqfs.roothash").write_text("11" * 32)
    assert verity.load_sidecars(str(img), NOENV).root_hash == bytes(b"\x11" * 32)


# ---------------------------------------------------------------------------------------------
# (c) superblock, root hash check, table line

def test_superblock_and_table(tmp_path: Path) -> None:
    s = vb.sidecar_image(tmp_path, "t")
    out = vb.run("veritysetup", "dump", s.verity)
    facts = {k.strip(): v.strip() for k, _, v in
             (line.partition(":") for line in out.splitlines() if ":" in line)}
    p = verity.read_superblock(str(s.verity))
    assert p.uuid == facts["UUID"]
    assert p.hash_type == int(facts["Hash type"])
    assert p.data_blocks == int(facts["Data blocks"])
    assert p.data_block_size == int(facts["Data block size"].split()[0])
    assert p.hash_block_size == int(facts["Hash block size"].split()[0])
    assert p.algorithm == facts["Hash algorithm"]
    assert p.salt.hex() == facts["Salt"]
    assert verity.hash_device_size(p) == int(facts["Hash device size"].split()[0])
    verity.check_root_hash(p, s.root_hash, str(s.verity), str(s.image))
    line = verity.verity_table_line(p, "7:0", "7:1", s.root_hash)
    assert line == (f"0 {p.data_blocks * 8} verity 1 7:0 7:1 4096 4096 {p.data_blocks} 1 "
                    f"sha256 {s.root_hash.hex()} {p.salt.hex()}")
    line = verity.verity_table_line(p, "7:0", "7:1", s.root_hash,
                                    sig_key_desc="cryptsetup:x-y",
                                    options=["panic_on_corruption"])
    assert line.endswith(" 3 panic_on_corruption root_hash_sig_key_desc cryptsetup:x-y")
    assert verity.key_description(p, "n") == f"cryptsetup:{p.uuid}-n"
    assert verity.dm_uuid(p, "n") == f"CRYPT-VERITY-{p.uuid.replace('-', '')}-n"
    assert verity.device_name(s.root_hash) == s.root_hash.hex() + "-verity"
    with pytest.raises(OverlayctlError, match="bytes"):
        verity.verity_table_line(p, "7:0", "7:1", s.root_hash[:16])


@pytest.mark.parametrize("args", [
    ("--data-block-size=1024", "--hash-block-size=1024"),
    ("--hash=sha512", "--salt=-"),
    ("--format=0",),
    ("--hash-offset=8192",),
])
def test_superblock_variants_multi_level(tmp_path: Path, args: tuple[str, ...]) -> None:
    files = {f"usr/share/blob{i}": os.urandom(600_000).hex() for i in range(6)}
    img = vb.squashfs(tmp_path / "t", tmp_path / "big.raw", "big", files)
    hashf = tmp_path / "big.verity"
    rh = vb.verity_format(img, hashf, *args)
    off = 8192 if "--hash-offset=8192" in args else 0
    p = verity.read_superblock(str(hashf), off)
    assert p.hash_offset == off
    verity.check_root_hash(p, rh, str(hashf), str(img))
    words = verity.verity_table_line(p, "a", "b", rh).split()
    assert words[3:6] == [str(p.hash_type), "a", "b"]
    assert int(words[9]) == p.hash_start_block == (off + 512 + p.hash_block_size - 1) // \
        p.hash_block_size
    assert words[-1] == (p.salt.hex() or "-")


def test_root_hash_mismatch(tmp_path: Path) -> None:
    s = vb.sidecar_image(tmp_path, "m", files={f"usr/share/f{i}": os.urandom(9000).hex()
                                               for i in range(40)})
    p = verity.read_superblock(str(s.verity))
    wrong = bytes([s.root_hash[0] ^ 1]) + s.root_hash[1:]
    with pytest.raises(OverlayctlError, match="does not match the hash tree"):
        verity.check_root_hash(p, wrong, str(s.verity), str(s.image))
    # A tampered hash tree (its top block).
    data = bytearray(s.verity.read_bytes())
    data[p.hash_start_block * p.hash_block_size + 5] ^= 0xFF
    s.verity.write_bytes(bytes(data))
    with pytest.raises(OverlayctlError, match="does not match"):
        verity.check_root_hash(p, s.root_hash, str(s.verity), str(s.image))


def test_bad_superblocks(tmp_path: Path) -> None:
    s = vb.sidecar_image(tmp_path, "b")
    good = s.verity.read_bytes()[:512]
    verity.parse_superblock(good, "x")
    cases = {
        "no verity superblock": b"VERITY\0\0" + good[8:],
        "version 2": good[:8] + (2).to_bytes(4, "little") + good[12:],
        "hash type 7": good[:12] + (7).to_bytes(4, "little") + good[16:],
        "block sizes": good[:64] + (1000).to_bytes(4, "little") + good[68:],
        "salt size": good[:80] + (300).to_bytes(2, "little") + good[82:],
        "not supported": good[:32] + b"md9".ljust(32, b"\0") + good[64:],
        "too short": good[:100],
    }
    for what, data in cases.items():
        with pytest.raises(OverlayctlError, match=what):
            verity.parse_superblock(data, "x")


# ---------------------------------------------------------------------------------------------
# (d) signatures

@pytest.mark.parametrize("variant", ["plain", "attrs", "keyid", "ec", "ec-attrs"])
def test_signature_variants_verify_like_openssl(tmp_path: Path, keys: dict[str, vb.Key],
                                                variant: str) -> None:
    k = keys["ec"] if variant.startswith("ec") else keys["a"]
    rh = os.urandom(32)
    sig = tmp_path / "s.p7s"
    vb.sign(rh, k, sig, attrs=variant.endswith("attrs"), keyid=variant == "keyid")
    root = tmp_path / "root"
    trust(root, keys["b"].cert, k.cert)
    r = verity.verify_signature(rh, sig.read_bytes(), root=str(root), environ=NOENV,
                                cmdline="")
    assert r.ok, r.reason
    assert r.cert == str(root / "etc/verity.d" / k.cert.name)
    assert r.subject is not None and k.cert.stem in r.subject
    if variant != "keyid":      # openssl smime cannot find a signer by key id
        assert vb.openssl_verifies(rh, sig, [keys["b"].cert, k.cert], tmp_path)


def test_rsa_pss_is_refused_as_openssl_pkcs7_verify_does(tmp_path: Path,
                                                          keys: dict[str, vb.Key]) -> None:
    rh = os.urandom(32)
    sig = tmp_path / "s.p7s"
    vb.sign(rh, keys["a"], sig, pss=True)
    trust(tmp_path, keys["a"].cert)
    r = verity.verify_signature(rh, sig.read_bytes(), root=str(tmp_path), environ=NOENV,
                                cmdline="")
    assert not r.ok and "RSA-PSS" in r.reason
    assert not vb.openssl_verifies(rh, sig, [keys["a"].cert], tmp_path)


def test_signature_failures(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    rh = os.urandom(32)
    root = tmp_path / "root"
    trust(root, keys["a"].cert)
    good = vb.sign(rh, keys["a"], tmp_path / "good.p7s")
    attrs = vb.sign(rh, keys["a"], tmp_path / "attrs.p7s", attrs=True)

    def check(sig: bytes, content: bytes = rh) -> verity.SignatureCheck:
        (tmp_path / "t.p7s").write_bytes(sig)
        r = verity.verify_signature(content, sig, root=str(root), environ=NOENV, cmdline="")
        # openssl's PKCS7_verify(NOINTERN|NOVERIFY) agrees.
        assert vb.openssl_verifies(content, tmp_path / "t.p7s", [keys["a"].cert],
                                   tmp_path) == r.ok
        return r

    assert check(good).ok
    # Forged: a flipped byte in the signature value (its last bytes).
    forged = bytearray(good)
    forged[-3] ^= 0x40
    r = check(bytes(forged))
    assert not r.ok and "does not verify" in r.reason
    # Another root hash.
    r = check(good, os.urandom(32))
    assert not r.ok and "does not verify" in r.reason
    r = check(attrs, os.urandom(32))
    assert not r.ok and "message digest mismatch" in r.reason
    # A key whose certificate is not in verity.d.
    r = check(vb.sign(rh, keys["b"], tmp_path / "b.p7s"))
    assert not r.ok and "not in verity.d" in r.reason and "bravo" in r.reason
    # Content embedded instead of detached.
    r = verity.verify_signature(
        rh, vb.sign(rh, keys["a"], tmp_path / "n.p7s", detached=False), root=str(root),
        environ=NOENV, cmdline="")
    assert not r.ok and "detached" in r.reason
    # Garbage.
    r = verity.verify_signature(rh, b"\x30\x03\x02\x01\x01", root=str(root), environ=NOENV,
                                cmdline="")
    assert not r.ok and "PKCS#7" in r.reason


def test_trusted_certificate_lookup(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    rh = os.urandom(32)
    sig = vb.sign(rh, keys["a"], tmp_path / "s.p7s")
    root = tmp_path / "root"
    for where in ("run/verity.d", "usr/local/lib/verity.d", "usr/lib/verity.d"):
        shutil.rmtree(root, ignore_errors=True)
        trust(root, keys["a"].cert, where=where)
        assert verity.verify_signature(rh, sig, root=str(root), environ=NOENV,
                                       cmdline="").ok, where
    # Not *.crt, or in a directory systemd does not read: not trusted.
    shutil.rmtree(root)
    (root / "etc/verity.d").mkdir(parents=True)
    shutil.copy(keys["a"].cert, root / "etc/verity.d/alpha.pem")
    trust(root, keys["a"].cert, where="run/host/verity.d")
    r = verity.verify_signature(rh, sig, root=str(root), environ=NOENV, cmdline="")
    assert not r.ok and "no *.crt" in r.reason
    # /etc masks /usr/lib by name: an empty file, or a link to /dev/null.
    shutil.rmtree(root)
    trust(root, keys["a"].cert, where="usr/lib/verity.d")
    (root / "etc/verity.d").mkdir(parents=True)
    (root / "etc/verity.d/alpha.crt").symlink_to("/dev/null")
    assert verity.certificate_files(str(root)) == []
    (root / "etc/verity.d/alpha.crt").unlink()
    (root / "etc/verity.d/alpha.crt").write_bytes(b"")
    assert not verity.verify_signature(rh, sig, root=str(root), environ=NOENV, cmdline="").ok
    # ... and a real certificate in /etc of the same name replaces the one in /usr/lib.
    shutil.copy(keys["b"].cert, root / "etc/verity.d/alpha.crt")
    assert verity.certificate_files(str(root)) == [str(root / "etc/verity.d/alpha.crt")]
    assert not verity.verify_signature(rh, sig, root=str(root), environ=NOENV, cmdline="").ok


@pytest.mark.parametrize(("env", "cmdline", "ok"), [
    ({}, "", True),
    ({"SYSTEMD_ALLOW_USERSPACE_VERITY": "0"}, "", False),
    ({"SYSTEMD_ALLOW_USERSPACE_VERITY": "no"}, "", False),
    ({"SYSTEMD_ALLOW_USERSPACE_VERITY": "bogus"}, "", False),   # not a boolean: refused
    ({"SYSTEMD_ALLOW_USERSPACE_VERITY": "yes"}, "", True),
    ({}, "quiet systemd.allow_userspace_verity=0", False),
    ({}, "systemd.allow-userspace-verity=off", False),
    ({}, "systemd.allow_userspace_verity=0 systemd.allow_userspace_verity", True),
    ({}, "systemd.allow_userspace_verity=maybe", False),
    ({"SYSTEMD_PROC_CMDLINE": "systemd.allow_userspace_verity=no"}, None, False),
])
def test_userspace_switches(tmp_path: Path, keys: dict[str, vb.Key], env: dict[str, str],
                            cmdline: str | None, ok: bool) -> None:
    rh = os.urandom(32)
    sig = vb.sign(rh, keys["a"], tmp_path / "s.p7s")
    trust(tmp_path, keys["a"].cert)
    r = verity.verify_signature(rh, sig, root=str(tmp_path), environ=env, cmdline=cmdline)
    assert r.ok is ok, r.reason
    if not ok:
        assert "userspace" in r.reason


def test_other_switches() -> None:
    assert verity.signature_checks_enabled({})
    assert not verity.signature_checks_enabled({"SYSTEMD_DISSECT_VERITY_SIGNATURE": "false"})
    assert verity.signature_checks_enabled({"SYSTEMD_DISSECT_VERITY_SIGNATURE": "x"})
    assert not verity.embedded_enabled({"SYSTEMD_DISSECT_VERITY_EMBEDDED": "0"})
    assert not verity.guess_enabled({"SYSTEMD_DISSECT_VERITY_GUESS": "off"})


def test_crypto_is_imported_only_to_check(tmp_path: Path) -> None:
    """Discovering verity data and building table lines does not load asn1crypto or
    cryptography: the boot path of an unsigned merge must not pay for them."""
    s = vb.sidecar_image(tmp_path, "i")
    code = ("import sys\nfrom overlayctl import verity, policy, dm\n"
            f"v = verity.load_sidecars({str(s.image)!r}, {{}})\n"
            f"p = verity.read_superblock({str(s.verity)!r})\n"
            "verity.verity_table_line(p, '7:0', '7:1', v.root_hash)\n"
            "policy.check_single_filesystem(policy.SYSEXT_POLICY, 'x', 'verity')\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('asn1crypto', 'cryptography')]\n"
            "print(bad)\n")
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# (b) DDIs

def test_ddi_signed(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    img = vb.ddi(tmp_path, "sig", sign_with=keys["a"])
    parts = verity.read_gpt(str(img.image))
    assert parts is not None
    assert [p.designator for p in parts] == ["usr", "usr-verity", "usr-verity-sig"]
    assert parts[0].uuid == img.data_uuid and parts[0].arch == "x86-64"
    r = verity.ddi_verity(str(img.image), parts, verity.VeritySettings(), environ=NOENV,
                          native_arch="x86-64")
    v = r.verity
    assert v.designator == "usr" and v.root_hash == img.root_hash and r.uuid_rule
    assert v.root_hash_sig is not None and v.data_path is None
    assert set(r.partitions) == {"usr", "usr-verity", "usr-verity-sig"}
    root = tmp_path / "root"
    trust(root, keys["a"].cert)
    assert verity.verify_signature(v.root_hash, v.root_hash_sig, root=str(root),
                                   environ=NOENV, cmdline="").ok
    hp = r.partitions["usr-verity"]
    p = verity.read_superblock(str(img.image), base=hp.offset)
    verity.check_root_hash(p, v.root_hash, str(img.image), str(img.image),
                           hash_base=hp.offset, data_base=r.partitions["usr"].offset)
    # The policy sees a signed usr partition.
    found = {d: policy.Partition(read_only=q.read_only, growfs=q.growfs)
             for d, q in r.partitions.items()}
    assert policy.check_partitions(policy.parse_policy("usr=signed"), "x", found)
    # Embedded signature ignored: the root hash is guessed from the UUIDs, no signature.
    r = verity.ddi_verity(str(img.image), parts, verity.VeritySettings(),
                          environ={"SYSTEMD_DISSECT_VERITY_EMBEDDED": "0"},
                          native_arch="x86-64")
    assert r.verity.root_hash == img.root_hash and r.verity.root_hash_sig is None
    r = verity.ddi_verity(str(img.image), parts, verity.VeritySettings(),
                          environ={"SYSTEMD_DISSECT_VERITY_EMBEDDED": "0",
                                   "SYSTEMD_DISSECT_VERITY_GUESS": "0"}, native_arch="x86-64")
    assert r.verity.root_hash is None


def test_ddi_unsigned_guess_and_uuid_rule(tmp_path: Path) -> None:
    img = vb.ddi(tmp_path, "plain")
    parts = verity.read_gpt(str(img.image))
    assert parts is not None
    r = verity.ddi_verity(str(img.image), parts, verity.VeritySettings(), environ=NOENV,
                          native_arch="x86-64")
    assert r.verity.root_hash == img.root_hash and r.uuid_rule
    assert r.verity.root_hash_source is not None and "UUID" in r.verity.root_hash_source
    # UUIDs that are not the root hash halves: the guess is wrong, and the hash check says so.
    bad = vb.ddi(tmp_path / "b", "bad", uuids=(str(uuid.uuid4()), str(uuid.uuid4())))
    parts = verity.read_gpt(str(bad.image))
    assert parts is not None
    r = verity.ddi_verity(str(bad.image), parts, verity.VeritySettings(), environ=NOENV,
                          native_arch="x86-64")
    assert r.verity.root_hash != bad.root_hash
    hp = r.partitions["usr-verity"]
    p = verity.read_superblock(str(bad.image), base=hp.offset)
    with pytest.raises(OverlayctlError, match="does not match"):
        verity.check_root_hash(p, r.verity.root_hash or b"", str(bad.image), str(bad.image),
                               hash_base=hp.offset)
    # A sidecar root hash picks partitions by UUID, and there is none.
    side = verity.VeritySettings("usr", bad.root_hash, None, None, "x.usrhash", None)
    with pytest.raises(OverlayctlError, match="no usr partition"):
        verity.ddi_verity(str(bad.image), parts, side, environ=NOENV, native_arch="x86-64")
    # ... and a .verity file next to a DDI is refused.
    with pytest.raises(OverlayctlError, match="SYSTEMD_DISSECT_VERITY_SIDECAR=0"):
        verity.ddi_verity(str(bad.image), parts,
                          verity.VeritySettings(data_path="x.verity"), environ=NOENV)


def test_sig_partition_json(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    rh = os.urandom(32)
    sig = vb.sign(rh, keys["a"], tmp_path / "s.p7s")
    blob = vb.sig_json(rh, sig, keys["a"].cert)
    sp = verity.parse_sig_json(blob, "p")
    assert sp.root_hash == rh and sp.signature == sig
    assert sp.certificate_fingerprint is not None and len(sp.certificate_fingerprint) == 64
    assert len(blob) % 4096 == 0
    body = json.dumps({"rootHash": rh.hex(), "signature": base64.b64encode(sig).decode()})
    assert verity.parse_sig_json(body.encode(), "p").certificate_fingerprint is None
    bad = {
        "embedded NUL": body.encode() + b"\0x\0",
        "not JSON": b"{nope" + b"\0" * 10,
        "JSON is not an object": b"[]",
        "'rootHash'": json.dumps({"signature": "AA=="}).encode(),
        "'signature'": json.dumps({"rootHash": rh.hex(), "signature": 5}).encode(),
        "not base64": json.dumps({"rootHash": rh.hex(), "signature": "!!"}).encode(),
        "rootHash": json.dumps({"rootHash": "xyz", "signature": "AA=="}).encode(),
        "larger than 4 MiB": b"{}" + b"\0" * (4 * 1024 * 1024),
    }
    for what, data in bad.items():
        with pytest.raises(OverlayctlError, match=what):
            verity.parse_sig_json(data, "p")
    # A signature partition whose root hash is not the one of the data: the DDI is refused
    # only when a sidecar says otherwise; the signature check fails for the real root hash.
    img = vb.ddi(tmp_path / "m", "mismatch", sig_blob=vb.sig_json(rh, sig))
    parts = verity.read_gpt(str(img.image))
    assert parts is not None
    side = verity.VeritySettings("usr", img.root_hash, None, None, "m.usrhash", None)
    with pytest.raises(OverlayctlError, match="is not the one of"):
        verity.ddi_verity(str(img.image), parts, side, environ=NOENV, native_arch="x86-64")


def test_gpt_types_are_systemds(tmp_path: Path) -> None:
    """Every root/usr type systemd 262 lists (systemd-id128 show), for every architecture."""
    if not oracle.available():
        pytest.skip("needs the systemd 262 tree under /work/peer")
    p = subprocess.run([str(oracle.LOADER), "--library-path", oracle.LIBS,
                        str(oracle.SID / "usr/bin/systemd-id128"), "show", "--no-pager",
                        "--no-legend"], capture_output=True, text=True, check=True)
    by_name = dict(line.split() for line in p.stdout.splitlines())
    upstream = {str(uuid.UUID(u)) for n, u in by_name.items()
                if n.startswith(("root-", "usr-")) and "secondary" not in n}
    ours = {u for u, (d, _) in verity.GPT_TYPES.items() if d.startswith(("root", "usr"))}
    assert ours == upstream
    for u, (d, arch) in verity.GPT_TYPES.items():
        base, _, suffix = d.partition("-")
        name = f"{base}-{arch}" + (f"-{suffix}" if suffix else "") if arch else d
        assert str(uuid.UUID(by_name[name])) == u, name


def test_partition_choice(tmp_path: Path) -> None:
    def part(n: int, d: str, arch: str, label: str = "", flags: int = 0,
             u: str | None = None) -> verity.GptPartition:
        t = next(k for k, v in verity.GPT_TYPES.items() if v == (d, arch))
        return verity.GptPartition(n, t, u or str(uuid.uuid4()), label, flags, n * 1024,
                                   1024, d, arch)
    a = part(1, "usr", "arm64", "usr_2")
    b = part(2, "usr", "x86-64", "usr_1")
    c = part(3, "usr", "x86-64", "usr_3")
    e = part(4, "usr", "x86-64", "usr_9", flags=verity.GPT_FLAG_NO_AUTO)
    assert verity.select_partitions([a, b, c, e], native_arch="x86-64")["usr"] is c
    assert verity.select_partitions([a, b], native_arch="arm64")["usr"] is a
    assert verity.select_partitions([a], native_arch="x86-64")["usr"] is a
    assert verity.select_partitions([a, b, c], native_arch="x86-64",
                                    uuid_filter={"usr": b.uuid})["usr"] is b
    x86 = part(5, "usr", "x86")
    assert verity.select_partitions([x86, a], native_arch="x86-64")["usr"] is x86


# ---------------------------------------------------------------------------------------------
# Upstream, live: how systemd-sysext 262 treats sidecar images under policies (dissection
# refuses, or it goes on to activate verity, which fails on a kernel without device-mapper).

@pytest.mark.root
@pytest.mark.skipif(not oracle.SYSEXT.exists(), reason="needs the systemd 262 peer")
def test_live_sidecar_policy(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text("ID=oracle\n")
    ext = root / "var/lib/extensions"
    ext.mkdir(parents=True)
    for kind, k in (("unprotected", None), ("verity", None), ("signed", keys["a"])):
        s = vb.sidecar_image(tmp_path / kind, "e", k)
        if kind == "unprotected":
            (tmp_path / kind / "e.roothash").unlink()
            s.verity.unlink()
    for kind in ("unprotected", "verity", "signed"):
        for pol in ("root=verity", "root=signed", "root=unprotected", "root=verity+unprotected",
                    "root=signed+read-only-on", "root=absent", "usr=verity", "*", "-",
                    "root=encrypted+signed"):
            for f in ext.iterdir():
                f.unlink()
            for f in (tmp_path / kind).iterdir():
                if f.is_file():
                    shutil.copy(f, ext / f.name)
            p = subprocess.run([str(oracle.PEER / "bin/peer-ns"), str(root), str(oracle.SYSEXT),
                                f"--root={root}", f"--image-policy={pol}", "merge"],
                               capture_output=True, text=True, check=False)
            refused = "does not match image policy" in p.stderr or \
                "Couldn't identify a suitable" in p.stderr
            try:
                policy.check_single_filesystem(policy.parse_policy(pol), "e.raw", kind)
                mine = False
            except policy.PolicyRefused:
                mine = True
            assert mine == refused, (kind, pol, p.stderr)


def test_protection_offered_to_the_policy(tmp_path: Path, keys: dict[str, vb.Key]) -> None:
    s = vb.sidecar_image(tmp_path / "s", "s", keys["a"])
    assert verity.load_sidecars(str(s.image), NOENV).protection() == "signed"
    (tmp_path / "s/s.roothash.p7s").unlink()
    assert verity.load_sidecars(str(s.image), NOENV).protection() == "verity"
    s.verity.unlink()        # a root hash without a hash tree: no verity (as upstream)
    assert verity.load_sidecars(str(s.image), NOENV).protection() == "unprotected"
    u = vb.sidecar_image(tmp_path / "u", "u", designator="usr")
    assert verity.load_sidecars(str(u.image), NOENV).protection() == "unprotected"


def test_reusable_table() -> None:
    rh = bytes(range(32))
    base = f"1 7:0 7:1 4096 4096 10 1 sha256 {rh.hex()} ab"
    assert verity.reusable(base, rh, signed=False)
    assert not verity.reusable(base, rh, signed=True)
    signed = base + " 2 root_hash_sig_key_desc cryptsetup:u-n"
    assert verity.reusable(signed, rh, signed=True)
    assert not verity.reusable(signed, rh, signed=False)
    assert not verity.reusable(base.replace(rh.hex(), "00" * 32), rh, signed=False)
    assert not verity.reusable("1 7:0", rh, signed=False)
    # What verity_table_line() builds is reusable by itself.
    p = verity.VerityParams(1, 1, "00000000-0000-0000-0000-000000000001", "sha256", 4096,
                            4096, 10, b"\xab")
    params = verity.verity_table(p, "7:0", "7:1", rh, sig_key_desc="k")[3]
    assert verity.reusable(params, rh, signed=True)
