"""vm-tests/flatcar_commit_guest.py (issue 13, Flatcar's first boot to an immutable /etc),
run as its `simulate` stage: the same install and boots as in the VM, on a tree below a
temporary root, each boot in a fresh private mount namespace. Keeps the VM scenario's logic
working between VM runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, mounts_below

pytestmark = pytest.mark.root

GUEST = REPO / "vm-tests/flatcar_commit_guest.py"


def test_flatcar_first_boot_to_immutable_etc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = subprocess.run([sys.executable, str(GUEST), f"--root={root}",
                        f"--overlayctl={sys.executable} -m overlayctl", "simulate"],
                       capture_output=True, text=True, cwd=str(REPO))
    log = r.stdout + r.stderr
    fails = [line for line in log.splitlines() if line.startswith("CHECK FAIL")]
    assert r.returncode == 0 and not fails, "\n".join(fails) or log[-3000:]
    passed = [line for line in log.splitlines() if line.startswith("CHECK PASS")]
    for needle in ("boot1: confext commit site", "setup-root: the real /etc emptied",
                   "boot2: /etc is exactly the committed one",
                   "boot2: writes to /etc are refused (EROFS)",
                   "boot3: /etc is exactly the committed one",
                   "boot4: /etc merged (ephemeral-import, confexts ['site'], writable)",
                   "boot4: the real /etc under the overlay is empty",
                   "boot5: the writes of boot 4 are gone"):
        assert any(needle in line for line in passed), needle
    assert len(passed) >= 60, len(passed)
    assert mounts_below(str(root)) == []
