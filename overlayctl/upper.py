"""Reading a raw upper layer against the layers below it: which entries are local changes
(diff), which layer provides a path (which), and the offline edits reset, pin and cleanup
make. Never reads through an overlay: callers pass the raw upper and the lower layers."""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass

OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


@dataclass(frozen=True)
class LayerRef:
    role: str            # import, extension, base, defaults
    path: str            # host path of the layer's root
    name: str | None = None


@dataclass(frozen=True)
class Entry:
    layer: LayerRef
    path: str            # host path of the entry
    st: os.stat_result


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def overlay_xattr(path: str, key: str) -> bytes | None:
    """trusted.overlay.KEY or user.overlay.KEY (userxattr mounts)."""
    for prefix in OVERLAY_XATTR_PREFIXES:
        v = _xattr(path, prefix + key)
        if v is not None:
            return v
    return None


def is_whiteout(path: str, st: os.stat_result) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    return (stat.S_ISREG(st.st_mode) and st.st_size == 0
            and overlay_xattr(path, "whiteout") is not None)


def is_opaque(path: str) -> bool:
    """'y' hides the layers below; 'x' only marks a directory holding xattr whiteouts."""
    return overlay_xattr(path, "opaque") == b"y"


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def lower_entry(layers: list[LayerRef], rel: str) -> Entry | None:
    """What the lower layers (top to bottom) show at REL, overlayfs rules: a whiteout or a
    non-directory hides everything below it, an opaque directory hides the layers below."""
    parts = [p for p in rel.split("/") if p]
    if not parts:
        for layer in layers:
            st = _lstat(layer.path)
            if st is not None:
                return Entry(layer, layer.path, st)
        return None
    for layer in layers:
        p = layer.path
        hidden_below = False
        for depth, comp in enumerate(parts):
            p = os.path.join(p, comp)
            st = _lstat(p)
            if st is None:
                break
            if is_whiteout(p, st):
                return None
            if depth == len(parts) - 1:
                return Entry(layer, p, st)
            if not stat.S_ISDIR(st.st_mode):
                return None
            if is_opaque(p):
                hidden_below = True
        if hidden_below:
            return None
    return None


def lower_names(layers: list[LayerRef], rel: str) -> set[str]:
    """Names the lower layers show in directory REL (for opaque directory reports)."""
    names: set[str] = set()
    for layer in layers:
        d = os.path.join(layer.path, rel)
        st = _lstat(d)
        if st is None or not stat.S_ISDIR(st.st_mode):
            continue
        for n in os.listdir(d):
            if lower_entry(layers, os.path.join(rel, n)) is not None:
                names.add(n)
        if is_opaque(d):
            break
    return names


