"""The command line: verbs and options, as a user of systemd-sysext expects them.
Errors become one line on stderr and exit status 1; nothing else prints a traceback."""

from __future__ import annotations

import os
import sys

from overlayctl import __version__, log
from overlayctl.args import Args, parse
from overlayctl.errors import OverlayctlError, die, hint_for
from overlayctl.personality import become, current, personality
from overlayctl.settings import (
    CLASSES,
    MUTABLE_MODES,
    Settings,
    load_settings,
    parse_defaults_arg,
    parse_image_policy,
    parse_mutable,
)

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

COMMIT_OPTIONS = ("format", "output", "any", "verity", "sign_key", "certificate")


def _since(us: int | None) -> str:
    if us is None:
        return "-"
    import time
    return time.strftime("%a %Y-%m-%d %H:%M:%S", time.localtime(us / 1e6))


def cmd_status(classes: list[str], args: Args) -> int:
    from overlayctl import engine
    rows: list[dict[str, Any]] = []
    for c in classes:
        rows.extend(engine.status_rows(_settings(c, args)))
    rows.sort(key=lambda r: r["hierarchy"])
    if args.json != "off":
        from overlayctl.output import emit_json
        emit_json(rows, args.json)
        return 0
    from overlayctl.output import table

    def upper(r: dict[str, Any]) -> str:
        if r.get("ephemeral"):
            return r["upperdir"] or "(ephemeral)"
        return r["upperdir"] or "-"

    table(["hierarchy", "extensions", "since", "mutable", "upper"],
          [[r["hierarchy"], " ".join(r["extensions"]) if r["extensions"] else "-",
            _since(r["since"]), r["mutable"] or "-", upper(r) if r["merged"] else "-"]
           for r in rows], legend=not args.no_legend)
    if rows and not rows[0]["atomic_refresh"]:
        log.notice("Note: this kernel cannot mount beneath (Linux < 6.5): refresh has a brief "
                   "gap.")
    for r in rows:
        if r.get("ephemeral") and r["merged"]:
            n = r.get("ephemeral_entries")
            what = f" ({n} entr{'y' if n == 1 else 'ies'} now)" if n is not None else ""
            log.notice(f"Note: {r['hierarchy']} is ephemeral: its writes{what} are dropped "
                       "when it is unmerged.")
        for d in r.get("detached", []):
            procs = ", ".join(f"{p['pid']} ({p['name']})" for p in d["processes"])
            log.notice(f"Note: a detached overlay of {r['hierarchy']} is still in use: {procs}")
    return 0


def cmd_list(classes: list[str], args: Args) -> int:
    from overlayctl import engine
    rows: list[dict[str, Any]] = []
    for c in classes:
        rows.extend(engine.list_rows(_settings(c, args)))
    rows.sort(key=lambda r: r["name"])
    if args.json != "off":
        from overlayctl.output import emit_json
        emit_json(rows, args.json)
        return 0
    if not rows:
        log.info("No OS extensions found.")
        return 0
    from overlayctl.output import table
    table(["name", "type", "path", "time"],
          [[r["name"], r["type"], r["path"], _since(r["time"])] for r in rows],
          legend=not args.no_legend)
    return 0


def cmd_merge(classes: list[str], args: Args, verb: str) -> int:
    from overlayctl import engine
    if not args.dry_run:
        engine.require_root()
    plans = engine.merge([_settings(c, args) for c in classes], refresh=(verb == "refresh"))
    if args.dry_run:
        if args.json != "off":
            from overlayctl.output import emit_json
            emit_json(plans, args.json)
        else:
            for p in plans:
                _print_plan(p)
    return 0


def _print_plan(p: dict[str, Any]) -> None:
    print(f"{p['hierarchy']} -> {p['target']}  (mutable={p['mode']})")
    if not p["merge"]:
        print(f"  not merged: {p['skip_reason']}")
        return
    if p["upper"]:
        print(f"  upper  {p['upperdir']}  [{p['upper']}]" + ("  (created)" if p["create_upper"]
                                                             else ""))
        print(f"  work   {p['workdir']}")
    for layer in p["layers"]:
        label = layer["role"] + (f" {layer['name']}" if layer["name"] else "")
        if layer["role"] == "import" and p.get("self_import"):
            label += ": the hierarchy itself"
        print(f"  lower  {layer['path'] or '<private tmpfs>'}  [{label}]")
    print(f"  options {','.join(p['options']) or '-'}  flags {','.join(p['mount_flags'])}")
    for path in p.get("clear_opaque", []):
        print(f"  clear opaque marker  {path}")
    for path in p.get("drop_whiteouts", []):
        print(f"  drop whiteout  {path}")


def cmd_unmerge(classes: list[str], args: Args) -> int:
    from overlayctl import engine
    # The reverse of merge: system extensions first, configuration extensions last.
    order = sorted(classes, key=lambda c: c != "sysext")
    if args.dry_run:
        for c in order:
            for t in engine.unmerge_dry_run(_settings(c, args)):
                print(f"Would unmerge '{t}'.")
        return 0
    engine.require_root()
    engine.unmerge([_settings(c, args) for c in order])
    return 0


