"""cleanup as Flatcar's initrd (bootengine's initrd-setup-root) does it (issue 13,
ecosystem.md §1.2): /etc/.no-dup-update turns the dedupe off, a whiteout allow-list file
(KeepDefaultsFile=, like /usr/share/flatcar/etc-no-whiteouts), IgnoreXattrs=security.selinux
when comparing a copy with its default, and the passwd/group/shadow/gshadow rule
(KeepUserDatabase=)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Root, umount_all_below
from tests.integration.test_defaults import Flatcar, is_whiteout

pytestmark = pytest.mark.root

NO_WHITEOUTS = "/usr/share/flatcar/etc-no-whiteouts"


@pytest.fixture
def fc(root: Root) -> Iterator[Flatcar]:
    f = Flatcar(root)
    f.write_default("group", "root:x:0:\n")
    f.write_default("shadow", "root:*:1::::::\n")
    f.write_default("gshadow", "root:*::\n")
    f.write_default("tmpfiles/managed.conf", "managed\n")
    yield f
    umount_all_below(str(root.path))


def conf(fc: Flatcar, text: str) -> Path:
    """overlayctl's confext.conf in /usr/lib (not in /etc: that is the upper here)."""
    p = fc.root / "usr/lib/overlayctl/confext.conf"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def actions(fc: Flatcar, *args: str) -> dict[str, tuple[str, str]]:
    return {a["path"]: (a["action"], a["detail"]) for a in fc.verb("cleanup", *args)}


def dup_state(fc: Flatcar) -> None:
    """A copy identical to its default, an empty directory equal to one below, and a
    deleted default in the KeepDefaults list."""
    fc.merge("yes")
    os.chown(fc.etc / "issue", 0, 0)                    # a no-op chown: an identical copy
    os.chown(fc.etc / "ssh/ssh_config", 0, 0)
    (fc.etc / "ssh/ssh_config").unlink()
    (fc.etc / "ssh/ssh_config").write_text("Host *\n")  # rewritten with the same content
    (fc.etc / "resolv.conf").unlink()
    fc.unmerge()
    conf(fc, "[Cleanup]\nKeepDefaults=/etc/resolv.conf\n")


@pytest.mark.parametrize("where", ["upper", "defaults"])
def test_no_dup_update_keeps_identical_copies(fc: Flatcar, where: str) -> None:
    dup_state(fc)
    if where == "upper":
        (fc.etc / ".no-dup-update").write_text("")
    else:
        fc.write_default(".no-dup-update", "")
    done = actions(fc)
    # No dedupe: only the whiteout rule applies.
    assert done == {"/etc/resolv.conf": ("removed", "whiteout of a path in KeepDefaults")}
    assert (fc.etc / "issue").exists() and (fc.etc / "ssh/ssh_config").exists()
    # Without the marker, the same state is deduplicated, as bootengine does.
    if where == "upper":
        (fc.etc / ".no-dup-update").unlink()
    else:
        (fc.defaults / ".no-dup-update").unlink()
    done = actions(fc)
    assert done == {"/etc/issue": ("removed", "identical to the layer below"),
                    "/etc/ssh/ssh_config": ("removed", "identical to the layer below"),
                    "/etc/ssh": ("removed", "empty directory equal to the layer below")}
    assert not (fc.etc / "issue").exists() and not (fc.etc / "ssh").exists()


def test_a_deleted_no_dup_update_marker_does_not_count(fc: Flatcar) -> None:
    """A whiteout of a .no-dup-update the defaults ship: the merged /etc has none."""
    fc.write_default(".no-dup-update", "")
    dup_state(fc)
    fc.merge("yes")
    (fc.etc / ".no-dup-update").unlink()
    fc.unmerge()
    assert is_whiteout(fc.etc / ".no-dup-update")
    assert "/etc/issue" in actions(fc, "--dry-run")


