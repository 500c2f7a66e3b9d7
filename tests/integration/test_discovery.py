"""Discovery of extensions and their release checks, end to end (reference §3, §4, §9.4,
§9.5 and §12 cases 40-53, 57, 59, 60): what a user sees in the merged hierarchies and in
'list' and 'status'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlayctl.kernel import birth_time_us, uname_architecture
from tests.conftest import Root
from tests.integration.olhelpers import (
    assert_error,
    by_hierarchy,
    overlays_at,
    status_json,
    unmerged,
)

pytestmark = pytest.mark.root

E = "preexisting-file-in-extension-image"
H = "preexisting-file-in-hierarchy"


def tree(path: Path, release_name: str | None, files: dict[str, str] | None = None,
         release: str = "ID=_any\n", cls: str = "sysext") -> Path:
    """A directory extension at PATH whose release file is named for RELEASE_NAME."""
    path.mkdir(parents=True, exist_ok=True)
    if release_name is not None:
        d = path / ("usr/lib/extension-release.d" if cls == "sysext" else
                    "etc/extension-release.d")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"extension-release.{release_name}").write_text(release)
    for p, text in (files or {}).items():
        f = path / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return path


def with_hierarchy(root: Root) -> None:
    (root / "opt").mkdir(exist_ok=True)
    (root / f"opt/{H}").write_text("H")


def merge_then_unmerge(root: Root, *, expect: set[str] | None = None) -> None:
    """Upstream's check for cases 40-53: merge shows E+H, unmerge shows H; nothing left."""
    root.run("sysext", "merge", check=True)
    assert root.names("opt") == (expect if expect is not None else {E, H})
    assert len(overlays_at(root / "opt")) == 1
    root.run("sysext", "unmerge", check=True)
    assert root.names("opt") == {H}
    assert root.mounts() == []


def list_json(root: Root, *args: str) -> list[dict[str, object]]:
    r = root.run(*args, "list", "--json=short", check=True)
    v = json.loads(r.stdout)
    assert isinstance(v, list)
    return v


# ---------------------------------------------------------------------------------------------
# 12.8: symlinked extensions and vpick


@pytest.mark.parametrize("target", ["../../othername-extension", "/var/othername-extension"],
                         ids=["relative", "absolute"])
def test_symlinked_directory_extension(root: Root, target: str) -> None:
    with_hierarchy(root)
    tree(root / "var/othername-extension", "test-extension", {f"opt/{E}": "E"})
    (root / "var/lib/extensions/test-extension").symlink_to(target)
    [img] = list_json(root, "sysext")
    assert img["name"] == "test-extension"
    assert img["type"] == "directory"
    assert img["path"] == str(root / "var/othername-extension")
    merge_then_unmerge(root)


def test_absolute_symlink_is_resolved_inside_the_root_not_on_the_host(root: Root) -> None:
    """An absolute link target that exists on the host but not in the root is dangling."""
    with_hierarchy(root)
    # /usr exists on the host (and is a directory); inside the root there is no /usr/share.
    (root / "var/lib/extensions/test-extension").symlink_to("/usr/share")
    assert list_json(root, "sysext") == []
    r = root.run("sysext", "merge", check=True)
    assert root.mounts() == [], r.stderr
    assert root.names("opt") == {H}


def test_dangling_symlink_is_skipped_silently(root: Root) -> None:
    with_hierarchy(root)
    root.sysext("good", {f"opt/{E}": "E"})
    (root / "var/lib/extensions/broken").symlink_to("/var/does-not-exist")
    assert [i["name"] for i in list_json(root, "sysext")] == ["good"]
    merge_then_unmerge(root)


@pytest.mark.parametrize("target", ["../../othername.raw", "/var/othername.raw"],
                         ids=["relative", "absolute"])
def test_symlinked_raw_image_is_listed(root: Root, target: str) -> None:
    (root / "var/othername.raw").write_bytes(b"\0" * 4096)
    (root / "var/lib/extensions/test-extension.raw").symlink_to(target)
    [img] = list_json(root, "sysext")
    assert img["name"] == "test-extension"
    assert img["type"] == "raw"
    assert img["path"] == str(root / "var/othername.raw")


