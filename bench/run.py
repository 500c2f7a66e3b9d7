#!/usr/bin/env python3
"""overlayctl benchmark suite (issue 5).

    sudo python3 bench/run.py [--upstream PATH] [--quick]

Builds its trees in a temporary directory and times whole processes, overlayctl and (when
given, or from $SYSTEMD_SYSEXT) an upstream systemd-sysext side by side, interleaved, in one
run. Everything happens with --root=<tmpdir> inside a private mount namespace (the script
re-executes itself under `unshare -m --propagation private`), in which /run is a fresh tmpfs
and the temporary directory is a *shared* bind mount, as upstream systemd-sysext needs it.
Nothing outside the temporary directory is touched, and no mount outlives the run.

Output: a markdown report on stdout (also bench/out/latest.md), raw numbers as JSON in
bench/out/, and a plot of merge time against the number of extensions (docs/perf-merge.svg on
a full run, bench/out/perf-merge-quick.svg with --quick). Only the standard library is needed;
matplotlib is used for the plot when it can be imported (or from bench/.venv), otherwise the
SVG is written by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import pstats
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
NS_MARK = "OVERLAYCTL_BENCH_IN_NS"
CLASSES = ("sysext", "confext")
MODES = ("no", "yes", "host", "ephemeral")  # host = yes with extensions.mutable/<h> -> /<h>
MODE_ARG = {"no": "no", "yes": "yes", "host": "yes", "ephemeral": "ephemeral"}
VERBS = ("merge", "refresh", "refresh-noop", "unmerge")
MiB = 1024.0  # ru_maxrss is in KiB on Linux
KERNEL_MAX_EXT = 498  # overlayfs: at most 500 lower layers = meta + extensions + host dir


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


class Runner:
    """Runs one process at a time and records wall time and exit status. With mem=True the
    command runs under GNU time (/usr/bin/time -f %M), whose ru_maxrss is that of the command
    alone: a child forked straight from this Python process would inherit its ~20 MiB as the
    high-water mark (Linux keeps maxrss across exec), so timed runs are never wrapped and peak
    memory comes from separate, wrapped runs."""

    TIME = shutil.which("time", path="/usr/bin:/bin")

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.err = tempfile.TemporaryFile()
        fd, self.memfile = tempfile.mkstemp(prefix="bench-rss")
        os.close(fd)

    def run(self, cmd: list[str], stdout: Any = subprocess.DEVNULL,
            mem: bool = False) -> dict[str, Any]:
        self.err.seek(0)
        self.err.truncate()
        if mem and self.TIME:
            cmd = [self.TIME, "-f", "%M", "-o", self.memfile, *cmd]
        t0 = time.perf_counter_ns()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=self.err,
                             env=self.env)
        _, status, ru = os.wait4(p.pid, 0)
        t1 = time.perf_counter_ns()
        p.returncode = os.waitstatus_to_exitcode(status)
        self.err.seek(0)
        err = self.err.read().decode(errors="replace")
        rss = ru.ru_maxrss
        if mem and self.TIME:
            try:
                rss = int(Path(self.memfile).read_text().split()[-1])
            except (OSError, ValueError, IndexError):
                rss = 0
        return {"ms": (t1 - t0) / 1e6, "rc": p.returncode, "rss_kib": rss if mem else None,
                "stderr": err}


def mounts_below(root: Path) -> list[str]:
    """Mount points strictly below root (root itself is our shared bind mount)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from overlayctl import mountinfo
    prefix = str(root) + "/"
    return [m.mountpoint for m in mountinfo.read() if m.mountpoint.startswith(prefix)]


def force_unmount(root: Path) -> list[str]:
    left = mounts_below(root)
    for mp in sorted(left, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
    return left


def stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2],
            "n": len(s)}


def fmt_ms(st: dict[str, float] | None, spread: bool = True) -> str:
    if not st:
        return "—"
    m = st["median"]
    d = 1 if m < 100 else 0
    if not spread:
        return f"{m:.{d}f}"
    return f"{m:.{d}f} [{st['min']:.{d}f}–{st['max']:.{d}f}]"


# ----------------------------------------------------------------------------- trees


def write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def make_base(root: Path, etc_files: int) -> None:
    """A host tree: /usr with os-release and some files, /opt empty, an /etc of etc_files
    files in directories of 50, and the extension search directories."""
    write(root / "usr/lib/os-release", "ID=debian\nVERSION_ID=13\nPRETTY_NAME=bench\n")
    for i in range(50):
        write(root / f"usr/share/base/f{i:03d}", f"base {i}\n")
    (root / "opt").mkdir(exist_ok=True)
    for i in range(etc_files):
        write(root / f"etc/d{i // 50:03d}/f{i % 50:02d}.conf", f"key{i}=value{i}\n")
    (root / "var/lib/extensions").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/confexts").mkdir(parents=True, exist_ok=True)


def ext_dir(root: Path, cls: str) -> Path:
    return root / ("var/lib/extensions" if cls == "sysext" else "var/lib/confexts")


def make_ext(root: Path, cls: str, name: str) -> None:
    """A directory extension: a release file (ID=_any) and four files."""
    e = ext_dir(root, cls) / name
    if cls == "sysext":
        write(e / f"usr/lib/extension-release.d/extension-release.{name}", "ID=_any\n")
        for f in ("a", "b", "c"):
            write(e / f"usr/share/{name}/{f}", f"{name} {f}\n")
        write(e / f"usr/lib/{name}/lib.conf", f"{name}\n")
    else:
        write(e / f"etc/extension-release.d/extension-release.{name}", "ID=_any\n")
        for f in ("a", "b", "c"):
            write(e / f"etc/{name}/{f}.conf", f"{name} {f}\n")
        write(e / f"etc/{name}.conf", f"{name}\n")


def hierarchies(cls: str) -> tuple[str, ...]:
    return ("usr", "opt") if cls == "sysext" else ("etc",)


def set_mutable_state(root: Path, cls: str, mode: str) -> None:
    """mode yes: empty real mutable dirs; host: extensions.mutable/<h> -> /<h> (the hierarchy
    is the upper); other modes: left as they are (not used)."""
    m = root / "var/lib/extensions.mutable"
    m.mkdir(parents=True, exist_ok=True)
    for h in hierarchies(cls):
        p = m / h
        if mode == "yes":
            if p.is_symlink():
                p.unlink()
            p.mkdir(exist_ok=True)
        elif mode == "host":
            if p.is_symlink():
                continue
            if p.exists():
                shutil.rmtree(p)
            p.symlink_to("/" + h)


# ----------------------------------------------------------------------------- the tools


class Tools:
    def __init__(self, args: argparse.Namespace):
        if args.overlayctl:
            self.ovl = shlex.split(args.overlayctl)
        elif (REPO / ".venv/bin/overlayctl").exists():
            self.ovl = [str(REPO / ".venv/bin/overlayctl")]
        else:
            self.ovl = [sys.executable, "-m", "overlayctl"]
        vpy = REPO / ".venv/bin/python"
        self.python = str(vpy) if vpy.exists() else sys.executable
        up = args.upstream or os.environ.get("SYSTEMD_SYSEXT") or ""
        self.up: dict[str, list[str]] = {}
        if up:
            upp = Path(up)
            if not upp.exists():
                sys.exit(f"bench: upstream binary {up} does not exist")
            self.up["sysext"] = [str(upp)]
            cx = args.upstream_confext or os.environ.get("SYSTEMD_CONFEXT") or ""
            if not cx:
                cand = upp.with_name(upp.name.replace("sysext", "confext"))
                if cand != upp and cand.exists():
                    cx = str(cand)
            if cx:
                self.up["confext"] = [str(cx)]

    def cmd(self, tool: str, cls: str, root: Path, verb: str, mode: str | None = None) -> list[str]:
        extra = []
        if verb == "refresh":
            extra.append("--always-refresh=yes")
        v = "refresh" if verb.startswith("refresh") else verb
        if mode is not None and v in ("merge", "refresh"):
            extra.append(f"--mutable={MODE_ARG[mode]}")
        if tool == "overlayctl":
            return [*self.ovl, f"--root={root}", cls, v, "--no-reload", *extra]
        return [*self.up[cls], f"--root={root}", v, "--no-reload", *extra]

    def tools_for(self, cls: str) -> list[str]:
        return ["overlayctl", *(["upstream"] if cls in self.up else [])]


