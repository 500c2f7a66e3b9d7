"""Bad input and failures (reference §2.1, §4.2, §6.1, §7, §9.3, §10): one line on stderr
starting with 'overlayctl:' that names what is wrong, exit status 1, no traceback, and the
system left exactly as it was. Plus concurrent invocations on one root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Root
from tests.integration.olhelpers import (
    APIS,
    assert_error,
    by_hierarchy,
    mount_id,
    odd_root,
    overlays_at,
    popen,
    status_json,
    unmerged,
)

pytestmark = pytest.mark.root



def snapshot(root: Root) -> dict[str, tuple[int, int]]:
    """Every path below the root (except overlayctl's lock dir) with its mode and size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root.path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root.path)
            if rel == "run" or rel.startswith("run/overlayctl"):
                continue
            st = os.lstat(p)
            out[rel] = (st.st_mode, st.st_size)
    return out


@pytest.fixture
def setup(root: Root) -> Root:
    (root / "opt").mkdir()
    (root / "opt/host").write_text("H")
    root.sysext("ext", {"opt/ext": "E", "usr/share/ext": "E"})
    (root / "usr/share").mkdir(exist_ok=True)
    return root


def assert_unmerged(root: Root) -> None:
    assert root.mounts() == []
    assert root.names("opt") == {"host"}
    assert not (root / "usr/share/ext").exists()


# ---------------------------------------------------------------------------------------------
# Command-line errors


@pytest.mark.parametrize(("args", "needles"), [
    (["frobnicate"], ["frobnicate"]),
    (["sysext", "frobnicate"], ["frobnicate"]),
    (["confext", "merge", "extra"], ["extra"]),
    (["--frob", "status"], ["--frob"]),
    (["sysext", "merge", "--frob=1"], ["--frob"]),
    (["sysext", "merge", "--mutable=maybe"], ["--mutable", "maybe"]),
    (["sysext", "merge", "--mutable="], ["--mutable"]),
    (["sysext", "merge", "--mutable=Auto"], ["--mutable", "Auto"]),   # names are case-sensitive
    (["sysext", "merge", "--mutable=enabled"], ["--mutable", "enabled"]),
    (["sysext", "merge", "--noexec=maybe"], ["--noexec", "maybe"]),
    (["sysext", "refresh", "--always-refresh=perhaps"], ["--always-refresh", "perhaps"]),
    (["status", "--json=xml"], ["--json", "xml"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0] != v[-1] else None)
def test_bad_command_line(setup: Root, args: list[str], needles: list[str]) -> None:
    before = snapshot(setup)
    r = setup.run(*args)
    assert r.returncode == 1
    assert_error(r, *needles)
    assert r.stdout == ""
    assert snapshot(setup) == before
    assert_unmerged(setup)


@pytest.mark.parametrize("value", ["TRUE", "Yes", "on", "0", "off", "N"])
def test_boolean_spellings_of_mutable_are_accepted(setup: Root, value: str) -> None:
    r = setup.run("sysext", "merge", f"--mutable={value}", check=True)
    writable = value.lower() in ("true", "yes", "on")
    assert setup.writable("opt") == writable, r.stderr
    assert by_hierarchy(status_json(setup, "sysext"))["/opt"]["mutable"] == (
        "yes" if writable else "no")
    setup.run("sysext", "unmerge", check=True)


@pytest.mark.parametrize("value", ["", "/usr::/opt", ":/usr", "usr", "/", "/usr/../opt",
                                   "/usr/", "/usr//opt"])
@pytest.mark.parametrize("verb", ["status", "merge", "unmerge", "refresh", "list"])
def test_bad_hierarchies_env(setup: Root, value: str, verb: str) -> None:
    before = snapshot(setup)
    r = setup.run("sysext", verb, env={"SYSTEMD_SYSEXT_HIERARCHIES": value})
    assert_error(r, "SYSTEMD_SYSEXT_HIERARCHIES")
    if value:
        assert repr(value)[1:-1] in r.stderr or value in r.stderr
    assert snapshot(setup) == before
    assert_unmerged(setup)


def test_bad_confext_hierarchies_env_does_not_affect_sysext(setup: Root) -> None:
    env = {"SYSTEMD_CONFEXT_HIERARCHIES": "relative"}
    assert_error(setup.run("confext", "status", env=env), "SYSTEMD_CONFEXT_HIERARCHIES",
                 "relative")
    setup.run("sysext", "merge", env=env, check=True)
    assert setup.names("opt") == {"host", "ext"}
    setup.run("sysext", "unmerge", env=env, check=True)


@pytest.mark.parametrize("verb", ["status", "list", "merge", "unmerge", "refresh"])
def test_root_that_does_not_exist(tmp_path: Path, verb: str) -> None:
    missing = tmp_path / "no" / "such root"
    p = subprocess.run([sys.executable, "-m", "overlayctl", f"--root={missing}", verb],
                       capture_output=True, text=True, cwd=str(REPO))
    assert "Traceback" not in p.stderr
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayctl:"), p.stderr
    assert str(missing) in lines[0]
    assert not missing.exists() and not missing.parent.exists()


def test_root_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    p = subprocess.run([sys.executable, "-m", "overlayctl", f"--root={f}", "merge"],
                       capture_output=True, text=True, cwd=str(REPO))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("overlayctl:") and str(f) in p.stderr
    assert len(p.stderr.splitlines()) == 1


@pytest.fixture
def world_readable_base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="overlayctl-unpriv-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("verb", ["merge", "unmerge", "refresh"])
def test_unprivileged_user_gets_one_line(world_readable_base: Path, verb: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv")
    with odd_root(world_readable_base, "root") as root:
        root.sysext("ext", {"opt/ext": "E"})
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-m", "overlayctl", f"--root={root.path}", "sysext",
                            verb], capture_output=True, text=True, cwd="/")
        assert p.returncode == 1, p.stderr
        assert "Traceback" not in p.stderr
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("overlayctl:"), p.stderr
        assert "privileged" in lines[0]
        assert root.mounts() == []
        # Reading the state works without privileges.
        q = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-m", "overlayctl", f"--root={root.path}", "sysext",
                            "status"], capture_output=True, text=True, cwd="/")
        assert q.returncode == 0, q.stderr


