"""Keeping a persistent or host upper tidy from merge to merge (docs/modes.md, "Writable
/usr on a package-managed distro"; the record is state.DirsRecord).

Opaque markers. When a directory is created in a directory that a lower layer also has,
overlayfs marks the new one opaque (trusted.overlay.opaque=y): a lookup optimisation, since
no lower layer has it. A lower directory deleted and created again gets the same marker on
purpose: it hides the lower content. On a later merge the two look alike, so each merge
records the lower layers' directories (names only), and the next one tells them apart: a
marker on a directory the lower layers had then is deliberate, and stays deliberate; one on
a directory they did not have is the kernel's, and is cleared as soon as a lower layer
provides the directory, so that the extension's content there shows. Without a record
(the first merge, or over a merge made by upstream), every marker is deliberate.

* Which markers are looked at: for a host upper (the real /usr), only those on directories
  of the lower layers (then, now) and the ones already known; a persistent upper (the
  mutable dir over the plain /usr) is small, and is read whole, since the plain /usr is one
  of its lower layers and too big to record. Its base directories are classified at
  unmerge (or at a refresh), while the base is still what it was during the merge.
* When: on a merge before the overlay is built; on a refresh only once nothing of the build
  can fail any more, right before the swap (engine.run), since the old overlay still uses
  the same upper. A marker on the way to a mount carried into the new overlay is left for
  the next merge (the new overlay has looked it up already). A call that fails puts every
  cleared marker back.

Whiteouts. A host upper without a defaults layer is the plain hierarchy itself, which must
stay a valid tree: its whiteouts (0:0 character devices) are dropped at unmerge, in every
directory a lower layer had since the last clean unmerge. A whiteout cannot tell a deleted
package file from deleted extension content, so deletions of extension content last until
the unmerge (the choice documented in docs/modes.md). After a crash, the next merge (before
mounting) or unmerge finishes the job. Persistent uppers and hierarchies with a defaults
layer keep their whiteouts: there they are the record of a deletion.

Lean on purpose, since it sits on the merge path: os, stat and the state module only."""

from __future__ import annotations

import os
import stat
import time

from overlayctl import log, state
from overlayctl.paths import inside
from overlayctl.state import DirsRecord

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from overlayctl.plan import HierarchyPlan

    Tree = dict[str, Any]

EXT_ROLES = ("import", "extension", "defaults")


# ---------------------------------------------------------------------------------------------
# Directory trees: nested dicts of names


def tree_of(paths: list[str]) -> Tree:
    """Every directory below each of PATHS (never following a symlink), as one tree."""
    out: Tree = {}
    for top in paths:
        todo: list[tuple[str, Tree]] = [(top, out)]
        while todo:
            d, node = todo.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    try:
                        if not e.is_dir(follow_symlinks=False):
                            continue
                    except OSError:
                        continue
                    child = node.get(e.name)
                    if child is None:
                        child = node[e.name] = {}
                    todo.append((e.path, child))
    return out


def add(tree: Tree, rel: str) -> None:
    node = tree
    for comp in rel.split("/"):
        if comp:
            node = node.setdefault(comp, {})


def union(*trees: Tree) -> Tree:
    out: Tree = {}
    for t in trees:
        _merge_into(out, t)
    return out


def _merge_into(dst: Tree, src: Tree) -> None:
    for name, sub in src.items():
        have = dst.get(name)
        if have is None:
            dst[name] = _copy(sub)
        else:
            _merge_into(have, sub)


def _copy(t: Tree) -> Tree:
    return {n: _copy(s) for n, s in t.items()}


def has(tree: Tree, rel: str) -> bool:
    node = tree
    for comp in rel.split("/"):
        if not comp:
            continue
        node = node.get(comp)  # type: ignore[assignment]
        if node is None:
            return False
    return True


def count(tree: Tree) -> int:
    return sum(1 + count(s) for s in tree.values())


def paths(tree: Tree, prefix: str = "") -> Iterator[str]:
    for name in sorted(tree):
        rel = f"{prefix}/{name}" if prefix else name
        yield rel
        yield from paths(tree[name], rel)


# ---------------------------------------------------------------------------------------------
# Reading the upper


def opaque_xattr(plan: HierarchyPlan) -> str:
    """The marker the overlay of PLAN honours (user.* on a userxattr mount)."""
    return "user.overlay.opaque" if "userxattr" in plan.fs_options else "trusted.overlay.opaque"


