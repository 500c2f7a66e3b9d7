"""The main path end to end: merge, look, unmerge, for both classes."""

from __future__ import annotations

import pytest

from tests.conftest import Root

pytestmark = pytest.mark.root


def test_sysext_merge_unmerge_readonly(root: Root) -> None:
    (root / "opt").mkdir()
    (root / "opt/preexisting-file-in-hierarchy").write_text("H")
    root.sysext("test-extension", {"opt/preexisting-file-in-extension-image": "E"})
    root.ro_bind("opt")
    root.run("sysext", "merge", check=True)
    assert root.names("opt") == {"preexisting-file-in-hierarchy",
                                 "preexisting-file-in-extension-image"}
    assert not root.writable("opt")
    root.run("sysext", "unmerge", check=True)
    assert root.names("opt") == {"preexisting-file-in-hierarchy"}
    assert not root.writable("opt")
    assert root.mounts() == [str(root / "opt")]   # only the test's own read-only bind
    import subprocess
    subprocess.run(["umount", str(root / "opt")], check=True)


def test_confext_is_noexec(root: Root) -> None:
    (root / "etc").mkdir()
    e = root.confext("test", {"etc/testfile": "x", "etc/testscript": "#!/bin/sh\nexit 0\n"})
    (e / "etc/testscript").chmod(0o755)
    root.run("confext", "merge", check=True)
    assert (root / "etc/testfile").read_text() == "x"
    import subprocess
    with pytest.raises(PermissionError):
        subprocess.run([str(root / "etc/testscript")], capture_output=True)
    root.run("confext", "unmerge", check=True)
    assert not (root / "etc/testfile").exists()


def test_hierarchies_with_the_same_last_component(root: Root) -> None:
    """/usr and /x/usr each get their own metadata layer (named usr and x.usr)."""
    (root / "x/usr").mkdir(parents=True)
    root.sysext("e", {"usr/share/a": "u", "x/usr/b": "x"})
    env = {"SYSTEMD_SYSEXT_HIERARCHIES": "/usr:/x/usr"}
    root.run("sysext", "merge", env=env, check=True)
    assert (root / "usr/share/a").read_text() == "u"
    assert (root / "x/usr/b").read_text() == "x"
    assert (root / "x/usr/.systemd-sysext/extensions").read_text() == "e\n"
    root.run("sysext", "unmerge", env=env, check=True)
    assert not (root / "x/usr/b").exists()
