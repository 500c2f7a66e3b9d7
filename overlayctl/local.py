"""Local changes against the layers below the upper: diff, which, reset, pin, unpin,
cleanup. Work merged or unmerged, from the record of the last merge, or, on a hierarchy that
was never merged, from what today's configuration would merge; always read the raw upper,
never through the overlay, and never follow a symlink out of it.

reset and cleanup never lose a write: an entry that a process has open for writing, or a
directory that is a process's working directory, is kept and reported; a file is removed
only under a read lease (see inuse.py), moved aside first and put back if a process opened
it for writing while the overlay was being swapped."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from overlayctl import engine, faults, inuse, live, log, state
from overlayctl.errors import die
from overlayctl.mountns import Locked
from overlayctl.paths import chase
from overlayctl.resources import ExitStack
from overlayctl.settings import CLASSES, ExtClass, class_hierarchies
from overlayctl.state import Manifest, MergeRecord
from overlayctl.upper import (
    Change,
    Entry,
    LayerRef,
    UpperLookup,
    classify,
    clear_opaque,
    copy_up,
    digest,
    is_opaque,
    is_whiteout,
    iter_changes,
    redirects,
    remove,
    same_entry,
    upper_lookup,
    visible_lower,
    walk_upper,
)
from overlayctl.vocab import LOWER_ROLES

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

    from overlayctl.progress import Progress


# ---------------------------------------------------------------------------------------------
# Where a hierarchy's layers are


class Stack:
    """One hierarchy's layers as the local verbs read them."""

    __slots__ = ("cls", "hierarchy", "target", "record", "merged", "upper", "layers", "plain",
                 "assumed")

    def __init__(self, cls: ExtClass, hierarchy: str, target: str, record: MergeRecord,
                 merged: bool, upper: str | None, layers: list[LayerRef], plain: str,
                 assumed: bool) -> None:
        self.cls = cls
        self.hierarchy = hierarchy
        self.target = target
        self.record = record
        self.merged = merged
        self.upper = upper            # raw upper (host path), None when there is none to read
        self.layers = layers
        self.plain = plain            # where the plain hierarchy is read (a view if merged)
        self.assumed = assumed        # never merged: the layers today's configuration gives

    @property
    def ephemeral(self) -> bool:
        return self.record.upper == "ephemeral"

    def shown(self, rel: str) -> str:
        return os.path.join(self.hierarchy, rel) if rel else self.hierarchy

    def lookup(self, rel: str) -> UpperLookup:
        """REL in the raw upper, refusing what would leave it."""
        assert self.upper is not None
        found = upper_lookup(self.upper, rel)
        if found.blocked_by is not None:
            b = os.path.join(self.upper, found.blocked_by)
            bst = os.lstat(b)
            if stat.S_ISLNK(bst.st_mode):
                raise die(f"{self.shown(rel)} goes through {self.shown(found.blocked_by)}, a "
                          f"symlink to {os.readlink(b)} in the upper layer: overlayctl does not "
                          "follow it", "name the path the symlink points to instead")
        return found

    def lower(self, rel: str) -> Entry | None:
        return visible_lower(self.upper, self.layers, rel)


def all_hierarchies() -> list[tuple[ExtClass, str]]:
    return [(cls, h) for cls in CLASSES.values() for h in class_hierarchies(cls)]


def hierarchy_of(path: str) -> tuple[ExtClass, str, str]:
    """(class, hierarchy, rel) for an absolute PATH as seen in the merged tree."""
    if not path.startswith("/"):
        raise die(f"{path}: not an absolute path", "give paths as seen on the system, e.g. "
                  "/etc/ssh/sshd_config")
    norm = os.path.normpath(path)
    best: tuple[ExtClass, str] | None = None
    for cls, h in all_hierarchies():
        if (norm == h or norm.startswith(h.rstrip("/") + "/")) and (
                best is None or len(h) > len(best[1])):
            best = (cls, h)
    if best is None:
        names = ", ".join(h for _, h in all_hierarchies())
        raise die(f"{path} is in no hierarchy overlayctl manages", f"use a path below {names}")
    rel = os.path.relpath(norm, best[1])
    return best[0], best[1], "" if rel == "." else rel


