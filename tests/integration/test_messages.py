"""What overlayctl says, where it used to say the wrong thing (issue 9's holes 9, 10, 12): a
broken pipe, a host without ID=, internal paths, the unmerge summary, --help, --root=FILE,
errors without a hint, and the ephemeral UPPER column."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Root
from tests.integration.olhelpers import assert_error

pytestmark = pytest.mark.root


def run_closed_stdout(root: Root, *args: str) -> tuple[int, str]:
    """Run overlayctl with a stdout pipe whose reader is gone before it writes."""
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "overlayctl", f"--root={root.path}", *args],
                         stdout=w, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    os.close(w)
    os.close(r)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def test_broken_pipe_is_silent_and_dies_of_sigpipe(root: Root) -> None:
    """Hole 9: `overlayctl list | head -0`: no message, and the exit status of a process
    killed by SIGPIPE (what the shell shows as 141)."""
    for i in range(3):
        root.sysext(f"e{i}", {f"opt/f{i}": "x"})
    for verb in (["list"], ["status"], ["list", "--json=pretty"]):
        rc, err = run_closed_stdout(root, *verb)
        assert err == "", (verb, err)
        assert rc == -13, (verb, rc)
    out = subprocess.run(f"{sys.executable} -m overlayctl --root={root.path} list | head -0; "
                         "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                         capture_output=True, text=True, cwd=str(REPO))
    assert out.stdout.strip() in ("141", "0") and out.stderr == "", out


@pytest.mark.parametrize("mode", ["no", "ephemeral"])
def test_host_without_id_is_refused_without_images(root: Root, mode: str) -> None:
    """Hole 10: the host's ID= is checked even when there is no image."""
    (root / "usr/lib/os-release").write_text("NAME=nothing\n")
    (root / "opt").mkdir()
    r = root.run("sysext", "merge", f"--mutable={mode}")
    assert_error(r, "ID=", str(root.path), only_line=False)
    assert root.mounts() == []


def test_no_os_release_at_all(root: Root) -> None:
    (root / "usr/lib/os-release").unlink()
    root.sysext("e", {"opt/f": "x"})
    r = root.run("sysext", "merge")
    line = assert_error(r, "os-release", only_line=False)
    assert "has no ID" not in line


def test_root_that_is_a_file(root: Root, tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("")
    for verb in (["status"], ["merge"], ["diff"]):
        r = root.run(f"--root={f}", *verb, root_arg=False)
        line = assert_error(r, str(f))
        assert "not a directory" in line and "no such" not in line


def test_help_does_not_say_raw_images_are_unsupported(root: Root) -> None:
    r = root.run("--help", check=True)
    assert "not merged yet" not in r.stdout and "Accepted for compatibility" not in r.stdout


def test_unmerge_summary_comes_last_and_only_when_true(root: Root) -> None:
    """Hole 12: with only /etc merged, `unmerge` of both classes says it unmerged /etc and
    does not claim first that nothing was merged."""
    (root / "etc").mkdir()
    root.confext("c", {"etc/c.conf": "c"})
    root.run("confext", "merge", check=True)
    r = root.run("unmerge", check=True)
    assert f"Unmerged '{root / 'etc'}'." in r.stderr
    assert "No merged" not in r.stderr, r.stderr
    r = root.run("unmerge", check=True)
    assert r.stderr.strip().splitlines()[-1].startswith("No merged hierarchies"), r.stderr


def test_reset_error_names_no_internal_path(root: Root) -> None:
    (root / "etc").mkdir()
    root.confext("c", {"etc/c.conf": "c"})
    (root / "var/lib/extensions.mutable/etc").symlink_to("../../../etc")
    root.run("confext", "merge", "--mutable=yes", check=True)
    try:
        r = root.run("reset", "/etc")
        line = assert_error(r, "/etc")
        assert "/proc/self/fd" not in line, line
    finally:
        root.run("confext", "unmerge", check=True)


def test_no_space_error_has_a_hint(root: Root) -> None:
    """An OSError from the kernel (here ENOSPC: a tmpfs with no inode left) comes with the
    (hint: …) every other error has."""
    mut = root / "var/lib/extensions.mutable"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nr_inodes=2,size=64k", "tmpfs", str(mut)],
                   check=True)
    try:
        (root / "opt").mkdir()
        root.sysext("e", {"opt/f": "x"})
        r = root.run("sysext", "merge", "--mutable=yes")
        line = assert_error(r, only_line=False)
        assert "(hint: " in line, line
        assert root.mounts() == [str(mut)]
    finally:
        subprocess.run(["umount", str(mut)], check=True)


def test_ephemeral_upper_column_matches_the_docs(root: Root) -> None:
    """status shows an ephemeral merge's upper as the read-only view of its tmpfs upper, as
    docs/overlayctl.md says (and JSON gives the same path)."""
    (root / "opt").mkdir()
    root.sysext("e", {"opt/f": "x"})
    root.run("sysext", "merge", "--mutable=ephemeral", check=True)
    try:
        table = root.run("sysext", "status", check=True).stdout
        row = next(line for line in table.splitlines() if line.startswith("/opt"))
        assert "/opt/.systemd-sysext/ephemeral/upper" in row, row
        doc = (REPO / "docs/overlayctl.md").read_text()
        assert ".systemd-sysext/ephemeral/upper" in doc
    finally:
        root.run("sysext", "unmerge", check=True)
