"""One error type for everything a user can get wrong; only cli.py prints it."""

from __future__ import annotations

from overlayctl.personality import current


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


class AlreadyMerged(OverlayctlError):
    """merge (not refresh) found a hierarchy merged already. HIERARCHY is its configured
    path (/usr, not the path below --root), as io.systemd.sysext.AlreadyMerged reports it."""

    def __init__(self, target: str, hierarchy: str, class_name: str) -> None:
        super().__init__(f"hierarchy '{target}' is already merged",
                         f"use '{current().command(class_name)} refresh' or unmerge first")
        self.hierarchy = hierarchy


def hint_for(e: OSError) -> str:
    """What to do about a system call that failed with E while mounting or writing."""
    import errno
    return {
        errno.EXDEV: "upper and work directory must be on the same mount",
        errno.ELOOP: "a layer lies inside another layer; move the extension out of the hierarchy",
        errno.EROFS: "the upper directory is on a read-only file system",
        errno.EPERM: "run as root",
        errno.EACCES: "check the permissions of the path, and run as root",
        errno.ENOSPC: "free some space on that file system",
        errno.EDQUOT: "the disk quota is exhausted: free some space",
        errno.EINVAL: "see dmesg for what overlayfs objected to",
        errno.ENOENT: "check that the path exists",
    }.get(e.errno or 0, "see dmesg for details")
