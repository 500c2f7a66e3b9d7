"""One error type for everything a user can get wrong; only cli.py prints it."""

from __future__ import annotations


class OverlayctlError(Exception):
    """A failure with a one-line message and an optional hint on how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def die(message: str, hint: str | None = None) -> OverlayctlError:
    """Build the error to raise: ``raise die("...", hint="...")``."""
    return OverlayctlError(message, hint)


class AlreadyMergedError(OverlayctlError):
    """merge (not refresh) found a hierarchy merged already. HIERARCHY is its configured path
    (e.g. /usr, not the path below --root), as io.systemd.sysext.AlreadyMerged reports it."""

    def __init__(self, message: str, hint: str | None = None, *, hierarchy: str) -> None:
        super().__init__(message, hint)
        self.hierarchy = hierarchy
