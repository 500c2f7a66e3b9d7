"""The reporting half of the bench: the targets of issue 14 checked against a results dict
(as measure.py's functions return it and run.py saves it), and the markdown report."""

from __future__ import annotations

import itertools
from typing import Any

from measure import CLASSES, KERNEL_MAX_EXT, MODES, VERBS, MiB, median_of

BINDING_LOCAL_SIZE = 5000


def fmt_ms(st: dict[str, float] | None, spread: bool = True) -> str:
    if not st:
        return "—"
    m = st["median"]
    d = 1 if m < 100 else 0
    if not spread:
        return f"{m:.{d}f}"
    return f"{m:.{d}f} [{st['min']:.{d}f}–{st['max']:.{d}f}]"


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
    if not t:
        return None
    return median_of(t[verb]["stats"])


def floor_of(res: dict[str, Any]) -> float | None:
    """The median of every floor run of the merge cycles."""
    xs = [r["floor"]["median"] for r in res.get("merge", []) if r.get("floor")]
    return sorted(xs)[len(xs) // 2] if xs else None


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    rows = res.get("merge", [])
    fits: dict[str, Any] = {}
    for cls in CLASSES:
        for mode in MODES:
            for tool in ("overlayctl", "baseline", "venv", "upstream"):
                pts = [(r["n"], merge_med(r, tool)) for r in rows
                       if r["class"] == cls and r["mode"] == mode]
                good = [(x, y) for x, y in pts if y is not None]
                f = linfit(good)
                if f:
                    f["max_n_fitted"] = max(x for x, _ in good)
                    fits[f"{cls}/{mode}/{tool}"] = f
    targets: list[dict[str, Any]] = []

    def ratio(o: float | None, u: float | None) -> str:
        return f"{o:.1f} ms vs {u:.1f} ms = {o / u:.2f}×" if o and u else "—"

    for r in rows:
        o = merge_med(r, "overlayctl")
        fl = r["floor"]["median"] if r.get("floor") else None
        u = merge_med(r, "upstream")
        case = f"{r['class']} {r['mode']}, {r['n']} ext"
        binding = r["class"] == "sysext" and r["mode"] in ("no", "yes")
        if r["n"] == 1 and o and fl:
            targets.append({"target": "1 extension ≤ 1.5× the floor", "case": case,
                            "measured": ratio(o, fl), "met": o <= 1.5 * fl,
                            "binding": binding})
        if r["n"] == 10 and o and u:
            targets.append({"target": "10 extensions ≤ 3× upstream", "case": case,
                            "measured": ratio(o, u), "met": o <= 3 * u, "binding": binding})
        if r["n"] == 90 and o and u:
            targets.append({"target": "90 extensions ≤ 1× upstream", "case": case,
                            "measured": ratio(o, u), "met": o <= u, "binding": binding})
    for p in res.get("memory", []):
        peak = p["peak_rss_kib"] / MiB
        targets.append({"target": f"peak memory of a {p['n']}-extension merge < 40 MiB",
                        "case": f"{p['class']} {p['mode']}", "measured": f"{peak:.1f} MiB",
                        "met": 0 < peak < 40, "binding": True})
    local = res.get("local", [])
    for d in local:
        for k, c in d["cases"].items():
            if not c["vs"] or not k.startswith("overlayctl"):
                continue
            o, ref = median_of(c["stats"]), median_of(d["cases"][c["vs"]]["stats"])
            targets.append({"target": f"`{k}` ≤ 2× `{c['vs']}`",
                            "case": f"{d['tree']['entries']} entries",
                            "measured": ratio(o, ref), "met": bool(o and ref and o <= 2 * ref),
                            "binding": (d["size"] == BINDING_LOCAL_SIZE and "--json" in k)
                            or (d["size"] == BINDING_LOCAL_SIZE and "--content" in k)})
    lin: dict[str, Any] = {}
    if len(local) >= 2:
        for k in local[0]["cases"]:
            pts = [(d["tree"]["entries"], median_of(d["cases"][k]["stats"])) for d in local]
            good = [(x, y) for x, y in pts if y is not None]
            f = linfit(good)
            if not f:
                continue
            # Linear: the per-entry cost of the largest tree is no more than 1.5x that of the
            # middle one (start-up excluded by taking differences).
            xs = sorted(good)
            per = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in itertools.pairwise(xs)]
            f["per_entry_ms"] = per
            lin[k] = f
            if k.startswith("overlayctl") and len(per) >= 2:
                targets.append({"target": f"`{k}` grows linearly", "case":
                                f"{xs[0][0]}–{xs[-1][0]} entries",
                                "measured": "µs/entry between sizes: "
                                + ", ".join(f"{p * 1000:.1f}" for p in per)
                                + f"; R² {f['r2']:.3f}",
                                "met": per[-1] <= 1.5 * max(per[0], 1e-9),
                                "binding": "--json" in k or "--content" in k})
    return {"fits": fits, "targets": targets, "local_fits": lin}


