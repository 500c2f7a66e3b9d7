"""overlayctl against upstream systemd-sysext/confext on identical trees.

See docs/upstream-comparison.md for the results of a real run.

Each scenario builds the same tree twice. Upstream runs the whole scenario (merge, look, write,
status, unmerge, look) inside its own private namespace prepared like peer-ns; overlayctl runs it
in the test's namespace. What a user sees is then compared: the visible files and their contents,
writability, where a new file lands, what remains after unmerge, and `status --json`'s extension
lists. Needs an upstream binary: the sid peer that tools/peer.sh builds, or $SYSTEMD_SYSEXT (see
peer.py); without one every test here is skipped, or fails under OVERLAYCTL_REQUIRE_PEER=1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Root, mounts_below
from tests.integration.peer import (
    E,
    H,
    N,
    Scenario,
    U,
    build,
    diff,
    need_peer,
    observe,
    run_plan,
    run_scenario,
    scenario_steps,
    status_exts,
    upstream_peer,
)

PEER = upstream_peer()

pytestmark = pytest.mark.root

S = Scenario
MODES = ("auto", "yes", "import", "ephemeral", "ephemeral-import")

SCENARIOS = [
    # sysext on /opt (upstream TEST-50 cases 1-36, re-run side by side)
    S("opt-default", what="default mode, writable hierarchy"),
    S("opt-default-ro", ro=True),
    S("opt-no-mutdir", mode="no", mutable="dir"),
    S("opt-default-mutdir", mutable="dir"),
    *(S(f"opt-{m}-mutdir-ro", mode=m, mutable="dir", ro=True) for m in MODES),
    *(S(f"opt-{m}-nodir-ro", mode=m, ro=True) for m in MODES),
    S("opt-yes-mutdir", mode="yes", mutable="dir"),
    S("opt-auto-self", mode="auto", mutable="self"),
    S("opt-yes-self", mode="yes", mutable="self"),
    S("opt-auto-self-ro", mode="auto", mutable="self", ro=True),
    S("opt-ephemeral-self", mode="ephemeral", mutable="self"),
    S("opt-auto-other-ro", mode="auto", mutable="other", ro=True),
    S("opt-yes-other", mode="yes", mutable="other"),
    S("opt-auto-dangling-ro", mode="auto", mutable="dangling", ro=True),
    S("opt-auto-badmode", mode="auto", mutable="badmode", ro=True),
    S("opt-missing-default", base="missing"),
    S("opt-missing-auto-mutdir", mode="auto", mutable="dir", base="missing"),
    S("opt-missing-yes", mode="yes", base="missing"),
    S("opt-missing-ephemeral", mode="ephemeral", base="missing"),
    S("opt-missing-import-mutdir", mode="import", mutable="dir", base="missing"),
    S("opt-empty-ro-auto-mutdir", mode="auto", mutable="dir", base="empty", ro=True),
    S("opt-conflict-default", exts="conflict"),
    S("opt-conflict-yes", mode="yes", exts="conflict"),
    *(S(f"opt-{m}-mode0750", mode=m, mutable="dir", hmode=0o750, ro=True)
      for m in ("no", "yes", "ephemeral")),
    S("opt-yes-nodir-mode0750", mode="yes", hmode=0o750),
    # sysext on /usr (with /opt base content, so /opt never is a one-lower overlay)
    S("usr-default", hier="usr"),
    S("usr-default-ro", hier="usr", ro=True),
    *(S(f"usr-{m}-mutdir", hier="usr", mode=m, mutable="dir") for m in MODES),
    S("usr-auto-nodir", hier="usr", mode="auto"),
    S("usr-yes-nodir", hier="usr", mode="yes"),
    S("usr-yes-self", hier="usr", mode="yes", mutable="self"),
    S("usr-yes-nodir-noopt", hier="usr", mode="yes", opt_base=False),
    S("usr-ephemeral-noopt", hier="usr", mode="ephemeral", opt_base=False),
    S("usr-conflict-ephemeral", hier="usr", mode="ephemeral", exts="conflict"),
    # confext on /etc
    S("etc-default", cls="confext", hier="etc"),
    S("etc-default-ro", cls="confext", hier="etc", ro=True),
    S("etc-no-mutdir", cls="confext", hier="etc", mode="no", mutable="dir"),
    *(S(f"etc-{m}-mutdir", cls="confext", hier="etc", mode=m, mutable="dir") for m in MODES),
    *(S(f"etc-{m}-nodir-ro", cls="confext", hier="etc", mode=m, ro=True) for m in MODES),
    S("etc-auto-self", cls="confext", hier="etc", mode="auto", mutable="self"),
    S("etc-yes-self", cls="confext", hier="etc", mode="yes", mutable="self"),
    S("etc-auto-self-ro", cls="confext", hier="etc", mode="auto", mutable="self", ro=True),
    S("etc-auto-other", cls="confext", hier="etc", mode="auto", mutable="other"),
    S("etc-yes-badmode", cls="confext", hier="etc", mode="yes", mutable="badmode"),
    S("etc-missing-default", cls="confext", hier="etc", base="missing"),
    S("etc-missing-yes", cls="confext", hier="etc", mode="yes", base="missing"),
    S("etc-conflict-auto", cls="confext", hier="etc", mode="auto", mutable="dir",
      exts="conflict"),
]

# Scenarios where overlayctl deliberately does not do what upstream 262 does (reference §15,
# §5.5, §5.6; docs/design.md "Deliberate differences from upstream"); each has its own test
# below, which asserts the documented difference instead of equality.
SINGLE_LOWER = [S("usr-auto-nodir-noopt", hier="usr", mode="auto", opt_base=False),
                S("usr-import-mutdir-noopt", hier="usr", mode="import", mutable="dir",
                  opt_base=False)]
ODD_NAMES = [S("opt-name-colon", exts="colon"), S("opt-name-comma", exts="comma"),
             S("opt-name-colon-yes", mode="yes", exts="colon")]
HALFWAY = [S("opt-yes-badmode", mode="yes", mutable="badmode", ro=True)]
SELF_IMPORT = [S("opt-import-self", mode="import", mutable="self"),
               S("opt-ephemeral-import-self", mode="ephemeral-import", mutable="self"),
               S("etc-import-self", cls="confext", hier="etc", mode="import", mutable="self"),
               S("etc-ephemeral-import-self", cls="confext", hier="etc", mode="ephemeral-import",
                 mutable="self")]

# Known bugs: scenario id -> reason (the comparison is kept and expected to fail).
BUGS: dict[str, str] = {}

# Deliberate difference (docs/design.md, "The real /usr as its own upper: opaque markers and
# whiteouts"): when the hierarchy is its own upper and has no defaults layer, overlayctl's
# unmerge drops the whiteout that deleting the extension's file E left in the plain
# hierarchy; upstream leaves it there as a 0:0 device. Everything else is the same.
DROPS_WHITEOUT = {"opt-auto-self", "opt-yes-self", "usr-yes-self", "etc-auto-self",
                  "etc-yes-self"}


def _drop_whiteout_difference(sc: Scenario, up: dict[str, Any], oc: dict[str, Any]) -> None:
    """Check the one documented difference of a DROPS_WHITEOUT scenario, then remove it."""
    e = f"{sc.hier}/{E}"
    assert up["after"]["files"].get(e) == "chr 0:0", up["after"]["files"].get(e)
    assert e not in oc["after"]["files"]
    up["after"]["files"].pop(e)


def _params(scenarios: list[Scenario]) -> list[Any]:
    out = []
    for sc in scenarios:
        marks = []
        if sc.id in BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=f"BUG: {BUGS[sc.id]}"))
        out.append(pytest.param(sc, id=sc.id, marks=marks))
    return out


def _both(root: Root, tmp_path: Path, sc: Scenario) -> tuple[dict[str, Any], dict[str, Any]]:
    peer = need_peer(PEER, sc.cls)
    peer_root = Root(tmp_path / "upstream")
    up = run_scenario(peer_root, sc, peer)
    assert not mounts_below(str(peer_root.path))
    oc = run_scenario(root, sc, None)
    return up, oc


KEYS = ("before", "merge_ok", "merged", "write", "written", "status", "unmerge_ok", "after",
        "status_after", "left")


def _assert_same(up: dict[str, Any], oc: dict[str, Any]) -> None:
    ctx = f"\nupstream stderr: {up['stderr']}\noverlayctl stderr: {oc['stderr']}"
    for key in KEYS:
        assert oc[key] == up[key], f"{key} differs (upstream, overlayctl): " \
            f"{diff(up[key], oc[key])}{ctx}"


def _hier(snap: dict[str, Any], hier: str) -> dict[str, str]:
    return {k: v for k, v in snap["files"].items() if k.startswith(hier + "/")}


@pytest.mark.parametrize("sc", _params(SCENARIOS))
def test_same_as_upstream(root: Root, tmp_path: Path, sc: Scenario) -> None:
    up, oc = _both(root, tmp_path, sc)
    if sc.id in DROPS_WHITEOUT:
        _drop_whiteout_difference(sc, up, oc)
    _assert_same(up, oc)
    assert not oc["left"]


@pytest.mark.parametrize("sc", _params(SINGLE_LOWER))
def test_single_lower_readonly_does_not_fail(root: Root, tmp_path: Path, sc: Scenario) -> None:
    """§15, design.md "an empty filler layer": with auto/import, no /opt and nothing for it, 262
    builds a one-lower read-only overlay for /opt and the whole merge fails with EINVAL.
    overlayctl merges /usr as asked and overmounts /opt read-only with just the metadata."""
    up, oc = _both(root, tmp_path, sc)
    assert not up["merge_ok"] and "Invalid argument" in up["stderr"]
    assert up["merged"]["overlays"] == {} and "opt/" not in up["after"]["files"]
    assert oc["merge_ok"], oc["stderr"]
    assert oc["merged"]["files"][f"usr/{E}"] == "E"
    assert oc["merged"]["overlays"] == {"usr": "overlay ro", "opt": "overlay ro"}
    assert _hier(oc["merged"], "opt") == {"opt/": "dir 0755"}   # nothing in it
    assert not oc["merged"]["writable"]["usr"] and not oc["merged"]["writable"]["opt"]
    assert oc["status"] == {"/opt": ["test-extension"], "/usr": ["test-extension"]}
    assert oc["unmerge_ok"] and not oc["left"]
    # Like upstream's mutable merges of a missing hierarchy, the mount point /opt stays.
    assert oc["after"]["files"] == {**oc["before"]["files"], "opt/": "dir 0755"}


@pytest.mark.parametrize("sc", _params(ODD_NAMES))
def test_separator_in_extension_name(root: Root, tmp_path: Path, sc: Scenario) -> None:
    """§5.6, design.md "Escaping": upstream's option mangler strips the escapes of ':' and ','
    in layer paths, so an extension whose name contains them breaks the mount. overlayctl
    merges it like any other extension."""
    up, oc = _both(root, tmp_path, sc)
    assert not up["merge_ok"] and "Failed to mount" in up["stderr"]
    assert up["merged"]["overlays"] == {}
    assert oc["merge_ok"], oc["stderr"]
    assert oc["merged"]["files"][f"opt/{E}"] == "E"
    assert oc["merged"]["files"][f"opt/{H}"] == "H"
    name = {"colon": "test:extension", "comma": "test,extension"}[sc.exts]
    assert oc["status"] == {"/opt": [name], "/usr": [name]}
    assert oc["unmerge_ok"] and not oc["left"]
    assert _hier(oc["after"], "opt") == _hier(oc["before"], "opt")
    if sc.mode == "yes":
        assert oc["written"]["files"][f"var/lib/extensions.mutable/opt/{N}"] == "N"
    else:
        assert oc["write"][0] != "ok"


@pytest.mark.parametrize("sc", _params(HALFWAY))
def test_failed_merge_leaves_nothing_behind(root: Root, tmp_path: Path, sc: Scenario) -> None:
    """design.md "Rollback": /opt's mutable dir has the wrong mode. Upstream handles /usr first
    and has already created var/lib/extensions.mutable/usr when /opt fails; overlayctl checks
    every hierarchy before it creates anything. Both fail and mount nothing."""
    up, oc = _both(root, tmp_path, sc)
    assert not up["merge_ok"] and not oc["merge_ok"]
    assert "ought to have mode 0755" in up["stderr"] and "ought to have mode 0755" in oc["stderr"]
    created = "var/lib/extensions.mutable/usr/"
    assert up["after"]["files"] == {**up["before"]["files"], created: "dir 0755"}
    assert oc["after"]["files"] == oc["before"]["files"]
    for key in ("merged", "written", "after"):
        assert up[key]["overlays"] == oc[key]["overlays"] == {}
        up[key]["files"].pop(created)
        assert oc[key] == up[key]
    assert oc["write"] == up["write"] and oc["status"] == up["status"]


@pytest.mark.parametrize("sc", _params(SELF_IMPORT))
def test_import_of_the_hierarchy_itself(root: Root, tmp_path: Path, sc: Scenario) -> None:
    """docs/modes.md "The mutable dir is the hierarchy itself": upstream refuses import and
    ephemeral-import when the mutable dir points to the hierarchy; overlayctl imports the real
    directory as the top lower layer (above the extensions), read-only or under a private
    tmpfs upper, and leaves it exactly as it was."""
    up, oc = _both(root, tmp_path, sc)
    h = sc.hier
    assert not up["merge_ok"] and "hierarchy itself" in up["stderr"], up["stderr"]
    assert up["merged"]["overlays"] == {}
    assert oc["merge_ok"], oc["stderr"]
    seen = oc["merged"]["files"]
    assert (seen[f"{h}/{E}"], seen[f"{h}/{H}"], seen[f"{h}/{U}"]) == ("E", "H", "U")
    ephemeral = sc.mode == "ephemeral-import"
    assert oc["merged"]["writable"][h] is ephemeral
    written = oc["written"]["files"]
    if ephemeral:
        assert oc["write"] == ["ok", "ok", "ok"]
        assert written[f"{h}/{N}"] == "N" and written[f"{h}/{H}"] == "H2"
        assert f"{h}/{E}" not in written
    else:
        assert all(w != "ok" for w in oc["write"]), oc["write"]
        assert _hier(oc["written"], h) == _hier(oc["merged"], h)
    assert oc["unmerge_ok"] and not oc["left"]
    assert _hier(oc["after"], h) == _hier(oc["before"], h)


def test_status_spells_unmerged_as_262(root: Root, tmp_path: Path) -> None:
    """For a hierarchy that is not merged, `status --json` gives "extensions": [] as v262
    does (v257 said "none"); overlayctl's own "merged" key tells the two states apart."""
    up, oc = _both(root, tmp_path, S("opt-default"))
    assert oc["status_after_raw"] == {"/opt": [], "/usr": []}
    if need_peer(PEER).name == "262":
        assert up["status_after_raw"] == oc["status_after_raw"]


