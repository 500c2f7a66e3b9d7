"""A persistent or host upper from merge to merge (hygiene.py; docs/modes.md, "Writable /usr
on a package-managed distro"): the kernel's opaque markers cleared once a lower layer
provides the directory, deliberate ones kept, whiteouts of the real /usr as its own upper
dropped at unmerge (and after a crash), the diff of such a hierarchy, ephemeral writes said
to be dropped, and the refresh window's timing line. Real overlayfs: the markers and
whiteouts here are the kernel's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayctl import state
from overlayctl.state import DirsRecord
from tests.conftest import REPO, Result, Root
from tests.integration.olhelpers import overlays_at, status_json, whiteouts
from tests.integration.peer import need_peer, run_plan, upstream_peer

pytestmark = pytest.mark.root

OPAQUE = "trusted.overlay.opaque"


def opaque(p: Path) -> bool:
    try:
        return os.getxattr(p, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


class Host:
    """A root whose real /usr is its own upper (extensions.mutable/usr -> /usr)."""

    def __init__(self, root: Root, link: bool = True) -> None:
        self.r = root
        (root / "usr/bin").mkdir()
        (root / "usr/bin/hello").write_text("H\n")
        (root / "usr/share/doc/pkg").mkdir(parents=True)
        (root / "usr/share/doc/pkg/README").write_text("host readme\n")
        (root / "opt").mkdir()
        (root / "opt/host").write_text("O\n")
        if link:
            (root / "var/lib/extensions.mutable/usr").symlink_to("../../../usr")
        root.sysext("base", {"usr/share/base/file": "B\n"})

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> Result:
        return self.r.run(*args, env=env, check=check)

    def merge(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.run("sysext", "merge", "--mutable=yes", *args, env=env)

    def refresh(self, *args: str, env: dict[str, str] | None = None,
                check: bool = True) -> Result:
        return self.run("sysext", "refresh", *args, env=env, check=check)

    def unmerge(self, env: dict[str, str] | None = None) -> Result:
        return self.run("sysext", "unmerge", env=env)

    def usr(self, rel: str = "") -> Path:
        return self.r / "usr" / rel

    def dirs_record(self) -> DirsRecord:
        rec = state.load_dirs(str(self.r.path), "sysext", "/usr")
        assert rec is not None
        return rec


@pytest.fixture
def host(root: Root) -> Iterator[Host]:
    h = Host(root)
    yield h
    if overlays_at(root / "usr") or overlays_at(root / "opt"):
        root.run("sysext", "unmerge")


# ---------------------------------------------------------------------------------------------
# Opaque markers


@pytest.mark.parametrize("how", ["refresh", "remerge"])
def test_kernel_marker_cleared_when_an_extension_brings_the_directory(host: Host,
                                                                       how: str) -> None:
    """A directory a package makes while merged gets overlayfs' opaque marker (its parent
    /usr/lib is in every sysext); an extension added later that ships files there shows
    them, after a refresh as after an unmerge and merge."""
    host.merge()
    host.usr("lib/pkgdir").mkdir()
    host.usr("lib/pkgdir/pkgfile").write_text("P\n")
    host.r.sysext("later", {"usr/lib/pkgdir/extfile": "X\n"})
    if how == "remerge":
        host.unmerge()
        assert opaque(host.usr("lib/pkgdir")), "the kernel did not mark it: the test is moot"
        r = host.merge()
    else:
        r = host.refresh()
        assert host.r.writable("usr"), "a refresh with no mode keeps /usr writable"
    assert "Cleared the opaque marker of /usr/lib/pkgdir" in r.stderr, r.stderr
    assert (host.usr("lib/pkgdir/extfile")).read_text() == "X\n"
    assert (host.usr("lib/pkgdir/pkgfile")).read_text() == "P\n"
    host.unmerge()
    assert not opaque(host.usr("lib/pkgdir"))
    assert sorted(os.listdir(host.usr("lib/pkgdir"))) == ["pkgfile"]


def test_deliberate_marker_is_kept_across_merges(host: Host) -> None:
    """An extension's directory deleted and made again hides the extension's files on purpose,
    at every later merge, also after the extension was away for one merge (the marker's
    directory is then in no lower layer: only the record says what it is)."""
    host.r.sysext("app", {"usr/share/app/a.conf": "A\n"})
    host.merge()
    subprocess.run(["rm", "-r", str(host.usr("share/app"))], check=True)
    host.usr("share/app").mkdir()
    host.usr("share/app/mine.conf").write_text("M\n")
    host.refresh("--always-refresh=yes")
    assert sorted(os.listdir(host.usr("share/app"))) == ["mine.conf"]
    host.unmerge()
    assert opaque(host.usr("share/app"))
    app = host.r / "var/lib/extensions/app"
    app.rename(host.r / "var/lib/app.away")
    host.merge()
    host.unmerge()
    (host.r / "var/lib/app.away").rename(app)
    r = host.merge()
    assert "Cleared" not in r.stderr
    assert sorted(os.listdir(host.usr("share/app"))) == ["mine.conf"]
    assert "share/app" in host.dirs_record().deliberate
    host.unmerge()


def test_no_record_means_every_marker_is_deliberate(host: Host) -> None:
    """Without the record of the last merge (a merge by upstream, an older overlayctl), a
    marker cannot be told apart: it stays, and stays deliberate afterwards."""
    host.merge()
    host.usr("lib/pkgdir").mkdir()
    host.unmerge()
    (host.r / "var/lib/overlayctl/sysext/usr.dirs").unlink()
    host.r.sysext("later", {"usr/lib/pkgdir/extfile": "X\n"})
    r = host.merge()
    assert "Cleared" not in r.stderr
    assert os.listdir(host.usr("lib/pkgdir")) == []
    host.unmerge()
    r = host.merge()
    assert "Cleared" not in r.stderr and os.listdir(host.usr("lib/pkgdir")) == []
    host.unmerge()


def test_refresh_over_a_merge_without_our_record_keeps_markers(host: Host) -> None:
    """The record says which merge it belongs to; over a merge it does not describe (here:
    the record of an earlier one), the markers are not told apart."""
    host.merge()
    host.usr("lib/pkgdir").mkdir()
    state.save_dirs(str(host.r.path), "sysext", "/usr", host.dirs_record().replace(since=1))
    host.r.sysext("later", {"usr/lib/pkgdir/extfile": "X\n"})
    r = host.refresh()
    assert "Cleared" not in r.stderr and os.listdir(host.usr("lib/pkgdir")) == []
    host.unmerge()


@pytest.mark.parametrize("fault", ["attach@/usr", "attach@/opt"])
def test_failed_refresh_puts_the_markers_back(host: Host, fault: str) -> None:
    """The markers are cleared right before the swap; if attaching fails, they are back and
    the record is as it was."""
    host.merge()
    host.usr("lib/pkgdir").mkdir()
    host.r.sysext("later", {"usr/lib/pkgdir/extfile": "X\n", "opt/later": "L\n"})
    before = (host.r / "var/lib/overlayctl/sysext/usr.dirs").read_text()
    r = host.refresh(env={"OVERLAYCTL_FAULT_ERROR": fault}, check=False)
    assert r.returncode != 0 and "injected failure" in r.stderr
    assert (host.r / "var/lib/overlayctl/sysext/usr.dirs").read_text() == before
    if fault == "attach@/usr":
        assert overlays_at(host.usr()), "nothing was swapped: the old overlay stays"
        assert os.listdir(host.usr("lib/pkgdir")) == []
    host.r.run("sysext", "unmerge")
    assert opaque(host.usr("lib/pkgdir"))


def test_failed_merge_puts_the_markers_back(host: Host) -> None:
    """On a merge the markers go before the overlay is built; a merge that fails after that
    puts them back."""
    host.merge()
    host.usr("lib/pkgdir").mkdir()
    host.unmerge()
    host.r.sysext("later", {"usr/lib/pkgdir/extfile": "X\n", "opt/later": "L\n"})
    before = (host.r / "var/lib/overlayctl/sysext/usr.dirs").read_text()
    r = host.run("sysext", "merge", "--mutable=yes", env={"OVERLAYCTL_FAULT_ERROR": "built@/opt"},
                 check=False)
    assert r.returncode != 0 and "injected failure" in r.stderr
    assert "Cleared the opaque marker of /usr/lib/pkgdir" in r.stderr
    assert host.r.mounts() == []
    assert opaque(host.usr("lib/pkgdir"))
    assert (host.r / "var/lib/overlayctl/sysext/usr.dirs").read_text() == before


def test_dry_run_names_the_markers_and_changes_nothing(host: Host) -> None:
    host.merge()
    host.usr("lib/pkgdir").mkdir()
    host.unmerge()
    host.r.sysext("later", {"usr/lib/pkgdir/extfile": "X\n"})
    r = host.run("sysext", "merge", "--mutable=yes", "--dry-run", "--json=short")
    plans = {p["hierarchy"]: p for p in json.loads(r.stdout)}
    assert plans["/usr"]["clear_opaque"] == ["/usr/lib/pkgdir"]
    assert opaque(host.usr("lib/pkgdir"))
    r = host.run("sysext", "merge", "--mutable=yes", "--dry-run")
    assert "clear opaque marker  /usr/lib/pkgdir" in r.stdout
    assert opaque(host.usr("lib/pkgdir")) and host.r.mounts() == []


def test_marker_on_the_way_to_a_carried_mount_waits_for_the_next_merge(host: Host) -> None:
    """The new overlay of a refresh has looked up the path to every mount it carries before
    the swap: a marker there is left for the next merge, which clears it before building."""
    host.merge()
    host.usr("lib/pkgdir/sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(host.usr("lib/pkgdir/sub"))],
                   check=True)
    host.r.sysext("later", {"usr/lib/pkgdir/extfile": "X\n"})
    r = host.refresh()
    assert "Not clearing the opaque marker of /usr/lib/pkgdir yet" in r.stderr, r.stderr
    assert "extfile" not in os.listdir(host.usr("lib/pkgdir"))
    assert "lib/pkgdir" in host.dirs_record().pending
    host.unmerge()
    r = host.merge()
    assert "Cleared the opaque marker of /usr/lib/pkgdir" in r.stderr
    assert sorted(os.listdir(host.usr("lib/pkgdir"))) == ["extfile", "sub"]
    host.unmerge()
    subprocess.run(["umount", str(host.usr("lib/pkgdir/sub"))], check=True)


def test_persistent_upper_marker_cleared_when_the_base_gains_the_directory(root: Root) -> None:
    """A persistent upper over the plain /usr: a directory made while merged is marked; when
    the plain /usr gets a directory of that name while unmerged, the next merge shows its
    content. A base directory deleted and made again while merged stays hidden."""
    (root / "usr/share/basedir").mkdir(parents=True)
    (root / "usr/share/basedir/b").write_text("b\n")
    (root / "var/lib/extensions.mutable/usr").mkdir()
    root.sysext("ext", {"usr/share/ext/e": "e\n"})
    root.run("sysext", "merge", "--mutable=yes", check=True)
    (root / "usr/lib/newdir").mkdir()
    (root / "usr/lib/newdir/mine").write_text("m\n")
    subprocess.run(["rm", "-r", str(root / "usr/share/basedir")], check=True)
    (root / "usr/share/basedir").mkdir()
    root.run("sysext", "unmerge", check=True)
    upper = root / "var/lib/extensions.mutable/usr"
    assert opaque(upper / "lib/newdir") and opaque(upper / "share/basedir")
    (root / "usr/lib/newdir").mkdir()
    (root / "usr/lib/newdir/from-base").write_text("f\n")
    r = root.run("sysext", "merge", "--mutable=yes", check=True)
    assert "Cleared the opaque marker of /usr/lib/newdir" in r.stderr
    assert sorted(os.listdir(root / "usr/lib/newdir")) == ["from-base", "mine"]
    assert os.listdir(root / "usr/share/basedir") == []
    root.run("sysext", "refresh", "--always-refresh=yes", check=True)
    assert os.listdir(root / "usr/share/basedir") == []
    root.run("sysext", "unmerge", check=True)
    assert opaque(upper / "share/basedir") and not opaque(upper / "lib/newdir")


# ---------------------------------------------------------------------------------------------
# Whiteouts


def _delete_three(host: Host) -> None:
    """A package file an extension also ships, pure extension content, and a directory both
    have: three whiteouts in the real /usr."""
    os.unlink(host.usr("bin/hello"))
    os.unlink(host.usr("share/ext/only"))
    subprocess.run(["rm", "-r", str(host.usr("share/doc/pkg"))], check=True)


@pytest.fixture
def shadowing(host: Host) -> Host:
    host.r.sysext("ext", {"usr/bin/hello": "E\n", "usr/share/ext/only": "X\n",
                          "usr/share/doc/pkg/ext-notes": "N\n"})
    return host


def test_whiteouts_of_the_real_usr_go_at_unmerge(shadowing: Host) -> None:
    host = shadowing
    host.merge()
    assert host.usr("bin/hello").read_text() == "H\n", "the host's file wins"
    _delete_three(host)
    host.refresh()
    assert not host.usr("bin/hello").exists() and not host.usr("share/ext/only").exists()
    assert not host.usr("share/doc/pkg").exists()
    assert host.r.writable("usr")
    r = host.unmerge()
    assert "Dropped 3 whiteouts from /usr" in r.stderr, r.stderr
    assert whiteouts(host.usr()) == []
    assert not host.usr("bin/hello").exists() and not host.usr("share/doc/pkg").exists()
    host.merge()
    assert host.usr("bin/hello").read_text() == "E\n"
    assert host.usr("share/ext/only").read_text() == "X\n"
    assert os.listdir(host.usr("share/doc/pkg")) == ["ext-notes"]
    host.unmerge()
    assert whiteouts(host.usr()) == []


@pytest.mark.parametrize("then", ["unmerge", "merge"])
def test_after_a_crash_the_next_verb_drops_the_whiteouts(shadowing: Host, then: str) -> None:
    host = shadowing
    host.merge()
    _delete_three(host)
    r = host.run("sysext", "unmerge", env={"OVERLAYCTL_FAULT": "unmerge-after-detach@/usr"},
                 check=False)
    assert r.returncode != 0
    host.run("sysext", "unmerge", env={"SYSTEMD_SYSEXT_HIERARCHIES": "/opt"})
    assert host.r.mounts() == []
    assert len(whiteouts(host.usr())) == 3
    if then == "unmerge":
        r = host.unmerge()
        assert "Dropped 3 whiteouts" in r.stderr
        assert whiteouts(host.usr()) == []
    else:
        r = host.merge()
        assert "Dropped 3 whiteouts" in r.stderr
        assert host.usr("bin/hello").read_text() == "E\n"
        host.unmerge()
        assert whiteouts(host.usr()) == []


def test_whiteouts_inside_a_renamed_directory_go_too(shadowing: Host) -> None:
    host = shadowing
    host.merge()
    os.rename(host.usr("share/ext"), host.usr("share/ext-renamed"))
    os.unlink(host.usr("share/ext-renamed/only"))
    host.unmerge()
    assert whiteouts(host.usr()) == []


def test_whiteouts_of_many_refreshes_go(shadowing: Host) -> None:
    """Whiteouts made under an extension that a later refresh dropped still go at unmerge."""
    host = shadowing
    host.r.sysext("gone", {"usr/share/gone/g": "G\n"})
    host.merge()
    os.unlink(host.usr("share/gone/g"))
    subprocess.run(["rm", "-r", str(host.r / "var/lib/extensions/gone")], check=True)
    host.refresh()
    host.refresh("--always-refresh=yes")
    host.unmerge()
    assert whiteouts(host.usr()) == []


def test_persistent_upper_keeps_whiteouts(root: Root) -> None:
    """With a mutable dir of its own, the upper is not the plain /usr: a deletion there is a
    record of the user's choice and lasts (as before)."""
    (root / "var/lib/extensions.mutable/usr").mkdir()
    root.sysext("ext", {"usr/share/ext/only": "X\n"})
    root.run("sysext", "merge", "--mutable=yes", check=True)
    os.unlink(root / "usr/share/ext/only")
    root.run("sysext", "unmerge", check=True)
    assert whiteouts(root / "var/lib/extensions.mutable/usr") == ["share/ext/only"]
    root.run("sysext", "merge", "--mutable=yes", check=True)
    assert not (root / "usr/share/ext/only").exists()
    root.run("sysext", "unmerge", check=True)