# ---------------------------------------------------------------------------------------------
# State errors


@APIS
def test_merge_when_already_merged(setup: Root, env: dict[str, str]) -> None:
    setup.run("sysext", "merge", env=env, check=True)
    ids = (mount_id(setup / "usr"), mount_id(setup / "opt"))
    setup.sysext("another", {"opt/another": "A"})
    r = setup.run("sysext", "merge", env=env)
    line = assert_error(r, "already merged", only_line=False)
    assert str(setup / "usr") in line or str(setup / "opt") in line
    assert (mount_id(setup / "usr"), mount_id(setup / "opt")) == ids
    assert len(overlays_at(setup / "opt")) == 1 and len(overlays_at(setup / "usr")) == 1
    assert setup.names("opt") == {"host", "ext"}
    setup.run("sysext", "unmerge", env=env, check=True)
    assert_unmerged(setup)


def test_merge_when_only_one_hierarchy_is_merged(setup: Root) -> None:
    """Merged by an earlier run with another hierarchy list: still 'already merged'."""
    setup.run("sysext", "merge", env={"SYSTEMD_SYSEXT_HIERARCHIES": "/opt"}, check=True)
    assert_error(setup.run("sysext", "merge"), "already merged", str(setup / "opt"),
                 only_line=False)
    assert overlays_at(setup / "usr") == []
    assert len(overlays_at(setup / "opt")) == 1
    setup.run("sysext", "unmerge", check=True)
    assert_unmerged(setup)


