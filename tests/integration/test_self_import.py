"""import and ephemeral-import with the mutable dir pointing at the hierarchy itself (issue
13, docs/modes.md): the real /etc is the top lower layer, above the confexts and the
defaults, read-only or under a private tmpfs upper, and it is never changed. Upstream refuses
this setup; test_peer.py's test_import_of_the_hierarchy_itself shows both sides."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator

import pytest

from tests.conftest import Root, umount_all_below
from tests.integration.olhelpers import APIS, overlays_at, status_json
from tests.integration.test_defaults import DEFAULTS, Flatcar
from tests.integration.trees import differences, tree

pytestmark = pytest.mark.root


@pytest.fixture
def fc(root: Root) -> Iterator[Flatcar]:
    f = Flatcar(root)
    yield f
    umount_all_below(str(root.path))


def raw(fc: Flatcar) -> dict[str, object]:
    """The raw /etc with times and inodes (valid while unmerged)."""
    return tree(str(fc.etc), times=True, skip_meta=False)


def plan(fc: Flatcar, mode: str, verb: str = "merge") -> dict[str, object]:
    r = fc.run("confext", verb, f"--mutable={mode}", f"--defaults={DEFAULTS}", "--dry-run",
               "--json=short", check=True)
    (p,) = json.loads(r.stdout)
    assert isinstance(p, dict)
    return p


@pytest.mark.parametrize("mode", ["import", "ephemeral-import"])
def test_the_real_etc_is_imported_once_above_confexts_and_defaults(fc: Flatcar,
                                                                   mode: str) -> None:
    p = plan(fc, mode)
    assert p["self_import"] is True
    assert [la["role"] for la in p["layers"]] == ["meta", "import", "extension", "defaults"]
    assert p["lowerdirs"].count(str(fc.etc)) == 1 and p["lowerdirs"][1] == str(fc.etc)
    assert p["readonly"] is (mode == "import")
    text = fc.run("confext", "merge", f"--mutable={mode}", f"--defaults={DEFAULTS}",
                  "--dry-run", check=True).stdout
    assert f"lower  {fc.etc}  [import: the hierarchy itself]" in text
    assert text.count(str(fc.etc) + " ") == 2   # the target line and the import layer


@APIS
def test_import_shows_the_original_etc_read_only(fc: Flatcar, env: dict[str, str]) -> None:
    before = raw(fc)
    fc.root.run("confext", "merge", "--mutable=import", f"--defaults={DEFAULTS}", env=env,
                check=True)
    assert len(overlays_at(fc.etc)) == 1
    # The original /etc wins over the confext and the defaults ...
    assert fc.read("hosts") == "host hosts\n"       # over a default
    assert fc.read("layered") == "host layered\n"   # over the confext and a default
    assert fc.read("local") == "host local\n"
    # ... which still provide what it lacks: confext over defaults.
    assert fc.read("extdef") == "ext extdef\n"
    assert fc.read("app.conf") == "app conf\n"
    assert fc.read("motd") == "default motd\n"
    assert fc.read("ssh/sshd_config") == "PermitRootLogin no\n"
    # Read-only.
    for attempt in (lambda: (fc.etc / "hosts").write_text("x"),
                    lambda: (fc.etc / "new").write_text("x"),
                    lambda: (fc.etc / "motd").unlink()):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    (row,) = [r for r in status_json(fc.root) if r["hierarchy"] == "/etc"]
    assert row["mutable"] == "import" and row["writable"] is False and row["upperdir"] is None
    assert row["defaults"] == DEFAULTS
    fc.root.run("confext", "unmerge", env=env, check=True)
    assert fc.root.mounts() == []
    assert differences(raw(fc), before) == {}


@APIS
def test_ephemeral_import_writes_vanish_and_the_real_etc_is_untouched(
        fc: Flatcar, env: dict[str, str]) -> None:
    before = raw(fc)
    fc.root.run("confext", "merge", "--mutable=ephemeral-import", f"--defaults={DEFAULTS}",
                env=env, check=True)
    assert fc.read("hosts") == "host hosts\n" and fc.read("layered") == "host layered\n"
    assert fc.root.writable("etc")
    (fc.etc / "hosts").write_text("edited hosts\n")     # a file of the real /etc
    (fc.etc / "motd").write_text("edited motd\n")       # a default
    (fc.etc / "new.conf").write_text("new\n")
    (fc.etc / "local").unlink()                         # a file of the real /etc
    (fc.etc / "app.conf").unlink()                      # a confext's file
    os.mkdir(fc.etc / "newdir")
    assert fc.read("hosts") == "edited hosts\n" and fc.read("new.conf") == "new\n"
    assert not (fc.etc / "local").exists() and not (fc.etc / "app.conf").exists()
    # Every write went to the private tmpfs, shown read-only in the metadata dir.
    eph = fc.etc / ".systemd-confext/ephemeral/upper"
    assert sorted(os.listdir(eph)) == ["app.conf", "hosts", "local", "motd", "new.conf",
                                       "newdir"]
    fc.root.run("confext", "unmerge", env=env, check=True)
    assert fc.root.mounts() == []
    assert differences(raw(fc), before) == {}
    # Merged again: the original /etc, none of the writes.
    fc.root.run("confext", "merge", "--mutable=ephemeral-import", f"--defaults={DEFAULTS}",
                env=env, check=True)
    assert fc.read("hosts") == "host hosts\n" and fc.read("motd") == "default motd\n"
    assert fc.read("local") == "host local\n" and fc.read("app.conf") == "app conf\n"
    assert not (fc.etc / "new.conf").exists()
    fc.root.run("confext", "unmerge", env=env, check=True)
    assert differences(raw(fc), before) == {}


def test_a_refresh_imports_the_plain_etc_not_the_merged_one(fc: Flatcar) -> None:
    """A refresh of a merged hierarchy must import the plain /etc under the overlay (a plain
    view), not the merged /etc: else a write to the old ephemeral upper would show through
    the new read-only overlay."""
    before = raw(fc)
    fc.merge("ephemeral-import")
    (fc.etc / "written-while-ephemeral").write_text("w\n")
    (fc.etc / "hosts").write_text("edited hosts\n")
    p = plan(fc, "import", "refresh")
    assert p["lowerdirs"][1] == str(fc.etc) and p["self_import"] is True
    fc.refresh("import")
    assert len(overlays_at(fc.etc)) == 1
    assert not (fc.etc / "written-while-ephemeral").exists()
    assert fc.read("hosts") == "host hosts\n"
    assert not fc.root.writable("etc")
    fc.refresh("ephemeral-import")
    assert len(overlays_at(fc.etc)) == 1 and fc.root.writable("etc")
    assert not (fc.etc / "written-while-ephemeral").exists()
    fc.unmerge()
    assert differences(raw(fc), before) == {}


def test_import_of_a_read_only_etc(fc: Flatcar) -> None:
    """The real /etc may be read-only (a read-only root): import needs no write access."""
    before = raw(fc)
    fc.root.ro_bind("etc")
    try:
        fc.merge("ephemeral-import")
        (fc.etc / "new.conf").write_text("new\n")
        assert fc.read("new.conf") == "new\n" and fc.read("hosts") == "host hosts\n"
        fc.run("confext", "unmerge", check=True)
    finally:
        umount_all_below(str(fc.etc))
    assert differences(raw(fc), before) == {}