def test_etc_as_its_own_upper_drops_whiteouts(root: Root) -> None:
    (root / "etc").mkdir()
    (root / "etc/app.conf").write_text("host\n")
    (root / "var/lib/extensions.mutable/etc").symlink_to("../../../etc")
    root.confext("c", {"etc/app.conf": "ext\n", "etc/c.d/only": "o\n"})
    root.run("confext", "merge", "--mutable=yes", check=True)
    os.unlink(root / "etc/app.conf")
    os.unlink(root / "etc/c.d/only")
    r = root.run("confext", "unmerge", check=True)
    assert "Dropped 2 whiteouts from /etc" in r.stderr
    assert whiteouts(root / "etc") == []
    root.run("confext", "merge", "--mutable=yes", check=True)
    assert (root / "etc/app.conf").read_text() == "ext\n"
    root.run("confext", "unmerge", check=True)


def test_etc_with_defaults_keeps_whiteouts(root: Root) -> None:
    """Over a defaults layer a whiteout is the record of a deleted default (the Flatcar /etc)."""
    (root / "etc").mkdir()
    (root / "usr/share/factory/etc").mkdir(parents=True)
    (root / "usr/share/factory/etc/motd").write_text("default\n")
    (root / "var/lib/extensions.mutable/etc").symlink_to("../../../etc")
    root.confext("c", {"etc/c.conf": "c\n"})
    merge = ["confext", "merge", "--mutable=yes", "--defaults=/usr/share/factory/etc"]
    root.run(*merge, check=True)
    os.unlink(root / "etc/motd")
    root.run("confext", "unmerge", check=True)
    assert whiteouts(root / "etc") == ["motd"]
    root.run(*merge, check=True)
    assert not (root / "etc/motd").exists()
    root.run("confext", "unmerge", check=True)


