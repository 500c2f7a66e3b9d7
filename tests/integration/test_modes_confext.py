"""Mutable modes of confext on /etc. Upstream has no confext mutable tests; the same code
paths apply with /etc, SYSTEMD_CONFEXT_MUTABLE_MODE and /var/lib/extensions.mutable/etc
(reference §6, §12 note after case 62), so these mirror the sysext cases of test_modes.py,
plus the man page's recipe: the mutable dir as a symlink to /etc itself."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest

from tests.conftest import Root
from tests.integration.test_modes import assert_error, finish, guard, overlay_on

pytestmark = pytest.mark.root

E = "preexisting-file-in-extension-image"
H = "preexisting-file-in-hierarchy"
U = "preexisting-file-in-extensions-mutable"
NEW = "file-written-while-merged"
MUT = "var/lib/extensions.mutable/etc"
MODE_ENV = "SYSTEMD_CONFEXT_MUTABLE_MODE"


def visible(root: Root) -> set[str]:
    # The merged /etc also shows the extension's release dir and its test script.
    return root.names("etc") - {"extension-release.d", "testscript"}


def layout(root: Root, hier: str, mutdir: str | None) -> list[str]:
    e = root.confext("test-extension", {f"etc/{E}": "E", "etc/testscript": "#!/bin/sh\nexit 0\n"})
    (e / "etc/testscript").chmod(0o755)
    etc = root / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    (etc / H).write_text("H")
    mut = root / MUT
    if mutdir == "dir":
        mut.mkdir()
        mut.chmod(0o755)
        (mut / U).write_text("U")
    elif mutdir == "link-self":
        mut.symlink_to("../../../etc")
        (etc / U).write_text("U")
    if hier == "ro":
        root.ro_bind("etc")
        return ["etc"]
    return []


def no_workdir_left(root: Root) -> None:
    leftovers = [str(p) for d in (root.path, root / "var/lib/extensions.mutable")
                 for p in d.iterdir() if p.name.endswith("workdir")]
    assert not leftovers, leftovers


@dataclass(frozen=True)
class Case:
    hier: str                         # ro | rw
    mutdir: str | None                # None | dir | link-self
    cli: str | None
    env: tuple[str, str] | None       # (variable, value)
    rw: bool
    merged: frozenset[str]
    unmerged: frozenset[str]
    lands: str | None = None          # mutable | hierarchy | ephemeral


EH, EHU, HO, HU = (frozenset({E, H}), frozenset({E, H, U}), frozenset({H}), frozenset({H, U}))

CASES = {
    "default-mutdir-ignored": Case("ro", "dir", None, None, False, EH, HO),
    "no-mutdir-ignored": Case("ro", "dir", "no", None, False, EH, HO),
    "auto-mutdir": Case("ro", "dir", "auto", None, True, EHU, HO, "mutable"),
    "auto-no-mutdir": Case("ro", None, "auto", None, False, EH, HO),
    "yes-creates-mutdir": Case("ro", None, "yes", None, True, EH, HO, "mutable"),
    "yes-mutdir": Case("ro", "dir", "yes", None, True, EHU, HO, "mutable"),
    "import": Case("ro", "dir", "import", None, False, EHU, HO),
    "ephemeral": Case("ro", "dir", "ephemeral", None, True, EH, HO, "ephemeral"),
    "ephemeral-import": Case("ro", "dir", "ephemeral-import", None, True, EHU, HO, "ephemeral"),
    "env-yes": Case("ro", None, None, (MODE_ENV, "yes"), True, EH, HO, "mutable"),
    "env-auto-mutdir": Case("ro", "dir", None, (MODE_ENV, "auto"), True, EHU, HO, "mutable"),
    "env-import": Case("ro", "dir", None, (MODE_ENV, "import"), False, EHU, HO),
    "env-ephemeral-import": Case("ro", "dir", None, (MODE_ENV, "ephemeral-import"), True, EHU,
                                 HO, "ephemeral"),
    "env-yes-cli-no": Case("ro", "dir", "no", (MODE_ENV, "yes"), False, EH, HO),
    "sysext-env-not-for-confext": Case("ro", "dir", None, ("SYSTEMD_SYSEXT_MUTABLE_MODE", "yes"),
                                       False, EH, HO),
    "symlink-self-auto": Case("rw", "link-self", "auto", None, True, EHU, HU, "hierarchy"),
    "symlink-self-yes": Case("rw", "link-self", "yes", None, True, EHU, HU, "hierarchy"),
    "symlink-self-ephemeral": Case("rw", "link-self", "ephemeral", None, True, EHU, HU,
                                   "ephemeral"),
    "symlink-self-no": Case("rw", "link-self", "no", None, False, EHU, HU),
    # overlayctl's extension of upstream (which refuses these): the real /etc is imported as
    # the top lower layer, read-only or under a private tmpfs upper.
    "symlink-self-import": Case("rw", "link-self", "import", None, False, EHU, HU),
    "symlink-self-import-ro-etc": Case("ro", "link-self", "import", None, False, EHU, HU),
    "symlink-self-ephemeral-import": Case("rw", "link-self", "ephemeral-import", None, True,
                                          EHU, HU, "ephemeral"),
    "symlink-self-ephemeral-import-ro-etc": Case("ro", "link-self", "ephemeral-import", None,
                                                 True, EHU, HU, "ephemeral"),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in CASES.items()])
def test_confext_mode(root: Root, case: Case) -> None:
    binds = layout(root, case.hier, case.mutdir)
    args = [f"--mutable={case.cli}"] if case.cli else []
    env = dict([case.env]) if case.env else {}
    mode = case.cli or (case.env[1] if case.env and case.env[0] == MODE_ENV else "no")
    mut = root / MUT
    with guard(root):
        assert root.writable("etc") == (case.hier == "rw")

        root.run("confext", "merge", *args, env=env, check=True)
        assert visible(root) == case.merged
        assert root.writable("etc") == case.rw
        if case.mutdir is None:
            assert mut.is_dir() == (mode == "yes")
        # confext only ever touches /etc (the work dir lives next to the upper while merged).
        assert [n for n in os.listdir(root / "var/lib/extensions.mutable")
                if not n.endswith("-workdir")] in ([], ["etc"])
        if case.rw:
            assert not root.writable("etc/.systemd-confext")
            (root / "etc" / NEW).write_text("new")
            assert NEW in visible(root)
            if case.lands == "mutable":
                assert (mut / NEW).read_text() == "new"
            elif case.lands == "ephemeral" and case.mutdir == "dir":
                assert os.listdir(mut) == [U]

        root.run("confext", "unmerge", env=env, check=True)
        if case.lands == "hierarchy":
            # Writes went straight into the real /etc and survive unmerge.
            assert set(os.listdir(root / "etc")) == {*case.unmerged, NEW}
            assert (root / "etc" / NEW).read_text() == "new"
        else:
            assert set(os.listdir(root / "etc")) == case.unmerged
        assert root.writable("etc") == (case.hier == "rw")
        if case.lands == "mutable":
            assert (mut / NEW).read_text() == "new"
        if case.mutdir == "dir" and case.lands != "mutable":
            assert os.listdir(mut) == [U]
        no_workdir_left(root)
        finish(root, binds)


@pytest.mark.parametrize("hier, mutdir, cli, words", [
    pytest.param("ro", "link-self", "auto", ("read-only",), id="auto-symlink-self-ro-etc"),
    pytest.param("ro", "link-self", "yes", ("read-only",), id="yes-symlink-self-ro-etc"),
    pytest.param("ro", "bad-mode", "yes", ("mode",), id="yes-mutdir-mode-mismatch"),
    pytest.param("ro", "bad-mode", "auto", ("mode",), id="auto-mutdir-mode-mismatch"),
])
def test_confext_mode_refused(root: Root, hier: str, mutdir: str, cli: str,
                              words: tuple[str, ...]) -> None:
    binds = layout(root, hier, "dir" if mutdir == "bad-mode" else mutdir)
    if mutdir == "bad-mode":
        (root / MUT).chmod(0o700)
    before = set(os.listdir(root / "etc"))
    with guard(root):
        res = root.run("confext", "merge", f"--mutable={cli}")
        assert_error(res)
        for w in words:
            assert w in res.stderr.splitlines()[-1].lower(), res.stderr
        assert set(os.listdir(root / "etc")) == before
        assert root.writable("etc") == (hier == "rw")
        no_workdir_left(root)
        finish(root, binds)


@pytest.mark.parametrize("mode", ["no", "yes", "ephemeral", "ephemeral-import"])
def test_confext_noexec_in_every_mode(root: Root, mode: str) -> None:
    binds = layout(root, "ro", "dir")
    with guard(root):
        root.run("confext", "merge", f"--mutable={mode}", check=True)
        vfs, _ = overlay_on(root, "etc")
        assert {"noexec", "nosuid", "nodev"} <= vfs, vfs
        assert (root / "etc/testscript").exists()
        with pytest.raises(PermissionError):
            subprocess.run([str(root / "etc/testscript")], capture_output=True)
        root.run("confext", "unmerge", check=True)
        assert set(os.listdir(root / "etc")) == {H}
        finish(root, binds)


@pytest.mark.parametrize("mode", ["no", "yes"])
def test_confext_noexec_false_allows_exec(root: Root, mode: str) -> None:
    binds = layout(root, "ro", "dir")
    with guard(root):
        root.run("confext", "merge", f"--mutable={mode}", "--noexec=no", check=True)
        vfs, _ = overlay_on(root, "etc")
        assert "noexec" not in vfs, vfs
        assert subprocess.run([str(root / "etc/testscript")]).returncode == 0
        root.run("confext", "unmerge", check=True)
        assert set(os.listdir(root / "etc")) == {H}
        finish(root, binds)
