"""Builders of verity test images with the real tools: mksquashfs, veritysetup format (from
Debian's cryptsetup-bin), openssl for throw-away keys and PKCS#7 signatures, sfdisk for GPT
disk images (DDIs) laid out as systemd-repart lays them out (data partition UUID = first half
of the root hash, verity partition UUID = second half, a signature partition holding JSON
padded with NUL bytes to a multiple of 4096).

Used by tests/unit/test_verity.py, tests/integration/test_repart_ddi.py (repart_ddi: the
same kinds of DDI made by upstream's systemd-repart) and, on the host, by
vm-tests/verity_smoke.py and verity_guest.py build.
Everything is written below the directory it is given; nothing is mounted."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

X86_64 = {
    "root": "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
    "root-verity": "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5",
    "root-verity-sig": "41092b05-9fc8-4523-994f-2def0408b176",
    "usr": "8484680c-9521-48c6-9c11-b0720656f69e",
    "usr-verity": "77ff5f63-e7b6-4633-acf4-1565b864c0e6",
    "usr-verity-sig": "e7bb33fb-06cf-4e81-8273-e543b413e2e2",
}
MiB = 1024 * 1024


def run(*cmd: str | os.PathLike[str], stdin: bytes | None = None) -> str:
    p = subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {p.stderr.decode(errors='replace').strip()}")
    return p.stdout.decode(errors="replace")


def squashfs(tree: Path, out: Path, name: str, files: dict[str, str] | None = None,
             ext_id: str = "_any") -> Path:
    """A squashfs sysext NAME: usr/lib/extension-release.d/extension-release.NAME plus
    FILES (relative path -> text)."""
    rel = tree / "usr/lib/extension-release.d"
    rel.mkdir(parents=True, exist_ok=True)
    (rel / f"extension-release.{name}").write_text(f"ID={ext_id}\n")
    for path, text in (files or {"usr/share/verity-test/hello": "hello\n"}).items():
        p = tree / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    run("mksquashfs", tree, out, "-quiet", "-noappend", "-all-root")
    return out


def verity_format(data: Path, hash_out: Path, *extra: str) -> bytes:
    """veritysetup format DATA HASH_OUT; returns the root hash."""
    out = run("veritysetup", "format", *extra, data, hash_out)
    for line in out.splitlines():
        if line.startswith("Root hash:"):
            return bytes.fromhex(line.split()[-1])
    raise RuntimeError("veritysetup printed no root hash")


@dataclass
class Key:
    key: Path
    cert: Path


def make_key(d: Path, name: str, kind: str = "rsa") -> Key:
    """A throw-away key and self-signed certificate (kind: rsa or ec)."""
    d.mkdir(parents=True, exist_ok=True)
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    alg = {"rsa": ["-newkey", "rsa:2048"], "ec": ["-newkey", "ec", "-pkeyopt",
                                                   "ec_paramgen_curve:prime256v1"]}[kind]
    run("openssl", "req", "-x509", *alg, "-nodes", "-keyout", key, "-out", cert, "-days", "2",
        "-subj", f"/CN={name}")
    return Key(key, cert)


def sign(root_hash: bytes, k: Key, out: Path, *, attrs: bool = False, keyid: bool = False,
         pss: bool = False, detached: bool = True) -> bytes:
    """A DER PKCS#7 signature of the hex root hash, as systemd-repart/sign tools make it:
    detached, no certificates, by default without signed attributes."""
    msg = out.with_suffix(".msg")
    msg.write_text(root_hash.hex())
    cmd = ["openssl", "cms" if keyid or pss else "smime", "-sign", "-binary", "-in", str(msg),
           "-signer", str(k.cert), "-inkey", str(k.key), "-outform", "der", "-out", str(out),
           "-nocerts"]
    if not attrs:
        cmd.append("-noattr")
    if keyid:
        cmd.append("-keyid")
    if pss:
        cmd += ["-keyopt", "rsa_padding_mode:pss"]
    if not detached:
        cmd.append("-nodetach")
    run(*cmd)
    msg.unlink()
    return out.read_bytes()


def openssl_verifies(root_hash: bytes, sig: Path, certs: list[Path], tmp: Path) -> bool:
    """OpenSSL's PKCS7_verify(..., PKCS7_NOINTERN|PKCS7_NOVERIFY), as systemd calls it."""
    msg, bundle = tmp / "content.txt", tmp / "bundle.pem"
    msg.write_text(root_hash.hex())
    bundle.write_bytes(b"".join(c.read_bytes() for c in certs))
    p = subprocess.run(["openssl", "smime", "-verify", "-binary", "-inform", "der", "-in",
                        str(sig), "-content", str(msg), "-certfile", str(bundle), "-nointern",
                        "-noverify", "-out", "/dev/null"], capture_output=True, check=False)
    return p.returncode == 0


@dataclass
class Sidecar:
    image: Path
    root_hash: bytes
    verity: Path


def sidecar_image(d: Path, name: str = "ext", sign_with: Key | None = None,
                  designator: str = "root", files: dict[str, str] | None = None) -> Sidecar:
    """NAME.raw (squashfs), NAME.verity, NAME.roothash (or .usrhash) and, signed, .p7s."""
    d.mkdir(parents=True, exist_ok=True)
    img = squashfs(d / f"{name}.tree", d / f"{name}.raw", name, files)
    rh = verity_format(img, d / f"{name}.verity")
    suffix = "roothash" if designator == "root" else "usrhash"
    (d / f"{name}.{suffix}").write_text(rh.hex() + "\n")
    if sign_with is not None:
        sign(rh, sign_with, d / f"{name}.{suffix}.p7s")
    return Sidecar(img, rh, d / f"{name}.verity")