# ---------------------------------------------------------------------------------------------
# diff, status, ephemeral, the refresh window


def test_diff_of_the_real_usr_shows_only_what_touches_extensions(shadowing: Host) -> None:
    host = shadowing
    for i in range(50):
        (host.usr(f"share/many/f{i}")).parent.mkdir(parents=True, exist_ok=True)
        (host.usr(f"share/many/f{i}")).write_text("host\n")
    host.merge()
    os.unlink(host.usr("share/ext/only"))
    host.usr("lib/pkgdir").mkdir()
    rows = json.loads(host.run("diff", "--json=short").stdout)
    got = {(r["path"], r["change"], r["extension"]) for r in rows if r["path"].startswith("/usr")}
    # Not the host's 50 files, nor the empty directory the kernel marked (nothing below it),
    # nor /usr/share/doc/pkg, which both have alike.
    assert got == {("/usr/bin/hello", "modified", "ext"),
                   ("/usr/share/ext/only", "deleted", "ext")}, got
    host.unmerge()


def test_status_since_is_the_merge_time_for_the_real_usr(host: Host) -> None:
    old = time.time() - 10 * 86400
    os.utime(host.usr(), (old, old))
    t0 = time.time()
    host.merge()
    row = {r["hierarchy"]: r for r in status_json(host.r)}["/usr"]
    assert row["upperdir"] == "/usr"
    assert t0 - 1 <= row["since"] / 1e6 <= time.time() + 1
    host.unmerge()