def test_raw_image_listed_and_an_unreadable_one_fails_merge(root: Root) -> None:
    with_hierarchy(root)
    root.sysext("dir-ext", {f"opt/{E}": "E"})
    (root / "var/lib/extensions/app.sysext.raw").write_bytes(b"\0" * 4096)
    (root / "var/lib/extensions/other.raw").write_bytes(b"\0" * 4096)
    # A regular file without .raw is not an image at all.
    (root / "var/lib/extensions/notes.txt").write_text("x")
    rows = {i["name"]: i for i in list_json(root, "sysext")}
    assert set(rows) == {"app", "dir-ext", "other"}
    assert rows["app"]["type"] == "raw"
    assert rows["app"]["path"] == str(root / "var/lib/extensions/app.sysext.raw")
    assert rows["other"]["type"] == "raw"
    text = root.run("sysext", "list", check=True).stdout
    assert "app" in text and "raw" in text
    # As upstream: an image that cannot be dissected fails the whole verb (tests/integration/
    # test_raw.py has the images that do merge).
    r = root.run("sysext", "merge")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("overlayctl:") and ".raw" in last
    assert root.names("opt") == {H}
    assert root.mounts() == []
    status = by_hierarchy(status_json(root, "sysext"))
    assert unmerged(status["/opt"])


def test_only_unreadable_raw_images_merge_nothing(root: Root) -> None:
    with_hierarchy(root)
    (root / "var/lib/extensions/app.raw").write_bytes(b"\0" * 4096)
    r = root.run("sysext", "merge")
    assert r.returncode == 1 and "app.raw" in r.stderr
    assert root.mounts() == []
    assert root.names("opt") == {H}


def _vdir(root: Root, where: str = "var/lib/extensions/test-extension.v") -> Path:
    v = root / where
    v.mkdir(parents=True)
    return v


def test_vpick_directory(root: Root) -> None:
    with_hierarchy(root)
    v = _vdir(root)
    tree(v / "test-extension_1.0", "test-extension", {f"opt/{E}": "E"})
    [img] = list_json(root, "sysext")
    assert (img["name"], img["type"]) == ("test-extension", "directory")
    assert img["path"] == str(v / "test-extension_1.0")
    merge_then_unmerge(root)
    assert unmerged(by_hierarchy(status_json(root, "sysext"))["/opt"])


def test_vpick_picks_the_newest_version(root: Root) -> None:
    with_hierarchy(root)
    v = _vdir(root)
    for ver in ("1.2", "1.10", "1.9", "0.99"):
        tree(v / f"test-extension_{ver}", "test-extension", {"opt/version": ver})
    [img] = list_json(root, "sysext")
    assert img["path"] == str(v / "test-extension_1.10")
    root.run("sysext", "merge", check=True)
    assert (root / "opt/version").read_text() == "1.10"
    assert by_hierarchy(status_json(root, "sysext"))["/opt"]["extensions"] == ["test-extension"]
    root.run("sysext", "unmerge", check=True)
    assert not (root / "opt/version").exists()


def test_vpick_architecture_and_tries(root: Root) -> None:
    """Entries for another architecture are never picked; exhausted tries (+0) lose to good
    entries even when newer."""
    with_hierarchy(root)
    v = _vdir(root)
    other = "s390x" if uname_architecture() != "s390x" else "x86-64"
    tree(v / f"test-extension_3.0_{other}", "test-extension", {"opt/version": "3.0-other"})
    tree(v / "test-extension_2.0+0", "test-extension", {"opt/version": "2.0-bad"})
    tree(v / f"test-extension_1.5_{uname_architecture()}", "test-extension",
         {"opt/version": "1.5-native"})
    tree(v / "test-extension_1.0", "test-extension", {"opt/version": "1.0"})
    root.run("sysext", "merge", check=True)
    assert (root / "opt/version").read_text() == "1.5-native"
    root.run("sysext", "unmerge", check=True)


def test_vpick_empty_v_dir_is_skipped(root: Root) -> None:
    with_hierarchy(root)
    _vdir(root)
    (root / "var/lib/extensions/test-extension.v/unrelated_1.0").mkdir()
    assert list_json(root, "sysext") == []
    r = root.run("sysext", "merge", check=True)
    assert root.mounts() == [], r.stderr


def test_vpick_raw_is_listed(root: Root) -> None:
    v = _vdir(root, "var/lib/extensions/test-extension.raw.v")
    for ver in ("1.0", "2.0"):
        (v / f"test-extension_{ver}.raw").write_bytes(b"\0" * 512)
    [img] = list_json(root, "sysext")
    assert (img["name"], img["type"]) == ("test-extension", "raw")
    assert img["path"] == str(v / "test-extension_2.0.raw")


@pytest.mark.parametrize("target", ["../../othername.v", "/var/othername.v"],
                         ids=["relative", "absolute"])
