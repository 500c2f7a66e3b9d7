"""overlayctl's own records, never in the merged tree's lower layers:

* <root>/var/lib/overlayctl/<class>/<name>.json      MergeRecord: how the hierarchy was last
  merged (mode, upper, work dir, defaults, layers), so that diff, which, reset, pin, cleanup
  and a refresh without a mode work on it, merged or not (a copy also sits in the metadata
  dir as overlayctl.json);
* <root>/var/lib/overlayctl/<class>/<name>.manifest  Manifest: digests of the lower entries,
  for default_changed (see docs/defaults.md);
* <root>/var/lib/overlayctl/<class>/<name>.dirs      DirsRecord: the lower layers' directories
  at the last merge of a persistent or host upper (names only), which opaque markers are
  known to be deliberate, and whether the whiteouts of a host upper are dropped yet
  (hygiene.py, docs/modes.md "Writable /usr on a package-managed distro");
* <root>/run/overlayctl/<class>.merging, call.<classes>.merging   journals of a merge under
  way (left behind only by a killed process);
* <root>/run/overlayctl/detached.json                overlays detached while still in use.

<name> is the hierarchy as one path component (/etc -> etc, /foo/bar -> foo.bar)."""

from __future__ import annotations

import os

from overlayctl.jsontext import dumps, loads
from overlayctl.paths import single_component
from overlayctl.record import Record

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

    from overlayctl.vocab import LayerRole, MutableMode, UpperKind

STATE_DIR = "var/lib/overlayctl"
RUN_DIR = "run/overlayctl"


def state_path(root: str, cls_name: str, hierarchy: str, suffix: str = ".json") -> str:
    return os.path.join(root, STATE_DIR, cls_name, single_component(hierarchy) + suffix)