def test_ephemeral_writes_are_said_to_be_dropped(root: Root) -> None:
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("")
    root.sysext("ext", {"usr/share/ext/e": "e\n"})
    root.run("sysext", "merge", "--mutable=ephemeral", check=True)
    (root / "usr/share/mine").write_text("m\n")
    rows = {r["hierarchy"]: r for r in status_json(root)}
    assert rows["/usr"]["ephemeral"] and rows["/usr"]["ephemeral_entries"] == 2   # share, mine
    r = root.run("sysext", "status", check=True)
    assert "Note: /usr is ephemeral: its writes (2 entries now) are dropped when it is " \
           "unmerged." in r.stderr
    time.sleep(0.01)
    (root / "var/lib/dpkg/status").write_text("Package: x\n")
    r = root.run("sysext", "unmerge", check=True)
    assert "Dropping the writes of the ephemeral /usr (2 entries in its upper): it is being " \
           "unmerged." in r.stderr
    assert "dpkg's database (/var/lib/dpkg/status) changed while /usr was ephemeral" in r.stderr
    assert not (root / "usr/share/mine").exists()


def test_refresh_into_another_mode_says_ephemeral_writes_go(root: Root) -> None:
    root.sysext("ext", {"usr/share/ext/e": "e\n"})
    root.run("sysext", "merge", "--mutable=ephemeral", check=True)
    (root / "usr/share/mine").write_text("m\n")
    r = root.run("sysext", "refresh", "--mutable=no", check=True)
    assert "Dropping the writes of the ephemeral /usr (2 entries in its upper): it is merged " \
           "in mode 'no' now." in r.stderr
    root.run("sysext", "unmerge", check=True)