def test_vpick_v_dir_is_a_symlink(root: Root, target: str) -> None:
    with_hierarchy(root)
    v = root / "var/othername.v"
    tree(v / "test-extension_1.0", "test-extension", {f"opt/{E}": "E"})
    (root / "var/lib/extensions/test-extension.v").symlink_to(target)
    [img] = list_json(root, "sysext")
    assert img["name"] == "test-extension"
    assert img["path"] == str(v / "test-extension_1.0")
    merge_then_unmerge(root)


@pytest.mark.parametrize("target", ["../../../othername-extension", "/var/othername-extension"],
                         ids=["relative", "absolute"])
def test_vpick_entry_is_a_symlink(root: Root, target: str) -> None:
    with_hierarchy(root)
    tree(root / "var/othername-extension", "test-extension", {f"opt/{E}": "E"})
    v = _vdir(root)
    (v / "test-extension_1.0").symlink_to(target)
    [img] = list_json(root, "sysext")
    assert img["path"] == str(root / "var/othername-extension")
    merge_then_unmerge(root)


@pytest.mark.parametrize("target", ["../../../othername.raw", "/var/othername.raw"],
                         ids=["relative", "absolute"])
def test_vpick_raw_entry_is_a_symlink(root: Root, target: str) -> None:
    (root / "var/othername.raw").write_bytes(b"\0" * 512)
    v = _vdir(root, "var/lib/extensions/test-extension.raw.v")
    (v / "test-extension_1.0.raw").symlink_to(target)
    [img] = list_json(root, "sysext")
    assert (img["name"], img["type"]) == ("test-extension", "raw")
    assert img["path"] == str(root / "var/othername.raw")


# ---------------------------------------------------------------------------------------------
# Search directories, masking, forbidden content, confext


def test_first_search_directory_wins_a_name(root: Root) -> None:
    with_hierarchy(root)
    for where in ("etc/extensions", "run/extensions", "var/lib/extensions"):
        root.sysext("dup", {"opt/from": where}, where=where)
    [img] = list_json(root, "sysext")
    assert img["path"] == str(root / "etc/extensions/dup")
    root.run("sysext", "merge", check=True)
    assert (root / "opt/from").read_text() == "etc/extensions"
    root.run("sysext", "unmerge", check=True)

    subprocess.run(["rm", "-rf", str(root / "etc/extensions/dup")], check=True)
    root.run("sysext", "merge", check=True)
    assert (root / "opt/from").read_text() == "run/extensions"
    root.run("sysext", "unmerge", check=True)
    assert not (root / "opt/from").exists()


def test_confext_search_directory_precedence(root: Root) -> None:
    (root / "etc").mkdir()
    dirs = ["run/confexts", "var/lib/confexts", "usr/local/lib/confexts", "usr/lib/confexts"]
    for where in dirs:
        root.confext("dup", {"etc/from": where}, where=where)
    for expected in dirs:
        [img] = list_json(root, "confext")
        assert img["path"] == str(root / expected / "dup")
        root.run("confext", "merge", check=True)
        assert (root / "etc/from").read_text() == expected
        root.run("confext", "unmerge", check=True)
        subprocess.run(["rm", "-rf", str(root / expected / "dup")], check=True)
    assert not (root / "etc/from").exists()


def test_no_extensions_in_usr_lib_extensions_or_etc_confexts(root: Root) -> None:
    """Those directories are deliberately not searched (§3.1)."""
    root.sysext("a", where="usr/lib/extensions")
    root.sysext("b", where="usr/local/lib/extensions")
    root.confext("c", where="etc/confexts")
    assert list_json(root) == []
    assert "No OS extensions found." in root.run("list", check=True).stderr


def test_masking_by_an_empty_directory_in_etc_extensions(root: Root) -> None:
    """Case 57."""
    with_hierarchy(root)
    tree(root / "var/app-nodistro", "app-nodistro", {f"opt/{E}": "E"})
    (root / "var/lib/extensions/app-nodistro").symlink_to("../../app-nodistro")
    merge_then_unmerge(root)
    (root / "etc/extensions/app-nodistro").mkdir(parents=True)
    [img] = list_json(root, "sysext")
    assert img["path"] == str(root / "etc/extensions/app-nodistro")
    r = root.run("sysext", "merge", check=True)
    assert root.names("opt") == {H}
    assert root.mounts() == [], r.stderr
    assert "1 ignored" in r.stderr
    root.run("sysext", "unmerge", check=True)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_forbidden_os_release_in_sysext_dir_fails_the_merge(root: Root, force: bool) -> None:
    """Case 59: nothing of any extension becomes visible, even with --force."""
    with_hierarchy(root)
    root.sysext("good", {f"opt/{E}": "E", "usr/share/good": "g"})
    bad = root.sysext("app-reject", {"usr/lib/os-release": "ID=_any\n", "opt/rejected": "x"},
                      where="run/extensions")
    args = ["sysext", "merge"] + (["--force"] if force else [])
    assert_error(root.run(*args), str(bad), "os-release", only_line=False)
    assert root.mounts() == []
    assert root.names("opt") == {H}
    assert not (root / "usr/share/good").exists()
    assert unmerged(by_hierarchy(status_json(root, "sysext"))["/opt"])
    r = root.run("sysext", "unmerge")
    assert r.returncode == 0, r.stderr
    assert root.mounts() == []