# ----------------------------------------------------------------------------- benchmarks


def check_merged(root: Path, cls: str, names: list[str] | None = None) -> bool:
    return not merge_problem(root, cls, names)


def merge_problem(root: Path, cls: str, names: list[str] | None = None) -> str:
    """'' when the hierarchy is an overlay that shows a base file and the first and last
    extension of NAMES; else what is wrong. (Upstream can exit 0 with a truncated layer list.)"""
    h = "usr" if cls == "sysext" else "etc"
    if str(root / h) not in mounts_below(root):
        return "nothing mounted"
    base = root / ("usr/share/base/f000" if cls == "sysext" else "etc/d000/f00.conf")
    if not base.exists():
        return f"merged /{h} lacks the host's files"
    if names:
        missing = [nm for nm in (names[0], names[-1]) if not (
            root / (f"usr/share/{nm}/a" if cls == "sysext" else f"etc/{nm}.conf")).exists()]
        if missing:
            return f"merged /{h} lacks extension {missing[0]}"
    return ""


def bench_merge(args: argparse.Namespace, tools: Tools, r: Runner, tmp: Path,
                counts: dict[str, list[int]]) -> list[dict[str, Any]]:
    """For each class and mode: one untimed warm-up per count and tool (under GNU time, for
    the peak memory), then repetitions in which every count and both tools take turns, so
    that a change of load on the machine hits all counts and both tools alike."""
    rows: list[dict[str, Any]] = []
    for cls in CLASSES:
        tl = tools.tools_for(cls)
        for mode in MODES:
            cells: dict[int, dict[str, Any]] = {}
            for n in counts[cls]:
                root = tmp / f"{cls[0]}{n}"
                set_mutable_state(root, cls, mode)
                c: dict[str, Any] = {"root": root, "names": [f"e{i:03d}" for i in range(n)],
                                     "runs": {t: {v: [] for v in VERBS} for t in tl},
                                     "failed": {}, "peak": {t: {} for t in tl}}
                slow = 0.0
                for t in tl:
                    for v in ("merge", "refresh-noop", "refresh", "unmerge"):
                        w = r.run(tools.cmd(t, cls, root, v, mode), mem=True)
                        c["peak"][t][v] = w["rss_kib"] or 0
                        slow = max(slow, w["ms"])
                    force_unmount(root)
                # fewer repetitions where one process takes seconds (keeps the run < 15 min)
                c["reps"] = args.reps if slow < 2000 else min(args.reps, 3)
                cells[n] = c
            for rep in range(args.reps):
                order = tl if rep % 2 == 0 else tl[::-1]
                ns = counts[cls] if rep % 2 == 0 else counts[cls][::-1]
                for n in ns:
                    c = cells[n]
                    if rep >= c["reps"]:
                        continue
                    root, names, cell, failed = c["root"], c["names"], c["runs"], c["failed"]
                    for t in order:
                        if t in failed:
                            continue
                        res = r.run(tools.cmd(t, cls, root, "merge", mode))
                        problem = merge_problem(root, cls, names) if res["rc"] == 0 else ""
                        ok = res["rc"] == 0 and not problem
                        res["ok"] = ok
                        cell[t]["merge"].append(res)
                        if not ok:
                            msg = res["stderr"].strip().splitlines()
                            failed[t] = (f"exit {res['rc']}: " + (msg[-1] if msg else "")
                                         if res["rc"] else f"exit 0 but {problem}")
                            r.run(tools.cmd(t, cls, root, "unmerge"))
                            force_unmount(root)
                            continue
                        for v in ("refresh", "refresh-noop"):
                            res = r.run(tools.cmd(t, cls, root, v, mode))
                            res["ok"] = res["rc"] == 0 and check_merged(root, cls, names)
                            cell[t][v].append(res)
                        res = r.run(tools.cmd(t, cls, root, "unmerge"))
                        left = mounts_below(root)
                        res["ok"] = res["rc"] == 0 and not left
                        cell[t]["unmerge"].append(res)
                        if left:
                            force_unmount(root)
            for n in counts[cls]:
                c = cells[n]
                row: dict[str, Any] = {"class": cls, "mode": mode, "n": n, "reps": c["reps"],
                                       "tools": {}}
                for t in tl:
                    tr: dict[str, Any] = {"failed": c["failed"].get(t)}
                    for v in VERBS:
                        runs = c["runs"][t][v]
                        good = [x for x in runs if x["ok"]]
                        tr[v] = {"stats": stats([x["ms"] for x in good]),
                                 "raw_ms": [round(x["ms"], 3) for x in runs],
                                 "bad": len(runs) - len(good),
                                 "peak_rss_kib": c["peak"][t][v]}
                        bad = [x for x in runs if not x["ok"]]
                        if bad and v != "merge":
                            tr[v]["error"] = bad[0]["stderr"].strip()[-300:]
                    row["tools"][t] = tr
                rows.append(row)
                o = row["tools"]["overlayctl"]["merge"]["stats"]
                u = row["tools"].get("upstream", {}).get("merge", {}).get("stats")
                log(f"{cls:7} {mode:9} n={n:<4} merge overlayctl {fmt_ms(o, False)} ms"
                    + (f", upstream {fmt_ms(u, False) if u else 'FAILED'}" if "upstream" in tl
                       else ""))
    rows.sort(key=lambda r: (CLASSES.index(r["class"]), r["n"], MODES.index(r["mode"])))
    return rows


def probe_upstream_limit(tools: Tools, r: Runner, root: Path, cls: str, nmax: int,
                         mode: str) -> dict[str, Any]:
    """Largest number of extensions upstream merges, by bisection: extensions above k are
    parked outside the search directory."""
    set_mutable_state(root, cls, mode)
    src = ext_dir(root, cls)
    park = root / "var/lib/parked"
    park.mkdir(exist_ok=True)
    names = sorted(os.listdir(src))

    def try_k(k: int) -> tuple[bool, str]:
        for nm in names[:k]:
            if not (src / nm).exists():
                os.rename(park / nm, src / nm)
        for nm in names[k:]:
            if (src / nm).exists():
                os.rename(src / nm, park / nm)
        res = r.run(tools.cmd("upstream", cls, root, "merge", mode))
        problem = merge_problem(root, cls, names[:k]) if res["rc"] == 0 else ""
        ok = res["rc"] == 0 and not problem
        r.run(tools.cmd("upstream", cls, root, "unmerge"))
        force_unmount(root)
        lines = res["stderr"].strip().splitlines()
        return ok, (f"exit 0 but {problem}" if problem else
                    f"exit {res['rc']}: " + (lines[-1] if lines else ""))

    out: dict[str, Any] = {"class": cls, "mode": mode, "tested_up_to": nmax}
    ok, msg = try_k(nmax)
    if ok:
        out["max_ok"] = nmax
    else:
        out["error_at_fail"] = msg
        lo, hi = 1, nmax
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok, m = try_k(mid)
            if ok:
                lo = mid
            else:
                hi, out["error_at_fail"] = mid, m
        out["max_ok"], out["first_fail"] = lo, hi
    try_k(len(names))
    park.rmdir()
    # upstream bind-mounts each extension to /run/systemd/sysext/{extensions,confexts}/NAME and
    # passes lowerdir=... as one mount option string, which the kernel takes up to one page
    kind = "extensions" if cls == "sysext" else "confexts"
    out["lowerdir_path_len"] = len(f"/run/systemd/sysext/{kind}/{names[0]}/{hierarchies(cls)[0]}:")
    return out


