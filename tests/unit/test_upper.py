"""overlayctl/upper.py: reading a raw upper against the lower layers, without any mount.
Layers are plain directories under tmp_path; overlay markers are set as xattrs. The
user.overlay.* forms need no privileges; trusted.overlay.* and 0/0 character-device
whiteouts need root and are skipped otherwise."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from overlayctl.upper import (
    LayerRef,
    classify,
    copy_up,
    digest,
    is_opaque,
    is_whiteout,
    lower_entry,
    lower_names,
    same_entry,
    upper_blocker,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="trusted.* xattrs and mknod need root")


def _xattrs_work(p: Path) -> bool:
    probe = p / ".xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    if not _xattrs_work(tmp_path):
        pytest.skip("the file system of tmp_path has no user xattrs")
    return tmp_path


def mk(base: Path, files: dict[str, str]) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return base


def whiteout(p: Path, kind: str) -> None:
    """A whiteout at P: 'chr' (what the kernel makes) or 'xattr' (zero-size file)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    if kind == "chr":
        os.mknod(p, stat.S_IFCHR | 0o000, 0)
    else:
        p.write_text("")
        os.setxattr(p, "user.overlay.whiteout", b"")


def make_opaque(p: Path, prefix: str = "user", value: bytes = b"y") -> None:
    p.mkdir(parents=True, exist_ok=True)
    os.setxattr(p, f"{prefix}.overlay.opaque", value)


def layers(*paths: Path, roles: tuple[str, ...] | None = None) -> list[LayerRef]:
    roles = roles or (*("extension" for _ in paths[:-1]), "defaults")
    return [LayerRef(r, str(p), f"e{i}" if r == "extension" else None)
            for i, (r, p) in enumerate(zip(roles, paths, strict=True))]


def text_of(e: object) -> str:
    assert e is not None
    return Path(e.path).read_text()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# markers


WHITEOUT_KINDS = [pytest.param("chr", marks=needs_root), "xattr"]


@pytest.mark.parametrize("kind", WHITEOUT_KINDS)
def test_is_whiteout(tree: Path, kind: str) -> None:
    p = tree / "w"
    whiteout(p, kind)
    assert is_whiteout(str(p), os.lstat(p))


def test_not_whiteouts(tree: Path) -> None:
    empty = tree / "empty"
    empty.write_text("")
    assert not is_whiteout(str(empty), os.lstat(empty))
    data = tree / "data"
    data.write_text("x")
    os.setxattr(data, "user.overlay.whiteout", b"")
    assert not is_whiteout(str(data), os.lstat(data)), "a whiteout file has no content"


@needs_root
def test_char_device_other_than_0_0_is_no_whiteout(tree: Path) -> None:
    p = tree / "null"
    os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert not is_whiteout(str(p), os.lstat(p))


@pytest.mark.parametrize("prefix", [pytest.param("trusted", marks=needs_root), "user"])
def test_is_opaque(tree: Path, prefix: str) -> None:
    d = tree / "d"
    make_opaque(d, prefix)
    assert is_opaque(str(d))
    plain = tree / "plain"
    plain.mkdir()
    assert not is_opaque(str(plain))
    os.setxattr(plain, f"{prefix}.overlay.opaque", b"n")
    assert not is_opaque(str(plain))


def test_opaque_x_is_a_merge_directory(tree: Path) -> None:
    top = mk(tree / "top", {"d/b": "b"})
    bottom = mk(tree / "bottom", {"d/a": "a"})
    os.setxattr(top / "d", "user.overlay.opaque", b"x")
    assert not is_opaque(str(top / "d"))
    assert text_of(lower_entry(layers(top, bottom), "d/a")) == "a"


# ---------------------------------------------------------------------------------------------
# lower_entry and lower_names


def test_lower_entry_topmost_wins(tree: Path) -> None:
    ext = mk(tree / "ext", {"both": "ext", "only-ext": "E"})
    dfl = mk(tree / "dfl", {"both": "default", "only-default": "D", "dir/f": "f"})
    ls = layers(ext, dfl)
    e = lower_entry(ls, "both")
    assert e is not None and e.layer.role == "extension" and e.layer.name == "e0"
    assert text_of(e) == "ext"
    e = lower_entry(ls, "only-default")
    assert e is not None and e.layer.role == "defaults" and text_of(e) == "D"
    assert lower_entry(ls, "dir/f") is not None
    assert lower_entry(ls, "missing") is None
    assert lower_entry(ls, "dir/missing") is None
    assert lower_entry(ls, "missing/deeper") is None
    root = lower_entry(ls, "")
    assert root is not None and root.path == str(ext)