def _record(root: str, cls: ExtClass, hierarchy: str,
            stack: ExitStack) -> tuple[MergeRecord | None, bool]:
    rec = state.load_record(root, cls.name, hierarchy)
    if rec is not None:
        return rec, False
    return engine.assumed_record(root, cls.name, hierarchy, stack), True


@contextmanager
def open_stack(root: str, cls: ExtClass, hierarchy: str) -> Iterator[Stack]:
    with ExitStack() as stack:
        record, assumed = _record(root, cls, hierarchy, stack)
        if record is None:
            raise die(f"{hierarchy} has never been merged by overlayctl in {root}, and the "
                      "configuration gives it no upper layer",
                      f"merge it, e.g. overlayctl --root={root} {cls.name} merge --mutable=yes, "
                      "or configure a defaults layer ([Defaults] in overlayctl/"
                      f"{cls.name}.conf)")
        target = chase(root, hierarchy) or os.path.join(root, hierarchy.lstrip("/"))
        merged = os.path.isdir(target) and live.is_ours(target, cls)
        views = live.plain_views([target], cls, stack) if merged else {}
        plain = views[target].path if merged else target

        def host(p: str | None) -> str | None:
            if p is None:
                return None
            if p == hierarchy or p.startswith(hierarchy.rstrip("/") + "/"):
                return plain + p[len(hierarchy):]
            return os.path.join(root, p.lstrip("/"))

        kind = record.upper
        upper = host(record.upperdir) if kind in ("persistent", "host") else None
        if kind == "ephemeral" and merged:
            # Exposed read-only by the overlay itself (see live.EPHEMERAL_DIR); a writable
            # clone of that tmpfs lets reset and cleanup edit it.
            efd = live.carried_ephemeral(target, cls, stack)
            if efd is not None:
                upper = f"/proc/self/fd/{efd}/upper"
        layers = []
        for layer in record.layers:
            if layer.role not in LOWER_ROLES or not layer.path:
                continue
            hp = host(layer.path)
            if hp and os.path.isdir(hp):
                layers.append(LayerRef(layer.role, hp, layer.name))
        yield Stack(cls, hierarchy, target, record, merged, upper, layers, plain, assumed)


def _need_upper(st: Stack) -> str:
    if st.upper is None:
        if st.ephemeral and st.merged:
            raise die(f"{st.hierarchy} has an ephemeral upper, which only its overlay can reach",
                      "use a persistent mode (--mutable=yes) to keep and inspect changes")
        raise die(f"{st.hierarchy} has no upper layer: nothing local to change",
                  "merge with --mutable=yes or auto to get one")
    if not os.path.isdir(st.upper):
        raise die(f"upper directory {st.record.upperdir} of {st.hierarchy} does not exist",
                  "merge again with --mutable=yes")
    return st.upper


def _targets(root: str, paths: list[str]) -> dict[tuple[ExtClass, str], list[str]]:
    """Hierarchy -> the paths below it that were named (none: all of it). Without PATHS:
    every hierarchy with a record, or with a defaults layer configured."""
    targets: dict[tuple[ExtClass, str], list[str]] = {}
    if paths:
        for p in paths:
            cls, h, rel = hierarchy_of(p)
            targets.setdefault((cls, h), []).append(rel)
        return targets
    from overlayctl.settings import load_settings
    configured: dict[str, set[str]] = {}
    for cls, h in all_hierarchies():
        if cls.name not in configured:
            configured[cls.name] = set(load_settings(root, cls.name, dry_run=True).defaults)
        if state.load_record(root, cls.name, h) is not None or h in configured[cls.name]:
            targets[(cls, h)] = []
    return targets


# ---------------------------------------------------------------------------------------------
# diff and which


