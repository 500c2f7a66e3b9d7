#!/usr/bin/env python3
"""overlayctl benchmark suite (issues 5 and 14): the driver.

    sudo python3 bench/run.py [--quick] [--only merge,local,...] [--upstream PATH]

Builds its trees in a temporary directory and times whole processes side by side in one run,
interleaved: overlayctl through the lean launcher (as the Debian package starts it) and
through .venv/bin/overlayctl, upstream systemd-sysext 262 (found as tests/integration/peer.py
finds it, or --upstream / $SYSTEMD_SYSEXT), and the floor, `python -I -S -c 'import ctypes'`.
Everything happens with --root=<tmpdir> inside a private mount namespace (the script
re-executes itself under `unshare -m --propagation private`), in which /run is a fresh tmpfs
and the temporary directory is a *shared* bind mount, as upstream needs it. Nothing outside
the temporary directory is touched, and no mount outlives the run.

measure.py measures, report.py checks the targets and writes the report, plot.py draws.
Output: the markdown report on stdout (also bench/out/latest.md), raw numbers as JSON in
bench/out/, and the plot (docs/perf-merge.svg on a full run, bench/out/perf-merge-quick.svg
with --quick or --only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import plot
import report
from measure import CLASSES, KERNEL_MAX_EXT, MODES, OUT, REPO, log

NS_MARK = "OVERLAYCTL_BENCH_IN_NS"
PARTS = ("merge", "memory", "limit", "local", "startup", "swap", "hygiene", "profile")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", help="systemd-sysext binary to compare with (default: "
                    "$SYSTEMD_SYSEXT, else the 262 peer of tools/peer.sh); systemd-confext is "
                    "looked for beside it")
    ap.add_argument("--upstream-confext", help="systemd-confext binary")
    ap.add_argument("--no-upstream", action="store_true", help="time overlayctl only")
    ap.add_argument("--no-venv", action="store_true", help="leave out .venv/bin/overlayctl")
    ap.add_argument("--overlayctl", help="command that runs overlayctl instead of the launcher")
    ap.add_argument("--baseline", help="another checkout of overlayctl (a worktree of main, "
                    "say) to time as 'baseline' beside this one, through its own launcher")
    ap.add_argument("--quick", action="store_true", help="few counts and cycles, to debug")
    ap.add_argument("--reps", type=int, help="cycles per cell (default 7, quick 2)")
    ap.add_argument("--counts", help="extension counts (default 1,10,50,90)")
    ap.add_argument("--modes", help=f"mutable modes (default {','.join(MODES)})")
    ap.add_argument("--classes", help="sysext,confext (default both)")
    ap.add_argument("--diff-sizes", help="/etc sizes for diff (default 1000,5000,20000)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"parts to run: {','.join(PARTS)}")
    ap.add_argument("--tmpdir", default="/tmp", help="where the temporary trees go")
    ap.add_argument("--plot", help="where the plot goes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary trees")
    ap.add_argument("--max-load", type=float, default=0.0,
                    help="wait (up to 10 minutes) until the 1-minute load average is below this")
    a = ap.parse_args(argv)
    a.reps = a.reps or (2 if a.quick else 7)
    a.counts = [int(x) for x in a.counts.split(",")] if a.counts else (
        [1, 10] if a.quick else [1, 10, 50, 90])
    a.modes = tuple(a.modes.split(",")) if a.modes else (("no", "yes") if a.quick else MODES)
    a.classes = tuple(a.classes.split(",")) if a.classes else CLASSES
    a.diff_sizes = [int(x) for x in a.diff_sizes.split(",")] if a.diff_sizes else (
        [1000, 5000] if a.quick else [1000, 5000, 20000])
    a.only = set(a.only.split(","))
    unknown = a.only - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return a


def wait_for_load(limit: float) -> None:
    if limit <= 0:
        return
    for _ in range(60):
        if float(measure.loadavg()[0]) < limit:
            return
        log(f"load {measure.loadavg()[0]} >= {limit}: waiting")
        time.sleep(10)


def main() -> None:
    args = parse_args(sys.argv[1:])
    if os.geteuid() != 0:
        sys.exit("bench: run as root (sudo python3 bench/run.py): merging mounts overlays")
    if os.environ.get(NS_MARK) != "1":
        if not shutil.which("unshare"):
            sys.exit("bench: needs unshare (util-linux)")
        env = dict(os.environ, **{NS_MARK: "1"})
        os.execvpe("unshare", ["unshare", "-m", "--propagation", "private", "--",
                               sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)
    t_start = time.monotonic()
    tools = measure.Tools(args)
    # Children get a clean environment: no SYSTEMD_*/OVERLAYCTL_* settings and no PYTHON*
    # variables (PYTHONDONTWRITEBYTECODE would make the venv's runs compile overlayctl from
    # source, which no installed system does; the launcher's -I ignores them anyway).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SYSTEMD_", "OVERLAYCTL_", "PYTHON")) and k != NS_MARK}
    r = measure.Runner(env)
    # The byte code the runs use must exist beforehand: compile it once, as an install does.
    subprocess.run([tools.python, "-m", "compileall", "-q", str(REPO / "overlayctl")],
                   check=True, env=env)
    wait_for_load(args.max_load)
    # the namespace: /run a fresh tmpfs, the temporary directory a shared bind mount
    measure.sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    tmp = Path(tempfile.mkdtemp(prefix="ob", dir=args.tmpdir))
    measure.sh("mount", "--bind", str(tmp), str(tmp))
    measure.sh("mount", "--make-rshared", str(tmp))
    res: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                           "quick": args.quick, "reps": args.reps, "counts": args.counts,
                           "machine": measure.machine(tools), "tmp": str(tmp)}
    log(f"trees in {tmp}; overlayctl: {tools.ovl}; upstream: {tools.up or 'none'}; load "
        f"{' '.join(measure.loadavg())}")
    try:
        t0 = time.monotonic()
        counts = sorted(set(args.counts))
        big = [KERNEL_MAX_EXT] if args.only & {"memory", "limit"} else []
        for cls in args.classes:
            for n in sorted({*counts, *big}):
                measure.make_ext_tree(tmp / f"{cls[0]}{n}", cls, n)
        if not (tmp / "s1").exists():
            measure.make_ext_tree(tmp / "s1", "sysext", 1)
        if "swap" in args.only and not (tmp / "s10").exists():
            measure.make_ext_tree(tmp / "s10", "sysext", 10)
        log(f"built extension trees in {time.monotonic() - t0:.1f}s")
        if "merge" in args.only:
            res["merge"] = measure.bench_merge(args, tools, r, tmp, counts, args.classes,
                                               args.modes)
        if "startup" in args.only:
            res["startup"] = measure.bench_startup(args, tools, r, tmp)
        if "memory" in args.only:
            res["memory"] = measure.peak_memory(tools, r, tmp)
        if "local" in args.only:
            res["local"] = measure.bench_local(args, tools, r, tmp)
        if "swap" in args.only:
            res["swap"] = measure.bench_swap(args, tools, r, tmp)
        if "hygiene" in args.only:
            import hygiene
            res["hygiene"] = hygiene.bench_hygiene(args, tools, r, tmp)
        if "limit" in args.only and tools.up:
            res["upstream_limit"] = []
            for cls in args.classes:
                if cls in tools.up:
                    for mode in args.modes:
                        tree = tmp / f"{cls[0]}{KERNEL_MAX_EXT}"
                        p = measure.probe_upstream_limit(tools, r, tree, cls, KERNEL_MAX_EXT,
                                                         mode)
                        log(f"upstream {cls} {mode}: merges up to {p['max_ok']}")
                        res["upstream_limit"].append(p)
        if "profile" in args.only:
            jobs: list[tuple[str, Path, list[str], str | None]] = [
                ("merge-sysext-1", tmp / "s1", ["sysext", "merge", "--no-reload"], "sysext")]
            if (tmp / "s90").exists():
                jobs.append(("merge-sysext-90-yes", tmp / "s90",
                             ["sysext", "merge", "--no-reload", "--mutable=yes"], "sysext"))
            if res.get("local"):
                size = 5000 if 5000 in args.diff_sizes else args.diff_sizes[-1]
                jobs.append((f"diff-content-{size}", tmp / f"etc{size}",
                             ["diff", "--content", "/etc"], None))
            res["profile"] = measure.profile(tools, r, jobs)
    finally:
        left = measure.force_unmount(tmp)
        if left:
            log(f"warning: unmounted leftovers {left}")
        subprocess.run(["umount", str(tmp)], stderr=subprocess.DEVNULL)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["umount", "/run"], stderr=subprocess.DEVNULL)
    res["duration_s"] = time.monotonic() - t_start
    res["machine"]["loadavg_end"] = measure.loadavg()
    res["analysis"] = report.analyse(res)
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    partial = args.quick or args.only != set(PARTS)
    jp = OUT / f"results-{stamp}{'-quick' if partial else ''}.json"
    jp.write_text(json.dumps(res, indent=1))
    shutil.copy(jp, OUT / ("latest-quick.json" if partial else "latest.json"))
    if res.get("merge"):
        path = Path(args.plot) if args.plot else (
            OUT / "perf-merge-quick.svg" if partial else REPO / "docs/perf-merge.svg")
        res["plot"] = {"path": str(path), "how": plot.make_plot(res, path, jp)}
        log(f"plot: {path} ({res['plot']['how']})")
    md = report.report(res)
    (OUT / ("latest-quick.md" if partial else "latest.md")).write_text(md)
    print(md)
    log(f"JSON: {jp}; total {res['duration_s']:.0f}s")


if __name__ == "__main__":
    main()
