"""Runs every scenario of test_peer.py with each available upstream build (262, and 257 if built)
and with overlayctl, and prints the Markdown table used in docs/upstream-comparison.md.

    cd /work/main && \
        unshare -m --propagation private .venv/bin/python -m tests.integration.peer_report

Needs root; everything happens below a temporary directory, in that private namespace.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.conftest import Root, umount_all_below
from tests.integration.peer import (
    Upstream,
    all_peers,
    build,
    diff,
    run_plan,
    run_scenario,
    status_exts,
    summary,
)
from tests.integration.test_peer import (
    DROPS_WHITEOUT,
    HALFWAY,
    KEYS,
    ODD_NAMES,
    REFRESH,
    SCENARIOS,
    SELF_IMPORT,
    SINGLE_LOWER,
    refresh_steps,
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _same(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return all(a[k] == b[k] for k in keys)


def scenario_rows(peers: list[Upstream], tmp: Path) -> list[str]:
    head = ["scenario", "setup", *(f"upstream {p.name}" for p in peers), "overlayctl",
            "overlayctl = 262?"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, sc in enumerate(SCENARIOS + SINGLE_LOWER + ODD_NAMES + HALFWAY + SELF_IMPORT):
        obs = []
        for j, peer in enumerate([*peers, None]):
            r = Root(tmp / f"{i}-{j}")
            if sc.cls == "confext" and peer is not None and not peer.confext:
                obs.append(None)
                continue
            obs.append(run_scenario(r, sc, peer))
            umount_all_below(str(r.path))
        oc = obs[-1]
        assert oc is not None
        cells = [summary(o, sc.hier) if o else "n/a" for o in obs]
        up262 = obs[0] if peers and peers[0].name == "262" else None
        if up262 is None:
            verdict = "-"
        elif _same(up262, oc, KEYS):
            verdict = "same"
        elif sc.id in DROPS_WHITEOUT and _same(
                {**up262, "after": {**up262["after"], "files": {
                    k: v for k, v in up262["after"]["files"].items()
                    if k != f"{sc.hier}/preexisting-file-in-extension-image"}}}, oc, KEYS):
            verdict = "deliberate: the whiteout of E dropped at unmerge (item 8)"
        else:
            verdict = "**differs**: " + ", ".join(k for k in KEYS if up262[k] != oc[k])
            print(f"{sc.id}: {diff(up262, oc)}", file=sys.stderr)
        rows.append("| " + " | ".join(_cell(c) for c in [sc.id, sc.describe(), *cells,
                                                           verdict]) + " |")
    return rows


def refresh_rows(peers: list[Upstream], tmp: Path) -> list[str]:
    head = ["refresh scenario", *(f"upstream {p.name}" for p in peers), "overlayctl"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (sc, how) in enumerate(REFRESH):
        cells = []
        for j, peer in enumerate([*peers, None]):
            if sc.cls == "confext" and peer is not None and not peer.confext:
                cells.append("n/a")
                continue
            r = Root(tmp / f"r{i}-{j}")
            build(r, sc)
            res = run_plan(r.path, refresh_steps(sc, "up" if peer else "oc", how), peer=peer,
                           namespace=peer is not None)
            umount_all_below(str(r.path))
            s = res["steps"][:2] + res["steps"][4:] if how == "added" else res["steps"]
            if s[2]["rc"] != 0:
                cells.append("refresh fails: " + s[2]["err"].strip().splitlines()[-1])
                continue
            files = s[3]["files"]
            seen = [f for f in ("new-file", "second-file") if f"{sc.hier}/{f}" in files]
            wd = sorted({k.split("/")[-2] for k in files if "-workdir" in k})
            st = status_exts(s[4]) or {}
            cells.append(f"after refresh: {'+'.join(seen) or 'neither'} visible; "
                         f"status {st.get('/' + sc.hier)}" + (f"; work dirs {wd}" if wd else ""))
        rows.append("| " + " | ".join(_cell(c) for c in [f"{sc.describe()}, {how}", *cells])
                    + " |")
    return rows


def main() -> int:
    peers = all_peers()
    if not peers:
        print("no upstream peer", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="peer-report-"))
    try:
        print("\n".join(scenario_rows(peers, tmp)))
        print()
        print("\n".join(refresh_rows(peers, tmp)))
    finally:
        umount_all_below(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