@APIS
def test_hierarchy_is_a_regular_file(setup: Root, env: dict[str, str]) -> None:
    shutil.rmtree(setup / "opt")
    (setup / "opt").write_text("not a directory")
    before = snapshot(setup)
    r = setup.run("sysext", "merge", env=env)
    assert_error(r, str(setup / "opt"), only_line=False)
    assert setup.mounts() == []
    assert not (setup / "usr/share/ext").exists()
    assert snapshot(setup) == before
    assert setup.run("sysext", "unmerge", env=env).returncode == 0


@APIS
def test_failing_sysext_undoes_confext_of_the_same_call(setup: Root, env: dict[str, str]) -> None:
    """Without a class both are merged (confext first); a sysext failure leaves neither."""
    (setup / "etc").mkdir()
    setup.confext("conf", {"etc/conf": "C"})
    shutil.rmtree(setup / "opt")
    (setup / "opt").write_text("not a directory")
    r = setup.run("merge", env=env)
    assert_error(r, str(setup / "opt"), only_line=False)
    assert setup.mounts() == []
    assert not (setup / "etc/conf").exists()
    assert all(unmerged(row) for row in status_json(setup))


@APIS
def test_mutable_dir_mode_mismatch_for_one_hierarchy(setup: Root, env: dict[str, str]) -> None:
    m = setup / "var/lib/extensions.mutable/opt"
    m.mkdir()
    m.chmod(0o700)
    (setup / "opt").chmod(0o755)
    before = snapshot(setup)
    r = setup.run("sysext", "merge", "--mutable=yes", env=env)
    assert_error(r, str(m), "0700", only_line=False)
    assert setup.mounts() == []
    assert not (setup / "usr/share/ext").exists()
    # Not even the mutable directory of /usr was created.
    assert snapshot(setup) == before
    assert not (setup / "var/lib/extensions.mutable/usr").exists()


@APIS
def test_extension_whose_hierarchy_is_a_file(setup: Root, env: dict[str, str]) -> None:
    bad = setup.sysext("zzz-bad", {"opt": "a file where a directory belongs"})
    before = snapshot(setup)
    r = setup.run("sysext", "merge", env=env)
    assert_error(r, "zzz-bad", str(bad), only_line=False)
    assert_unmerged(setup)
    assert snapshot(setup) == before


@APIS
def test_mutable_dir_is_a_file(setup: Root, env: dict[str, str]) -> None:
    m = setup / "var/lib/extensions.mutable/opt"
    m.write_text("")
    before = snapshot(setup)
    r = setup.run("sysext", "merge", "--mutable=yes", env=env)
    assert_error(r, str(m), only_line=False)
    assert_unmerged(setup)
    assert snapshot(setup) == before


def _eloop_setup(root: Root) -> dict[str, str]:
    """/var as a hierarchy whose extension layer lies inside the base /var: the kernel refuses
    that overlay (ELOOP) after /usr's overlay was already built fine."""
    root.sysext("ext", {"var/vfile": "V"})
    return {"SYSTEMD_SYSEXT_HIERARCHIES": "/usr:/var"}


@APIS
@pytest.mark.parametrize("mode", ["no", "yes", "ephemeral"])
def test_kernel_failure_on_second_hierarchy_leaves_nothing_merged(
        setup: Root, env: dict[str, str], mode: str) -> None:
    hier = _eloop_setup(setup)
    before = snapshot(setup)
    r = setup.run("sysext", "merge", f"--mutable={mode}", env={**env, **hier})
    assert_error(r, only_line=False)
    assert setup.mounts() == []
    assert not (setup / "usr/share/ext").exists()
    assert not (setup / "var/vfile").exists()
    assert snapshot(setup) == before, "files or directories were left behind"
    rows = by_hierarchy(status_json(setup, "sysext", env=hier))
    for h in ("/usr", "/var"):
        assert not rows[h]["merged"] and rows[h]["extensions"] == []


