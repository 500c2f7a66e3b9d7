"""What is merged now: which hierarchies carry our overlay, how many are stacked, the plain
directory under a merged one, the ephemeral upper of a merged one, and taking overlays off."""

from __future__ import annotations

import os

from overlayctl import faults, log, metadata, mountinfo, nested, state
from overlayctl import kernel as k
from overlayctl.mountns import Locked, in_child
from overlayctl.paths import chase, inside
from overlayctl.resources import ExitStack
from overlayctl.settings import ExtClass, Settings

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

EPHEMERAL_DIR = "ephemeral"


def is_ours(path: str, cls: ExtClass, mounts: list[mountinfo.Mount] | None = None) -> bool:
    """Upstream's rule: a mount point whose metadata 'dev' equals its st_dev."""
    if not mountinfo.is_mountpoint(path, mounts):
        return False
    dev = metadata.read_dev(path, cls)
    if dev is None:
        return False
    st = os.lstat(path)
    return (os.major(st.st_dev), os.minor(st.st_dev)) == dev


def stacked_ours(target: str, mounts: list[mountinfo.Mount] | None = None) -> int:
    """How many of our overlays (sysext/confext) are stacked on TARGET."""
    return sum(1 for m in (mountinfo.read() if mounts is None else mounts)
               if m.mountpoint == target and m.fstype == "overlay"
               and m.source in ("sysext", "confext"))


def merged_targets(s: Settings) -> list[str]:
    """The hierarchies of S that our overlay is merged on now (host paths)."""
    out = []
    mounts = mountinfo.read()
    for h in s.hierarchies:
        t = chase(s.root, h, must_exist=True)
        if t is not None and os.path.isdir(t) and is_ours(t, s.cls, mounts):
            out.append(t)
    return out


class PlainView:
    """A detached mount showing the plain directory under a merged hierarchy. Owns its fd."""

    __slots__ = ("fd", "rel")

    def __init__(self, fd: int, rel: str) -> None:
        self.fd = fd
        self.rel = rel

    @property
    def path(self) -> str:
        return k.fd_path(self.fd, self.rel)

    @property
    def fd_prefix(self) -> str:
        return k.fd_path(self.fd)


def plain_views(targets: list[str], cls: ExtClass, stack: ExitStack) -> dict[str, PlainView]:
    """For merged targets: detached mounts through which the plain directory under the
    overlay can be read and used as a layer, while the overlay stays in place."""
    if not targets:
        return {}

    def child() -> tuple[dict[str, Any], list[int]]:
        rels: list[str] = []
        fds: list[int] = []
        for t in targets:
            while is_ours(t, cls):
                k.umount(t)
            if mountinfo.is_mountpoint(t):
                fds.append(k.open_tree(t))
                rels.append("")
            else:
                fds.append(k.open_tree(os.path.dirname(t)))
                rels.append(os.path.basename(t))
        return {"rels": rels}, fds

    data, fds = in_child(child)
    for fd in fds:
        k.owned(stack, fd)
    return {t: PlainView(fd, rel) for t, fd, rel in zip(targets, fds, data["rels"], strict=True)}


def carried_ephemeral(target: str, cls: ExtClass, stack: ExitStack) -> int | None:
    """A writable clone of the ephemeral tmpfs of the overlay merged on TARGET (exposed
    read-only at .systemd-*/ephemeral), so that a refresh keeps ephemeral writes. Owned by
    STACK."""
    path = os.path.join(target, cls.meta_dir, EPHEMERAL_DIR)
    if not mountinfo.is_mountpoint(path):
        return None
    fd = k.owned(stack, k.open_tree(path))
    k.mount_setattr(fd, "", 0, k.MOUNT_ATTR_RDONLY)
    return fd


def ephemeral_entries(target: str, cls: ExtClass) -> int | None:
    """How many entries (files, directories, whiteouts) the ephemeral upper of the overlay
    merged on TARGET holds; None if it has none."""
    upper = os.path.join(target, cls.meta_dir, EPHEMERAL_DIR, "upper")
    if not os.path.isdir(upper):
        return None
    n = 0
    for _, dirs, files in os.walk(upper):
        n += len(dirs) + len(files)
    return n