def test_refresh_window_is_timed(host: Host) -> None:
    host.merge()
    r = host.refresh("--always-refresh=yes", env={"SYSTEMD_LOG_LEVEL": "debug"})
    lines = [x for x in r.stderr.splitlines() if x.startswith("Swapped ")]
    assert len(lines) == 2, r.stderr          # /usr and /opt
    us = [int(x.split(" for ")[1].split(" us")[0]) for x in lines]
    assert all(0 <= u < 1_000_000 for u in us), lines
    host.unmerge()


def test_status_since_of_an_upstream_merge_of_the_real_usr(host: Host) -> None:
    """For a merge made by systemd (no record of ours), SINCE is when its metadata was
    written, not the time of the real /usr, which is its upper."""
    peer = need_peer(upstream_peer())
    old = time.time() - 10 * 86400
    os.utime(host.usr(), (old, old))
    t0 = time.time()
    res = run_plan(host.r.path, [["run", "up:sysext", "merge", "--no-reload", "--mutable=yes"],
                                 ["run", "oc:sysext", "status", "--json=short"],
                                 ["run", "up:sysext", "unmerge", "--no-reload"]],
                   peer=peer, namespace=True)
    assert res["steps"][0]["rc"] == 0, res["steps"][0]
    row = {r["hierarchy"]: r for r in json.loads(res["steps"][1]["out"])}["/usr"]
    assert row["merged"] and row["upperdir"] == "/usr"
    assert t0 - 1 <= row["since"] / 1e6 <= time.time() + 1, row


