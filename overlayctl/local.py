"""Local changes against the OS defaults: diff, which, reset, pin, unpin, cleanup, and the
manifest behind default_changed. Works merged or unmerged, from the record of the last merge;
always reads the raw upper, never through the overlay."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from overlayctl import engine, live, state
from overlayctl.errors import die
from overlayctl.mountns import Locked
from overlayctl.paths import chase
from overlayctl.settings import CLASSES, ExtClass, parse_hierarchies
from overlayctl.state import Manifest, MergeRecord
from overlayctl.upper import (
    Change,
    Entry,
    LayerRef,
    classify,
    clear_opaque,
    copy_up,
    digest,
    is_opaque,
    is_whiteout,
    lower_entry,
    lstat_or_none,
    remove,
    same_entry,
    upper_blocker,
    walk_upper,
)
from overlayctl.vocab import LOWER_ROLES

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any


# ---------------------------------------------------------------------------------------------
# Where a hierarchy's layers are


@dataclass
class Stack:
    cls: ExtClass
    hierarchy: str
    target: str
    record: MergeRecord
    merged: bool
    upper: str | None                 # raw upper (host path), None when there is none to read
    layers: list[LayerRef] = field(default_factory=list)
    plain: str = ""                   # where the plain hierarchy is read (a view if merged)

    @property
    def ephemeral(self) -> bool:
        return self.record.upper == "ephemeral"


def all_hierarchies() -> list[tuple[ExtClass, str]]:
    out: list[tuple[ExtClass, str]] = []
    for cls in CLASSES.values():
        env = f"{cls.env_prefix}_HIERARCHIES"
        value = os.environ.get(env)
        hs = parse_hierarchies(value, env) if value is not None else cls.hierarchies
        out.extend((cls, h) for h in hs)
    return out


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


@contextmanager
def open_stack(root: str, cls: ExtClass, hierarchy: str) -> Iterator[Stack]:
    record = state.load_record(root, cls.name, hierarchy)
    if record is None:
        raise die(f"{hierarchy} has never been merged by overlayctl in {root}",
                  f"merge it first, e.g. overlayctl --root={root} {cls.name} merge --mutable=yes")
    target = chase(root, hierarchy) or os.path.join(root, hierarchy.lstrip("/"))
    merged = os.path.isdir(target) and live.is_ours(target, cls)
    with ExitStack() as stack:
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
        yield Stack(cls, hierarchy, target, record, merged, upper, layers, plain)


def _need_upper(st: Stack) -> str:
    if st.upper is None:
        if st.ephemeral and st.merged:
            raise die(f"{st.hierarchy} has an ephemeral upper, which only its overlay can reach",
                      "use a persistent mode (--mutable=yes) to keep and inspect changes")
        raise die(f"{st.hierarchy} has no upper layer: nothing local to change",
                  "merge with --mutable=yes or auto to get one")
    if not os.path.isdir(st.upper):
        raise die(f"upper directory {st.upper} of {st.hierarchy} does not exist",
                  "merge again with --mutable=yes")
    return st.upper


# ---------------------------------------------------------------------------------------------
# Verbs


def diff(root: str, paths: list[str]) -> list[dict[str, Any]]:
    targets = _targets(root, paths)
    out: list[dict[str, Any]] = []
    for (cls, h), rels in targets.items():
        with open_stack(root, cls, h) as st:
            if st.upper is None:
                if st.ephemeral and st.merged:
                    _need_upper(st)
                continue
            m = state.load_manifest(root, cls.name, h)
            pinned = set(m.pinned)
            for c in classify(st.upper, st.layers, [r for r in rels if r] or None):
                j = c.as_json(h)
                j["default_changed"] = _default_changed(c, m)
                j["pinned"] = c.rel in pinned
                out.append(j)
    return out


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


def _targets(root: str, paths: list[str]) -> dict[tuple[ExtClass, str], list[str]]:
    targets: dict[tuple[ExtClass, str], list[str]] = {}
    if paths:
        for p in paths:
            cls, h, rel = hierarchy_of(p)
            targets.setdefault((cls, h), []).append(rel)
    else:
        for cls, h in all_hierarchies():
            if state.load_record(root, cls.name, h) is not None:
                targets[(cls, h)] = []
    return targets


def which(root: str, path: str) -> dict[str, Any]:
    cls, h, rel = hierarchy_of(path)
    with open_stack(root, cls, h) as st:
        if st.upper and os.path.isdir(st.upper) and rel:
            up = os.path.join(st.upper, rel)
            ust = lstat_or_none(up)
            if ust is not None and is_whiteout(up, ust):
                raise die(f"{path} is deleted: a whiteout in the upper layer hides it",
                          f"overlayctl reset {path} brings the default back")
            if ust is not None:
                return _which_json(path, "upper", None, up, root, st)
            blocker = upper_blocker(st.upper, rel)
            if blocker is not None:
                raise die(f"{path} is hidden by {os.path.join(h, blocker)} in the upper layer",
                          f"overlayctl reset {os.path.join(h, blocker)}")
        e = lower_entry(st.layers, rel)
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


@dataclass
class Action:
    path: str
    action: str
    detail: str = ""

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "action": self.action, "detail": self.detail}


def reset(locked: Locked, paths: list[str], dry_run: bool) -> list[Action]:
    root = locked.root
    actions: list[Action] = []
    by_stack = _targets(root, paths)
    for (cls, h), rels in by_stack.items():
        with open_stack(root, cls, h) as st:
            upper = _need_upper(st)
            m = state.load_manifest(root, cls.name, h)
            todo: list[tuple[str, str]] = []
            for rel in rels:
                shown = os.path.join(h, rel)
                if not rel:
                    raise die(f"refusing to reset all of {h}",
                              f"name paths below {h}, or remove {upper} by hand while unmerged")
                up = os.path.join(upper, rel)
                ust = lstat_or_none(up)
                blocker = upper_blocker(upper, rel)
                if ust is None:
                    if blocker:
                        raise die(f"{shown} is hidden by {os.path.join(h, blocker)} in the upper "
                                  "layer", f"reset {os.path.join(h, blocker)} instead")
                    actions.append(Action(shown, "unchanged", "no local copy"))
                    continue
                low = lower_entry(st.layers, rel)
                if low is None and not is_whiteout(up, ust):
                    raise die(f"nothing below the upper layer provides {shown}: resetting it "
                              "would delete local data",
                              f"remove {shown} yourself if that is what you want")
                if stat.S_ISDIR(ust.st_mode):
                    local_only = [os.path.join(h, c.rel) for c in classify(upper, st.layers, [rel])
                                  if c.change == "added" and c.rel != rel]
                    if local_only:
                        more = f" and {len(local_only) - 1} more" if len(local_only) > 1 else ""
                        raise die(f"resetting {shown} would delete {local_only[0]}{more}, which "
                                  "nothing below provides",
                                  "reset the changed files one by one, or move yours away first")
                if blocker:
                    raise die(f"{shown} would stay hidden by {os.path.join(h, blocker)}",
                              f"reset {os.path.join(h, blocker)} instead")
                what = "whiteout" if is_whiteout(up, ust) else (
                    "directory" if stat.S_ISDIR(ust.st_mode) else "copy")
                todo.append((rel, up))
                actions.append(Action(shown, "reset", f"removed the upper {what}"))
            if dry_run or not todo:
                continue
            for rel, up in todo:
                remove(up)
                m.forget(rel)
            state.save_manifest(root, cls.name, h, m)
            if st.merged:
                engine.rebuild(locked, root, st.record)
    return actions


def pin(locked: Locked, paths: list[str], unpin: bool = False) -> list[Action]:
    root = locked.root
    actions: list[Action] = []
    for (cls, h), rels in _targets(root, paths).items():
        with open_stack(root, cls, h) as st:
            upper = _need_upper(st)
            m = state.load_manifest(root, cls.name, h)
            for rel in rels:
                shown = os.path.join(h, rel)
                if not rel:
                    raise die(f"cannot pin all of {h}", f"name paths below {h}")
                if unpin:
                    if rel in m.pinned:
                        m.pinned.remove(rel)
                        actions.append(Action(shown, "unpinned"))
                    else:
                        actions.append(Action(shown, "unchanged", "was not pinned"))
                    continue
                up = os.path.join(upper, rel)
                ust = lstat_or_none(up)
                low = lower_entry(st.layers, rel)
                if ust is not None and is_whiteout(up, ust):
                    raise die(f"{shown} is deleted locally (whiteout); there is nothing to pin",
                              f"overlayctl reset {shown} first")
                if ust is None:
                    if low is None:
                        raise die(f"no layer provides {shown}", "check the path")
                    if upper_blocker(upper, rel):
                        raise die(f"{shown} is hidden in the upper layer", "reset its parent")
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
    metacopy=off), so the upper never changes under a live overlay."""
    p = os.path.join(target, rel)
    os.chown(p, low.st.st_uid, low.st.st_gid, follow_symlinks=False)


