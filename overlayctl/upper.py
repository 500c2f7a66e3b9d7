"""Reading a raw upper layer against the layers below it: which entries are local changes
(diff), which layer provides a path (which), and the offline edits reset, pin and cleanup
make. Never reads through an overlay: callers pass the raw upper and the lower layers."""

from __future__ import annotations

import os
import stat

from overlayctl.record import Record

OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Iterator

    from overlayctl.vocab import ChangeKind


class LayerRef(Record):
    __slots__ = ("role", "path", "name")
    role: str            # import, extension, base, defaults
    path: str            # host path of the layer's root
    name: str | None

    def __init__(self, role: str, path: str, name: str | None = None) -> None:
        self._fill(locals())


class Entry(Record):
    __slots__ = ("layer", "path", "st")
    layer: LayerRef
    path: str            # host path of the entry
    st: os.stat_result

    def __init__(self, layer: LayerRef, path: str, st: os.stat_result) -> None:
        # One per entry of every lower directory walked: set directly, not with _fill.
        _set(self, "layer", layer)
        _set(self, "path", path)
        _set(self, "st", st)


_set = object.__setattr__


LowerDirs = list[tuple[LayerRef, str]]


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


def redirect_of(path: str) -> str | None:
    """Where a renamed directory's lower content is (trusted.overlay.redirect): an absolute
    path from the layers' root, or a name in the same parent directory."""
    v = overlay_xattr(path, "redirect")
    return os.fsdecode(v) if v else None


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _dirs_at(layers: list[LayerRef], parts: list[str]) -> LowerDirs:
    """The layers' directories that make up the lower directory PARTS (top to bottom)."""
    dirs: LowerDirs = [(layer, layer.path) for layer in layers if os.path.isdir(layer.path)]
    for comp in parts:
        dirs = lower_children(dirs, only=comp)[1].get(comp, [])
        if not dirs:
            break
    return dirs


def lower_entry(layers: list[LayerRef], rel: str) -> Entry | None:
    """What the lower layers (top to bottom) show at REL, by the rules of lower_children."""
    parts = [p for p in rel.split("/") if p]
    if not parts:
        for layer in layers:
            st = lstat_or_none(layer.path)
            if st is not None:
                return Entry(layer, layer.path, st)
        return None
    dirs = _dirs_at(layers, parts[:-1])
    return lower_children(dirs, only=parts[-1])[0].get(parts[-1]) if dirs else None


def lower_names(layers: list[LayerRef], rel: str) -> set[str]:
    """Names the lower layers show in directory REL."""
    dirs = _dirs_at(layers, [p for p in rel.split("/") if p])
    return set(lower_children(dirs)[0]) if dirs else set()