def _is_opaque(path: str, name: str) -> bool:
    try:
        return os.getxattr(path, name, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _real_dir(top: str, rel: str) -> bool:
    """REL below TOP is a directory, reached through directories only (no symlink)."""
    p = top
    for comp in rel.split("/"):
        p = os.path.join(p, comp)
        try:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                return False
        except OSError:
            return False
    return True


def scan_tree(upper: str, tree: Tree, xattr: str, prefix: str = "") -> set[str]:
    """The opaque directories of UPPER at the paths of TREE."""
    out: set[str] = set()
    for name, sub in tree.items():
        rel = f"{prefix}/{name}" if prefix else name
        p = os.path.join(upper, rel)
        try:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                continue
        except OSError:
            continue
        if _is_opaque(p, xattr):
            out.add(rel)
        if sub:
            out |= scan_tree(upper, sub, xattr, rel)
    return out


def _is_whiteout_entry(e: os.DirEntry[str]) -> bool:
    try:
        if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False) or \
                e.is_symlink():
            return False
        st = e.stat(follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def scan_all(upper: str, xattr: str, whiteouts: bool) -> tuple[set[str], list[str], int]:
    """Every opaque directory of UPPER, and (WHITEOUTS) every whiteout; and how many
    directories were read."""
    markers: set[str] = set()
    found: list[str] = []
    n = 0
    todo = [""]
    while todo:
        rel = todo.pop()
        try:
            it = os.scandir(os.path.join(upper, rel) if rel else upper)
        except OSError:
            continue
        n += 1
        with it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                try:
                    isdir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if isdir:
                    if _is_opaque(e.path, xattr):
                        markers.add(r)
                    todo.append(r)
                elif whiteouts and _is_whiteout_entry(e):
                    found.append(r)
    return markers, sorted(found), n


# ---------------------------------------------------------------------------------------------
# At a merge or refresh


class Hygiene:
    """What one merge or refresh does for one hierarchy: the markers to clear (early, before
    building, or late, right before the swap), the whiteouts an earlier merge left, and the
    record to save once the merge is in place."""

    __slots__ = ("hierarchy", "upper", "xattr", "clear", "late", "whiteouts", "dirs", "window",
                 "whiteout_dirs", "deliberate", "pending", "base", "drop_whiteouts",
                 "upper_rel", "cleared", "ms", "examined")

    def __init__(self, hierarchy: str, upper: str, xattr: str, upper_rel: str) -> None:
        self.hierarchy = hierarchy
        self.upper = upper               # the raw upper, as this process reads it
        self.upper_rel = upper_rel       # the same inside the root
        self.xattr = xattr
        self.clear: list[str] = []       # optimisation markers to clear now
        self.late = False                # a refresh: clear right before the swap
        self.whiteouts: list[str] = []   # left by an earlier merge: drop before mounting
        self.dirs: Tree = {}
        self.window: Tree = {}
        self.whiteout_dirs: Tree = {}
        self.deliberate: set[str] = set()
        self.pending: set[str] = set()
        self.base = False
        self.drop_whiteouts = False
        self.cleared: list[str] = []     # what this call did clear
        self.ms = 0.0
        self.examined = 0

    def shown(self, rel: str) -> str:
        return os.path.join(self.hierarchy, rel)

    def record(self, since: int) -> DirsRecord:
        return DirsRecord(since=since, upper=self.upper_rel, dirs=self.dirs,
                          window=self.window, whiteout_dirs=self.whiteout_dirs,
                          deliberate=tuple(sorted(self.deliberate)),
                          pending=tuple(sorted(self.pending)), base=self.base, closed=False,
                          drop_whiteouts=self.drop_whiteouts, clean=False)

    def as_json(self) -> dict[str, Any]:
        return {"clear_opaque": [self.shown(r) for r in self.clear],
                "drop_whiteouts": [self.shown(r) for r in self.whiteouts]}


def _ancestors(rel: str) -> Iterator[str]:
    parts = rel.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def prepare(root: str, plan: HierarchyPlan, prev: DirsRecord | None, valid: bool,
            merged: bool, nested: list[str]) -> Hygiene:
    """Classify the opaque markers of PLAN's upper (read only). PREV is the record of the
    last merge, VALID whether it describes the merge in place or the last one (not one by
    upstream); MERGED: the hierarchy is merged now (a refresh: clear late; NESTED, the mounts
    below it, relative, which the new overlay looks up while it is built)."""
    t0 = time.perf_counter()
    assert plan.upperdir is not None and plan.mutable_dir is not None
    h = Hygiene(plan.hierarchy, plan.upperdir, opaque_xattr(plan),
                inside(root, plan.mutable_dir))
    upper = plan.upperdir
    h.late = merged
    h.base = any(layer.role == "base" for layer in plan.lowers)
    base = next((layer.path for layer in plan.lowers if layer.role == "base"), None)
    h.drop_whiteouts = plan.upper_kind == "host" and not any(
        layer.role == "defaults" for layer in plan.lowers)
    h.dirs = tree_of([layer.path for layer in plan.lowers
                      if layer.role in EXT_ROLES and layer.path])
    if prev is not None and prev.upper != h.upper_rel:
        prev, valid = None, False
    if not valid or prev is None:
        # No record to tell the markers apart: every one is deliberate. Whiteouts an earlier
        # merge (by anyone) left in a plain hierarchy go, where they would stay forever; on
        # a hierarchy merged now, at its unmerge.
        markers, found, h.examined = scan_all(upper, h.xattr, h.drop_whiteouts)
        h.deliberate = markers
        h.whiteout_dirs = _copy(h.dirs)
        if merged:
            for rel in found:
                add(h.whiteout_dirs, os.path.dirname(rel))
        else:
            h.whiteouts = found
        h.ms = (time.perf_counter() - t0) * 1000
        return h
    old = union(prev.dirs, prev.window)
    if merged:
        h.window = prev.dirs
        h.whiteout_dirs = union(prev.whiteout_dirs, h.dirs) if not prev.clean else h.dirs
    else:
        h.whiteout_dirs = h.dirs
        if prev.drop_whiteouts and not prev.clean:
            # The last merge was not unmerged cleanly (a crash): finish its unmerge.
            h.whiteouts = find_whiteouts(upper, prev.whiteout_dirs)
    if h.base:
        markers, _, h.examined = scan_all(upper, h.xattr, False)
    else:
        cand = union(old, h.dirs)
        for rel in (*prev.deliberate, *prev.pending):
            add(cand, rel)
        markers = scan_tree(upper, cand, h.xattr)
        h.examined = count(cand)
    known = set(prev.deliberate)
    pending = set(prev.pending)
    # The base's directories: while merged the base is as it was during the merge; after a
    # clean unmerge they are classified already (closed), after a crash they are read now.
    base_then = base if h.base and prev.base and (merged or not prev.closed) else None
    optimisation: set[str] = set()
    for rel in markers:
        if rel in pending:
            optimisation.add(rel)
        elif rel in known or has(old, rel) or (base_then and _real_dir(base_then, rel)):
            h.deliberate.add(rel)
        else:
            optimisation.add(rel)
    for rel in sorted(optimisation):
        if not (has(h.dirs, rel) or (base and _real_dir(base, rel))):
            continue   # nothing below to show: the marker does no harm
        if any(a in h.deliberate or (a in optimisation and a not in h.clear)
               for a in _ancestors(rel)):
            continue   # a marker above it stays: nothing would show
        if merged and any(n == rel or n.startswith(rel + "/") for n in nested):
            log.info(f"Not clearing the opaque marker of {h.shown(rel)} yet: a mount below it "
                     "is carried into the new overlay; the next merge clears it.")
            continue
        h.clear.append(rel)
    # Markers of the kernel that stay, on directories the next merge would take for lower
    # ones of this merge: remembered as what they are.
    h.pending = {rel for rel in optimisation if rel not in h.clear
                 and (has(h.dirs, rel) or has(h.window, rel)
                      or (base is not None and _real_dir(base, rel)))}
    h.ms = (time.perf_counter() - t0) * 1000
    return h


def find_whiteouts(upper: str, tree: Tree) -> list[str]:
    """The whiteouts of UPPER in the directories of TREE, and in directories renamed into
    them (a redirect: the lower content comes from elsewhere)."""
    out: list[str] = []

    def walk(rel: str, sub: Tree | None) -> None:
        d = os.path.join(upper, rel) if rel else upper
        try:
            it = os.scandir(d)
        except OSError:
            return
        with it:
            entries = list(it)
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            if _is_whiteout_entry(e):
                out.append(r)
                continue
            try:
                isdir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if not isdir:
                continue
            if sub is None:
                walk(r, None)
            elif e.name in sub:
                walk(r, sub[e.name])
            elif _redirected(e.path):
                walk(r, None)

    walk("", tree)
    return sorted(out)


def _redirected(path: str) -> bool:
    for name in ("trusted.overlay.redirect", "user.overlay.redirect"):
        try:
            os.getxattr(path, name, follow_symlinks=False)
            return True
        except OSError:
            pass
    return False


def drop(upper: str, hierarchy: str, whiteouts: list[str], why: str) -> int:
    """Remove the whiteouts WHITEOUTS (relative to UPPER) that are still whiteouts."""
    n = 0
    for rel in whiteouts:
        p = os.path.join(upper, rel)
        try:
            st = os.lstat(p)
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                continue
            os.unlink(p)
        except OSError as e:
            log.warning(f"Could not remove the whiteout {os.path.join(hierarchy, rel)}: "
                        f"{e.strerror}")
            continue
        n += 1
        log.debug(f"Dropped the whiteout {os.path.join(hierarchy, rel)} ({why}).")
    if n:
        log.info(f"Dropped {n} whiteout{'s' if n != 1 else ''} from {hierarchy} ({why}).")
    return n


def clear(h: Hygiene, undo: list[tuple[str, str]]) -> None:
    """Clear the optimisation markers of H; each one cleared is added to UNDO (path, xattr)
    so that a failing call can put it back."""
    for rel in h.clear:
        p = os.path.join(h.upper, rel)
        try:
            os.removexattr(p, h.xattr, follow_symlinks=False)
        except OSError as e:
            log.warning(f"Could not clear the opaque marker of {h.shown(rel)}: {e.strerror}")
            h.pending.add(rel)
            continue
        undo.append((p, h.xattr))
        h.cleared.append(rel)
        log.info(f"Cleared the opaque marker of {h.shown(rel)}: overlayfs set it when the "
                 "directory was created while merged, and a lower layer provides it now.")
    h.clear = []


def restore(undo: list[tuple[str, str]]) -> None:
    """Put back the markers a failed call cleared."""
    for p, name in reversed(undo):
        try:
            os.setxattr(p, name, b"y", follow_symlinks=False)
        except OSError as e:
            log.warning(f"Could not restore the opaque marker of {p}: {e.strerror}")
    undo.clear()


# ---------------------------------------------------------------------------------------------
# At unmerge


def after_unmerge(root: str, cls_name: str, hierarchy: str, target: str,
                  since: int | None) -> None:
    """The hierarchy is not merged any more: drop the whiteouts a host upper without defaults
    got since the last clean unmerge, and (a persistent upper over the plain hierarchy)
    classify the markers on the base's directories while the base is as it was. SINCE is
    the merge just taken down (None: nothing was merged, finish an interrupted job)."""
    rec = state.load_dirs(root, cls_name, hierarchy)
    if rec is None or (rec.clean and (rec.closed or not rec.base)):
        return
    t0 = time.perf_counter()
    upper = os.path.join(root, rec.upper.lstrip("/"))
    new = rec
    if rec.drop_whiteouts and not rec.clean:
        found = find_whiteouts(upper, rec.whiteout_dirs)
        drop(upper, hierarchy, found, f"the plain {hierarchy} keeps no deletion markers")
        new = new.replace(clean=True, whiteout_dirs={})
    elif not rec.drop_whiteouts:
        new = new.replace(clean=True)
    if rec.base and not rec.closed and since is not None and since == rec.since:
        markers, _, _ = scan_all(upper, "trusted.overlay.opaque", False)
        extra = {m for m in markers if m not in rec.pending and _real_dir(target, m)}
        new = new.replace(closed=True, deliberate=tuple(sorted({*rec.deliberate, *extra})))
    if new != rec:
        try:
            state.save_dirs(root, cls_name, hierarchy, new)
        except OSError as e:
            log.warning(f"Could not save the directory record of {hierarchy}: {e.strerror}")
    log.debug(f"hygiene of {hierarchy} at unmerge: {(time.perf_counter() - t0) * 1000:.1f} ms")