def atomic_write(path: str, text: str, *, sync: bool = True) -> None:
    """Write PATH whole or not at all (a temporary file renamed over it). A file that
    already holds TEXT is left as it is: a boot that merges what the last one merged writes
    nothing, and waits for no fsync. File names that are not UTF-8 (surrogate escapes in
    TEXT) are written as the bytes they were read as."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            if f.read(len(text) + 1) == text:
                return
    except (OSError, ValueError):
        pass
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def dump(value: Any) -> str:
    return dumps(value) + "\n"


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError):
        return None
    try:
        v = loads(text)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


# ---------------------------------------------------------------------------------------------
# The merge record


class RecordedLayer(Record):
    __slots__ = ("role", "name", "path", "protection")
    role: LayerRole
    name: str | None
    path: str | None          # as seen inside the root (raw images: the image file)
    protection: dict[str, str | None] | None   # raw images: verity.Protection.to_json()

    def __init__(self, role: LayerRole, name: str | None, path: str | None,
                 protection: dict[str, str | None] | None = None) -> None:
        self._fill(locals())


class MergeRecord(Record):
    """How a hierarchy was merged, as overlayctl knows it (paths as seen inside the root)."""

    __slots__ = ("cls", "hierarchy", "mode", "upper", "upperdir", "workdir", "layers",
                 "noexec", "force", "mount_options", "defaults", "since", "image_policy")
    cls: str
    hierarchy: str
    mode: MutableMode
    upper: UpperKind | None
    upperdir: str | None
    workdir: str | None
    layers: tuple[RecordedLayer, ...]
    noexec: bool | None
    force: bool
    mount_options: str | None
    defaults: str | None
    since: int                # when it was merged, µs since the epoch
    image_policy: str | None  # --image-policy= or ImagePolicy= as given (None: defaults)

    def __init__(self, *, cls: str, hierarchy: str, mode: MutableMode, upper: UpperKind | None,
                 upperdir: str | None, workdir: str | None, layers: tuple[RecordedLayer, ...],
                 noexec: bool | None, force: bool, mount_options: str | None,
                 defaults: str | None, since: int, image_policy: str | None = None) -> None:
        self._fill(locals())

    def to_json(self) -> dict[str, Any]:
        return {"class": self.cls, "hierarchy": self.hierarchy, "mode": self.mode,
                "upper": self.upper, "upperdir": self.upperdir, "workdir": self.workdir,
                "layers": [la.fields() for la in self.layers], "overlayctl": True,
                "noexec": self.noexec, "force": self.force,
                "mount_options": self.mount_options, "defaults": self.defaults,
                "since": self.since, "image_policy": self.image_policy}

    @classmethod
    def from_json(cls, j: dict[str, Any]) -> MergeRecord | None:
        """None for what is not a record of ours (or is damaged)."""
        from overlayctl.vocab import MUTABLE_MODES
        try:
            mode = j["mode"]
            if not j.get("overlayctl") or mode not in MUTABLE_MODES:
                return None
            upper = j.get("upper")
            if upper not in (None, "persistent", "host", "ephemeral"):
                return None
            layers = tuple(RecordedLayer(la["role"], la.get("name"), la.get("path"),
                                         la.get("protection") if isinstance(
                                             la.get("protection"), dict) else None)
                           for la in j.get("layers", []))
            return MergeRecord(
                cls=str(j["class"]), hierarchy=str(j["hierarchy"]), mode=mode, upper=upper,
                upperdir=j.get("upperdir"), workdir=j.get("workdir"), layers=layers,
                noexec=j.get("noexec"), force=bool(j.get("force")),
                mount_options=j.get("mount_options"), defaults=j.get("defaults"),
                since=int(j.get("since") or 0),
                image_policy=j.get("image_policy") if isinstance(j.get("image_policy"),
                                                                 str) else None)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def save_record(root: str, rec: MergeRecord) -> None:
    # Not fsynced: every merge writes a new one (it holds the merge time), at boot, before
    # sysinit.target, where an fsync waits for the disk. What it protects against is a power
    # cut, after which no merge is left for it to describe; the rename keeps it whole or
    # old, and an unreadable one reads as none (diff then takes today's configuration).
    atomic_write(state_path(root, rec.cls, rec.hierarchy), dump(rec.to_json()), sync=False)


def load_record(root: str, cls_name: str, hierarchy: str) -> MergeRecord | None:
    j = _read(state_path(root, cls_name, hierarchy))
    return MergeRecord.from_json(j) if j is not None else None


def record_file_text(root: str, cls_name: str, hierarchy: str) -> str | None:
    """The record file as it is (for restoring it exactly after a failed merge)."""
    try:
        with open(state_path(root, cls_name, hierarchy), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def restore_record_file(root: str, cls_name: str, hierarchy: str, text: str | None) -> None:
    path = state_path(root, cls_name, hierarchy)
    if text is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        atomic_write(path, text)


# ---------------------------------------------------------------------------------------------
# The manifest


class Manifest:
    """rel -> [size, mtime_ns, ino, digest] of the lower layers at the last merge (lower),
    rel -> digest of the lower entry when the upper's copy was made ("" = there was none)
    (copies), the pinned paths, and whether a snapshot was ever taken. Edited in place by
    the local-change verbs, then saved."""

    __slots__ = ("lower", "copies", "pinned", "snapshot_taken")

    def __init__(self, lower: dict[str, list[Any]] | None = None,
                 copies: dict[str, str] | None = None, pinned: list[str] | None = None,
                 snapshot_taken: bool = False) -> None:
        self.lower: dict[str, list[Any]] = lower or {}
        self.copies: dict[str, str] = copies or {}
        self.pinned: list[str] = pinned or []
        self.snapshot_taken = snapshot_taken

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "lower": self.lower, "copies": self.copies,
                "pinned": self.pinned, "snapshot_taken": self.snapshot_taken}

    def forget(self, rel: str) -> None:
        """Drop REL and everything below it."""
        prefix = rel.rstrip("/") + "/"
        self.copies = {r: d for r, d in self.copies.items()
                       if r != rel and not r.startswith(prefix)}
        self.pinned = [r for r in self.pinned if r != rel and not r.startswith(prefix)]


def load_manifest(root: str, cls_name: str, hierarchy: str) -> Manifest:
    m = _read(state_path(root, cls_name, hierarchy, ".manifest"))
    if not m or m.get("version") != 1:
        return Manifest()
    return Manifest(dict(m.get("lower") or {}), dict(m.get("copies") or {}),
                    list(m.get("pinned") or []), bool(m.get("snapshot_taken")))


def save_manifest(root: str, cls_name: str, hierarchy: str, m: Manifest) -> None:
    atomic_write(state_path(root, cls_name, hierarchy, ".manifest"), dump(m.to_json()))


# ---------------------------------------------------------------------------------------------
# The lower layers' directories (opaque and whiteout hygiene, hygiene.py)


class DirsRecord(Record):
    """What hygiene.py needs to know about the last merge of a persistent or host upper.
    Directory trees are nested dicts of names ({"lib": {"python3": {}}}), relative to the
    hierarchy; paths in the lists are relative too."""

    __slots__ = ("since", "upper", "dirs", "window", "whiteout_dirs", "deliberate", "pending",
                 "base", "closed", "drop_whiteouts", "clean")
    since: int                 # the merge it belongs to (MergeRecord.since)
    upper: str                 # the upper directory (inside the root), as in the MergeRecord
    dirs: dict[str, Any]       # the lower layers' directories of that merge (not the base)
    window: dict[str, Any]     # the same of the overlay it replaced (a refresh), else {}
    whiteout_dirs: dict[str, Any]  # every lower directory since the last clean unmerge
    deliberate: tuple[str, ...]    # opaque markers known to be deliberate
    pending: tuple[str, ...]       # optimisation markers left for the next merge to clear
    base: bool                 # the plain hierarchy was a lower layer (a persistent upper)
    closed: bool               # unmerged, and markers on the base's directories classified
    drop_whiteouts: bool       # a host upper without defaults: whiteouts go at unmerge
    clean: bool                # unmerged, and its whiteouts dropped

    def __init__(self, *, since: int, upper: str, dirs: dict[str, Any], window: dict[str, Any],
                 whiteout_dirs: dict[str, Any], deliberate: tuple[str, ...],
                 pending: tuple[str, ...], base: bool, closed: bool, drop_whiteouts: bool,
                 clean: bool) -> None:
        self._fill(locals())

    # A line format, read without the json module (which costs milliseconds at boot):
    #   overlayctl-dirs 1
    #   since N / upper PATH / base 0|1 / closed 0|1 / drop_whiteouts 0|1 / clean 0|1
    #   dirs|window|whiteout_dirs PATH (one line per leaf), deliberate|pending PATH
    # with "\\" and "\n" escaped in paths.
    _FLAGS = ("base", "closed", "drop_whiteouts", "clean")
    _TREES = ("dirs", "window", "whiteout_dirs")

    def to_text(self) -> str:
        out = ["overlayctl-dirs 1", f"since {self.since}", f"upper {_esc(self.upper)}"]
        out += [f"{k} {int(getattr(self, k))}" for k in self._FLAGS]
        for k in self._TREES:
            out += [f"{k} {_esc(p)}" for p in _tree_paths(getattr(self, k))]
        for k in ("deliberate", "pending"):
            out += [f"{k} {_esc(p)}" for p in getattr(self, k)]
        return "\n".join(out) + "\n"

    @classmethod
    def from_text(cls, text: str) -> DirsRecord | None:
        lines = text.split("\n")
        if not lines or lines[0] != "overlayctl-dirs 1":
            return None
        v: dict[str, Any] = {k: {} for k in cls._TREES}
        v["deliberate"], v["pending"] = [], []
        try:
            for line in lines[1:]:
                if not line:
                    continue
                key, _, val = line.partition(" ")
                if key == "since":
                    v["since"] = int(val)
                elif key == "upper":
                    v["upper"] = _unesc(val)
                elif key in cls._FLAGS:
                    v[key] = val == "1"
                elif key in cls._TREES:
                    node = v[key]
                    for comp in _unesc(val).split("/"):
                        node = node.setdefault(comp, {})
                elif key in ("deliberate", "pending"):
                    v[key].append(_unesc(val))
            return DirsRecord(since=v["since"], upper=v["upper"], dirs=v["dirs"],
                              window=v["window"], whiteout_dirs=v["whiteout_dirs"],
                              deliberate=tuple(v["deliberate"]), pending=tuple(v["pending"]),
                              base=v["base"], closed=v["closed"],
                              drop_whiteouts=v["drop_whiteouts"], clean=v["clean"])
        except (KeyError, ValueError):
            return None


def _esc(p: str) -> str:
    return p.replace("\\", "\\\\").replace("\n", "\\n")


def _unesc(p: str) -> str:
    if "\\" not in p:
        return p
    out, i = [], 0
    while i < len(p):
        if p[i] == "\\" and i + 1 < len(p):
            out.append("\n" if p[i + 1] == "n" else p[i + 1])
            i += 2
        else:
            out.append(p[i])
            i += 1
    return "".join(out)


def _tree_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The leaves' paths of TREE (each leaf names its ancestors too), sorted."""
    out: list[str] = []
    for name in sorted(tree):
        rel = f"{prefix}/{name}" if prefix else name
        sub = tree[name]
        out += _tree_paths(sub, rel) if sub else [rel]
    return out