def user_xattrs(path: str, ignore: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """PATH's xattrs (not followed through a symlink) but overlayfs's own and IGNORE; an
    attribute that vanishes while it is read is left out."""
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if n.startswith(OVERLAY_XATTR_PREFIXES) or n in ignore:
            continue
        v = _xattr(path, n)
        if v is not None:
            out[n] = v
    return out


def _same_bytes(a: str, b: str, size: int) -> bool:
    """Whether regular files A and B, both SIZE bytes long, hold the same bytes (read
    without touching their atimes: comparing must change neither)."""
    fa = open_noatime(a)
    try:
        fb = open_noatime(b)
        try:
            if size > _CHUNK:
                while True:
                    x, y = os.read(fa, _CHUNK), os.read(fb, _CHUNK)
                    if x != y:
                        return False
                    if not x:
                        return True
            # The common case, a small file: one read each (one byte more, to see the end).
            return os.read(fa, size + 1) == os.read(fb, size + 1)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


_CHUNK = 1 << 16


def same_entry(a: str, sa: os.stat_result, b: str, sb: os.stat_result,
               ignore: frozenset[str] = frozenset()) -> bool:
    """Equal in content, mode, owner and xattrs (overlay's own and IGNORE excluded); mtime
    ignored."""
    ma, mb = sa.st_mode, sb.st_mode
    fmt = ma & _IFMT
    if fmt != mb & _IFMT or sa.st_uid != sb.st_uid or sa.st_gid != sb.st_gid:
        return False
    if fmt != _IFLNK and ma & 0o7777 != mb & 0o7777:
        return False
    if fmt == _IFREG:
        if sa.st_size != sb.st_size or not _same_bytes(a, b, sa.st_size):
            return False
    elif fmt == _IFLNK:
        if os.readlink(a) != os.readlink(b):
            return False
    elif fmt in (_IFCHR, _IFBLK) and sa.st_rdev != sb.st_rdev:
        return False
    return user_xattrs(a, ignore) == user_xattrs(b, ignore)


def open_noatime(path: str) -> int:
    """A read-only fd of PATH that reading through leaves the atime alone (O_NOATIME needs
    the owner or CAP_FOWNER; without it, a plain open): comparing an upper with the layers
    below must not change either."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        return os.open(path, flags)


def _same_content(a: str, b: str) -> bool:
    with open(open_noatime(a), "rb") as fa, open(open_noatime(b), "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 16), fb.read(1 << 16)
            if ca != cb:
                return False
            if not ca:
                return True


def digest(path: str, st: os.stat_result | None = None) -> str:
    """A fingerprint of an entry's content and metadata (for default_changed)."""
    import hashlib
    st = st or os.lstat(path)
    h = hashlib.sha256()
    h.update(f"{stat.S_IFMT(st.st_mode)}:{stat.S_IMODE(st.st_mode)}:{st.st_uid}:{st.st_gid}"
             .encode())
    if stat.S_ISREG(st.st_mode):
        with open(open_noatime(path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                h.update(chunk)
    elif stat.S_ISLNK(st.st_mode):
        h.update(os.fsencode(os.readlink(path)))
    for k, v in sorted(user_xattrs(path).items()):
        h.update(k.encode() + b"=" + v)
    return h.hexdigest()


class Change:
    __slots__ = ("rel", "change", "lower", "origin")

    def __init__(self, rel: str, change: ChangeKind, lower: Entry | None,
                 origin: str | None = None) -> None:
        self.rel = rel
        self.change = change
        self.lower = lower
        self.origin = origin    # renamed: the path it was renamed from (in the layers below)

    def __repr__(self) -> str:
        return f"Change({self.rel!r}, {self.change!r}, {self.lower!r}, {self.origin!r})"

    def as_json(self, hierarchy: str) -> dict[str, object]:
        j: dict[str, object] = {
            "path": f"{hierarchy}/{self.rel}" if not hierarchy.endswith("/") else
            hierarchy + self.rel,
            "change": self.change,
            "layer": self.lower.layer.role if self.lower else None,
            "extension": self.lower.layer.name if self.lower else None,
        }
        if self.origin is not None:
            j["from"] = os.path.join(hierarchy, self.origin)
        return j


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


def _listing(d: str, only: str | None) -> list[tuple[str, str, os.stat_result]]:
    """(name, path, lstat) of the entries of directory D (with ONLY, of that name only)."""
    if only is not None:
        p = os.path.join(d, only)
        try:
            return [(only, p, os.lstat(p))]
        except OSError:
            return []
    out = []
    try:
        with os.scandir(d) as it:
            for e in it:
                try:
                    out.append((e.name, e.path, e.stat(follow_symlinks=False)))
                except OSError:
                    continue
    except OSError:
        return []
    return out


def lower_children(dirs: LowerDirs, only: str | None = None
                   ) -> tuple[dict[str, Entry], dict[str, LowerDirs]]:
    """What the lower layers show in one directory, given that directory in each layer that
    contributes (top to bottom): name -> topmost entry, and for subdirectories the layers
    that contribute to them (overlayfs rules: whiteouts, opaque dirs and non-directories
    hide what is below them). Each lower directory is listed once; with ONLY, just that
    name is looked up."""
    seen: dict[str, Entry] = {}
    subdirs: dict[str, LowerDirs] = {}
    closed: set[str] = set()
    for layer, d in dirs:
        for n, p, st in _listing(d, only):
            if n in closed:
                continue
            isdir = stat.S_ISDIR(st.st_mode)
            if n not in seen:
                if is_whiteout(p, st):
                    closed.add(n)
                    continue
                seen[n] = Entry(layer, p, st)
                if isdir:
                    subdirs[n] = [(layer, p)]
                    if is_opaque(p):
                        closed.add(n)
                else:
                    closed.add(n)
            elif isdir and not is_whiteout(p, st):
                subdirs[n].append((layer, p))
                if is_opaque(p):
                    closed.add(n)
            else:
                closed.add(n)
    return seen, subdirs


def merged_lower(layers: list[LayerRef], rel: str = "",
                 dirs: LowerDirs | None = None) -> Iterator[tuple[str, Entry]]:
    """Every entry the lower layers show, parents first, in one walk."""
    if dirs is None:
        dirs = [(layer, layer.path) for layer in layers if os.path.isdir(layer.path)]
    seen, subdirs = lower_children(dirs)
    for n in sorted(seen):
        r = os.path.join(rel, n)
        yield r, seen[n]
        if n in subdirs:
            yield from merged_lower(layers, r, subdirs[n])


def classify(upper: str, layers: list[LayerRef], rels: list[str] | None = None,
             ignore_xattrs: frozenset[str] = frozenset(),
             lower_only: bool = False) -> list[Change]:
    """Every entry of the raw upper that is a change against the layers below, sorted by
    path (iter_changes, as a list)."""
    return list(iter_changes(upper, layers, rels, ignore_xattrs, lower_only))


def iter_changes(upper: str, layers: list[LayerRef], rels: list[str] | None = None,
                 ignore_xattrs: frozenset[str] = frozenset(),
                 lower_only: bool = False) -> Iterator[Change]:
    """The changes of classify(), one at a time and already in sorted order (so a caller
    can print each as it comes). Walks the upper and the lower layers side by side, so each
    directory is listed once. RELS: only below these paths. Xattrs named in IGNORE_XATTRS
    do not count as a difference. LOWER_ONLY (the upper is the real hierarchy, with no
    defaults below it): only what touches the lower layers, i.e. upper entries over a lower
    one, whiteouts and opaque directories hiding lower content; the upper's own files are
    the system, not changes, and are not walked."""
    roots = [(layer, layer.path) for layer in layers if os.path.isdir(layer.path)]

    def wanted(rel: str) -> bool:
        assert rels
        return any(rel == r or rel.startswith(r.rstrip("/") + "/")
                   or r.startswith(rel + "/") for r in rels)

    def in_scope(rel: str) -> bool:
        assert rels
        return any(rel == r or rel.startswith(r.rstrip("/") + "/") for r in rels)

    # One frame per directory being walked (no recursion: each change is yielded straight
    # from here): its path, what the lower layers show in it, and its entries in order.
    def frame(rel_dir: str, lower: LowerDirs | None) -> _Frame:
        entries = _listing(os.path.join(upper, rel_dir), None)
        below, subdirs = lower_children(lower) if lower else ({}, {})
        # Sorted as whole paths sort: a directory's entries come where "name/" sorts among
        # its siblings ("a", "a.conf", "a/b"), so no list of changes needs sorting.
        order: list[tuple[str, str, str, os.stat_result | None]] = []
        for n, p, est in entries:
            order.append((n, n, p, est))
            if est.st_mode & _IFMT == _IFDIR:
                order.append((n + "/", n, p, None))
        order.sort(key=_first)
        return rel_dir, lower, below, subdirs, {}, iter(order)

    frames = [frame("", roots)]
    while frames:
        rel_dir, lower, below, subdirs, below_dir, items = frames[-1]
        for _, n, p, st in items:
            if st is None:      # the entries below directory n, if it is walked
                if n in below_dir:
                    frames.append(frame(*below_dir.pop(n)))
                    break
                continue
            rel = f"{rel_dir}/{n}" if rel_dir else n
            if rels and not wanted(rel):
                continue
            low = below.get(n)
            if lower_only and low is None and not _lower_relevant(p):
                continue
            scope = not rels or in_scope(rel)
            fmt = st.st_mode & _IFMT
            if (fmt == _IFCHR and st.st_rdev == 0) or (fmt == _IFREG and st.st_size == 0
                                                       and is_whiteout(p, st)):
                if scope:
                    yield Change(rel, "deleted" if low else "orphan-whiteout", low)
                continue
            if fmt == _IFDIR:
                opaque = is_opaque(p)
                r = redirect_of(p) if not opaque else None
                if r is not None:
                    # A renamed directory: its lower content is where it came from.
                    sub = _redirected(layers, lower or [], r)
                    origin = (r.strip("/") if r.startswith("/")
                              else os.path.join(rel_dir, r))
                    if scope:
                        yield Change(rel, "renamed", low, origin)
                    below_dir[n] = (rel, sub or None)
                    continue
                if scope:
                    change = _change_of(p, st, low, opaque, subdirs.get(n), ignore_xattrs)
                    if change and not (lower_only and change == "added"):
                        yield Change(rel, change, low)
                # Below an opaque upper directory nothing of the lower layers shows through.
                below_dir[n] = (rel, None if opaque or low is None else subdirs.get(n))
            elif scope:
                change = _change_of(p, st, low, False, None, ignore_xattrs)
                if change and not (lower_only and change == "added"):
                    yield Change(rel, change, low)
        else:
            frames.pop()


_IFMT, _IFDIR, _IFREG, _IFCHR, _IFBLK, _IFLNK = (0o170000, stat.S_IFDIR, stat.S_IFREG,
                                                 stat.S_IFCHR, stat.S_IFBLK, stat.S_IFLNK)
if TYPE_CHECKING:
    # A directory being walked: its path, the lower directories that make it up, what they
    # show, their subdirectories, the directories below it still to walk, its entries in order.
    _Frame = tuple[str, LowerDirs | None, dict[str, Entry], dict[str, LowerDirs],
                   dict[str, tuple[str, LowerDirs | None]],
                   Iterator[tuple[str, str, str, os.stat_result | None]]]


def _first(t: tuple[str, str, str, os.stat_result | None]) -> str:
    return t[0]


def _lower_relevant(p: str) -> bool:
    """An upper entry with nothing below it that still concerns the layers below: a
    whiteout (an orphan one) or a renamed directory (its content comes from below)."""
    try:
        st = os.lstat(p)
    except OSError:
        return False
    if is_whiteout(p, st):
        return True
    return stat.S_ISDIR(st.st_mode) and redirect_of(p) is not None


def _change_of(p: str, st: os.stat_result, low: Entry | None, opaque: bool,
               lower_dirs: LowerDirs | None,
               ignore: frozenset[str] = frozenset()) -> ChangeKind | None:
    if low is None:
        return "added"
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(low.st.st_mode):
        return "type-changed"
    if stat.S_ISDIR(st.st_mode):
        if opaque and lower_dirs and lower_children(lower_dirs)[0]:
            return "opaque"
        return None if same_entry(p, st, low.path, low.st, ignore) else "modified"
    return "identical" if same_entry(p, st, low.path, low.st, ignore) else "modified"


class UpperLookup:
    """REL in the raw upper, resolved one component at a time without following a symlink
    (so nothing outside the layer is ever reached): the entry if the upper has one, and the
    ancestor that hides the lower layers at REL (an opaque directory, or a whiteout, symlink
    or other non-directory, which also hides the upper below it), if any."""

    __slots__ = ("path", "st", "hidden_by", "blocked_by")

    def __init__(self, path: str | None, st: os.stat_result | None, hidden_by: str | None,
                 blocked_by: str | None) -> None:
        self.path = path
        self.st = st
        self.hidden_by = hidden_by      # an ancestor that hides the lower layers at REL
        self.blocked_by = blocked_by    # an ancestor that is no directory: REL does not exist

    @property
    def blocker(self) -> str | None:
        return self.blocked_by or self.hidden_by


def upper_lookup(upper: str, rel: str) -> UpperLookup:
    parts = [p for p in rel.split("/") if p]
    p = upper
    hidden: str | None = None
    for i, comp in enumerate(parts):
        p = os.path.join(p, comp)
        st = lstat_or_none(p)
        here = "/".join(parts[:i + 1])
        if st is None:
            return UpperLookup(None, None, hidden, None)
        if i == len(parts) - 1:
            return UpperLookup(p, st, hidden, None)
        if is_whiteout(p, st) or not stat.S_ISDIR(st.st_mode):
            return UpperLookup(None, None, hidden, here)
        if is_opaque(p) and hidden is None:
            hidden = here
    return UpperLookup(upper, lstat_or_none(upper), None, None)


def upper_blocker(upper: str, rel: str) -> str | None:
    """An ancestor of REL in the upper that hides the lower entry (opaque dir, whiteout or
    non-directory), if any."""
    return upper_lookup(upper, rel).blocker


def lower_dirs_below(upper: str | None, layers: list[LayerRef], parts: list[str]) -> LowerDirs:
    """The lower directories that make up directory PARTS as the overlay shows it: the
    upper's renamed directories (redirects) point elsewhere in the layers below, its opaque
    directories and non-directories hide them."""
    dirs: LowerDirs = [(layer, layer.path) for layer in layers if os.path.isdir(layer.path)]
    up = upper
    for comp in parts:
        parent_dirs = dirs
        dirs = lower_children(parent_dirs, only=comp)[1].get(comp, []) if parent_dirs else []
        if up is None:
            continue
        up = os.path.join(up, comp)
        st = lstat_or_none(up)
        if st is None:
            up = None
        elif is_whiteout(up, st) or not stat.S_ISDIR(st.st_mode) or is_opaque(up):
            return []
        else:
            r = redirect_of(up)
            if r is not None:
                dirs = _redirected(layers, parent_dirs, r)
    return dirs


def redirected_dirs(layers: list[LayerRef], parent_dirs: LowerDirs, r: str) -> LowerDirs:
    """The lower directories a renamed directory (redirect R) draws its content from: an
    absolute R from the layers' root, a relative one among PARENT_DIRS (its parent's)."""
    return _redirected(layers, parent_dirs, r)


def _redirected(layers: list[LayerRef], parent_dirs: LowerDirs, r: str) -> LowerDirs:
    if r.startswith("/"):
        return _dirs_at(layers, [p for p in r.split("/") if p])
    return lower_children(parent_dirs, only=r)[1].get(r, []) if parent_dirs else []


def visible_lower(upper: str | None, layers: list[LayerRef], rel: str) -> Entry | None:
    """What the layers below the upper show at REL, as the overlay combines them (renamed
    ancestors followed). A directory renamed to REL itself does not count: this is what REL
    would show without the upper's own entry there."""
    parts = [p for p in rel.split("/") if p]
    if not parts:
        return lower_entry(layers, "")
    dirs = lower_dirs_below(upper, layers, parts[:-1])
    return lower_children(dirs, only=parts[-1])[0].get(parts[-1]) if dirs else None


def redirects(upper: str) -> dict[str, str]:
    """rel -> origin (rel) of every renamed directory in the upper."""
    out: dict[str, str] = {}
    for rel, p, st in walk_upper(upper):
        if stat.S_ISDIR(st.st_mode):
            r = redirect_of(p)
            if r is not None:
                out[rel] = r.strip("/") if r.startswith("/") else os.path.join(
                    os.path.dirname(rel), r)
    return out


def remove(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        import shutil
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
        import shutil
        shutil.copyfile(src.path, dst, follow_symlinks=False)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
    _copy_meta(src.path, st, dst)


def _copy_meta(src: str, st: os.stat_result, dst: str) -> None:
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for k, v in user_xattrs(src).items():
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