def test_keep_defaults_file_like_etc_no_whiteouts(fc: Flatcar) -> None:
    fc.merge("yes")
    for rel in ("resolv.conf", "tmpfiles/managed.conf", "motd", "hosts"):
        (fc.etc / rel).unlink()
    fc.unmerge()
    (fc.root / NO_WHITEOUTS.lstrip("/")).write_text(
        "# paths that flatcar-tmpfiles manages\n/etc/resolv.conf\n\n/etc/tmpfiles/managed.conf\n"
        "/etc/not-deleted\n")
    conf(fc, f"[Cleanup]\nKeepDefaults=/etc/hosts\nKeepDefaultsFile={NO_WHITEOUTS}\n")
    done = actions(fc)
    assert done == {
        "/etc/resolv.conf": ("removed", f"whiteout of a path in KeepDefaultsFile {NO_WHITEOUTS}"),
        "/etc/tmpfiles/managed.conf": ("removed",
                                       f"whiteout of a path in KeepDefaultsFile {NO_WHITEOUTS}"),
        "/etc/hosts": ("removed", "whiteout of a path in KeepDefaults"),
        "/etc/tmpfiles": ("removed", "empty directory equal to the layer below")}
    assert is_whiteout(fc.etc / "motd"), "a deleted default not in the lists stays deleted"
    fc.merge("yes")
    assert fc.read("resolv.conf") == "nameserver 10.0.0.1\n"
    assert fc.read("tmpfiles/managed.conf") == "managed\n"
    assert not (fc.etc / "motd").exists()
    fc.unmerge()


def test_a_missing_keep_defaults_file_is_a_warning(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "resolv.conf").unlink()
    fc.unmerge()
    conf(fc, f"[Cleanup]\nKeepDefaultsFile={NO_WHITEOUTS}\n")
    r = fc.run("cleanup", check=True)
    assert f"ignoring KeepDefaultsFile={NO_WHITEOUTS}" in r.stderr
    assert is_whiteout(fc.etc / "resolv.conf")


def test_ignore_xattrs_security_selinux(fc: Flatcar) -> None:
    fc.merge("yes")
    # A relabelled copy (the label is all that differs), and one with another xattr.
    os.setxattr(fc.etc / "issue", "security.selinux", b"system_u:object_r:etc_t:s0")
    os.setxattr(fc.etc / "xattrfile", "user.mine", b"1")
    fc.unmerge()
    assert fc.changes("/etc/issue") == {"/etc/issue": "modified"}
    assert "/etc/issue" not in actions(fc, "--dry-run")
    conf(fc, "[Cleanup]\nIgnoreXattrs=security.selinux\n")
    done = actions(fc)
    assert done == {"/etc/issue": ("removed",
                                   "identical to the layer below (ignoring security.selinux)")}
    assert not (fc.etc / "issue").exists()
    assert os.getxattr(fc.etc / "xattrfile", "user.mine") == b"1"


@pytest.mark.parametrize("enabled", [True, False])
def test_keep_user_database(fc: Flatcar, enabled: bool) -> None:
    fc.merge("yes")
    for rel in ("passwd", "group", "shadow", "gshadow", "motd"):
        (fc.etc / rel).unlink()
    fc.unmerge()
    conf(fc, f"[Cleanup]\nKeepUserDatabase={'yes' if enabled else 'no'}\n")
    done = actions(fc)
    if enabled:
        assert done == {f"/etc/{n}": ("removed", "whiteout of a path in KeepUserDatabase")
                        for n in ("passwd", "group", "shadow", "gshadow")}
        fc.merge("yes")
        assert fc.read("passwd").startswith("root:") and fc.read("gshadow") == "root:*::\n"
        fc.unmerge()
    else:
        assert done == {}
        assert is_whiteout(fc.etc / "passwd")
    assert is_whiteout(fc.etc / "motd")


def test_bad_keep_user_database_value_is_a_warning(fc: Flatcar) -> None:
    fc.merge("yes")
    fc.unmerge()
    conf(fc, "[Cleanup]\nKeepUserDatabase=maybe\n")
    r = fc.run("cleanup", check=True)
    assert "ignoring KeepUserDatabase=maybe" in r.stderr