# -- cross-compatibility: one tool merges, the other looks and unmerges --------------------------

CROSS = [S("opt-default"), S("opt-yes-mutdir", mode="yes", mutable="dir"),
         S("opt-ephemeral-ro", mode="ephemeral", ro=True),
         S("opt-auto-self", mode="auto", mutable="self"),
         S("etc-default", cls="confext", hier="etc"),
         S("etc-yes-mutdir", cls="confext", hier="etc", mode="yes", mutable="dir")]


def _cross(root: Root, tmp_path: Path, sc: Scenario, merger: str, unmerger: str) -> None:
    """MERGER merges, a file is written, both tools show status, UNMERGER unmerges, both show
    status again; all in one upstream namespace. What a user sees is compared with MERGER's own
    merge and unmerge of a twin tree."""
    peer = need_peer(PEER, sc.cls)
    build(root, sc)
    m, u = f"{merger}:{sc.cls}", f"{unmerger}:{sc.cls}"
    mode = [f"--mutable={sc.mode}"] if sc.mode else []
    status = [["run", "up:" + sc.cls, "status", "--json=short"],
              ["run", "oc:" + sc.cls, "status", "--json=short"]]
    changes = scenario_steps(sc, merger)[3:6]   # the same writes and deletion
    steps = [["run", m, "merge", "--no-reload", *mode], ["snap"], *changes, ["snap"], *status,
             ["run", u, "unmerge", "--no-reload"], ["snap"], *status]
    ro = [sc.hier] if sc.ro else []
    res = run_plan(root.path, steps, peer=peer, ro=ro, namespace=True)
    twin = Root(tmp_path / "twin")
    build(twin, sc)
    ref = observe(run_plan(twin.path, scenario_steps(sc, merger), peer=peer, ro=ro,
                           namespace=True))
    assert not mounts_below(str(root.path)) and not mounts_below(str(twin.path))

    s = res["steps"]
    names = ["test-extension"]
    assert s[0]["rc"] == 0, s[0]["err"]
    seen = {"merged": s[1], "write": s[2:5], "written": s[5], "after": s[9]}
    if merger == "oc" and unmerger == "up" and sc.id in DROPS_WHITEOUT:
        # Upstream's unmerge leaves the whiteout that overlayctl's would drop (the next
        # overlayctl merge or unmerge drops it: its record says the job is not done).
        e = f"{sc.hier}/{E}"
        assert seen["after"]["files"].pop(e) == "chr 0:0"
    for key, val in seen.items():
        assert val == ref[key], f"{key}, vs {merger} alone: {diff(val, ref[key])}"
    assert _exts(s[6], sc.hier) == names, f"upstream status: {s[6]}"
    assert _exts(s[7], sc.hier) == names, f"overlayctl status: {s[7]}"
    assert s[8]["rc"] == 0, s[8]["err"]
    assert _exts(s[10], sc.hier) == [], f"upstream status: {s[10]}"
    assert _exts(s[11], sc.hier) == [], f"overlayctl status: {s[11]}"
    assert not res["left"]


