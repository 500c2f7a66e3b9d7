"""The Debian tree fixture works: the real dpkg installs and verifies a package in a fresh copy
(tests/integration/debtree.py), and the cache it was copied from stays as it was."""

from __future__ import annotations

import pytest

from tests.conftest import mounts_below
from tests.integration.debtree import DebTree, debtree_dir

pytestmark = pytest.mark.root


def test_dpkg_installs_and_verifies_hello(debian_tree: DebTree) -> None:
    t = debian_tree
    assert not (t / "usr/bin/hello").exists()
    assert "ID=debian" in (t / "usr/lib/os-release").read_text().split()
    deb = t.put_deb("hello")
    r = t.chroot("dpkg", "-i", deb, check=True)
    assert "Setting up hello" in r.stdout
    assert t.chroot("dpkg-query", "-W", "-f", "${Status}", "hello").stdout == \
        "install ok installed"
    assert t.chroot("hello", check=True).stdout == "Hello, world!\n"
    assert (t / "usr/share/doc/hello/copyright").is_file()
    r = t.chroot("dpkg", "--verify", "hello")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    # --verify sees a changed file, so the empty report above means something (dpkg 1.22
    # exits 0 either way: the report is what counts).
    with open(t / "usr/bin/hello", "ab") as f:
        f.write(b"\0")
    r = t.chroot("dpkg", "--verify", "hello")
    assert r.stdout.split() == ["??5??????", "/usr/bin/hello"], r
    assert not mounts_below(str(t.path))
    assert not (debtree_dir() / "root/usr/bin/hello").exists()
    assert not (debtree_dir() / "root" / deb.lstrip("/")).exists()
