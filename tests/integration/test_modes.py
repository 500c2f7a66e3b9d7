"""Mutable modes of sysext on /opt, as upstream's TEST-50-DISSECT.sysext.sh checks them
(reference §12, cases 1-37): what a user sees in /opt after merge and after unmerge, whether
/opt is writable, where a file written while merged lands, and what survives unmerge."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import Result, Root, umount_all_below
from tests.integration.olhelpers import overlays_at, unmerged

pytestmark = pytest.mark.root

E = "preexisting-file-in-extension-image"
H = "preexisting-file-in-hierarchy"
U = "preexisting-file-in-extensions-mutable"
NEW = "file-written-while-merged"
MUT = "var/lib/extensions.mutable/opt"
MODE_ENV = "SYSTEMD_SYSEXT_MUTABLE_MODE"
OPTS_ENV = "SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS"


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def guard(root: Root) -> Iterator[None]:
    """If the test body fails, take its mounts down so the failure is reported once
    (and an xfail stays an xfail) instead of again as a leak in the fixture."""
    try:
        yield
    except BaseException:
        umount_all_below(str(root.path))
        raise


def visible(root: Root, rel: str = "opt") -> set[str]:
    return root.names(rel) if (root / rel).is_dir() else set()


def finish(root: Root, binds: list[str]) -> None:
    """Nothing but the test's own read-only binds may be mounted; then take those down."""
    assert sorted(root.mounts()) == sorted(str(root / b) for b in binds)
    for b in reversed(binds):
        subprocess.run(["umount", str(root / b)], check=True)


