"""Shared fixtures. Integration tests (marked 'root') mount real overlays; they run only as
root inside a private mount namespace (./run-tests.sh provides one), and only ever below a
temporary --root directory. Every mount a test leaves below its root fails the test."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from tests.integration.debtree import DebTree

REPO = Path(__file__).resolve().parent.parent


def absent(what: str, require_env: str, hint: str) -> NoReturn:
    """Skip the running test because WHAT is not on this machine, or fail it when
    $REQUIRE_ENV is 1 (CI sets it: there a skipped test would check nothing)."""
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{what}, and {require_env}=1 requires it ({hint})", pytrace=False)
    pytest.skip(f"{what} ({hint})")


def _private_namespace() -> bool:
    try:
        # ./run-tests.sh execs pytest under unshare(1): the parent is still in the old one.
        return os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        return False


CAN_MOUNT = os.geteuid() == 0 and _private_namespace()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CAN_MOUNT:
        return
    skip = pytest.mark.skip(reason="needs root in a private mount namespace: use ./run-tests.sh")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def mounts_below(path: str) -> list[str]:
    """Mount points at or below PATH (overlayctl's own mountinfo parser: the one there is)."""
    from overlayctl import mountinfo
    prefix = path.rstrip("/") + "/"
    return [m.mountpoint for m in mountinfo.read()
            if m.mountpoint == path or m.mountpoint.startswith(prefix)]


def umount_all_below(path: str) -> None:
    for mp in sorted(mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def pty_output(master: int) -> str:
    """Everything a pseudo-terminal's slave side got, read from MASTER (the pty hands output
    over asynchronously: read until nothing more comes for a while)."""
    out = b""
    while select.select([master], [], [], 0.3)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Root:
    """A root directory laid out like upstream's test setup (reference §12.1)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "usr/lib").mkdir(parents=True)
        (path / "usr/lib/os-release").write_text(
            'ID=testtest\nID_LIKE="foobar test_alike something-else"\nVERSION=1.2.3\n')
        (path / "var/lib/extensions").mkdir(parents=True)
        (path / "var/lib/extensions.mutable").mkdir(parents=True)
        (path / "var/lib/confexts").mkdir(parents=True)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = False,
            root_arg: bool = True) -> Result:
        """Run overlayctl as a user would (a new process), with --root=this root."""
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SYSTEMD_SYSEXT", "SYSTEMD_CONFEXT"))}
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "overlayctl"]
        if root_arg:
            cmd.append(f"--root={self.path}")
        p = subprocess.run(cmd + list(args), capture_output=True, text=True, env=full_env,
                           cwd=str(REPO))
        assert "Traceback" not in p.stderr, p.stderr
        if check:
            assert p.returncode == 0, f"{args}: {p.stderr}"
        return Result(p.returncode, p.stdout, p.stderr)

    def sysext(self, name: str, files: dict[str, str] | None = None, *,
               release: str | None = "ID=_any\n", where: str = "var/lib/extensions") -> Path:
        """A directory system extension; FILES maps paths inside it to contents."""
        return self._extension("usr/lib", name, files, release, where)

    def confext(self, name: str, files: dict[str, str] | None = None, *,
                release: str | None = "ID=_any\n", where: str = "var/lib/confexts") -> Path:
        """A directory configuration extension; FILES maps paths inside it to contents."""
        return self._extension("etc", name, files, release, where)

    def _extension(self, release_parent: str, name: str, files: dict[str, str] | None,
                   release: str | None, where: str) -> Path:
        e = self.path / where / name
        e.mkdir(parents=True, exist_ok=True)
        if release is not None:
            rel = e / release_parent / "extension-release.d"
            rel.mkdir(parents=True, exist_ok=True)
            (rel / f"extension-release.{name}").write_text(release)
        for p, text in (files or {}).items():
            f = e / p.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        return e

    def ro_bind(self, rel: str) -> None:
        """Make a hierarchy read-only the way upstream's tests do: a read-only bind on itself."""
        p = str(self / rel)
        subprocess.run(["mount", "--bind", p, p], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", p], check=True)

    def writable(self, rel: str) -> bool:
        probe = self / rel / ".overlayctl-write-probe"
        try:
            probe.write_text("x")
        except OSError:
            return False
        probe.unlink()
        return True

    def names(self, rel: str) -> set[str]:
        """What a user sees in a directory (metadata dirs left out)."""
        return {n for n in os.listdir(self / rel)
                if n not in (".systemd-sysext", ".systemd-confext")}

    def mounts(self) -> list[str]:
        return mounts_below(str(self.path))


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Root]:
    r = Root(tmp_path / "root")
    yield r
    leaked = r.mounts()
    umount_all_below(str(r.path))
    assert not leaked, f"mounts left behind: {leaked}"


@pytest.fixture
def debian_tree(tmp_path: Path) -> Iterator[DebTree]:
    """A fresh copy of the cached Debian trixie tree (tests/integration/debtree.py), removed
    afterwards; as with `root`, a mount left below it fails the test."""
    from tests.integration.debtree import copy_tree  # only the dpkg tests need it

    t = copy_tree(tmp_path / "debian")
    yield t
    leaked = t.mounts()
    umount_all_below(str(t.path))
    shutil.rmtree(t.path)
    assert not leaked, f"mounts left behind: {leaked}"
