"""The progress line of diff, end to end on a pseudo-terminal (tests/unit/test_progress.py
checks the line itself): a quick diff with stderr on a terminal prints its result and
leaves the terminal clean; a slow one (the delay shortened through the module, in-process)
shows the line on the terminal and not in the output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from overlayctl import progress
from tests.conftest import REPO, Root, pty_output

pytestmark = pytest.mark.root


def flatcar(root: Root, n: int) -> None:
    (root / "usr/lib/overlayctl").mkdir(parents=True)
    (root / "usr/lib/overlayctl/confext.conf").write_text(
        "[Defaults]\n/etc=/usr/share/factory/etc\n")
    for i in range(n):
        for base, text in ((root / "usr/share/factory/etc", "default\n"),
                           (root / "etc", "local\n" if i % 2 else "default\n")):
            (base / f"d{i // 50}").mkdir(parents=True, exist_ok=True)
            (base / f"d{i // 50}/f{i}").write_text(text)


def test_quick_diff_on_a_terminal_prints_no_progress(root: Root) -> None:
    flatcar(root, 20)
    master, slave = os.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "overlayctl", f"--root={root.path}", "diff",
                            "--json=short"], stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
                           text=True)
        assert p.returncode == 0
        rows = json.loads(p.stdout)
        assert sorted({r["change"] for r in rows}) == ["identical", "modified"]
        assert pty_output(master) == ""
    finally:
        os.close(slave)
        os.close(master)


def test_slow_diff_shows_the_line_on_the_terminal_only(root: Root,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    flatcar(root, 300)
    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(progress, "CHECK_EVERY", 1)
    master, slave = os.openpty()
    term = io.TextIOWrapper(io.FileIO(slave, "w", closefd=False), encoding="utf-8")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(sys, "stdout", out)
    from overlayctl.cli import main
    try:
        assert main([f"--root={root.path}", "diff", "--json=short"]) == 0
        term.flush()
        seen = pty_output(master)
    finally:
        term.close()
        os.close(slave)
        os.close(master)
    assert len(json.loads(out.getvalue())) == 300
    assert "overlayctl: 1 entries read" in seen and "entries read" not in out.getvalue()
    assert seen.endswith("\r\x1b[K")