def _settings(c: str, args: Args) -> Settings:
    return load_settings(args.root, c, cli_mutable=args.mutable_mode, force=args.force,
                         noexec=args.noexec, always_refresh=args.always_refresh,
                         no_reload=args.no_reload, dry_run=args.dry_run,
                         image_policy=args.image_policy, defaults=args.defaults_map)


def _root(value: str) -> str:
    """--root=PATH resolved; empty means /, as upstream."""
    root = os.path.realpath(value or "/")
    if not os.path.exists(root):
        raise die(f"--root={value}: no such directory", "give an existing directory")
    if not os.path.isdir(root):
        raise die(f"--root={value}: not a directory", "give a directory, e.g. /sysroot")
    return root


def run(argv: list[str], argv0: str | None = None) -> int:
    """One invocation; ARGV0 (default sys.argv[0]) picks the personality."""
    me = personality(sys.argv[0] if argv0 is None else argv0)
    become(me)
    args = parse(argv)
    if args.help:
        sys.stdout.write(me.help)
        return 0
    if args.version:
        print(me.version.format(version=__version__))
        return 0
    words = list(args.words)
    picked = me.class_word and words and words[0] in CLASSES
    classes: list[str] = [words.pop(0)] if picked else list(me.classes)
    verb = words.pop(0) if words else "status"
    if "SYSTEMD_EXEC_PID" in os.environ:
        # Started by the service manager: the kernel command line may switch a class off.
        from overlayctl import kcmdline
        classes = [c for c in classes if not kcmdline.disabled(c)]
        if not classes:
            return 0
    args.defaults_map = parse_defaults_arg(args.defaults, classes)
    if args.image_policy is not None:
        # As upstream: a policy that does not parse fails every verb, before anything is
        # looked at.
        parse_image_policy(args.image_policy)
    if verb != "commit" and any(getattr(args, o) for o in COMMIT_OPTIONS):
        raise die("--format, --output, --any, --verity, --sign-key and --certificate go "
                  "with commit only", "e.g. overlayctl confext commit site --verity")
    if verb in me.local_verbs:
        import gc
        gc.enable()     # the launcher turns it off for the merge path (tools/launcher.sh)
        args.root = _root(args.root)
        args.classes = classes
        from overlayctl import localcli
        return localcli.run(verb, words, args)
    if verb not in me.verbs:
        raise die(f"unknown verb '{verb}'", f"use one of: {', '.join(me.verbs)}")
    if verb == "help":
        sys.stdout.write(me.help)
        return 0
    if words:
        raise die(f"'{verb}' takes no arguments: {' '.join(words)}", f"see {me.name} --help")
    args.mutable_mode = None
    if args.mutable is not None:
        if args.mutable == "help":
            if not args.no_legend:
                print("Known mutability modes:")
            print("\n".join(MUTABLE_MODES))
            return 0
        args.mutable_mode = parse_mutable(args.mutable)
        if args.mutable_mode is None:
            raise die(f"failed to parse argument to --mutable=: {args.mutable}",
                      f"use one of {', '.join(MUTABLE_MODES)}, or a boolean")
    args.root = _root(args.root)
    if verb == "status":
        return cmd_status(classes, args)
    if verb == "list":
        return cmd_list(classes, args)
    if verb in ("merge", "refresh"):
        # Merge configuration extensions first: system extensions may need /etc.
        order = sorted(classes, key=lambda c: c != "confext")
        return cmd_merge(order, args, verb)
    return cmd_unmerge(classes, args)


def _die_of_sigpipe() -> None:
    import signal
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.stdout.flush()
    except OSError:
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)


def entry() -> None:
    """The process's entry point (the launcher, the console script, python -m): main(),
    then out without tearing the interpreter down. By then every resource is unwound and
    every file closed; what is left is freeing modules and objects one by one, which costs
    more than a 1-extension merge itself (docs/performance.md)."""
    rc = main()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    become(personality(sys.argv[0]))
    if "LISTEN_FDS" in os.environ or "SYSTEMD_VARLINK_LISTEN" in os.environ:
        # Socket-activated (systemd, varlinkctl exec:): maybe the io.systemd.sysext service.
        import gc
        gc.enable()     # a service may run a while (the launcher turns it off)
        from overlayctl import varlink
        rc = varlink.main(sys.argv[1:] if argv is None else argv, parse)
        if rc is not None:
            return rc
    try:
        rc = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # The reader went away (overlayctl ... | head): no message; exit as if killed by
        # SIGPIPE, as a C tool would be (the shell shows 141).
        _die_of_sigpipe()
        return 141
    except OverlayctlError as e:
        msg = e.message[0].lower() + e.message[1:] if e.message else e.message
        log.error(msg + (f" (hint: {e.hint})" if e.hint else ""))
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        log.error(f"{e.strerror or e}{where} (hint: {hint_for(e)})")
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as e:
        if os.environ.get("OVERLAYCTL_DEBUG") == "1":
            raise
        print(f"{current().name}: internal error: {e!r} (this is a bug; OVERLAYCTL_DEBUG=1 "
              "shows where)", file=sys.stderr)
        return 1
