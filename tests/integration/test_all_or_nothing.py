"""All or nothing, checked where it used to leak (issue 9's holes 1, 2, 11 and 13): a refresh
that fails leaves the old merge as it was; a merge that fails, or is killed between two
attaches, keeps the user's nested mounts; a failed combined merge keeps the old records;
stacked nested mounts are carried whole, in order, across merge, refresh and unmerge."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from overlayctl import mountinfo
from tests.conftest import Root

pytestmark = pytest.mark.root


def bind(src: Path, dst: Path) -> None:
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)


def tmpfs_with(dst: Path, name: str, text: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(dst)], check=True)
    (dst / name).write_text(text)


def status(root: Root) -> dict[str, dict[str, object]]:
    r = root.run("status", "--json=short", check=True)
    return {row["hierarchy"]: row for row in json.loads(r.stdout)}


def stack_at(path: Path) -> list[str]:
    """The file systems stacked at PATH, bottom first (by their source)."""
    mounts = mountinfo.read()
    here = [m for m in mounts if m.mountpoint == str(path)]
    if not here:
        return []
    bottom = next(m for m in here if not any(o.id == m.parent for o in here))
    return [m.source for m in mountinfo.stack_at(mounts, bottom)]


@pytest.fixture
def two(root: Root) -> Root:
    """/usr and /opt with an extension each."""
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/base.txt").write_text("base")
    (root / "opt").mkdir()
    (root / "opt/host.txt").write_text("host")
    root.sysext("a", {"opt/a.txt": "A"})
    root.sysext("b", {"usr/share/b.txt": "B"})
    return root


def test_failed_refresh_leaves_the_old_merge(two: Root, tmp_path: Path) -> None:
    """Hole 1: extension a (the only one with /opt content) removed and a broken image added;
    the refresh fails, and /opt is still merged with a, as before."""
    two.run("sysext", "merge", check=True)
    before = status(two)
    # Moved away (not deleted: it is a live layer of the merged /opt).
    os.rename(two / "var/lib/extensions/a", tmp_path / "a")
    (two / "var/lib/extensions/broken.raw").write_bytes(b"\0" * 8192)
    r = two.run("sysext", "refresh")
    assert r.returncode == 1 and "broken.raw" in r.stderr, r.stderr
    assert (two / "opt/a.txt").read_text() == "A"
    assert status(two) == before
    two.run("sysext", "unmerge", check=True)


def test_failed_refresh_keeps_the_old_manifest_and_records(two: Root) -> None:
    """Nothing overlayctl keeps changes when a refresh fails after planning (here: while
    building): records and manifests are written only once everything is in place."""
    (two / "var/lib/extensions.mutable/opt").mkdir()
    two.run("sysext", "merge", "--mutable=yes", check=True)
    state = two / "var/lib/overlayctl/sysext"
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    r = two.run("sysext", "refresh", "--mutable=ephemeral",
                env={"OVERLAYCTL_FAULT_ERROR": "built@/opt"})
    assert r.returncode == 1 and "injected failure" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert two.writable("opt") and status(two)["/opt"]["mutable"] == "yes"
    two.run("sysext", "unmerge", check=True)


def test_failed_attach_keeps_nested_mounts(two: Root, tmp_path: Path) -> None:
    """Hole 2: a bind mount below /usr; attaching /opt (after /usr) fails; the rollback takes
    /usr's overlay down again, and the bind mount is still there."""
    src = tmp_path / "nested"
    src.mkdir()
    (src / "inside.txt").write_text("nested")
    (two / "usr/share/foo").mkdir()
    bind(src, two / "usr/share/foo")
    try:
        r = two.run("sysext", "merge", env={"OVERLAYCTL_FAULT_ERROR": "attach@/opt"})
        assert r.returncode == 1 and "injected failure" in r.stderr, r.stderr
        assert not status(two)["/usr"]["merged"]
        assert (two / "usr/share/foo/inside.txt").read_text() == "nested"
        assert len(stack_at(two / "usr/share/foo")) == 1
    finally:
        subprocess.run(["umount", "-R", str(two / "usr/share/foo")], check=False)


