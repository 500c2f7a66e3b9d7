"""overlayctl sysext|confext commit NAME (issue 13): the local state of a hierarchy (its raw
upper, relative to the layers below) turned into an extension image.

The key check: on a Flatcar-like root (the real /etc is the upper over the image's defaults,
with a confext), a committed image merged read-only over the same defaults, with the real
/etc emptied, shows exactly the /etc that was committed: names, types, modes, owners,
content, symlinks and xattrs, deleted defaults and confext files included. Upstream 262
merges the image too. The upper is never changed by a commit, and what an image cannot
carry is refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlayctl import verity
from tests.conftest import REPO, Root, umount_all_below
from tests.integration.olhelpers import assert_error, overlays_at
from tests.integration.peer import need_peer, run_plan, upstream_peer
from tests.integration.test_defaults import DEFAULTS, Flatcar
from tests.integration.trees import differences, tree
from tests.veritybuild import make_key

pytestmark = pytest.mark.root

RELEASE = "extension-release.d/extension-release.site"
SITE = "var/lib/confexts/site.raw"


@pytest.fixture
def fc(root: Root) -> Iterator[Flatcar]:
    f = Flatcar(root)
    f.write_default("renameme/x.conf", "default x\n")
    f.write_default("renameme/sub/y.conf", "default y\n")
    f.write_default("remade/old.conf", "default old\n")
    yield f
    umount_all_below(str(root.path))


def acl(uid: int) -> bytes:
    """A POSIX access ACL granting user UID read access (the kernel's xattr format)."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, uid), (0x04, 4, 0xFFFFFFFF),
               (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def local_changes(fc: Flatcar) -> None:
    """What a machine does to its /etc on first boot, through the merged overlay."""
    etc = fc.etc
    (etc / "motd").write_text("my motd\n")                       # edit a default
    (etc / "new.conf").write_text("new\n")                       # a new file ...
    os.chmod(etc / "new.conf", 0o600)
    os.chown(etc / "new.conf", 123, 456)                         # ... with its own owner
    os.link(etc / "new.conf", etc / "new.hardlink")
    (etc / "ssh/sshd_config").unlink()                           # delete a default
    (etc / "app.conf").unlink()                                  # delete a confext's file
    os.chmod(etc / "modefile", 0o640)
    os.chown(etc / "ownfile", 1000, 1000)
    os.setxattr(etc / "xattrfile", "user.site", b"yes")
    os.symlink("motd", etc / "motd.link")
    os.mkdir(etc / "newdir")                                     # opaque (redirect_dir=on)
    (etc / "newdir/inside.conf").write_text("inside\n")
    shutil.rmtree(etc / "remade")                                # a default dir removed ...
    os.mkdir(etc / "remade")                                     # ... and made again: opaque
    (etc / "remade/new.conf").write_text("remade\n")
    os.rename(etc / "renameme", etc / "renamed")                 # a redirect
    (etc / "renamed/added.conf").write_text("added to the renamed dir\n")
    (etc / "typefile").unlink()
    os.mkdir(etc / "typefile")                                   # a file became a directory
    os.mkfifo(etc / "fifo")


def merged(fc: Flatcar) -> dict[str, Any]:
    """The merged /etc as a user sees it, without times, without the metadata dir."""
    return tree(str(fc.etc), overlay_xattrs=False)


def empty_etc(fc: Flatcar) -> None:
    """The real /etc emptied (unmerged: nothing is mounted on it)."""
    assert not overlays_at(fc.etc)
    for n in os.listdir(fc.etc):
        p = fc.etc / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def commit(fc: Flatcar, *args: str, cls: str = "confext", check: bool = True) -> Any:
    r = fc.run(cls, "commit", "site", *args, "--json=short", check=check)
    return json.loads(r.stdout) if check else r


@pytest.mark.parametrize("fmt", ["squashfs", "erofs", "directory"])
def test_committed_image_shows_exactly_the_committed_etc(fc: Flatcar, fmt: str) -> None:
    fc.merge("yes")
    local_changes(fc)
    before = merged(fc)
    got = commit(fc, f"--format={fmt}")
    out = "var/lib/confexts/site" + ("" if fmt == "directory" else ".raw")
    assert got["output"] == "/" + out and (fc.root / out).exists()
    assert got["release"] == ["ID=flatcar", "VERSION_ID=4000.0.0"]
    kinds = {e["path"]: (e["type"], e["change"], e["opaque"]) for e in got["entries"]}
    assert kinds["/etc/ssh/sshd_config"] == ("whiteout", "deleted", False)
    assert kinds["/etc/app.conf"] == ("whiteout", "deleted", False)
    assert kinds["/etc/motd"] == ("file", "modified", False)
    assert kinds["/etc/newdir"][2] is True and kinds["/etc/remade"][2] is True
    assert kinds["/etc/renamed"] == ("directory", "renamed", False)
    assert kinds["/etc/renameme"] == ("whiteout", "deleted", False)
    assert kinds["/etc/fifo"][0] == "fifo"
    fc.unmerge()

    empty_etc(fc)
    fc.merge("no")
    after = merged(fc)
    # The one addition: the image's own release file.
    assert after.pop(RELEASE)[4] is not None
    assert differences(before, after) == {}
    # Spelled out, what the comparison covers:
    assert fc.read("motd") == "my motd\n"
    assert not (fc.etc / "ssh/sshd_config").exists()       # the deleted default stays hidden
    assert fc.read("ssh/ssh_config") == "Host *\n"           # its sibling default is there
    assert not (fc.etc / "app.conf").exists()                # so does the confext's file
    assert fc.read("extdef") == "ext extdef\n"
    assert sorted(os.listdir(fc.etc / "remade")) == ["new.conf"]
    assert sorted(os.listdir(fc.etc / "renamed")) == ["added.conf", "sub", "x.conf"]
    assert not (fc.etc / "renameme").exists()
    assert os.stat(fc.etc / "new.conf").st_uid == 123
    assert os.stat(fc.etc / "new.conf").st_ino == os.stat(fc.etc / "new.hardlink").st_ino
    assert os.getxattr(fc.etc / "xattrfile", "user.site") == b"yes"
    assert not fc.root.writable("etc")
    fc.unmerge()


def test_commit_never_changes_the_upper(fc: Flatcar) -> None:
    """Merged or not, the raw upper is the same after a commit, atimes included (files are
    read with O_NOATIME; the file system here is relatime)."""
    fc.merge("yes")
    local_changes(fc)
    fc.unmerge()
    for p in [fc.etc, *fc.etc.rglob("*")]:
        # Reading a file whose atime is older than its mtime updates the atime (relatime).
        st = os.lstat(p)
        os.utime(p, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns), follow_symlinks=False)
    raw_before = tree(str(fc.etc), times=True, skip_meta=False)
    atimes = {p: os.lstat(p).st_atime_ns for p in fc.etc.rglob("*")}
    commit(fc)                                               # unmerged
    assert differences(tree(str(fc.etc), times=True, skip_meta=False), raw_before) == {}
    assert {p: os.lstat(p).st_atime_ns for p in fc.etc.rglob("*")} == atimes
    os.unlink(fc.root / SITE)
    # Merged, through the plain view of the real /etc (the merge itself reads some files,
    # so atimes are not compared here).
    fc.merge("yes")
    commit(fc, "--format=erofs")
    fc.unmerge()
    assert differences(tree(str(fc.etc), times=True, skip_meta=False), raw_before) == {}


def test_upstream_merges_the_committed_image(fc: Flatcar, tmp_path: Path) -> None:
    """262 merges the image on a root without the defaults layer (upstream cannot stack
    one): the committed files are there, whiteouts hide nothing."""
    peer = need_peer(upstream_peer(), "confext")
    fc.merge("yes")
    local_changes(fc)
    commit(fc)
    fc.unmerge()
    up = Root(tmp_path / "upstream")
    (up / "usr/lib/os-release").write_text("ID=flatcar\nVERSION_ID=4000.0.0\n")
    (up / "etc").mkdir()
    shutil.copy(fc.root / SITE, up / SITE)
    res = run_plan(up.path, [["run", "up:confext", "merge", "--no-reload"], ["snap"],
                             ["run", "up:confext", "status", "--json=short"],
                             ["run", "up:confext", "unmerge", "--no-reload"], ["snap"]],
                   peer=peer, namespace=True)
    s = res["steps"]
    assert s[0]["rc"] == 0, s[0]["err"]
    files = s[1]["files"]
    assert files["etc/motd"] == "my motd\n"
    assert files["etc/new.conf"] == "new\n" and files["etc/new.hardlink"] == "new\n"
    assert files["etc/motd.link"] == "link motd"
    assert files["etc/newdir/inside.conf"] == "inside\n"
    assert files["etc/renamed/x.conf"] == "default x\n"
    assert files["etc/renamed/sub/y.conf"] == "default y\n"
    assert files["etc/hosts"] == "host hosts\n" and files["etc/local"] == "host local\n"
    assert files["etc/" + RELEASE] == "ID=flatcar\nVERSION_ID=4000.0.0\n"
    # Without the defaults the whiteouts have nothing to hide, and no whiteout can be opened.
    # (overlayfs still lists the ones in a directory that only the image has, such as
    # /etc/ssh here: docs/defaults.md, "commit".)
    assert not any(v.startswith("chr") for v in files.values()), files
    assert {k: v for k, v in files.items() if k.startswith("etc/ssh/")} == {
        "etc/ssh/": "dir 0755", "etc/ssh/sshd_config": "listed, not found"}
    assert "etc/app.conf" not in files and "etc/renameme" not in files
    assert s[1]["writable"]["etc"] is False
    assert [h["extensions"] for h in json.loads(s[2]["out"])] == [["site"]]
    assert s[3]["rc"] == 0 and not res["left"]
    assert s[4]["files"] == {"etc/": "dir 0755", "usr/": "dir 0755", "usr/lib/": "dir 0755",
                             "usr/lib/os-release": "ID=flatcar\nVERSION_ID=4000.0.0\n",
                             "var/": "dir 0755", "var/lib/": "dir 0755",
                             "var/lib/extensions.mutable/": "dir 0755"}


def test_any_and_sysext(root: Root) -> None:
    """sysext commit: /usr and /opt with separate mutable dirs, into one image with both
    trees and usr/lib/extension-release.d; --any gives ID=_any."""
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/base").write_text("base\n")
    (root / "opt").mkdir()
    root.sysext("app", {"usr/bin/tool": "tool\n"})       # "app" < "site": below it
    root.run("sysext", "merge", "--mutable=yes", check=True)
    (root / "usr/share/base").write_text("edited\n")
    (root / "usr/share/local").write_text("local\n")
    (root / "opt/app").write_text("app\n")
    (root / "usr/bin/tool").unlink()
    before_usr, before_opt = tree(str(root / "usr")), tree(str(root / "opt"))
    got = json.loads(root.run("sysext", "commit", "site", "--any", "--json=short",
                              check=True).stdout)
    assert got["output"] == "/var/lib/extensions/site.raw"
    assert got["release"] == ["ID=_any"] and got["hierarchies"] == ["/usr", "/opt"]
    root.run("sysext", "unmerge", check=True)
    shutil.rmtree(root / "var/lib/extensions.mutable/usr")
    shutil.rmtree(root / "var/lib/extensions.mutable/opt")
    root.run("sysext", "merge", check=True)
    after_usr = tree(str(root / "usr"))
    assert after_usr.pop("lib/extension-release.d/extension-release.site")[4] is not None
    assert differences(before_usr, after_usr) == {}
    assert differences(before_opt, tree(str(root / "opt"))) == {}
    assert not (root / "usr/bin/tool").exists()
    root.run("sysext", "unmerge", check=True)


def test_verity_sidecars_and_signature(fc: Flatcar, tmp_path: Path) -> None:
    key = make_key(tmp_path / "keys", "commit")
    fc.merge("yes")
    local_changes(fc)
    got = commit(fc, "--verity", f"--sign-key={key.key}", f"--certificate={key.cert}")
    fc.unmerge()
    img = fc.root / SITE
    rh = bytes.fromhex((fc.root / "var/lib/confexts/site.roothash").read_text().strip())
    assert got["verity"]["roothash"] == rh.hex() and got["verity"]["signed"] is True
    side = verity.load_sidecars(str(img), environ={})
    assert side.root_hash == rh and side.protection() == "signed"
    assert side.data_path == str(fc.root / "var/lib/confexts/site.verity")
    params = verity.read_superblock(side.data_path)
    verity.check_root_hash(params, rh, side.data_path, str(img))
    assert side.root_hash_sig is not None
    check = verity.verify_signature(rh, side.root_hash_sig, cert_files=[str(key.cert)],
                                    environ={})
    assert check.ok, check.reason
    # The whole tree, by veritysetup itself (userspace, no device-mapper).
    r = subprocess.run(["veritysetup", "verify", str(img), side.data_path, rh.hex()],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # Merged: on a kernel without device-mapper (this one) a verity image is refused, and
    # with its certificate in verity.d the message says the signature is good; without
    # its verity data (SYSTEMD_DISSECT_VERITY_SIDECAR=0, as systemd) it merges as before.
    empty_etc(fc)
    (fc.root / "etc/verity.d").mkdir(parents=True)
    (fc.root / "etc/verity.d/commit.crt").write_bytes(key.cert.read_bytes())
    r = fc.run("confext", "merge", "--mutable=no", f"--defaults={DEFAULTS}")
    assert r.returncode == 1 and "site.raw" in r.stderr and "device-mapper" in r.stderr
    assert "signature is valid" in r.stderr, r.stderr
    assert fc.root.mounts() == []
    fc.root.run("confext", "merge", "--mutable=no", f"--defaults={DEFAULTS}", check=True,
                env={"SYSTEMD_DISSECT_VERITY_SIDECAR": "0"})
    assert fc.read("motd") == "my motd\n" and not (fc.etc / "ssh/sshd_config").exists()
    fc.unmerge()


def test_verity_without_signature(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("x\n")
    got = commit(fc, "--verity", "--format=erofs")
    fc.unmerge()
    assert got["verity"]["signed"] is False
    assert not (fc.root / "var/lib/confexts/site.roothash.p7s").exists()
    side = verity.load_sidecars(str(fc.root / SITE), environ={})
    assert side.protection() == "verity"


def test_dry_run_lists_and_writes_nothing(fc: Flatcar) -> None:
    fc.merge("yes")
    local_changes(fc)
    listing = os.listdir(fc.root / "var/lib/confexts")
    text = fc.run("confext", "commit", "site", "--dry-run", check=True)
    assert "Would commit" in text.stdout
    for needle in ("whiteout", "/etc/ssh/sshd_config", "deleted", "directory (opaque)",
                   "/etc/renamed (from /etc/renameme)", "renamed"):
        assert needle in text.stdout, text.stdout
    got = commit(fc, "--dry-run")
    assert got["dry_run"] is True and got["verity"] is None
    assert {e["path"] for e in got["entries"]} >= {"/etc/motd", "/etc/new.conf"}
    assert os.listdir(fc.root / "var/lib/confexts") == listing
    fc.unmerge()


def test_orphan_whiteouts_are_left_out(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "issue").unlink()
    fc.unmerge()
    shutil.rmtree(fc.defaults / "issue", ignore_errors=True)
    (fc.defaults / "issue").unlink(missing_ok=True)
    got = commit(fc, "--dry-run")
    assert got["skipped"] == [{"path": "/etc/issue",
                               "reason": "orphan whiteout: nothing below to hide"}]
    assert "/etc/issue" not in {e["path"] for e in got["entries"]}


def test_a_confext_ordered_above_is_reported(fc: Flatcar) -> None:
    fc.root.confext("zz-vendor", {"etc/motd": "vendor motd\n", "etc/new.conf": "vendor\n",
                                  "etc/remade/vendor.conf": "a directory merges\n"})
    fc.root.confext("aa-first", {"etc/aa": "aa\n"})
    fc.merge("yes")
    local_changes(fc)
    r = fc.run("confext", "commit", "site", "--dry-run", check=True)
    assert ("confext 'zz-vendor' is ordered above 'site' and hides /etc/motd, /etc/new.conf "
            "of it") in r.stderr, r.stderr
    assert "'site' is ordered above 'aa-first', 'app' and below 'zz-vendor'" in r.stderr
    got = commit(fc, "--dry-run")
    assert got["order"] == {"below": ["aa-first", "app"], "above": ["zz-vendor"]}
    assert {h["path"] for h in got["hidden"]} == {"/etc/motd", "/etc/new.conf"}
    fc.unmerge()


# ---------------------------------------------------------------------------------------------
# Consistency: a change while the copy is made


def _start(fc: Flatcar, pause: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env["OVERLAYCTL_FAULT_PAUSE"] = f"commit-copied={pause}"
    return subprocess.Popen([sys.executable, "-m", "overlayctl", f"--root={fc.root.path}",
                             "confext", "commit", "site", *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(p: Path, proc: subprocess.Popen[str]) -> bool:
    for _ in range(1000):
        if p.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"{p} never appeared")


def test_a_change_during_the_copy_is_copied_again(fc: Flatcar, tmp_path: Path) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("first\n")
    pause = tmp_path / "pause"
    proc = _start(fc, pause)
    assert _wait_for(pause, proc)
    (fc.etc / "motd").write_text("second\n")          # between the copy and the check
    pause.unlink()
    assert _wait_for(pause, proc)                      # copied again
    pause.unlink()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "changed while it was being committed: copying again" in err
    fc.unmerge()
    empty_etc(fc)
    fc.merge("no")
    assert fc.read("motd") == "second\n"
    fc.unmerge()


def test_a_killed_commit_leaves_no_image_and_the_next_one_cleans_up(fc: Flatcar) -> None:
    """Killed between the copy and its check (OVERLAYCTL_FAULT=commit-copied): no image, the
    upper untouched, a hidden build directory left that the next commit removes."""
    fc.merge("yes")
    local_changes(fc)
    fc.unmerge()
    before = tree(str(fc.etc), times=True, skip_meta=False)
    r = fc.root.run("confext", "commit", "site", env={"OVERLAYCTL_FAULT": "commit-copied"})
    assert r.returncode == -9
    left = [n for n in os.listdir(fc.root / "var/lib/confexts") if n != "app"]
    assert len(left) == 1 and left[0].startswith(".#site.commit-"), left
    assert differences(tree(str(fc.etc), times=True, skip_meta=False), before) == {}
    commit(fc)
    assert sorted(os.listdir(fc.root / "var/lib/confexts")) == ["app", "site.raw"]
    fc.merge("no")
    assert fc.read("motd") == "my motd\n"
    fc.unmerge()


def test_an_upper_that_keeps_changing_is_refused(fc: Flatcar, tmp_path: Path) -> None:
    fc.merge("yes")
    pause = tmp_path / "pause"
    proc = _start(fc, pause)
    for i in range(3):
        assert _wait_for(pause, proc)
        (fc.etc / f"churn{i}").write_text("x\n")
        pause.unlink()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "the upper kept changing while it was being committed" in err.splitlines()[-1]
    assert not (fc.root / SITE).exists()
    assert [n for n in os.listdir(fc.root / "var/lib/confexts") if n != "app"] == []
    fc.unmerge()


# ---------------------------------------------------------------------------------------------
# Refusals: one line, nothing written


def _nothing_written(fc: Flatcar) -> None:
    assert sorted(os.listdir(fc.root / "var/lib/confexts")) == ["app"]


def test_a_file_open_for_writing_is_refused(fc: Flatcar) -> None:
    fc.merge("yes")
    with open(fc.etc / "motd", "a") as f:
        f.write("being written\n")
        f.flush()
        holder = subprocess.Popen(["sleep", "30"], pass_fds=(f.fileno(),))
        try:
            r = commit(fc, check=False)
        finally:
            holder.kill()
            holder.wait()
    line = assert_error(r, "cannot commit /etc/motd: it is open for writing by")
    assert "sleep" in line or str(os.getpid()) in line
    _nothing_written(fc)
    fc.unmerge()


def test_a_socket_is_refused(fc: Flatcar) -> None:
    fc.merge("yes")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(fc.etc / "control.sock"))
    s.close()
    r = commit(fc, check=False)
    assert_error(r, "cannot commit /etc/control.sock: it is a socket")
    _nothing_written(fc)
    fc.unmerge()


def test_posix_acls_need_erofs_or_a_directory(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "secret.conf").write_text("s\n")
    os.setxattr(fc.etc / "secret.conf", "system.posix_acl_access", acl(1000))
    r = commit(fc, check=False)
    assert_error(r, "cannot commit /etc/secret.conf as squashfs: squashfs cannot carry POSIX "
                 "ACLs", "--format=erofs")
    _nothing_written(fc)
    commit(fc, "--format=erofs")
    fc.unmerge()
    empty_etc(fc)
    fc.merge("no")
    assert os.getxattr(fc.etc / "secret.conf", "system.posix_acl_access") == acl(1000)
    fc.unmerge()


@pytest.mark.parametrize("args, needles", [
    (["--format=zip"], ["--format=zip: unknown format"]),
    (["--format=directory", "--verity"], ["--verity needs an image"]),
    (["--sign-key=/nonexistent"], ["--sign-key and --certificate go together"]),
    (["--output=relative.raw"], ["not an absolute path"]),
    (["--output=/etc/site.raw"], ["lies inside /etc, which it captures"]),
])
def test_bad_options(fc: Flatcar, args: list[str], needles: list[str]) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("x\n")
    r = commit(fc, *args, check=False)
    assert_error(r, *needles)
    _nothing_written(fc)
    fc.unmerge()


def test_names_and_classes(fc: Flatcar) -> None:
    fc.merge("yes")
    assert_error(fc.run("commit", "site"), "commit needs the class")
    assert_error(fc.run("confext", "commit"), "commit takes exactly one NAME")
    assert_error(fc.run("confext", "commit", "a/b"), "not a valid extension name")
    assert_error(fc.run("confext", "commit", "site.raw"), "not a valid extension name")
    # The name of an extension below the upper: it would be replaced and lost.
    assert_error(fc.run("confext", "commit", "app"),
                 "'app' is one of the layers below the upper of /etc", "app-2")
    # A name taken by an extension that is not merged.
    fc.root.confext("other", {"etc/o": "o\n"}, release="ID=nomatch\n")
    assert_error(fc.run("confext", "commit", "other"),
                 "an extension named 'other' exists already: /var/lib/confexts/other")
    # Commit-only options elsewhere are refused, never ignored.
    assert_error(fc.run("confext", "merge", "--verity"), "go with commit only")
    assert_error(fc.run("diff", "--sign-key=k"), "go with commit only")
    fc.unmerge()
    commit(fc)
    assert_error(fc.run("confext", "commit", "site"), "/var/lib/confexts/site.raw exists already")


def test_stale_sidecars_are_refused(fc: Flatcar) -> None:
    (fc.root / "var/lib/confexts/site.roothash").write_text("00" * 32 + "\n")
    fc.merge("yes")
    assert_error(commit(fc, check=False), "/var/lib/confexts/site.roothash exists already")
    fc.unmerge()


def test_nothing_to_commit_without_an_upper(root: Root) -> None:
    root.confext("app", {"etc/app.conf": "x\n"})
    (root / "etc").mkdir()
    assert_error(root.run("confext", "commit", "site"),
                 "no hierarchy of confext has an upper layer to commit")
    root.run("confext", "merge", check=True)       # read-only: still no upper
    assert_error(root.run("confext", "commit", "site"),
                 "no hierarchy of confext has an upper layer to commit")
    root.run("confext", "unmerge", check=True)


def test_ephemeral_upper_is_committed_while_merged(fc: Flatcar) -> None:
    fc.merge("ephemeral")
    (fc.etc / "motd").write_text("ephemeral motd\n")
    (fc.etc / "ssh/sshd_config").unlink()
    before = merged(fc)
    commit(fc)
    fc.unmerge()
    # Merged over the same layers (the real /etc is a lower in ephemeral mode).
    fc.merge("no")
    after = merged(fc)
    after.pop(RELEASE)
    assert differences(before, after) == {}
    fc.unmerge()


def test_directory_format_is_a_plain_tree(fc: Flatcar) -> None:
    fc.merge("yes")
    local_changes(fc)
    commit(fc, "--format=directory")
    fc.unmerge()
    d = fc.root / "var/lib/confexts/site/etc"
    st = os.lstat(d / "ssh/sshd_config")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(d / "newdir", "trusted.overlay.opaque") == b"y"
    assert not any(n.startswith("trusted.overlay.") and n != "trusted.overlay.opaque"
                   for p in d.rglob("*") for n in os.listxattr(p, follow_symlinks=False))
    assert stat.S_ISFIFO(os.lstat(d / "fifo").st_mode)
    assert (d / RELEASE).read_text() == "ID=flatcar\nVERSION_ID=4000.0.0\n"
    assert os.stat(fc.root / "var/lib/confexts/site").st_mode & 0o777 == 0o755
