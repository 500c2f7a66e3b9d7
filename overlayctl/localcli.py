"""CLI side of the local-change verbs: diff, which, reset, pin, unpin, cleanup, commit."""

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
    if verb == "commit":
        return _commit(words, args)
    require_root("change layers")
    with lock(root) as locked:
        return _change(locked, verb, words, args)


def _commit(words: list[str], args: Args) -> int:
    from overlayctl import commit
    from overlayctl.engine import require_root
    from overlayctl.mountns import lock
    if len(args.classes) != 1:
        raise die("commit needs the class: what to turn the upper layers into",
                  "overlayctl confext commit NAME, or overlayctl sysext commit NAME")
    if len(words) != 1:
        raise die("commit takes exactly one NAME", "e.g. overlayctl confext commit site")
    require_root("read the upper layers (their overlay xattrs) and commit them")
    opts = commit.Options(words[0], fmt=args.format or "squashfs", output=args.output,
                          any_id=args.any, dry_run=args.dry_run, verity=args.verity,
                          sign_key=args.sign_key, certificate=args.certificate)
    with lock(args.root) as locked:
        r = commit.commit(locked, args.classes[0], opts)
    below = ", ".join(repr(n) for n in r["order"]["below"])
    above = ", ".join(repr(n) for n in r["order"]["above"])
    if below or above:
        where = " and ".join(x for x in (below and f"above {below}", above and f"below {above}")
                             if x)
        log.info(f"'{r['name']}' is ordered {where} among the {r['class']}s (by name).")
    else:
        log.info(f"'{r['name']}' is the only {r['class']}.")
    by: dict[str, list[str]] = {}
    for h in r["hidden"]:
        by.setdefault(h["by"], []).append(h["path"])
    for name, paths in by.items():
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        log.warning(f"{r['class']} '{name}' is ordered above '{r['name']}' and hides "
                    f"{', '.join(paths[:3])}{more} of it.")
    if args.json != "off":
        emit_json(r, args.json)
        return 0
    into = f"{r['name']} ({r['class']}, {r['format']}, {r['output']})"
    if args.dry_run:
        if r["entries"]:
            table(["type", "path", "change"],
                  [[e["type"] + (" (opaque)" if e["opaque"] else ""),
                    e["path"] + (f" (from {e['from']})" if "from" in e else ""),
                    e["change"] or "-"] for e in r["entries"]],
                  legend=not args.no_legend)
        for sk in r["skipped"]:
            log.info(f"{sk['path']}: not captured ({sk['reason']}).")
        print(f"Would commit {len(r['entries'])} entries into {into}.")
        return 0
    print(f"Committed {len(r['entries'])} entries into {into}.")
    if r["verity"]:
        from overlayctl.paths import inside
        for f in r["verity"]["files"]:
            print(f"  {inside(args.root, f)}")
    return 0


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