def test_os_release_in_a_confext_is_harmless(root: Root) -> None:
    """Only sysext directories are checked; a confext carries usr/lib/os-release unmerged."""
    (root / "etc").mkdir()
    root.confext("c", {"etc/c": "c", "usr/lib/os-release": "ID=x\n"})
    root.run("confext", "merge", check=True)
    assert (root / "etc/c").read_text() == "c"
    root.run("confext", "unmerge", check=True)


def test_confext_in_run_confexts_is_visible_and_noexec(root: Root) -> None:
    """Case 60."""
    (root / "etc").mkdir()
    (root / "etc/hostfile").write_text("h")
    e = root.confext("test", {"etc/testfile": "t", "etc/testscript": "#!/bin/sh\nexit 0\n"},
                     release="ID=_any\nARCHITECTURE=_any\n", where="run/confexts")
    (e / "etc/testscript").chmod(0o755)
    root.run("confext", "merge", check=True)
    assert (root / "etc/testfile").read_text() == "t"
    assert (root / "etc/hostfile").read_text() == "h"
    with pytest.raises(PermissionError):
        subprocess.run([str(root / "etc/testscript")], capture_output=True)
    [m] = overlays_at(root / "etc")
    assert {"noexec", "nosuid", "nodev", "ro"} <= set(m["options"])
    assert m["source"] == "confext"
    st = by_hierarchy(status_json(root, "confext"))
    assert st["/etc"]["extensions"] == ["test"]
    # Sysext state is separate: /opt does not exist so it has no row; /usr is not merged.
    assert unmerged(by_hierarchy(status_json(root, "sysext"))["/usr"])
    root.run("confext", "unmerge", check=True)
    assert not (root / "etc/testfile").exists()
    assert root.mounts() == []


def test_noexec_option_overrides_class_default(root: Root) -> None:
    (root / "etc").mkdir()
    e = root.confext("test", {"etc/testscript": "#!/bin/sh\nexit 7\n"})
    (e / "etc/testscript").chmod(0o755)
    root.run("confext", "merge", "--noexec=no", check=True)
    assert subprocess.run([str(root / "etc/testscript")]).returncode == 7
    root.run("confext", "unmerge", check=True)
    s = root.sysext("s", {"opt/script": "#!/bin/sh\nexit 5\n"})
    (s / "opt/script").chmod(0o755)
    root.run("sysext", "merge", check=True)
    assert subprocess.run([str(root / "opt/script")]).returncode == 5   # sysext: exec allowed
    root.run("sysext", "unmerge", check=True)
    root.run("sysext", "merge", "--noexec=yes", check=True)
    with pytest.raises(PermissionError):
        subprocess.run([str(root / "opt/script")], capture_output=True)
    root.run("sysext", "unmerge", check=True)


# ---------------------------------------------------------------------------------------------
# Release-file checks (§4)


def _merged_names(root: Root, *args: str, cls: str = "sysext") -> list[str] | str:
    """Merge, report what got merged into the class' first hierarchy, unmerge."""
    r = root.run(cls, "merge", *args, check=True)
    h = "/opt" if cls == "sysext" else "/etc"
    row = by_hierarchy(status_json(root, cls))[h]
    names = row["extensions"] if row["merged"] else "none"
    if names == "none":
        assert root.mounts() == [], r.stderr
    root.run(cls, "unmerge", check=True)
    assert root.mounts() == []
    return names


def _host(root: Root, text: str) -> None:
    (root / "usr/lib/os-release").write_text(text)