def cleanup(locked: Locked, hierarchies: list[str], dry_run: bool) -> list[Action]:
    from overlayctl.settings import load_settings
    root = locked.root
    actions: list[Action] = []
    wanted = [(c, h) for c, h in all_hierarchies()
              if state.load_record(root, c.name, h) is not None
              and (not hierarchies or h in hierarchies)]
    unknown = [h for h in hierarchies if h not in {x for _, x in all_hierarchies()}]
    if unknown:
        raise die(f"{unknown[0]} is not a hierarchy overlayctl manages",
                  "name /etc, /usr or /opt (or one from $SYSTEMD_*_HIERARCHIES)")
    for cls, h in wanted:
        with open_stack(root, cls, h) as st:
            if st.upper is None or not os.path.isdir(st.upper):
                continue
            upper = st.upper
            m = state.load_manifest(root, cls.name, h)
            keep = set(load_settings(root, cls.name).keep_defaults)
            todo: list[tuple[str, str, str]] = []   # rel, op, detail
            for c in classify(upper, st.layers):
                shown = os.path.join(h, c.rel)
                up = os.path.join(upper, c.rel)
                if (c.change == "identical" and c.rel not in m.pinned and c.lower is not None
                        and c.lower.layer.role in ("defaults", "base")):
                    # Copies equal to an extension's file stay: that extension may go away.
                    if not stat.S_ISDIR(os.lstat(up).st_mode):
                        todo.append((c.rel, "remove", "identical to the layer below"))
                elif c.change == "deleted" and shown in keep and c.lower is not None:
                    todo.append((c.rel, "remove", "whiteout of a path in KeepDefaults"))
                elif c.change == "opaque" and m.copies.get(c.rel) == "" and not any(
                        is_whiteout(os.path.join(up, n), os.lstat(os.path.join(up, n)))
                        for n in os.listdir(up)):
                    todo.append((c.rel, "clear-opaque",
                                 "opaque only because it was new; the default now exists"))
            for rel, op, detail in todo:
                actions.append(Action(os.path.join(h, rel),
                                      "removed" if op == "remove" else "cleared-opaque", detail))
            removed = {rel for rel, op, _ in todo if op == "remove"}
            if not dry_run:
                for rel, op, _ in todo:
                    p = os.path.join(upper, rel)
                    if op == "remove":
                        remove(p)
                        m.forget(rel)
                    else:
                        clear_opaque(p)
                        m.copies.pop(rel, None)
            # Directories left holding nothing, equal to the one below: pure containers.
            for rel, p, ust in sorted(walk_upper(upper), key=lambda t: -t[0].count("/")):
                if not stat.S_ISDIR(ust.st_mode) or is_opaque(p):
                    continue
                left = [n for n in os.listdir(p) if os.path.join(rel, n) not in removed]
                if left:
                    continue
                low = lower_entry(st.layers, rel)
                if low is None or not same_entry(p, ust, low.path, low.st):
                    continue
                actions.append(Action(os.path.join(h, rel), "removed",
                                      "empty directory equal to the layer below"))
                removed.add(rel)
                if not dry_run:
                    os.rmdir(p)
                    m.forget(rel)
            if not dry_run and (todo or removed):
                state.save_manifest(root, cls.name, h, m)
                if st.merged:
                    engine.rebuild(locked, root, st.record)
    return actions