def test_markers_made_under_an_upstream_merge_are_deliberate(host: Host) -> None:
    """overlayctl merged and unmerged once (its record exists); then systemd merges, a
    directory is made under its merge; a refresh by overlayctl over that merge cannot know
    what the directory was, so the marker stays, even where an extension now has files."""
    peer = need_peer(upstream_peer())
    host.merge()
    host.unmerge()
    later = "var/lib/extensions/later"
    res = run_plan(host.r.path, [
        ["run", "up:sysext", "merge", "--no-reload", "--mutable=yes"],
        ["put", "usr/lib/pkgdir/pkgfile", "P\n"],
        ["put", f"{later}/usr/lib/extension-release.d/extension-release.later", "ID=_any\n"],
        ["put", f"{later}/usr/lib/pkgdir/extfile", "X\n"],
        ["run", "oc:sysext", "refresh", "--no-reload"],
        ["snap"],
        ["run", "oc:sysext", "unmerge", "--no-reload"]], peer=peer, namespace=True)
    s = res["steps"]
    assert s[0]["rc"] == 0 and s[4]["rc"] == 0, s[4]
    assert "Cleared" not in s[4]["err"]
    assert "usr/lib/pkgdir/extfile" not in s[5]["files"]
    assert s[5]["files"]["usr/lib/pkgdir/pkgfile"] == "P\n"
    assert not res["left"]
    assert opaque(host.usr("lib/pkgdir"))