def assert_error(res: Result) -> None:
    """A failure: exit status 1 and exactly one error line, 'overlayctl: ...', last."""
    assert res.returncode == 1, res
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("overlayctl:")
              and not ln.startswith("overlayctl: warning:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr


def overlay_on(root: Root, rel: str) -> tuple[set[str], set[str]]:
    """(per-mount options, super options) of the one overlay mounted on <root>/REL."""
    path = str(root / rel)
    found = [(set(m["options"]), set(m["super"].split(","))) for m in overlays_at(path)]
    assert len(found) == 1, f"expected one overlay on {path}, found {len(found)}"
    return found[0]


def layout(root: Root, hier: str, mutdir: str | None, perm: int = 0o755) -> list[str]:
    """Upstream's setup: the standard extension (marker E), /opt as HIER, the mutable dir
    as MUTDIR, both with mode PERM. Returns the read-only binds made (to be undone by finish())."""
    root.sysext("test-extension", {f"opt/{E}": "E"})
    opt = root / "opt"
    if hier != "missing":
        opt.mkdir()
        opt.chmod(perm)
        if hier in ("ro", "rw"):
            (opt / H).write_text("H")
    mut = root / MUT
    if mutdir == "dir":
        mut.mkdir()
        mut.chmod(perm)
        (mut / U).write_text("U")
    elif mutdir == "link-upperdir":
        (root / "upperdir").mkdir()
        (root / "upperdir").chmod(0o755)
        (root / "upperdir" / U).write_text("U")
        mut.symlink_to("../../../upperdir")
    elif mutdir == "link-self":
        mut.symlink_to("../../../opt")
        (opt / U).write_text("U")
    elif mutdir == "dangling":
        mut.symlink_to("/should/not/exist/")
    if hier in ("ro", "empty-ro"):
        root.ro_bind("opt")
        return ["opt"]
    return []


def args_env(cli: str | None, env: str | None) -> tuple[list[str], dict[str, str]]:
    return ([f"--mutable={cli}"] if cli else []), ({MODE_ENV: env} if env else {})


def status(root: Root) -> dict[str, object]:
    rows = json.loads(root.run("sysext", "status", "--json=short", check=True).stdout)
    return {r["hierarchy"]: r["extensions"] if r["merged"] else "none" for r in rows}


def no_workdir_left(root: Root) -> None:
    leftovers = [str(p) for d in (root.path, root / "var/lib/extensions.mutable")
                 for p in d.iterdir() if p.name.endswith("workdir")]
    assert not leftovers, leftovers


# ---------------------------------------------------------------- cases 1, 3-7, 9-12, 14-30


@dataclass(frozen=True)
class Case:
    hier: str             # ro | rw | missing | empty-ro
    mutdir: str | None    # None | dir | link-upperdir | link-self | dangling
    cli: str | None
    env: str | None
    rw: bool              # /opt writable while merged
    merged: frozenset[str]
    unmerged: frozenset[str]
    lands: str | None = None   # mutable | upperdir | hierarchy | ephemeral (when rw)
    marks: tuple[pytest.MarkDecorator, ...] = field(default=())


EH, EHU, EU = frozenset({E, H}), frozenset({E, H, U}), frozenset({E, U})
HO, NONE = frozenset({H}), frozenset()

CASES = {
    "01-default-ro": Case("ro", None, None, None, False, EH, HO),
    "03-default-writable": Case("rw", None, None, None, False, EH, HO),
    "04-default-missing": Case("missing", None, None, None, False, frozenset({E}), NONE),
    "05-default-empty-ro": Case("empty-ro", None, None, None, False, frozenset({E}), NONE),
    "06-default-mutdir-ignored": Case("ro", "dir", None, None, False, EH, HO),
    "07-auto-mutdir": Case("ro", "dir", "auto", None, True, EHU, HO, "mutable"),
    "09-auto-missing-mutdir": Case("missing", "dir", "auto", None, True, EU, NONE, "mutable"),
    "10-auto-empty-ro-mutdir": Case("empty-ro", "dir", "auto", None, True, EU, NONE, "mutable"),
    "11-auto-symlink-upperdir": Case("ro", "link-upperdir", "auto", None, True, EHU, HO,
                                     "upperdir"),
    "12-auto-symlink-hierarchy": Case("rw", "link-self", "auto", None, True, EHU,
                                      frozenset({H, U}), "hierarchy"),
    "12b-yes-symlink-hierarchy": Case("rw", "link-self", "yes", None, True, EHU,
                                      frozenset({H, U}), "hierarchy"),
    "14-auto-dangling-symlink": Case("ro", "dangling", "auto", None, False, EH, HO),
    "15-no-mutdir": Case("ro", "dir", "no", None, False, EH, HO),
    "16-import": Case("ro", "dir", "import", None, False, EHU, HO),
    "17-yes-creates-mutdir": Case("ro", None, "yes", None, True, EH, HO, "mutable"),
    "18-auto-no-mutdir": Case("ro", None, "auto", None, False, EH, HO),
    "19-env-yes": Case("ro", None, None, "yes", True, EH, HO, "mutable"),
    "20-env-auto-cli-auto": Case("ro", None, "auto", "auto", False, EH, HO),
    "21-env-auto-mutdir": Case("ro", "dir", None, "auto", True, EHU, HO, "mutable"),
    "22-env-no-mutdir": Case("ro", "dir", None, "no", False, EH, HO),
    "23-env-import": Case("ro", "dir", None, "import", False, EHU, HO),
    "24-env-yes-cli-no": Case("ro", "dir", "no", "yes", False, EH, HO),
    "25-ephemeral": Case("ro", "dir", "ephemeral", None, True, EH, HO, "ephemeral"),
    "26-env-ephemeral": Case("ro", "dir", None, "ephemeral", True, EH, HO, "ephemeral"),
    "27-ephemeral-import": Case("ro", "dir", "ephemeral-import", None, True, EHU, HO,
                                "ephemeral"),
    "28-env-ephemeral-import": Case("ro", "dir", None, "ephemeral-import", True, EHU, HO,
                                    "ephemeral"),
    # Upstream refuses 29 and 30 ("points to the hierarchy itself"); overlayctl imports the
    # real /opt as the top lower layer (docs/modes.md).
    "29-ephemeral-import-symlink-self": Case("rw", "link-self", "ephemeral-import", None, True,
                                             EHU, frozenset({H, U}), "ephemeral"),
    "30-import-symlink-self": Case("rw", "link-self", "import", None, False, EHU,
                                   frozenset({H, U})),
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=k, marks=c.marks) for k, c in CASES.items()])
def test_mode(root: Root, case: Case) -> None:
    binds = layout(root, case.hier, case.mutdir)
    args, env = args_env(case.cli, case.env)
    mode = case.cli or case.env or "no"
    mut = root / MUT
    with guard(root):
        if case.hier != "missing":
            assert root.writable("opt") == (case.hier == "rw")

        root.run("sysext", "merge", *args, env=env, check=True)
        assert visible(root) == case.merged
        assert root.writable("opt") == case.rw
        assert status(root) == {"/usr": ["test-extension"], "/opt": ["test-extension"]}
        if case.mutdir is None:
            # Only 'yes' creates the persistent dir, for every hierarchy it overmounts.
            assert mut.is_dir() == (mode == "yes")
            assert (root / "var/lib/extensions.mutable/usr").is_dir() == (mode == "yes")
        if case.rw:
            # The metadata stays read-only even in a writable merge.
            assert not root.writable("opt/.systemd-sysext")
            (root / "opt" / NEW).write_text("new")
            assert NEW in visible(root)
            if case.lands == "mutable":
                assert (mut / NEW).read_text() == "new"
            elif case.lands == "upperdir":
                assert (root / "upperdir" / NEW).read_text() == "new"
                assert (mut / NEW).read_text() == "new"
            elif case.lands == "ephemeral" and case.mutdir == "dir":
                assert os.listdir(mut) == [U]

        root.run("sysext", "unmerge", env=env, check=True)
        assert status(root) == {"/usr": "none", "/opt": "none"}
        # A hierarchy created for the merge is left behind.
        assert (root / "opt").is_dir()
        if case.lands == "hierarchy":
            assert set(os.listdir(root / "opt")) == {*case.unmerged, NEW}
            assert (root / "opt" / NEW).read_text() == "new"
        else:
            assert visible(root) == case.unmerged
        if case.hier != "missing":
            assert root.writable("opt") == (case.hier == "rw")
        if case.lands == "mutable":
            assert (mut / NEW).read_text() == "new"
        elif case.lands == "upperdir":
            assert (root / "upperdir" / NEW).read_text() == "new"
        if case.mutdir == "dir":
            assert (mut / U).read_text() == "U"
            if case.lands != "mutable":
                assert os.listdir(mut) == [U]
        no_workdir_left(root)
        finish(root, binds)


