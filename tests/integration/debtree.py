"""A real Debian system for the tests that run dpkg and apt on a /usr that overlayctl merges
(issue 10): each test gets a fresh copy of the trixie minbase tree that tools/debian-tree.sh
builds once into $OVERLAYCTL_DEBTREE_DIR (default /var/cache/overlayctl/debian-trixie), through
the `debian_tree` fixture in tests/conftest.py. The copy is a --root for overlayctl (DebTree is
a Root, with Debian's own os-release: ID=debian, VERSION_ID=13), and DebTree.chroot() runs a
command inside it in a private mount namespace of its own (/proc and /dev mounted there), so
it sees what overlayctl merged and leaves no mount behind.

Without the tree the fixture skips the test, or fails it when $OVERLAYCTL_REQUIRE_DEBTREE=1 (as
.ci/run sets it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import Root, absent

DEFAULT_DIR = Path("/var/cache/overlayctl/debian-trixie")
REQUIRE_DEBTREE = "OVERLAYCTL_REQUIRE_DEBTREE"
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME": "/root", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
# Runs in a new private mount namespace: every mount here dies with the command.
CHROOT_SCRIPT = ('R=$1; shift; mount -t proc proc "$R/proc" && mount --rbind /dev "$R/dev" && '
                 'exec chroot "$R" "$@"')


def debtree_dir() -> Path:
    return Path(os.environ.get("OVERLAYCTL_DEBTREE_DIR") or DEFAULT_DIR)


class DebTree(Root):
    """A copy of the cached tree at PATH; DEBS is the cache's directory of .deb files."""

    def __init__(self, path: Path, debs: Path, copy_seconds: float) -> None:
        self.path = path
        self.debs = debs
        self.copy_seconds = copy_seconds
        for d in ("var/lib/extensions", "var/lib/extensions.mutable", "var/lib/confexts"):
            (path / d).mkdir(parents=True, exist_ok=True)

    def deb(self, package: str) -> Path:
        """The cached .deb of PACKAGE (tools/debian-tree.sh's $DEBS)."""
        for line in (self.debs / "INDEX").read_text().splitlines():
            name, _version, file = line.split()
            if name == package:
                return self.debs / file
        raise KeyError(f"{package} is not in {self.debs}/INDEX (add it to tools/debian-tree.sh)")

    def put_deb(self, package: str) -> str:
        """Copy PACKAGE's .deb into the tree's /var/cache/apt/archives; its path in the chroot."""
        src = self.deb(package)
        dest = self / "var/cache/apt/archives" / src.name
        shutil.copyfile(src, dest)
        return "/" + str(dest.relative_to(self.path))

    def chroot(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ARGV chrooted into the tree (root, a clean environment), in a private mount
        namespace with /proc and /dev mounted; CHECK: assert that it succeeded."""
        p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", CHROOT_SCRIPT,
                            "debtree-chroot", str(self.path), *argv],
                           capture_output=True, text=True, env=CHROOT_ENV)
        if check:
            assert p.returncode == 0, f"{argv}: rc {p.returncode}: {p.stderr}"
        return p


def copy_tree(dest: Path) -> DebTree:
    """A fresh copy of the cached tree at DEST (skip or fail the test when there is none)."""
    src = debtree_dir()
    if not (src / ".complete").exists():
        absent(f"no Debian tree in {src}", REQUIRE_DEBTREE, "run tools/debian-tree.sh")
    t0 = time.monotonic()
    subprocess.run(["cp", "-a", "--reflink=auto", str(src / "root"), str(dest)], check=True)
    return DebTree(dest, src / "debs", time.monotonic() - t0)
