"""The plot of merge time against the number of extensions (docs/perf-merge.svg): matplotlib
when it can be imported (or from bench/.venv), otherwise an SVG written by hand.

    python3 bench/plot.py RESULTS.json OUT.svg      # redraw from a saved run
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLASSES = ("sysext", "confext")
PLOT_MODES = ("no", "yes")
TOOLS = ("overlayctl", "baseline", "venv", "upstream")
COLORS = {"overlayctl": "#1f77b4", "baseline": "#7f7f7f", "venv": "#2ca02c",
          "upstream": "#ff7f0e"}
LABEL = {"overlayctl": "overlayctl (launcher)", "baseline": "before (main, launcher)",
         "venv": ".venv/bin/overlayctl", "upstream": "systemd-sysext 262"}
TITLE = "merge time against number of extensions (median, bars: min–max)"


def series(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for cls in CLASSES:
        for mode in PLOT_MODES:
            for tool in TOOLS:
                pts, fails = [], []
                for r in res.get("merge", []):
                    if r["class"] != cls or r["mode"] != mode or tool not in r["tools"]:
                        continue
                    st = r["tools"][tool]["merge"]["stats"]
                    if st:
                        pts.append((r["n"], st["median"], st["min"], st["max"]))
                    else:
                        fails.append(r["n"])
                if pts or fails:
                    out.append({"class": cls, "mode": mode, "tool": tool, "pts": pts,
                                "fails": fails})
    return out


def floor(res: dict[str, Any], cls: str) -> float | None:
    xs = [r["floor"]["median"] for r in res.get("merge", [])
          if r["class"] == cls and r.get("floor")]
    return sorted(xs)[len(xs) // 2] if xs else None


def plot_matplotlib(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"
    plt.rcParams["svg.hashsalt"] = "overlayctl"
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, cls in zip(axes, CLASSES, strict=True):
        top = 0.0
        for s in series(res):
            if s["class"] != cls or not s["pts"]:
                continue
            ls = "-" if s["mode"] == "no" else "--"
            xs = [p[0] for p in s["pts"]]
            ys = [p[1] for p in s["pts"]]
            err = [[p[1] - p[2] for p in s["pts"]], [p[3] - p[1] for p in s["pts"]]]
            ax.errorbar(xs, ys, yerr=err, fmt="o" + ls, color=COLORS[s["tool"]], capsize=3,
                        ms=4, label=f"{LABEL[s['tool']]} --mutable={s['mode']}")
            top = max(top, *[p[3] for p in s["pts"]])
        fl = floor(res, cls)
        if fl:
            ax.axhline(fl, color="grey", ls=":", lw=1)
            ax.annotate(f"floor: python -I -S -c 'import ctypes' ({fl:.1f} ms)", (0, fl),
                        textcoords="offset points", xytext=(4, 3), fontsize=7, color="grey")
        ax.set_title(f"{cls} merge")
        ax.set_xlabel("number of extensions")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0, top=max(top, fl or 0) * 1.1 or 1)
    axes[0].set_ylabel("wall time of the merge process (ms)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(TITLE, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, metadata={"Date": None})


def plot_svg(res: dict[str, Any], path: Path) -> None:
    """Without matplotlib: a plain SVG line chart written by hand."""
    W, H, P = 1000, 420, 60
    pw = (W - 3 * P) / 2
    ss = series(res)
    ymax = max([p[3] for s in ss for p in s["pts"]] + [1]) * 1.1
    xmax = max([p[0] for s in ss for p in s["pts"]] + [x for s in ss for x in s["fails"]] + [1])
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{TITLE}</text>']
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
        for xv in sorted({p[0] for s in ss for p in s["pts"]}):
            o.append(f'<text x="{X(xv):.1f}" y="{y0 + 15}" text-anchor="middle">{xv}</text>')
        o.append(f'<text x="{x0 + pw / 2}" y="{y0 + 32}" text-anchor="middle">number of '
                 'extensions</text>')
        fl = floor(res, cls)
        if fl:
            o.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(fl):.1f}" y2="{Y(fl):.1f}" '
                     'stroke="grey" stroke-dasharray="2,3"/>')
            o.append(f'<text x="{x0 + 4}" y="{Y(fl) - 4:.1f}" fill="grey">floor ({fl:.1f} ms)'
                     '</text>')
        ly = P + 15
        for s in ss:
            if s["class"] != cls or not s["pts"]:
                continue
            c = COLORS[s["tool"]]
            dash = "" if s["mode"] == "no" else ' stroke-dasharray="6,4"'
            pts = " ".join(f"{X(p[0]):.1f},{Y(p[1]):.1f}" for p in s["pts"])
            o.append(f'<polyline points="{pts}" fill="none" stroke="{c}" '
                     f'stroke-width="2"{dash}/>')
            for p in s["pts"]:
                o.append(f'<circle cx="{X(p[0]):.1f}" cy="{Y(p[1]):.1f}" r="3" fill="{c}"/>')
                o.append(f'<line x1="{X(p[0]):.1f}" x2="{X(p[0]):.1f}" y1="{Y(p[2]):.1f}" '
                         f'y2="{Y(p[3]):.1f}" stroke="{c}"/>')
            o.append(f'<line x1="{x0 + 10}" x2="{x0 + 35}" y1="{ly}" y2="{ly}" stroke="{c}" '
                     f'stroke-width="2"{dash}/>')
            o.append(f'<text x="{x0 + 40}" y="{ly + 4}">{LABEL[s["tool"]]} --mutable='
                     f'{s["mode"]}</text>')
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
        p = subprocess.run([str(vpy), __file__, str(json_path), str(path)],
                           capture_output=True, text=True)
        if p.returncode == 0:
            return "matplotlib (bench/.venv)"
        print(f"bench/.venv plot failed: {p.stderr.strip()[-300:]}", file=sys.stderr)
    plot_svg(res, path)
    return "hand-written SVG"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py RESULTS.json OUT.svg")
    plot_matplotlib(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