@pytest.mark.parametrize("mode, persists", [("auto", True), ("ephemeral", False)])
def test_deletion_of_extension_file(root: Root, mode: str, persists: bool) -> None:
    """(derived, §6.3) Deleting an extension's file while merged: with a persistent upper
    the deletion is recorded there and still hides the file on the next merge; with an
    ephemeral upper it is forgotten at unmerge."""
    binds = layout(root, "ro", "dir")
    with guard(root):
        root.run("sysext", "merge", f"--mutable={mode}", check=True)
        (root / "opt" / E).unlink()
        assert visible(root) == ({H, U} if persists else {H})
        root.run("sysext", "unmerge", check=True)
        assert visible(root) == {H}
        root.run("sysext", "merge", f"--mutable={mode}", check=True)
        assert visible(root) == ({H, U} if persists else {E, H})
        root.run("sysext", "unmerge", check=True)
        assert (root / "var/lib/extensions/test-extension/opt" / E).read_text() == "E"
        finish(root, binds)


@pytest.mark.parametrize("cli, env, rw", [
    pytest.param("TRUE", None, True, id="cli-boolean-true-is-yes"),
    pytest.param("off", None, False, id="cli-boolean-off-is-no"),
    pytest.param(None, "bogus", False, id="bad-env-ignored"),
    pytest.param("auto", "bogus", True, id="bad-env-ignored-cli-used"),
])
def test_mode_spellings(root: Root, cli: str | None, env: str | None, rw: bool) -> None:
    """§6.1: boolean spellings are accepted case-insensitively; a bad env value only warns."""
    binds = layout(root, "ro", "dir")
    args, envd = args_env(cli, env)
    with guard(root):
        res = root.run("sysext", "merge", *args, env=envd, check=True)
        if env == "bogus":
            assert "bogus" in res.stderr
        assert visible(root) == ({E, H, U} if rw else {E, H})
        assert root.writable("opt") == rw
        root.run("sysext", "unmerge", env=envd, check=True)
        assert visible(root) == {H}
        finish(root, binds)