def diff(root: str, paths: list[str]) -> list[dict[str, Any]]:
    return [j for _, _, j in iter_diff(root, paths) if j is not None]


def iter_diff(root: str, paths: list[str], progress: Progress | None = None, *,
              rows: bool = True) -> Iterator[tuple[Stack, Change, dict[str, Any] | None]]:
    """(stack, change, JSON row) of every local change, hierarchy by hierarchy, each in
    path order, one at a time (without ROWS, no JSON rows are made: None). Every
    hierarchy's layers are opened (and every error about them raised) before the first
    change comes."""
    with ExitStack() as stack:
        opened: list[tuple[Stack, list[str]]] = []
        for (cls, h), rels in _targets(root, paths).items():
            st = stack.enter_context(open_stack(root, cls, h))
            if st.upper is None:
                if st.ephemeral and st.merged:
                    _need_upper(st)
                continue
            opened.append((st, rels))
        for st, rels in opened:
            assert st.upper is not None
            m = state.load_manifest(root, st.cls.name, st.hierarchy) if rows else None
            pinned = set(m.pinned) if m is not None else set()
            # The real hierarchy as its own upper, nothing below it but extensions: its own
            # files are the system, not local changes; only what touches the extensions is.
            lower_only = st.record.upper == "host" and not st.record.defaults
            for c in iter_changes(st.upper, st.layers, [r for r in rels if r] or None,
                                  lower_only=lower_only):
                if progress is not None:
                    progress.tick()
                if m is None:
                    yield st, c, None
                    continue
                j = c.as_json(st.hierarchy)
                j["default_changed"] = _default_changed(c, m)
                j["pinned"] = c.rel in pinned
                yield st, c, j


def _default_changed(c: Change, m: Manifest) -> bool:
    if c.lower is None or c.change == "deleted":
        return False
    recorded = m.copies.get(c.rel)
    if recorded is None:
        return False
    if recorded == "":
        return True   # there was no default when the copy was made; now there is one
    st = c.lower.st
    snap = m.lower.get(c.rel)
    if isinstance(snap, list) and snap[:3] == [st.st_size, st.st_mtime_ns, st.st_ino]:
        current = snap[3]          # unchanged since the last merge: no need to hash it again
    else:
        current = digest(c.lower.path, st)
    return bool(recorded != current)


def which(root: str, path: str) -> dict[str, Any]:
    cls, h, rel = hierarchy_of(path)
    with open_stack(root, cls, h) as st:
        if st.upper and os.path.isdir(st.upper) and rel:
            found = st.lookup(rel)
            if found.st is not None and found.path is not None:
                if is_whiteout(found.path, found.st):
                    if st.lower(rel) is None:
                        raise die(f"no layer of {h} provides {path}: the upper layer has an "
                                  "orphan whiteout there (nothing below to hide)",
                                  "overlayctl cleanup removes it")
                    raise die(f"{path} is deleted: a whiteout in the upper layer hides it",
                              f"overlayctl reset {path} brings the default back")
                return _which_json(path, "upper", None, found.path, root, st)
            if found.blocker is not None:
                raise die(f"{path} is hidden by {st.shown(found.blocker)} in the upper layer",
                          f"overlayctl reset {st.shown(found.blocker)}")
        e = st.lower(rel)
        if e is None:
            raise die(f"no layer of {h} provides {path}", "check the path")
        return _which_json(path, e.layer.role, e.layer.name, e.path, root, st)


def _which_json(path: str, layer: str, name: str | None, source: str, root: str,
                st: Stack) -> dict[str, Any]:
    return {"path": path, "layer": layer, "extension": name,
            "source": _shown(source, root, st)}


def _shown(p: str, root: str, st: Stack) -> str:
    if p == st.plain or p.startswith(st.plain + "/"):
        return st.hierarchy + p[len(st.plain):]
    if st.ephemeral and st.upper and p.startswith(st.upper + "/"):
        return os.path.join(st.hierarchy, st.cls.meta_dir, "ephemeral/upper",
                            p[len(st.upper) + 1:])
    rel = os.path.relpath(p, root)
    return "/" + rel if not rel.startswith("..") else p


