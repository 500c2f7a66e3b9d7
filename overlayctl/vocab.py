"""The words overlayctl decides with, as types that cost nothing at start-up: Literal
aliases for mypy, and the tuples of their values for checks at run time."""

from __future__ import annotations

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Literal

    MutableMode = Literal["no", "yes", "auto", "import", "ephemeral", "ephemeral-import"]
    # Where writes go: a persistent mutable dir, the hierarchy itself, a private tmpfs.
    UpperKind = Literal["persistent", "host", "ephemeral"]
    LayerRole = Literal["meta", "import", "extension", "base", "defaults", "filler"]
    ChangeKind = Literal["added", "modified", "identical", "deleted", "opaque",
                         "type-changed", "orphan-whiteout", "renamed"]
    ClassName = Literal["sysext", "confext"]
    Verb = Literal["merge", "refresh"]

MUTABLE_MODES: tuple[MutableMode, ...] = ("no", "yes", "auto", "import", "ephemeral",
                                          "ephemeral-import")
EPHEMERAL_MODES: tuple[MutableMode, ...] = ("ephemeral", "ephemeral-import")
WRITABLE_UPPERS: tuple[UpperKind, ...] = ("persistent", "host")   # uppers that persist
LOWER_ROLES: tuple[LayerRole, ...] = ("import", "extension", "base", "defaults")
