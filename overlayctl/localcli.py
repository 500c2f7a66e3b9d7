"""CLI side of the local-change verbs: diff, which, reset, pin, unpin, cleanup, commit."""

from __future__ import annotations

import os
import sys

from overlayctl import local, log
from overlayctl.errors import die
from overlayctl.output import emit_json, table
from overlayctl.progress import Progress

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from overlayctl.args import Args
    from overlayctl.mountns import Locked
    from overlayctl.upper import Change


def run(verb: str, words: list[str], args: Args) -> int:
    root = args.root
    if verb == "diff":
        # --content and --json=short print each change as it comes; the table waits for
        # the widths, pretty JSON for the whole value.
        streaming = args.content or args.json == "short"
        with Progress("entries read", streaming=streaming) as progress:
            if args.content:
                return _content(local.iter_diff(root, words, progress, rows=False))
            changes = local.iter_diff(root, words, progress)
            if args.json == "short":
                _stream_json(j for _, _, j in changes if j is not None)
                return 0
            rows = [j for _, _, j in changes if j is not None]
            progress.clear()
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
        with Progress("entries read") as progress:
            actions = local.cleanup(locked, words, args.dry_run, progress)
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


def _stream_json(rows: Iterator[dict[str, Any]], batch: int = 256) -> None:
    """A JSON array, a batch of elements at a time: the same text as json.dumps(list(rows),
    separators=(",", ":")), printed as it is made."""
    import json
    out = sys.stdout
    first = True
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal first
        text = json.dumps(chunk, separators=(",", ":"))
        out.write(("[" if first else ",") + text[1:-1])
        first = False
        chunk.clear()

    for r in rows:
        chunk.append(r)
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    out.write("[]\n" if first else "]\n")


def _content(changes: Iterator[tuple[local.Stack, Change, dict[str, Any] | None]]) -> int:
    """diff --content: a unified diff of each modified or added file against the entry
    below it (what the walk found), written as soon as it is made. Identical copies have
    nothing to show and are not read again."""
    import difflib
    for st, c, _ in changes:
        if c.change not in ("modified", "added"):
            continue
        assert st.upper is not None
        up = os.path.join(st.upper, c.rel)
        if not os.path.isfile(up) or os.path.islink(up):
            continue
        low = c.lower
        new = _lines(up)
        old = _lines(low.path) if low and os.path.isfile(low.path) else []
        path = os.path.join(st.hierarchy, c.rel)       # as the row's "path" and "layer"
        layer = low.layer.role if low else "none"
        fromfile, tofile = f"a{path} ({layer})", f"b{path} (upper)"
        if old:
            sys.stdout.writelines(difflib.unified_diff(old, new, fromfile=fromfile,
                                                       tofile=tofile))
        else:
            sys.stdout.writelines(added_diff(new, fromfile, tofile))
    return 0


def added_diff(new: list[str], fromfile: str, tofile: str) -> list[str]:
    """difflib.unified_diff([], NEW, fromfile, tofile), without its matcher: a file with
    nothing below it is one hunk of added lines (a tenth of a typical /etc)."""
    if not new:
        return []
    size = "1" if len(new) == 1 else f"1,{len(new)}"
    return [f"--- {fromfile}\n", f"+++ {tofile}\n", f"@@ -0,0 +{size} @@\n",
            *("+" + line for line in new)]


def _lines(p: str) -> list[str]:
    with open(p, encoding="utf-8", errors="replace") as f:
        return f.readlines()
