"""What a boot-time merge costs before it mounts anything (issue 14): the lean launcher
(tools/launcher.sh, /usr/bin/overlayctl in the Debian package) starts an isolated
interpreter without site, and a merge through it imports none of the standard library's
heavy modules nor the local-change verbs. Timing is bench/'s job; this checks the shape."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, Root

pytestmark = pytest.mark.root

# Standard modules a merge must not need: each costs milliseconds at every boot.
HEAVY = {"contextlib", "collections", "functools", "dataclasses", "inspect", "enum", "re",
         "json", "argparse", "typing", "shutil", "tempfile", "hashlib", "socket", "site",
         "pathlib", "subprocess", "signal", "psutil", "difflib"}
LOCAL = {"overlayctl.local", "overlayctl.localcli", "overlayctl.upper", "overlayctl.manifest",
         "overlayctl.inuse", "overlayctl.busy", "overlayctl.output", "overlayctl.varlink"}


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    out = tmp_path / "overlayctl"
    subprocess.run([str(REPO / "tools/launcher.sh"), str(out), sys.executable, str(REPO),
                    sysconfig.get_paths()["purelib"]], check=True)
    return out


def imported(launcher: Path, *args: str, env: dict[str, str] | None = None
             ) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the launcher's script under the same flags (-IS) with -X importtime."""
    p = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", str(launcher), *args],
                       capture_output=True, text=True, env=env, cwd="/")
    mods = {line.split("|")[-1].strip() for line in p.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}
    mods.discard("package")
    return p, mods


def test_launcher_is_isolated(launcher: Path, tmp_path: Path) -> None:
    """-IS in the shebang: PYTHON* variables and site are ignored, the package dirs come
    from the script; the console script's entry point runs."""
    text = launcher.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    bogus = tmp_path / "bogus"
    (bogus / "overlayctl").mkdir(parents=True)
    (bogus / "overlayctl/__init__.py").write_text("raise SystemExit('wrong overlayctl')\n")
    p = subprocess.run([str(launcher), "--version"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(bogus), "PATH": "/usr/bin:/bin"})
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    assert p.stdout.startswith("overlayctl ")


@pytest.mark.parametrize("mode", ["no", "yes", "ephemeral"])
def test_a_merge_imports_only_what_it_needs(root: Root, launcher: Path, mode: str) -> None:
    root.sysext("one", {"usr/share/one/a": "a"})
    p, mods = imported(launcher, f"--root={root.path}", "sysext", "merge", "--no-reload",
                       f"--mutable={mode}")
    assert p.returncode == 0, p.stderr
    assert (root / "usr/share/one/a").read_text() == "a"
    assert "overlayctl.engine" in mods and "ctypes" in mods, sorted(mods)
    assert not mods & HEAVY, sorted(mods & HEAVY)
    assert not mods & LOCAL, sorted(mods & LOCAL)
    root.run("sysext", "unmerge", check=True)
    # What the unit runs at boot, with nothing merged yet.
    p, mods = imported(launcher, f"--root={root.path}", "sysext", "refresh", "--no-reload",
                       f"--mutable={mode}")
    assert p.returncode == 0, p.stderr
    assert (root / "usr/share/one/a").read_text() == "a"
    assert not mods & HEAVY, sorted(mods & HEAVY)
    # What the unit's reload runs: a refresh of the merged hierarchy (skipped as unchanged,
    # or done again), and status. (A writable one done again removes the old work dir with
    # shutil.rmtree: that import is left to it.)
    again = [["refresh", "--always-refresh=yes"]] if mode == "no" else []
    for args in (["refresh"], *again, ["status", "--json=off"]):
        p, mods = imported(launcher, f"--root={root.path}", "sysext", *args, "--no-reload",
                           f"--mutable={mode}")
        assert p.returncode == 0, p.stderr
        assert not mods & HEAVY, (args, sorted(mods & HEAVY))
    assert (root / "usr/share/one/a").read_text() == "a"
    root.run("sysext", "unmerge", check=True)


def test_output_survives_the_fast_exit(root: Root, launcher: Path) -> None:
    """entry() leaves with os._exit: what was printed must be flushed first, to a pipe too."""
    root.sysext("one", {"usr/share/one/a": "a"})
    p = subprocess.run([str(launcher), f"--root={root.path}", "list", "--json=short"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert [e["name"] for e in json.loads(p.stdout)] == ["one"]
    p = subprocess.run([str(launcher), f"--root={root.path}", "sysext", "merge", "--no-reload",
                        "--mutable=bogus"], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("overlayctl: failed to parse"), p.stderr