@pytest.mark.parametrize("kind", WHITEOUT_KINDS)
def test_lower_entry_whiteout_hides_below(tree: Path, kind: str) -> None:
    ext = mk(tree / "ext", {"keep": "k"})
    whiteout(ext / "gone", kind)
    whiteout(ext / "dir", kind)
    dfl = mk(tree / "dfl", {"gone": "g", "dir/f": "f", "keep": "default"})
    ls = layers(ext, dfl)
    assert lower_entry(ls, "gone") is None
    assert lower_entry(ls, "dir") is None
    assert lower_entry(ls, "dir/f") is None
    assert text_of(lower_entry(ls, "keep")) == "k"


@pytest.mark.parametrize("prefix", [pytest.param("trusted", marks=needs_root), "user"])
def test_lower_entry_opaque_dir_hides_layers_below(tree: Path, prefix: str) -> None:
    ext = mk(tree / "ext", {"d/own": "o", "d/sub/x": "x"})
    make_opaque(ext / "d", prefix)
    mid = mk(tree / "mid", {"d/mid-only": "m", "e/f": "ef"})
    dfl = mk(tree / "dfl", {"d/hidden": "h", "d/sub/y": "y", "e/g": "eg"})
    ls = layers(ext, mid, dfl)
    d = lower_entry(ls, "d")
    assert d is not None and d.path == str(ext / "d")
    assert text_of(lower_entry(ls, "d/own")) == "o"
    assert lower_entry(ls, "d/mid-only") is None
    assert lower_entry(ls, "d/hidden") is None
    # Below an opaque directory a non-opaque subdirectory still hides the layers below.
    assert lower_entry(ls, "d/sub/y") is None
    assert text_of(lower_entry(ls, "d/sub/x")) == "x"
    # A directory without the marker merges.
    assert text_of(lower_entry(ls, "e/f")) == "ef"
    assert text_of(lower_entry(ls, "e/g")) == "eg"
    assert lower_names(ls, "d") == {"own", "sub"}
    assert lower_names(ls, "e") == {"f", "g"}


def test_lower_entry_opaque_in_middle_layer(tree: Path) -> None:
    top = mk(tree / "top", {"d/t": "t"})
    mid = mk(tree / "mid", {"d/m": "m"})
    make_opaque(mid / "d")
    bottom = mk(tree / "bottom", {"d/b": "b"})
    ls = layers(top, mid, bottom)
    assert text_of(lower_entry(ls, "d/t")) == "t"
    assert text_of(lower_entry(ls, "d/m")) == "m"
    assert lower_entry(ls, "d/b") is None
    assert lower_names(ls, "d") == {"t", "m"}


def test_lower_entry_non_directory_hides_below(tree: Path) -> None:
    ext = mk(tree / "ext", {"d": "a file where the default has a directory"})
    (ext / "link").symlink_to("d")
    dfl = mk(tree / "dfl", {"d/f": "f", "link/f": "lf"})
    ls = layers(ext, dfl)
    e = lower_entry(ls, "d")
    assert e is not None and stat.S_ISREG(e.st.st_mode)
    assert lower_entry(ls, "d/f") is None
    e = lower_entry(ls, "link")
    assert e is not None and stat.S_ISLNK(e.st.st_mode)
    assert lower_entry(ls, "link/f") is None
    assert lower_names(ls, "d") == set()


def test_lower_names_skips_whiteouts(tree: Path) -> None:
    ext = mk(tree / "ext", {"d/a": "a"})
    whiteout(ext / "d/b", "xattr")
    dfl = mk(tree / "dfl", {"d/b": "b", "d/c": "c"})
    assert lower_names(layers(ext, dfl), "d") == {"a", "c"}
    assert lower_names(layers(ext, dfl), "missing") == set()


# ---------------------------------------------------------------------------------------------
# same_entry and digest


def two(tree: Path, a: str = "same\n", b: str = "same\n") -> tuple[Path, Path]:
    pa, pb = tree / "a", tree / "b"
    pa.write_text(a)
    pb.write_text(b)
    os.chmod(pa, 0o644)
    os.chmod(pb, 0o644)
    return pa, pb


