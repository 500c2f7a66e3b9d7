"""The command line as systemd's tools take it (getopt_long): long options as --name=VALUE
or --name VALUE, unique prefixes of a long name, -h, options anywhere among the words, and
"--" to end them. Table-driven and small, because argparse costs several milliseconds at
every boot (its import and the parser's construction) for a handful of options.

OPTIONS lists every option; parse() gives an Args with one attribute per option (dashes as
underscores) and .words for the rest; a mistake is a one-line error."""

from __future__ import annotations

from overlayctl.errors import die

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

# name: (kind, default, choices). kind: "flag" (no value), "value", "list" (repeatable),
# "bool" (a value parsed as a boolean).
OPTIONS: dict[str, tuple[str, Any, tuple[str, ...] | None]] = {
    "help": ("flag", False, None),
    "version": ("flag", False, None),
    "root": ("value", "/", None),
    "json": ("value", "off", ("pretty", "short", "off")),
    "no-pager": ("flag", False, None),
    "no-legend": ("flag", False, None),
    "mutable": ("value", None, None),
    "force": ("flag", False, None),
    "noexec": ("bool", None, None),
    "no-reload": ("flag", False, None),
    "always-refresh": ("bool", False, None),
    "image-policy": ("value", None, None),
    "dry-run": ("flag", False, None),
    "defaults": ("list", None, None),
    "content": ("flag", False, None),
    # commit (only):
    "format": ("value", None, None),        # commit.py checks it
    "output": ("value", None, None),
    "any": ("flag", False, None),
    "verity": ("flag", False, None),
    "sign-key": ("value", None, None),
    "certificate": ("value", None, None),
}
SHORT = {"h": "help"}


class Args:
    """The parsed command line: an attribute per option, .words for the rest, and what the
    front end derives from them."""

    words: list[str]
    help: bool
    version: bool
    root: str
    json: str
    no_pager: bool
    no_legend: bool
    mutable: str | None
    force: bool
    noexec: bool | None
    no_reload: bool
    always_refresh: bool
    image_policy: str | None
    dry_run: bool
    defaults: list[str]
    content: bool
    format: str | None
    output: str | None
    any: bool
    verity: bool
    sign_key: str | None
    certificate: str | None
    # Derived by cli.py:
    mutable_mode: Any
    defaults_map: dict[str, str]
    classes: list[str]

    def __init__(self) -> None:
        self.words = []
        for name, (kind, default, _) in OPTIONS.items():
            setattr(self, name.replace("-", "_"), [] if kind == "list" else default)
        self.mutable_mode = None
        self.defaults_map = {}
        self.classes = []


def _usage(msg: str) -> Exception:
    from overlayctl.personality import current
    return die(msg, f"see {current().name} --help")


def _long(name: str) -> str:
    """The option NAME names, exactly or as the unique prefix of one."""
    if name in OPTIONS:
        return name
    hits = [o for o in OPTIONS if o.startswith(name)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise _usage(f"option '--{name}' is ambiguous; possibilities: "
                     + " ".join(f"'--{h}'" for h in hits))
    raise _usage(f"unrecognized option '--{name}'")


def _boolean(name: str, value: str) -> bool:
    from overlayctl.release import parse_boolean
    b = parse_boolean(value)
    if b is None:
        raise _usage(f"failed to parse boolean argument to --{name}=: {value}")
    return b


def parse(argv: list[str]) -> Args:
    args = Args()
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            args.words.extend(argv[i:])
            break
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            name = _long(key)
            kind, _, choices = OPTIONS[name]
            if kind == "flag":
                if eq:
                    raise _usage(f"option '--{name}' doesn't allow an argument")
                setattr(args, name.replace("-", "_"), True)
                continue
            if not eq:
                if i >= len(argv):
                    raise _usage(f"option '--{name}' requires an argument")
                value = argv[i]
                i += 1
            if choices is not None and value not in choices:
                raise _usage(f"--{name}: invalid choice '{value}' (choose from "
                             + ", ".join(choices) + ")")
            attr = name.replace("-", "_")
            if kind == "list":
                getattr(args, attr).append(value)
            elif kind == "bool":
                setattr(args, attr, _boolean(name, value))
            else:
                setattr(args, attr, value)
        elif a.startswith("-") and len(a) > 1:
            for ch in a[1:]:
                if ch not in SHORT:
                    raise _usage(f"invalid option -- '{ch}'")
                setattr(args, SHORT[ch], True)
        else:
            args.words.append(a)
    return args