@APIS
def test_kernel_failure_names_the_hierarchy(setup: Root, env: dict[str, str]) -> None:
    hier = _eloop_setup(setup)
    r = setup.run("sysext", "merge", env={**env, **hier})
    line = assert_error(r, str(setup / "var"), only_line=False)
    assert "overlayctl-stage" not in line      # no internal scratch paths
    assert "[Errno" not in line                 # no Python exception text


def test_bad_overlay_options_env(setup: Root) -> None:
    env = {"SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS": "metacopy=off,lowerdir=/etc"}
    assert_error(setup.run("sysext", "merge", env=env), "SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS",
                 "lowerdir", only_line=False)
    assert_unmerged(setup)


@APIS
def test_unknown_overlay_option_fails_cleanly(setup: Root, env: dict[str, str]) -> None:
    env = {**env, "SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS": "no_such_overlay_option=1"}
    line = assert_error(setup.run("sysext", "merge", env=env), only_line=False)
    assert str(setup / "usr") in line or str(setup / "opt") in line
    assert_unmerged(setup)


def test_unmerge_of_nothing(setup: Root) -> None:
    before = snapshot(setup)
    for args in (["sysext", "unmerge"], ["confext", "unmerge"], ["unmerge"]):
        r = setup.run(*args)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    assert snapshot(setup) == before
    assert_unmerged(setup)


def test_unmerge_twice(setup: Root) -> None:
    setup.run("sysext", "merge", check=True)
    setup.run("sysext", "unmerge", check=True)
    setup.run("sysext", "unmerge", check=True)
    assert_unmerged(setup)


def test_foreign_mount_is_not_unmerged(setup: Root) -> None:
    """A mount on /opt that overlayctl did not make is left alone by unmerge (§7.1)."""
    src = setup / "var/foreign"
    src.mkdir()
    (src / "foreign").write_text("F")
    subprocess.run(["mount", "--bind", str(src), str(setup / "opt")], check=True)
    try:
        setup.run("sysext", "unmerge", check=True)
        assert setup.names("opt") == {"foreign"}
        assert unmerged(by_hierarchy(status_json(setup, "sysext"))["/opt"])
    finally:
        subprocess.run(["umount", str(setup / "opt")], check=True)


@pytest.mark.parametrize("text", ["NAME=Foo\nVERSION_ID=1\n", "ID=\n", None],
                         ids=["no-id", "empty-id", "no-os-release"])
@pytest.mark.parametrize("verb", ["merge", "refresh"])
def test_host_os_release_without_id(setup: Root, text: str | None, verb: str) -> None:
    osr = setup / "usr/lib/os-release"
    if text is None:
        osr.unlink()
    else:
        osr.write_text(text)
    before = snapshot(setup)
    r = setup.run("sysext", verb)
    line = assert_error(r, "ID", only_line=False)
    assert str(setup.path) in line
    assert snapshot(setup) == before
    assert_unmerged(setup)
    assert setup.run("sysext", "status").returncode == 0


@pytest.mark.parametrize("cls", ["sysext", "confext"])
def test_bad_mutable_env_is_only_a_warning(root: Root, cls: str) -> None:
    h = "opt" if cls == "sysext" else "etc"
    (root / h).mkdir()
    (root / f"{h}/host").write_text("H")
    if cls == "sysext":
        root.sysext("ext", {"opt/ext": "E"})
    else:
        root.confext("ext", {"etc/ext": "E"})
    var = f"SYSTEMD_{cls.upper()}_MUTABLE_MODE"
    env = {var: "bogus"}
    r = root.run(cls, "merge", env=env, check=True)
    warnings = [x for x in r.stderr.splitlines() if x.startswith("overlayctl:")]
    assert len(warnings) == 1 and "warning" in warnings[0], r.stderr
    assert var in warnings[0] and "bogus" in warnings[0]
    release = {"extension-release.d"} if cls == "confext" else set()
    assert root.names(h) == {"host", "ext"} | release
    assert not root.writable(h)
    # The CLI still wins over the (ignored) env, and status works with the bad env.
    st = by_hierarchy(status_json(root, cls, env=env))
    assert st[f"/{h}"]["mutable"] == "no"
    root.run(cls, "unmerge", env=env, check=True)
    root.run(cls, "merge", "--mutable=ephemeral", env=env, check=True)
    assert root.writable(h)
    root.run(cls, "unmerge", env=env, check=True)
    assert root.mounts() == []