def same(pa: Path, pb: Path) -> bool:
    return same_entry(str(pa), os.lstat(pa), str(pb), os.lstat(pb))


def test_same_entry_ignores_mtime_and_atime(tree: Path) -> None:
    pa, pb = two(tree)
    os.utime(pa, (1, 1))
    os.utime(pb, ns=(2_000_000_000_123, 3_000_000_000_456))
    assert same(pa, pb)
    assert digest(str(pa)) == digest(str(pb))


def test_same_entry_content(tree: Path) -> None:
    pa, pb = two(tree, "one\n", "two\n")          # same size, other bytes
    assert not same(pa, pb)
    assert digest(str(pa)) != digest(str(pb))
    pa.write_text("longer\n")
    assert not same(pa, pb)


def test_same_entry_mode(tree: Path) -> None:
    pa, pb = two(tree)
    os.chmod(pb, 0o600)
    assert not same(pa, pb)
    assert digest(str(pa)) != digest(str(pb))


@needs_root
def test_same_entry_owner(tree: Path) -> None:
    pa, pb = two(tree)
    os.chown(pb, 1, 1)
    assert not same(pa, pb)
    assert digest(str(pa)) != digest(str(pb))


def test_same_entry_xattrs_but_not_overlay_ones(tree: Path) -> None:
    pa, pb = two(tree)
    os.setxattr(pb, "user.overlay.origin", b"whatever")
    assert same(pa, pb), "overlay's own xattrs are no difference"
    os.setxattr(pb, "user.comment", b"mine")
    assert not same(pa, pb)
    assert digest(str(pa)) != digest(str(pb))
    os.setxattr(pa, "user.comment", b"mine")
    assert same(pa, pb)


def test_same_entry_type_and_symlinks(tree: Path) -> None:
    f = tree / "f"
    f.write_text("x")
    d = tree / "d"
    d.mkdir()
    la, lb, lc = tree / "la", tree / "lb", tree / "lc"
    la.symlink_to("target")
    lb.symlink_to("target")
    lc.symlink_to("other")
    assert not same(f, d)
    assert not same(f, la)
    assert same(la, lb)
    assert not same(la, lc)
    assert digest(str(la)) != digest(str(lc))


def test_same_entry_directories(tree: Path) -> None:
    a, b = tree / "da", tree / "db"
    a.mkdir(mode=0o755)
    b.mkdir(mode=0o755)
    os.chmod(a, 0o755)
    os.chmod(b, 0o755)
    (b / "child").write_text("children are compared on their own")
    assert same(a, b)
    os.chmod(b, 0o700)
    assert not same(a, b)


# ---------------------------------------------------------------------------------------------
# classify


def test_classify_every_kind(tree: Path) -> None:
    ext = mk(tree / "ext", {"ext.conf": "ext\n"})
    dfl = mk(tree / "dfl", {
        "modified": "default\n", "mode": "m\n", "xattr": "x\n", "identical": "same\n",
        "deleted": "d\n", "typechg": "t\n", "dir/a": "a", "dir/b": "b", "plain/f": "f",
        "dirmode/f": "f",
    })
    for p in (dfl / "mode", dfl / "xattr", dfl / "identical", dfl / "modified"):
        os.chmod(p, 0o644)
    for p in (dfl / "plain", dfl / "dirmode"):
        os.chmod(p, 0o755)
    up = mk(tree / "upper", {
        "added": "new\n", "modified": "mine\n", "mode": "m\n", "xattr": "x\n",
        "identical": "same\n", "ext.conf": "mine\n", "dir/own": "o", "plain/g": "g",
    })
    for p in (up / "mode", up / "xattr", up / "identical", up / "modified"):
        os.chmod(p, 0o644)
    os.chmod(up / "mode", 0o600)
    os.setxattr(up / "xattr", "user.comment", b"mine")
    os.utime(up / "identical", (1, 1))
    whiteout(up / "deleted", "xattr")
    whiteout(up / "nothing-below", "xattr")
    (up / "typechg").symlink_to("modified")
    os.setxattr(up / "dir", "user.overlay.opaque", b"y")
    os.chmod(up / "plain", 0o755)
    (up / "dirmode").mkdir(mode=0o700)
    os.chmod(up / "dirmode", 0o700)
    ls = layers(ext, dfl)

    got = {c.rel: (c.change, c.lower.layer.role if c.lower else None)
           for c in classify(str(up), ls)}
    assert got == {
        "added": ("added", None),
        "modified": ("modified", "defaults"),
        "mode": ("modified", "defaults"),
        "xattr": ("modified", "defaults"),
        "identical": ("identical", "defaults"),
        "deleted": ("deleted", "defaults"),
        "nothing-below": ("orphan-whiteout", None),
        "typechg": ("type-changed", "defaults"),
        "ext.conf": ("modified", "extension"),
        "dir": ("opaque", "defaults"),
        "dir/own": ("added", None),
        "plain/g": ("added", None),
        "dirmode": ("modified", "defaults"),
    }
    # A plain directory equal to the one below is no change; its entries are.
    assert "plain" not in got
    # Sorted by path, and narrowed by REL prefixes (a directory takes its contents along).
    rels = [c.rel for c in classify(str(up), ls)]
    assert rels == sorted(rels)
    assert [c.rel for c in classify(str(up), ls, ["dir"])] == ["dir", "dir/own"]
    assert [c.rel for c in classify(str(up), ls, ["di"])] == []
    j = next(c for c in classify(str(up), ls) if c.rel == "ext.conf").as_json("/etc")
    assert j == {"path": "/etc/ext.conf", "change": "modified", "layer": "extension",
                 "extension": "e0"}