def sig_json(root_hash: bytes, sig: bytes, cert: Path | None = None) -> bytes:
    obj: dict[str, str] = {"rootHash": root_hash.hex(),
                           "signature": base64.b64encode(sig).decode()}
    if cert is not None:
        der = run_bytes("openssl", "x509", "-in", str(cert), "-outform", "der")
        obj["certificateFingerprint"] = hashlib.sha256(der).hexdigest()
    data = json.dumps(obj).encode()
    return data + b"\0" * (-len(data) % 4096)


def run_bytes(*cmd: str) -> bytes:
    return subprocess.run(list(cmd), capture_output=True, check=True).stdout


@dataclass
class Ddi:
    image: Path
    root_hash: bytes
    data_uuid: str
    verity_uuid: str


def ddi(d: Path, name: str = "ddi", *, designator: str = "usr", sign_with: Key | None = None,
        sig_blob: bytes | None = None, uuids: tuple[str, str] | None = None,
        files: dict[str, str] | None = None) -> Ddi:
    """A GPT image with DESIGNATOR (squashfs), DESIGNATOR-verity and, when signed (or given
    SIG_BLOB, the raw content of the signature partition), DESIGNATOR-verity-sig; UUIDS
    overrides the partition UUIDs derived from the root hash. A usr partition holds what is
    below usr/ of the tree (as systemd-repart lays out a sysext DDI), a root partition all
    of it."""
    d.mkdir(parents=True, exist_ok=True)
    tree = d / f"{name}.tree"
    data = squashfs(tree, d / f"{name}.data", name, files)
    if designator == "usr":
        run("mksquashfs", tree / "usr", data, "-quiet", "-noappend", "-all-root")
    hashf = d / f"{name}.hash"
    rh = verity_format(data, hashf)
    du, vu = uuids or (str(uuid.UUID(bytes=rh[:16])), str(uuid.UUID(bytes=rh[-16:])))
    blob = sig_blob
    if blob is None and sign_with is not None:
        blob = sig_json(rh, sign(rh, sign_with, d / f"{name}.p7s"), sign_with.cert)
    parts = [(designator, data.read_bytes(), du), (f"{designator}-verity", hashf.read_bytes(),
                                                   vu)]
    if blob is not None:
        parts.append((f"{designator}-verity-sig", blob, str(uuid.uuid4())))
    img = d / f"{name}.raw"
    offset = MiB
    script = ["label: gpt"]
    layout = []
    for kind, content, pu in parts:
        size = max(MiB, -(-len(content) // MiB) * MiB)
        script.append(f"start={offset // 512}, size={size // 512}, type={X86_64[kind]}, "
                      f"uuid={pu}, name={kind}")
        layout.append((offset, content))
        offset += size
    with open(img, "wb") as f:
        f.truncate(offset + MiB)
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", img,
        stdin=("\n".join(script) + "\n").encode())
    with open(img, "r+b") as f:
        for off, content in layout:
            f.seek(off)
            f.write(content)
    return Ddi(img, rh, du, vu)


@dataclass
class RepartDdi:
    image: Path
    root_hash: str                      # hex, as systemd-repart reports it
    partitions: list[dict[str, object]]  # systemd-repart's --json=short rows


def repart_ddi(repart: Path | str, d: Path, name: str, designator: str,
               files: dict[str, str], key: Key | None) -> RepartDdi:
    """D/NAME.raw: a DDI of FILES (plus NAME's release file, ID=_any) made by upstream's own
    systemd-repart, offline on a plain file: a squashfs DESIGNATOR partition (usr: what is below
    usr/, for a sysext; root: etc/, for a confext), its verity partition and, with KEY, its
    signature partition."""
    tree, defs = d / f"{name}.tree", d / f"{name}.defs"
    top = "usr" if designator == "usr" else "etc"
    release = (f"usr/lib/extension-release.d/extension-release.{name}" if top == "usr" else
               f"etc/extension-release.d/extension-release.{name}")
    for rel, text in {release: "ID=_any\n", **files}.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    defs.mkdir(parents=True)
    copy = "/usr:/" if top == "usr" else "/etc:/etc"
    (defs / "00-data.conf").write_text(
        f"[Partition]\nType={designator}\nFormat=squashfs\nCopyFiles={copy}\nVerity=data\n"
        "VerityMatchKey=data\nMinimize=best\n")
    (defs / "01-hash.conf").write_text(
        f"[Partition]\nType={designator}-verity\nVerity=hash\nVerityMatchKey=data\n"
        "Minimize=best\n")
    if key is not None:
        (defs / "02-sig.conf").write_text(
            f"[Partition]\nType={designator}-verity-sig\nVerity=signature\n"
            "VerityMatchKey=data\n")
    image = d / f"{name}.raw"
    cmd = [str(repart), f"--definitions={defs}", "--empty=create", "--size=auto",
           "--offline=yes", f"--copy-source={tree}", "--dry-run=no", "--json=short"]
    if key is not None:
        cmd += [f"--private-key={key.key}", f"--certificate={key.cert}"]
    r = subprocess.run([*cmd, str(image)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"systemd-repart failed for {image}: {r.stderr.strip()}")
    parts = json.loads(r.stdout)
    hashes = {p.get("roothash") for p in parts}
    if len(hashes) != 1:
        raise RuntimeError(f"systemd-repart reported {len(hashes)} root hashes: {parts}")
    (root_hash,) = hashes
    return RepartDdi(image, str(root_hash), parts)