def build_upper(root: Path, entries: int, r: Runner, tools: Tools) -> dict[str, Any]:
    """A root whose /etc upper (var/lib/extensions.mutable/etc) holds about `entries` entries:
    merge --mutable=yes with a defaults layer, write through the merged /etc (new files,
    modified, touched and deleted defaults), unmerge."""
    make_base(root, 100)
    ndef = max(100, int(entries * 0.30))
    for i in range(ndef):
        write(root / f"usr/share/factory/etc/def/d{i // 100:04d}/f{i % 100:02d}.conf",
              f"default {i}\n")
    make_ext(root, "confext", "c0")
    set_mutable_state(root, "confext", "yes")
    res = r.run([*tools.ovl, f"--root={root}", "confext", "merge", "--no-reload",
                 "--mutable=yes", "--defaults=/usr/share/factory/etc"])
    if res["rc"] != 0 or not check_merged(root, "confext"):
        raise SystemExit(f"bench: could not merge the diff tree: {res['stderr']}")
    etc = root / "etc"
    nmod, nid, ndel = int(entries * 0.20), int(entries * 0.05), int(entries * 0.05)
    i = 0
    # modified defaults (copy-up + new content); dirs above them are copied up too
    for _ in range(nmod):
        p = etc / f"def/d{i // 100:04d}/f{i % 100:02d}.conf"
        with open(p, "a") as f:
            f.write("local change\n")
        i += 1
    for _ in range(nid):  # identical copies (touch copies up with metacopy=off)
        os.utime(etc / f"def/d{i // 100:04d}/f{i % 100:02d}.conf")
        i += 1
    for _ in range(ndel):  # whiteouts
        os.unlink(etc / f"def/d{i // 100:04d}/f{i % 100:02d}.conf")
        i += 1
    untouched = f"/etc/def/d{i // 100:04d}/f{i % 100:02d}.conf" if i < ndef else None
    upper = root / "var/lib/extensions.mutable/etc"
    have = sum(len(d) + len(f) for _, d, f in os.walk(upper))
    j = 0
    while have < entries:  # added files in new directories of 100
        d = etc / f"local/d{j // 100:04d}"
        if j % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
            have += 1 + (1 if j == 0 else 0)
        (d / f"f{j % 100:02d}").write_text(f"local {j}\n")
        have += 1
        j += 1
    res = r.run([*tools.ovl, f"--root={root}", "confext", "unmerge", "--no-reload"])
    if res["rc"] != 0 or mounts_below(root):
        raise SystemExit(f"bench: could not unmerge the diff tree: {res['stderr']}")
    total = sum(len(d) + len(f) for _, d, f in os.walk(upper))
    return {"entries": total, "defaults": ndef, "modified": nmod, "identical": nid,
            "deleted": ndel, "added": j, "which_default": untouched or "/etc/d000/f00.conf",
            "which_upper": "/etc/local/d0000/f00"}


