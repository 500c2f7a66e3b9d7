"""The local-change verbs where they used to go wrong (issue 9's holes 3 to 7): cleanup and
reset never lose a write; which, pin and reset never leave the upper through a symlink; a
never-merged root works from its configuration; renamed directories and orphan whiteouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Root
from tests.integration.olhelpers import assert_error
from tests.integration.test_defaults import DEFAULTS, Flatcar

pytestmark = pytest.mark.root


@pytest.fixture
def fc(root: Root) -> Flatcar:
    f = Flatcar(root)
    f.write_default("rpc", "default rpc\n")
    return f


def identical_copy(fc: Flatcar, rel: str) -> None:
    """An untouched copy of a default in the real /etc (as a copy-up leaves it)."""
    src = fc.defaults / rel
    dst = fc.etc / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    os.chmod(dst, src.stat().st_mode & 0o7777)


def holder(path: Path, mode: str = "a") -> subprocess.Popen[str]:
    """A process that holds PATH open (append) and writes a line whenever told to."""
    code = ("import sys\n"
            f"f = open({str(path)!r}, {mode!r})\n"
            "print('open', flush=True)\n"
            "for line in sys.stdin:\n"
            "    f.write(line); f.flush()\n"
            "    print('wrote', flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "open\n"
    return p


def tell(p: subprocess.Popen[str], line: str) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(line)
    p.stdin.flush()
    assert p.stdout.readline() == "wrote\n"


def test_cleanup_keeps_a_copy_open_for_writing(fc: Flatcar) -> None:
    """Hole 3: /etc/rpc is an identical copy held open for append; cleanup keeps it and
    says who holds it; the write made after cleanup is in /etc and on disk."""
    identical_copy(fc, "rpc")
    identical_copy(fc, "issue")
    fc.merge()
    p = holder(fc.etc / "rpc")
    try:
        rows = fc.verb("cleanup")
        by = {r["path"]: r for r in rows}
        assert by["/etc/rpc"]["action"] == "kept" and str(p.pid) in by["/etc/rpc"]["detail"]
        assert by["/etc/issue"]["action"] == "removed"
        tell(p, "written after cleanup\n")
        assert fc.read("rpc") == "default rpc\nwritten after cleanup\n"
    finally:
        p.stdin.close()  # type: ignore[union-attr]
        p.wait()
    fc.unmerge()
    assert (fc.etc / "rpc").read_text() == "default rpc\nwritten after cleanup\n"
    assert not (fc.etc / "issue").exists()


def test_cleanup_keeps_a_directory_that_is_a_working_directory(fc: Flatcar) -> None:
    """A directory that is some process's cwd is not removed (the process would get ENOENT)."""
    fc.write_default("empty.d/.keep", "")
    (fc.etc / "empty.d").mkdir()
    os.chmod(fc.etc / "empty.d", (fc.defaults / "empty.d").stat().st_mode & 0o7777)
    fc.merge()
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         cwd=fc.etc / "empty.d", stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)
        by = {r["path"]: r for r in fc.verb("cleanup")}
        assert by["/etc/empty.d"]["action"] == "kept", by
        assert str(p.pid) in by["/etc/empty.d"]["detail"]
    finally:
        p.communicate("")
    assert {r["path"]: r["action"] for r in fc.verb("cleanup")}["/etc/empty.d"] == "removed"
    fc.unmerge()


@pytest.mark.parametrize("looked_up", [True, False])
def test_a_write_opened_during_cleanup_is_not_lost(fc: Flatcar, tmp_path: Path,
                                                   looked_up: bool) -> None:
    """The race the /proc scan leaves: a process opens /etc/rpc for writing after the scan,
    while the copy is being removed. If the old overlay knew the file already (LOOKED_UP),
    the open reaches the copy being removed: the read lease makes it wait, cleanup sees that
    and puts the copy back. If not, the old overlay copies the default up afresh. Either way
    the write lands in /etc/rpc."""
    identical_copy(fc, "rpc")
    fc.merge()
    if looked_up:
        assert fc.read("rpc") == "default rpc\n"
    pause = tmp_path / "paused"
    env = {**os.environ, "OVERLAYCTL_FAULT_PAUSE": f"removed@/etc={pause}"}
    c = subprocess.Popen([sys.executable, "-m", "overlayctl", f"--root={fc.root.path}",
                          "cleanup", "--json=short"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[2]))
    for _ in range(500):
        if pause.exists():
            break
        time.sleep(0.01)
    assert pause.exists(), "cleanup never reached the pause"
    done: list[str] = []

    def write() -> None:
        with open(fc.etc / "rpc", "a") as f:    # waits for the lease
            f.write("written during cleanup\n")
        done.append("yes")

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.3)
    if looked_up:
        assert not done, "the open did not wait for the lease"
    pause.unlink()
    out, err = c.communicate(timeout=60)
    t.join(timeout=60)
    assert c.returncode == 0, err
    assert done == ["yes"]
    by = {r["path"]: r for r in json.loads(out)}
    if looked_up:
        assert by["/etc/rpc"]["action"] == "kept", by
    assert "written during cleanup" in fc.read("rpc")
    fc.unmerge()
    assert "written during cleanup" in (fc.etc / "rpc").read_text()


def test_reset_keeps_a_copy_open_for_writing(fc: Flatcar) -> None:
    fc.merge()
    (fc.etc / "motd").write_text("mine\n")
    p = holder(fc.etc / "motd")
    try:
        by = {r["path"]: r for r in fc.verb("reset", "/etc/motd")}
        assert by["/etc/motd"]["action"] == "kept"
        tell(p, "more\n")
        assert fc.read("motd") == "mine\nmore\n"
    finally:
        p.stdin.close()  # type: ignore[union-attr]
        p.wait()
    by = {r["path"]: r for r in fc.verb("reset", "/etc/motd")}
    assert by["/etc/motd"]["action"] == "reset"
    assert fc.read("motd") == "default motd\n"
    fc.unmerge()


