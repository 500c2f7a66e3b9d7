#!/usr/bin/env python3
"""Verified extension images through overlayctl's merge path, in a guest whose kernel has
device-mapper and dm-verity (the development host has neither).

    vm-tests/verity_guest.py build DIR   # on the host: images, keys, manifest (mksquashfs,
                                         # veritysetup, openssl, sfdisk); also builds
                                         # verity_smoke.py's images into DIR/smoke
    vm-tests/verity_guest.py run DIR     # in the guest, as root; DIR may be read-only

`run` needs: python3 with python3-cryptography and python3-asn1crypto (userspace signature
checks), the overlayctl package (installed, as vm-tests/run.sh's guests have it, or next to
this script or on $PYTHONPATH), the loop, dm_mod and
dm_verity modules (modprobe'd), losetup. It runs `python3 -m overlayctl` as a user would and
prints one line per check ("CHECK PASS verity: ..." or "CHECK FAIL verity: ... :: why", as
guest.py does, so that run.sh counts them), then "N passed, N failed"; the exit
status is 0 only if nothing failed. The scenarios:

1. sidecar and DDI images (unsigned) activate and merge: files read through /usr, status and
   list say "verity" with the root hash, the dm devices are <roothash>-verity, nothing is left
   after unmerge (no dm device, no loop device);
2. signed with a throw-away key whose certificate is only in the root's verity.d: the kernel
   refuses the signature (its keyrings do not hold the certificate), userspace accepts it, the
   images merge (sidecar and DDI), status says signature "userspace", also under a
   signed-only policy;
3. refusals with device-mapper present: a signature by a key not in verity.d, userspace checks
   turned off (SYSTEMD_ALLOW_USERSPACE_VERITY=0), an unsigned image under a signed-only
   policy: each fails the merge, nothing merged, no dm or loop device left;
4. a flipped byte in a data block: reading that file through the merged /usr fails with EIO,
   the rest still reads; in the release file: the merge fails with one line, nothing left;
5. refresh: unchanged (skipped), the image copied to a new inode (skipped: same root hash),
   --always-refresh=yes (re-merged on the same, shared dm device: still one device);
6. the Flatcar model on the guest's real /etc: a signed verity confext in /usr/lib/confexts,
   `ln -s /etc /var/lib/extensions.mutable/etc`, `confext merge --mutable=yes`: the image's
   files in /etc, new and changed files land in the real /etc and stay after unmerge, the
   image's untouched files go, no dm device left;
7. DDIs made by upstream's own systemd-repart (systemd 262, tools/peer.sh's
   systemd-repart-sid on the host): a signed usr sysext and a signed root confext activate,
   verify in userspace and merge in one call; their root hashes are the ones repart reported;
8. verity_smoke.py run DIR/smoke (dm.py directly: table, status, EBUSY on a second device,
   the kernel's refusal of the throw-away key), counted as one check.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The package next to this script (a guest's /payload) or in the checkout.
sys.path[:0] = [str(HERE), str(REPO)]
PYPATH = os.pathsep.join([str(HERE), str(REPO)])
results: list[tuple[str, bool]] = []


def check(name: str, ok: object, detail: str = "") -> bool:
    """One line "CHECK PASS|FAIL verity: NAME :: DETAIL" (run.sh counts them, as guest.py's);
    the detail only for a failure."""
    results.append((name, bool(ok)))
    first, *rest = (detail if not ok else "").strip().splitlines() or [""]
    print(f"CHECK {'PASS' if ok else 'FAIL'} verity: {name} :: {first}", flush=True)
    for line in rest:
        print(f"  | {line}", flush=True)
    return bool(ok)


# ---------------------------------------------------------------------------------------------
# build (host)

def _confext(d: Path, name: str, files: dict[str, str]) -> Path:
    from tests import veritybuild as vb
    tree = d / f"{name}.tree"
    (tree / "etc/extension-release.d").mkdir(parents=True, exist_ok=True)
    (tree / f"etc/extension-release.d/extension-release.{name}").write_text("ID=_any\n")
    for p, text in files.items():
        (tree / p).parent.mkdir(parents=True, exist_ok=True)
        (tree / p).write_text(text)
    img = d / f"{name}.raw"
    vb.run("mksquashfs", tree, img, "-quiet", "-noappend", "-all-root")
    shutil.rmtree(tree)
    return img


def build(out: Path) -> int:
    from tests import veritybuild as vb

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    keys = out / "keys"
    alpha, bravo = vb.make_key(keys, "alpha"), vb.make_key(keys, "bravo")
    img = out / "img"
    cases: dict[str, dict[str, object]] = {}

    def sidecar(name: str, key: vb.Key | None) -> None:
        s = vb.sidecar_image(img, name, key, files={f"usr/share/vguest/{name}": f"{name}\n"})
        shutil.rmtree(img / f"{name}.tree")
        cases[name] = {"files": sorted(p.name for p in img.iterdir()
                                       if p.name.startswith(f"{name}.")),
                       "root_hash": s.root_hash.hex(), "signed": key is not None}

    def ddi(name: str, key: vb.Key | None) -> None:
        x = vb.ddi(img / name, name, sign_with=key, files={f"usr/share/vguest/{name}":
                                                            f"{name}\n"})
        shutil.move(str(x.image), img / f"{name}.raw")
        shutil.rmtree(img / name)
        cases[name] = {"files": [f"{name}.raw"], "root_hash": x.root_hash.hex(),
                       "signed": key is not None, "ddi": True}

    sidecar("vplain", None)
    sidecar("vsigned", alpha)
    sidecar("vbravo", bravo)
    ddi("vddi", alpha)
    ddi("vddiu", None)
    # A flipped byte after the hash tree was made: in one file's data (vflip), or in the
    # release file (vbadmeta). Uncompressed squashfs with 4 KiB blocks and no fragments, so
    # that every 4 KiB verity block of file data is one file's.
    for name, needle in (("vflip", b"D" * 8192), ("vbadmeta", b"ID=_any\n")):
        tree = img / f"{name}.tree"
        (tree / "usr/lib/extension-release.d").mkdir(parents=True)
        (tree / f"usr/lib/extension-release.d/extension-release.{name}").write_text("ID=_any\n")
        (tree / "usr/share/vguest").mkdir(parents=True)
        (tree / "usr/share/vguest/damaged").write_text("D" * 65536)
        (tree / "usr/share/vguest/intact").write_text("I" * 65536)
        raw = img / f"{name}.raw"
        vb.run("mksquashfs", tree, raw, "-quiet", "-noappend", "-all-root", "-noI", "-noD",
               "-noF", "-noX", "-no-fragments", "-b", "4096")
        shutil.rmtree(tree)
        rh = vb.verity_format(raw, img / f"{name}.verity")
        (img / f"{name}.roothash").write_text(rh.hex() + "\n")
        data = bytearray(raw.read_bytes())
        assert data.count(needle[:8]) >= 1
        data[data.index(needle) + len(needle) // 2] ^= 0x01
        raw.write_bytes(bytes(data))
        cases[name] = {"files": [f"{name}.raw", f"{name}.roothash", f"{name}.verity"],
                       "root_hash": rh.hex(), "signed": False}
    # The Flatcar default confext: verity, signed.
    conf = _confext(img, "flatcar", {"etc/flatcar/default.conf": "default v1\n",
                                     "etc/flatcar/untouched.conf": "untouched\n"})
    rh = vb.verity_format(conf, img / "flatcar.verity")
    (img / "flatcar.roothash").write_text(rh.hex() + "\n")
    vb.sign(rh, alpha, img / "flatcar.roothash.p7s")
    cases["flatcar"] = {"files": ["flatcar.raw", "flatcar.roothash", "flatcar.roothash.p7s",
                                  "flatcar.verity"], "root_hash": rh.hex(), "signed": True}
    # DDIs made by upstream's systemd-repart (262), signed with alpha: a sysext and a confext
    repart = os.environ.get("OVERLAYCTL_REPART") or str(
        Path(os.environ.get("OVERLAYCTL_PEER_DIR", "/var/cache/overlayctl/peer"))
        / "bin/systemd-repart-sid")
    if not os.access(repart, os.X_OK):
        print(f"verity_guest.py build: no upstream systemd-repart at {repart} (hint: run "
              "tools/peer.sh, or set OVERLAYCTL_REPART)", file=sys.stderr)
        return 1
    for name, designator, rel in (("vrepart", "usr", "usr/share/vguest/vrepart"),
                                  ("vrepartconf", "root", "etc/vguest/vrepartconf.conf")):
        x = vb.repart_ddi(repart, img / f"{name}.work", name, designator,
                          {rel: f"{name}\n"}, alpha)
        shutil.move(str(x.image), img / f"{name}.raw")
        shutil.rmtree(img / f"{name}.work")
        cases[name] = {"files": [f"{name}.raw"], "root_hash": x.root_hash, "signed": True,
                       "ddi": True, "repart": True}
    for k in (alpha, bravo):
        k.key.unlink()          # the guest needs only the certificates
    (out / "manifest.json").write_text(json.dumps({"trusted": "keys/alpha.crt",
                                                   "untrusted": "keys/bravo.crt",
                                                   "cases": cases}, indent=1) + "\n")
    # verity_smoke.py's images (dm.py directly), run by `run` too.
    sys.path.insert(0, str(HERE))
    import verity_smoke
    verity_smoke.build(out / "smoke")
    print(f"built {len(cases)} images in {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# run (guest)

def sh(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, check=False, env=full)
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(list(cmd), 127, "", str(e))


class Guest:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.m = json.loads((base / "manifest.json").read_text())
        self.work = Path("/var/tmp/verity-guest")
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.n = 0

    def root(self, *names: str, trust: bool = True) -> Path:
        """A fresh --root tree with the images NAMES in var/lib/extensions and the trusted
        certificate in etc/verity.d."""
        self.n += 1
        r = self.work / f"root{self.n}"
        (r / "usr/lib").mkdir(parents=True)
        (r / "usr/lib/os-release").write_text("ID=debian\nVERSION_ID=13\n")
        (r / "opt").mkdir()
        ext = r / "var/lib/extensions"
        ext.mkdir(parents=True)
        for n in names:
            for f in self.m["cases"][n]["files"]:
                shutil.copy(self.base / "img" / f, ext / f)
        if trust:
            (r / "etc/verity.d").mkdir(parents=True)
            shutil.copy(self.base / self.m["trusted"], r / "etc/verity.d/alpha.crt")
        return r

    def rh(self, name: str) -> str:
        return str(self.m["cases"][name]["root_hash"])


def oc(root: Path | None, *args: str,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "overlayctl"]
    if root is not None:
        argv.append(f"--root={root}")
    return sh(*argv, *args, "--no-reload", env={"PYTHONPATH": PYPATH, **(env or {})})


def verity_devices() -> dict[str, int]:
    from overlayctl import dm
    return {n: d for n, d in dm.list_devices().items() if n.endswith("-verity")}


def loops() -> list[str]:
    out = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            out.append(f.read_text().strip())
        except OSError:
            pass
    return sorted(out)


def settled(loops_before: list[str], what: str) -> None:
    """No verity device, and no loop device but those there before (deferred removal and
    auto-clear run when the last user lets go: wait a little)."""
    for _ in range(200):
        if not verity_devices() and loops() == loops_before:
            break
        time.sleep(0.02)
    check(f"{what}: no dm-verity device left", not verity_devices(), repr(verity_devices()))
    check(f"{what}: no loop device left", loops() == loops_before,
          f"{loops()} (before: {loops_before})")


def status_of(root: Path | None, hierarchy: str, cls: str = "sysext") -> dict[str, object]:
    r = oc(root, cls, "status", "--json=short")
    rows = json.loads(r.stdout) if r.returncode == 0 else []
    return next((x for x in rows if x["hierarchy"] == hierarchy), {})


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [x for x in r.stderr.splitlines() if x.startswith("overlayctl:")]
    return lines[0] if len(lines) == 1 else r.stderr


def scenario_unsigned(g: Guest) -> None:
    before = loops()
    root = g.root("vplain", "vddiu")
    r = oc(root, "sysext", "merge")
    if not check("unsigned sidecar + DDI: merge", r.returncode == 0, r.stderr):
        return
    try:
        for n in ("vplain", "vddiu"):
            p = root / f"usr/share/vguest/{n}"
            check(f"unsigned: {n}'s file reads through /usr",
                  p.exists() and p.read_text() == f"{n}\n")
        st = status_of(root, "/usr")
        prot = st.get("protection") or {}
        assert isinstance(prot, dict)
        for n, d in (("vplain", "root"), ("vddiu", "usr")):
            p = prot.get(n) or {}
            check(f"unsigned: status says {n} is verity, partition {d}, its root hash",
                  p.get("protection") == "verity" and p.get("designator") == d
                  and p.get("root_hash") == g.rh(n) and p.get("signature") is None, repr(p))
        devs = verity_devices()
        check("unsigned: one <roothash>-verity device per image",
              set(devs) == {f"{g.rh('vplain')}-verity", f"{g.rh('vddiu')}-verity"},
              repr(devs))
        from overlayctl import dm
        for n in ("vplain", "vddiu"):
            st_ = dm.status(f"{g.rh(n)}-verity")
            check(f"unsigned: {n}'s device is held by the mount, removal deferred",
                  st_.open_count >= 1 and st_.flags & dm.DM_DEFERRED_REMOVE, repr(st_))
            check(f"unsigned: {n}'s device reads clean (status V)",
                  dm.table_status(f"{g.rh(n)}-verity")[0][3].startswith("V"))
        rows = {x["name"]: x for x in json.loads(oc(root, "sysext", "list",
                                                     "--json=short").stdout)}
        check("unsigned: list --json says verity",
              rows.get("vplain", {}).get("protection") == "verity"
              and rows.get("vddiu", {}).get("protection") == "verity", repr(rows))
    finally:
        r = oc(root, "sysext", "unmerge")
        check("unsigned: unmerge", r.returncode == 0, r.stderr)
    settled(before, "unsigned: after unmerge")


def scenario_signed(g: Guest) -> None:
    before = loops()
    for policy in ([], ["--image-policy=root=signed+absent:usr=signed+absent"]):
        what = "signed" + (" (signed-only policy)" if policy else "")
        root = g.root("vsigned", "vddi")
        r = oc(root, "sysext", "merge", *policy, env={"SYSTEMD_LOG_LEVEL": "debug"})
        if not check(f"{what}: merge (userspace signature check)", r.returncode == 0,
                     r.stderr[-2000:]):
            continue
        try:
            check(f"{what}: the kernel refused the throw-away key first",
                  "the kernel refused the verity signature" in r.stderr, r.stderr[-2000:])
            for n in ("vsigned", "vddi"):
                p = root / f"usr/share/vguest/{n}"
                check(f"{what}: {n}'s file reads", p.exists() and p.read_text() == f"{n}\n")
            prot = status_of(root, "/usr").get("protection") or {}
            assert isinstance(prot, dict)
            for n in ("vsigned", "vddi"):
                p = prot.get(n) or {}
                check(f"{what}: status says {n} is signed, checked in userspace",
                      p.get("protection") == "signed" and p.get("signature") == "userspace",
                      repr(p))
            from overlayctl import dm
            table = dm.table_status(f"{g.rh('vsigned')}-verity", table=True)[0][3]
            check(f"{what}: the device was set up without the kernel signature",
                  "root_hash_sig_key_desc" not in table, table)
        finally:
            r = oc(root, "sysext", "unmerge")
            check(f"{what}: unmerge", r.returncode == 0, r.stderr)
        settled(before, f"{what}: after unmerge")


def scenario_refusals(g: Guest) -> None:
    before = loops()
    cases = [
        ("signature by a key not in verity.d", ["vbravo"], [], {},
         ("refused by the kernel", "in userspace", "not in verity.d")),
        ("userspace checks off", ["vsigned"], [], {"SYSTEMD_ALLOW_USERSPACE_VERITY": "0"},
         ("refused by the kernel", "disabled by $SYSTEMD_ALLOW_USERSPACE_VERITY")),
        ("unsigned under a signed-only policy", ["vplain"], ["--image-policy=root=signed"], {},
         ("'root'", "verity", "root=signed")),
    ]
    for what, names, args, env, needles in cases:
        root = g.root(*names)
        (root / "var/lib/extensions/dir/usr/lib/extension-release.d").mkdir(parents=True)
        (root / "var/lib/extensions/dir/usr/lib/extension-release.d/extension-release.dir"
         ).write_text("ID=_any\n")
        (root / "var/lib/extensions/dir/usr/share/vguest-dir").mkdir(parents=True)
        r = oc(root, "sysext", "merge", *args, env=env)
        line = one_line(r)
        check(f"refused ({what}): merge fails with one line naming the image",
              r.returncode == 1 and names[0] in line
              and all(n in line for n in needles), line)
        check(f"refused ({what}): nothing merged",
              not (root / "usr/share/vguest-dir").exists()
              and not status_of(root, "/usr").get("merged"))
        settled(before, f"refused ({what})")


def scenario_flip(g: Guest) -> None:
    before = loops()
    root = g.root("vflip")
    r = oc(root, "sysext", "merge")
    if not check("flipped byte: merge", r.returncode == 0, r.stderr):
        return
    try:
        try:
            (root / "usr/share/vguest/damaged").read_bytes()
            check("flipped byte: reading the damaged file fails with EIO", False, "it read")
        except OSError as e:
            check("flipped byte: reading the damaged file fails with EIO",
                  e.errno == errno.EIO, str(e))
        try:
            ok = (root / "usr/share/vguest/intact").read_text() == "I" * 65536
        except OSError as e:
            ok = False
            print(f"     {e}")
        check("flipped byte: the intact file still reads", ok)
        from overlayctl import dm
        check("flipped byte: the device reports corruption (status C)",
              dm.table_status(f"{g.rh('vflip')}-verity")[0][3].startswith("C"))
    finally:
        r = oc(root, "sysext", "unmerge")
        check("flipped byte: unmerge", r.returncode == 0, r.stderr)
    settled(before, "flipped byte: after unmerge")


def scenario_damaged_metadata(g: Guest) -> None:
    before = loops()
    root = g.root("vbadmeta")
    r = oc(root, "sysext", "merge")
    line = one_line(r)
    check("damaged release file: merge fails with one line naming the image and the damage",
          r.returncode == 1 and "vbadmeta.raw" in line and "damaged" in line, line)
    check("damaged release file: nothing merged", not status_of(root, "/usr").get("merged"))
    settled(before, "damaged release file")


def scenario_refresh(g: Guest) -> None:
    before = loops()
    root = g.root("vplain")
    r = oc(root, "sysext", "merge")
    if not check("refresh: merge", r.returncode == 0, r.stderr):
        return
    name = f"{g.rh('vplain')}-verity"
    try:
        dev = verity_devices().get(name)
        r = oc(root, "sysext", "refresh")
        check("refresh: unchanged, skipped", r.returncode == 0 and "Skipping" in r.stderr,
              r.stderr)
        img = root / "var/lib/extensions/vplain.raw"
        shutil.copy(img, img.with_suffix(".new"))
        os.replace(img.with_suffix(".new"), img)      # a new inode, the same content
        r = oc(root, "sysext", "refresh")
        check("refresh: the same image copied anew (same root hash), skipped",
              r.returncode == 0 and "Skipping" in r.stderr, r.stderr)
        r = oc(root, "sysext", "refresh", "--always-refresh=yes")
        check("refresh: --always-refresh=yes re-merges", r.returncode == 0
              and "Skipping" not in r.stderr, r.stderr)
        devs = verity_devices()
        check("refresh: the dm device is shared, not duplicated",
              list(devs) == [name] and devs[name] == dev, f"{devs} (was {dev})")
        p = root / "usr/share/vguest/vplain"
        check("refresh: the file still reads", p.exists() and p.read_text() == "vplain\n")
    finally:
        r = oc(root, "sysext", "unmerge")
        check("refresh: unmerge", r.returncode == 0, r.stderr)
    settled(before, "refresh: after unmerge")


def scenario_flatcar(g: Guest) -> None:
    """On the guest's real root: /etc is the upper of its own merge."""
    before = loops()
    confexts = Path("/usr/lib/confexts")
    confexts.mkdir(parents=True, exist_ok=True)
    for f in g.m["cases"]["flatcar"]["files"]:
        shutil.copy(g.base / "img" / f, confexts / f)
    Path("/etc/verity.d").mkdir(exist_ok=True)
    shutil.copy(g.base / g.m["trusted"], "/etc/verity.d/flatcar-test.crt")
    mut = Path("/var/lib/extensions.mutable")
    mut.mkdir(parents=True, exist_ok=True)
    made_link = not (mut / "etc").is_symlink()
    if made_link:
        (mut / "etc").symlink_to("/etc")
    r = oc(None, "confext", "merge", "--mutable=yes")
    if not check("flatcar: confext merge --mutable=yes, /etc as its own upper",
                 r.returncode == 0, r.stderr):
        return
    try:
        check("flatcar: the default confext's file is in /etc",
              Path("/etc/flatcar/default.conf").read_text() == "default v1\n")
        st = status_of(None, "/etc", "confext")
        prot = (st.get("protection") or {})
        assert isinstance(prot, dict)
        p = prot.get("flatcar") or {}
        check("flatcar: status: mutable yes, upper /etc, signed, checked in userspace",
              st.get("mutable") == "yes" and st.get("upperdir") == "/etc"
              and p.get("protection") == "signed" and p.get("signature") == "userspace",
              repr(st))
        Path("/etc/flatcar/local.conf").write_text("mine\n")
        Path("/etc/flatcar/default.conf").write_text("changed\n")
        r = oc(None, "confext", "refresh")
        check("flatcar: refresh of the unchanged image is skipped",
              r.returncode == 0 and "Skipping" in r.stderr, r.stderr)
    finally:
        r = oc(None, "confext", "unmerge")
        check("flatcar: unmerge", r.returncode == 0, r.stderr)
    check("flatcar: the new and the changed file are in the real /etc",
          Path("/etc/flatcar/local.conf").read_text() == "mine\n"
          and Path("/etc/flatcar/default.conf").read_text() == "changed\n")
    check("flatcar: the image's untouched file is gone with the unmerge",
          not Path("/etc/flatcar/untouched.conf").exists())
    settled(before, "flatcar: after unmerge")
    # Leave the guest as it was.
    shutil.rmtree("/etc/flatcar", ignore_errors=True)
    os.unlink("/etc/verity.d/flatcar-test.crt")
    if made_link:
        (mut / "etc").unlink()
    for f in g.m["cases"]["flatcar"]["files"]:
        os.unlink(confexts / f)


def scenario_repart(g: Guest) -> None:
    """Signed DDIs as upstream's systemd-repart makes them: a usr sysext and a root confext,
    merged in one call."""
    if "vrepart" not in g.m["cases"]:
        check("repart: the build made the systemd-repart DDIs", False, "not in the manifest")
        return
    before = loops()
    root = g.root("vrepart")
    conf = root / "var/lib/confexts"
    conf.mkdir(parents=True)
    shutil.copy(g.base / "img/vrepartconf.raw", conf / "vrepartconf.raw")
    r = oc(root, "merge")
    if not check("repart: sysext and confext DDIs merge", r.returncode == 0, r.stderr[-2000:]):
        return
    try:
        for rel, text in (("usr/share/vguest/vrepart", "vrepart\n"),
                          ("etc/vguest/vrepartconf.conf", "vrepartconf\n")):
            p = root / rel
            check(f"repart: /{rel} reads", p.exists() and p.read_text() == text)
        for hier, cls, n, d in (("/usr", "sysext", "vrepart", "usr"),
                                ("/etc", "confext", "vrepartconf", "root")):
            prot = status_of(root, hier, cls).get("protection") or {}
            assert isinstance(prot, dict)
            p = prot.get(n) or {}
            check(f"repart: status says {n} is signed (userspace), partition {d}, "
                  "repart's root hash",
                  p.get("protection") == "signed" and p.get("signature") == "userspace"
                  and p.get("designator") == d and p.get("root_hash") == g.rh(n), repr(p))
        devs = verity_devices()
        check("repart: one <roothash>-verity device per image",
              set(devs) == {f"{g.rh('vrepart')}-verity", f"{g.rh('vrepartconf')}-verity"},
              repr(devs))
    finally:
        r = oc(root, "unmerge")
        check("repart: unmerge", r.returncode == 0, r.stderr)
    settled(before, "repart: after unmerge")


def run(base: Path) -> int:
    from overlayctl import dm

    for mod in ("loop", "dm_mod", "dm_verity"):
        sh("modprobe", mod)
    if not check("device-mapper available", dm.dm_available()):
        return summary()
    try:
        import asn1crypto  # noqa: F401
        import cryptography  # noqa: F401
        have_crypto = True
    except ImportError as e:
        have_crypto = False
        check("python3-cryptography and python3-asn1crypto installed", False, str(e))
    g = Guest(base)
    loops_at_start = loops()
    scenario_unsigned(g)
    if have_crypto:
        scenario_signed(g)
    scenario_refusals(g)
    scenario_flip(g)
    scenario_damaged_metadata(g)
    scenario_refresh(g)
    if have_crypto:
        scenario_flatcar(g)
        scenario_repart(g)
    check("in the end: no dm-verity device", not verity_devices(), repr(verity_devices()))
    check("in the end: no loop device", loops() == loops_at_start, repr(loops()))
    smoke = base / "smoke"
    if (smoke / "manifest.json").exists():
        r = sh(sys.executable, str(HERE / "verity_smoke.py"), "run", str(smoke),
               env={"PYTHONPATH": PYPATH})
        sys.stdout.write("".join(f"     smoke| {line}\n" for line in r.stdout.splitlines()))
        check("verity_smoke.py (dm.py directly)", r.returncode == 0, r.stderr[-1000:])
    return summary()


def summary() -> int:
    passed = sum(ok for _, ok in results)
    print(f"{passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return build(Path(sys.argv[2])) if sys.argv[1] == "build" else run(Path(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
