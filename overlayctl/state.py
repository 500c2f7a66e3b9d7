"""overlayctl's own records under <root>/var/lib/overlayctl/<class>/, never in the merged tree:

* <name>.json      how the hierarchy was last merged (mode, upper, work dir, defaults, layers),
                   so that diff, which, reset, pin and cleanup work on an unmerged hierarchy;
* <name>.manifest  digests of the lower entries, for default_changed (see docs/defaults.md).

<name> is the hierarchy as one path component (/etc -> etc, /foo/bar -> foo.bar)."""

from __future__ import annotations

import json
import os

from overlayctl.paths import single_component

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

STATE_DIR = "var/lib/overlayctl"


def state_path(root: str, cls_name: str, hierarchy: str, suffix: str = ".json") -> str:
    return os.path.join(root, STATE_DIR, cls_name, single_component(hierarchy) + suffix)


def _atomic_write(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        # json.dumps, not json.dump: only the former uses the C encoder.
        f.write(json.dumps(data, sort_keys=True, separators=(",", ":")))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
    except (OSError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def save_record(root: str, cls_name: str, hierarchy: str, record: dict[str, Any]) -> None:
    _atomic_write(state_path(root, cls_name, hierarchy), record)


def load_record(root: str, cls_name: str, hierarchy: str) -> dict[str, Any] | None:
    return _read(state_path(root, cls_name, hierarchy))


def save_manifest(root: str, cls_name: str, hierarchy: str, manifest: dict[str, Any]) -> None:
    _atomic_write(state_path(root, cls_name, hierarchy, ".manifest"), manifest)


def load_manifest(root: str, cls_name: str, hierarchy: str) -> dict[str, Any]:
    m = _read(state_path(root, cls_name, hierarchy, ".manifest"))
    if not m or m.get("version") != 1:
        return {"version": 1, "lower": {}, "copies": {}, "pinned": []}
    m.setdefault("lower", {})
    m.setdefault("copies", {})
    m.setdefault("pinned", [])
    return m
