"""CLI side of the local-change verbs: diff, which, reset, pin, unpin, cleanup."""

from __future__ import annotations

import difflib
import os
import sys

from overlayctl import local, log
from overlayctl.errors import die
from overlayctl.output import emit_json, table

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

    from overlayctl.args import Args
    from overlayctl.mountns import Locked
    from overlayctl.settings import ExtClass


def run(verb: str, words: list[str], args: Args) -> int:
    root = args.root
    if verb == "diff":
        rows = local.diff(root, words)
        if args.content:
            return _content(root, words, rows)
        if args.json != "off":
            emit_json(rows, args.json)
        elif rows:
            table(["change", "path", "layer", "default changed"],
                  [[r["change"], r["path"],
                    (r["layer"] or "-") + (f" ({r['extension']})" if r["extension"] else ""),
                    "yes" if r["default_changed"] else ""] for r in rows],
                  legend=not args.no_legend)
        else:
            log.info("No local changes.")
        return 0
    if verb == "which":
        if len(words) != 1:
            raise die("which takes exactly one PATH", "e.g. overlayctl which /etc/hosts")
        r = local.which(root, words[0])
        if args.json != "off":
            emit_json(r, args.json)
        else:
            label = r["layer"] + (f" {r['extension']}" if r["extension"] else "")
            print(f"{r['path']}: {label} ({r['source']})")
        return 0
    from overlayctl.engine import require_root
    from overlayctl.mountns import lock
    require_root("change layers")
    with lock(root) as locked:
        return _change(locked, verb, words, args)


def _change(locked: Locked, verb: str, words: list[str], args: Args) -> int:
    actions: list[local.Action]
    if verb == "reset":
        if not words:
            raise die("reset needs at least one PATH", "e.g. overlayctl reset /etc/hosts")
        actions = local.reset(locked, words, args.dry_run)
    elif verb in ("pin", "unpin"):
        if not words:
            raise die(f"{verb} needs at least one PATH", f"e.g. overlayctl {verb} /etc/hosts")
        actions = local.pin(locked, words, unpin=(verb == "unpin"))
    else:
        actions = local.cleanup(locked, words, args.dry_run)
    done: list[dict[str, Any]] = [a.as_json() for a in actions]
    if args.json != "off":
        emit_json(done, args.json)
    else:
        prefix = "would be " if args.dry_run else ""
        for r in done:
            print(f"{r['path']}: {prefix}{r['action']}" + (f" ({r['detail']})" if r["detail"]
                                                           else ""))
        if not done:
            log.info("Nothing to do.")
    return 0


def _content(root: str, words: list[str], rows: list[dict[str, Any]]) -> int:
    """diff --content: unified diffs of modified files against the entry below. Each
    hierarchy's layers are opened once, and each diff is written as soon as it is made."""
    by_h: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    classes: dict[str, ExtClass] = {}
    for r in rows:
        if r["change"] not in ("modified", "added", "identical"):
            continue
        cls, h, rel = local.hierarchy_of(r["path"])
        classes[h] = cls
        by_h.setdefault(h, []).append((rel, r))
    for h, items in by_h.items():
        with local.open_stack(root, classes[h], h) as st:
            assert st.upper is not None
            for rel, r in items:
                up = os.path.join(st.upper, rel)
                if not os.path.isfile(up) or os.path.islink(up):
                    continue
                low = st.lower(rel)
                new = _lines(up)
                old = _lines(low.path) if low and os.path.isfile(low.path) else []
                sys.stdout.writelines(difflib.unified_diff(
                    old, new, fromfile=f"a{r['path']} ({r['layer'] or 'none'})",
                    tofile=f"b{r['path']} (upper)"))
    return 0


def _lines(p: str) -> list[str]:
    with open(p, encoding="utf-8", errors="replace") as f:
        return f.readlines()