# ---------------------------------------------------------------------------------------------
# Removing entries of an upper without losing a write


class Action:
    __slots__ = ("path", "action", "detail")

    def __init__(self, path: str, action: str, detail: str = "") -> None:
        self.path = path
        self.action = action
        self.detail = detail

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "action": self.action, "detail": self.detail}


class Removal:
    """Entries of one stack's raw upper to remove, all at once: the ones in use are kept
    (and said so), files go under a read lease into a trash directory beside the upper
    until the rebuilt overlay is in place, and come back if a writer turned up."""

    def __init__(self, locked: Locked, st: Stack, m: Manifest) -> None:
        self.locked = locked
        self.st = st
        self.m = m
        self.todo: list[tuple[str, str, str]] = []    # rel, action, detail
        self.kept: list[Action] = []
        self.trashed: list[tuple[str, str, inuse.Lease]] = []   # rel, trash path, lease

    def add(self, rel: str, action: str, detail: str) -> None:
        self.todo.append((rel, action, detail))

    def _seen_as(self, rel: str) -> list[str]:
        """The paths by which processes reach REL: through the hierarchy, and raw."""
        assert self.st.upper is not None
        out = [os.path.join(self.st.target, rel)]
        raw = os.path.join(self.st.upper, rel)
        if not raw.startswith("/proc/"):
            out.append(raw)
        return out

    def _in_use(self) -> dict[str, list[tuple[int, str]]]:
        assert self.st.upper is not None
        files: dict[str, str] = {}
        dirs: dict[str, str] = {}
        idents: dict[tuple[int, int], str] = {}
        for rel, _, _ in self.todo:
            p = os.path.join(self.st.upper, rel)
            pst = os.lstat(p)
            if stat.S_ISDIR(pst.st_mode):
                for seen in self._seen_as(rel):
                    dirs[seen] = rel
            elif stat.S_ISREG(pst.st_mode):
                for seen in self._seen_as(rel):
                    files[seen] = rel
                idents[(pst.st_dev, pst.st_ino)] = rel
        return inuse.users(files, dirs, idents) if files or dirs else {}

    def run(self, dry_run: bool) -> list[Action]:
        """Remove what is not in use; returns what was done (or would be) and what was kept."""
        assert self.st.upper is not None
        upper = self.st.upper
        busy = self._in_use()
        done: list[Action] = []
        go: list[tuple[str, str, str]] = []
        for rel, action, detail in self.todo:
            who = busy.get(rel)
            if who:
                self.kept.append(Action(self.st.shown(rel), "kept",
                                        f"in use by {inuse.describe(who)}"))
            else:
                go.append((rel, action, detail))
        if dry_run:
            return [Action(self.st.shown(r), a, d) for r, a, d in go] + self.kept
        trash = os.path.join(os.path.dirname(upper.rstrip("/")),
                             f".overlayctl-trash-{os.getpid()}")
        _drop_stale_trash(os.path.dirname(upper.rstrip("/")))
        try:
            for rel, action, detail in go:
                p = os.path.join(upper, rel)
                pst = os.lstat(p)
                if action == "cleared-opaque":
                    clear_opaque(p)
                    self.m.copies.pop(rel, None)
                elif stat.S_ISREG(pst.st_mode) and not is_whiteout(p, pst):
                    lease = inuse.try_lease(p)
                    if lease is None:
                        self.kept.append(Action(self.st.shown(rel), "kept",
                                                "opened for writing just now"))
                        continue
                    os.makedirs(trash, 0o700, exist_ok=True)
                    t = os.path.join(trash, str(len(self.trashed)))
                    os.rename(p, t)
                    self.trashed.append((rel, t, lease))
                    self.m.forget(rel)
                elif stat.S_ISDIR(pst.st_mode) and action != "reset":
                    # An empty container (cleanup): only if still empty, nothing kept in it.
                    if os.listdir(p):
                        continue
                    os.rmdir(p)
                    self.m.forget(rel)
                else:
                    remove(p)
                    self.m.forget(rel)
                done.append(Action(self.st.shown(rel), action, detail))
            faults.checkpoint("removed", self.st.hierarchy)
            if done and self.st.merged:
                done += _cleared(engine.rebuild(self.locked, self.locked.root,
                                                self.st.record))
        finally:
            restored = self._settle()
        if restored and self.st.merged:
            done += _cleared(engine.rebuild(self.locked, self.locked.root, self.st.record))
        gone = {a.path for a in self.kept}
        return [a for a in done if a.path not in gone] + self.kept

    def _settle(self) -> int:
        """After the swap: a file a process opened for writing meanwhile goes back where it
        was (its writes land there); the rest of the trash is deleted."""
        restored = 0
        for rel, t, lease in self.trashed:
            assert self.st.upper is not None
            back = os.path.join(self.st.upper, rel)
            try:
                if lease.broken() and not os.path.lexists(back):
                    os.rename(t, back)
                    restored += 1
                    self.kept.append(Action(self.st.shown(rel), "kept",
                                            "opened for writing while it was being removed"))
                    log.warning(f"{self.st.shown(rel)} was opened for writing while cleanup "
                                "removed it: kept")
            finally:
                lease.release()
        if self.trashed:
            import shutil
            shutil.rmtree(os.path.dirname(self.trashed[0][1]), ignore_errors=True)
        self.trashed = []
        return restored