def bench_diff(args: argparse.Namespace, tools: Tools, r: Runner,
               tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for size in args.diff_sizes:
        root = tmp / f"d{size}"
        t0 = time.monotonic()
        info = build_upper(root, size, r, tools)
        log(f"diff tree {size}: {info['entries']} upper entries built in "
            f"{time.monotonic() - t0:.1f}s")
        upper = root / "var/lib/extensions.mutable/etc"
        cases = {
            "find -printf (floor)": ["find", str(upper), "-printf", "%y %m %U %G %s %T@ %p\n"],
            "overlayctl diff": [*tools.ovl, f"--root={root}", "diff"],
            "overlayctl diff --json=short": [*tools.ovl, f"--root={root}", "diff", "--json=short"],
            "overlayctl which (default)": [*tools.ovl, f"--root={root}", "which",
                                           info["which_default"]],
            "overlayctl which (upper)": [*tools.ovl, f"--root={root}", "which",
                                         info["which_upper"]],
        }
        reps = args.reps if size <= 10000 else max(2, args.reps - 2)
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
        peak: dict[str, int] = {}
        for k, c in cases.items():  # warm-up (page cache, .pyc), under GNU time for memory
            w = r.run(c, mem=True)
            peak[k] = w["rss_kib"] or 0
            if w["rc"] != 0:
                log(f"warning: {k} exited {w['rc']}: {w['stderr'].strip()[-200:]}")
        for rep in range(reps):
            keys = list(cases) if rep % 2 == 0 else list(cases)[::-1]
            for k in keys:
                res[k].append(r.run(cases[k]))
        row = {"size": size, "tree": info, "cases": {}}
        for k, runs in res.items():
            row["cases"][k] = {"stats": stats([x["ms"] for x in runs if x["rc"] == 0]),
                               "raw_ms": [round(x["ms"], 3) for x in runs],
                               "rc": sorted({x["rc"] for x in runs}),
                               "peak_rss_kib": peak[k]}
        rows.append(row)
        f = row["cases"]["find -printf (floor)"]["stats"]
        d = row["cases"]["overlayctl diff"]["stats"]
        log(f"diff {size}: find {fmt_ms(f, False)} ms, overlayctl diff {fmt_ms(d, False)} ms")
    return rows


# ----------------------------------------------------------------------------- issue 10

HYGIENE_RE = re.compile(r"^hygiene of /usr: (\d+) opaque markers cleared, (\d+) directories "
                        r"examined, (\d+) deliberate, in ([0-9.]+) ms")
UNMERGE_HYGIENE_RE = re.compile(r"^hygiene of /usr at unmerge: ([0-9.]+) ms")
SWAP_RE = re.compile(r"^Swapped (\S+): both overlays attached for (\d+) us; the new one "
                     r"existed detached for ([0-9.]+) ms before")


def make_big_usr(root: Path, ndirs: int) -> None:
    """A host tree whose /usr has NDIRS directories of 8 files (a real /usr: about 8 files per
    directory), and 10 extensions of 20 directories each (in /usr/lib and /usr/share)."""
    make_base(root, 50)
    for i in range(ndirs):
        d = root / f"usr/share/pkg{i // 100:03d}/d{i % 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(8):
            (d / f"f{j}").write_text("x\n")
    for e in range(10):
        name = f"x{e:02d}"
        write(ext_dir(root, "sysext") / name / f"usr/lib/extension-release.d/"
              f"extension-release.{name}", "ID=_any\n")
        for k in range(20):
            where = "lib" if k % 2 else "share"
            write(ext_dir(root, "sysext") / name / f"usr/{where}/{name}/d{k:02d}/file", "e\n")


def bench_hygiene(args: argparse.Namespace, tools: Tools, r: Runner,
                  tmp: Path) -> list[dict[str, Any]]:
    """What the record of the lower layers' directories costs on the boot path (issue 10):
    in-process milliseconds from overlayctl's debug lines, for the real /usr as its own upper
    ("host") in the steady state (a record exists) and on the first merge (no record: the
    whole upper is read once), at unmerge (the whiteout scan), and for a persistent upper over
    the plain /usr; plus the whole merge, and the size of the record."""
    rows = []
    env = dict(r.env, SYSTEMD_LOG_LEVEL="debug")
    dbg = Runner(env)
    for ndirs in args.hygiene_sizes:
        root = tmp / f"h{ndirs}"
        t0 = time.monotonic()
        make_big_usr(root, ndirs)
        log(f"hygiene tree: /usr with {ndirs} directories built in {time.monotonic() - t0:.1f}s")
        row: dict[str, Any] = {"dirs": ndirs, "cases": {}}
        record = root / "var/lib/overlayctl/sysext/usr.dirs"
        for mode in ("host", "yes"):
            set_mutable_state(root, "sysext", mode)
            cases: dict[str, list[dict[str, Any]]] = {"first merge": [], "merge": [],
                                                      "unmerge": []}
            for rep in range(args.reps + 1):
                record.unlink(missing_ok=True)
                for case in ("first merge", "merge"):
                    m = dbg.run(tools.cmd("overlayctl", "sysext", root, "merge", mode))
                    u = dbg.run(tools.cmd("overlayctl", "sysext", root, "unmerge"))
                    force_unmount(root)
                    if rep == 0:
                        continue   # warm-up
                    hy = [HYGIENE_RE.match(x) for x in m["stderr"].splitlines()]
                    got = next((x for x in hy if x), None)
                    un = next((x for x in map(UNMERGE_HYGIENE_RE.match,
                                              u["stderr"].splitlines()) if x), None)
                    cases[case].append({"merge_ms": m["ms"], "rc": m["rc"],
                                        "hygiene_ms": float(got.group(4)) if got else None,
                                        "examined": int(got.group(2)) if got else None})
                    if case == "merge":
                        cases["unmerge"].append({"unmerge_ms": u["ms"],
                                                 "hygiene_ms": float(un.group(1)) if un
                                                 else None})
            label = "host (/usr its own upper)" if mode == "host" else "persistent upper"
            row["cases"][label] = {
                k: {"hygiene_ms": stats([x["hygiene_ms"] for x in v
                                         if x.get("hygiene_ms") is not None]),
                    "whole_ms": stats([x.get("merge_ms", x.get("unmerge_ms")) for x in v]),
                    "examined": next((x["examined"] for x in v if x.get("examined")), None)}
                for k, v in cases.items()}
            row["cases"][label]["record_bytes"] = record.stat().st_size if record.exists() \
                else None
        rows.append(row)
        h = row["cases"]["host (/usr its own upper)"]
        log(f"hygiene {ndirs} dirs, host: merge {fmt_ms(h['merge']['hygiene_ms'], False)} ms, "
            f"first merge {fmt_ms(h['first merge']['hygiene_ms'], False)} ms, unmerge "
            f"{fmt_ms(h['unmerge']['hygiene_ms'], False)} ms")
    return rows


def bench_window(args: argparse.Namespace, tools: Tools, r: Runner,
                 tmp: Path) -> list[dict[str, Any]]:
    """The refresh window of issue 10, item 7: per hierarchy, how long both overlays are
    attached (move_mount beneath -> the old one detached), and how long the new one existed
    detached before (it shares the upper from its creation on), from the debug line of each
    `refresh --always-refresh=yes`."""
    dbg = Runner(dict(r.env, SYSTEMD_LOG_LEVEL="debug"))
    rows = []
    for n, mode, dirty in [(n, m, d) for n in (1, 10) for m in ("yes", "host", "ephemeral")
                           for d in (0, 20)]:
        root = tmp / f"s{n}"
        if not root.exists():
            continue
        set_mutable_state(root, "sysext", mode)
        m = dbg.run(tools.cmd("overlayctl", "sysext", root, "merge", mode))
        if m["rc"] != 0:
            log(f"window: merge failed: {m['stderr'][-200:]}")
            continue
        attached: dict[str, list[float]] = {}
        detached: dict[str, list[float]] = {}
        for _ in range(args.reps * 4):
            if dirty:
                # Unwritten data on the upper's file system: what tearing down an overlay
                # with an upper syncs (a busy machine has some).
                with open(root / "dirty", "wb") as f:
                    f.write(os.urandom(dirty << 20))
            x = dbg.run(tools.cmd("overlayctl", "sysext", root, "refresh", mode))
            for line in x["stderr"].splitlines():
                mm = SWAP_RE.match(line)
                if mm:
                    h = os.path.basename(mm.group(1))
                    attached.setdefault(h, []).append(float(mm.group(2)))
                    detached.setdefault(h, []).append(float(mm.group(3)))
        dbg.run(tools.cmd("overlayctl", "sysext", root, "unmerge"))
        force_unmount(root)
        (root / "dirty").unlink(missing_ok=True)
        for h in sorted(attached):
            rows.append({"n": n, "mode": mode, "hierarchy": "/" + h, "dirty_mb": dirty,
                         "attached_us": stats(attached[h]),
                         "detached_ms": stats(detached[h])})
        log(f"window n={n} {mode} dirty={dirty} MB: " + ", ".join(
            f"/{h} {stats(v)['median']:.0f} us" for h, v in sorted(attached.items())))
    return rows


IMPORT_RE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def bench_startup(args: argparse.Namespace, tools: Tools, r: Runner, tmp: Path) -> dict[str, Any]:
    root = tmp / "s1"
    cases: dict[str, list[str]] = {
        "python -I -S -c pass (bare interpreter)": [tools.python, "-I", "-S", "-c", "pass"],
        "python -c pass (with site)": [tools.python, "-c", "pass"],
        "overlayctl --version": [*tools.ovl, "--version"],
        "python -m overlayctl --version": [tools.python, "-m", "overlayctl", "--version"],
    }
    # Where the time of a 1-extension merge goes: interpreter, site (.pth files, e.g. the
    # editable-install finder), imports, and the work. "-I -S" runs skip site; the repository
    # and the venv's site-packages (psutil) are put on sys.path by hand instead.
    sp = subprocess.run([tools.python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                         "['purelib'])"], capture_output=True, text=True, env=r.env).stdout.strip()
    boot = f"import sys; sys.path[:0] = [{str(REPO)!r}, {sp!r}]; "
    argv = ["overlayctl", f"--root={root}", "sysext", "merge", "--no-reload"]
    merge_path = ("import overlayctl.cli, overlayctl.engine, overlayctl.attach, "
                  "overlayctl.hygiene, overlayctl.local")
    cases["python -I -S: import overlayctl.cli"] = [tools.python, "-I", "-S", "-c",
                                                    boot + "import overlayctl.cli"]
    cases["python -I -S: import the merge path"] = [tools.python, "-I", "-S", "-c",
                                                    boot + merge_path]
    cases["python -I -S: sysext merge, 1 extension"] = [
        tools.python, "-I", "-S", "-c",
        boot + f"sys.argv = {argv!r}; from overlayctl.cli import main; sys.exit(main())"]
    cases["overlayctl sysext merge, 1 extension"] = tools.cmd("overlayctl", "sysext", root,
                                                              "merge", "no")
    if "sysext" in tools.up:
        cases["upstream --version"] = [*tools.up["sysext"], "--version"]
        cases["upstream sysext merge, 1 extension"] = tools.cmd("upstream", "sysext", root,
                                                                "merge", "no")
    unmerge = tools.cmd("overlayctl", "sysext", root, "unmerge")

    def one(k: str, mem: bool = False) -> dict[str, Any]:
        x = r.run(cases[k], mem=mem)
        if "merge" in k:
            r.run(unmerge)
            force_unmount(root)
        return x

    set_mutable_state(root, "sysext", "yes")
    reps = args.reps * 2
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
    peak = {k: one(k, mem=True)["rss_kib"] or 0 for k in cases}
    for rep in range(reps):
        keys = list(cases) if rep % 2 == 0 else list(cases)[::-1]
        for k in keys:
            res[k].append(one(k))
    out: dict[str, Any] = {"cases": {k: {"stats": stats([x["ms"] for x in v if x["rc"] == 0]),
                                         "rc": sorted({x["rc"] for x in v}),
                                         "peak_rss_kib": peak[k]}
                                     for k, v in res.items()}}
    # the merge work alone: imports done beforehand, timed inside the process
    work = []
    code = boot + merge_path + f"""
import time
sys.argv = {argv!r}
t = time.perf_counter()
try:
    overlayctl.cli.main()
except SystemExit:
    pass
print("WORK_MS", (time.perf_counter() - t) * 1000)
"""
    for _ in range(reps):
        x = subprocess.run([tools.python, "-I", "-S", "-c", code], capture_output=True, text=True,
                           env=r.env)
        m = re.search(r"WORK_MS (\S+)", x.stdout)
        if m:
            work.append(float(m[1]))
        r.run(unmerge)
        force_unmount(root)
    out["merge_work_in_process_ms"] = stats(work)
    # -X importtime of the merge path (sysext, 1 extension, mode no)
    per_mod: dict[str, list[tuple[int, int, int]]] = {}
    totals, walls = [], []
    cmd = [tools.python, "-X", "importtime", "-m", "overlayctl", f"--root={root}", "sysext",
           "merge", "--no-reload"]
    for _ in range(max(3, args.reps)):
        x = r.run(cmd)
        walls.append(x["ms"])
        r.run(tools.cmd("overlayctl", "sysext", root, "unmerge"))
        force_unmount(root)
        tot = 0
        for line in x["stderr"].splitlines():
            m = IMPORT_RE.match(line)
            if m:
                self_us, cum_us, depth = int(m[1]), int(m[2]), len(m[3]) // 2
                per_mod.setdefault(m[4], []).append((self_us, cum_us, depth))
                tot += self_us
        totals.append(tot / 1000)
    mods = [{"module": k, "self_ms": statistics.median(a for a, _, _ in v) / 1000,
             "cumulative_ms": statistics.median(b for _, b, _ in v) / 1000,
             "depth": v[0][2]} for k, v in per_mod.items()]
    out["importtime"] = {
        "command": " ".join(cmd),
        "total_import_ms": stats(totals),
        "wall_ms": stats(walls),
        "modules": len(mods),
        "top_self": sorted(mods, key=lambda d: -d["self_ms"])[:15],
        "top_level_cumulative": sorted((d for d in mods if d["depth"] <= 1),
                                       key=lambda d: -d["cumulative_ms"])[:15],
        "overlayctl_modules": sorted((d for d in mods if d["module"].startswith("overlayctl")),
                                     key=lambda d: -d["self_ms"]),
    }
    return out


def profile(args: argparse.Namespace, tools: Tools, r: Runner, tmp: Path,
            diff_size: int | None) -> dict[str, Any]:
    """cProfile of the slowest paths; top functions by own time and by cumulative time."""
    out: dict[str, Any] = {}
    OUT.mkdir(exist_ok=True)
    big = max(n for n in args.counts if n <= KERNEL_MAX_EXT)
    jobs = [
        ("merge-sysext-1", tmp / "s1", ["sysext", "merge", "--no-reload"], "sysext"),
        (f"merge-sysext-{big}", tmp / f"s{big}", ["sysext", "merge", "--no-reload"], "sysext"),
        (f"merge-confext-{big}-ephemeral", tmp / f"c{big}",
         ["confext", "merge", "--no-reload", "--mutable=ephemeral"], "confext"),
        (f"merge-confext-{big}-yes", tmp / f"c{big}",
         ["confext", "merge", "--no-reload", "--mutable=yes"], "confext"),
        (f"unmerge-sysext-{big}", tmp / f"s{big}", ["sysext", "unmerge", "--no-reload"], None),
    ]
    if diff_size:
        jobs.append((f"diff-{diff_size}", tmp / f"d{diff_size}", ["diff"], None))
    premerged = False
    for name, root, argv, cls in jobs:
        if name.endswith("-yes"):
            set_mutable_state(root, "confext", "yes")
        if name.startswith("unmerge"):
            r.run(tools.cmd("overlayctl", "sysext", root, "merge", "no"))
            premerged = True
        prof = OUT / f"profile-{name}.prof"
        res = r.run([tools.python, "-m", "cProfile", "-o", str(prof), "-m", "overlayctl",
                     f"--root={root}", *argv])
        if cls:
            r.run(tools.cmd("overlayctl", cls, root, "unmerge"))
        if premerged:
            premerged = False
        force_unmount(root)
        if res["rc"] != 0 or not prof.exists():
            out[name] = {"error": res["stderr"][-300:]}
            continue
        st = pstats.Stats(str(prof))
        total = st.total_tt  # type: ignore[attr-defined]

        def top(key: int, st: pstats.Stats = st) -> list[dict[str, Any]]:
            items = []
            for (fn, ln, func), (_, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
                items.append({"function": f"{_short(fn)}:{ln}({func})", "calls": nc,
                              "tottime_ms": round(tt * 1000, 2), "cumtime_ms": round(ct * 1000, 2)})
            items.sort(key=lambda d: -d["tottime_ms" if key == 0 else "cumtime_ms"])
            return items[:25]

        out[name] = {"total_ms": round(total * 1000, 1), "top_tottime": top(0),
                     "top_cumtime": top(1), "prof_file": str(prof.relative_to(REPO))}
        with open(OUT / f"profile-{name}.txt", "w") as f:
            s2 = pstats.Stats(str(prof), stream=f)
            s2.sort_stats("tottime").print_stats(30)
            s2.sort_stats("cumulative").print_stats(40)
    return out


def _short(fn: str) -> str:
    for p in (str(REPO) + "/", "/usr/lib/python3.11/"):
        if fn.startswith(p):
            return fn[len(p):]
    return fn


# ----------------------------------------------------------------------------- analysis


def linfit(pts: list[tuple[float, float]]) -> dict[str, float] | None:
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in pts)
    return {"intercept_ms": a, "slope_ms_per_ext": b,
            "r2": 1 - ss_res / ss_tot if ss_tot else 1.0, "points": n}


def merge_med(row: dict[str, Any], tool: str, verb: str = "merge") -> float | None:
    t = row["tools"].get(tool)
    if not t or (t["failed"] and verb == "merge" and not t[verb]["stats"]):
        return None
    st = t[verb]["stats"]
    return st["median"] if st else None


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["merge"]
    fits: dict[str, Any] = {}
    for cls in CLASSES:
        for mode in MODES:
            for tool in ("overlayctl", "upstream"):
                pts = [(r["n"], merge_med(r, tool)) for r in rows
                       if r["class"] == cls and r["mode"] == mode]
                good = [(x, y) for x, y in pts if y is not None]
                f = linfit(good)
                if f:
                    f["max_n_fitted"] = max(x for x, _ in good)
                    fits[f"{cls}/{mode}/{tool}"] = f
                    # overlayctl fitted over the same range upstream could do, for a fair slope
                    if tool == "overlayctl":
                        up = [x for x, y in ((r["n"], merge_med(r, "upstream")) for r in rows
                              if r["class"] == cls and r["mode"] == mode) if y is not None]
                        if up:
                            g = linfit([(x, y) for x, y in good if x <= max(up)])
                            if g:
                                g["max_n_fitted"] = max(up)
                                fits[f"{cls}/{mode}/overlayctl(upstream range)"] = g
    targets = []

    def row(cls: str, mode: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["class"] == cls and r["mode"] == mode
                     and r["n"] == n), None)

    has_up = any("upstream" in r["tools"] for r in rows)
    # 1. merge of 1 extension within 2x upstream
    for cls in CLASSES:
        for mode in MODES:
            r = row(cls, mode, 1)
            if r and has_up and "upstream" in r["tools"]:
                o, u = merge_med(r, "overlayctl"), merge_med(r, "upstream")
                if o and u:
                    targets.append({"target": "merge 1 extension within 2x upstream",
                                    "case": f"{cls} {mode}", "measured": f"{o:.1f} ms vs {u:.1f} ms"
                                    f" = {o / u:.2f}x", "met": o <= 2 * u})
    # 2. faster than upstream from 50 extensions
    for r in rows:
        if r["n"] >= 50 and "upstream" in r["tools"]:
            o, u = merge_med(r, "overlayctl"), merge_med(r, "upstream")
            case = f"{r['class']} {r['mode']} n={r['n']}"
            if o is None:
                continue
            if u is None:
                targets.append({"target": "merge faster than upstream from 50", "case": case,
                                "measured": f"{o:.1f} ms; upstream fails", "met": True})
            else:
                targets.append({"target": "merge faster than upstream from 50", "case": case,
                                "measured": f"{o:.1f} ms vs {u:.1f} ms = {o / u:.2f}x",
                                "met": o < u})
    # 3. 500 under 150 ms
    for r in rows:
        if r["n"] >= KERNEL_MAX_EXT:
            o = merge_med(r, "overlayctl")
            f = r["tools"]["overlayctl"]["failed"]
            targets.append({"target": "merge 500 extensions under 150 ms",
                            "case": f"{r['class']} {r['mode']} n={r['n']}",
                            "measured": f"{o:.1f} ms" if o else f"refused: {f}",
                            "met": bool(o and o < 150)})
    # 4. linear, smaller slope. Per-extension cost: overlayctl's slope over all its points and
    # its secant between 100 and the largest count, against upstream's slope over its range.
    for cls in CLASSES:
        for mode in MODES:
            fo = fits.get(f"{cls}/{mode}/overlayctl")
            fu = fits.get(f"{cls}/{mode}/upstream")
            if not fo:
                continue
            pts = sorted((r["n"], merge_med(r, "overlayctl")) for r in rows
                         if r["class"] == cls and r["mode"] == mode
                         and merge_med(r, "overlayctl") is not None)
            lo = next(((x, y) for x, y in pts if x == 100), None)
            hi = pts[-1]
            sec = (hi[1] - lo[1]) / (hi[0] - lo[0]) if lo and hi[0] > lo[0] else None
            flo = linfit([(x, y) for x, y in pts if x <= 100])
            meas = f"overlayctl {fo['slope_ms_per_ext']:.3f} ms/ext over n≤{fo['max_n_fitted']}"
            if sec is not None:
                meas += f", {sec:.3f} ms/ext from 100 to {hi[0]}"
            worst = max(fo["slope_ms_per_ext"], sec if sec is not None else 0.0)
            superlinear = bool(sec is not None and flo and
                               sec > 2 * max(flo["slope_ms_per_ext"], 0.0) + 0.2)
            if superlinear:
                meas += f" (super-linear: {flo['slope_ms_per_ext']:.3f} ms/ext up to 100)"
            met = not superlinear
            if fu:
                meas += f"; upstream {fu['slope_ms_per_ext']:.3f} ms/ext (n≤{fu['max_n_fitted']})"
                met = met and worst < fu["slope_ms_per_ext"]
            targets.append({"target": "linear growth, smaller slope than upstream",
                            "case": f"{cls} {mode}", "measured": meas, "met": met})
    # 5. diff of 10,000 within 2x find
    for d in res.get("diff", []):
        f = d["cases"]["find -printf (floor)"]["stats"]
        o = d["cases"]["overlayctl diff"]["stats"]
        if f and o:
            targets.append({"target": "diff within 2x the find floor" + (
                "" if d["size"] == 10000 else " (informative)"),
                "case": f"{d['tree']['entries']} entries",
                "measured": f"{o['median']:.1f} ms vs {f['median']:.1f} ms = "
                            f"{o['median'] / f['median']:.2f}x",
                "met": o["median"] <= 2 * f["median"], "binding": d["size"] == 10000})
    # 6. peak memory at 500
    for r in rows:
        if r["n"] == KERNEL_MAX_EXT:
            t = r["tools"]["overlayctl"]
            peak = max(t[v]["peak_rss_kib"] for v in VERBS) / MiB
            targets.append({"target": "peak memory under 40 MiB at 500",
                            "case": f"{r['class']} {r['mode']} n={r['n']}",
                            "measured": f"{peak:.1f} MiB",
                            "met": peak < 40})
    return {"fits": fits, "targets": targets}