def _exts(res: dict[str, Any], hier: str) -> Any:
    st = status_exts(res)
    return None if st is None else st.get(f"/{hier}")


@pytest.mark.parametrize("sc", _params(CROSS))
def test_overlayctl_undoes_upstream_merge(root: Root, tmp_path: Path, sc: Scenario) -> None:
    """Upstream merges; overlayctl's status lists the extensions and its unmerge undoes it."""
    _cross(root, tmp_path, sc, "up", "oc")


@pytest.mark.parametrize("sc", _params(CROSS))
def test_upstream_recognises_overlayctl_merge(root: Root, tmp_path: Path, sc: Scenario) -> None:
    """overlayctl merges; upstream's status lists the extensions and its unmerge undoes it."""
    _cross(root, tmp_path, sc, "oc", "up")


# -- refresh: v262 skips a refresh when nothing changed (an ephemeral upper survives) ----------

REFRESH = [(S("opt-default"), "unchanged"), (S("opt-ephemeral", mode="ephemeral"), "unchanged"),
           (S("opt-ephemeral", mode="ephemeral"), "added"),
           (S("opt-ephemeral", mode="ephemeral"), "forced"),
           (S("opt-yes-mutdir", mode="yes", mutable="dir"), "added"),
           (S("opt-auto-mutdir", mode="auto", mutable="dir"), "unchanged"),
           (S("etc-ephemeral", cls="confext", hier="etc", mode="ephemeral"), "unchanged"),
           (S("etc-ephemeral", cls="confext", hier="etc", mode="ephemeral"), "added")]