def _cleared(paths: list[str]) -> list[Action]:
    """Opaque markers of the kernel that a rebuild cleared (hygiene.py), as actions."""
    return [Action(p, "cleared-opaque", "made while merged; a lower layer provides it now")
            for p in paths]


def _drop_stale_trash(parent: str) -> None:
    """Trash directories of a reset or cleanup that was killed midway (its process is gone):
    what they hold was being removed on purpose."""
    import shutil
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in names:
        if n.startswith(".overlayctl-trash-") and n[18:].isdigit() and not os.path.exists(
                f"/proc/{n[18:]}"):
            shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reset, pin, cleanup


def reset(locked: Locked, paths: list[str], dry_run: bool) -> list[Action]:
    root = locked.root
    actions: list[Action] = []
    for (cls, h), rels in _targets(root, paths).items():
        with open_stack(root, cls, h) as st:
            upper = _need_upper(st)
            m = state.load_manifest(root, cls.name, h)
            renamed = redirects(upper)               # rel -> where it was renamed from
            origins = {o: r for r, o in renamed.items()}
            removal = Removal(locked, st, m)
            for rel in rels:
                shown = st.shown(rel)
                if not rel:
                    raise die(f"refusing to reset all of {h}",
                              f"name paths below {h}, or remove the upper "
                              f"{st.record.upperdir or '(ephemeral)'} yourself while unmerged")
                found = st.lookup(rel)
                if found.st is None or found.path is None:
                    if found.blocker:
                        raise die(f"{shown} is hidden by {st.shown(found.blocker)} in the upper "
                                  "layer", f"reset {st.shown(found.blocker)} instead")
                    actions.append(Action(shown, "unchanged", "no local copy"))
                    continue
                up, ust = found.path, found.st
                whiteout = is_whiteout(up, ust)
                if whiteout and rel in origins and origins[rel] not in rels:
                    raise die(f"{shown} was renamed to {st.shown(origins[rel])}: bringing it "
                              "back alone would show one directory under two names",
                              f"reset both: overlayctl reset {shown} {st.shown(origins[rel])}, "
                              f"or mv {st.shown(origins[rel])} {shown}")
                pair = rel in renamed and renamed[rel] in rels
                low = st.lower(rel)
                if low is None and not whiteout and not pair:
                    hint = (f"it was renamed from {st.shown(renamed[rel])}: reset both paths "
                            "to undo the rename" if rel in renamed
                            else f"remove {shown} yourself if that is what you want")
                    raise die(f"nothing below the upper layer provides {shown}: resetting it "
                              "would delete local data", hint)
                if stat.S_ISDIR(ust.st_mode):
                    local_only = [st.shown(c.rel) for c in classify(upper, st.layers, [rel])
                                  if c.change == "added" and c.rel != rel]
                    if local_only:
                        more = f" and {len(local_only) - 1} more" if len(local_only) > 1 else ""
                        raise die(f"resetting {shown} would delete {local_only[0]}{more}, which "
                                  "nothing below provides",
                                  "reset the changed files one by one, or move yours away first")
                if found.blocker:
                    raise die(f"{shown} would stay hidden by {st.shown(found.blocker)}",
                              f"reset {st.shown(found.blocker)} instead")
                what = "whiteout" if whiteout else (
                    "renamed directory" if pair else
                    "directory" if stat.S_ISDIR(ust.st_mode) else "copy")
                removal.add(rel, "reset", f"removed the upper {what}")
            done = removal.run(dry_run)
            actions.extend(done)
            if not dry_run and removal.todo:
                state.save_manifest(root, cls.name, h, m)
    return actions


