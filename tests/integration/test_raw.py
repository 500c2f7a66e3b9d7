"""Raw extension images: squashfs, erofs and GPT disk images merge like directories; bad
images are refused with one clear line and leave no loop device or mount behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Root

# mksquashfs, mkfs.erofs and sfdisk come from tools/setup.sh; a missing tool fails the test.
pytestmark = pytest.mark.root

USR_TYPE = "8484680C-9521-48C6-9C11-B0720656F69E"


def tree(tmp: Path, name: str, files: dict[str, str], cls: str = "sysext") -> Path:
    t = tmp / f"src-{name}"
    rel = "usr/lib/extension-release.d" if cls == "sysext" else "etc/extension-release.d"
    (t / rel).mkdir(parents=True)
    (t / rel / f"extension-release.{name}").write_text("ID=_any\n")
    for p, text in files.items():
        (t / p).parent.mkdir(parents=True, exist_ok=True)
        (t / p).write_text(text)
    return t


def squashfs(src: Path, out: Path) -> Path:
    subprocess.run(["mksquashfs", str(src), str(out), "-quiet", "-noappend"], check=True,
                   capture_output=True)
    return out


def erofs(src: Path, out: Path) -> Path:
    subprocess.run(["mkfs.erofs", "--quiet", str(out), str(src)], check=True,
                   capture_output=True)
    return out


def gpt(src_usr: Path, out: Path, tmp: Path, part_type: str = USR_TYPE) -> Path:
    fs = squashfs(src_usr, tmp / (out.name + ".fs"))
    sectors = fs.stat().st_size // 512 + 8
    with open(out, "wb") as f:
        f.truncate((2048 + sectors + 64) * 512)
    subprocess.run(["sfdisk", "-q", str(out)], input=f"label: gpt\nstart=2048, size={sectors}, "
                   f"type={part_type}\n", text=True, check=True, capture_output=True)
    with open(out, "r+b") as f, open(fs, "rb") as g:
        f.seek(2048 * 512)
        f.write(g.read())
    return out


def loops_for(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_squashfs_erofs_gpt_merge_like_directories(root: Root, tmp_path: Path) -> None:
    ext = root / "var/lib/extensions"
    sq = squashfs(tree(tmp_path, "sq", {"opt/sq/file": "squash\n", "usr/share/a": "sq\n"}),
                  ext / "sq.raw")
    er = erofs(tree(tmp_path, "er", {"opt/er/file": "erofs\n", "usr/share/a": "er\n"}),
               ext / "er.sysext.raw")
    gsrc = tree(tmp_path, "gp", {"usr/share/gpt/file": "gpt\n"})
    gp = gpt(gsrc / "usr", ext / "gp.raw", tmp_path)   # a /usr partition holds usr's content
    listed = json.loads(root.run("sysext", "list", "--json=short", check=True).stdout)
    assert {(r["name"], r["type"]) for r in listed} >= {("sq", "raw"), ("er", "raw"),
                                                        ("gp", "raw")}
    root.run("sysext", "merge", check=True)
    try:
        assert (root / "opt/sq/file").read_text() == "squash\n"
        assert (root / "opt/er/file").read_text() == "erofs\n"
        assert (root / "usr/share/gpt/file").read_text() == "gpt\n"
        assert (root / "usr/share/a").read_text() == "sq\n"   # 'sq' sorts after 'er': it wins
        status = json.loads(root.run("status", "--json=short", check=True).stdout)
        usr = next(r for r in status if r["hierarchy"] == "/usr")
        assert usr["extensions"] == ["er", "gp", "sq"]
        for img in (sq, er, gp):
            assert len(loops_for(img)) == 1
    finally:
        root.run("sysext", "unmerge", check=True)
    assert not (root / "opt/sq").exists()
    for img in (sq, er, gp):
        assert loops_for(img) == []        # auto-clear: gone with the overlay


def test_confext_image_and_mutable_mode(root: Root, tmp_path: Path) -> None:
    (root / "etc").mkdir()
    squashfs(tree(tmp_path, "cf", {"etc/cf.conf": "conf\n"}, cls="confext"),
             root / "var/lib/confexts/cf.confext.raw")
    root.run("confext", "merge", "--mutable=ephemeral", check=True)
    try:
        assert (root / "etc/cf.conf").read_text() == "conf\n"
        (root / "etc/new").write_text("x")
    finally:
        root.run("confext", "unmerge", check=True)
    assert not (root / "etc/new").exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "tiny", "gpt-without-usr"])
def test_bad_images_are_refused_cleanly(root: Root, tmp_path: Path, kind: str) -> None:
    ext = root / "var/lib/extensions"
    root.sysext("good", {"opt/good": "g"})
    bad = ext / "bad.raw"
    if kind == "garbage":
        bad.write_bytes(bytes(range(256)) * 64)
    elif kind == "tiny":
        bad.write_bytes(b"hsqs")
    elif kind == "truncated":
        src = tree(tmp_path, "bad", {})
        (src / "usr/share").mkdir(parents=True)
        (src / "usr/share/big").write_bytes(os.urandom(300000))   # does not compress
        full = squashfs(src, tmp_path / "full.raw")
        bad.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    else:
        gpt(tree(tmp_path, "bad", {"usr/share/x": "x"}) / "usr", bad, tmp_path,
            part_type="0FC63DAF-8483-4772-8E79-3D69D8477DE4")   # a plain Linux data partition
    r = root.run("sysext", "merge")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("overlayctl:") and "bad.raw" in last
    assert root.mounts() == []            # nothing merged, nothing half-merged
    assert not (root / "opt/good").exists()
    assert loops_for(bad) == []