# Deliberate difference (docs/design.md, issue 4): overlayctl carries an ephemeral upper over
# into the overlay a refresh builds, so a refresh never loses ephemeral writes; upstream 257 and
# 262 start the new overlay with an empty upper whenever the refresh re-merges.
CARRY_OVER = {"opt-ephemeral-added", "opt-ephemeral-forced", "etc-ephemeral-added"}
REFRESH_BUGS: dict[str, str] = {}
WORKDIR_N = re.compile(r"(\.systemd-[^/]*-workdir)\.[0-9]+/")


def refresh_steps(sc: Scenario, tool: str, how: str) -> list[list[str]]:
    """Merge, write a file, (HOW=added: add a second extension), refresh (HOW=forced: with
    --always-refresh=yes), look, unmerge, look."""
    t = f"{tool}:{sc.cls}"
    mode = [f"--mutable={sc.mode}"] if sc.mode else []
    where = "var/lib/confexts" if sc.cls == "confext" else "var/lib/extensions"
    rel = "etc" if sc.cls == "confext" else "usr/lib"
    extra = [["put", f"{where}/second/{rel}/extension-release.d/extension-release.second",
              "ID=_any\n"], ["put", f"{where}/second/{sc.hier}/second-file", "2"]]
    return [["run", t, "merge", "--no-reload", *mode], ["write", f"{sc.hier}/{N}", "N"],
            *(extra if how == "added" else []),
            ["run", t, "refresh", "--no-reload", *mode,
             *(["--always-refresh=yes"] if how == "forced" else [])], ["snap"],
            ["run", t, "status", "--json=short"], ["run", t, "unmerge", "--no-reload"], ["snap"]]


