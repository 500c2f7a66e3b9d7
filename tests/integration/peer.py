"""Side-by-side runs of overlayctl and upstream systemd-sysext/confext on identical trees.

Shared by test_peer.py and peer_report.py (which writes docs/upstream-comparison.md). A scenario
builds a tree on a Root; run_plan() runs a list of steps against it through peer_probe.py, either
directly (overlayctl, in the caller's mount namespace, so the root fixture still sees any mount
that leaks) or inside a fresh private namespace prepared like tools/peer.sh's bin/peer-ns
(upstream: /run a fresh tmpfs, the root a shared bind mount), and returns what the probe observed.

The peer is what tools/peer.sh builds, found in $OVERLAYCTL_PEER_DIR, else in its default
/var/cache/overlayctl/peer, else in /work/peer (developers' machines); $SYSTEMD_SYSEXT (and
$SYSTEMD_CONFEXT) name another build. need_peer() skips a test without one, or fails it when
$OVERLAYCTL_REQUIRE_PEER=1 (as .ci/run sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import REPO, Root, absent

PROBE = Path(__file__).with_name("peer_probe.py")
PEER_DIRS = (Path("/var/cache/overlayctl/peer"), Path("/work/peer"))
REQUIRE_PEER = "OVERLAYCTL_REQUIRE_PEER"

# What peer-ns does, for one command: the namespace (and every mount made in it) dies with it.
NS_SCRIPT = ('R=$1; shift; mount -t tmpfs -o mode=755 tmpfs /run && mount --bind "$R" "$R" && '
             'mount --make-rshared "$R" && exec "$@"')

E = "preexisting-file-in-extension-image"
H = "preexisting-file-in-hierarchy"
U = "preexisting-file-in-extensions-mutable"
N = "new-file"


@dataclass(frozen=True)
class Upstream:
    name: str
    sysext: str
    confext: str | None


def _confext_for(sysext: str) -> str | None:
    env = os.environ.get("SYSTEMD_CONFEXT")
    if env:
        return env
    p = Path(sysext)
    guess = p.with_name(p.name.replace("sysext", "confext"))
    return str(guess) if guess != p and guess.exists() else None


def peer_dir() -> Path:
    """Where tools/peer.sh put the peer: $OVERLAYCTL_PEER_DIR, else the first of PEER_DIRS that
    has a bin/ (the first when none has)."""
    env = os.environ.get("OVERLAYCTL_PEER_DIR")
    if env:
        return Path(env)
    return next((d for d in PEER_DIRS if (d / "bin").is_dir()), PEER_DIRS[0])


def _built(suite: str) -> Path | None:
    d = peer_dir()
    sx = d / "bin" / f"systemd-sysext-{suite}"
    return sx if os.access(sx, os.X_OK) and (d / suite / ".peer-complete").exists() else None


def upstream_peer() -> Upstream | None:
    """The upstream tool the tests compare against: $SYSTEMD_SYSEXT, else the sid (262) peer."""
    env = os.environ.get("SYSTEMD_SYSEXT")
    if env:
        return Upstream("env", env, _confext_for(env))
    sid = _built("sid")
    return Upstream("262", str(sid), _confext_for(str(sid))) if sid else None


def need_peer(peer: Upstream | None, cls: str = "sysext") -> Upstream:
    """PEER, able to run CLS; else skip the test, or fail it under $OVERLAYCTL_REQUIRE_PEER=1."""
    if peer is None:
        absent("no upstream systemd-sysext", REQUIRE_PEER,
               f"run tools/peer.sh to build it in {peer_dir()}, or set SYSTEMD_SYSEXT")
    if cls == "confext" and peer.confext is None:
        absent(f"no upstream systemd-confext beside {peer.sysext}", REQUIRE_PEER,
               "set SYSTEMD_CONFEXT")
    return peer


def all_peers() -> list[Upstream]:
    """Every available upstream build (for the report): 262 (sid), and 257 (trixie) if built
    (tools/peer.sh DIR sid trixie)."""
    out = []
    for suite, ver in (("sid", "262"), ("trixie", "257")):
        sx = _built(suite)
        if sx:
            out.append(Upstream(ver, str(sx), _confext_for(str(sx))))
    return out


@dataclass(frozen=True)
class Scenario:
    id: str
    cls: str = "sysext"           # sysext | confext
    hier: str = "opt"             # opt | usr | etc: the hierarchy under test
    mode: str | None = None       # --mutable=; None: not given
    mutable: str | None = None    # None | dir | self | other | dangling | badmode
    ro: bool = False              # hierarchy is a read-only bind mount
    base: str = "present"         # present | missing | empty
    exts: str = "one"             # one | conflict | colon | comma
    opt_base: bool = True         # /usr scenarios: give /opt base content (no single lower)
    hmode: int | None = None      # chmod the hierarchy (and a mutable dir "dir") to this
    what: str = ""                # one-line description for the report

    def describe(self) -> str:
        parts = [f"{self.cls} /{self.hier}", f"--mutable={self.mode}" if self.mode else
                 "no --mutable"]
        parts.append({None: "no mutable dir", "dir": "mutable dir (U)",
                      "self": "mutable dir -> hierarchy", "other": "mutable dir -> ../upperdir",
                      "dangling": "mutable dir dangling symlink",
                      "badmode": "mutable dir mode 0700"}[self.mutable])
        if self.ro:
            parts.append("RO hierarchy")
        if self.base != "present":
            parts.append(f"hierarchy {self.base}")
        if self.exts != "one":
            parts.append({"conflict": "two extensions, conflicting file",
                          "colon": "extension name with ':'",
                          "comma": "extension name with ','"}[self.exts])
        if self.hmode is not None:
            parts.append(f"hierarchy mode {self.hmode:04o}")
        if self.hier == "usr" and not self.opt_base:
            parts.append("no /opt")
        return ", ".join(parts)


def build(root: Root, sc: Scenario) -> None:
    """Lay out SC's tree below ROOT (no mounts: read-only binds are made by the probe)."""
    h = sc.hier
    if h == "usr":
        if sc.opt_base:
            (root / "opt").mkdir()
            (root / "opt/base-opt-file").write_text("O")
    elif sc.base != "missing":
        (root / h).mkdir()
    if sc.base == "present":
        (root / h / H).write_text("H")
    make = root.confext if sc.cls == "confext" else root.sysext
    if sc.exts == "one":
        make("test-extension", {f"{h}/{E}": "E"})
    elif sc.exts == "conflict":
        # strverscmp: conflict-10 is newer than conflict-9, so it is the upper layer and wins.
        make("conflict-9", {f"{h}/{E}": "E", f"{h}/conflicting-file": "from conflict-9"})
        make("conflict-10", {f"{h}/only-in-10": "10", f"{h}/conflicting-file": "from conflict-10"})
    else:
        make({"colon": "test:extension", "comma": "test,extension"}[sc.exts], {f"{h}/{E}": "E"})
    mut = root / "var/lib/extensions.mutable" / h
    if sc.mutable in ("dir", "badmode"):
        mut.mkdir()
        (mut / U).write_text("U")
        if sc.mutable == "badmode":
            mut.chmod(0o700)
        elif sc.hmode is not None:
            mut.chmod(sc.hmode)
    elif sc.mutable == "self":
        (root / h / U).write_text("U")
        mut.symlink_to(f"../../../{h}")
    elif sc.mutable == "other":
        (root / "upperdir").mkdir()
        (root / "upperdir" / U).write_text("U")
        mut.symlink_to("../../../upperdir")
    elif sc.mutable == "dangling":
        mut.symlink_to("/should/not/exist/")
    if sc.hmode is not None:
        (root / h).chmod(sc.hmode)