def pin(locked: Locked, paths: list[str], unpin: bool = False) -> list[Action]:
    root = locked.root
    actions: list[Action] = []
    for (cls, h), rels in _targets(root, paths).items():
        with open_stack(root, cls, h) as st:
            upper = _need_upper(st)
            m = state.load_manifest(root, cls.name, h)
            for rel in rels:
                shown = st.shown(rel)
                if not rel:
                    raise die(f"cannot pin all of {h}", f"name paths below {h}")
                if unpin:
                    if rel in m.pinned:
                        m.pinned.remove(rel)
                        actions.append(Action(shown, "unpinned"))
                    else:
                        actions.append(Action(shown, "unchanged", "was not pinned"))
                    continue
                found = st.lookup(rel)
                low = st.lower(rel)
                if found.st is not None and found.path and is_whiteout(found.path, found.st):
                    raise die(f"{shown} is deleted locally (whiteout); there is nothing to pin",
                              f"overlayctl reset {shown} first")
                if found.st is None:
                    if found.blocker:
                        raise die(f"{shown} is hidden by {st.shown(found.blocker)} in the upper "
                                  "layer", f"reset {st.shown(found.blocker)} first")
                    if low is None:
                        raise die(f"no layer provides {shown}", "check the path")
                    if st.merged:
                        _copy_up_live(st.target, rel, low)
                    else:
                        copy_up(low, upper, rel, st.layers)
                    actions.append(Action(shown, "pinned", "copied the default up"))
                else:
                    actions.append(Action(shown, "pinned", "kept the local copy"))
                if rel not in m.pinned:
                    m.pinned.append(rel)
                m.copies[rel] = digest(low.path, low.st) if low else ""
            m.pinned.sort()
            state.save_manifest(root, cls.name, h, m)
    return actions


def _copy_up_live(target: str, rel: str, low: Entry) -> None:
    """Make the overlay copy the entry up itself (a no-op chown triggers a full copy-up with
    metacopy=off), so the upper never changes under a live overlay. Every ancestor was
    checked to be a directory in the upper (or absent), so no symlink is followed."""
    p = os.path.join(target, rel)
    os.chown(p, low.st.st_uid, low.st.st_gid, follow_symlinks=False)


NO_DUP_UPDATE = ".no-dup-update"


def _no_dedupe(st: Stack) -> bool:
    """Does the hierarchy show a .no-dup-update at its top (Flatcar's /etc/.no-dup-update)?"""
    assert st.upper is not None
    found = st.lookup(NO_DUP_UPDATE)
    if found.st is not None and found.path is not None:
        return not is_whiteout(found.path, found.st)
    return found.blocker is None and st.lower(NO_DUP_UPDATE) is not None