def _refresh_params() -> list[Any]:
    out = []
    for (sc, how), p in zip(REFRESH, _params([sc for sc, _ in REFRESH]), strict=True):
        marks = list(p.marks)
        bug = REFRESH_BUGS.get(f"{sc.id}-{how}")
        if bug:
            marks.append(pytest.mark.xfail(strict=True, reason=f"BUG: {bug}"))
        out.append(pytest.param(sc, how, id=f"{sc.id}-{how}", marks=marks))
    return out


def _renamed_workdirs(snap: dict[str, Any]) -> list[str]:
    """Rename work dirs with a numeric suffix (.systemd-opt-workdir.1) to the plain name, in
    place; return the names that had one."""
    files = snap["files"]
    odd = [k for k in files if WORKDIR_N.search(k)]
    for k in odd:
        files[WORKDIR_N.sub(r"\1/", k)] = files.pop(k)
    return odd


@pytest.mark.parametrize(("sc", "how"), _refresh_params())
def test_refresh_same_as_upstream(root: Root, tmp_path: Path, sc: Scenario, how: str) -> None:
    """Compared after the refresh and after the unmerge. A refresh that re-merges a persistent
    upper puts overlayctl's work dir at .systemd-NAME-workdir.1 (the old overlay still uses
    the plain name while the new one is swapped in beneath it, design.md "Refresh without a
    gap"); the name is normalised here and checked on its own."""
    add = how == "added"
    peer = need_peer(PEER, sc.cls)
    peer_root = Root(tmp_path / "upstream")
    obs = []
    for r, tool in ((peer_root, "up"), (root, "oc")):
        build(r, sc)
        res = run_plan(r.path, refresh_steps(sc, tool, how), peer=peer,
                       ro=[sc.hier] if sc.ro else [], namespace=tool == "up")
        s = res["steps"][:2] + res["steps"][4:] if add else res["steps"]
        obs.append({"merge_ok": s[0]["rc"] == 0, "write": s[1], "refresh_ok": s[2]["rc"] == 0,
                    "refreshed": s[3], "status": status_exts(s[4]),
                    "unmerge_ok": s[5]["rc"] == 0, "after": s[6], "left": res["left"]})
    up, oc = obs
    written = f"{sc.hier}/{N}"
    if f"{sc.id}-{how}" in CARRY_OVER:
        assert written in oc["refreshed"]["files"]        # kept by overlayctl
        assert written not in up["refreshed"]["files"]    # lost by upstream
        oc["refreshed"]["files"].pop(written)
    assert _renamed_workdirs(up["refreshed"]) == []
    odd = _renamed_workdirs(oc["refreshed"])
    assert not odd or (sc.mode == "yes" and add), odd
    assert oc == up, f"(upstream, overlayctl): {diff(up, oc)}"
    if sc.mode == "ephemeral":
        # 262 keeps an ephemeral upper across a refresh that changes nothing, loses it otherwise
        assert (written in up["refreshed"]["files"]) is (how == "unchanged")


def test_peer_is_usable(tmp_path: Path) -> None:
    """The upstream wrapper runs and the namespace setup lets its merge be seen."""
    peer = need_peer(PEER)
    r = Root(tmp_path / "r")
    up = run_scenario(r, S("opt-default"), peer)
    assert up["merge_ok"], up["stderr"]
    assert up["merged"]["files"].get(f"opt/{E}") == "E"
    assert up["write"][0] != "ok" and N not in str(up["after"]["files"])