def test_classify_opaque_without_lower_contents_is_added_or_equal(tree: Path) -> None:
    dfl = mk(tree / "dfl", {"shown/f": "f"})
    (dfl / "empty").mkdir()
    os.chmod(dfl / "empty", 0o755)
    up = tree / "upper"
    make_opaque(up / "empty")
    os.chmod(up / "empty", 0o755)
    make_opaque(up / "brand-new")
    got = {c.rel: c.change for c in classify(str(up), layers(dfl))}
    # Opaque over an empty lower directory hides nothing: no change at all.
    assert got == {"brand-new": "added"}


def test_classify_below_opaque_upper_dir(tree: Path) -> None:
    dfl = mk(tree / "dfl", {"d/a": "a"})
    up = mk(tree / "upper", {"d/a": "a"})
    for p in (dfl / "d/a", up / "d/a"):
        os.chmod(p, 0o644)
    for p in (dfl / "d", up / "d"):
        os.chmod(p, 0o755)
    os.setxattr(up / "d", "user.overlay.opaque", b"y")
    got = {c.rel: c.change for c in classify(str(up), layers(dfl))}
    assert got == {"d": "opaque", "d/a": "added"}


def test_upper_blocker(tree: Path) -> None:
    up = tree / "upper"
    make_opaque(up / "op")
    (up / "plain/sub").mkdir(parents=True)
    whiteout(up / "gone", "xattr")
    (up / "file").write_text("x")
    assert upper_blocker(str(up), "op/x") == "op"
    assert upper_blocker(str(up), "gone/x") == "gone"
    assert upper_blocker(str(up), "file/x") == "file"
    assert upper_blocker(str(up), "plain/sub/x") is None
    assert upper_blocker(str(up), "missing/x") is None
    assert upper_blocker(str(up), "op") is None


def test_copy_up_keeps_metadata_and_parents(tree: Path) -> None:
    dfl = mk(tree / "dfl", {"a/b/f": "content\n"})
    os.chmod(dfl / "a", 0o750)
    os.chmod(dfl / "a/b", 0o711)
    os.chmod(dfl / "a/b/f", 0o640)
    os.setxattr(dfl / "a/b/f", "user.comment", b"kept")
    os.utime(dfl / "a/b/f", ns=(10**18, 10**18))
    up = tree / "upper"
    up.mkdir()
    ls = layers(dfl)
    src = lower_entry(ls, "a/b/f")
    assert src is not None
    copy_up(src, str(up), "a/b/f", ls)
    assert stat.S_IMODE(os.stat(up / "a").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(up / "a/b").st_mode) == 0o711
    assert (up / "a/b/f").read_text() == "content\n"
    assert os.getxattr(up / "a/b/f", "user.comment") == b"kept"
    assert os.stat(up / "a/b/f").st_mtime_ns == 10**18
    assert [c.change for c in classify(str(up), ls)] == ["identical"]