@pytest.mark.parametrize("value", ["Auto", "YESS", "enabled", ""])
def test_bad_cli_mode_refused(root: Root, value: str) -> None:
    """§6.1: mode names are case-sensitive and a bad CLI value is fatal, before mounting."""
    binds = layout(root, "ro", "dir")
    with guard(root):
        res = root.run("sysext", "merge", f"--mutable={value}")
        assert_error(res)
        assert visible(root) == {H}
        finish(root, binds)


@pytest.mark.parametrize("mode", ["auto", "import"])
def test_no_content_for_empty_hierarchy_is_not_an_error(root: Root, mode: str) -> None:
    """(derived, §5.5/§15) auto or import without a mutable dir, an empty /opt and no
    extension content for /opt: upstream fails with EINVAL (an overlay with one lower);
    a deliberate implementation must not. /usr still gets its extension."""
    root.sysext("test-extension", {"usr/share/marker": "E"})
    (root / "opt").mkdir()
    with guard(root):
        root.run("sysext", "merge", f"--mutable={mode}", check=True)
        assert (root / "usr/share/marker").read_text() == "E"
        assert visible(root) == set()
        root.run("sysext", "unmerge", check=True)
        assert not (root / "usr/share/marker").exists()
        finish(root, [])


# ---------------------------------------------------------------- cases 13, 36: refusals


@pytest.mark.parametrize("hier, mutdir, cli, words", [
    pytest.param("ro", "link-self", "auto", ("read-only",), id="13-auto-symlink-to-ro-hierarchy"),
    pytest.param("ro", "bad-mode", "yes", ("mode",), id="36-mutdir-mode-mismatch"),
])
def test_mode_refused(root: Root, hier: str, mutdir: str, cli: str,
                      words: tuple[str, ...]) -> None:
    if mutdir == "bad-mode":
        binds = layout(root, hier, "dir")
        (root / MUT).chmod(0o700)
    else:
        binds = layout(root, hier, mutdir)
    before = visible(root)
    with guard(root):
        res = root.run("sysext", "merge", f"--mutable={cli}")
        assert_error(res)
        for w in words:
            assert w in res.stderr.splitlines()[-1].lower(), res.stderr
        # Nothing got merged: not /opt, and not /usr either.
        assert visible(root) == before
        assert root.writable("opt") == (hier == "rw")
        rows = json.loads(root.run("sysext", "status", "--json=short", check=True).stdout)
        assert rows and all(unmerged(r) for r in rows), rows
        no_workdir_left(root)
        finish(root, binds)


# ---------------------------------------------------------------- cases 2, 8: mount options


def test_02_options_env_read_only(root: Root) -> None:
    binds = layout(root, "ro", None)
    with guard(root):
        root.run("sysext", "merge", env={OPTS_ENV: "metacopy=off,noatime"}, check=True)
        vfs, fs = overlay_on(root, "opt")
        assert "noatime" in vfs and "ro" in vfs
        assert "metacopy=on" not in fs
        assert "upperdir" not in {o.partition("=")[0] for o in fs}
        assert visible(root) == {E, H}
        root.run("sysext", "unmerge", check=True)
        assert visible(root) == {H}
        finish(root, binds)


