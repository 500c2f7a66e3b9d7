"""Mounts nested below a hierarchy (a bind mount on /usr/share/foo, several stacked on one
point): cloned so that the new overlay, or the plain directory after an unmerge, shows them
in the same order; and the covered originals detached once nothing can fail any more."""

from __future__ import annotations

import errno
import os

from overlayctl import kernel as k
from overlayctl import log, mountinfo
from overlayctl.mountinfo import Mount
from overlayctl.resources import ExitStack

META_DIRS = (".systemd-sysext", ".systemd-confext")


class Carried:
    """The clones of the mounts stacked at one point REL below a hierarchy, bottom first
    (each with what is mounted below it), and their identities. Owns its fds."""

    __slots__ = ("rel", "fds", "identities")

    def __init__(self, rel: str, fds: list[int], identities: list[tuple[str, str, str, str]]):
        self.rel = rel
        self.fds = fds
        self.identities = identities

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _points(mounts: list[Mount], target: str) -> list[list[Mount]]:
    """The stacks at the points directly below TARGET (ours excluded), in mount order."""
    out: list[list[Mount]] = []
    for m in mountinfo.submounts(mounts, target):
        rel = os.path.relpath(m.mountpoint, target)
        if rel.split("/")[0] in META_DIRS:
            continue
        out.append(mountinfo.stack_at(mounts, m))
    return out


def capture(target: str, stack: ExitStack, mounts: list[Mount] | None = None) -> list[Carried]:
    """Clone every stack of mounts nested below TARGET as it is visible now. The clones are
    detached mounts owned by STACK (closed when it unwinds, unless grafted)."""
    mounts = mountinfo.read() if mounts is None else mounts
    points = _points(mounts, target)
    if not points:
        return []
    out: list[Carried] = []
    if all(len(p) == 1 for p in points):
        for (m,) in points:
            try:
                fd = k.open_tree(m.mountpoint, recursive=True)
            except OSError as e:
                log.warning(f"cannot carry the mount on {m.mountpoint}: {e.strerror}")
                continue
            c = Carried(os.path.relpath(m.mountpoint, target), [fd], [m.identity])
            stack.callback(c.close)
            out.append(c)
        return out
    # A point with mounts stacked: only the top one can be reached by path. In a private
    # child namespace, clone the top (with what is below it), take it off, clone the next.
    from overlayctl.mountns import in_child

    def child() -> tuple[dict[str, object], list[int]]:
        fds: list[int] = []
        counts: list[int] = []
        for p in points:
            got: list[int] = []
            for _ in p:
                got.append(k.open_tree(p[-1].mountpoint, recursive=True))
                k.umount(p[-1].mountpoint, k.MNT_DETACH)
            fds.extend(reversed(got))
            counts.append(len(got))
        return {"counts": counts}, fds

    data, fds = in_child(child)
    i = 0
    for p, n in zip(points, data["counts"], strict=True):
        c = Carried(os.path.relpath(p[0].mountpoint, target), fds[i:i + n],
                    [m.identity for m in p])
        stack.callback(c.close)
        out.append(c)
        i += n
    return out


def graft(c: Carried, *, onto_fd: int | None = None, onto: str | None = None) -> bool:
    """Put the clones of C, bottom first, at C.rel below a detached mount (ONTO_FD) or a
    path (ONTO). False, with nothing moved, when the kernel refuses it on a detached mount
    (older kernels): the caller grafts again once that mount is attached."""
    moved = 0
    for fd in c.fds:
        try:
            if onto_fd is not None:
                k.move_mount(fd, c.rel, to_dirfd=onto_fd)
            else:
                assert onto is not None
                dest = os.path.join(onto, c.rel)
                if not os.path.exists(dest):
                    log.warning(f"Not carrying the mount on {dest}: the merged tree has no "
                                "such path.")
                    return True
                k.move_mount(fd, dest)
        except OSError as e:
            if onto_fd is not None and moved == 0:
                return False
            where = os.path.join(onto or "<new overlay>", c.rel)
            log.warning(f"Could not carry the mount on {where}: {e.strerror}")
            return True
        moved += 1
    for fd in c.fds:
        os.close(fd)
    c.fds = []
    return True


def already_there(c: Carried, target: str) -> bool:
    """Does TARGET already show C's stack at C.rel (originals uncovered again after an
    interrupted merge)? Then putting the clones back would show each mount twice."""
    mounts = mountinfo.read()
    point = os.path.join(target, c.rel)
    here = [s for s in _points(mounts, target) if s[0].mountpoint == point]
    return bool(here) and [m.identity for m in here[0]] == c.identities


class Covered:
    """The original nested mounts that a new overlay covers: reached through O_PATH fds of
    their parent directories (taken before the overlay is attached) and detached at the
    very end, so that a failure before then leaves them in place."""

    def __init__(self) -> None:
        self._points: list[tuple[int, str, int]] = []   # parent fd, name, depth

    def remember(self, target: str, carried: list[Carried], stack: ExitStack) -> None:
        for c in carried:
            parent = os.path.dirname(os.path.join(target, c.rel))
            try:
                fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            k.owned(stack, fd)
            self._points.append((fd, os.path.basename(c.rel), len(c.identities)))

    def detach(self) -> None:
        for fd, name, depth in self._points:
            for _ in range(depth):
                try:
                    k.umount(k.fd_path(fd, name), k.MNT_DETACH)
                except OSError as e:
                    # EINVAL: not a mount (any more): it went with the overlay it was on.
                    if e.errno != errno.EINVAL:
                        log.warning(f"Could not detach a covered nested mount: {e.strerror}")
                    break
        self._points = []
