"""Who overlayctl is, by the name it was run as (argv[0]): plain overlayctl (both classes,
the class word, the local-change verbs), or systemd-sysext / systemd-confext, which behave as
that binary: one class, its help, its name in messages. As systemd's invoked_as(), a name
that contains "systemd-confext" is systemd-confext, one that contains "systemd-sysext" is
systemd-sysext.

Everything that differs lives in PERSONALITIES, as data; cli.py and the messages only read
the current one. A leaf: it imports nothing of overlayctl but the record type."""

from __future__ import annotations

import os

from overlayctl.record import Record

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from overlayctl.vocab import ClassName

VERBS = ("status", "list", "merge", "unmerge", "refresh", "help")
LOCAL_VERBS = ("diff", "which", "reset", "pin", "unpin", "cleanup", "commit")


def _options(local: bool) -> str:
    """The options; LOCAL: with what only the local-change verbs use."""
    dry_run = ("     --dry-run          With merge or refresh: print the plan, mount nothing;\n"
               "                        with reset, cleanup or commit: say what would be done\n"
               if local else
               "     --dry-run          With merge or refresh: print the plan, mount nothing\n")
    content = ("     --content          With diff: print a unified diff of each modified file\n"
               "     --format=squashfs|erofs|directory\n"
               "                        With commit: what to write (default squashfs)\n"
               "     --output=PATH      With commit: where to write it (inside the root)\n"
               "     --any              With commit: ID=_any instead of the host's ID and\n"
               "                        VERSION_ID\n"
               "     --verity           With commit: write NAME.verity and NAME.roothash\n"
               "     --sign-key=KEY --certificate=CRT\n"
               "                        With commit: also sign the root hash (NAME.roothash.p7s)\n"
               if local else "")
    return f"""\
Options:
  -h --help             Show this help
     --version          Show the version
     --root=PATH        Operate on the tree below PATH instead of /
     --json=pretty|short|off
                        Print JSON
     --no-pager         Do not pipe output into a pager (accepted; overlayctl has none)
     --no-legend        Do not show headers and footers
     --mutable=MODE     no, auto, yes, import, ephemeral, ephemeral-import (or help)
     --force            Merge extensions even when their release files do not match
     --noexec=BOOL      Force noexec on or off on the merged hierarchies
     --no-reload        Do not reload the service manager or restart units
     --always-refresh=BOOL
                        Refresh even when nothing changed
     --image-policy=POLICY
                        Which raw images may be merged, and how they must be protected
                        (dm-verity, signed; systemd.image-policy(7)). Default: any
                        protection of the root and /usr partitions (/etc: root only)
{dry_run}\
     --defaults=[HIERARCHY=]DIR
                        A tree of OS defaults (inside the root) as the lowest layer;
                        without HIERARCHY= it is for /etc
{content}"""


_VERBS_HELP = """\
  status            Show the merge state of every hierarchy (default)
  list              List the extension images that were found
  merge             Merge extensions into the hierarchies
  unmerge           Unmerge extensions from the hierarchies
  refresh           Unmerge and merge again, in one swap
  help              Show this help
"""

_LOCAL_HELP = """\
Local changes against the layers below the upper (merged or not; see docs/defaults.md):
  diff [PATH...]    Entries of the upper: added, modified, identical, deleted, opaque,
                    type-changed, with the layer they shadow and default_changed
  which PATH        Which layer provides PATH
  reset PATH...     Drop the local copy or whiteout: back to what the layers below provide
  pin PATH...       Copy a default up and keep it, even when identical (unpin: undo)
  cleanup [HIERARCHY...]
                    Drop identical copies, whiteouts of KeepDefaults paths, stale opaque
                    markers
  sysext|confext commit NAME
                    Capture the upper layers of the class into the extension NAME
                    (/var/lib/confexts/NAME.raw, /var/lib/extensions/NAME.raw)
"""

_OVERLAYCTL_HELP = f"""\
usage: overlayctl [OPTIONS...] [sysext|confext] [VERB]

Merge system extensions (/usr, /opt) and configuration extensions (/etc) with overlayfs,
compatible with systemd-sysext and systemd-confext.

Verbs:
{_VERBS_HELP}
{_LOCAL_HELP}
Without sysext or confext, status, list, merge, unmerge and refresh act on both classes.

{_options(local=True)}"""


def _systemd_help(prog: str, what: str) -> str:
    return f"""\
usage: {prog} [OPTIONS...] [VERB]

{what} (overlayctl, as {prog}).

Verbs:
{_VERBS_HELP}
{_options(local=False)}
See overlayctl(8) for details.
"""


class Personality(Record):
    """What differs between overlayctl and the systemd-sysext / systemd-confext it can be."""

    __slots__ = ("name", "classes", "class_word", "local_verbs", "help", "version")
    name: str                         # the program name, in messages and hints
    classes: tuple[ClassName, ...]    # the classes verbs act on without a class word
    class_word: bool                  # "sysext"/"confext" before the verb picks a class
    local_verbs: tuple[str, ...]      # diff, which, ...: overlayctl's own verbs
    help: str
    version: str                      # --version, with {version} for overlayctl's

    def __init__(self, name: str, classes: tuple[ClassName, ...], class_word: bool,
                 local_verbs: tuple[str, ...], help: str, version: str) -> None:
        self._fill(locals())

    @property
    def verbs(self) -> tuple[str, ...]:
        return VERBS + self.local_verbs

    def command(self, cls: str) -> str:
        """How to run a verb on class CLS: 'overlayctl sysext', or 'systemd-sysext'."""
        return f"{self.name} {cls}" if self.class_word else self.name


PERSONALITIES: dict[str, Personality] = {
    "overlayctl": Personality("overlayctl", ("sysext", "confext"), True, LOCAL_VERBS,
                              _OVERLAYCTL_HELP, "overlayctl {version}"),
    "systemd-sysext": Personality(
        "systemd-sysext", ("sysext",), False, (),
        _systemd_help("systemd-sysext", "Merge system extension images into /usr/ and /opt/"),
        "systemd-sysext (overlayctl {version})"),
    "systemd-confext": Personality(
        "systemd-confext", ("confext",), False, (),
        _systemd_help("systemd-confext", "Merge configuration extension images into /etc/"),
        "systemd-confext (overlayctl {version})"),
}


def personality(argv0: str) -> Personality:
    """The personality of a process run as ARGV0 (systemd's invoked_as(): a substring of
    the last path component)."""
    base = os.path.basename(argv0 or "")
    for name in ("systemd-confext", "systemd-sysext"):
        if name in base:
            return PERSONALITIES[name]
    return PERSONALITIES["overlayctl"]


_current = PERSONALITIES["overlayctl"]


def current() -> Personality:
    """The personality of this process (set by the front end; overlayctl until then)."""
    return _current


def become(p: Personality) -> None:
    global _current
    _current = p