HOST_ROLLING = 'ID=testtest\nID_LIKE="foobar test_alike something-else"\nVERSION=1.2.3\n'
HOST_VERSIONED = "ID=testtest\nVERSION_ID=42\n"
HOST_LEVEL = "ID=testtest\nVERSION_ID=42\nSYSEXT_LEVEL=1.5\n"
ARCH = uname_architecture()
OTHER_ARCH = "s390x" if ARCH != "s390x" else "x86-64"


def _case_id(v: object) -> str:
    names = {HOST_ROLLING: "rolling", HOST_VERSIONED: "versioned", HOST_LEVEL: "level"}
    if isinstance(v, str):
        return names.get(v) or v.strip().replace("\n", ";").replace(" ", "_")
    return "accepted" if v else "ignored"


@pytest.mark.parametrize(("host", "release", "accepted"), [
    (HOST_ROLLING, "ID=testtest\n", True),
    (HOST_ROLLING, "ID=other\n", False),
    (HOST_ROLLING, "ID=test_alike\n", True),                      # in host ID_LIKE
    (HOST_ROLLING, "ID=foobar\nVERSION_ID=99\n", True),           # rolling host: no version
    (HOST_ROLLING, "ID=test\n", False),                            # not a word of ID_LIKE
    (HOST_ROLLING, "VERSION_ID=1\n", False),                      # no ID at all
    (HOST_ROLLING, "ID=\n", False),
    (HOST_ROLLING, "ID=_any\nVERSION_ID=1\n", True),
    (HOST_VERSIONED, "ID=testtest\nVERSION_ID=42\n", True),
    (HOST_VERSIONED, "ID=testtest\nVERSION_ID=43\n", False),
    (HOST_VERSIONED, "ID=testtest\n", False),                      # missing VERSION_ID
    (HOST_VERSIONED, "ID=testtest\nSYSEXT_LEVEL=1.5\n", False),   # host has no level
    (HOST_LEVEL, "ID=testtest\nSYSEXT_LEVEL=1.5\n", True),        # level decides...
    (HOST_LEVEL, "ID=testtest\nSYSEXT_LEVEL=1.5\nVERSION_ID=7\n", True),   # ...not VERSION_ID
    (HOST_LEVEL, "ID=testtest\nSYSEXT_LEVEL=1.6\nVERSION_ID=42\n", False),
    (HOST_LEVEL, "ID=testtest\nVERSION_ID=42\n", True),           # no level: VERSION_ID used
    (HOST_LEVEL, "ID=testtest\nVERSION_ID=41\n", False),
    (HOST_ROLLING, f"ID=_any\nARCHITECTURE={ARCH}\n", True),
    (HOST_ROLLING, "ID=_any\nARCHITECTURE=_any\n", True),
    (HOST_ROLLING, f"ID=_any\nARCHITECTURE={OTHER_ARCH}\n", False),
    (HOST_ROLLING, "ID=_any\nSYSEXT_SCOPE=initrd\n", False),
    (HOST_ROLLING, "ID=_any\nSYSEXT_SCOPE=system\n", True),
    (HOST_ROLLING, 'ID=_any\nSYSEXT_SCOPE="initrd portable"\n', False),
    (HOST_ROLLING, 'ID=_any\nSYSEXT_SCOPE="initrd system"\n', True),
    (HOST_ROLLING, "ID='testtest'\n", True),                      # quoting as in os-release(5)
], ids=lambda v: _case_id(v))
def test_release_checks(root: Root, host: str, release: str, accepted: bool) -> None:
    with_hierarchy(root)
    _host(root, host)
    root.sysext("ext", {f"opt/{E}": "E"}, release=release)
    r = root.run("sysext", "merge", check=True)
    if accepted:
        assert root.names("opt") == {E, H}, r.stderr
        root.run("sysext", "unmerge", check=True)
    else:
        assert root.names("opt") == {H}
        assert root.mounts() == []
        assert "1 ignored" in r.stderr and "ext" in r.stderr, r.stderr
        # --force skips every check.
        root.run("sysext", "merge", "--force", check=True)
        assert root.names("opt") == {E, H}
        root.run("sysext", "unmerge", check=True)
    assert root.names("opt") == {H}


def test_etc_os_release_is_preferred_over_usr_lib(root: Root) -> None:
    with_hierarchy(root)
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=other\n")
    root.sysext("ext", {f"opt/{E}": "E"}, release="ID=testtest\n")
    assert _merged_names(root) == "none"
    root.sysext("ext2", {"opt/x": "x"}, release="ID=other\n")
    assert _merged_names(root) == ["ext2"]