def test_08_auto_default_options_then_env_replaces_them(root: Root) -> None:
    binds = layout(root, "ro", "dir")
    with guard(root):
        root.run("sysext", "merge", "--mutable=auto", check=True)
        vfs, fs = overlay_on(root, "opt")
        assert "noatime" in vfs and "rw" in vfs
        assert "index=on" not in fs
        assert "metacopy=on" not in fs
        assert "redirect_dir=off" not in fs
        assert "upperdir" in {o.partition("=")[0] for o in fs}

        root.run("sysext", "refresh", "--mutable=auto",
                 env={OPTS_ENV: "relatime,metacopy=on"}, check=True)
        vfs, fs = overlay_on(root, "opt")
        assert "metacopy=off" not in fs
        assert "noatime" not in vfs
        assert "relatime" in vfs
        assert visible(root) == {E, H, U}
        assert root.writable("opt")

        root.run("sysext", "unmerge", check=True)
        assert visible(root) == {H}
        finish(root, binds)


# ---------------------------------------------------------------- cases 31-33: permissions


@pytest.mark.parametrize("mode, mutdir", [
    ("no", "dir"), ("yes", "dir"), ("ephemeral", "dir"), ("yes", None)])
@pytest.mark.parametrize("perm", [0o755, 0o751], ids=["0755", "0751"])
def test_31_33_permissions_preserved(root: Root, mode: str, mutdir: str | None,
                                     perm: int) -> None:
    # The mutable dir matches the hierarchy, as 'yes' requires (case 36 is the mismatch).
    binds = layout(root, "ro", mutdir, perm)
    before = stat.filemode(os.stat(root / "opt").st_mode)
    with guard(root):
        root.run("sysext", "merge", f"--mutable={mode}", check=True)
        assert stat.filemode(os.stat(root / "opt").st_mode) == before
        assert visible(root) == ({E, H, U} if mode == "yes" and mutdir else {E, H})
        if mode == "yes" and mutdir is None:
            # (v260) a created mutable dir gets the hierarchy's mode.
            assert stat.filemode(os.stat(root / MUT).st_mode) == before
        root.run("sysext", "unmerge", check=True)
        assert stat.filemode(os.stat(root / "opt").st_mode) == before
        finish(root, binds)


# ---------------------------------------------------------------- cases 34, 35: compatibility


@pytest.mark.parametrize("release", [
    pytest.param("ID=testtest\n", id="34-same-id"),
    pytest.param("ID=test_alike\n", id="35-id-like"),
])
def test_34_35_id_matching(root: Root, release: str) -> None:
    binds = layout(root, "ro", None)
    root.sysext("test-extension", release=release)   # replace the release file
    with guard(root):
        root.run("sysext", "merge", check=True)
        assert visible(root) == {E, H}
        root.run("sysext", "unmerge", check=True)
        assert visible(root) == {H}
        finish(root, binds)


# ---------------------------------------------------------------- case 37: initrd


@pytest.mark.parametrize("scope, merged", [
    pytest.param(None, False, id="37-no-scope-not-merged"),
    pytest.param("initrd", True, id="37b-initrd-scope-merged"),
])
def test_37_initrd_root(root: Root, scope: str | None, merged: bool) -> None:
    binds = layout(root, "ro", None)
    if scope:
        root.sysext("test-extension", release=f"ID=_any\nSYSEXT_SCOPE={scope}\n")
    (root / "etc").mkdir()
    (root / "etc/initrd-release").write_text("ID=testtest\n")
    with guard(root):
        root.run("sysext", "merge", check=True)
        assert visible(root) == ({E, H} if merged else {H})
        rows = json.loads(root.run("sysext", "status", "--json=short", check=True).stdout)
        assert {r["hierarchy"] for r in rows} == {"/usr", "/opt"}
        for r in rows:
            if merged:
                assert r["extensions"] == ["test-extension"], rows
            else:
                assert unmerged(r), rows
        if not merged:
            assert sorted(root.mounts()) == [str(root / "opt")]
        root.run("sysext", "unmerge", check=True)
        assert visible(root) == {H}
        finish(root, binds)
