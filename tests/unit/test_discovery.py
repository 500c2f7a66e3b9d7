"""Image discovery (§3.1, §3.2): search-directory precedence, class suffixes, .v picking,
symlinks resolved inside the root, names, masking, initrd search dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlayctl import images
from overlayctl.errors import OverlayctlError
from overlayctl.images import Image, discover, read_metadata
from overlayctl.release import check_compatible
from overlayctl.settings import CLASSES, Settings


@pytest.fixture(autouse=True)
def fixed_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "uname_architecture", lambda: "x86-64")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def settings(root: Path, cls: str = "sysext", *, initrd: bool = False) -> Settings:
    c = CLASSES[cls]
    return Settings(root=str(root), cls=c, hierarchies=c.hierarchies, initrd=initrd)


def mkdir(root: Path, rel: str) -> Path:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    return p


def mkfile(root: Path, rel: str, text: str = "") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def found(root: Path, cls: str = "sysext", **kw: bool) -> dict[str, Image]:
    return {i.name: i for i in discover(settings(root, cls, **kw))}


# ---------------------------------------------------------------------------------------------
# search directories


def test_nothing(root: Path) -> None:
    assert discover(settings(root)) == []


@pytest.mark.parametrize("d", ["etc/extensions", "run/extensions", "var/lib/extensions"])
def test_each_sysext_search_dir(root: Path, d: str) -> None:
    e = mkdir(root, f"{d}/foo")
    img = found(root)["foo"]
    assert img.type == "directory"
    assert img.path == str(e)
    assert img.entry == str(e)


@pytest.mark.parametrize("d", ["usr/lib/extensions", "usr/local/lib/extensions",
                               "etc/confexts", ".extra/sysext", ".extra/global_sysext"])
def test_not_a_sysext_search_dir(root: Path, d: str) -> None:
    mkdir(root, f"{d}/foo")
    assert found(root) == {}


@pytest.mark.parametrize("d", ["run/confexts", "var/lib/confexts", "usr/local/lib/confexts",
                               "usr/lib/confexts"])
def test_each_confext_search_dir(root: Path, d: str) -> None:
    e = mkdir(root, f"{d}/foo")
    assert found(root, "confext")["foo"].path == str(e)


@pytest.mark.parametrize("d", ["etc/confexts", "etc/extensions", "var/lib/extensions"])
def test_not_a_confext_search_dir(root: Path, d: str) -> None:
    mkdir(root, f"{d}/foo")
    assert found(root, "confext") == {}


def test_precedence_etc_run_var(root: Path) -> None:
    mkdir(root, "var/lib/extensions/a")
    mkdir(root, "var/lib/extensions/b")
    mkdir(root, "var/lib/extensions/c")
    run_b = mkdir(root, "run/extensions/b")
    mkdir(root, "run/extensions/c")
    etc_c = mkdir(root, "etc/extensions/c")
    f = found(root)
    assert f["a"].path == str(root / "var/lib/extensions/a")
    assert f["b"].path == str(run_b)
    assert f["c"].path == str(etc_c)


def test_precedence_across_types(root: Path) -> None:
    raw = mkfile(root, "run/extensions/foo.raw")
    mkdir(root, "var/lib/extensions/foo")
    f = found(root)
    assert f["foo"].type == "raw" and f["foo"].path == str(raw)


def test_confext_precedence(root: Path) -> None:
    mkdir(root, "usr/lib/confexts/x")
    loc = mkdir(root, "usr/local/lib/confexts/x")
    assert found(root, "confext")["x"].path == str(loc)
    run = mkdir(root, "run/confexts/x")
    assert found(root, "confext")["x"].path == str(run)


def test_search_dir_symlink_resolved_inside_root(root: Path) -> None:
    e = mkdir(root, "srv/exts/foo")
    mkdir(root, "var/lib")
    (root / "var/lib/extensions").symlink_to("/srv/exts")
    assert found(root)["foo"].path == str(e)


def test_missing_search_dirs_are_skipped(root: Path) -> None:
    mkdir(root, "var/lib/extensions/foo")
    mkdir(root, "etc")
    (root / "etc/extensions").symlink_to("/nowhere")      # dangling: as missing
    assert set(found(root)) == {"foo"}


@pytest.mark.parametrize("kind", ["file", "loop", "fifo", "file-in-path"])
def test_search_dir_that_is_no_directory_fails(root: Path, kind: str) -> None:
    """As upstream ("Failed to discover images", exit 1): a search directory that is a file,
    a symlink loop or anything else but a directory is an error naming it, so that a typo
    does not go unnoticed."""
    mkdir(root, "var/lib/extensions/foo")
    where = "run/extensions"
    if kind == "file":
        mkfile(root, where, "not a directory")
    elif kind == "loop":
        mkdir(root, "run")
        (root / where).symlink_to("extensions")
    elif kind == "fifo":
        mkdir(root, "run")
        os.mkfifo(root / where)
    else:
        mkfile(root, "run", "a file where /run should be")
    with pytest.raises(OverlayctlError) as e:
        discover(settings(root))
    assert e.value.message.startswith("failed to discover images: ")
    assert str(root / where) in e.value.message and e.value.hint
    assert "\n" not in str(e.value)


def test_result_sorted_by_version(root: Path) -> None:
    for n in ("foo_10", "foo_9", "foo_9.1", "bar", "foo_1~rc1", "foo_1"):
        mkdir(root, f"var/lib/extensions/{n}")
    assert [i.name for i in discover(settings(root))] == [
        "bar", "foo_1~rc1", "foo_1", "foo_9", "foo_9.1", "foo_10"]


# ---------------------------------------------------------------------------------------------
# entry types and suffixes


@pytest.mark.parametrize("entry,name", [
    ("foo.raw", "foo"),
    ("foo.sysext.raw", "foo"),
    ("foo.confext.raw", "foo.confext"),      # the other class's suffix is part of the name
    ("foo_1.2.raw", "foo_1.2"),
    (".hidden.raw", ".hidden"),
])
def test_sysext_raw_names(root: Path, entry: str, name: str) -> None:
    p = mkfile(root, f"var/lib/extensions/{entry}")
    img = found(root)[name]
    assert img.type == "raw" and img.path == str(p)


@pytest.mark.parametrize("entry,name", [
    ("foo.raw", "foo"), ("foo.confext.raw", "foo"), ("foo.sysext.raw", "foo.sysext")])
def test_confext_raw_names(root: Path, entry: str, name: str) -> None:
    mkfile(root, f"var/lib/confexts/{entry}")
    assert found(root, "confext")[name].type == "raw"


@pytest.mark.parametrize("entry,name", [
    ("foo", "foo"), ("foo.sysext", "foo"), ("foo.confext", "foo.confext"),
    ("foo.raw", "foo.raw"), (".hidden", ".hidden"), ("a:b,c", "a:b,c")])
def test_sysext_directory_names(root: Path, entry: str, name: str) -> None:
    d = mkdir(root, f"var/lib/extensions/{entry}")
    img = found(root)[name]
    assert img.type == "directory" and img.path == str(d)


def test_confext_directory_suffix(root: Path) -> None:
    mkdir(root, "run/confexts/foo.confext")
    mkdir(root, "run/confexts/bar.sysext")
    assert set(found(root, "confext")) == {"foo", "bar.sysext"}


@pytest.mark.parametrize("entry", ["foo", "foo.img", "foo.raw.bak", "foo.sysext", "raw"])
def test_regular_file_without_raw_suffix_is_skipped(root: Path, entry: str) -> None:
    mkfile(root, f"var/lib/extensions/{entry}")
    assert found(root) == {}


def test_fifo_and_socket_skipped(root: Path) -> None:
    d = mkdir(root, "var/lib/extensions")
    os.mkfifo(d / "fifo.raw")
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(d / "sock.raw"))
        assert found(root) == {}
    finally:
        s.close()


def test_mtime_recorded(root: Path) -> None:
    d = mkdir(root, "var/lib/extensions/foo")
    os.utime(d, ns=(1_000_000_000_000, 1_700_000_000_123_456_789))
    assert found(root)["foo"].mtime_us == 1_700_000_000_123_456


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("entry", [".#foo", ".#foo.raw", ".#foo.lck"])
def test_names_starting_with_dot_hash_are_rejected(root: Path, entry: str) -> None:
    mkdir(root, f"var/lib/extensions/{entry}") if not entry.endswith(".raw") else mkfile(
        root, f"var/lib/extensions/{entry}")
    assert found(root) == {}


def test_control_character_name_rejected(root: Path) -> None:
    mkdir(root, "var/lib/extensions/a\tb")
    assert found(root) == {}


def test_rejected_name_does_not_shadow_later_dirs(root: Path) -> None:
    mkdir(root, "etc/extensions/.#foo")
    mkdir(root, "var/lib/extensions/.#foo")
    mkdir(root, "var/lib/extensions/foo")
    assert set(found(root)) == {"foo"}


# ---------------------------------------------------------------------------------------------
# symlinks


def test_relative_symlink(root: Path) -> None:
    target = mkdir(root, "var/othername-extension")
    mkdir(root, "var/lib/extensions")
    (root / "var/lib/extensions/test-extension").symlink_to("../../othername-extension")
    img = found(root)["test-extension"]
    assert img.type == "directory"
    assert img.path == str(target)
    assert img.entry == str(root / "var/lib/extensions/test-extension")


def test_absolute_symlink_is_relative_to_root(root: Path) -> None:
    target = mkdir(root, "var/othername-extension")
    mkdir(root, "var/lib/extensions")
    (root / "var/lib/extensions/test-extension").symlink_to("/var/othername-extension")
    assert found(root)["test-extension"].path == str(target)


def test_absolute_symlink_never_reaches_the_host(root: Path, tmp_path: Path) -> None:
    host_only = mkdir(tmp_path, "hostonly/ext")       # exists outside the root only
    mkdir(root, "var/lib/extensions")
    (root / "var/lib/extensions/x").symlink_to(str(host_only))
    assert found(root) == {}


def test_dotdot_symlink_clamped_at_root(root: Path, tmp_path: Path) -> None:
    mkdir(tmp_path, "outside")
    inside = mkdir(root, "outside")
    mkdir(root, "var/lib/extensions")
    (root / "var/lib/extensions/x").symlink_to("../../../../../../outside")
    assert found(root)["x"].path == str(inside)


def test_symlinked_raw_image_keeps_entry_name(root: Path) -> None:
    target = mkfile(root, "srv/images/othername.raw")
    mkdir(root, "var/lib/extensions")
    (root / "var/lib/extensions/test-extension.raw").symlink_to("/srv/images/othername.raw")
    img = found(root)["test-extension"]
    assert img.type == "raw" and img.path == str(target)


def test_dangling_symlinks_skipped(root: Path) -> None:
    d = mkdir(root, "var/lib/extensions")
    (d / "gone").symlink_to("/does/not/exist")
    (d / "gone2.raw").symlink_to("nothing-here.raw")
    (d / "loop").symlink_to("loop")
    mkdir(root, "var/lib/extensions/ok")
    assert set(found(root)) == {"ok"}


def test_dangling_symlink_does_not_mask(root: Path) -> None:
    mkdir(root, "etc/extensions")
    (root / "etc/extensions/foo").symlink_to("/nowhere")
    real = mkdir(root, "var/lib/extensions/foo")
    assert found(root)["foo"].path == str(real)


# ---------------------------------------------------------------------------------------------
# masking


def test_masking_by_empty_directory(root: Path) -> None:
    real = mkdir(root, "var/lib/extensions/foo")
    mkfile(root, "var/lib/extensions/foo/usr/lib/extension-release.d/extension-release.foo",
           "ID=_any\n")
    mask = mkdir(root, "etc/extensions/foo")
    s = settings(root)
    img = found(root)["foo"]
    assert img.path == str(mask)
    img = read_metadata(s, img)
    assert img.release is not None and img.release.path is None
    assert check_compatible(None, {"ID": "x"}, s.cls.info, "system", "foo") is not None
    # without the mask the real one is found and is compatible
    mask.rmdir()
    img = found(root)["foo"]
    assert img.path == str(real)
    img = read_metadata(s, img)
    assert img.release is not None and img.release.data == {"ID": "_any"}


def test_masking_a_raw_image(root: Path) -> None:
    mkfile(root, "var/lib/extensions/foo.raw")
    mask = mkdir(root, "etc/extensions/foo")
    img = found(root)["foo"]
    assert img.type == "directory" and img.path == str(mask)


def test_read_metadata_refuses_os_release_in_sysext_dir(root: Path) -> None:
    from overlayctl.errors import OverlayctlError
    mkfile(root, "var/lib/extensions/bad/usr/lib/os-release", "ID=x\n")
    with pytest.raises(OverlayctlError):
        read_metadata(settings(root), found(root)["bad"])


def test_read_metadata_allows_os_release_in_confext_dir(root: Path) -> None:
    mkfile(root, "var/lib/confexts/c/usr/lib/os-release", "ID=x\n")
    mkfile(root, "var/lib/confexts/c/etc/extension-release.d/extension-release.c", "ID=_any\n")
    img = found(root, "confext")["c"]
    img = read_metadata(settings(root, "confext"), img)
    assert img.release is not None and img.release.data == {"ID": "_any"}


# ---------------------------------------------------------------------------------------------
# initrd


def test_initrd_search_dirs(root: Path) -> None:
    a = mkdir(root, ".extra/sysext/a")
    b = mkdir(root, ".extra/global_sysext/b")
    mkdir(root, ".extra/global_sysext/a")
    assert found(root) == {}
    f = found(root, initrd=True)
    assert f["a"].path == str(a)
    assert f["b"].path == str(b)


def test_initrd_normal_dirs_still_win(root: Path) -> None:
    v = mkdir(root, "var/lib/extensions/a")
    mkdir(root, ".extra/sysext/a")
    assert found(root, initrd=True)["a"].path == str(v)


def test_confext_initrd_dirs(root: Path) -> None:
    mkdir(root, "usr/lib/confexts/x")
    c = mkdir(root, ".extra/confext/y")
    g = mkdir(root, ".extra/global_confext/z")
    assert set(found(root, "confext")) == {"x"}
    f = found(root, "confext", initrd=True)
    assert set(f) == {"y", "z"}
    assert f["y"].path == str(c) and f["z"].path == str(g)


# ---------------------------------------------------------------------------------------------
# .v directories


def test_vpick_directories(root: Path) -> None:
    for v in ("1.0", "1.2", "1.10", "1.9~rc1"):
        mkdir(root, f"var/lib/extensions/test-extension.v/test-extension_{v}")
    img = found(root)["test-extension"]
    assert img.type == "directory"
    assert img.path == str(root / "var/lib/extensions/test-extension.v/test-extension_1.10")
    assert img.entry == str(root / "var/lib/extensions/test-extension.v")


def test_vpick_raw(root: Path) -> None:
    for v in ("1", "2", "10"):
        mkfile(root, f"var/lib/extensions/foo.raw.v/foo_{v}.raw")
    mkfile(root, "var/lib/extensions/foo.raw.v/foo_50")      # no .raw suffix
    img = found(root)["foo"]
    assert img.type == "raw"
    assert img.path == str(root / "var/lib/extensions/foo.raw.v/foo_10.raw")


def test_vpick_other_base_names_ignored(root: Path) -> None:
    mkdir(root, "var/lib/extensions/foo.v/foo_1")
    mkdir(root, "var/lib/extensions/foo.v/foobar_9")
    mkdir(root, "var/lib/extensions/foo.v/bar_9")
    mkdir(root, "var/lib/extensions/foo.v/foo")
    assert found(root)["foo"].path == str(root / "var/lib/extensions/foo.v/foo_1")


def test_vpick_architecture(root: Path) -> None:
    v = "var/lib/extensions/foo.v"
    mkdir(root, f"{v}/foo_3_arm64")
    mkdir(root, f"{v}/foo_2_x86-64")
    mkdir(root, f"{v}/foo_1")
    assert found(root)["foo"].path == str(root / v / "foo_2_x86-64")


def test_vpick_only_foreign_architecture(root: Path) -> None:
    mkdir(root, "var/lib/extensions/foo.v/foo_3_arm64")
    assert found(root) == {}


def test_vpick_tries_left(root: Path) -> None:
    v = "var/lib/extensions/foo.v"
    mkdir(root, f"{v}/foo_3+0")        # no tries left: bad
    mkdir(root, f"{v}/foo_2+0-3")      # bad as well
    mkdir(root, f"{v}/foo_1+2")        # still good
    img = found(root)["foo"]
    assert img.name == "foo"
    assert img.path == str(root / v / "foo_1+2")


def test_vpick_tries_left_with_arch(root: Path) -> None:
    v = "var/lib/extensions/foo.v"
    mkdir(root, f"{v}/foo_2_x86-64+0")
    mkdir(root, f"{v}/foo_1_x86-64+1-2")
    assert found(root)["foo"].path == str(root / v / "foo_1_x86-64+1-2")


def test_vpick_only_bad_entries_still_picks_newest(root: Path) -> None:
    v = "var/lib/extensions/foo.v"
    mkdir(root, f"{v}/foo_1+0")
    mkdir(root, f"{v}/foo_2+0")
    assert found(root)["foo"].path == str(root / v / "foo_2+0")


def test_vpick_empty_dir_skipped(root: Path) -> None:
    mkdir(root, "var/lib/extensions/foo.v")
    mkdir(root, "var/lib/extensions/bar.v/other_1")
    assert found(root) == {}


def test_vpick_empty_dir_does_not_mask(root: Path) -> None:
    mkdir(root, "etc/extensions/foo.v")
    real = mkdir(root, "var/lib/extensions/foo")
    assert found(root)["foo"].path == str(real)


def test_vpick_dir_is_symlink(root: Path) -> None:
    mkdir(root, "srv/foo.v/foo_1.0")
    mkdir(root, "var/lib/extensions")
    (root / "var/lib/extensions/foo.v").symlink_to("/srv/foo.v")
    assert found(root)["foo"].path == str(root / "srv/foo.v/foo_1.0")


def test_vpick_relative_dir_symlink(root: Path) -> None:
    mkdir(root, "srv/foo.v/foo_1.0")
    mkdir(root, "var/lib/extensions")
    (root / "var/lib/extensions/foo.v").symlink_to("../../../srv/foo.v")
    assert found(root)["foo"].path == str(root / "srv/foo.v/foo_1.0")


# What systemd 262's vpick does, entry by entry (each case checked against 262 by
# tests/integration/test_dropin_parity.py::test_vpick_picks_as_upstream).
VPICK_CASES = {
    # a version is ASCII letters, digits and "-.~^" only: "foo_ 2" is no version at all
    "space": (["foo_1", "foo_ 2"], "foo_1"),
    "comma": (["foo_1.0", "foo_1,5"], "foo_1.0"),
    "plus-not-tries": (["foo_1", "foo_2+x"], "foo_1"),
    "underscore-left": (["foo_1", "foo_2_3_x86-64"], "foo_1"),
    # whatever follows the last '_' is cut off, an architecture or not
    "any-is-no-arch": (["foo_1", "foo_1_any"], "foo_1_any"),
    # same version: the native architecture wins over none
    "native-wins-tie": (["foo_2", "foo_2_x86-64"], "foo_2_x86-64"),
    # same version: more tries left wins, then fewer tries done
    "more-tries-left": (["foo_1+2-1", "foo_1+2-0", "foo_1+3-9"], "foo_1+3-9"),
    "fewer-tries-done": (["foo_1+2-1", "foo_1+2-0"], "foo_1+2-0"),
    # equal versions: the larger file name
    "equal-versions": (["foo_01", "foo_1"], "foo_1"),
    "version-order": (["foo_1.9", "foo_1.10", "foo_1~rc"], "foo_1.10"),
}


@pytest.mark.parametrize("case", sorted(VPICK_CASES))
def test_vpick_as_systemd(root: Path, case: str) -> None:
    names, want = VPICK_CASES[case]
    if "x86-64" in want and images.uname_architecture() != "x86-64":
        pytest.skip("written for x86-64")
    v = "var/lib/extensions/foo.v"
    for n in names:
        mkdir(root, f"{v}/{n}")
    assert found(root)["foo"].path == str(root / v / want)


@pytest.mark.parametrize("absolute", [True, False])
def test_vpick_entry_is_symlink(root: Path, absolute: bool) -> None:
    target = mkdir(root, "srv/real-ext")
    v = mkdir(root, "var/lib/extensions/foo.v")
    (v / "foo_1").symlink_to("/srv/real-ext" if absolute else "../../../../srv/real-ext")
    assert found(root)["foo"].path == str(target)


@pytest.mark.parametrize("absolute", [True, False])
def test_vpick_raw_entry_is_symlink(root: Path, absolute: bool) -> None:
    target = mkfile(root, "srv/img.raw")
    v = mkdir(root, "var/lib/extensions/foo.raw.v")
    (v / "foo_1.raw").symlink_to("/srv/img.raw" if absolute else "../../../../srv/img.raw")
    img = found(root)["foo"]
    assert img.type == "raw" and img.path == str(target)