def cleanup(locked: Locked, hierarchies: list[str], dry_run: bool,
            progress: Progress | None = None) -> list[Action]:
    from overlayctl.settings import load_cleanup
    root = locked.root
    actions: list[Action] = []
    known = {x for _, x in all_hierarchies()}
    unknown = [h for h in hierarchies if h not in known]
    if unknown:
        raise die(f"{unknown[0]} is not a hierarchy overlayctl manages",
                  "name /etc, /usr or /opt (or one from $SYSTEMD_*_HIERARCHIES)")
    wanted = [key for key in _targets(root, []) if not hierarchies or key[1] in hierarchies]
    for cls, h in wanted:
        with open_stack(root, cls, h) as st:
            if st.upper is None or not os.path.isdir(st.upper):
                continue
            upper = st.upper
            m = state.load_manifest(root, cls.name, h)
            conf = load_cleanup(root, cls.name)
            keep = conf.keep_paths(root)
            ignore = conf.ignore_xattrs
            # .no-dup-update: copies that equal their default are kept (no dedupe), so that
            # a later default does not take their place; whiteouts are still handled.
            dedupe = not _no_dedupe(st)
            if not dedupe:
                log.info(f"{st.shown(NO_DUP_UPDATE)} exists: identical copies, empty "
                         "directories and opaque markers are kept.")
            removal = Removal(locked, st, m)
            removed: set[str] = set()
            for c in iter_changes(upper, st.layers, ignore_xattrs=ignore):
                if progress is not None:
                    progress.tick()
                shown = st.shown(c.rel)
                up = os.path.join(upper, c.rel)
                if (c.change == "identical" and c.rel not in m.pinned and c.lower is not None
                        and c.lower.layer.role in ("defaults", "base") and dedupe):
                    # Copies equal to an extension's file stay: that extension may go away.
                    if not stat.S_ISDIR(os.lstat(up).st_mode):
                        removal.add(c.rel, "removed", "identical to the layer below"
                                    + (" (ignoring " + ", ".join(sorted(ignore)) + ")"
                                       if ignore and not same_entry(up, os.lstat(up),
                                                                    c.lower.path, c.lower.st)
                                       else ""))
                        removed.add(c.rel)
                elif c.change == "deleted" and shown in keep and c.lower is not None:
                    removal.add(c.rel, "removed", f"whiteout of a path in {keep[shown]}")
                    removed.add(c.rel)
                elif c.change == "orphan-whiteout":
                    removal.add(c.rel, "removed", "orphan whiteout: nothing below to hide")
                    removed.add(c.rel)
                elif c.change == "opaque" and dedupe and m.copies.get(c.rel) == "" and not any(
                        is_whiteout(os.path.join(up, n), os.lstat(os.path.join(up, n)))
                        for n in os.listdir(up)):
                    removal.add(c.rel, "cleared-opaque",
                                "opaque only because it was new; the default now exists")
            # Directories left holding nothing, equal to the one below: pure containers.
            for rel, p, ust in sorted(walk_upper(upper), key=lambda t: -t[0].count("/")):
                if not dedupe or not stat.S_ISDIR(ust.st_mode) or is_opaque(p):
                    continue
                left = [n for n in os.listdir(p) if os.path.join(rel, n) not in removed]
                if left:
                    continue
                low = st.lower(rel)
                if low is None or not same_entry(p, ust, low.path, low.st, ignore):
                    continue
                removal.add(rel, "removed", "empty directory equal to the layer below")
                removed.add(rel)
            # Deepest first, so that a directory is empty once its turn comes.
            removal.todo.sort(key=lambda t: -t[0].count("/"))
            done = removal.run(dry_run)
            actions.extend(sorted(done, key=lambda a: a.path))
            if not dry_run and removal.todo:
                state.save_manifest(root, cls.name, h, m)
    return actions