# ----------------------------------------------------------------------------- report


def report(res: dict[str, Any]) -> str:
    L: list[str] = []
    m = res["machine"]
    L.append(f"# overlayctl benchmark — {res['started']}{' (quick)' if res['quick'] else ''}\n")
    L.append(f"Machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem']} RAM, Linux {m['kernel']}, "
             f"Python {m['python']}; load average {' '.join(m['loadavg_start'])} at the start, "
             f"{' '.join(m.get('loadavg_end', ['?']))} at the end. Commit {m.get('git')}"
             + (f" (uncommitted changes in {', '.join(m['overlayctl_changes'])})"
                if m.get("overlayctl_changes") else "")
             + f". overlayctl: `{m['overlayctl']}`; upstream: "
             f"{m['upstream'] or 'not given'}. {res['reps']} repetitions per cell, interleaved; "
             "times are wall-clock ms of the whole process, median [min–max].\n")
    has_up = any("upstream" in r["tools"] for r in res.get("merge", []))
    L.append("## merge / refresh / unmerge\n")
    L.append("`refresh` is `refresh --always-refresh=yes` (a full re-merge); `noop` is a plain "
             "`refresh` with nothing changed. Peak RSS is the largest of the row's processes.\n")
    hdr = "| class | mode | N | merge overlayctl |"
    sep = "|---|---|---:|---:|"
    if has_up:
        hdr += " merge upstream | ratio |"
        sep += "---:|---:|"
    hdr += " refresh ovl | noop ovl | unmerge ovl |"
    sep += "---:|---:|---:|"
    if has_up:
        hdr += " refresh up | noop up | unmerge up |"
        sep += "---:|---:|---:|"
    hdr += " peak RSS ovl MiB |" + (" peak RSS up MiB |" if has_up else "")
    sep += "---:|" + ("---:|" if has_up else "")
    L += [hdr, sep]
    for r in res.get("merge", []):
        o = r["tools"]["overlayctl"]
        u = r["tools"].get("upstream")
        cells = [r["class"], r["mode"], str(r["n"]),
                 fmt_ms(o["merge"]["stats"]) if not o["failed"] else f"FAILS: {o['failed']}"]
        if has_up:
            if u is None:
                cells += ["—", "—"]
            elif u["failed"] and not u["merge"]["stats"]:
                cells += [f"FAILS ({u['failed'][:70]})", "—"]
            else:
                om, um = merge_med(r, "overlayctl"), merge_med(r, "upstream")
                cells += [fmt_ms(u["merge"]["stats"]),
                          f"{om / um:.2f}x" if om and um else "—"]
        cells += [fmt_ms(o[v]["stats"], False) for v in ("refresh", "refresh-noop", "unmerge")]
        if has_up:
            cells += [fmt_ms(u[v]["stats"], False) if u else "—"
                      for v in ("refresh", "refresh-noop", "unmerge")]
        cells.append(f"{max(o[v]['peak_rss_kib'] for v in VERBS) / MiB:.1f}")
        if has_up:
            cells.append(f"{max(u[v]['peak_rss_kib'] for v in VERBS) / MiB:.1f}" if u else "—")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if res.get("upstream_limit"):
        L.append("## upstream's extension limit\n")
        for p in res["upstream_limit"]:
            if "first_fail" in p:
                L.append(f"- {p['class']} --mutable={p['mode']}: merges {p['max_ok']}, fails from "
                         f"{p['first_fail']} "
                         f"({p['lowerdir_path_len']} bytes of mount options per layer): "
                         f"`{p.get('error_at_fail', '')}`")
            else:
                L.append(f"- {p['class']} --mutable={p['mode']}: merges all {p['max_ok']} tested")
        L.append("")
    if res.get("diff"):
        L.append("## diff and which over an upper (unmerged /etc, with a defaults layer)\n")
        L.append("| upper entries | command | ms median [min–max] | × find | peak RSS MiB |")
        L.append("|---:|---|---:|---:|---:|")
        for d in res["diff"]:
            f = d["cases"]["find -printf (floor)"]["stats"]
            for k, c in d["cases"].items():
                ratio = f"{c['stats']['median'] / f['median']:.2f}x" if c["stats"] and f else "—"
                rc = "" if c["rc"] == [0] else f" (exit {c['rc']})"
                L.append(f"| {d['tree']['entries']} | `{k}`{rc} | {fmt_ms(c['stats'])} | "
                         f"{ratio} | {c['peak_rss_kib'] / MiB:.1f} |")
        L.append("")
    s = res.get("startup")
    if s:
        L.append("## start-up\n")
        L.append("| command | ms median [min–max] | peak RSS MiB |")
        L.append("|---|---:|---:|")
        for k, c in s["cases"].items():
            L.append(f"| `{k}` | {fmt_ms(c['stats'])} | {c['peak_rss_kib'] / MiB:.1f} |")
        if s.get("merge_work_in_process_ms"):
            L.append(f"| the merge itself, imports done beforehand (timed in the process) | "
                     f"{fmt_ms(s['merge_work_in_process_ms'])} | |")
        it = s["importtime"]
        L.append("")
        L.append(f"`{it['command']}`: {it['modules']} modules imported, "
                 f"{it['total_import_ms']['median']:.1f} ms of import time (sum of self times, "
                 f"median of {it['total_import_ms']['n']}); the whole run took "
                 f"{it['wall_ms']['median']:.1f} ms under -X importtime.\n")
        L.append("| top imports by self time | self ms | cumulative ms |")
        L.append("|---|---:|---:|")
        for d in it["top_self"][:12]:
            L.append(f"| {d['module']} | {d['self_ms']:.2f} | {d['cumulative_ms']:.2f} |")
        L.append("")
        L.append("| top-level imports by cumulative time | cumulative ms |")
        L.append("|---|---:|")
        for d in it["top_level_cumulative"][:12]:
            L.append(f"| {d['module']} | {d['cumulative_ms']:.2f} |")
        L.append("")
    if res.get("hygiene"):
        L.append("## the record of the lower layers' directories (issue 10)\n")
        L.append("In-process cost from overlayctl's debug lines (ms, median [min–max]), and the "
                 "whole process. `/usr` has N directories of 8 files; 10 extensions of 20 "
                 "directories each.\n")
        L.append("| /usr dirs | upper | step | hygiene ms | whole process ms | directories "
                 "read | record bytes |")
        L.append("|---:|---|---|---:|---:|---:|---:|")
        for h in res["hygiene"]:
            for label, c in h["cases"].items():
                for step in ("merge", "first merge", "unmerge"):
                    x = c[step]
                    L.append(f"| {h['dirs']} | {label} | {step} | {fmt_ms(x['hygiene_ms'])} | "
                             f"{fmt_ms(x['whole_ms'])} | {x['examined'] or '—'} | "
                             f"{c['record_bytes'] or '—'} |")
        L.append("")
    if res.get("window"):
        L.append("## the refresh window (issue 10, item 7)\n")
        L.append("Per hierarchy and `refresh --always-refresh=yes`: both overlays attached "
                 "(µs, from `move_mount(MOVE_MOUNT_BENEATH)` to the old one detached), and how "
                 "long the new overlay existed detached before, sharing the upper (ms).\n")
        L.append("| extensions | mode | dirty MB | hierarchy | attached together µs | new one "
                 "detached before ms |")
        L.append("|---:|---|---:|---|---:|---:|")
        for w in res["window"]:
            L.append(f"| {w['n']} | {w['mode']} | {w.get('dirty_mb', 0)} | {w['hierarchy']} | "
                     f"{fmt_ms(w['attached_us'])} | {fmt_ms(w['detached_ms'])} |")
        L.append("")
    a = res.get("analysis")
    if a:
        L.append("## fits (merge time = a + b·N)\n")
        L.append("| class/mode/tool | a ms | b ms/ext | R² | N range |")
        L.append("|---|---:|---:|---:|---:|")
        for k, f in a["fits"].items():
            L.append(f"| {k} | {f['intercept_ms']:.1f} | {f['slope_ms_per_ext']:.3f} | "
                     f"{f['r2']:.3f} | ≤{f['max_n_fitted']} |")
        L.append("")
        L.append("## targets of issue 5\n")
        L.append("| target | case | measured | met |")
        L.append("|---|---|---|---|")
        for t in a["targets"]:
            L.append(f"| {t['target']} | {t['case']} | {t['measured']} | "
                     f"{'yes' if t['met'] else '**no**'} |")
        L.append("")
    if res.get("profile"):
        L.append("## cProfile (top 8 by own time)\n")
        for name, p in res["profile"].items():
            if "error" in p:
                L.append(f"- {name}: error {p['error']}")
                continue
            L.append(f"**{name}** — {p['total_ms']} ms profiled (`{p['prof_file']}`)\n")
            L.append("| function | calls | own ms | cumulative ms |")
            L.append("|---|---:|---:|---:|")
            for d in p["top_tottime"][:8]:
                L.append(f"| `{d['function']}` | {d['calls']} | {d['tottime_ms']} | "
                         f"{d['cumtime_ms']} |")
            L.append("")
    L.append(f"Total bench run time: {res.get('duration_s', 0):.0f} s.")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- plot