def _xattrs(path: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if n.startswith(OVERLAY_XATTR_PREFIXES):
            continue
        v = _xattr(path, n)
        if v is not None:
            out[n] = v
    return out


def same_entry(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
    """Equal in content, mode, owner and xattrs (overlay's own excluded); mtime ignored."""
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        return False
    if not stat.S_ISLNK(sa.st_mode) and stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
        return False
    if stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size or not filecmp.cmp(a, b, shallow=False):
            return False
    elif stat.S_ISLNK(sa.st_mode):
        if os.readlink(a) != os.readlink(b):
            return False
    elif (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
        return False
    return _xattrs(a) == _xattrs(b)


def digest(path: str, st: os.stat_result | None = None) -> str:
    """A fingerprint of an entry's content and metadata (for default_changed)."""
    st = st or os.lstat(path)
    h = hashlib.sha256()
    h.update(f"{stat.S_IFMT(st.st_mode)}:{stat.S_IMODE(st.st_mode)}:{st.st_uid}:{st.st_gid}"
             .encode())
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                h.update(chunk)
    elif stat.S_ISLNK(st.st_mode):
        h.update(os.fsencode(os.readlink(path)))
    for k, v in sorted(_xattrs(path).items()):
        h.update(k.encode() + b"=" + v)
    return h.hexdigest()


@dataclass
class Change:
    rel: str
    change: str                 # added, modified, identical, deleted, opaque, type-changed
    lower: Entry | None

    def as_json(self, hierarchy: str) -> dict[str, object]:
        return {
            "path": os.path.join(hierarchy, self.rel),
            "change": self.change,
            "layer": self.lower.layer.role if self.lower else None,
            "extension": self.lower.layer.name if self.lower else None,
        }


def walk_upper(upper: str, rel_dir: str = "") -> Iterator[tuple[str, str, os.stat_result]]:
    """(rel, host path, lstat) of every entry below the upper, parents first, sorted."""
    try:
        names = sorted(os.listdir(os.path.join(upper, rel_dir)))
    except OSError:
        return
    for n in names:
        rel = os.path.join(rel_dir, n)
        p = os.path.join(upper, rel)
        st = os.lstat(p)
        yield rel, p, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk_upper(upper, rel)


def classify(upper: str, layers: list[LayerRef], rels: list[str] | None = None) -> list[Change]:
    """Every entry of the raw upper that is a change against the layers below."""
    changes: list[Change] = []
    for rel, p, st in walk_upper(upper):
        if rels and not any(rel == r or rel.startswith(r.rstrip("/") + "/") for r in rels):
            continue
        # Below an opaque directory (or a whiteout) of the upper nothing shows through.
        low = None if upper_blocker(upper, rel) else lower_entry(layers, rel)
        if is_whiteout(p, st):
            changes.append(Change(rel, "deleted", low))
            continue
        if low is None:
            changes.append(Change(rel, "added", None))
            continue
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(low.st.st_mode):
            changes.append(Change(rel, "type-changed", low))
            continue
        if stat.S_ISDIR(st.st_mode):
            if is_opaque(p) and lower_names(layers, rel):
                changes.append(Change(rel, "opaque", low))
            elif not same_entry(p, st, low.path, low.st):
                changes.append(Change(rel, "modified", low))
            continue
        same = same_entry(p, st, low.path, low.st)
        changes.append(Change(rel, "identical" if same else "modified", low))
    return sorted(changes, key=lambda c: c.rel)


def upper_blocker(upper: str, rel: str) -> str | None:
    """An ancestor of REL in the upper that hides the lower entry (opaque dir, whiteout or
    non-directory), if any."""
    parts = [p for p in rel.split("/") if p]
    p = upper
    for comp in parts[:-1]:
        p = os.path.join(p, comp)
        st = _lstat(p)
        if st is None:
            return None
        if not stat.S_ISDIR(st.st_mode) or is_whiteout(p, st) or is_opaque(p):
            return os.path.relpath(p, upper)
    return None


def remove(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def copy_up(src: Entry, upper: str, rel: str, layers: list[LayerRef]) -> None:
    """Copy a lower entry into the raw upper as overlayfs would: parents first with their
    lower attributes, then the entry with owner, mode, times and xattrs."""
    parts = [p for p in rel.split("/") if p]
    cur = ""
    for comp in parts[:-1]:
        cur = os.path.join(cur, comp)
        dst = os.path.join(upper, cur)
        if os.path.lexists(dst):
            continue
        low = lower_entry(layers, cur)
        os.mkdir(dst)
        if low is not None:
            _copy_meta(low.path, low.st, dst)
    dst = os.path.join(upper, rel)
    st = src.st
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src.path), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src.path, dst, follow_symlinks=False)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
    _copy_meta(src.path, st, dst)


def _copy_meta(src: str, st: os.stat_result, dst: str) -> None:
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for k, v in _xattrs(src).items():
        try:
            os.setxattr(dst, k, v, follow_symlinks=False)
        except OSError:
            pass
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def clear_opaque(path: str) -> None:
    for prefix in OVERLAY_XATTR_PREFIXES:
        try:
            os.removexattr(path, prefix + "opaque", follow_symlinks=False)
        except OSError:
            pass