@pytest.mark.parametrize("merged", [True, False])
def test_symlinks_out_of_the_upper_are_not_followed(fc: Flatcar, tmp_path: Path,
                                                    merged: bool) -> None:
    """Hole 4: /etc/trap -> a directory outside the root, in the upper. which, pin and reset
    of a path below it are refused; nothing outside the root is read or written."""
    host = tmp_path / "hostdir"
    host.mkdir()
    (host / "hostonly").write_text("host secret\n")
    (fc.etc / "trap").symlink_to(str(host))
    if merged:
        fc.merge()
    else:
        fc.merge()
        fc.unmerge()
    for verb in (["which", "/etc/trap/hostonly"], ["pin", "/etc/trap/hostonly"],
                 ["reset", "/etc/trap/hostonly"]):
        r = fc.run(*verb)
        assert_error(r, "/etc/trap")
        assert "upper" not in r.stdout
    assert sorted(os.listdir(host)) == ["hostonly"]
    assert (host / "hostonly").read_text() == "host secret\n"
    if merged:
        fc.unmerge()


def test_cleanup_and_diff_on_a_never_merged_root(root: Root) -> None:
    """Hole 5: a fresh machine, [Defaults] configured, identical copies in /etc, never
    merged: diff shows them, cleanup --dry-run would remove them, cleanup removes them."""
    fc = Flatcar(root, confext=False)
    cfg = root / "etc/overlayctl/confext.conf"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"[Defaults]\n/etc={DEFAULTS}\n")
    identical_copy(fc, "issue")
    identical_copy(fc, "ssh/sshd_config")
    assert not (root / "var/lib/overlayctl").exists()
    ch = fc.changes()
    assert ch["/etc/issue"] == "identical" and ch["/etc/ssh/sshd_config"] == "identical"
    assert ch["/etc/local"] == "added"
    dry = {r["path"]: r["action"] for r in fc.verb("cleanup", "--dry-run")}
    assert dry["/etc/issue"] == "removed" and dry["/etc/ssh/sshd_config"] == "removed"
    assert (fc.etc / "issue").exists()
    fc.verb("cleanup")
    assert not (fc.etc / "issue").exists() and not (fc.etc / "ssh/sshd_config").exists()
    assert (fc.etc / "local").read_text() == "host local\n"
    assert root.mounts() == []


def test_renamed_default_directory(fc: Flatcar) -> None:
    """Hole 6: mv /etc/ssh /etc/ssh.bak while merged (overlayfs records a redirect): diff
    calls it renamed, which finds its files in the defaults, reset of /etc/ssh alone is
    refused with a hint, and resetting both restores the original name."""
    fc.merge()
    os.rename(fc.etc / "ssh", fc.etc / "ssh.bak")
    assert fc.read("ssh.bak/sshd_config") == "PermitRootLogin no\n"
    d = fc.diff()
    assert d["/etc/ssh.bak"]["change"] == "renamed" and d["/etc/ssh.bak"]["from"] == "/etc/ssh"
    assert d["/etc/ssh"]["change"] == "deleted"
    w = fc.which("/etc/ssh.bak/sshd_config")
    assert w["layer"] == "defaults" and w["source"] == f"{DEFAULTS}/ssh/sshd_config"
    r = fc.run("reset", "/etc/ssh")
    assert_error(r, "renamed", "/etc/ssh.bak")
    assert fc.read("ssh.bak/sshd_config") == "PermitRootLogin no\n"
    r = fc.run("reset", "/etc/ssh.bak")
    assert_error(r, "/etc/ssh.bak")
    fc.verb("reset", "/etc/ssh", "/etc/ssh.bak")
    assert fc.read("ssh/sshd_config") == "PermitRootLogin no\n"
    assert not (fc.etc / "ssh.bak").exists()
    assert sorted(os.listdir(fc.etc / "ssh")) == ["ssh_config", "sshd_config"]
    fc.unmerge()


def test_orphan_whiteouts(fc: Flatcar) -> None:
    """Hole 7: a whiteout with nothing below it: diff says so, which does not suggest
    reset, cleanup removes it."""
    os.mknod(fc.etc / "ghost", 0o600 | 0o020000, os.makedev(0, 0))
    os.mknod(fc.etc / "motd", 0o600 | 0o020000, os.makedev(0, 0))   # hides a default
    fc.merge()
    ch = fc.changes()
    assert ch["/etc/ghost"] == "orphan-whiteout" and ch["/etc/motd"] == "deleted"
    r = fc.run("which", "/etc/ghost")
    assert_error(r, "orphan whiteout")
    assert "reset" not in r.stderr
    by = {r["path"]: r["action"] for r in fc.verb("cleanup")}
    assert by["/etc/ghost"] == "removed" and "/etc/motd" not in by
    fc.unmerge()
    assert not os.path.lexists(fc.etc / "ghost") and os.path.lexists(fc.etc / "motd")


def test_reset_and_cleanup_print_no_merge_messages(fc: Flatcar) -> None:
    """Hole 12: a rebuild after reset or cleanup says nothing about merging."""
    identical_copy(fc, "issue")
    fc.merge()
    (fc.etc / "motd").write_text("mine\n")
    for verb in (["reset", "/etc/motd"], ["cleanup"]):
        r = fc.run(*verb, check=True)
        assert "Merged extensions" not in r.stderr and "proceeding" not in r.stderr, r.stderr
        assert "Using extensions" not in r.stderr, r.stderr
    fc.unmerge()
