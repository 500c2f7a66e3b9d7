"""Helpers shared by the integration tests in this directory (not by conftest.py): looking at
mounts the way a user would, checking error output, and building roots with odd paths."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Result, Root, mounts_below, umount_all_below


def mountinfo() -> list[dict[str, Any]]:
    """/proc/self/mountinfo as dicts: id, parent, mountpoint, options, fstype, source, super
    (parsed by overlayctl.mountinfo, the one parser there is)."""
    from overlayctl import mountinfo as mi
    return [{"id": m.id, "parent": m.parent, "mountpoint": m.mountpoint,
             "options": m.options.split(","), "fstype": m.fstype, "source": m.source,
             "super": m.super_options} for m in mi.read()]


def overlays_at(path: Path | str) -> list[dict[str, Any]]:
    """Every overlay mounted exactly at PATH (more than one means stacked overlays)."""
    p = str(path)
    return [m for m in mountinfo() if m["mountpoint"] == p and m["fstype"] == "overlay"]


def mount_id(path: Path | str) -> int | None:
    """The mount ID (first field of mountinfo) of the topmost mount at PATH, or None."""
    p = str(path)
    here = [m for m in mountinfo() if m["mountpoint"] == p]
    if not here:
        return None
    tops = [m for m in here if not any(o["parent"] == m["id"] for o in here)]
    return (tops or here)[-1]["id"]


def top_mount(path: Path | str) -> dict[str, Any] | None:
    mid = mount_id(path)
    return next((m for m in mountinfo() if m["id"] == mid), None)


def assert_error(res: Result, *needles: str, only_line: bool = True) -> str:
    """A failed command: non-zero exit, no traceback, and one error line starting with
    'overlayctl:' that contains every needle. With only_line, stderr is that line alone
    (log lines before it are allowed otherwise, but the error comes last)."""
    assert res.returncode != 0, f"expected a failure, got 0: {res.stderr}"
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines, "no error message at all"
    if only_line:
        assert len(lines) == 1, f"expected one line, got: {res.stderr!r}"
    errs = [x for x in lines if x.startswith("overlayctl:") and "warning" not in x]
    assert len(errs) == 1, f"expected exactly one error line: {res.stderr!r}"
    assert lines[-1] == errs[0], f"the error is not the last line: {res.stderr!r}"
    assert "internal error" not in errs[0], errs[0]
    for n in needles:
        assert n in errs[0], f"{n!r} not in {errs[0]!r}"
    return errs[0]


def status_json(root: Root, *args: str, env: dict[str, str] | None = None
                ) -> list[dict[str, Any]]:
    r = root.run(*args, "status", "--json=short", env=env, check=True)
    v = json.loads(r.stdout)
    assert isinstance(v, list)
    return v


def unmerged(row: dict[str, Any]) -> bool:
    """A status row of a hierarchy that is not merged (v262 spells it "extensions": [])."""
    return not row["merged"] and row["extensions"] == []


def by_hierarchy(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["hierarchy"]: r for r in rows}


def popen(root: Root, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start overlayctl without waiting (for concurrency tests)."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SYSTEMD_SYSEXT", "SYSTEMD_CONFEXT"))}
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "overlayctl", f"--root={root.path}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=str(REPO))


@contextmanager
def odd_root(base: Path, name: str) -> Iterator[Root]:
    """A Root whose own path is BASE/NAME (NAME may hold ':', ',', '\\', '=', ' '), with the
    same leak check as conftest's root fixture."""
    r = Root(base / name)
    try:
        yield r
    finally:
        leaked = r.mounts()
        umount_all_below(str(r.path))
    assert not leaked, f"mounts left behind: {leaked}"


def no_mounts_below(root: Root) -> bool:
    return mounts_below(str(root.path)) == []


# Run a test on both mount paths: the new mount API and mount(2) (OVERLAYCTL_LEGACY_MOUNT).
LEGACY = {"OVERLAYCTL_LEGACY_MOUNT": "1"}
APIS = pytest.mark.parametrize("env", [{}, LEGACY], ids=["new-api", "legacy"])


def whiteouts(top: Path) -> list[str]:
    """Every 0:0 character device below TOP, relative to it (what a user of the plain tree
    trips over)."""
    out = []
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out.append(os.path.relpath(os.path.join(d, n), top))
    return sorted(out)
