"""The record of the lower layers' directories (issue 10): what it costs on the boot path.
A /usr of N directories of 8 files (a real /usr has about 8 files per directory) and 10
extensions of 20 directories each, merged with /usr as its own upper ("host") and over a
persistent upper; in-process milliseconds from overlayctl's debug lines, the whole process,
and the size of the record."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from measure import (
    Runner,
    Tools,
    ext_dir,
    force_unmount,
    log,
    make_base,
    set_mutable_state,
    stats,
    write,
)

HYGIENE_RE = re.compile(r"^hygiene of /usr: (\d+) opaque markers cleared, (\d+) directories "
                        r"examined, (\d+) deliberate, in ([0-9.]+) ms")
UNMERGE_HYGIENE_RE = re.compile(r"^hygiene of /usr at unmerge: ([0-9.]+) ms")
SIZES = (1000, 4000, 16000)


def make_big_usr(root: Path, ndirs: int) -> None:
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


def bench_hygiene(args: Any, tools: Tools, r: Runner, tmp: Path,
                  sizes: tuple[int, ...] = SIZES) -> list[dict[str, Any]]:
    rows = []
    dbg = Runner(dict(r.env, SYSTEMD_LOG_LEVEL="debug"))
    reps = max(2, args.reps // 2)
    for ndirs in sizes[:2] if args.quick else sizes:
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
            for rep in range(reps + 1):
                record.unlink(missing_ok=True)
                for case in ("first merge", "merge"):
                    m = dbg.run(tools.cmd("overlayctl", "sysext", root, "merge", mode))
                    u = dbg.run(tools.cmd("overlayctl", "sysext", root, "unmerge"))
                    force_unmount(root)
                    if rep == 0:
                        continue   # warm-up
                    got = next((x for x in map(HYGIENE_RE.match, m["stderr"].splitlines())
                                if x), None)
                    un = next((x for x in map(UNMERGE_HYGIENE_RE.match,
                                              u["stderr"].splitlines()) if x), None)
                    cases[case].append({"merge_ms": m["ms"],
                                        "hygiene_ms": float(got.group(4)) if got else None,
                                        "examined": int(got.group(2)) if got else None})
                    if case == "merge":
                        cases["unmerge"].append({"merge_ms": u["ms"],
                                                 "hygiene_ms": float(un.group(1)) if un
                                                 else None})
            label = "host (/usr its own upper)" if mode == "host" else "persistent upper"
            row["cases"][label] = {
                k: {"hygiene_ms": stats([x["hygiene_ms"] for x in v
                                         if x.get("hygiene_ms") is not None]),
                    "whole_ms": stats([x["merge_ms"] for x in v]),
                    "examined": next((x["examined"] for x in v if x.get("examined")), None)}
                for k, v in cases.items()}
            row["cases"][label]["record_bytes"] = (record.stat().st_size if record.exists()
                                                   else None)
        rows.append(row)
    return rows


def report_lines(rows: list[dict[str, Any]], fmt_ms: Any) -> list[str]:
    L = ["## The record of the lower layers' directories (issue 10)\n",
         "In-process cost from overlayctl's debug lines (ms, median [min–max]), and the whole "
         "process. `/usr` has N directories of 8 files; 10 extensions of 20 directories "
         "each.\n",
         "| /usr dirs | upper | step | hygiene ms | whole process ms | directories read | "
         "record bytes |", "|---:|---|---|---:|---:|---:|---:|"]
    for h in rows:
        for label, c in h["cases"].items():
            for step in ("merge", "first merge", "unmerge"):
                x = c[step]
                L.append(f"| {h['dirs']} | {label} | {step} | {fmt_ms(x['hygiene_ms'])} | "
                         f"{fmt_ms(x['whole_ms'])} | {x['examined'] or '—'} | "
                         f"{c['record_bytes'] or '—'} |")
    L.append("")
    return L