@pytest.mark.parametrize("scope", [None, "initrd", "system"])
def test_scope_in_initrd(root: Root, scope: str | None) -> None:
    """Case 37 and its converse: in an initrd root only SYSEXT_SCOPE=…initrd… merges."""
    with_hierarchy(root)
    (root / "etc").mkdir()
    (root / "etc/initrd-release").write_text("")
    release = "ID=_any\n" + (f"SYSEXT_SCOPE={scope}\n" if scope else "")
    root.sysext("test-extension", {f"opt/{E}": "E"}, release=release)
    r = root.run("sysext", "merge", check=True)
    if scope == "initrd":
        assert root.names("opt") == {E, H}
        root.run("sysext", "unmerge", check=True)
    else:
        assert root.mounts() == [], r.stderr
        rows = status_json(root, "sysext")
        assert rows and all(unmerged(row) for row in rows)
    assert root.names("opt") == {H}


def test_initrd_searches_dot_extra(root: Root) -> None:
    with_hierarchy(root)
    root.sysext("stub", {"opt/stub": "s"}, release="ID=_any\nSYSEXT_SCOPE=initrd\n",
                where=".extra/sysext")
    assert list_json(root, "sysext") == []
    (root / "etc").mkdir()
    (root / "etc/initrd-release").write_text("")
    assert [i["name"] for i in list_json(root, "sysext")] == ["stub"]
    assert _merged_names(root) == ["stub"]


def test_confext_release_checks(root: Root) -> None:
    (root / "etc").mkdir()
    _host(root, "ID=testtest\nVERSION_ID=42\nCONFEXT_LEVEL=3\nSYSEXT_LEVEL=9\n")
    root.confext("good", {"etc/good": "g"}, release="ID=testtest\nCONFEXT_LEVEL=3\n")
    root.confext("sysext-level", {"etc/bad1": "b"}, release="ID=testtest\nSYSEXT_LEVEL=9\n")
    root.confext("scoped", {"etc/bad2": "b"}, release="ID=_any\nCONFEXT_SCOPE=initrd\n")
    # A sysext release file does not make a confext.
    e = root.confext("wrong-dir", {"etc/bad3": "b"}, release=None)
    tree(e, "wrong-dir", release="ID=_any\n", cls="sysext")
    assert _merged_names(root, cls="confext") == ["good"]


def test_release_file_name_matching(root: Root) -> None:
    """The release file must be named for the extension; a versioned directory name matches
    the unversioned release name (§4.1)."""
    with_hierarchy(root)
    tree(root / "var/lib/extensions/foo_1.2", "foo", {"opt/foo": "f"})
    tree(root / "var/lib/extensions/bar", "baz", {"opt/bar": "b"})
    tree(root / "var/lib/extensions/plain", None, {"opt/plain": "p"})
    assert _merged_names(root) == ["foo_1.2"]
    assert sorted(_merged_names(root, "--force")) == ["bar", "foo_1.2", "plain"]


def test_release_file_mismatch_accepted_with_strict_xattr_false(root: Root) -> None:
    with_hierarchy(root)
    e = tree(root / "var/lib/extensions/bar", "baz", {"opt/bar": "b"})
    f = e / "usr/lib/extension-release.d/extension-release.baz"
    try:
        os.setxattr(f, "user.extension-release.strict", b"0")
    except OSError as err:
        pytest.skip(f"no user xattrs here: {err}")
    assert _merged_names(root) == ["bar"]


# ---------------------------------------------------------------------------------------------
# Layer order (§5.4)


def test_the_extension_sorting_last_wins_a_conflict(root: Root) -> None:
    with_hierarchy(root)
    (root / "opt/shared").write_text("base")
    for name in ("ext-9", "ext-10", "ext-1", "app", "ext-10a"):
        root.sysext(name, {"opt/shared": name, f"opt/only-{name}": name})
    root.run("sysext", "merge", check=True)
    assert (root / "opt/shared").read_text() == "ext-10a"
    for name in ("ext-9", "ext-10", "ext-1", "app", "ext-10a"):
        assert (root / f"opt/only-{name}").read_text() == name
    order = ["app", "ext-1", "ext-9", "ext-10", "ext-10a"]
    st = by_hierarchy(status_json(root, "sysext"))
    assert st["/opt"]["extensions"] == order
    assert st["/usr"]["extensions"] == order
    assert (root / "opt/.systemd-sysext/extensions").read_text() == "".join(
        n + "\n" for n in order)
    root.run("sysext", "unmerge", check=True)
    assert (root / "opt/shared").read_text() == "base"


