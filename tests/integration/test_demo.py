"""The README's first command: ./demo.sh runs to its end, every step as it describes, and
leaves nothing behind (no mount, no demo root)."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from tests.conftest import CAN_MOUNT, REPO


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root and a private mount namespace")
def test_demo_runs_to_the_end_and_leaves_nothing() -> None:
    before = set(glob.glob("/tmp/overlayctl-demo.*"))
    env = {**os.environ, "TERM": "dumb"}
    r = subprocess.run([str(REPO / "demo.sh")], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    out = r.stdout
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "Done. No mount was left behind" in out
    # the steps it narrates: whiteout dropped at unmerge, the file back at the next merge
    assert "Dropped 1 whiteout from /etc" in out
    assert out.count("greeting = hello from a confext") >= 2
    assert set(glob.glob("/tmp/overlayctl-demo.*")) == before
    with open("/proc/self/mountinfo") as f:
        assert "overlayctl-demo." not in f.read()
