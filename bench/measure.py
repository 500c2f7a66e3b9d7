"""The measuring half of the bench: trees, the tools compared, and one function per case.

Nothing here formats a report or draws a plot (report.py, plot.py); run.py drives it. Every
function returns plain data (dicts, lists, numbers) that run.py saves as JSON. Other code may
reuse a case: swap_window() times the gap of one refresh from a strace of it, for any command.
"""

from __future__ import annotations

import os
import re
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
CLASSES = ("sysext", "confext")
MODES = ("no", "yes", "host", "ephemeral")  # host = yes with extensions.mutable/<h> -> /<h>
MODE_ARG = {"no": "no", "yes": "yes", "host": "yes", "ephemeral": "ephemeral"}
VERBS = ("merge", "refresh", "refresh-noop", "unmerge")
MiB = 1024.0  # ru_maxrss is in KiB on Linux
KERNEL_MAX_EXT = 498  # overlayfs: at most 500 lower layers = meta + extensions + host dir
# What tests/integration/peer.py looks in for upstream 262 (tools/peer.sh builds it there).
PEER_DIRS = (Path("/var/cache/overlayctl/peer"), Path("/work/peer"))


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


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


def median_of(st: dict[str, float] | None) -> float | None:
    return st["median"] if st else None


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


def make_ext_tree(root: Path, cls: str, n: int) -> None:
    make_base(root, 200)
    for i in range(n):
        make_ext(root, cls, f"e{i:03d}")


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


def make_etc(root: Path, entries: int) -> dict[str, Any]:
    """A Flatcar-like machine that was never merged: the image's defaults in
    /usr/share/factory/etc ([Defaults] in usr/lib/overlayctl/confext.conf), the real /etc its
    own upper with about ENTRIES entries in directories of 100 files: a tenth new files, a
    tenth modified copies of defaults, the rest identical copies."""
    write(root / "usr/lib/os-release", "ID=debian\nVERSION_ID=13\n")
    write(root / "usr/lib/overlayctl/confext.conf", "[Defaults]\n/etc=/usr/share/factory/etc\n")
    defaults, etc = root / "usr/share/factory/etc", root / "etc"
    nfiles = entries - (entries + 100) // 101
    info = {"entries": 0, "files": nfiles, "added": 0, "modified": 0, "identical": 0,
            "defaults": 0}
    for i in range(nfiles):
        rel = f"d{i // 100:03d}/f{i % 100:02d}.conf"
        text = "".join(f"option{k} = value {i}.{k}\n" for k in range(8))
        kind = ("added" if i % 10 == 0 else "modified" if i % 10 == 1 else "identical")
        info[kind] += 1
        if kind != "added":
            write(defaults / rel, text)
            info["defaults"] += 1
        if kind == "modified":
            text = text.replace(f"option4 = value {i}.4\n", f"option4 = local {i}\n")
        write(etc / rel, text)
    info["entries"] = sum(len(d) + len(f) for _, d, f in os.walk(etc))
    return info


# ----------------------------------------------------------------------------- the tools


def peer_dir() -> Path:
    """As tests/integration/peer.py: $OVERLAYCTL_PEER_DIR, else the first of PEER_DIRS with a
    bin/ directory."""
    env = os.environ.get("OVERLAYCTL_PEER_DIR")
    if env:
        return Path(env)
    return next((d for d in PEER_DIRS if (d / "bin").is_dir()), PEER_DIRS[0])


def find_upstream() -> str | None:
    """$SYSTEMD_SYSEXT, else the sid (262) peer that tools/peer.sh built (as peer.py's
    upstream_peer(): the binary must be executable and the tree complete)."""
    env = os.environ.get("SYSTEMD_SYSEXT")
    if env:
        return env
    d = peer_dir()
    sx = d / "bin/systemd-sysext-sid"
    if os.access(sx, os.X_OK) and (d / "sid/.peer-complete").exists():
        return str(sx)
    return None