def load_dirs(root: str, cls_name: str, hierarchy: str) -> DirsRecord | None:
    try:
        with open(state_path(root, cls_name, hierarchy, ".dirs"), encoding="utf-8",
                  errors="surrogateescape") as f:
            return DirsRecord.from_text(f.read())
    except OSError:
        return None


def save_dirs(root: str, cls_name: str, hierarchy: str, rec: DirsRecord) -> None:
    """Write REC, with an fsync unless the file on disk differs only in `since`: the usual
    boot, which merges the lower directories of the last one. A power cut may then lose the
    write and leave the record of that earlier merge, which tells hygiene the same (`since`
    is trusted only against a live merge, and a power cut ends it)."""
    path = state_path(root, cls_name, hierarchy, ".dirs")
    text = rec.to_text()
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            old = f.read(len(text) + 64)
    except OSError:
        old = ""
    atomic_write(path, text, sync=_but_since(old) != _but_since(text))


def _but_since(text: str) -> list[str]:
    """The lines of a DirsRecord's text but its `since` line (the second)."""
    lines = text.split("\n")
    return lines[:1] + lines[2:] if len(lines) > 1 and lines[1].startswith("since ") else lines


# ---------------------------------------------------------------------------------------------
# Journals


def journal_path(root: str, name: str) -> str:
    """Marks a merge under way: left behind only by a process that was killed."""
    return os.path.join(root, RUN_DIR, f"{name}.merging")


