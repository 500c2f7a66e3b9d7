"""Hostile input that upstream gets wrong (reference §5.6, §10, §11): extension names and
root paths with the characters overlayfs uses as separators or escapes, and very many
extensions up to the kernel's limit of 500 lower layers. Every test runs with the new mount
API (fsconfig lowerdir+) and with the legacy mount(2) path (OVERLAYCTL_LEGACY_MOUNT=1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Root, umount_all_below
from tests.integration.olhelpers import (
    APIS,
    LEGACY,
    assert_error,
    by_hierarchy,
    odd_root,
    overlays_at,
    unmerged,
)

pytestmark = pytest.mark.root


HOSTILE_NAMES = ["a:b", "a,b", "a\\b", "a=b", "a b", "lowerdir=x,upperdir=y",
                 "x:y,z\\,w=v \\:", " lead-space", "trail\\"]
HOSTILE_ROOTS = ["r:oot", "r,oot", "r\\oot", "r=oot", "r oot", "r:o,o\\t= x,lowerdir=y"]


def _status(root: Root, env: dict[str, str]) -> dict[str, dict[str, object]]:
    r = root.run("sysext", "status", "--json=short", env=env, check=True)
    return by_hierarchy(json.loads(r.stdout))


def _exts(root: Root, names: list[str]) -> None:
    for i, n in enumerate(names):
        root.sysext(n, {f"opt/file-{i}": n, "opt/shared": n})


def _check_merge_cycle(root: Root, names: list[str], env: dict[str, str]) -> None:
    (root / "opt").mkdir(exist_ok=True)
    (root / "opt/host").write_text("H")
    _exts(root, names)
    r = root.run("sysext", "merge", env=env, check=True)
    for i, n in enumerate(names):
        assert (root / f"opt/file-{i}").read_text() == n, r.stderr
    assert (root / "opt/host").read_text() == "H"
    assert len(overlays_at(root / "opt")) == 1
    assert len(overlays_at(root / "usr")) == 1
    st = _status(root, env)
    assert sorted(st["/opt"]["extensions"]) == sorted(names)    # type: ignore[arg-type]
    root.run("sysext", "unmerge", env=env, check=True)
    assert root.names("opt") == {"host"}
    assert root.mounts() == []


@APIS
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_extension_name(root: Root, name: str, env: dict[str, str]) -> None:
    _check_merge_cycle(root, [name, "plain"], env)


@APIS
def test_all_hostile_names_together(root: Root, env: dict[str, str]) -> None:
    _check_merge_cycle(root, HOSTILE_NAMES, env)


@APIS
@pytest.mark.parametrize("rootname", HOSTILE_ROOTS)
def test_hostile_root_path(tmp_path: Path, rootname: str, env: dict[str, str]) -> None:
    with odd_root(tmp_path, rootname) as root:
        _check_merge_cycle(root, ["one", "x:y,z=w v\\"], env)


@pytest.mark.parametrize(("rootname", "env"), [
    ("r:o,o= x,lowerdir=y", {}),
    ("r:o,o= x,lowerdir=y", LEGACY),
    pytest.param("r\\oot", {}),
    ("r\\oot", LEGACY),
    pytest.param("r:o,o\\t= x,lowerdir=y", {}),
    ("r:o,o\\t= x,lowerdir=y", LEGACY),
], ids=["comma-colon-new-api", "comma-colon-legacy", "backslash-new-api", "backslash-legacy",
        "all-new-api", "all-legacy"])
def test_hostile_root_path_mutable(tmp_path: Path, rootname: str, env: dict[str, str]) -> None:
    """The upper and work directories live below the hostile root too."""
    with odd_root(tmp_path, rootname) as root:
        (root / "opt").mkdir()
        (root / "opt/host").write_text("H")
        root.sysext("e:x,t", {"opt/ext": "E"})
        root.run("sysext", "merge", "--mutable=yes", env=env, check=True)
        assert root.names("opt") == {"host", "ext"}
        (root / "opt/new").write_text("N")
        st = _status(root, env)
        assert st["/opt"]["upperdir"] == "/var/lib/extensions.mutable/opt"
        assert st["/opt"]["writable"] is True
        assert (root / "var/lib/extensions.mutable/opt/new").read_text() == "N"
        root.run("sysext", "unmerge", env=env, check=True)
        assert root.names("opt") == {"host"}
        assert (root / "var/lib/extensions.mutable/opt/new").read_text() == "N"
        left = [n for n in os.listdir(root / "var/lib/extensions.mutable") if "workdir" in n]
        assert left == []
        # And once more, ephemeral: writes vanish with the unmerge.
        root.run("sysext", "merge", "--mutable=ephemeral", env=env, check=True)
        (root / "opt/gone").write_text("G")
        assert (root / "opt/new").exists() is False
        root.run("sysext", "unmerge", env=env, check=True)
        assert root.names("opt") == {"host"}
        assert not (root / "var/lib/extensions.mutable/opt/gone").exists()


@APIS
def test_hostile_confext(tmp_path: Path, env: dict[str, str]) -> None:
    with odd_root(tmp_path, "c:o,n\\f= x") as root:
        (root / "etc").mkdir()
        root.confext("c:o,n=f \\", {"etc/conf": "C"})
        root.run("confext", "merge", env=env, check=True)
        assert (root / "etc/conf").read_text() == "C"
        root.run("confext", "unmerge", env=env, check=True)
        assert not (root / "etc/conf").exists()


# ---------------------------------------------------------------------------------------------
# Many extensions


def _many(root: Root, n: int, name: str = "ext-{}") -> list[str]:
    (root / "opt").mkdir(exist_ok=True)
    (root / "opt/host").write_text("H")
    (root / "opt/shared").write_text("host")
    names = [name.format(i) for i in range(1, n + 1)]
    for i, nm in enumerate(names, 1):
        root.sysext(nm, {f"opt/f{i}": nm, "opt/shared": nm})
    return names


def _check_many(root: Root, names: list[str], winner: str, env: dict[str, str]) -> None:
    r = root.run("sysext", "merge", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        got = set(os.listdir(root / "opt")) - {".systemd-sysext"}
        assert got == {"host", "shared"} | {f"f{i}" for i in range(1, len(names) + 1)}
        for i, nm in enumerate(names, 1):
            assert (root / f"opt/f{i}").read_text() == nm
        assert (root / "opt/shared").read_text() == winner
        assert (root / "usr/lib/os-release").exists()
        assert len(overlays_at(root / "opt")) == 1
        st = _status(root, env)
        assert st["/opt"]["extensions"][-1] == winner       # type: ignore[index]
        assert len(st["/usr"]["extensions"]) == len(names)    # type: ignore[arg-type]
    finally:
        root.run("sysext", "unmerge", env=env, check=True)
    assert root.names("opt") == {"host", "shared"}
    assert (root / "opt/shared").read_text() == "host"
    assert root.mounts() == []


@APIS
def test_300_extensions(root: Root, env: dict[str, str]) -> None:
    names = _many(root, 300)
    _check_many(root, names, "ext-300", env)


@APIS
def test_300_extensions_with_long_hostile_names_in_a_hostile_root(
        tmp_path: Path, env: dict[str, str]) -> None:
    """Far more than one page of layer paths: the legacy path must not run into the 4096
    byte limit of mount(2) data, and no name may need escaping to be found."""
    with odd_root(tmp_path, "r:o,o\\t= x") as root:
        name = "a-rather-long:extension,name\\with=odd chars-and-version-{}"
        names = _many(root, 300, name)
        _check_many(root, names, name.format(300), env)


@APIS
def test_498_extensions_is_the_limit(root: Root, env: dict[str, str]) -> None:
    """498 extensions + metadata layer + base hierarchy = 500 lower layers (OVL_MAX_STACK)."""
    names = _many(root, 498)
    _check_many(root, names, "ext-498", env)


@APIS
def test_too_many_extensions_fail_cleanly(root: Root, env: dict[str, str]) -> None:
    _many(root, 499)
    r = root.run("sysext", "merge", env=env)
    line = assert_error(r, "501", "500", only_line=False)
    assert "/usr" in line or "/opt" in line
    assert root.mounts() == []
    assert root.names("opt") == {"host", "shared"}
    assert not (root / "opt/f1").exists()
    assert all(unmerged(row) for row in _status(root, env).values())
    assert root.run("sysext", "unmerge", env=env).returncode == 0


@APIS
def test_too_many_for_one_hierarchy_only_merges_nothing(root: Root, env: dict[str, str]) -> None:
    """/opt would need 501 layers but /usr only needs 3: the merge fails as a whole."""
    (root / "opt").mkdir()
    (root / "opt/host").write_text("H")
    for i in range(499):
        root.sysext(f"opt-{i}", {f"opt/f{i}": "x"}, release=None)
    root.sysext("usr-ext", {"usr/share/u": "u"})
    (root / "usr/share").mkdir(exist_ok=True)
    r = root.run("sysext", "merge", "--force", env=env)
    assert_error(r, "/opt", "501", only_line=False)
    assert root.mounts() == []
    assert not (root / "usr/share/u").exists()


# ---------------------------------------------------------------------------------------------
# Names that are not image names, and a root reached through a symlink


def test_invalid_names_are_skipped_without_crashing(root: Root) -> None:
    (root / "opt").mkdir()
    (root / "opt/host").write_text("H")
    d = os.fsencode(root / "var/lib/extensions")
    for bad in (b"ctl\x01char", b"new\nline", b"tab\tname", b"not-utf8-\xff", b".#lockish"):
        p = os.path.join(d, bad)
        os.makedirs(os.path.join(p, b"opt"))
        with open(os.path.join(p, b"opt", b"bad"), "w") as f:
            f.write("x")
    root.sysext("good", {"opt/good": "G"})
    r = root.run("sysext", "list", "--json=short", check=True)
    assert [i["name"] for i in json.loads(r.stdout)] == ["good"]
    root.run("sysext", "list", check=True)
    root.run("sysext", "merge", "--force", check=True)
    assert root.names("opt") == {"host", "good"}
    root.run("sysext", "unmerge", check=True)
    assert root.mounts() == []


@APIS
def test_root_given_through_a_symlink(tmp_path: Path, env: dict[str, str]) -> None:
    real = Root(tmp_path / "real")
    (tmp_path / "link").symlink_to("real")
    via = Root.__new__(Root)
    via.path = tmp_path / "link"
    try:
        (real / "opt").mkdir()
        (real / "opt/host").write_text("H")
        real.sysext("ext", {"opt/ext": "E"})
        via.run("sysext", "merge", env=env, check=True)
        assert real.names("opt") == {"host", "ext"}
        st = _status(via, env)
        assert st["/opt"]["extensions"] == ["ext"]
        assert_error(via.run("sysext", "merge", env=env), "already merged", only_line=False)
        assert len(overlays_at(real / "opt")) == 1
        via.run("sysext", "unmerge", env=env, check=True)
        assert real.names("opt") == {"host"}
        assert real.mounts() == []
    finally:
        umount_all_below(str(real.path))