class Tools:
    """The commands compared. "overlayctl" is the lean launcher that the Debian package
    installs as /usr/bin/overlayctl (tools/launcher.sh with the venv's interpreter and the
    directories it needs: how a unit starts it); "venv" is .venv/bin/overlayctl, the console
    script pip writes (site, the editable finder); "upstream" systemd-sysext 262. The floor is
    the interpreter itself, isolated, importing ctypes."""

    def __init__(self, args: Any):
        vpy = REPO / ".venv/bin/python"
        self.python = str(vpy) if vpy.exists() else sys.executable
        # The interpreter behind the venv's symlink: the same binary the floor runs.
        self.real_python = os.path.realpath(self.python)
        self.floor = [self.python, "-I", "-S", "-c", "import ctypes"]
        self.ovl: dict[str, list[str]] = {}
        if args.overlayctl:
            import shlex
            self.ovl["overlayctl"] = shlex.split(args.overlayctl)
        else:
            purelib = subprocess.run(
                [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True, text=True, check=True).stdout.strip()
            OUT.mkdir(exist_ok=True)
            self.launcher = OUT / "overlayctl"
            sh(str(REPO / "tools/launcher.sh"), str(self.launcher), self.python, str(REPO),
               purelib)
            self.ovl["overlayctl"] = [str(self.launcher)]
            if (REPO / ".venv/bin/overlayctl").exists() and not args.no_venv:
                self.ovl["venv"] = [str(REPO / ".venv/bin/overlayctl")]
            if args.baseline:
                # Another checkout (e.g. a worktree of main) started the same way, through
                # its own tools/launcher.sh: before and after, interleaved in one run.
                base = Path(args.baseline).resolve()
                subprocess.run([self.python, "-m", "compileall", "-q", str(base / "overlayctl")],
                               check=True)
                sh(str(base / "tools/launcher.sh"), str(OUT / "overlayctl-baseline"),
                   self.python, str(base), purelib)
                self.ovl["baseline"] = [str(OUT / "overlayctl-baseline")]
        up = args.upstream or find_upstream() or ""
        self.up: dict[str, list[str]] = {}
        if up and not args.no_upstream:
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

    @property
    def main(self) -> list[str]:
        return self.ovl["overlayctl"]

    def cmd(self, tool: str, cls: str, root: Path, verb: str, mode: str | None = None) -> list[str]:
        extra = []
        if verb == "refresh":
            extra.append("--always-refresh=yes")
        v = "refresh" if verb.startswith("refresh") else verb
        if mode is not None and v in ("merge", "refresh"):
            extra.append(f"--mutable={MODE_ARG[mode]}")
        if tool == "upstream":
            return [*self.up[cls], f"--root={root}", v, "--no-reload", *extra]
        return [*self.ovl[tool], f"--root={root}", cls, v, "--no-reload", *extra]

    def tools_for(self, cls: str) -> list[str]:
        return [*self.ovl, *(["upstream"] if cls in self.up else [])]


# ----------------------------------------------------------------------------- merge


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


def bench_merge(args: Any, tools: Tools, r: Runner, tmp: Path,
                counts: list[int], classes: tuple[str, ...], modes: tuple[str, ...],
                verbs: bool = True) -> list[dict[str, Any]]:
    """For each class and mode: one untimed warm-up per count and tool (under GNU time, for
    the peak memory), then cycles in which every count, every tool and the floor take turns
    (the order flips every cycle), so that a change of load on the machine hits them alike.
    With VERBS, each merge is followed by refresh, a no-op refresh and unmerge (timed too)."""
    rows: list[dict[str, Any]] = []
    for cls in classes:
        tl = tools.tools_for(cls)
        for mode in modes:
            cells: dict[int, dict[str, Any]] = {}
            floor: list[float] = []
            for n in counts:
                root = tmp / f"{cls[0]}{n}"
                set_mutable_state(root, cls, mode)
                c: dict[str, Any] = {"root": root, "names": [f"e{i:03d}" for i in range(n)],
                                     "runs": {t: {v: [] for v in VERBS} for t in tl},
                                     "failed": {}, "peak": {t: {} for t in tl}}
                slow = 0.0
                for t in tl:
                    for v in (VERBS if verbs else ("merge", "unmerge")):
                        w = r.run(tools.cmd(t, cls, root, v, mode), mem=True)
                        c["peak"][t][v] = w["rss_kib"] or 0
                        slow = max(slow, w["ms"])
                    force_unmount(root)
                # fewer repetitions where one process takes seconds (keeps the run short)
                c["reps"] = args.reps if slow < 2000 else min(args.reps, 3)
                cells[n] = c
            for rep in range(args.reps):
                order = tl if rep % 2 == 0 else tl[::-1]
                ns = counts if rep % 2 == 0 else counts[::-1]
                for n in ns:
                    c = cells[n]
                    if rep >= c["reps"]:
                        continue
                    floor.append(r.run(tools.floor)["ms"])
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
                        if verbs:
                            for v in ("refresh", "refresh-noop"):
                                res = r.run(tools.cmd(t, cls, root, v, mode))
                                res["ok"] = res["rc"] == 0 and not merge_problem(root, cls,
                                                                                 names)
                                cell[t][v].append(res)
                        res = r.run(tools.cmd(t, cls, root, "unmerge"))
                        left = mounts_below(root)
                        res["ok"] = res["rc"] == 0 and not left
                        cell[t]["unmerge"].append(res)
                        if left:
                            force_unmount(root)
            for n in counts:
                c = cells[n]
                row: dict[str, Any] = {"class": cls, "mode": mode, "n": n, "reps": c["reps"],
                                       "floor": stats(floor), "tools": {}}
                for t in tl:
                    tr: dict[str, Any] = {"failed": c["failed"].get(t)}
                    for v in VERBS:
                        runs = c["runs"][t][v]
                        good = [x for x in runs if x["ok"]]
                        tr[v] = {"stats": stats([x["ms"] for x in good]),
                                 "raw_ms": [round(x["ms"], 3) for x in runs],
                                 "bad": len(runs) - len(good),
                                 "peak_rss_kib": c["peak"][t].get(v, 0)}
                        bad = [x for x in runs if not x["ok"]]
                        if bad and v != "merge":
                            tr[v]["error"] = bad[0]["stderr"].strip()[-300:]
                    row["tools"][t] = tr
                rows.append(row)
                o = median_of(row["tools"]["overlayctl"]["merge"]["stats"])
                u = (median_of(row["tools"]["upstream"]["merge"]["stats"])
                     if "upstream" in tl else None)
                log(f"{cls:7} {mode:9} n={n:<4} merge overlayctl "
                    f"{o if o is None else round(o, 1)} ms, floor {median_of(stats(floor)):.1f}"
                    + (f", upstream {round(u, 1) if u else 'FAILED'}" if "upstream" in tl
                       else ""))
    rows.sort(key=lambda r: (CLASSES.index(r["class"]), r["n"], MODES.index(r["mode"])))
    return rows


def peak_memory(tools: Tools, r: Runner, tmp: Path, n: int = KERNEL_MAX_EXT,
                reps: int = 3) -> list[dict[str, Any]]:
    """Peak RSS (GNU time) and wall time of an N-extension merge through the launcher, for
    sysext and confext in modes no and yes."""
    out = []
    for cls in CLASSES:
        root = tmp / f"{cls[0]}{n}"
        for mode in ("no", "yes"):
            set_mutable_state(root, cls, mode)
            peaks, ms, err = [], [], ""
            for _ in range(reps):
                res = r.run(tools.cmd("overlayctl", cls, root, "merge", mode), mem=True)
                problem = merge_problem(root, cls, [f"e{0:03d}", f"e{n - 1:03d}"]) \
                    if res["rc"] == 0 else res["stderr"].strip()[-200:]
                r.run(tools.cmd("overlayctl", cls, root, "unmerge"))
                force_unmount(root)
                if problem:
                    err = problem
                    continue
                peaks.append(res["rss_kib"] or 0)
                ms.append(res["ms"])
            out.append({"class": cls, "mode": mode, "n": n, "peak_rss_kib": max(peaks or [0]),
                        "ms_under_time": stats(ms), "error": err})
            log(f"peak memory {cls} {mode} n={n}: {max(peaks or [0]) / MiB:.1f} MiB")
    return out


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
    kind = "extensions" if cls == "sysext" else "confexts"
    out["lowerdir_path_len"] = len(f"/run/systemd/sysext/{kind}/{names[0]}/{hierarchies(cls)[0]}:")
    return out


# ----------------------------------------------------------------------------- local verbs


def local_cases(tools: Tools, root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command, what it is compared with)."""
    etc, defaults = str(root / "etc"), str(root / "usr/share/factory/etc")
    o = [*tools.main, f"--root={root}"]
    b = [*tools.ovl["baseline"], f"--root={root}"] if "baseline" in tools.ovl else []
    return {
        "find -printf": (["find", etc, "-printf", "%p %s %T@\n"], ""),
        "overlayctl diff /etc --json=short": ([*o, "diff", "/etc", "--json=short"],
                                              "find -printf"),
        "overlayctl diff /etc": ([*o, "diff", "/etc"], "find -printf"),
        "diff -ruN": (["diff", "-ruN", defaults, etc], ""),
        "overlayctl diff --content /etc": ([*o, "diff", "--content", "/etc"], "diff -ruN"),
        **({"baseline diff /etc --json=short": ([*b, "diff", "/etc", "--json=short"],
                                                "find -printf"),
            "baseline diff --content /etc": ([*b, "diff", "--content", "/etc"], "diff -ruN")}
           if b else {}),
    }


def bench_local(args: Any, tools: Tools, r: Runner, tmp: Path) -> list[dict[str, Any]]:
    """diff against find, diff --content against diff -ruN, over /etc trees of several sizes;
    one checked warm-up per command (its output counted, its peak RSS taken), then
    interleaved cycles."""
    rows = []
    for size in args.diff_sizes:
        root = tmp / f"etc{size}"
        t0 = time.monotonic()
        info = make_etc(root, size)
        log(f"/etc tree {size}: {info['entries']} entries in {time.monotonic() - t0:.1f}s")
        cases = local_cases(tools, root)
        peak: dict[str, int] = {}
        lines: dict[str, int] = {}
        for k, (c, _) in cases.items():
            with tempfile.TemporaryFile() as f:
                w = r.run(c, stdout=f, mem=True)
                f.seek(0)
                lines[k] = sum(1 for _ in f)
            peak[k] = w["rss_kib"] or 0
            if w["rc"] not in (0, 1):
                log(f"warning: {k} exited {w['rc']}: {w['stderr'].strip()[-200:]}")
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
        reps = args.reps if size <= 10000 else max(3, args.reps - 2)
        for rep in range(reps):
            keys = list(cases) if rep % 2 == 0 else list(cases)[::-1]
            for k in keys:
                res[k].append(r.run(cases[k][0]))
        row: dict[str, Any] = {"size": size, "tree": info, "cases": {}}
        for k, runs in res.items():
            row["cases"][k] = {"stats": stats([x["ms"] for x in runs if x["rc"] in (0, 1)]),
                               "raw_ms": [round(x["ms"], 3) for x in runs],
                               "rc": sorted({x["rc"] for x in runs}), "vs": cases[k][1],
                               "peak_rss_kib": peak[k], "output_lines": lines[k]}
        rows.append(row)
        c = row["cases"]
        log(f"/etc {size}: find {median_of(c['find -printf']['stats']):.1f} ms, diff --json "
            f"{median_of(c['overlayctl diff /etc --json=short']['stats']):.1f} ms; diff -ruN "
            f"{median_of(c['diff -ruN']['stats']):.1f} ms, diff --content "
            f"{median_of(c['overlayctl diff --content /etc']['stats']):.1f} ms")
    return rows


# ----------------------------------------------------------------------------- start-up


IMPORT_RE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """(module, self µs, cumulative µs, depth) of every line -X importtime printed."""
    out = []
    for line in stderr.splitlines():
        m = IMPORT_RE.match(line)
        if m:
            out.append((m[4], int(m[1]), int(m[2]), len(m[3]) // 2))
    return out


def callgrind_instructions(cmd: list[str], env: dict[str, str]) -> int | None:
    """Instructions the command executes (valgrind's callgrind), or None without valgrind.
    Unlike wall time, this does not move with the load of the machine."""
    vg = shutil.which("valgrind")
    if not vg:
        return None
    p = subprocess.run([vg, "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
                       capture_output=True, text=True, env=env)
    m = re.search(r"Collected\s*:\s*(\d+)", p.stderr)
    return int(m[1]) if m else None


def import_budget(tools: Tools, r: Runner, root: Path, reps: int = 5) -> dict[str, Any]:
    """What a 1-extension sysext merge through the launcher imports (-X importtime): modules,
    overlayctl's among them, and milliseconds (sum of self times, median of REPS); plus the
    instructions of that merge and of the floor under callgrind, where valgrind is there."""
    launcher = tools.main
    if len(launcher) != 1:
        return {"error": "--overlayctl given: no launcher to run under -X importtime"}
    argv = [f"--root={root}", "sysext", "merge", "--no-reload", "--mutable=no"]
    cmd = [tools.python, "-I", "-S", "-X", "importtime", launcher[0], *argv]
    unmerge = tools.cmd("overlayctl", "sysext", root, "unmerge")
    per_mod: dict[str, list[tuple[int, int, int]]] = {}
    totals, walls, counts = [], [], []
    for _ in range(reps):
        x = r.run(cmd)
        r.run(unmerge)
        force_unmount(root)
        if x["rc"] != 0:
            return {"error": x["stderr"].strip()[-300:]}
        mods = parse_importtime(x["stderr"])
        walls.append(x["ms"])
        counts.append(len(mods))
        totals.append(sum(s for _, s, _, _ in mods) / 1000)
        for name, s, c, d in mods:
            per_mod.setdefault(name, []).append((s, c, d))
    rows = [{"module": k, "self_ms": statistics.median(a for a, _, _ in v) / 1000,
             "cumulative_ms": statistics.median(b for _, b, _ in v) / 1000, "depth": v[0][2]}
            for k, v in per_mod.items()]
    out: dict[str, Any] = {
        "command": " ".join(cmd),
        "modules": statistics.median(counts),
        "overlayctl_modules": sum(1 for d in rows if d["module"].split(".")[0] == "overlayctl"),
        "module_names": sorted(per_mod),
        "import_ms": stats(totals),
        "wall_ms": stats(walls),
        "top_self": sorted(rows, key=lambda d: -d["self_ms"])[:15],
        "top_level_cumulative": sorted((d for d in rows if d["depth"] <= 1),
                                       key=lambda d: -d["cumulative_ms"])[:15],
    }
    # Instructions, which the load does not change (valgrind runs the command ~50x slower).
    ins: dict[str, int | None] = {"floor": callgrind_instructions(tools.floor, r.env)}
    if ins["floor"] is not None:
        ins["overlayctl merge, 1 extension"] = callgrind_instructions([*launcher, *argv], r.env)
        r.run(unmerge)
        force_unmount(root)
        ins["overlayctl --version"] = callgrind_instructions([*launcher, "--version"], r.env)
    out["instructions"] = ins
    return out


def bench_startup(args: Any, tools: Tools, r: Runner, tmp: Path) -> dict[str, Any]:
    """Where the time of a 1-extension merge goes: the interpreter, the floor, each way of
    starting overlayctl (--version and a merge), upstream."""
    root = tmp / "s1"
    cases: dict[str, list[str]] = {
        "python -I -S -c pass": [tools.python, "-I", "-S", "-c", "pass"],
        "floor: python -I -S -c 'import ctypes'": tools.floor,
    }
    for t, c in tools.ovl.items():
        cases[f"{t} --version"] = [*c, "--version"]
        cases[f"{t} sysext merge, 1 extension"] = tools.cmd(t, "sysext", root, "merge", "no")
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
    out["import_budget"] = import_budget(tools, r, root, max(3, args.reps))
    return out


# ----------------------------------------------------------------------------- refresh swap


STRACE_RE = re.compile(r"^(\d+)\s+(\d+\.\d+) (\w+)\((.*)\) = (-?\d+|\?)"
                       r"(?: [A-Z]+ \(.*\))? <(\d+\.\d+)>$")


def swap_window(r: Runner, cmd: list[str], targets: list[str]) -> dict[str, Any]:
    """Run CMD (a refresh) under strace and measure, for each TARGET, the swap: overlayctl
    attaches the new overlay beneath the old one and then detaches the old one, upstream
    unmounts the old one and then mounts the new one. "window_us" runs from the return of
    the first of the two calls to the start of the second (µs): how long both overlays are
    stacked (overlayctl), or how long TARGET shows the plain base (upstream, given negative).
    "detach_us" is how long the umount2 call itself took (the kernel waits for an RCU grace
    period there). Reusable: any command, any targets. The process is traced (each traced
    call stops it), so the times are upper bounds."""
    st = shutil.which("strace")
    if not st:
        return {"error": "no strace"}
    fd, out = tempfile.mkstemp(prefix="bench-strace")
    os.close(fd)
    try:
        res = r.run([st, "-f", "-ttt", "-T", "-s", "4096", "-o", out,
                     "-e", "trace=move_mount,mount,umount2", *cmd])
        text = Path(out).read_text()
    finally:
        os.unlink(out)
    if res["rc"] != 0:
        return {"error": res["stderr"].strip()[-300:], "rc": res["rc"]}
    # (start, end, call, arguments)
    events: list[tuple[float, float, str, str]] = []
    for line in text.splitlines():
        m = STRACE_RE.match(line.strip())
        if not m or m[5] == "?" or int(m[5]) < 0:
            continue
        t = float(m[2])
        events.append((t, t + float(m[6]), m[3], m[4]))
    result: dict[str, Any] = {"targets": {}}
    for t in targets:
        q = f'"{t}"'
        # Upstream 262 mounts onto /proc/self/fd/N of the target: its attach is the
        # recursive bind of its staging overlay (/run/systemd/sysext/overlay/<hierarchy>).
        staged = f'"/run/systemd/sysext/overlay/{os.path.basename(t)}"'
        attach = [e for e in events if e[2] in ("move_mount", "mount") and (
                  q in e[3] or (e[3].startswith(staged) and "MS_BIND|MS_REC" in e[3]))
                  and "MS_REMOUNT" not in e[3] and "MS_PRIVATE" not in e[3]]
        detach = [e for e in events if e[2] == "umount2" and e[3].startswith(q)]
        if not attach or not detach:
            result["targets"][t] = {"error": f"no attach/detach of {t} seen",
                                    "calls": [e[2] for e in events]}
            continue
        new, old = attach[-1], detach[-1]
        if new[0] < old[0]:     # beneath first, then the old one detached
            w = old[0] - new[1]
        else:                   # the old one unmounted first: a gap
            w = -(new[0] - old[1])
        result["targets"][t] = {"window_us": round(w * 1e6, 1),
                                "detach_us": round((old[1] - old[0]) * 1e6, 1),
                                "beneath": "0x200" in new[3] or "BENEATH" in new[3]}
    return result


def bench_swap(args: Any, tools: Tools, r: Runner, tmp: Path, n: int = 10,
               reps: int = 5) -> list[dict[str, Any]]:
    """The swap window of `refresh --always-refresh=yes` of a sysext merge of N extensions in
    modes no and yes, overlayctl (beneath, then detach) and upstream (unmount, then mount)."""
    rows = []
    root = tmp / f"s{n}"
    for mode in ("no", "yes"):
        set_mutable_state(root, "sysext", mode)
        for t in ["overlayctl", *(["upstream"] if "sysext" in tools.up else [])]:
            wins: dict[str, list[float]] = {}
            detach: list[float] = []
            err = ""
            for _ in range(reps):
                r.run(tools.cmd(t, "sysext", root, "merge", mode))
                w = swap_window(r, tools.cmd(t, "sysext", root, "refresh", mode),
                                [str(root / "usr")])
                r.run(tools.cmd(t, "sysext", root, "unmerge"))
                force_unmount(root)
                if "error" in w:
                    err = w["error"]
                    continue
                for tgt, v in w["targets"].items():
                    if "window_us" in v:
                        wins.setdefault(tgt, []).append(v["window_us"])
                        detach.append(v["detach_us"])
                    else:
                        err = v["error"]
            rows.append({"tool": t, "mode": mode, "n": n, "error": err,
                         "window_us": {k: stats(v) for k, v in wins.items()},
                         "detach_us": stats(detach)})
            log(f"swap window {t} {mode}: "
                + ", ".join(f"{k}: {median_of(stats(v))} µs" for k, v in wins.items())
                + (f" ({err})" if err else ""))
    return rows


# ----------------------------------------------------------------------------- profile


def profile(tools: Tools, r: Runner, jobs: list[tuple[str, Path, list[str], str | None]]
            ) -> dict[str, Any]:
    """cProfile of the given overlayctl runs (name, root, argv, class to unmerge after);
    top functions by own and by cumulative time."""
    import pstats
    out: dict[str, Any] = {}
    OUT.mkdir(exist_ok=True)
    sp = str(REPO)
    for name, root, argv, cls in jobs:
        prof = OUT / f"profile-{name}.prof"
        code = (f"import sys; sys.path.insert(0, {sp!r}); sys.argv = ['overlayctl', "
                f"{f'--root={root}'!r}, *{argv!r}]; import cProfile; "
                f"cProfile.run('from overlayctl.cli import main; main()', {str(prof)!r})")
        res = r.run([tools.python, "-I", "-S", "-c", code])
        if cls:
            r.run(tools.cmd("overlayctl", cls, root, "unmerge"))
        force_unmount(root)
        if res["rc"] != 0 or not prof.exists():
            out[name] = {"error": res["stderr"][-300:]}
            continue
        st = pstats.Stats(str(prof))
        total = st.total_tt  # type: ignore[attr-defined]

        def top(key: str, st: pstats.Stats = st) -> list[dict[str, Any]]:
            items = []
            for (fn, ln, func), (_, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
                items.append({"function": f"{_short(fn)}:{ln}({func})", "calls": nc,
                              "tottime_ms": round(tt * 1000, 2), "cumtime_ms": round(ct * 1000, 2)})
            items.sort(key=lambda d: -d[key])
            return items[:25]

        out[name] = {"total_ms": round(total * 1000, 1), "top_tottime": top("tottime_ms"),
                     "top_cumtime": top("cumtime_ms"), "prof_file": str(prof.relative_to(REPO))}
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


# ----------------------------------------------------------------------------- machine


def machine(tools: Tools) -> dict[str, Any]:
    import platform
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
            "python": platform.python_version(), "python_exe": tools.real_python, "mem": mem,
            "loadavg_start": loadavg(),
            "overlayctl": {k: " ".join(v) for k, v in tools.ovl.items()}, "upstream": up}