def plot_series(res: dict[str, Any]) -> list[dict[str, Any]]:
    series = []
    for cls in CLASSES:
        for mode in ("no", "ephemeral"):
            for tool in ("overlayctl", "upstream"):
                pts, fails = [], []
                for r in res["merge"]:
                    if r["class"] != cls or r["mode"] != mode or tool not in r["tools"]:
                        continue
                    st = r["tools"][tool]["merge"]["stats"]
                    if st:
                        pts.append((r["n"], st["median"], st["min"], st["max"]))
                    else:
                        fails.append(r["n"])
                if pts or fails:
                    series.append({"class": cls, "mode": mode, "tool": tool, "pts": pts,
                                   "fails": fails})
    return series


def plot_matplotlib(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = {"overlayctl": "tab:blue", "upstream": "tab:orange"}
    for ax, cls in zip(axes, CLASSES, strict=True):
        top = 0.0
        for s in plot_series(res):
            if s["class"] != cls:
                continue
            ls = "-" if s["mode"] == "no" else "--"
            if s["pts"]:
                xs = [p[0] for p in s["pts"]]
                ys = [p[1] for p in s["pts"]]
                err = [[p[1] - p[2] for p in s["pts"]], [p[3] - p[1] for p in s["pts"]]]
                ax.errorbar(xs, ys, yerr=err, fmt="o" + ls, color=colors[s["tool"]], capsize=3,
                            ms=4, label=f"{s['tool']} --mutable={s['mode']}")
                top = max(top, *[p[3] for p in s["pts"]])
        k = 0
        for s in plot_series(res):
            if s["class"] != cls or not s["fails"]:
                continue
            x = min(s["fails"])  # where this tool starts to fail
            why = "refuses (kernel: 500 layers)"
            if s["tool"] == "upstream":
                why = "fails"
                for lim in res.get("upstream_limit", []):
                    if lim["class"] == cls and lim["mode"] == s["mode"] and "first_fail" in lim:
                        x = lim["first_fail"]
                        why = f"fails from {x} extensions"
            y = top * (1.04 + 0.07 * k)
            color = "red" if s["tool"] == "upstream" else "black"
            ax.scatter([x], [y], marker="x", color=color, s=50, zorder=5)
            ax.annotate(f"{s['tool']} --mutable={s['mode']} {why}", (x, y),
                        textcoords="offset points", xytext=(-6, -3) if x > 300 else (6, -3),
                        ha="right" if x > 300 else "left", fontsize=7,
                        color=color)
            k += 1
        ax.set_title(f"systemd-{cls} merge ({cls})" if False else f"{cls} merge")
        ax.set_xlabel("number of extensions")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0, top=top * (1.1 + 0.07 * k))
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set_ylabel("wall time of the merge process (ms)")
    fig.suptitle("merge time against number of extensions (median, bars: min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_svg(res: dict[str, Any], path: Path) -> None:
    """Fallback without matplotlib: a plain SVG line chart written by hand."""
    W, H, P = 1000, 420, 60
    pw = (W - 3 * P) / 2
    series = plot_series(res)
    ymax = max([p[3] for s in series for p in s["pts"]] + [1]) * 1.1
    xmax = max([p[0] for s in series for p in s["pts"]] + [x for s in series for x in s["fails"]]
               + [1])
    colors = {"overlayctl": "#1f77b4", "upstream": "#ff7f0e"}
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">merge time against '
         'number of extensions (median, bars: min–max)</text>']
    for i, cls in enumerate(CLASSES):
        x0 = P + i * (pw + P)
        y0 = H - P

        def X(v: float, x0: float = x0) -> float:
            return x0 + v / xmax * pw

        def Y(v: float, y0: float = y0) -> float:
            return y0 - v / ymax * (H - 2 * P)

        o.append(f'<rect x="{x0}" y="{P}" width="{pw}" height="{H - 2 * P}" fill="none" '
                 'stroke="#888"/>')
        o.append(f'<text x="{x0 + pw / 2}" y="{P - 8}" text-anchor="middle">{cls} merge</text>')
        for k in range(6):
            yv = ymax * k / 5
            o.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(yv):.1f}" y2="{Y(yv):.1f}" '
                     'stroke="#eee"/>')
            o.append(f'<text x="{x0 - 5}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.0f}</text>')
        for xv in sorted({p[0] for s in series for p in s["pts"]} | {x for s in series
                                                                   for x in s["fails"]}):
            o.append(f'<text x="{X(xv):.1f}" y="{y0 + 15}" text-anchor="middle">{xv}</text>')
        o.append(f'<text x="{x0 + pw / 2}" y="{y0 + 32}" text-anchor="middle">number of '
                 'extensions</text>')
        if i == 0:
            o.append(f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" '
                     'text-anchor="middle">ms</text>')
        ly = P + 15
        for s in series:
            if s["class"] != cls:
                continue
            c = colors[s["tool"]]
            dash = "" if s["mode"] == "no" else ' stroke-dasharray="6,4"'
            if s["pts"]:
                pts = " ".join(f"{X(p[0]):.1f},{Y(p[1]):.1f}" for p in s["pts"])
                o.append(f'<polyline points="{pts}" fill="none" stroke="{c}" '
                         f'stroke-width="2"{dash}/>')
                for p in s["pts"]:
                    o.append(f'<circle cx="{X(p[0]):.1f}" cy="{Y(p[1]):.1f}" r="3" fill="{c}"/>')
                    o.append(f'<line x1="{X(p[0]):.1f}" x2="{X(p[0]):.1f}" y1="{Y(p[2]):.1f}" '
                             f'y2="{Y(p[3]):.1f}" stroke="{c}"/>')
            for xv in s["fails"]:
                o.append(f'<text x="{X(xv):.1f}" y="{P + 30 + (0 if s["mode"] == "no" else 14)}"'
                         f' text-anchor="end" fill="red">✗ upstream fails (--mutable='
                         f'{s["mode"]})</text>')
            o.append(f'<line x1="{x0 + 10}" x2="{x0 + 35}" y1="{ly}" y2="{ly}" stroke="{c}" '
                     f'stroke-width="2"{dash}/>')
            o.append(f'<text x="{x0 + 40}" y="{ly + 4}">{s["tool"]} --mutable={s["mode"]}</text>')
            ly += 15
    o.append("</svg>")
    path.write_text("\n".join(o) + "\n")


