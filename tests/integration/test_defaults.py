"""OS defaults and upcopy (issue 3): a defaults layer below /etc, and the verbs diff, which,
reset, pin, unpin and cleanup. The main model is Flatcar's: the image's /etc lives in
/usr/share/flatcar/etc (the defaults layer), the real /etc is the upper layer
(/var/lib/extensions.mutable/etc -> /etc), and a confext sits above both. Everything is
checked as a user sees it: the merged tree, the raw /etc after unmerge, and the verbs' output."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Result, Root, umount_all_below
from tests.integration.olhelpers import assert_error, by_hierarchy, overlays_at, status_json

pytestmark = pytest.mark.root

DEFAULTS = "/usr/share/flatcar/etc"
DEFAULTS_FILES = {
    "hosts": "default hosts\n",
    "motd": "default motd\n",
    "layered": "default layered\n",
    "extdef": "default extdef\n",
    "resolv.conf": "nameserver 10.0.0.1\n",
    "passwd": "root:x:0:0::/root:/bin/sh\n",
    "issue": "default issue\n",
    "modefile": "default mode\n",
    "ownfile": "default owner\n",
    "xattrfile": "default xattr\n",
    "touched": "default touched\n",
    "typefile": "default type\n",
    "ssh/sshd_config": "PermitRootLogin no\n",
    "ssh/ssh_config": "Host *\n",
    "profile.d/a.sh": "echo a\n",
    "profile.d/b.sh": "echo b\n",
}
HOST_FILES = {
    "hosts": "host hosts\n",          # host content over a default: host wins
    "local": "host local\n",          # host content with nothing below
    "layered": "host layered\n",      # defaults < host < confext (host as a lower)
}
EXT_FILES = {
    "app.conf": "app conf\n",
    "layered": "ext layered\n",
    "extdef": "ext extdef\n",        # defaults < confext
}


class Flatcar:
    """A root laid out like a Flatcar machine (see the module docstring)."""

    def __init__(self, root: Root, confext: bool = True) -> None:
        self.root = root
        (root / "usr/lib/os-release").write_text("ID=flatcar\nVERSION_ID=4000.0.0\n")
        self.defaults = root / DEFAULTS
        for rel, text in DEFAULTS_FILES.items():
            self.write_default(rel, text)
        self.etc = root / "etc"
        self.etc.mkdir(mode=0o755)
        self.etc.chmod(0o755)
        for rel, text in HOST_FILES.items():
            (self.etc / rel).write_text(text)
        if confext:
            root.confext("app", {f"etc/{k}": v for k, v in EXT_FILES.items()})
        (root / "var/lib/extensions.mutable/etc").symlink_to("../../../etc")

    def write_default(self, rel: str, text: str) -> None:
        p = self.defaults / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    # -- running overlayctl ---------------------------------------------------------------

    def run(self, *args: str, check: bool = False) -> Result:
        return self.root.run(*args, check=check)

    def merge(self, mode: str = "yes", *extra: str) -> None:
        self.run("confext", "merge", f"--mutable={mode}", f"--defaults={DEFAULTS}", *extra,
                 check=True)
        assert len(overlays_at(self.etc)) == 1

    def refresh(self, mode: str = "yes", *extra: str) -> None:
        self.run("confext", "refresh", f"--mutable={mode}", f"--defaults={DEFAULTS}",
                 "--always-refresh=yes", *extra, check=True)

    def unmerge(self) -> None:
        self.run("confext", "unmerge", check=True)
        assert self.root.mounts() == []

    def diff(self, *paths: str) -> dict[str, dict[str, Any]]:
        r = self.run("diff", "--json=short", *paths, check=True)
        rows = json.loads(r.stdout)
        assert isinstance(rows, list)
        out = {row["path"]: row for row in rows}
        assert len(out) == len(rows), "a path is listed twice"
        return out

    def changes(self, *paths: str) -> dict[str, str]:
        return {p: r["change"] for p, r in self.diff(*paths).items()}

    def which(self, path: str) -> dict[str, Any]:
        r = self.run("which", path, "--json=short", check=True)
        v = json.loads(r.stdout)
        assert isinstance(v, dict)
        return v

    def verb(self, *args: str) -> list[dict[str, Any]]:
        r = self.run(*args, "--json=short", check=True)
        v = json.loads(r.stdout)
        assert isinstance(v, list)
        return v

    # -- looking -----------------------------------------------------------------------------

    def read(self, rel: str) -> str:
        return (self.etc / rel).read_text()

    def raw_tree(self) -> dict[str, tuple[int, int, int, int, bytes | str | None]]:
        """The raw /etc (valid while unmerged): type, mode, owner, rdev and content."""
        out: dict[str, tuple[int, int, int, int, bytes | str | None]] = {}
        for dirpath, dirnames, filenames in os.walk(self.etc):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                body: bytes | str | None = None
                if stat.S_ISREG(st.st_mode):
                    body = Path(p).read_bytes()
                elif stat.S_ISLNK(st.st_mode):
                    body = os.readlink(p)
                out[os.path.relpath(p, self.etc)] = (st.st_mode, st.st_uid, st.st_gid,
                                                      st.st_rdev, body)
        return out

    def defaults_tree(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.defaults)): p.read_bytes()
                for p in self.defaults.rglob("*") if p.is_file()}


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque(p: Path) -> bool:
    try:
        return os.getxattr(p, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


@pytest.fixture
def fc(root: Root) -> Iterator[Flatcar]:
    f = Flatcar(root)
    yield f
    # A failing test may stop half-way with /etc merged; take it down so the failure is
    # reported once. Passing tests unmerge themselves and assert that nothing is left.
    umount_all_below(str(root.path))


@pytest.fixture
def bare(root: Root) -> Iterator[Flatcar]:
    """The Flatcar layout without any confext."""
    f = Flatcar(root, confext=False)
    yield f
    umount_all_below(str(root.path))


# ---------------------------------------------------------------------------------------------
# The defaults layer in every mode


def test_flatcar_model_end_to_end(fc: Flatcar) -> None:
    before_defaults = fc.defaults_tree()
    fc.merge("yes")
    # What is visible: defaults, host /etc over them, the confext over the defaults. The
    # real /etc is the upper here, so its content is on top of everything, the confext too.
    assert fc.read("motd") == "default motd\n"
    assert fc.read("ssh/sshd_config") == "PermitRootLogin no\n"
    assert fc.read("hosts") == "host hosts\n"
    assert fc.read("local") == "host local\n"
    assert fc.read("extdef") == "ext extdef\n"
    assert fc.read("layered") == "host layered\n"
    assert fc.read("app.conf") == "app conf\n"
    assert fc.root.writable("etc")

    # Where writes land: in the real /etc (the upper), never in the defaults or the confext.
    (fc.etc / "motd").write_text("my motd\n")
    (fc.etc / "new.conf").write_text("new\n")
    (fc.etc / "app.conf").write_text("my app conf\n")
    (fc.etc / "ssh/sshd_config").unlink()
    assert fc.read("motd") == "my motd\n"
    assert not (fc.etc / "ssh/sshd_config").exists()
    assert fc.defaults_tree() == before_defaults
    assert (fc.root / "var/lib/confexts/app/etc/app.conf").read_text() == "app conf\n"

    fc.unmerge()
    # What survives unmerge: the host files and the user's changes, nothing else.
    raw = fc.raw_tree()
    assert (fc.etc / "motd").read_text() == "my motd\n"
    assert (fc.etc / "new.conf").read_text() == "new\n"
    assert (fc.etc / "app.conf").read_text() == "my app conf\n"
    assert (fc.etc / "hosts").read_text() == "host hosts\n"
    assert (fc.etc / "local").read_text() == "host local\n"
    assert (fc.etc / "layered").read_text() == "host layered\n"
    assert is_whiteout(fc.etc / "ssh/sshd_config")
    # Untouched defaults were never copied into the real /etc.
    for rel in ("issue", "resolv.conf", "ssh/ssh_config", "profile.d"):
        assert rel not in raw, f"{rel} was copied up without being touched"
    assert not any(n.startswith(".systemd-") for n in os.listdir(fc.etc))
    assert fc.defaults_tree() == before_defaults

    # Merging again brings the same view back, with the changes kept.
    fc.merge("yes")
    assert fc.read("motd") == "my motd\n"
    assert fc.read("app.conf") == "my app conf\n"
    assert fc.read("issue") == "default issue\n"
    assert not (fc.etc / "ssh/sshd_config").exists()
    fc.unmerge()


def test_readonly_etc_over_defaults(fc: Flatcar) -> None:
    before = fc.raw_tree()
    fc.merge("no")
    assert fc.read("motd") == "default motd\n"
    assert fc.read("hosts") == "host hosts\n"
    assert fc.read("layered") == "ext layered\n"
    assert fc.read("extdef") == "ext extdef\n"
    assert fc.read("app.conf") == "app conf\n"
    assert not fc.root.writable("etc")
    with pytest.raises(OSError):
        (fc.etc / "motd").write_text("x")
    assert fc.which("/etc/hosts")["layer"] == "base"
    assert fc.which("/etc/motd")["layer"] == "defaults"
    assert fc.which("/etc/layered") == {"path": "/etc/layered", "layer": "extension",
                                        "extension": "app",
                                        "source": "/var/lib/confexts/app/etc/layered"}
    row = by_hierarchy(status_json(fc.root, "confext"))["/etc"]
    assert row["mutable"] == "no" and row["defaults"] == DEFAULTS and not row["writable"]
    # Nothing local to reset without an upper: a clear error, nothing changed.
    assert_error(fc.run("reset", "/etc/hosts"), "no upper")
    fc.unmerge()
    assert fc.raw_tree() == before


def test_readonly_defaults_without_confext(bare: Flatcar) -> None:
    """A defaults layer alone is reason enough to merge a read-only /etc."""
    bare.merge("no")
    assert bare.read("motd") == "default motd\n"
    assert bare.read("hosts") == "host hosts\n"
    assert not bare.root.writable("etc")
    bare.unmerge()


def test_ephemeral_etc_over_defaults(fc: Flatcar) -> None:
    before = fc.raw_tree()
    before_defaults = fc.defaults_tree()
    fc.merge("ephemeral")
    assert fc.read("motd") == "default motd\n"
    assert fc.read("hosts") == "host hosts\n"
    assert fc.read("layered") == "ext layered\n"
    assert fc.read("extdef") == "ext extdef\n"
    (fc.etc / "motd").write_text("transient\n")
    (fc.etc / "new.conf").write_text("transient\n")
    (fc.etc / "hosts").unlink()
    assert fc.read("motd") == "transient\n"
    assert not (fc.etc / "hosts").exists()
    # diff and which read the ephemeral upper (through the overlay's own read-only view).
    assert fc.changes() == {"/etc/motd": "modified", "/etc/new.conf": "added",
                            "/etc/hosts": "deleted"}
    rows = fc.diff()
    assert rows["/etc/hosts"]["layer"] == "base" and rows["/etc/motd"]["layer"] == "defaults"
    assert fc.which("/etc/motd")["layer"] == "upper"
    assert fc.which("/etc/new.conf")["layer"] == "upper"
    assert fc.which("/etc/local")["layer"] == "base"
    assert_error(fc.run("which", "/etc/hosts"), "/etc/hosts", "deleted")
    # reset works on the ephemeral upper too, and the hierarchy stays merged.
    fc.verb("reset", "/etc/hosts")
    assert fc.read("hosts") == "host hosts\n"
    assert fc.read("motd") == "transient\n"
    assert len(overlays_at(fc.etc)) == 1
    fc.unmerge()
    # Nothing written while merged landed anywhere.
    assert fc.raw_tree() == before
    assert fc.defaults_tree() == before_defaults
    fc.merge("ephemeral")
    assert fc.read("motd") == "default motd\n"
    assert not (fc.etc / "new.conf").exists()
    fc.unmerge()


def test_mutable_merge_zero_confexts_with_defaults(bare: Flatcar) -> None:
    bare.merge("yes")
    assert bare.read("motd") == "default motd\n"
    assert bare.read("hosts") == "host hosts\n"
    (bare.etc / "written").write_text("w\n")
    row = by_hierarchy(status_json(bare.root, "confext"))["/etc"]
    assert row["mutable"] == "yes" and row["writable"]
    assert row["defaults"] == DEFAULTS
    assert row["extensions"] == []
    bare.unmerge()
    assert (bare.etc / "written").read_text() == "w\n"
    assert not (bare.etc / "motd").exists()


def test_status_json_shows_defaults(fc: Flatcar) -> None:
    assert by_hierarchy(status_json(fc.root, "confext"))["/etc"]["defaults"] is None
    fc.merge("yes")
    row = by_hierarchy(status_json(fc.root, "confext"))["/etc"]
    assert row["defaults"] == DEFAULTS
    assert row["upperdir"] == "/etc"
    assert row["extensions"] == ["app"]
    fc.unmerge()
    assert by_hierarchy(status_json(fc.root, "confext"))["/etc"]["defaults"] is None


def test_defaults_from_config_file(fc: Flatcar) -> None:
    conf = fc.root / "usr/lib/overlayctl/confext.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[Defaults]\n/etc={DEFAULTS}\n")
    fc.run("confext", "merge", "--mutable=yes", check=True)
    assert fc.read("motd") == "default motd\n"
    assert by_hierarchy(status_json(fc.root, "confext"))["/etc"]["defaults"] == DEFAULTS
    fc.unmerge()


def test_refresh_with_other_defaults(fc: Flatcar) -> None:
    other = fc.root / "usr/share/other/etc"
    other.mkdir(parents=True)
    (other / "only-in-other").write_text("other\n")
    fc.merge("yes")
    fc.run("confext", "refresh", "--mutable=yes", "--defaults=/usr/share/other/etc",
           check=True)
    try:
        assert (fc.etc / "only-in-other").exists()
        assert not (fc.etc / "motd").exists()
        assert by_hierarchy(status_json(fc.root, "confext"))["/etc"]["defaults"] == \
            "/usr/share/other/etc"
    finally:
        fc.unmerge()


# ---------------------------------------------------------------------------------------------
# diff


def make_every_change(fc: Flatcar) -> None:
    """Through the merged /etc, one local change of every kind."""
    e = fc.etc
    (e / "added.conf").write_text("added\n")
    (e / "motd").write_text("my motd\n")                       # modified: content
    os.chmod(e / "modefile", 0o600)                            # modified: mode
    os.chown(e / "ownfile", 1, 1)                              # modified: owner
    os.setxattr(e / "xattrfile", "user.comment", b"mine")      # modified: xattr
    os.utime(e / "touched", (1_000_000_000, 1_000_000_000))    # mtime only: identical
    (e / "resolv.conf").unlink()                               # deleted
    for n in os.listdir(e / "profile.d"):                      # opaque
        (e / "profile.d" / n).unlink()
    (e / "profile.d").rmdir()
    (e / "profile.d").mkdir()
    (e / "profile.d/z.sh").write_text("echo z\n")
    (e / "typefile").unlink()                                  # type-changed
    (e / "typefile").symlink_to("motd")
    (e / "app.conf").write_text("my app\n")                    # modified over the extension


EXPECTED = {
    # path: (change, layer, extension)
    "/etc/added.conf": ("added", None, None),
    "/etc/local": ("added", None, None),
    "/etc/hosts": ("modified", "defaults", None),
    "/etc/layered": ("modified", "extension", "app"),   # host content over the confext
    "/etc/motd": ("modified", "defaults", None),
    "/etc/modefile": ("modified", "defaults", None),
    "/etc/ownfile": ("modified", "defaults", None),
    "/etc/xattrfile": ("modified", "defaults", None),
    "/etc/touched": ("identical", "defaults", None),
    "/etc/resolv.conf": ("deleted", "defaults", None),
    "/etc/profile.d": ("opaque", "defaults", None),
    "/etc/profile.d/z.sh": ("added", None, None),
    "/etc/typefile": ("type-changed", "defaults", None),
    "/etc/app.conf": ("modified", "extension", "app"),
}


def check_every_change(rows: dict[str, dict[str, Any]]) -> None:
    got = {p: (r["change"], r["layer"], r["extension"]) for p, r in rows.items()}
    assert got == EXPECTED
    for p, r in rows.items():
        assert {"path", "change", "layer", "default_changed"} <= set(r), p
        assert r["default_changed"] is False, p


def test_diff_every_change_kind_merged_and_unmerged(fc: Flatcar) -> None:
    fc.merge("yes")
    assert fc.changes() == {"/etc/hosts": "modified", "/etc/local": "added",
                            "/etc/layered": "modified"}
    make_every_change(fc)
    merged = fc.diff()
    check_every_change(merged)
    # The untouched layers: defaults below, extension content, are no local change.
    assert "/etc/issue" not in merged and "/etc/extdef" not in merged
    fc.unmerge()
    unmerged = fc.diff()
    assert unmerged == merged
    # The raw /etc really holds what the report says.
    assert is_whiteout(fc.etc / "resolv.conf")
    assert opaque(fc.etc / "profile.d")
    assert os.readlink(fc.etc / "typefile") == "motd"
    # PATH arguments narrow the report to those paths (directories with their contents).
    assert fc.changes("/etc/profile.d") == {"/etc/profile.d": "opaque",
                                            "/etc/profile.d/z.sh": "added"}
    assert fc.changes("/etc/motd", "/etc/touched") == {"/etc/motd": "modified",
                                                        "/etc/touched": "identical"}
    # The human-readable form names the same changes.
    text = fc.run("diff", check=True).stdout
    for p, (change, _, _) in EXPECTED.items():
        assert any(line.split()[:2] == [change, p] for line in text.splitlines()), (p, text)


def test_diff_mtime_alone_is_identical(fc: Flatcar) -> None:
    fc.merge("yes")
    os.utime(fc.etc / "issue", (1, 1))
    os.utime(fc.etc / "ssh/ssh_config", ns=(5, 5))
    fc.unmerge()
    # The copies were made (the raw /etc holds them) but are not changes.
    assert (fc.etc / "issue").exists() and (fc.etc / "ssh/ssh_config").exists()
    rows = fc.diff()
    assert rows["/etc/issue"]["change"] == "identical"
    assert rows["/etc/ssh/ssh_config"]["change"] == "identical"
    assert "/etc/ssh" not in rows


def test_diff_content(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("my motd\nsecond line\n")
    out = fc.run("diff", "--content", "/etc/motd", check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("--- a/etc/motd") and "defaults" in lines[0]
    assert lines[1].startswith("+++ b/etc/motd")
    assert "-default motd" in lines and "+my motd" in lines and "+second line" in lines
    fc.unmerge()
    assert fc.run("diff", "--content", "/etc/motd", check=True).stdout == out
    # An identical copy has an empty diff.
    fc.merge("yes")
    os.utime(fc.etc / "issue", (1, 1))
    assert fc.run("diff", "--content", "/etc/issue", check=True).stdout == ""
    fc.unmerge()


# ---------------------------------------------------------------------------------------------
# which


def test_which_every_layer(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("mine\n")
    (fc.etc / "resolv.conf").unlink()
    for _ in ("merged", "unmerged"):
        assert fc.which("/etc/motd") == {"path": "/etc/motd", "layer": "upper",
                                         "extension": None, "source": "/etc/motd"}
        assert fc.which("/etc/hosts")["layer"] == "upper"
        assert fc.which("/etc/app.conf") == {"path": "/etc/app.conf", "layer": "extension",
                                             "extension": "app",
                                             "source": "/var/lib/confexts/app/etc/app.conf"}
        assert fc.which("/etc/ssh/sshd_config") == {
            "path": "/etc/ssh/sshd_config", "layer": "defaults", "extension": None,
            "source": f"{DEFAULTS}/ssh/sshd_config"}
        assert fc.which("/etc/ssh")["layer"] == "defaults"
        # A deleted path is provided by no layer: an error naming the whiteout.
        assert_error(fc.run("which", "/etc/resolv.conf"), "/etc/resolv.conf", "deleted")
        assert_error(fc.run("which", "/etc/no-such-file"), "/etc/no-such-file")
        if fc.root.mounts():
            fc.unmerge()
    text = fc.run("which", "/etc/ssh/sshd_config", check=True).stdout
    assert "defaults" in text and f"{DEFAULTS}/ssh/sshd_config" in text


def test_which_base_layer(fc: Flatcar) -> None:
    fc.merge("ephemeral")
    assert fc.which("/etc/hosts") == {"path": "/etc/hosts", "layer": "base",
                                      "extension": None, "source": "/etc/hosts"}
    assert fc.which("/etc/local")["layer"] == "base"
    assert fc.which("/etc/motd")["layer"] == "defaults"
    fc.unmerge()


# ---------------------------------------------------------------------------------------------
# reset


def test_reset_file_whiteout_and_directory(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("mine\n")
    (fc.etc / "resolv.conf").unlink()
    (fc.etc / "profile.d/a.sh").write_text("echo mine\n")
    (fc.etc / "profile.d/b.sh").unlink()
    os.chmod(fc.etc / "profile.d", 0o700)
    (fc.etc / "issue").write_text("kept\n")
    fc.unmerge()

    # --dry-run reports and changes nothing.
    before = fc.raw_tree()
    acts = fc.verb("reset", "--dry-run", "/etc/motd", "/etc/resolv.conf", "/etc/profile.d")
    assert [(a["path"], a["action"]) for a in acts] == [
        ("/etc/motd", "reset"), ("/etc/resolv.conf", "reset"), ("/etc/profile.d", "reset")]
    assert fc.raw_tree() == before

    acts = fc.verb("reset", "/etc/motd", "/etc/resolv.conf", "/etc/profile.d")
    assert [(a["path"], a["action"]) for a in acts] == [
        ("/etc/motd", "reset"), ("/etc/resolv.conf", "reset"), ("/etc/profile.d", "reset")]
    raw = fc.raw_tree()
    assert "motd" not in raw and "resolv.conf" not in raw
    assert not any(r == "profile.d" or r.startswith("profile.d/") for r in raw)
    assert (fc.etc / "issue").read_text() == "kept\n"
    changes = fc.changes()
    assert "/etc/issue" in changes
    assert not {"/etc/motd", "/etc/resolv.conf", "/etc/profile.d",
                "/etc/profile.d/a.sh", "/etc/profile.d/b.sh"} & set(changes)

    fc.merge("yes")
    assert fc.read("motd") == "default motd\n"
    assert fc.read("resolv.conf") == "nameserver 10.0.0.1\n"
    assert fc.read("profile.d/a.sh") == "echo a\n"
    assert fc.read("profile.d/b.sh") == "echo b\n"
    assert stat.S_IMODE(os.stat(fc.etc / "profile.d").st_mode) == 0o755
    fc.unmerge()


def test_reset_path_without_copy_is_a_no_op(fc: Flatcar) -> None:
    before = fc.raw_tree()
    fc.merge("yes")
    acts = fc.verb("reset", "/etc/issue")
    assert [(a["path"], a["action"]) for a in acts] == [("/etc/issue", "unchanged")]
    fc.unmerge()
    assert fc.raw_tree() == before


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_reset_refuses_path_nothing_below_provides(fc: Flatcar, merged: bool) -> None:
    fc.merge("yes")
    (fc.etc / "mine.conf").write_text("precious\n")
    (fc.etc / "motd").write_text("mine\n")
    if not merged:
        fc.unmerge()
    for p in ("/etc/mine.conf", "/etc/local"):
        res = fc.run("reset", p)
        assert_error(res, p)
        res = fc.run("reset", "--dry-run", p)
        assert_error(res, p)
    # Nothing else of a refused call happens either.
    assert_error(fc.run("reset", "/etc/motd", "/etc/mine.conf"), "/etc/mine.conf")
    assert fc.read("mine.conf") == "precious\n"
    assert fc.read("local") == "host local\n"
    assert fc.read("motd") == "mine\n"
    if merged:
        assert len(overlays_at(fc.etc)) == 1
        fc.unmerge()
    assert (fc.etc / "mine.conf").read_text() == "precious\n"
    assert (fc.etc / "motd").read_text() == "mine\n"


def test_reset_directory_keeps_local_files_below(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "profile.d/a.sh").write_text("echo mine\n")
    (fc.etc / "profile.d/mine.sh").write_text("precious\n")
    fc.unmerge()
    res = fc.run("reset", "/etc/profile.d")
    # Either refused with one clear error, or the local file is kept: never lost.
    if res.returncode != 0:
        assert_error(res, "/etc/profile.d")
    assert (fc.etc / "profile.d/mine.sh").read_text() == "precious\n"


def test_reset_on_merged_hierarchy(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("mine\n")
    (fc.etc / "resolv.conf").unlink()
    (fc.etc / "issue").write_text("kept\n")
    old = overlays_at(fc.etc)[0]["id"]
    fc.verb("reset", "/etc/motd", "/etc/resolv.conf")
    # Still merged (one overlay, a new one), the defaults visible at once, the rest kept.
    now = overlays_at(fc.etc)
    assert len(now) == 1 and now[0]["id"] != old
    assert fc.read("motd") == "default motd\n"
    assert fc.read("resolv.conf") == "nameserver 10.0.0.1\n"
    assert fc.read("issue") == "kept\n"
    assert fc.read("app.conf") == "app conf\n"
    assert fc.root.writable("etc")
    row = by_hierarchy(status_json(fc.root, "confext"))["/etc"]
    assert row["extensions"] == ["app"] and row["defaults"] == DEFAULTS
    assert row["mutable"] == "yes"
    assert set(fc.changes()) == {"/etc/hosts", "/etc/local", "/etc/layered", "/etc/issue"}
    # Writes still land in the real /etc.
    (fc.etc / "after.conf").write_text("after\n")
    fc.unmerge()
    assert (fc.etc / "after.conf").read_text() == "after\n"
    assert not (fc.etc / "motd").exists() and not (fc.etc / "resolv.conf").exists()
    assert not [n for n in os.listdir(fc.root.path) if "workdir" in n]


def test_reset_on_merged_keeps_forced_extension(fc: Flatcar) -> None:
    rel = fc.root / "var/lib/confexts/app/etc/extension-release.d/extension-release.app"
    rel.write_text("ID=otheros\n")
    fc.merge("yes", "--force")
    assert fc.read("app.conf") == "app conf\n"
    (fc.etc / "motd").write_text("mine\n")
    fc.verb("reset", "/etc/motd")
    try:
        assert fc.read("motd") == "default motd\n"
        assert fc.read("app.conf") == "app conf\n"
    finally:
        fc.unmerge()


# ---------------------------------------------------------------------------------------------
# pin, unpin, cleanup


def test_pin_and_cleanup(fc: Flatcar) -> None:
    fc.merge("yes")
    os.utime(fc.etc / "issue", (1, 1))              # identical copy, unpinned
    os.utime(fc.etc / "motd", (1, 1))               # identical copy, pinned below
    acts = fc.verb("pin", "/etc/motd", "/etc/ssh/ssh_config")
    assert [(a["path"], a["action"]) for a in acts] == [
        ("/etc/motd", "pinned"), ("/etc/ssh/ssh_config", "pinned")]
    # Pinning a default that had no copy copies it up, identical, through the overlay.
    assert fc.read("ssh/ssh_config") == "Host *\n"
    rows = fc.diff()
    assert rows["/etc/ssh/ssh_config"]["change"] == "identical"
    assert rows["/etc/ssh/ssh_config"]["pinned"] is True
    assert rows["/etc/motd"]["pinned"] is True and rows["/etc/issue"]["pinned"] is False

    # cleanup --dry-run says what it would do and does nothing.
    dry = fc.verb("cleanup", "--dry-run")
    assert [(a["path"], a["action"]) for a in dry] == [("/etc/issue", "removed")]
    assert "/etc/issue" in fc.diff()

    done = fc.verb("cleanup")
    assert [(a["path"], a["action"]) for a in done] == [("/etc/issue", "removed")]
    assert len(overlays_at(fc.etc)) == 1
    assert fc.read("issue") == "default issue\n"
    assert set(fc.changes()) == {"/etc/hosts", "/etc/local", "/etc/layered", "/etc/motd",
                                 "/etc/ssh/ssh_config"}
    # Host content that differs from the default is never "identical": kept.
    assert fc.read("hosts") == "host hosts\n"

    # unpin, then cleanup drops the copy (and the directory it needed).
    acts = fc.verb("unpin", "/etc/ssh/ssh_config")
    assert [(a["path"], a["action"]) for a in acts] == [("/etc/ssh/ssh_config", "unpinned")]
    done = fc.verb("cleanup")
    assert ("/etc/ssh/ssh_config", "removed") in [(a["path"], a["action"]) for a in done]
    assert "/etc/motd" not in [a["path"] for a in done]
    assert set(fc.changes()) == {"/etc/hosts", "/etc/local", "/etc/layered", "/etc/motd"}
    fc.unmerge()
    raw = fc.raw_tree()
    assert "motd" in raw and "issue" not in raw and "ssh/ssh_config" not in raw


def test_pin_unmerged_copies_default_up(fc: Flatcar) -> None:
    (fc.defaults / "ssh/ssh_config").chmod(0o640)
    fc.merge("yes")
    fc.unmerge()
    acts = fc.verb("pin", "/etc/ssh/ssh_config")
    assert [(a["path"], a["action"]) for a in acts] == [("/etc/ssh/ssh_config", "pinned")]
    copy = fc.etc / "ssh/ssh_config"
    assert copy.read_text() == "Host *\n"
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o640
    assert fc.diff()["/etc/ssh/ssh_config"]["change"] == "identical"
    assert fc.verb("cleanup") == []
    assert copy.exists()
    # A pinned path that is deleted locally cannot be pinned; nothing changes.
    (fc.etc / "resolv.conf").unlink(missing_ok=True)
    os.mknod(fc.etc / "resolv.conf", stat.S_IFCHR | 0o000, 0)
    assert_error(fc.run("pin", "/etc/resolv.conf"), "/etc/resolv.conf")
    assert is_whiteout(fc.etc / "resolv.conf")


def test_cleanup_keep_defaults_whiteouts(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "resolv.conf").unlink()
    (fc.etc / "passwd").unlink()
    (fc.etc / "motd").unlink()
    fc.unmerge()
    conf = fc.etc / "overlayctl/confext.conf"
    conf.parent.mkdir()
    conf.write_text("[Cleanup]\nKeepDefaults=/etc/resolv.conf /etc/passwd /etc/not-deleted\n")
    dry = fc.verb("cleanup", "--dry-run")
    assert sorted((a["path"], a["action"]) for a in dry) == [
        ("/etc/passwd", "removed"), ("/etc/resolv.conf", "removed")]
    assert is_whiteout(fc.etc / "resolv.conf") and is_whiteout(fc.etc / "passwd")
    done = fc.verb("cleanup")
    assert sorted((a["path"], a["action"]) for a in done) == [
        ("/etc/passwd", "removed"), ("/etc/resolv.conf", "removed")]
    assert not (fc.etc / "resolv.conf").exists() and not (fc.etc / "passwd").exists()
    assert is_whiteout(fc.etc / "motd"), "a whiteout not in KeepDefaults is the user's choice"
    fc.merge("yes")
    assert fc.read("resolv.conf") == "nameserver 10.0.0.1\n"
    assert fc.read("passwd").startswith("root:")
    assert not (fc.etc / "motd").exists()
    fc.unmerge()


def test_merge_clears_stale_opaque_marker(fc: Flatcar) -> None:
    """A directory made while merged got the kernel's opaque marker; once an OS update
    brings a default directory of that name, the next merge clears it (hygiene.py)."""
    fc.merge("yes")
    (fc.etc / "newdir").mkdir()
    (fc.etc / "newdir/mine.conf").write_text("mine\n")
    fc.unmerge()
    fc.write_default("newdir/default.conf", "default\n")
    r = fc.run("confext", "merge", "--mutable=yes", f"--defaults={DEFAULTS}", check=True)
    assert "Cleared the opaque marker of /etc/newdir" in r.stderr
    assert sorted(os.listdir(fc.etc / "newdir")) == ["default.conf", "mine.conf"]
    assert "/etc/newdir" not in fc.diff()
    assert [a for a in fc.verb("cleanup") if a["path"] == "/etc/newdir"] == []
    fc.unmerge()
    assert (fc.etc / "newdir/mine.conf").read_text() == "mine\n"


def test_cleanup_clears_stale_opaque_marker(fc: Flatcar) -> None:
    """Without the directory record of the last merge (an older overlayctl, or upstream's
    merge) the merge takes the marker for a deliberate one; cleanup still knows better
    from the manifest (there was no default when the directory was made)."""
    fc.merge("yes")
    (fc.etc / "newdir").mkdir()
    (fc.etc / "newdir/mine.conf").write_text("mine\n")
    fc.unmerge()
    # An OS update brings a default directory of the same name.
    fc.write_default("newdir/default.conf", "default\n")
    (fc.root / "var/lib/overlayctl/confext/etc.dirs").unlink()
    fc.merge("yes")
    assert sorted(os.listdir(fc.etc / "newdir")) == ["mine.conf"]
    assert fc.diff()["/etc/newdir"]["change"] == "opaque"
    done = fc.verb("cleanup")
    assert [(a["path"], a["action"]) for a in done] == [("/etc/newdir", "cleared-opaque")]
    assert sorted(os.listdir(fc.etc / "newdir")) == ["default.conf", "mine.conf"]
    assert "/etc/newdir" not in fc.diff()
    fc.unmerge()
    assert (fc.etc / "newdir/mine.conf").read_text() == "mine\n"


def test_cleanup_keeps_files_below_opaque_dir(fc: Flatcar) -> None:
    fc.merge("yes")
    # Delete the default directory and recreate it with one file of the same content.
    for n in os.listdir(fc.etc / "profile.d"):
        (fc.etc / "profile.d" / n).unlink()
    (fc.etc / "profile.d").rmdir()
    (fc.etc / "profile.d").mkdir()
    (fc.etc / "profile.d/a.sh").write_text("echo a\n")
    assert sorted(os.listdir(fc.etc / "profile.d")) == ["a.sh"]
    try:
        # It shadows nothing: the opaque parent hides the default a.sh.
        assert fc.changes("/etc/profile.d") == {"/etc/profile.d": "opaque",
                                                "/etc/profile.d/a.sh": "added"}
        fc.verb("cleanup")
        assert sorted(os.listdir(fc.etc / "profile.d")) == ["a.sh"]
    finally:
        fc.unmerge()


# ---------------------------------------------------------------------------------------------
# default_changed and the manifest


def test_default_changed_after_os_update(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("my motd\n")
    (fc.etc / "issue").write_text("my issue\n")
    (fc.etc / "profile.d/a.sh").write_text("echo mine\n")
    (fc.etc / "extra.conf").write_text("mine\n")
    fc.unmerge()
    manifest = fc.root / "var/lib/overlayctl/confext/etc.manifest"
    assert manifest.is_file()
    assert not [p for p in fc.etc.rglob("*") if "manifest" in p.name]

    # The OS update: motd and a.sh change, issue does not, extra.conf gets a default.
    fc.write_default("motd", "default motd v2\n")
    fc.write_default("profile.d/a.sh", "echo a v2\n")
    fc.write_default("extra.conf", "default extra\n")
    fc.merge("yes")
    rows = fc.diff()
    assert rows["/etc/motd"]["default_changed"] is True
    assert rows["/etc/profile.d/a.sh"]["default_changed"] is True
    assert rows["/etc/extra.conf"]["change"] == "modified"
    assert rows["/etc/extra.conf"]["default_changed"] is True
    assert rows["/etc/issue"]["default_changed"] is False
    assert rows["/etc/hosts"]["default_changed"] is False
    assert "yes" in next(ln for ln in fc.run("diff", check=True).stdout.splitlines()
                         if "/etc/motd" in ln)
    fc.unmerge()
    # Unmerged, and after another merge without a change, it stays true.
    assert fc.diff()["/etc/motd"]["default_changed"] is True
    fc.merge("yes")
    fc.refresh("yes")
    assert fc.diff()["/etc/motd"]["default_changed"] is True

    # pin acknowledges the new default; reset drops the copy.
    fc.verb("pin", "/etc/motd")
    fc.verb("reset", "/etc/profile.d/a.sh")
    rows = fc.diff()
    assert rows["/etc/motd"]["default_changed"] is False
    assert rows["/etc/motd"]["pinned"] is True
    assert "/etc/profile.d/a.sh" not in rows
    assert fc.read("profile.d/a.sh") == "echo a v2\n"
    assert rows["/etc/extra.conf"]["default_changed"] is True
    # A new copy of the reset path, made after the update, has an unchanged default.
    (fc.etc / "profile.d/a.sh").write_text("echo mine again\n")
    fc.unmerge()
    fc.merge("yes")
    rows = fc.diff()
    assert rows["/etc/profile.d/a.sh"]["default_changed"] is False
    assert rows["/etc/motd"]["default_changed"] is False
    fc.unmerge()
    assert fc.diff()["/etc/motd"]["default_changed"] is False

    # A second update makes the pinned copy's default stale again.
    fc.write_default("motd", "default motd v3\n")
    assert fc.diff()["/etc/motd"]["default_changed"] is True


def test_manifest_format(fc: Flatcar) -> None:
    fc.merge("yes")
    (fc.etc / "motd").write_text("mine\n")
    fc.verb("pin", "/etc/issue")
    fc.unmerge()
    fc.merge("yes")
    fc.unmerge()
    m = json.loads((fc.root / "var/lib/overlayctl/confext/etc.manifest").read_text())
    assert m["version"] == 1 and m["snapshot_taken"] is True
    assert m["pinned"] == ["issue"]
    size, mtime_ns, ino, digest = m["lower"]["motd"]
    st = os.stat(fc.defaults / "motd")
    assert (size, mtime_ns, ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert m["copies"]["motd"] == digest
    assert m["copies"]["local"] == ""
    assert "app.conf" in m["lower"]
    record = json.loads((fc.root / "var/lib/overlayctl/confext/etc.json").read_text())
    assert record["defaults"] == DEFAULTS and record["mode"] == "yes"
