"""Image policies and verity images on the merge path, with real images (mksquashfs,
veritysetup, openssl, sfdisk: tests/veritybuild.py), on a kernel without device-mapper (this
machine, CI). Everything up to activation happens here; activation is vm-tests/verity_guest.py's.

* A policy that does not parse fails every verb before anything is looked at.
* A refused image fails the whole call: nothing merged (in either class), no loop device.
* Directory extensions are not subject to image policies (as upstream).
* A verity image fails without device-mapper, with a message that names it and says whether
  its signature is valid; SYSTEMD_DISSECT_VERITY_SIDECAR=0 mounts it without verity.
* `list --json` lists every image, refused ones too, with its protection.

Where the upstream peer is there, it runs the same tree first (in its own namespace, whose
mounts die with it) and exit status and whether anything was merged must agree.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from overlayctl import dm
from tests import veritybuild as vb
from tests.conftest import Root
from tests.integration.peer import need_peer, run_plan, upstream_peer

pytestmark = pytest.mark.root

PEER = upstream_peer()
HAVE_DM = dm.dm_available()
needs_no_dm = pytest.mark.skipif(HAVE_DM, reason="this kernel has device-mapper: activation "
                                 "is tested in vm-tests/verity_guest.py")

SIGNED_ONLY = "--image-policy=root=signed+absent:usr=signed+absent"


class Images:
    """Every image the tests use, built once: name -> the files that make it up (NAME.raw
    and its sidecars)."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.keys = {n: vb.make_key(d / "keys", n) for n in ("alpha", "bravo")}
        files = {"usr/share/vtest/hello": "hello\n"}
        self.sets: dict[str, list[Path]] = {}
        vb.squashfs(d / "plain.tree", d / "plain.raw", "plain",
                    {"usr/share/vtest/plain": "plain\n"})
        self.sets["plain"] = [d / "plain.raw"]
        for name, key in (("ver", None), ("sig", "alpha"), ("sigb", "bravo")):
            s = vb.sidecar_image(d / name, name, self.keys[key] if key else None,
                                 files={f"usr/share/vtest/{name}": f"{name}\n", **files})
            self.sets[name] = sorted(p for p in (d / name).iterdir()
                                     if p.name.startswith(f"{name}.") and p.is_file())
            assert s.image in self.sets[name] and len(self.sets[name]) == (4 if key else 3)
        for name, key in (("ddi", "alpha"), ("ddiu", None)):
            x = vb.ddi(d / name, name, sign_with=self.keys[key] if key else None,
                       files={f"usr/share/vtest/{name}": f"{name}\n"})
            self.sets[name] = [x.image]
        # A configuration extension (plain squashfs).
        t = d / "conf.tree"
        (t / "etc/extension-release.d").mkdir(parents=True)
        (t / "etc/extension-release.d/extension-release.conf").write_text("ID=_any\n")
        (t / "etc/vtest.conf").write_text("conf\n")
        vb.run("mksquashfs", t, d / "conf.raw", "-quiet", "-noappend", "-all-root")
        self.sets["conf"] = [d / "conf.raw"]

    def place(self, root: Root, *names: str, where: str = "var/lib/extensions") -> list[Path]:
        """Copy the images NAMES (with their sidecars) into WHERE of ROOT; their image files."""
        dest = root / where
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for n in names:
            for f in self.sets[n]:
                shutil.copy(f, dest / f.name)
            out.append(dest / f"{n}.raw")
        return out

    def trust(self, root: Root, key: str) -> None:
        (root / "etc/verity.d").mkdir(parents=True, exist_ok=True)
        shutil.copy(self.keys[key].cert, root / f"etc/verity.d/{key}.crt")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("verity-images"))


_BASETEMP: list[str] = []


@pytest.fixture(autouse=True, scope="session")
def _basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _BASETEMP.append(str(tmp_path_factory.getbasetemp()))


def loop_backing() -> list[str]:
    """The backing file of every loop device in use (as losetup -l shows them) whose file
    is one of this test session's (other sessions on the machine may come and go)."""
    out = []
    for f in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            out.append(Path(f).read_text().strip())
        except OSError:
            pass
    return sorted(b for b in out if not _BASETEMP or b.startswith(_BASETEMP[0] + "/"))