def test_reset_reports_markers_its_rebuild_clears(host: Host) -> None:
    """reset rebuilds the overlay; a kernel marker that the rebuild clears (here: the
    extension directory gained the directory in place) is one of its actions in --json."""
    app = host.r.sysext("app", {"usr/share/app/a.conf": "A\n"})
    host.merge()
    host.usr("lib/pkgdir").mkdir()
    with open(host.usr("share/app/a.conf"), "a") as f:
        f.write("local\n")
    (app / "usr/lib/pkgdir").mkdir(parents=True)
    (app / "usr/lib/pkgdir/x").write_text("X\n")
    r = host.run("reset", "/usr/share/app/a.conf", "--json=short")
    actions = {(a["path"], a["action"]) for a in json.loads(r.stdout)}
    assert actions == {("/usr/share/app/a.conf", "reset"),
                       ("/usr/lib/pkgdir", "cleared-opaque")}, actions
    assert host.usr("lib/pkgdir/x").read_text() == "X\n"
    assert host.usr("share/app/a.conf").read_text() == "A\n"
    host.unmerge()


def test_merge_of_the_real_usr_stays_lean(host: Host) -> None:
    """The merge path of /usr as its own upper loads hygiene.py, and neither upper.py nor
    manifest.py (no manifest is kept for /usr; they cost about 15 ms of imports)."""
    code = ("import sys\nfrom overlayctl import cli\n"
            f"rc = cli.main(['--root={host.r.path}', 'sysext', 'merge', '--mutable=yes'])\n"
            "print(rc, ' '.join(sorted(m for m in sys.modules if m.startswith('overlayctl'))))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    rc, *loaded = r.stdout.split()
    assert rc == "0", r.stderr
    assert "overlayctl.hygiene" in loaded
    assert not set(loaded) & {"overlayctl.upper", "overlayctl.manifest", "overlayctl.local"}
    host.unmerge()


@pytest.mark.parametrize("host_upper", [True, False])
def test_directory_names_that_are_not_utf8(root: Root, host_upper: bool) -> None:
    """An extension's directory whose name is not UTF-8 goes into the directory record as
    the bytes it is (it failed a writable merge with an internal error after mounting, and
    left a temporary file behind)."""
    Host(root, link=host_upper)
    ext = os.fsencode(str(root / "var/lib/extensions/base/usr/share"))
    os.makedirs(os.path.join(ext, b"bad\xffname", b"sub"))
    with open(os.path.join(ext, b"bad\xffname", b"sub", b"f"), "w") as f:
        f.write("x\n")
    for _ in range(2):                     # written, then read back at the next merge
        root.run("sysext", "merge", "--mutable=yes", check=True)
        try:
            shown = os.fsencode(str(root / "usr/share"))
            with open(os.path.join(shown, b"bad\xffname", b"sub", b"f")) as f:
                assert f.read() == "x\n"
        finally:
            root.run("sysext", "unmerge", check=True)
    rec = state.load_dirs(str(root.path), "sysext", "/usr")
    assert rec is not None and "bad\udcffname" in rec.dirs["share"]
    assert not [n for n in os.listdir(root / "var/lib/overlayctl/sysext") if ".tmp." in n]
