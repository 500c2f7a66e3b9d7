"""The merge-time update of the manifest (format: docs/defaults.md): for each new entry of
a persistent upper, what the lower was while it was made (the snapshot of the previous
merge), then a new snapshot of the lower layers. Computed before mounting, saved by the
engine only once the merge is in place, so a failed merge leaves the old one."""

from __future__ import annotations

import os

from overlayctl import state
from overlayctl.plan import HierarchyPlan
from overlayctl.state import Manifest
from overlayctl.upper import LayerRef, digest, is_whiteout, merged_lower, walk_upper
from overlayctl.vocab import LOWER_ROLES

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any


def lower_snapshot(layers: list[LayerRef], old: dict[str, Any]) -> dict[str, list[Any]]:
    """rel -> [size, mtime_ns, ino, digest] for every entry the lower layers show; digests
    are reused from OLD when the stat identity is unchanged."""
    snap: dict[str, list[Any]] = {}
    for rel, e in merged_lower(layers):
        ident = [e.st.st_size, e.st.st_mtime_ns, e.st.st_ino]
        prev = old.get(rel)
        if isinstance(prev, list) and prev[:3] == ident:
            snap[rel] = prev
        else:
            snap[rel] = [*ident, digest(e.path, e.st)]
    return snap


def wanted(plan: HierarchyPlan) -> bool:
    """Kept where it is cheap and useful: a persistent upper over a defaults layer, or /etc
    (engine._wants_manifest says the same without importing this module)."""
    return plan.upper_kind in ("persistent", "host") and (
        any(layer.role == "defaults" for layer in plan.lowers) or plan.hierarchy == "/etc")


def updated(root: str, cls_name: str, plan: HierarchyPlan) -> Manifest | None:
    """The manifest as it is to be after merging PLAN (None: not kept for it)."""
    if not plan.keeps_manifest or not plan.upperdir or not os.path.isdir(plan.upperdir):
        return None
    layers = [LayerRef(layer.role, layer.path, layer.name) for layer in plan.lowers
              if layer.path and layer.role in LOWER_ROLES]
    m = state.load_manifest(root, cls_name, plan.hierarchy)
    new_lower = lower_snapshot(layers, m.lower)
    present: set[str] = set()
    for rel, p, st in walk_upper(plan.upperdir):
        if is_whiteout(p, st):
            continue
        present.add(rel)
        if rel not in m.copies:
            src = m.lower if m.snapshot_taken else new_lower
            m.copies[rel] = src[rel][3] if rel in src else ""
    m.copies = {r: d for r, d in m.copies.items() if r in present}
    m.pinned = sorted(r for r in m.pinned if r in present)
    m.lower = new_lower
    m.snapshot_taken = True
    return m