def test_bad_mutable_in_config_is_only_a_warning(setup: Root) -> None:
    (setup / "etc/systemd").mkdir(parents=True)
    (setup / "etc/systemd/sysext.conf").write_text("[SysExt]\nMutable=bogus\n")
    r = setup.run("sysext", "merge", check=True)
    assert "warning" in r.stderr and "bogus" in r.stderr
    assert setup.names("opt") == {"host", "ext"}
    assert not setup.writable("opt")
    setup.run("sysext", "unmerge", check=True)


# ---------------------------------------------------------------------------------------------
# Concurrency


@APIS
def test_two_merges_at_once(setup: Root, env: dict[str, str]) -> None:
    for _ in range(5):
        procs = [popen(setup, "sysext", "merge", env=env) for _ in range(2)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        codes = sorted(rc for rc, _, _ in results)
        assert codes == [0, 1], results
        loser = next(err for rc, _, err in results if rc == 1)
        assert "Traceback" not in loser
        assert "already merged" in loser.splitlines()[-1]
        assert loser.splitlines()[-1].startswith("overlayctl:")
        assert len(overlays_at(setup / "opt")) == 1
        assert len(overlays_at(setup / "usr")) == 1
        assert setup.names("opt") == {"host", "ext"}
        setup.run("sysext", "unmerge", env=env, check=True)
        assert_unmerged(setup)


@APIS
def test_parallel_merge_unmerge_refresh_loops_never_stack(setup: Root,
                                                          env: dict[str, str]) -> None:
    stop = threading.Event()
    seen: list[int] = []

    def sampler() -> None:
        while not stop.is_set():
            seen.append(max(len(overlays_at(setup / "opt")), len(overlays_at(setup / "usr"))))
            time.sleep(0.005)

    failures: list[str] = []

    def worker(verbs: list[str]) -> None:
        for _ in range(8):
            for v in verbs:
                args = ["sysext", *v.split()]
                r = setup.run(*args, env=env)
                if "Traceback" in r.stderr:
                    failures.append(r.stderr)
                if r.returncode != 0 and "already merged" not in r.stderr:
                    failures.append(f"{v}: {r.stderr}")

    t = threading.Thread(target=sampler)
    t.start()
    workers = [threading.Thread(target=worker, args=(vs,)) for vs in (
        ["merge", "unmerge"], ["merge", "unmerge"], ["refresh", "unmerge"],
        ["refresh --always-refresh=yes", "merge"])]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    t.join()
    assert failures == []
    # A refresh mounts the new overlay beneath the old one and then detaches the old one, so
    # a sample may catch two for that instant; never more, and never two left behind.
    assert seen and max(seen) <= 2
    assert len(overlays_at(setup / "opt")) <= 1
    assert len(overlays_at(setup / "usr")) <= 1
    setup.run("sysext", "unmerge", env=env, check=True)
    assert_unmerged(setup)


def test_sysext_and_confext_in_parallel(setup: Root) -> None:
    (setup / "etc").mkdir()
    setup.confext("conf", {"etc/conf": "C"})
    for _ in range(5):
        procs = [popen(setup, "sysext", "merge"), popen(setup, "confext", "merge")]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        assert (setup / "etc/conf").read_text() == "C"
        assert setup.names("opt") == {"host", "ext"}
        procs = [popen(setup, "sysext", "unmerge"), popen(setup, "confext", "unmerge")]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        for p in procs:
            p.communicate()
        assert setup.mounts() == []