def test_kill_between_attaches_keeps_nested_mounts(two: Root, tmp_path: Path) -> None:
    """A merge killed after /usr is attached and before /opt: the nested mount stays visible;
    the next merge completes the call, and after unmerge it is there exactly once."""
    src = tmp_path / "nested"
    src.mkdir()
    (src / "inside.txt").write_text("nested")
    (two / "usr/share/foo").mkdir()
    bind(src, two / "usr/share/foo")
    try:
        r = two.run("sysext", "merge", env={"OVERLAYCTL_FAULT": "attach@/opt"})
        assert r.returncode != 0
        assert (two / "usr/share/foo/inside.txt").read_text() == "nested"
        two.run("sysext", "merge", check=True)
        assert (two / "usr/share/foo/inside.txt").read_text() == "nested"
        assert (two / "opt/a.txt").read_text() == "A"
        two.run("sysext", "unmerge", check=True)
        assert (two / "usr/share/foo/inside.txt").read_text() == "nested"
        assert len(stack_at(two / "usr/share/foo")) == 1, stack_at(two / "usr/share/foo")
        assert not status(two)["/usr"]["merged"]
    finally:
        subprocess.run(["umount", "-R", str(two / "usr/share/foo")], check=False)


def test_failed_combined_merge_keeps_the_old_records(two: Root) -> None:
    """Hole 11: /etc merged once (mode yes) and unmerged: its record stays. A combined merge
    in another mode whose sysext part fails leaves that record exactly as it was."""
    (two / "etc").mkdir()
    two.confext("c", {"etc/c.conf": "C"})
    two.run("confext", "merge", "--mutable=yes", check=True)
    two.run("confext", "unmerge", check=True)
    rec = two / "var/lib/overlayctl/confext/etc.json"
    before = rec.read_bytes()
    assert json.loads(before)["mode"] == "yes"
    (two / "var/lib/extensions/broken.raw").write_bytes(b"\0" * 8192)
    r = two.run("merge", "--mutable=ephemeral")
    assert r.returncode == 1, r.stderr
    assert two.mounts() == []
    assert rec.read_bytes() == before


def test_failed_combined_merge_after_attach_keeps_the_old_records(two: Root) -> None:
    """The same when the failure comes while attaching sysext, after /etc was attached."""
    (two / "etc").mkdir()
    two.confext("c", {"etc/c.conf": "C"})
    two.run("confext", "merge", "--mutable=yes", check=True)
    two.run("confext", "unmerge", check=True)
    rec = two / "var/lib/overlayctl/confext/etc.json"
    before = rec.read_bytes()
    r = two.run("merge", "--mutable=ephemeral", env={"OVERLAYCTL_FAULT_ERROR": "attach@/usr"})
    assert r.returncode == 1 and "injected failure" in r.stderr, r.stderr
    assert two.mounts() == []
    assert rec.read_bytes() == before


def test_stacked_nested_mounts_are_carried_in_order(two: Root) -> None:
    """Hole 13: two mounts stacked on /usr/share/foo: merge, refresh and unmerge carry both,
    the top one still on top."""
    foo = two / "usr/share/foo"
    foo.mkdir()
    tmpfs_with(foo, "level", "bottom")
    subprocess.run(["mount", "-t", "tmpfs", "top-fs", str(foo)], check=True)
    (foo / "level").write_text("top")
    subprocess.run(["mount", "--make-private", str(foo)], check=False)
    try:
        assert stack_at(foo) == ["tmpfs", "top-fs"]
        for verb in (["sysext", "merge"], ["sysext", "refresh", "--always-refresh=yes"],
                     ["sysext", "refresh", "--mutable=ephemeral"], ["sysext", "unmerge"]):
            two.run(*verb, check=True)
            assert stack_at(foo) == ["tmpfs", "top-fs"], (verb, stack_at(foo))
            assert (foo / "level").read_text() == "top", verb
            # The lower one is really there under it (not an empty stand-in).
            r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                f"umount {foo} && cat {foo}/level"],
                               capture_output=True, text=True, check=True)
            assert r.stdout == "bottom", verb
        assert not status(two)["/usr"]["merged"]
    finally:
        subprocess.run(["umount", "-R", str(foo)], check=False)
        subprocess.run(["umount", "-R", str(foo)], check=False)