def say_ephemeral_dropped(root: str, h: str, target: str, cls: ExtClass, since: int | None,
                          why: str) -> None:
    """Tell that the writes of an ephemeral HIERARCHY go now (WHY), and what that means for a
    package manager whose database is not on it."""
    n = ephemeral_entries(target, cls)
    if n is None:
        return
    log.notice(f"Dropping the writes of the ephemeral {h} ({n} entr{'y' if n == 1 else 'ies'} "
               f"in its upper): {why}.")
    status = os.path.join(root, "var/lib/dpkg/status")
    try:
        changed = since is not None and os.stat(status).st_mtime_ns // 1000 > since
    except OSError:
        changed = False
    if changed and n:
        log.warning(f"dpkg's database ({inside(root, status)}) changed while {h} was "
                    "ephemeral: packages installed meanwhile stay listed but lose their files "
                    f"in {h} (dpkg --verify lists them); "
                    "reinstall them, or merge with --mutable=yes to keep such writes.")


def remove_workdir(root: str, rel: str | None) -> None:
    """Remove a work dir named in metadata (relative to the root); only one whose name has
    the .systemd-*-workdir form, as a safety net."""
    if not rel:
        return
    path = os.path.join(root, rel.lstrip("/"))
    if os.path.basename(path).startswith(".systemd-") and path.endswith(("-workdir",
                                                                        "-workdir.1")):
        import shutil
        shutil.rmtree(path, ignore_errors=True)


def take_off(target: str, cls: ExtClass, stack: ExitStack) -> tuple[list[nested.Carried],
                                                                       list[str]]:
    """Take our overlays off TARGET (all stacked ones). Returns the nested mounts (cloned,
    owned by STACK) to put back, and the work dirs the overlays used."""
    carried: list[nested.Carried] = []
    workdirs: list[str] = []
    while is_ours(target, cls):
        merged = metadata.read_merged(target, cls)
        if not carried:
            carried = nested.capture(target, stack)
        k.umount(target)
        if merged.work_dir:
            workdirs.append(merged.work_dir)
    return carried, workdirs


def detach_all(target: str, cls: ExtClass) -> None:
    """Take every overlay of ours off TARGET, nested mounts and all (they are carried by the
    overlay that replaces them)."""
    while is_ours(target, cls):
        k.umount(target)


def put_back(target: str, carried: list[nested.Carried]) -> None:
    """Nested mounts that were on the overlay, onto the plain directory again (unless the
    originals are there: an interrupted merge left them covered, not detached)."""
    for c in carried:
        if nested.already_there(c, target):
            c.close()
            continue
        nested.graft(c, onto=target)


def unmerge_one(locked: Locked, s: Settings, h: str, target: str) -> None:
    """Take the overlay off one merged hierarchy, carry its nested mounts back, remove its
    work dir, and tell who still uses the old tree."""
    from overlayctl import busy, hygiene
    root = s.root
    users = busy.users_below(target)
    old_dev = os.stat(target).st_dev
    rec = metadata.read_merged(target, s.cls).record
    if rec is not None and rec.upper == "ephemeral":
        say_ephemeral_dropped(root, h, target, s.cls, rec.since, "it is being unmerged")
    with ExitStack() as stack:
        faults.checkpoint("unmerge-before-detach", h)
        carried, workdirs = take_off(target, s.cls, stack)
        faults.checkpoint("unmerge-after-detach", h)
        if users:
            n = len(users)
            log.notice(f"{n} process{'es' if n != 1 else ''} still use{'' if n != 1 else 's'}"
                       f" the old {h}: {busy.describe(users)}")
            state.note_detached(root, s.cls.name, h, old_dev)
        for w in workdirs:
            remove_workdir(root, w)
        put_back(target, carried)
    hygiene.after_unmerge(root, s.cls.name, h, target, rec.since if rec else None)
    faults.checkpoint("unmerge-done", h)
    log.info(f"Unmerged '{target}'.")


def unmerge(locked: Locked, s: Settings) -> list[str]:
    """Unmerge every merged hierarchy of S; returns the targets unmerged."""
    done = []
    for h in s.hierarchies:
        target = chase(s.root, h, must_exist=True)
        if target is None or not os.path.isdir(target):
            log.debug(f"Hierarchy '{target or h}' is not merged, skipping.")
            continue
        if not is_ours(target, s.cls):
            log.debug(f"Hierarchy '{target}' is not merged, skipping.")
            # Finish what an unmerge or a merge that was killed left (whiteouts).
            from overlayctl import hygiene
            hygiene.after_unmerge(s.root, s.cls.name, h, target, None)
            continue
        unmerge_one(locked, s, h, target)
        done.append(target)
    return done