def tools(root: Path, peer: Upstream | None) -> dict[str, list[str]]:
    t = {"oc:sysext": [sys.executable, "-m", "overlayctl", f"--root={root}", "sysext"],
         "oc:confext": [sys.executable, "-m", "overlayctl", f"--root={root}", "confext"]}
    if peer is not None:
        t["up:sysext"] = [peer.sysext, f"--root={root}"]
        if peer.confext:
            t["up:confext"] = [peer.confext, f"--root={root}"]
    return t


def run_plan(root: Path, steps: list[list[str]], *, peer: Upstream | None = None,
             ro: list[str] | None = None, namespace: bool = False,
             extra_tools: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run STEPS (see peer_probe.py) against ROOT; NAMESPACE: inside a fresh peer-ns namespace
    (required whenever a step runs upstream). EXTRA_TOOLS: more tool names for "run" steps."""
    plan = {"root": str(root), "ro": ro or [],
            "tools": {**tools(root, peer), **(extra_tools or {})},
            "steps": steps, "env": {"PYTHONPATH": str(REPO)}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=root.parent, delete=False) as f:
        json.dump(plan, f)
    try:
        argv = [sys.executable, str(PROBE), f.name]
        if namespace:
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", NS_SCRIPT,
                    "peer-ns", str(root), *argv]
        p = subprocess.run(argv, capture_output=True, text=True, cwd=str(REPO))
        assert p.returncode == 0, f"probe failed: {p.stderr}"
        result: dict[str, Any] = json.loads(p.stdout)
        return result
    finally:
        os.unlink(f.name)


def status_exts(res: dict[str, Any], *, raw: bool = False) -> dict[str, Any] | None:
    """`status --json` reduced to hierarchy -> extensions list (None if status failed). Unless
    RAW, "not merged" is [] whichever way it is spelt: 262 and overlayctl say [], 257 "none"
    (see test_status_spells_unmerged_as_262)."""
    if res["rc"] != 0:
        return None
    return {h["hierarchy"]: [] if h["extensions"] == "none" and not raw else h["extensions"]
            for h in json.loads(res["out"])}


def scenario_steps(sc: Scenario, tool: str) -> list[list[str]]:
    """Merge; look; create a file, modify a base file (copy-up), delete an extension file
    (whiteout); look; status; unmerge; look; status."""
    t = f"{tool}:{sc.cls}"
    mode = [f"--mutable={sc.mode}"] if sc.mode else []
    return [["snap"], ["run", t, "merge", "--no-reload", *mode], ["snap"],
            ["write", f"{sc.hier}/{N}", "N"], ["write", f"{sc.hier}/{H}", "H2"],
            ["rm", f"{sc.hier}/{E}"], ["snap"],
            ["run", t, "status", "--json=short"],
            ["run", t, "unmerge", "--no-reload"], ["snap"],
            ["run", t, "status", "--json=short"]]


def observe(res: dict[str, Any]) -> dict[str, Any]:
    """What a user sees, from a scenario_steps() run."""
    s = res["steps"]
    return {"before": s[0], "merge_ok": s[1]["rc"] == 0, "merged": s[2], "write": s[3:6],
            "written": s[6], "status": status_exts(s[7]), "status_raw": status_exts(s[7], raw=True),
            "unmerge_ok": s[8]["rc"] == 0, "after": s[9], "status_after": status_exts(s[10]),
            "status_after_raw": status_exts(s[10], raw=True), "left": res["left"],
            "stderr": s[1]["err"]}


def run_scenario(root: Root, sc: Scenario, peer: Upstream | None) -> dict[str, Any]:
    """Build SC below ROOT and run it with upstream PEER (in its own namespace) or, with PEER
    None, with overlayctl (in the caller's namespace)."""
    build(root, sc)
    res = run_plan(root.path, scenario_steps(sc, "up" if peer else "oc"), peer=peer,
                   ro=[sc.hier] if sc.ro else [], namespace=peer is not None)
    return observe(res)


# -- summaries for the report ------------------------------------------------------------------

MARK = {E: "E", H: "H", U: "U", N: "N", "only-in-10": "10", "base-opt-file": "O"}


def markers(snap: dict[str, Any], hier: str) -> str:
    files = snap["files"]
    out = [MARK[k.split("/", 1)[1]] for k in files
           if k.startswith(hier + "/") and k.count("/") == 1 and k.split("/", 1)[1] in MARK]
    conflict = files.get(f"{hier}/conflicting-file")
    if conflict:
        out.append("C=" + conflict.split()[-1].removeprefix("conflict-"))
    order = "EHUON1C"
    return "+".join(sorted(out, key=lambda m: order.index(m[0]))) or "-"


def new_file_places(snap: dict[str, Any], hier: str) -> str:
    places = [k.rsplit("/", 1)[0] for k in snap["files"]
              if k.endswith("/" + N) and k != f"{hier}/{N}"]
    return ", ".join(places)


def summary(obs: dict[str, Any], hier: str) -> str:
    if not obs["merge_ok"]:
        after = markers(obs["after"], hier) if obs["after"]["files"] else "-"
        return f"**merge fails**; after: {after}"
    m = obs["merged"]
    rw = "rw" if m["writable"].get(hier) else "ro"
    parts = [f"{markers(m, hier)}, {rw}"]
    if obs["write"][0] == "ok":
        landed = new_file_places(obs["written"], hier)
        parts.append(f"N → {landed or 'overlay only'}")
    st = obs["status"] or {}
    exts = st.get(f"/{hier}")
    parts.append(f"status: {','.join(exts) if isinstance(exts, list) else exts}")
    kept = new_file_places(obs["after"], hier)
    after = markers(obs["after"], hier)
    parts.append(f"after unmerge: {after}" + (f" (N kept in {kept})" if kept else ""))
    if obs["left"]:
        parts.append(f"LEFT MOUNTED: {obs['left']}")
    return "; ".join(parts)


def diff(a: Any, b: Any) -> Any:
    """The parts of two observations that differ, as {key: (a, b)}, for assertion messages."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: diff(a.get(k), b.get(k)) for k in sorted(set(a) | set(b), key=str)
                if a.get(k) != b.get(k)}
    return (a, b)
