"""refresh (reference §8) and the dry-run plan: what gets re-merged, what is skipped (judged
by the mount ID in /proc/self/mountinfo), what survives, and that overlays never stack."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from tests.conftest import Root
from tests.integration.olhelpers import (
    APIS,
    assert_error,
    by_hierarchy,
    mount_id,
    overlays_at,
    status_json,
    unmerged,
)

pytestmark = pytest.mark.root

MUTABLE_DIR = "var/lib/extensions.mutable"


@pytest.fixture
def base(root: Root) -> Root:
    (root / "opt").mkdir()
    (root / "opt/host").write_text("H")
    root.sysext("ext-a", {"opt/a": "A", "opt/shared": "A"})
    return root


def ids(root: Root) -> tuple[int | None, int | None]:
    return mount_id(root / "usr"), mount_id(root / "opt")


def single(root: Root) -> None:
    """Exactly one overlay on each sysext hierarchy: nothing stacked."""
    assert len(overlays_at(root / "usr")) == 1
    assert len(overlays_at(root / "opt")) == 1


def exts(root: Root, h: str = "/opt") -> Any:
    return by_hierarchy(status_json(root, "sysext"))[h]["extensions"]


# ---------------------------------------------------------------------------------------------
# The four outcomes of §8.1


@APIS
def test_merged_and_extensions_remain_remerges_with_new_content(base: Root,
                                                                 env: dict[str, str]) -> None:
    base.run("sysext", "merge", env=env, check=True)
    before = ids(base)
    base.sysext("ext-b", {"opt/b": "B", "opt/shared": "B"})
    r = base.run("sysext", "refresh", env=env, check=True)
    assert base.names("opt") == {"host", "a", "b", "shared"}, r.stderr
    assert (base / "opt/shared").read_text() == "B"
    assert exts(base) == ["ext-a", "ext-b"]
    single(base)
    after = ids(base)
    assert after[0] != before[0] and after[1] != before[1]
    # And removing one again.
    shutil.rmtree(base / "var/lib/extensions/ext-b")
    base.run("sysext", "refresh", env=env, check=True)
    assert base.names("opt") == {"host", "a", "shared"}
    assert (base / "opt/shared").read_text() == "A"
    single(base)
    base.run("sysext", "unmerge", env=env, check=True)
    assert base.names("opt") == {"host"}


@APIS
def test_merged_and_none_remain_unmerges_in_mode_no(base: Root, env: dict[str, str]) -> None:
    base.run("sysext", "merge", env=env, check=True)
    shutil.rmtree(base / "var/lib/extensions/ext-a")
    r = base.run("sysext", "refresh", env=env, check=True)
    assert base.mounts() == [], r.stderr
    assert base.names("opt") == {"host"}
    assert all(unmerged(row) for row in status_json(base, "sysext"))


@APIS
@pytest.mark.parametrize("mode", ["yes", "ephemeral", "auto"])
def test_merged_and_none_remain_remerges_empty_in_mutable_mode(base: Root, env: dict[str, str],
                                                               mode: str) -> None:
    (base / MUTABLE_DIR / "opt").mkdir()
    (base / MUTABLE_DIR / "usr").mkdir()
    base.run("sysext", "merge", f"--mutable={mode}", env=env, check=True)
    assert base.writable("opt")
    shutil.rmtree(base / "var/lib/extensions/ext-a")
    r = base.run("sysext", "refresh", f"--mutable={mode}", env=env, check=True)
    single(base)
    assert base.names("opt") == {"host"}, r.stderr
    assert base.writable("opt")
    st = by_hierarchy(status_json(base, "sysext"))
    assert st["/opt"]["extensions"] == [] and st["/usr"]["extensions"] == []
    assert st["/opt"]["mutable"] == mode
    base.run("sysext", "unmerge", env=env, check=True)
    assert base.mounts() == []


@APIS
def test_not_merged_and_extensions_merges(base: Root, env: dict[str, str]) -> None:
    base.run("sysext", "refresh", env=env, check=True)
    single(base)
    assert base.names("opt") == {"host", "a", "shared"}
    assert exts(base) == ["ext-a"]
    # A second merge now says it is merged: refresh really merged.
    assert_error(base.run("sysext", "merge", env=env), "already merged", only_line=False)
    base.run("sysext", "unmerge", env=env, check=True)
    assert base.mounts() == []


def test_not_merged_and_nothing_is_a_noop(root: Root) -> None:
    (root / "opt").mkdir()
    r = root.run("sysext", "refresh", check=True)
    assert root.mounts() == [], r.stderr
    r = root.run("refresh", check=True)
    assert root.mounts() == [], r.stderr


def test_hierarchy_that_loses_its_content_is_unmerged(base: Root) -> None:
    """ext-a keeps /usr content but drops /opt: /opt is unmerged, /usr re-merged."""
    base.run("sysext", "merge", check=True)
    shutil.rmtree(base / "var/lib/extensions/ext-a/opt")
    base.sysext("ext-a", {"usr/share/a": "A"})
    base.run("sysext", "refresh", check=True)
    assert overlays_at(base / "opt") == []
    assert base.names("opt") == {"host"}
    assert len(overlays_at(base / "usr")) == 1
    assert (base / "usr/share/a").read_text() == "A"
    st = by_hierarchy(status_json(base, "sysext"))
    assert unmerged(st["/opt"]) and st["/usr"]["extensions"] == ["ext-a"]
    base.run("sysext", "unmerge", check=True)
    assert base.mounts() == []


def test_hierarchy_that_gains_content_is_merged(root: Root) -> None:
    (root / "opt").mkdir()
    (root / "opt/host").write_text("H")
    root.sysext("ext-a", {"usr/share/a": "A"})
    (root / "usr/share").mkdir()
    root.run("sysext", "merge", check=True)
    assert overlays_at(root / "opt") == []
    root.sysext("ext-a", {"opt/a": "A"})
    root.run("sysext", "refresh", check=True)
    single(root)
    assert root.names("opt") == {"host", "a"}
    root.run("sysext", "unmerge", check=True)
    assert root.mounts() == []


def test_confext_refresh(root: Root) -> None:
    (root / "etc").mkdir()
    root.confext("c1", {"etc/c1": "1"})
    root.run("confext", "merge", check=True)
    root.confext("c2", {"etc/c2": "2"})
    root.run("confext", "refresh", check=True)
    assert (root / "etc/c2").read_text() == "2" and (root / "etc/c1").read_text() == "1"
    assert len(overlays_at(root / "etc")) == 1
    root.run("confext", "unmerge", check=True)
    assert root.mounts() == []


# ---------------------------------------------------------------------------------------------
# Skipping (§8.2)


@APIS
def test_unchanged_refresh_is_skipped_unless_always_refresh(base: Root,
                                                            env: dict[str, str]) -> None:
    base.run("sysext", "merge", env=env, check=True)
    first = ids(base)
    for _ in range(2):
        r = base.run("sysext", "refresh", env=env, check=True)
        assert "Skipping" in r.stderr
        assert ids(base) == first
        single(base)
    for flag in ("--always-refresh=yes", "--always-refresh=1", "--always-refresh=true"):
        prev = ids(base)
        r = base.run("sysext", "refresh", flag, env=env, check=True)
        assert "Skipping" not in r.stderr
        now = ids(base)
        assert now[0] != prev[0] and now[1] != prev[1]
        single(base)
        assert base.names("opt") == {"host", "a", "shared"}
    prev = ids(base)
    base.run("sysext", "refresh", "--always-refresh=no", env=env, check=True)
    assert ids(base) == prev
    base.run("sysext", "unmerge", env=env, check=True)
    assert base.mounts() == []


def test_replacing_an_extension_by_a_copy_remerges(base: Root) -> None:
    base.run("sysext", "merge", check=True)
    first = ids(base)
    d = base / "var/lib/extensions/ext-a"
    shutil.copytree(d, base / "var/ext-a.new", symlinks=True)
    shutil.rmtree(d)
    (base / "var/ext-a.new").rename(d)
    base.run("sysext", "refresh", check=True)
    now = ids(base)
    assert now[0] != first[0] and now[1] != first[1]
    single(base)
    base.run("sysext", "unmerge", check=True)


@pytest.mark.parametrize("change", [
    ["--mutable=ephemeral"],
    ["--noexec=yes"],
], ids=["mutable-mode", "noexec"])
def test_changed_settings_defeat_the_skip(base: Root, change: list[str]) -> None:
    base.run("sysext", "merge", check=True)
    first = ids(base)
    base.run("sysext", "refresh", *change, check=True)
    now = ids(base)
    assert now[0] != first[0] and now[1] != first[1]
    single(base)
    top = overlays_at(base / "opt")[0]
    if "--noexec=yes" in change:
        assert "noexec" in top["options"]
    else:
        assert base.writable("opt")
    base.run("sysext", "unmerge", check=True)


def test_changed_mount_options_env_defeats_the_skip(base: Root) -> None:
    (base / MUTABLE_DIR / "opt").mkdir()
    base.run("sysext", "merge", "--mutable=auto", check=True)
    first = ids(base)
    env = {"SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS": "relatime,metacopy=on"}
    base.run("sysext", "refresh", "--mutable=auto", env=env, check=True)
    assert ids(base)[1] != first[1]
    [m] = overlays_at(base / "opt")
    assert "noatime" not in m["options"]
    assert "metacopy=on" in m["super"]
    base.run("sysext", "unmerge", check=True)


def test_skipped_refresh_keeps_the_ephemeral_upper(base: Root) -> None:
    base.run("sysext", "merge", "--mutable=ephemeral", check=True)
    (base / "opt/scratch").write_text("S")
    base.run("sysext", "refresh", "--mutable=ephemeral", check=True)
    assert (base / "opt/scratch").read_text() == "S"
    base.run("sysext", "unmerge", check=True)
    assert not (base / "opt/scratch").exists()


# ---------------------------------------------------------------------------------------------
# Persistent data and stacking


@APIS
def test_persistent_upper_survives_refresh(base: Root, env: dict[str, str]) -> None:
    base.run("sysext", "merge", "--mutable=yes", env=env, check=True)
    (base / "opt/mine").write_text("M")
    (base / "opt/shared").write_text("edited")
    (base / "opt/a").unlink()
    base.sysext("ext-b", {"opt/b": "B"})
    base.run("sysext", "refresh", "--mutable=yes", env=env, check=True)
    single(base)
    assert base.names("opt") == {"host", "mine", "shared", "b"}
    assert (base / "opt/mine").read_text() == "M"
    assert (base / "opt/shared").read_text() == "edited"
    base.run("sysext", "refresh", "--mutable=yes", "--always-refresh=yes", env=env, check=True)
    single(base)
    assert (base / "opt/mine").read_text() == "M"
    assert base.writable("opt")
    base.run("sysext", "unmerge", env=env, check=True)
    assert base.names("opt") == {"host"}
    assert (base / MUTABLE_DIR / "opt/mine").read_text() == "M"
    # A later merge sees the same data again, whiteout included.
    base.run("sysext", "merge", "--mutable=yes", env=env, check=True)
    assert base.names("opt") == {"host", "mine", "shared", "b"}
    base.run("sysext", "unmerge", env=env, check=True)
    left = [p.name for p in (base / MUTABLE_DIR).iterdir() if "workdir" in p.name]
    assert left == []


@APIS
def test_refresh_never_stacks(base: Root, env: dict[str, str]) -> None:
    base.run("sysext", "merge", env=env, check=True)
    for i in range(6):
        base.sysext(f"ext-{i}", {f"opt/f{i}": str(i)})
        base.run("sysext", "refresh", env=env, check=True)
        single(base)
        base.run("sysext", "refresh", "--always-refresh=yes", env=env, check=True)
        single(base)
        assert (base / f"opt/f{i}").read_text() == str(i)
    base.run("sysext", "refresh", "--mutable=ephemeral", env=env, check=True)
    single(base)
    base.run("sysext", "refresh", "--mutable=yes", env=env, check=True)
    single(base)
    base.run("sysext", "refresh", env=env, check=True)
    single(base)
    # No mode given: the refresh keeps the merged one (docs/design.md, a deliberate
    # difference: upstream re-merges read-only).
    assert base.writable("opt")
    base.run("sysext", "refresh", "--mutable=no", env=env, check=True)
    single(base)
    assert not base.writable("opt")
    base.run("sysext", "unmerge", env=env, check=True)
    assert base.mounts() == []


# ---------------------------------------------------------------------------------------------
# Dry run


PLAN_KEYS = {"hierarchy", "mode", "upperdir", "workdir", "lowerdirs", "options", "readonly",
             "extensions"}


def _plans(stdout: str) -> dict[str, dict[str, Any]]:
    v = json.loads(stdout)
    assert isinstance(v, list)
    for p in v:
        assert PLAN_KEYS <= set(p), p
    return {p["hierarchy"]: p for p in v}


def test_merge_dry_run_prints_the_plan_and_mounts_nothing(base: Root) -> None:
    base.sysext("ext-b", {"opt/b": "B"})
    r = base.run("sysext", "merge", "--dry-run", check=True)
    assert base.mounts() == []
    assert base.names("opt") == {"host"}
    out = r.stdout
    assert "/opt" in out and "/usr" in out
    assert str(base / "var/lib/extensions/ext-a/opt") in out
    assert str(base / "var/lib/extensions/ext-b/opt") in out
    # The plan is what a real merge then does.
    base.run("sysext", "merge", check=True)
    assert base.names("opt") == {"host", "a", "b", "shared"}
    base.run("sysext", "unmerge", check=True)


def test_refresh_dry_run_json_short(base: Root) -> None:
    base.sysext("ext-b", {"opt/b": "B"})
    r = base.run("sysext", "refresh", "--dry-run", "--json=short", check=True)
    assert base.mounts() == []
    assert len(r.stdout.strip().splitlines()) == 1
    plans = _plans(r.stdout)
    assert set(plans) == {"/usr", "/opt"}
    p = plans["/opt"]
    assert p["mode"] == "no"
    assert p["readonly"] is True
    assert p["upperdir"] is None and p["workdir"] is None
    assert p["extensions"] == ["ext-a", "ext-b"]
    lowers = p["lowerdirs"]
    assert "meta" in lowers[0]
    assert lowers[1:] == [str(base / "var/lib/extensions/ext-b/opt"),
                          str(base / "var/lib/extensions/ext-a/opt"), str(base / "opt")]
    assert isinstance(p["options"], list)


def test_refresh_dry_run_while_merged_changes_nothing(base: Root) -> None:
    base.run("sysext", "merge", check=True)
    before = ids(base)
    base.sysext("ext-b", {"opt/b": "B"})
    r = base.run("sysext", "refresh", "--dry-run", "--json=short", check=True)
    assert ids(base) == before
    single(base)
    assert base.names("opt") == {"host", "a", "shared"}
    plans = _plans(r.stdout)
    # The base layer is the plain /opt under the overlay: it is listed by its own path.
    assert plans["/opt"]["extensions"] == ["ext-a", "ext-b"]
    assert plans["/opt"]["lowerdirs"][1] == str(base / "var/lib/extensions/ext-b/opt")
    base.run("sysext", "unmerge", check=True)


def test_dry_run_mutable_plan_creates_nothing(base: Root) -> None:
    r = base.run("sysext", "merge", "--mutable=yes", "--dry-run", "--json=pretty", check=True)
    assert base.mounts() == []
    assert not (base / MUTABLE_DIR / "opt").exists()
    assert not (base / MUTABLE_DIR / "usr").exists()
    p = _plans(r.stdout)["/opt"]
    assert p["mode"] == "yes"
    assert p["readonly"] is False
    assert p["upperdir"] == str(base / MUTABLE_DIR / "opt")
    assert p["workdir"] == str(base / MUTABLE_DIR / ".systemd-opt-workdir")
    assert "redirect_dir=on" in p["options"] and "metacopy=off" in p["options"]
    assert "index=off" in p["options"]
    assert "meta" in p["lowerdirs"][0] and p["lowerdirs"][-1] == str(base / "opt")


def test_dry_run_with_nothing_to_merge(root: Root) -> None:
    (root / "opt").mkdir()
    r = root.run("sysext", "refresh", "--dry-run", "--json=short", check=True)
    assert json.loads(r.stdout) == []
    assert root.mounts() == []


# ---------------------------------------------------------------------------------------------
# A refresh that fails keeps what was merged


@APIS
def test_failed_refresh_keeps_the_old_overlays(base: Root, env: dict[str, str]) -> None:
    base.run("sysext", "merge", env=env, check=True)
    before = ids(base)
    m = base / MUTABLE_DIR / "opt"
    m.mkdir()
    m.chmod(0o700)
    base.sysext("ext-b", {"opt/b": "B"})
    r = base.run("sysext", "refresh", "--mutable=yes", env=env)
    assert_error(r, str(m), only_line=False)
    assert ids(base) == before
    single(base)
    assert base.names("opt") == {"host", "a", "shared"}
    assert not (base / MUTABLE_DIR / "usr").exists()
    base.run("sysext", "unmerge", env=env, check=True)
    assert base.mounts() == []


@APIS
def test_kernel_failure_during_refresh_keeps_the_old_overlays(root: Root,
                                                              env: dict[str, str]) -> None:
    """/var's new overlay is refused by the kernel (its extension layer lies inside /var);
    /usr, merged before, must stay merged as it was."""
    hier = {**env, "SYSTEMD_SYSEXT_HIERARCHIES": "/usr:/var"}
    root.sysext("ext", {"usr/share/u": "U"})
    root.run("sysext", "merge", env=hier, check=True)
    before = mount_id(root / "usr")
    root.sysext("ext", {"var/v": "V"})
    r = root.run("sysext", "refresh", env=hier)
    assert_error(r, only_line=False)
    assert mount_id(root / "usr") == before
    assert len(overlays_at(root / "usr")) == 1
    assert overlays_at(root / "var") == []
    assert (root / "usr/share/u").read_text() == "U"
    root.run("sysext", "unmerge", env=hier, check=True)
    assert root.mounts() == []
