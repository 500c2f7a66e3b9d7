"""Tables and JSON on stdout."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any


def emit_json(value: Any, style: str) -> None:
    import json
    if style == "pretty":
        text = json.dumps(value, indent=2)
    else:
        text = json.dumps(value, separators=(",", ":"))
    sys.stdout.write(text + "\n")


def table(headers: list[str], rows: list[list[str]], legend: bool = True) -> None:
    cols = len(headers)
    widths = [max([len(headers[i]) if legend else 0] + [len(r[i]) for r in rows])
              for i in range(cols)]
    out = []
    if legend:
        out.append("  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers)).rstrip())
    for r in rows:
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    if legend:
        out.append("")
        out.append(f"{len(rows)} {'entry' if len(rows) == 1 else 'entries'} listed.")
    sys.stdout.write("\n".join(out) + "\n")