def make_plot(res: dict[str, Any], path: Path, json_path: Path) -> str:
    try:
        plot_matplotlib(res, path)
        return "matplotlib"
    except ImportError:
        pass
    vpy = HERE / ".venv/bin/python"
    if vpy.exists():
        p = subprocess.run([str(vpy), __file__, "--plot-only", str(json_path), "--plot-out",
                            str(path)], capture_output=True, text=True)
        if p.returncode == 0:
            return "matplotlib (bench/.venv)"
        log(f"bench/.venv plot failed: {p.stderr.strip()[-300:]}")
    plot_svg(res, path)
    return "hand-written SVG"


# ----------------------------------------------------------------------------- main


def machine(tools: Tools) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    up = None
    if "sysext" in tools.up:
        p = subprocess.run([*tools.up["sysext"], "--version"], capture_output=True, text=True)
        up = f"{tools.up['sysext'][0]} ({p.stdout.splitlines()[0] if p.stdout else '?'})"
    mem = ""
    try:
        mem = open("/proc/meminfo").readline().split(":")[1].strip()
    except OSError:
        pass
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--short", "--", "overlayctl"],
                           capture_output=True, text=True).stdout.split("\n")
    return {"git": git, "overlayctl_changes": [d for d in dirty if d],
            "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "python_exe": tools.python, "mem": mem,
            "loadavg_start": open("/proc/loadavg").read().split()[:3],
            "overlayctl": " ".join(tools.ovl), "upstream": up}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", help="systemd-sysext binary to compare with "
                    "(default: $SYSTEMD_SYSEXT); systemd-confext is looked for beside it")
    ap.add_argument("--upstream-confext", help="systemd-confext binary (default: "
                    "$SYSTEMD_CONFEXT, or the upstream path with sysext -> confext)")
    ap.add_argument("--overlayctl", help="command that runs overlayctl (default: "
                    ".venv/bin/overlayctl, else python -m overlayctl)")
    ap.add_argument("--quick", action="store_true", help="few counts and repetitions, to debug")
    ap.add_argument("--reps", type=int, help="repetitions per cell (default 5, quick 2)")
    ap.add_argument("--counts", help="comma-separated extension counts (default 1,10,50,100,500)")
    ap.add_argument("--diff-sizes", help="comma-separated upper sizes (default "
                    "1000,10000,100000)")
    ap.add_argument("--only", default="merge,diff,startup,profile,hygiene,window",
                    help="comma-separated parts to run: merge,diff,startup,profile,hygiene,"
                    "window")
    ap.add_argument("--hygiene-sizes", help="comma-separated numbers of /usr directories for "
                    "the hygiene case (default 1000,16000)")
    ap.add_argument("--tmpdir", default="/tmp", help="where the temporary trees go")
    ap.add_argument("--plot", help="where the plot goes (default: docs/perf-merge.svg, "
                    "bench/out/perf-merge-quick.svg with --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary trees")
    ap.add_argument("--plot-only", help=argparse.SUPPRESS)
    ap.add_argument("--plot-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.reps = a.reps or (2 if a.quick else 5)
    a.counts = [int(x) for x in a.counts.split(",")] if a.counts else (
        [1, 10, 100] if a.quick else [1, 10, 50, 100, 500])
    a.diff_sizes = [int(x) for x in a.diff_sizes.split(",")] if a.diff_sizes else (
        [1000] if a.quick else [1000, 10000, 100000])
    a.hygiene_sizes = [int(x) for x in a.hygiene_sizes.split(",")] if a.hygiene_sizes else (
        [1000] if a.quick else [1000, 16000])
    a.only = set(a.only.split(","))
    return a


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.plot_only:
        res = json.loads(Path(args.plot_only).read_text())
        plot_matplotlib(res, Path(args.plot_out))
        return
    if os.geteuid() != 0:
        sys.exit("bench: run as root (sudo python3 bench/run.py): merging mounts overlays")
    if os.environ.get(NS_MARK) != "1":
        if not shutil.which("unshare"):
            sys.exit("bench: needs unshare (util-linux)")
        env = dict(os.environ, **{NS_MARK: "1"})
        os.execvpe("unshare", ["unshare", "-m", "--propagation", "private", "--",
                               sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)
    t_start = time.monotonic()
    tools = Tools(args)
    # children get a clean environment: no SYSTEMD_*/OVERLAYCTL_* settings, and no PYTHON*
    # variables (PYTHONDONTWRITEBYTECODE would make every run compile overlayctl from source,
    # which no installed system does). Byte code goes to bench/out/pycache, not into the tree.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SYSTEMD_", "OVERLAYCTL_", "PYTHON")) and k != NS_MARK}
    env["PYTHONPYCACHEPREFIX"] = str(OUT / "pycache")
    if tools.ovl[1:3] == ["-m", "overlayctl"]:
        env["PYTHONPATH"] = str(REPO)
    r = Runner(env)
    # the namespace: /run a fresh tmpfs, the temporary directory a shared bind mount
    sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    tmp = Path(tempfile.mkdtemp(prefix="ob", dir=args.tmpdir))
    sh("mount", "--bind", str(tmp), str(tmp))
    sh("mount", "--make-rshared", str(tmp))
    res: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                           "quick": args.quick, "reps": args.reps, "counts": args.counts,
                           "machine": machine(tools), "tmp": str(tmp)}
    log(f"trees in {tmp}; overlayctl: {' '.join(tools.ovl)}; upstream: "
        f"{tools.up or 'none'}")
    try:
        t0 = time.monotonic()
        if any(n > KERNEL_MAX_EXT for n in args.counts) and KERNEL_MAX_EXT not in args.counts:
            # overlayfs stacks at most 500 lower layers: the metadata layer and the host's
            # directory leave room for 498 extensions; time that too.
            args.counts = sorted({*args.counts, KERNEL_MAX_EXT})
        for cls in CLASSES:
            for n in args.counts:
                root = tmp / f"{cls[0]}{n}"
                make_base(root, 200)
                for i in range(n):
                    make_ext(root, cls, f"e{i:03d}")
        log(f"built extension trees in {time.monotonic() - t0:.1f}s")
        counts = {c: list(args.counts) for c in CLASSES}
        if tools.up and "merge" in args.only:
            res["upstream_limit"] = []
            for cls in CLASSES:
                if cls not in tools.up:
                    continue
                big = max(args.counts)
                for mode in MODES:
                    p = probe_upstream_limit(tools, r, tmp / f"{cls[0]}{big}", cls, big, mode)
                    log(f"upstream {cls} {mode}: merges up to {p['max_ok']}")
                    res["upstream_limit"].append(p)
        if "merge" in args.only:
            res["merge"] = bench_merge(args, tools, r, tmp, counts)
        if "diff" in args.only:
            res["diff"] = bench_diff(args, tools, r, tmp)
        if "startup" in args.only:
            res["startup"] = bench_startup(args, tools, r, tmp)
        if "hygiene" in args.only:
            res["hygiene"] = bench_hygiene(args, tools, r, tmp)
        if "window" in args.only:
            res["window"] = bench_window(args, tools, r, tmp)
        if "profile" in args.only and "merge" in args.only:
            ds = 10000 if 10000 in args.diff_sizes else (args.diff_sizes[0]
                                                        if "diff" in args.only else None)
            res["profile"] = profile(args, tools, r, tmp, ds)
    finally:
        left = force_unmount(tmp)
        if left:
            log(f"warning: unmounted leftovers {left}")
        subprocess.run(["umount", str(tmp)], stderr=subprocess.DEVNULL)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["umount", "/run"], stderr=subprocess.DEVNULL)
    res["duration_s"] = time.monotonic() - t_start
    res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if "merge" in res:
        res["analysis"] = analyse(res)
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jp = OUT / f"results-{stamp}{'-quick' if args.quick else ''}.json"
    jp.write_text(json.dumps(res, indent=1))
    shutil.copy(jp, OUT / ("latest-quick.json" if args.quick else "latest.json"))
    if "merge" in res:
        plot = Path(args.plot) if args.plot else (
            OUT / "perf-merge-quick.svg" if args.quick else REPO / "docs/perf-merge.svg")
        res["plot"] = {"path": str(plot), "how": make_plot(res, plot, jp)}
        log(f"plot: {plot} ({res['plot']['how']})")
    md = report(res)
    (OUT / ("latest-quick.md" if args.quick else "latest.md")).write_text(md)
    print(md)
    log(f"JSON: {jp}; total {res['duration_s']:.0f}s")


if __name__ == "__main__":
    main()
