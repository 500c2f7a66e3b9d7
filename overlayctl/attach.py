"""Putting built overlays in place, all or nothing: every overlay of the invocation is built
detached (with its metadata and the nested mounts it carries) before the first is attached;
a refresh slides each new overlay beneath the old one and detaches the old one. If anything
fails, the one rollback below takes down what this call attached and removes what it
created. Only after the last attach does anything irreversible happen: the covered
originals of carried mounts are detached and old work dirs removed."""

from __future__ import annotations

import errno
import os
import time

from overlayctl import faults, log, metadata, mountinfo, nested
from overlayctl import kernel as k
from overlayctl.build import Built, create_overlays, prepare, undo_created
from overlayctl.live import PlainView, detach_all, is_ours, remove_workdir, stacked_ours
from overlayctl.metadata import Origin
from overlayctl.mountns import Locked, workspace
from overlayctl.plan import HierarchyPlan
from overlayctl.resources import ExitStack
from overlayctl.settings import Settings


def _graft_binds(b: Built, attached: bool) -> None:
    """The read-only metadata (and ephemeral) binds onto the overlay: while it is still
    detached where the kernel allows it, else right after it is attached."""
    left: list[tuple[int, str]] = []
    for fd, rel in b.pending_binds:
        try:
            if attached:
                k.move_mount(fd, os.path.join(b.plan.target, rel))
            else:
                k.move_mount(fd, rel, to_dirfd=b.fd)
        except OSError as e:
            if not attached:
                left.append((fd, rel))
                continue
            log.warning(f"Could not mount {os.path.join(b.plan.target, rel)}: {e.strerror}")
    b.pending_binds = left


def _swap_beneath(fd: int, target: str, hierarchy: str, built_at: float) -> bool:
    """Put the new overlay under the old one and detach the old: no moment without one.
    Between the two calls both overlays are attached on TARGET, sharing the upper (only the
    old one is reached by path until it is detached); the debug line says for how long,
    and since when the new overlay exists (docs/guarantees.md, "The refresh window"). The
    caller holds a clone of the old overlay (for the rollback) until after the last swap,
    so the detach does not tear the old overlay down (which syncs the upper's file system,
    milliseconds on a disk) inside the window."""
    try:
        k.move_mount(fd, target, beneath=True)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise
    t0 = time.perf_counter()
    faults.checkpoint("beneath", hierarchy)
    k.umount(target)
    t1 = time.perf_counter()
    log.debug(f"Swapped {target}: both overlays attached for {(t1 - t0) * 1e6:.0f} us; the new "
              f"one existed detached for {(t0 - built_at) * 1e3:.1f} ms before.")
    return True


class Staged:
    """One class's overlays, built and ready to attach, and what attaching them needs. The
    fds live in the call's ExitStack."""

    __slots__ = ("settings", "built", "carried", "covered", "replace")

    def __init__(self, settings: Settings, built: list[Built],
                 carried: dict[str, list[nested.Carried]], covered: nested.Covered,
                 replace: bool) -> None:
        self.settings = settings
        self.built = built
        self.carried = carried
        self.covered = covered
        self.replace = replace


def build_all(locked: Locked, settings: Settings, plans: list[HierarchyPlan], origin: Origin,
              views: dict[str, PlainView], *, replace: bool, carry: dict[str, int],
              stack: ExitStack) -> Staged:
    """Build every overlay of PLANS detached, with metadata and carried nested mounts.
    Nothing is visible yet; on failure, what this made is gone again."""
    cls = settings.cls
    built: list[Built] = []
    covered = nested.Covered()
    carried: dict[str, list[nested.Carried]] = {}
    ws = stack.enter_context(workspace())
    try:
        for plan in plans:
            if not plan.merge:
                continue
            faults.checkpoint("build", plan.hierarchy)
            built.append(prepare(settings, plan, ws, origin, views.get(plan.target),
                                 carry.get(plan.target), stack))
        create_overlays(built, cls, stack)
        mounts = mountinfo.read()
        for b in built:
            t = b.plan.target
            carried[t] = nested.capture(t, stack, mounts) if os.path.isdir(t) else []
            covered.remember(t, carried[t], stack)
            _graft_binds(b, attached=False)
            carried[t] = [c for c in carried[t] if not nested.graft(c, onto_fd=b.fd)]
            faults.checkpoint("built", b.plan.hierarchy)
    except BaseException:
        for b in built:
            undo_created(b.created)
        raise
    return Staged(settings, built, carried, covered, replace)


def _attach_one(st: Staged, b: Built, stack: ExitStack) -> tuple[str | None, int | None]:
    """Attach one overlay (beneath the old one on a refresh). Returns the old work dir, and
    a clone of the old overlay (owned by STACK) that the rollback puts back if a later
    attach fails: the old mount itself is detached by the swap."""
    cls = st.settings.cls
    t = b.plan.target
    h = b.plan.hierarchy
    if not os.path.lexists(t):
        os.makedirs(t, 0o755)
        b.created.append(t)
    faults.checkpoint("attach", h)
    old_work = None
    backup = None
    if st.replace and is_ours(t, cls):
        old_work = metadata.read_merged(t, cls).work_dir
        backup = k.owned(stack, k.open_tree(t, recursive=True))
        if stacked_ours(t) > 1 or not _swap_beneath(b.fd, t, h, b.built_at):
            # The upstream order, with a gap: after an interrupted refresh left overlays
            # stacked, or without MOVE_MOUNT_BENEATH (Linux < 6.5).
            if stacked_ours(t) <= 1:
                log.notice(f"The kernel cannot mount beneath {t}: replacing it with a brief "
                           "gap (needs Linux 6.5+).")
            detach_all(t, cls)
            faults.checkpoint("gap", h)
            k.move_mount(b.fd, t)
    else:
        k.move_mount(b.fd, t)
    faults.checkpoint("attached", h)
    return old_work, backup


def attach_all(locked: Locked, staged: list[Staged]) -> None:
    """Attach every staged overlay, in order. If one fails, every overlay this call
    attached is taken down again, a hierarchy swapped on a refresh gets its old overlay
    back (a clone of it, taken just before the swap), and what the call created is removed.
    After the last attach: covered originals of nested mounts are detached, old work dirs
    removed."""
    attached: list[tuple[Staged, Built, str | None, int | None]] = []
    with ExitStack() as backups:
        try:
            for st in staged:
                for b in st.built:
                    old_work, backup = _attach_one(st, b, backups)
                    attached.append((st, b, old_work, backup))
                    _graft_binds(b, attached=True)
                    for c in st.carried.get(b.plan.target, []):
                        nested.graft(c, onto=b.plan.target)
        except BaseException:
            for _, b, _, backup in reversed(attached):
                try:
                    k.umount(b.plan.target)
                    if backup is not None:
                        k.move_mount(backup, b.plan.target)
                except OSError as e:
                    log.error(f"could not restore {b.plan.target}: {e.strerror}")
            for st in staged:
                for b in st.built:
                    undo_created(b.created)
            raise
    # Past the point of return: nothing below fails the merge.
    for st in staged:
        st.covered.detach()
    for st, b, old_work, _ in attached:
        for w in b.stale:
            import shutil
            shutil.rmtree(w, ignore_errors=True)
        new_work = (b.record.workdir or "").lstrip("/")
        if old_work and new_work != old_work.lstrip("/"):
            remove_workdir(st.settings.root, old_work)