def _budget_line(b: dict[str, Any]) -> str:
    if not b or "error" in b:
        return f"Import budget: not measured ({(b or {}).get('error', 'no start-up run')})."
    ins = b.get("instructions") or {}
    s = (f"Import budget of a 1-extension merge through the launcher (`-X importtime`, median of "
         f"{b['import_ms']['n']}): **{b['modules']:.0f} modules, {b['overlayctl_modules']} of "
         f"them overlayctl's, {b['import_ms']['median']:.1f} ms** of import time (sum of self "
         f"times); the run took {b['wall_ms']['median']:.1f} ms under -X importtime.")
    if ins.get("floor") and ins.get("overlayctl merge, 1 extension"):
        s += (f" Instructions (callgrind, load-independent): merge "
              f"{ins['overlayctl merge, 1 extension'] / 1e6:.1f} M, floor "
              f"{ins['floor'] / 1e6:.1f} M "
              f"({ins['overlayctl merge, 1 extension'] / ins['floor']:.2f}×)"
              + (f", `--version` {ins['overlayctl --version'] / 1e6:.1f} M"
                 if ins.get("overlayctl --version") else "") + ".")
    return s


def report(res: dict[str, Any]) -> str:
    L: list[str] = []
    m = res["machine"]
    L.append(f"# overlayctl benchmark — {res['started']}{' (quick)' if res['quick'] else ''}\n")
    L.append(f"Machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem']} RAM, Linux {m['kernel']}, "
             f"Python {m['python']} ({m['python_exe']}); load average "
             f"{' '.join(m['loadavg_start'])} at the start, "
             f"{' '.join(m.get('loadavg_end', ['?']))} at the end. Commit {m.get('git')}"
             + (f" (uncommitted changes in {', '.join(m['overlayctl_changes'])})"
                if m.get("overlayctl_changes") else "")
             + ". overlayctl: " + "; ".join(f"{k} = `{v}`" for k, v in m["overlayctl"].items())
             + f"; upstream: {m['upstream'] or 'not found'}. {res['reps']} cycles per cell, "
             "interleaved; times are wall-clock ms of the whole process, median [min–max].\n")
    budget = (res.get("startup") or {}).get("import_budget")
    if res.get("merge"):
        tools = [t for t in ("overlayctl", "baseline", "venv", "upstream")
                 if any(t in r["tools"] for r in res["merge"])]
        L.append("## merge / refresh / unmerge\n")
        L.append(_budget_line(budget or {}) + "\n")
        L.append("`overlayctl` is the lean launcher (as /usr/bin/overlayctl in the Debian "
                 "package), `baseline` the same for the checkout given with --baseline, "
                 "`venv` is `.venv/bin/overlayctl`; the floor is `python -I -S -c "
                 "'import ctypes'`, run in the same cycles. `refresh` is `refresh "
                 "--always-refresh=yes`; `noop` a plain `refresh` with nothing changed.\n")
        hdr = "| class | mode | N | floor |" + "".join(f" merge {t} |" for t in tools)
        sep = "|---|---|---:|---:|" + "---:|" * len(tools)
        if "upstream" in tools:
            hdr += " ovl ÷ upstream |"
            sep += "---:|"
        if "baseline" in tools:
            hdr += " ovl ÷ baseline |"
            sep += "---:|"
        hdr += " ovl ÷ floor | refresh ovl | noop ovl | unmerge ovl |"
        sep += "---:|---:|---:|---:|"
        if "upstream" in tools:
            hdr += " refresh up | noop up | unmerge up |"
            sep += "---:|---:|---:|"
        hdr += " peak RSS ovl MiB |"
        sep += "---:|"
        L += [hdr, sep]
        for r in res["merge"]:
            o = r["tools"]["overlayctl"]
            cells = [r["class"], r["mode"], str(r["n"]), fmt_ms(r.get("floor"), False)]
            for t in tools:
                x = r["tools"].get(t)
                if x is None:
                    cells.append("—")
                elif x["failed"] and not x["merge"]["stats"]:
                    cells.append(f"FAILS ({x['failed'][:70]})")
                else:
                    cells.append(fmt_ms(x["merge"]["stats"]))
            om = merge_med(r, "overlayctl")
            if "upstream" in tools:
                um = merge_med(r, "upstream")
                cells.append(f"{om / um:.2f}×" if om and um else "—")
            if "baseline" in tools:
                bm = merge_med(r, "baseline")
                cells.append(f"{om / bm:.2f}×" if om and bm else "—")
            fl = r["floor"]["median"] if r.get("floor") else None
            cells.append(f"{om / fl:.2f}×" if om and fl else "—")
            cells += [fmt_ms(o[v]["stats"], False) for v in ("refresh", "refresh-noop", "unmerge")]
            if "upstream" in tools:
                u = r["tools"].get("upstream")
                cells += [fmt_ms(u[v]["stats"], False) if u else "—"
                          for v in ("refresh", "refresh-noop", "unmerge")]
            cells.append(f"{max(o[v]['peak_rss_kib'] for v in VERBS) / MiB:.1f}")
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    if res.get("memory"):
        L.append(f"## peak memory of a {KERNEL_MAX_EXT}-extension merge\n")
        L.append("| class | mode | peak RSS MiB | ms (under GNU time) |")
        L.append("|---|---|---:|---:|")
        for p in res["memory"]:
            L.append(f"| {p['class']} | {p['mode']} | {p['peak_rss_kib'] / MiB:.1f} | "
                     f"{fmt_ms(p['ms_under_time'])}" + (f" ({p['error']})" if p["error"] else "")
                     + " |")
        L.append("")
    if res.get("upstream_limit"):
        L.append("## upstream's extension limit\n")
        for p in res["upstream_limit"]:
            if "first_fail" in p:
                L.append(f"- {p['class']} --mutable={p['mode']}: merges {p['max_ok']}, fails from "
                         f"{p['first_fail']} ({p['lowerdir_path_len']} bytes of mount options "
                         f"per layer): `{p.get('error_at_fail', '')}`")
            else:
                L.append(f"- {p['class']} --mutable={p['mode']}: merges all {p['max_ok']} tested")
        L.append("")
    if res.get("local"):
        L.append("## diff and diff --content over /etc, against find and diff -ruN\n")
        L.append("A never-merged root whose real /etc is its own upper over a defaults layer "
                 "(`[Defaults] /etc=/usr/share/factory/etc`): a tenth new files, a tenth "
                 "modified copies of defaults, the rest identical copies.\n")
        L.append("| /etc entries | command | ms median [min–max] | ratio | lines out | "
                 "peak RSS MiB |")
        L.append("|---:|---|---:|---:|---:|---:|")
        for d in res["local"]:
            for k, c in d["cases"].items():
                ref = d["cases"][c["vs"]]["stats"] if c["vs"] else None
                o = median_of(c["stats"])
                rt = f"{o / ref['median']:.2f}× `{c['vs']}`" if o and ref else ""
                rc = "" if set(c["rc"]) <= {0, 1} else f" (exit {c['rc']})"
                L.append(f"| {d['tree']['entries']} | `{k}`{rc} | {fmt_ms(c['stats'])} | {rt} | "
                         f"{c['output_lines']} | {c['peak_rss_kib'] / MiB:.1f} |")
        L.append("")
    if res.get("swap"):
        L.append("## refresh swap window\n")
        L.append("`refresh --always-refresh=yes` of a sysext merge, traced (`strace -ttt -T`, "
                 "so upper bounds): overlayctl mounts the new overlay beneath the old one and "
                 "then detaches the old one; the window is the time between the two calls, "
                 "both overlays stacked. Upstream unmounts the old overlay and then mounts the "
                 "new one; its window is negative: /usr shows the plain base for that long. "
                 "The detach column is the umount2 call itself (the kernel waits for an RCU "
                 "grace period before it returns; the old overlay is already gone from the "
                 "mount table by then).\n")
        L.append("| tool | mode | N | window µs median [min–max] | umount2 µs |")
        L.append("|---|---|---:|---:|---:|")
        for s in res["swap"]:
            for st in s["window_us"].values():
                L.append(f"| {s['tool']} | {s['mode']} | {s['n']} | {fmt_ms(st)} | "
                         f"{fmt_ms(s.get('detach_us'), False)} |")
            if s["error"]:
                L.append(f"| {s['tool']} | {s['mode']} | {s['n']} | error: {s['error'][:80]} "
                         "| |")
        L.append("")
    s = res.get("startup")
    if s:
        L.append("## start-up\n")
        L.append("| command | ms median [min–max] | peak RSS MiB |")
        L.append("|---|---:|---:|")
        for k, c in s["cases"].items():
            L.append(f"| `{k}` | {fmt_ms(c['stats'])} | {c['peak_rss_kib'] / MiB:.1f} |")
        b = s.get("import_budget") or {}
        L.append("")
        L.append(_budget_line(b) + "\n")
        if "error" not in b:
            L.append("| top imports by self time | self ms | cumulative ms |")
            L.append("|---|---:|---:|")
            for d in b["top_self"][:12]:
                L.append(f"| {d['module']} | {d['self_ms']:.2f} | {d['cumulative_ms']:.2f} |")
            L.append("")
            L.append("Modules: " + " ".join(b["module_names"]) + "\n")
    a = res.get("analysis")
    if a:
        if a["fits"]:
            L.append("## fits (merge time = a + b·N)\n")
            L.append("| class/mode/tool | a ms | b ms/ext | R² | N range |")
            L.append("|---|---:|---:|---:|---:|")
            for k, f in a["fits"].items():
                L.append(f"| {k} | {f['intercept_ms']:.1f} | {f['slope_ms_per_ext']:.3f} | "
                         f"{f['r2']:.3f} | ≤{f['max_n_fitted']} |")
            L.append("")
        L.append("## targets of issue 14\n")
        L.append("Binding cases are those of the issue's check; the rest are informative.\n")
        L.append("| target | case | measured | met |")
        L.append("|---|---|---|---|")
        for t in sorted(a["targets"], key=lambda t: not t["binding"]):
            L.append(f"| {t['target']}{'' if t['binding'] else ' (informative)'} | {t['case']} "
                     f"| {t['measured']} | {'yes' if t['met'] else '**no**'} |")
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
    if res.get("hygiene"):
        import hygiene
        L.extend(hygiene.report_lines(res["hygiene"], fmt_ms))
    return "\n".join(L) + "\n"