def test_covered_originals_are_detached_after_merge(two: Root, tmp_path: Path) -> None:
    """After a merge, the nested mount exists once, on the overlay (the covered original was
    detached at the end), and unmerge puts exactly one back."""
    src = tmp_path / "nested"
    src.mkdir()
    (two / "usr/share/foo").mkdir()
    bind(src, two / "usr/share/foo")
    try:
        n_before = len(mountinfo.read())
        two.run("sysext", "merge", check=True)
        below = [m for m in mountinfo.read() if m.mountpoint == str(two / "usr/share/foo")]
        assert len(below) == 1, below
        two.run("sysext", "unmerge", check=True)
        assert len(mountinfo.read()) == n_before
        assert len(stack_at(two / "usr/share/foo")) == 1
    finally:
        subprocess.run(["umount", "-R", str(two / "usr/share/foo")], check=False)


def test_drop_happens_only_at_commit(two: Root, tmp_path: Path) -> None:
    """A refresh in which /opt loses its extension unmerges /opt only once the new /usr is
    in place: if attaching /usr fails, /opt is still merged as before."""
    two.run("sysext", "merge", check=True)
    os.rename(two / "var/lib/extensions/a", tmp_path / "a")
    two.sysext("c", {"usr/share/c.txt": "C"})
    r = two.run("sysext", "refresh", env={"OVERLAYCTL_FAULT_ERROR": "attach@/usr"})
    assert r.returncode == 1, r.stderr
    st = status(two)
    assert st["/opt"]["merged"] and st["/opt"]["extensions"] == ["a", "b"]
    assert (two / "opt/a.txt").read_text() == "A"
    two.run("sysext", "unmerge", check=True)
    assert os.listdir(two / "opt") == ["host.txt"]


def test_refresh_failing_between_two_swaps_restores_both(two: Root) -> None:
    """/usr was swapped when attaching /opt fails: the rollback puts /usr's old overlay back
    (a clone of it kept for that), so both hierarchies show the old merge, and the next
    refresh merges both anew."""
    two.run("sysext", "merge", check=True)
    before = status(two)
    two.sysext("c", {"opt/c.txt": "C", "usr/share/c.txt": "C"})
    r = two.run("sysext", "refresh", env={"OVERLAYCTL_FAULT_ERROR": "attach@/opt"})
    assert r.returncode == 1 and "injected failure" in r.stderr, r.stderr
    assert status(two) == before
    assert (two / "usr/share/b.txt").read_text() == "B" and (two / "opt/a.txt").exists()
    assert not (two / "usr/share/c.txt").exists()
    assert len(mountinfo_overlays(two / "usr")) == 1
    two.run("sysext", "refresh", check=True)
    st = status(two)
    assert st["/usr"]["extensions"] == st["/opt"]["extensions"] == ["a", "b", "c"]
    two.run("sysext", "unmerge", check=True)


def mountinfo_overlays(path: Path) -> list[mountinfo.Mount]:
    return [m for m in mountinfo.read() if m.mountpoint == str(path) and m.fstype == "overlay"]


@pytest.mark.parametrize("at", ["record@/usr", "record@/opt"])
def test_past_the_last_attach_a_record_that_cannot_be_saved_is_a_warning(two: Root,
                                                                         at: str) -> None:
    """Once every hierarchy is attached nothing is undone: a failure to save a record is a
    warning, the call succeeds, and the merge is whole (it exited 1 with both hierarchies
    merged, telling the user the merge had failed)."""
    r = two.run("sysext", "merge", env={"OVERLAYCTL_FAULT_ERROR": at})
    try:
        assert r.returncode == 0, r.stderr
        hier = at.split("@")[1]
        assert f"warning: Could not save the merge record of {hier}: injected failure" \
            in r.stderr
        st = status(two)
        assert st["/usr"]["merged"] and st["/opt"]["merged"]
        assert not (two / "run/overlayctl/sysext.merging").exists()
    finally:
        two.run("sysext", "unmerge", check=True)
    assert not status(two)["/usr"]["merged"] and not status(two)["/opt"]["merged"]