def write_journal(path: str) -> None:
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")


def drop_journal(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Overlays detached while still in use


DETACHED = f"{RUN_DIR}/detached.json"


def note_detached(root: str, cls_name: str, hierarchy: str, dev: int) -> None:
    """Remember an overlay that was detached while processes still used it."""
    path = os.path.join(root, DETACHED)
    items = _read_list(path)
    items.append({"class": cls_name, "hierarchy": hierarchy, "dev": dev,
                  "since": int(os.stat(os.path.dirname(path)).st_mtime)})
    atomic_write(path, dumps(items), sync=False)


def _read_list(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            items = loads(f.read())
    except (OSError, ValueError):
        return []
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def detached_alive(root: str, cls_name: str, hierarchy: str) -> list[dict[str, Any]]:
    """Detached overlays of HIERARCHY that processes still use (pruned as they go away)."""
    path = os.path.join(root, DETACHED)
    items = _read_list(path)
    if not items:
        return []
    from overlayctl import busy
    alive: list[dict[str, Any]] = []
    keep: list[dict[str, Any]] = []
    for it in items:
        users = busy.users_of_dev(int(it.get("dev", -1)))
        if not users:
            continue
        keep.append(it)
        if it.get("class") == cls_name and it.get("hierarchy") == hierarchy:
            alive.append({"dev": f"{os.major(it['dev'])}:{os.minor(it['dev'])}",
                          "processes": [{"pid": pid, "name": name} for pid, name in users]})
    if len(keep) != len(items):
        try:
            atomic_write(path, dumps(keep), sync=False)
        except OSError:
            pass
    return alive