def test_version_order_rules(root: Root) -> None:
    """'~' is older than anything, numbers compare numerically, '-' before '.'."""
    with_hierarchy(root)
    names = ["v1.0~rc1", "v1.0", "v1.0.1", "v1.00.2", "v1.0-1"]
    for n in names:
        root.sysext(n, {"opt/who": n})
    root.run("sysext", "merge", check=True)
    st = by_hierarchy(status_json(root, "sysext"))
    assert st["/opt"]["extensions"] == ["v1.0~rc1", "v1.0", "v1.0-1", "v1.0.1", "v1.00.2"]
    assert (root / "opt/who").read_text() == "v1.00.2"
    root.run("sysext", "unmerge", check=True)


# ---------------------------------------------------------------------------------------------
# list and status output (§9.4, §9.5)


def test_list_fields(root: Root) -> None:
    (root / "etc").mkdir()
    a = root.sysext("zeta")
    b = root.sysext("alpha", release="ID=not-this-host\n")     # incompatible: still listed
    c = root.confext("conf")
    (root / "var/lib/extensions/img.raw").write_bytes(b"x")
    os.utime(a, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(root / "var/lib/extensions/img.raw", ns=(1_600_000_000_123_456_789,) * 2)
    rows = list_json(root)
    assert [r["name"] for r in rows] == ["alpha", "conf", "img", "zeta"]
    for r in rows:
        assert {"name", "type", "path", "time"} <= set(r)
        assert isinstance(r["time"], int)
    by = {r["name"]: r for r in rows}
    # As upstream: a directory's time is when it was created (its mtime says nothing about
    # the tree below), a raw image's its modification time.
    assert by["zeta"]["time"] == birth_time_us(str(a)) != 1_600_000_000_123_456
    assert by["img"]["time"] == 1_600_000_000_123_456
    assert by["zeta"]["path"] == str(a)
    assert by["alpha"]["path"] == str(b)
    assert by["conf"]["path"] == str(c)
    assert by["alpha"]["type"] == by["conf"]["type"] == "directory"
    assert by["img"]["type"] == "raw"
    assert by["alpha"]["time"] == birth_time_us(str(b))
    assert [r["name"] for r in list_json(root, "confext")] == ["conf"]
    pretty = root.run("list", "--json=pretty", check=True).stdout
    assert json.loads(pretty) == rows and "\n  " in pretty
    text = root.run("list", check=True).stdout.splitlines()
    assert text[0].split() == ["NAME", "TYPE", "PATH", "TIME"]
    assert text[1].split()[:3] == ["alpha", "directory", str(b)]
    assert "4 entries listed." in text[-1]
    bare = root.run("list", "--no-legend", check=True).stdout.splitlines()
    assert len(bare) == 4 and bare[0].startswith("alpha")


def test_list_with_nothing(root: Root) -> None:
    r = root.run("list", check=True)
    assert r.stdout == ""
    assert "No OS extensions found." in r.stderr
    assert json.loads(root.run("list", "--json=short", check=True).stdout) == []


def test_status_json_keys(root: Root) -> None:
    with_hierarchy(root)
    (root / "etc").mkdir()
    root.sysext("b-ext", {f"opt/{E}": "E"})
    root.sysext("a-ext", {"opt/a": "a"})
    keys = {"hierarchy", "extensions", "since", "mutable", "upperdir", "writable"}
    rows = status_json(root)
    assert [r["hierarchy"] for r in rows] == ["/etc", "/opt", "/usr"]
    for r in rows:
        assert keys <= set(r)
        assert unmerged(r)
        assert r["since"] is None
        assert r["writable"] is False
    root.run("sysext", "merge", check=True)
    st = by_hierarchy(status_json(root))
    assert unmerged(st["/etc"])
    for h in ("/opt", "/usr"):
        assert st[h]["extensions"] == ["a-ext", "b-ext"]
        assert isinstance(st[h]["since"], int) and st[h]["since"] > 0
        assert st[h]["mutable"] == "no"
        assert st[h]["upperdir"] is None
        assert st[h]["writable"] is False
    text = root.run("sysext", "status", check=True).stdout
    assert "a-ext b-ext" in text and "/opt" in text
    root.run("sysext", "unmerge", check=True)

    root.run("sysext", "merge", "--mutable=yes", check=True)
    st = by_hierarchy(status_json(root, "sysext"))
    assert st["/opt"]["mutable"] == "yes"
    assert st["/opt"]["upperdir"] == "/var/lib/extensions.mutable/opt"
    assert st["/opt"]["writable"] is True
    assert root.writable("opt")
    root.run("sysext", "unmerge", check=True)

    root.run("sysext", "merge", "--mutable=ephemeral", check=True)
    st = by_hierarchy(status_json(root, "sysext"))
    assert st["/opt"]["mutable"] == "ephemeral"
    # Never the persistent directory: either none, or the throwaway upper shown inside /opt.
    eph = st["/opt"]["upperdir"]
    assert eph is None or (eph.startswith("/opt/") and "extensions.mutable" not in eph)
    assert st["/opt"]["writable"] is True
    root.run("sysext", "unmerge", check=True)


def test_status_has_no_row_for_a_missing_hierarchy(root: Root) -> None:
    rows = status_json(root, "sysext")
    assert [r["hierarchy"] for r in rows] == ["/usr"]
    assert status_json(root, "confext") == []


# ---------------------------------------------------------------------------------------------
# Names and paths


def test_relative_symlink_cannot_climb_out_of_the_root(root: Root) -> None:
    """Too many '..' stop at the root, as they would at '/'."""
    with_hierarchy(root)
    tree(root / "var/othername-extension", "test-extension", {f"opt/{E}": "E"})
    (root / "var/lib/extensions/test-extension").symlink_to(
        "../../../../../../../../../../var/othername-extension")
    [img] = list_json(root, "sysext")
    assert img["path"] == str(root / "var/othername-extension")
    merge_then_unmerge(root)


def test_entry_names(root: Root) -> None:
    """Hidden names count; '.#' names (lock files) never do; the class suffix is dropped."""
    d = root / "var/lib/extensions"
    root.sysext(".hidden")
    tree(d / "suffixed.sysext", "suffixed")
    tree(d / "other.confext", "other.confext")
    tree(d / ".#locked", "x")
    (d / ".#suffixed.sysext.lck").write_text("")
    (d / "fifo").mkdir()          # a directory without release file is still an image
    os.mkfifo(d / "pipe.raw")     # a fifo is not
    names = sorted(i["name"] for i in list_json(root, "sysext"))
    assert names == [".hidden", "fifo", "other.confext", "suffixed"]
    (root / "etc").mkdir()
    tree(root / "var/lib/confexts/conf.confext", "conf", cls="confext")
    assert [i["name"] for i in list_json(root, "confext")] == ["conf"]


@pytest.mark.parametrize("target", ["var/opt", "/var/opt"], ids=["relative", "absolute"])
def test_hierarchy_that_is_a_symlink_is_resolved_inside_the_root(root: Root, target: str) -> None:
    (root / "var/opt").mkdir(parents=True)
    (root / f"var/opt/{H}").write_text("H")
    (root / "opt").symlink_to(target)
    root.sysext("test-extension", {f"opt/{E}": "E"})
    root.run("sysext", "merge", check=True)
    assert root.names("var/opt") == {E, H}
    assert len(overlays_at(root / "var/opt")) == 1
    assert by_hierarchy(status_json(root, "sysext"))["/opt"]["extensions"] == ["test-extension"]
    root.run("sysext", "unmerge", check=True)
    assert root.names("var/opt") == {H}
    assert (root / "opt").is_symlink()
    assert root.mounts() == []


@pytest.mark.parametrize("spelling", ["relative", "trailing-slash", "dotdot"])
def test_root_spellings(root: Root, spelling: str) -> None:
    with_hierarchy(root)
    root.sysext("test-extension", {f"opt/{E}": "E"})
    arg = {"relative": "root", "trailing-slash": f"{root.path}/",
           "dotdot": f"{root.path}/../{root.path.name}"}[spelling]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "overlayctl", f"--root={arg}", "sysext", *args],
                           capture_output=True, text=True, cwd=str(root.path.parent))
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        return p

    run("merge")
    assert root.names("opt") == {E, H}
    st = by_hierarchy(json.loads(run("status", "--json=short").stdout))
    assert st["/opt"]["extensions"] == ["test-extension"]
    assert_error(root.run("sysext", "merge"), "already merged", only_line=False)
    run("unmerge")
    assert root.names("opt") == {H}
    assert root.mounts() == []


def test_status_since_is_the_merge_time_in_microseconds(root: Root) -> None:
    with_hierarchy(root)
    root.sysext("test-extension", {f"opt/{E}": "E"})
    t0 = time.time()
    root.run("sysext", "merge", check=True)
    t1 = time.time()
    since = by_hierarchy(status_json(root, "sysext"))["/opt"]["since"]
    assert t0 - 2 <= since / 1e6 <= t1 + 2
    root.run("sysext", "unmerge", check=True)