def refused(r: Any, *needles: str) -> str:
    """The one-line error of a failed call, which must name every one of NEEDLES."""
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("overlayctl:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    line: str = lines[0]
    return line


def upstream_merge(root: Root, *args: str, cls: str = "sysext",
                   env: dict[str, str] | None = None) -> tuple[int, bool]:
    """Upstream's `merge` of ROOT: exit status, and whether it mounted anything. Its mounts
    die with its namespace, so ROOT is as before for overlayctl's turn."""
    peer = need_peer(PEER, cls)
    res = run_plan(root.path, [["run", f"up:{cls}", "merge", "--no-reload", *args], ["snap"]],
                   peer=peer, namespace=True, extra_tools=None) if env is None else \
        _with_env(root, peer, cls, args, env)
    return res["steps"][0]["rc"], bool(res["steps"][1]["overlays"])


def _with_env(root: Root, peer: Any, cls: str, args: tuple[str, ...],
              env: dict[str, str]) -> dict[str, Any]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run_plan(root.path, [["run", f"up:{cls}", "merge", "--no-reload", *args],
                                    ["snap"]], peer=peer, namespace=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def status(root: Root) -> dict[str, Any]:
    return {r["hierarchy"]: r for r in
            json.loads(root.run("status", "--json=short", check=True).stdout)}


# ---------------------------------------------------------------------------------------------
# A policy that does not parse


@pytest.mark.parametrize("policy", ["root=nonsense", "nonsense", "root=signed:root=verity",
                                    "root=signed::", "bogus=verity"])
@pytest.mark.parametrize("verb", ["merge", "refresh", "status", "list", "unmerge"])
def test_garbage_policy_is_an_error_for_every_verb(root: Root, images: Images, policy: str,
                                                   verb: str) -> None:
    images.place(root, "plain")
    root.sysext("dir", {"usr/share/vtest/dir": "d"})
    before = loop_backing()
    r = root.run(verb, f"--image-policy={policy}")
    line = refused(r, f"--image-policy={policy}")
    assert "hint:" in line
    assert r.stdout == ""                # status and list print nothing either
    assert root.mounts() == [] and loop_backing() == before
    assert not (root / "usr/share/vtest").exists()
    if PEER is not None and verb == "merge":
        assert upstream_merge(root, f"--image-policy={policy}") == (1, False)


def test_garbage_policy_is_an_error_for_the_local_verbs(root: Root) -> None:
    refused(root.run("diff", "--image-policy=root=nonsense"), "--image-policy=root=nonsense")


# ---------------------------------------------------------------------------------------------
# Refusals and all-or-nothing


def test_unsigned_image_under_signed_only_policy_is_refused(root: Root, images: Images) -> None:
    (img,) = images.place(root, "plain")
    root.sysext("dir", {"usr/share/vtest/dir": "d"})
    (root / "etc").mkdir()
    root.confext("cdir", {"etc/vtest-dir.conf": "c"})
    if PEER is not None:
        assert upstream_merge(root, SIGNED_ONLY) == (1, False)
    before = loop_backing()
    r = root.run("merge", SIGNED_ONLY)
    refused(r, str(img), "'root'", "unprotected", "signed", "root=signed+absent")
    # Nothing merged: not the image, not the directory sysext, not the confext merged first.
    assert root.mounts() == [] and loop_backing() == before
    assert not (root / "usr/share/vtest").exists() and not (root / "etc/vtest-dir.conf").exists()
    assert not status(root)["/usr"]["merged"]
    assert not list((root / "var/lib/overlayctl").glob("*/*.json"))


def test_unprotected_policy_merges_it(root: Root, images: Images) -> None:
    (img,) = images.place(root, "plain")
    if PEER is not None:
        assert upstream_merge(root, "--image-policy=root=unprotected") == (0, True)
    root.run("sysext", "merge", "--image-policy=root=unprotected", check=True)
    try:
        assert (root / "usr/share/vtest/plain").read_text() == "plain\n"
        st = status(root)["/usr"]
        assert st["extensions"] == ["plain"]
        assert st["protection"]["plain"]["protection"] == "unprotected"
        assert st["protection"]["plain"]["root_hash"] is None
        assert st["protection"]["plain"]["policy"] == "root=unprotected"
        assert loop_backing().count(str(img)) == 1
    finally:
        root.run("sysext", "unmerge", check=True)
    assert str(img) not in loop_backing()


def test_default_policy_merges_an_unprotected_image(root: Root, images: Images) -> None:
    images.place(root, "plain")
    root.run("sysext", "merge", check=True)
    try:
        prot = status(root)["/usr"]["protection"]["plain"]
        assert prot["protection"] == "unprotected"
        assert prot["policy"].startswith("root=verity+signed+")
    finally:
        root.run("sysext", "unmerge", check=True)


def test_refused_sysext_image_fails_the_confext_too(root: Root, images: Images) -> None:
    """All classes of one call are checked before the first device: the confext image (fine
    under the policy) is not merged when the sysext one (verity, which root=unprotected does
    not allow) is refused."""
    (root / "etc").mkdir()
    images.place(root, "conf", where="var/lib/confexts")
    (bad,) = images.place(root, "ver")
    before = loop_backing()
    if PEER is not None:
        assert upstream_merge(root, "--image-policy=root=unprotected") == (1, False)
    refused(root.run("merge", "--image-policy=root=unprotected"), str(bad), "'root'",
            "root=unprotected")
    assert root.mounts() == [] and loop_backing() == before
    assert not (root / "etc/vtest.conf").exists()
    root.run("confext", "merge", "--image-policy=root=unprotected", check=True)
    try:
        assert (root / "etc/vtest.conf").read_text() == "conf\n"
    finally:
        root.run("confext", "unmerge", check=True)


def test_directory_extensions_are_not_subject_to_image_policies(root: Root) -> None:
    root.sysext("dir", {"usr/share/vtest/dir": "d"})
    if PEER is not None:
        assert upstream_merge(root, "--image-policy=~") == (0, True)
    root.run("sysext", "merge", "--image-policy=~", check=True)
    try:
        assert (root / "usr/share/vtest/dir").read_text() == "d"
        assert "protection" not in status(root)["/usr"]
    finally:
        root.run("sysext", "unmerge", check=True)


def test_policy_that_ignores_everything_refuses_raw_images(root: Root, images: Images) -> None:
    (img,) = images.place(root, "plain")
    if PEER is not None:
        assert upstream_merge(root, "--image-policy=-") == (1, False)
    refused(root.run("sysext", "merge", "--image-policy=-"), str(img), "'root'")
    assert root.mounts() == []


def test_config_image_policy(root: Root, images: Images) -> None:
    (img,) = images.place(root, "plain")
    conf = root / "etc/systemd/sysext.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[SysExt]\nImagePolicy=root=signed+bogus\n")     # bogus: skipped
    if PEER is not None:
        assert upstream_merge(root) == (1, False)
    refused(root.run("sysext", "merge"), str(img), "root=signed")
    # The command line wins.
    root.run("sysext", "merge", "--image-policy=root=unprotected", check=True)
    root.run("sysext", "unmerge", check=True)
    # A value 262 cannot parse even gracefully: it ignores the whole configuration (the
    # Mutable=yes too), with a warning, and merges read-only under the default policy.
    (root / "var/lib/extensions.mutable/usr").mkdir(parents=True)
    conf.write_text("[SysExt]\nMutable=yes\nImagePolicy=nonsense\n")
    if PEER is not None:
        rc, merged = upstream_merge(root)
        assert (rc, merged) == (0, True)
    r = root.run("sysext", "merge", check=True)
    try:
        assert "ImagePolicy=nonsense" in r.stderr and "ignoring" in r.stderr
        assert (root / "usr/share/vtest/plain").exists()
        assert not root.writable("usr")
    finally:
        root.run("sysext", "unmerge", check=True)


def test_initrd_images_from_the_esp_need_a_signature(root: Root, images: Images) -> None:
    """In the initrd, what systemd-stub put in /.extra/sysext/ (from the ESP) gets the strict
    policy: unsigned images are refused. (Upstream applies that rule to paths outside
    --root= only: see docs/design.md.)"""
    (root / "etc").mkdir()
    (root / "etc/initrd-release").write_text("ID=testtest\n")
    (img,) = images.place(root, "plain", where=".extra/sysext")
    refused(root.run("sysext", "merge"), str(img), "root=signed+absent")
    assert root.mounts() == []
    root.run("sysext", "merge", "--image-policy=root=unprotected", "--force", check=True)
    root.run("sysext", "unmerge", check=True)


# ---------------------------------------------------------------------------------------------
# Verity images without device-mapper


@needs_no_dm
@pytest.mark.parametrize("name", ["ver", "ddiu"])
def test_verity_image_without_device_mapper_fails_clearly(root: Root, images: Images,
                                                          name: str) -> None:
    (img,) = images.place(root, name)
    root.sysext("dir", {"usr/share/vtest/dir": "d"})
    if PEER is not None:
        assert upstream_merge(root) == (1, False)
    before = loop_backing()
    line = refused(root.run("sysext", "merge"), str(img), "device-mapper", "dm-verity",
                   "root hash")
    assert "SYSTEMD_DISSECT_VERITY_SIDECAR=0" in line if name == "ver" else \
        "--image-policy=usr=unprotected" in line
    assert root.mounts() == [] and loop_backing() == before
    assert not (root / "usr/share/vtest").exists()


@needs_no_dm
def test_sidecar_verity_can_be_turned_off(root: Root, images: Images) -> None:
    """As upstream, SYSTEMD_DISSECT_VERITY_SIDECAR=0 ignores the sidecars: the image is then
    unprotected, and mounted without verity. No policy does that: a policy that allows only
    'unprotected' refuses an image with sidecars (262 does too)."""
    (img,) = images.place(root, "ver")
    env = {"SYSTEMD_DISSECT_VERITY_SIDECAR": "0"}
    if PEER is not None:
        assert upstream_merge(root, "--image-policy=root=unprotected") == (1, False)
        assert upstream_merge(root, env=env) == (0, True)
    line = refused(root.run("sysext", "merge", "--image-policy=root=unprotected"), str(img),
                   "verity", "root=unprotected")
    assert "SYSTEMD_DISSECT_VERITY_SIDECAR=0" in line
    root.run("sysext", "merge", env=env, check=True)
    try:
        assert (root / "usr/share/vtest/ver").read_text() == "ver\n"
        assert status(root)["/usr"]["protection"]["ver"]["protection"] == "unprotected"
    finally:
        root.run("sysext", "unmerge", check=True)


@needs_no_dm
def test_ddi_verity_partition_ignored_by_policy(root: Root, images: Images) -> None:
    """A policy can leave a DDI's verity partition unused: usr=unprotected mounts the usr
    partition without verity (with a notice)."""
    images.place(root, "ddiu")
    r = root.run("sysext", "merge", "--image-policy=usr=unprotected", check=True)
    try:
        assert "without its verity data" in r.stderr
        assert (root / "usr/share/vtest/ddiu").read_text() == "ddiu\n"
        assert status(root)["/usr"]["protection"]["ddiu"]["designator"] == "usr"
    finally:
        root.run("sysext", "unmerge", check=True)


@needs_no_dm
@pytest.mark.parametrize("name", ["sig", "ddi"])
def test_valid_signature_but_no_device_mapper(root: Root, images: Images, name: str) -> None:
    (img,) = images.place(root, name)
    images.trust(root, "alpha")
    before = loop_backing()
    line = refused(root.run("sysext", "merge", SIGNED_ONLY), str(img), "signature is valid",
                   "CN=alpha", "device-mapper")
    assert "refused" not in line
    assert root.mounts() == [] and loop_backing() == before


@needs_no_dm
@pytest.mark.parametrize("trusted", [["alpha"], [], ["alpha", "bravo-masked"]])
def test_signature_by_key_not_in_verity_d_is_refused(root: Root, images: Images,
                                                     trusted: list[str]) -> None:
    (img,) = images.place(root, "sigb")
    for t in trusted:
        if t.endswith("-masked"):
            (root / "etc/verity.d").mkdir(parents=True, exist_ok=True)
            (root / "usr/lib/verity.d").mkdir(parents=True)
            shutil.copy(images.keys["bravo"].cert, root / "usr/lib/verity.d/bravo.crt")
            (root / "etc/verity.d/bravo.crt").write_text("")       # masked
        else:
            images.trust(root, t)
    before = loop_backing()
    for policy in (SIGNED_ONLY, None):
        r = root.run("sysext", "merge", *([policy] if policy else []))
        line = refused(r, str(img), "signature is refused")
        assert "not in verity.d" in line or "no *.crt certificate" in line
        assert "signature is valid" not in line
        assert root.mounts() == [] and loop_backing() == before
    # The certificates are the root's: bravo's in the root's verity.d makes it valid.
    if not trusted:
        images.trust(root, "bravo")
        refused(root.run("sysext", "merge"), "signature is valid", "CN=bravo")


@needs_no_dm
def test_signature_checks_turned_off(root: Root, images: Images) -> None:
    """SYSTEMD_DISSECT_VERITY_SIGNATURE=0: neither the kernel nor userspace checks it; the
    image still counts as signed for the policy (as upstream)."""
    (img,) = images.place(root, "sigb")
    line = refused(root.run("sysext", "merge", SIGNED_ONLY,
                            env={"SYSTEMD_DISSECT_VERITY_SIGNATURE": "0"}),
                   str(img), "signature not checked", "device-mapper")
    assert "refused" not in line


# ---------------------------------------------------------------------------------------------
# list and status


def test_list_json_lists_every_image_with_its_protection(root: Root, images: Images) -> None:
    names = ["plain", "ver", "sig", "sigb", "ddi", "ddiu"]
    paths = dict(zip(names, images.place(root, *names), strict=True))
    root.sysext("dir", {"usr/share/vtest/dir": "d"})
    (root / "var/lib/extensions/broken.raw").write_bytes(b"\0" * 4096)
    up_rows: list[dict[str, Any]] | None = None
    if PEER is not None:
        peer = need_peer(PEER)
        res = run_plan(root.path, [["run", "up:sysext", SIGNED_ONLY, "list", "--json=short"]],
                       peer=peer, namespace=True)
        assert res["steps"][0]["rc"] == 0, res["steps"][0]["err"]
        up_rows = json.loads(res["steps"][0]["out"])
    for policy in ([SIGNED_ONLY], []):
        r = root.run("sysext", "list", "--json=short", *policy, check=True)
        rows = {x["name"]: x for x in json.loads(r.stdout)}
        assert set(rows) == {*names, "dir", "broken"}
        for n, p in paths.items():
            assert rows[n]["path"] == str(p) and rows[n]["type"] == "raw"
        assert rows["dir"]["type"] == "directory" and "protection" not in rows["dir"]
        want = {"plain": "unprotected", "ver": "verity", "sig": "signed", "sigb": "signed",
                "ddi": "signed", "ddiu": "verity"}
        assert {n: rows[n]["protection"] for n in want} == want
        assert rows["ver"]["root_hash"] and rows["plain"]["root_hash"] is None
        assert rows["broken"]["protection"] is None and rows["broken"]["refused"]
        if policy:
            refused_names = {n for n in names if rows[n]["refused"]}
            assert refused_names == {"plain", "ver", "ddiu"}
            assert "root=signed+absent" in rows["plain"]["refused"]
        else:
            assert not any(rows[n]["refused"] for n in names)
        if up_rows is not None:
            # Upstream's keys, the same values.
            assert sorted(({k: x[k] for k in ("name", "type", "path", "time")}
                           for x in rows.values()), key=lambda x: x["name"]) == \
                sorted(up_rows, key=lambda x: x["name"])
