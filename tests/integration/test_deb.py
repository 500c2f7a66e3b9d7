"""The Debian package: tools/build-deb.sh builds overlayctl_*.deb from debian/, and the .deb
holds what it should (module, /usr/bin/overlayctl, the units, overlayctl(8)), declares the
right relations, never ships systemd-sysext's names or enables a unit, and runs once
installed: unpacked with dpkg -x, and installed with dpkg -i into a throw-away copy (an
overlay) of a Debian trixie tree, where it merges an extension.

The package is built once per run (~5 s warm), or taken from OVERLAYCTL_DEB=PATH. Skipped when
dpkg-buildpackage or a build dependency is missing: tools/build-deb.sh (as root) installs them.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import overlayctl
from tests.conftest import CAN_MOUNT, REPO, mounts_below, umount_all_below

SOURCE_UNITS = sorted(p for p in (REPO / "units").iterdir()
                      if p.suffix in (".service", ".socket", ".path", ".timer"))
# Debian trixie trees that may be on this machine: one made by debootstrap for this purpose, and
# the VM tests' root (vm-tests/vm-boot.sh: python3, python3-psutil, systemd, image tools).
TRIXIE_TREES = [Path(p) for p in os.environ.get("OVERLAYCTL_TRIXIE_TREE", "").split(":") if p] + [
    Path("/var/cache/overlayctl/debian-trixie"), Path("/var/cache/overlayctl-vm/rootfs")]


def run(*cmd: str | Path, check: bool = False, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check,
                          env=env, cwd=cwd)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("OVERLAYCTL_DEB")
    if given:
        assert Path(given).is_file(), f"OVERLAYCTL_DEB={given}: no such file"
        return Path(given)
    if not shutil.which("dpkg-buildpackage") or not shutil.which("dpkg-checkbuilddeps"):
        pytest.skip("dpkg-buildpackage is not installed (tools/build-deb.sh installs it)")
    deps = run("dpkg-checkbuilddeps", cwd=REPO)
    if deps.returncode != 0:
        pytest.skip("build dependencies missing, run tools/build-deb.sh once: "
                    + deps.stderr.strip())
    out = tmp_path_factory.mktemp("deb")
    before = sorted(p.name for p in REPO.parent.iterdir())
    status = run("git", "status", "--porcelain", "--ignored", cwd=REPO).stdout
    r = run(REPO / "tools/build-deb.sh", out)
    assert r.returncode == 0, r.stderr
    # Nothing left behind in the checkout or beside it (dpkg-buildpackage writes to ..).
    assert run("git", "status", "--porcelain", "--ignored", cwd=REPO).stdout == status
    assert sorted(p.name for p in REPO.parent.iterdir()) == before
    debs = sorted(out.glob("overlayctl_*_all.deb"))
    assert [str(d) for d in debs] == r.stdout.split()
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture(scope="module")
def contents(deb: Path) -> dict[str, str]:
    """Path (as installed, from /) -> the mode string dpkg-deb -c prints."""
    out = run("dpkg-deb", "-c", deb, check=True).stdout
    entries = {}
    for line in out.splitlines():
        fields = line.split(None, 5)
        path = fields[5].split(" -> ")[0]
        entries[path.removeprefix(".").rstrip("/") or "/"] = fields[0]
    return entries


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("unpacked")
    run("dpkg-deb", "-x", deb, d, check=True)
    run("dpkg-deb", "-e", deb, d / "DEBIAN", check=True)
    return d


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", deb, name, check=True).stdout.strip()


def relation_names(value: str) -> set[str]:
    """Package names in a Depends-like field ("a (>= 1), b:any | c" -> {a, b, c})."""
    names = set()
    for alt in re.split(r"[,|]", value):
        if alt.strip():
            names.add(alt.split()[0].split(":")[0])
    return names


def test_files(contents: dict[str, str]) -> None:
    assert contents["/usr/bin/overlayctl"].startswith("-rwxr-xr-x")
    pkg = "/usr/lib/python3/dist-packages/overlayctl"
    for source in (REPO / "overlayctl").glob("*.py"):
        assert f"{pkg}/{source.name}" in contents, source.name
    assert any(re.fullmatch(rf"{pkg}-[^/]+\.dist-info/METADATA", p) for p in contents)
    for unit in SOURCE_UNITS:
        assert f"/usr/lib/systemd/system/{unit.name}" in contents, unit.name
    assert "/usr/share/man/man8/overlayctl.8.gz" in contents
    for doc in ("copyright", "README.Debian", "overlayctl.md", "modes.md", "design.md"):
        assert f"/usr/share/doc/overlayctl/{doc}" in contents, doc   # .md uncompressed


def test_only_overlayctl_names(contents: dict[str, str]) -> None:
    names = {p.rsplit("/", 1)[-1] for p in contents}
    assert not {n for n in names if re.match(r"systemd-(sysext|confext)", n)}
    commands = [p for p in contents if re.match(r"/(usr/)?s?bin/.", p)]
    assert commands == ["/usr/bin/overlayctl"]
    # No file outside /usr (no /lib from the build, no enablement symlink in /etc).
    assert {p.split("/")[1] for p in contents if p != "/"} == {"usr"}


def test_control(deb: Path) -> None:
    assert field(deb, "Package") == "overlayctl"
    assert field(deb, "Architecture") == "all"
    assert field(deb, "Version").split(":")[-1].rsplit("-", 1)[0] == overlayctl.__version__
    depends = relation_names(field(deb, "Depends"))
    assert RUNTIME_DEPENDS <= depends
    assert not depends & {"squashfs-tools", "erofs-utils", "systemd"}
    assert relation_names(field(deb, "Recommends")) == {"squashfs-tools", "erofs-utils"}
    assert "python3-psutil (>= 5.9)" in field(deb, "Depends")


def test_units_are_the_source_units(unpacked: Path) -> None:
    for unit in SOURCE_UNITS:
        shipped = (unpacked / "usr/lib/systemd/system" / unit.name).read_text()
        assert shipped == unit.read_text().replace("@OVERLAYCTL@", "/usr/bin/overlayctl")
        # (ExecStart=- in the varlink service: a failed connection is no failed unit)
        assert re.search(r"^ExecStart=-?/usr/bin/overlayctl( |$)", shipped, re.M) \
            or unit.suffix != ".service"


def test_maintainer_scripts_never_enable_or_start(unpacked: Path) -> None:
    scripts = {p.name: p.read_text() for p in (unpacked / "DEBIAN").iterdir()
               if p.name in ("preinst", "postinst", "prerm", "postrm")}
    # The only unit action: stop, in the prerm, on removal (never before an upgrade).
    invoked = [(name, m[1]) for name, text in scripts.items()
               for m in re.finditer(r"deb-systemd-invoke\s+(\S+)", text)]
    assert invoked == [("prerm", "stop")]
    assert re.search(r'"\$1" = remove [^\n]*then\n(?:[^\n]*\n){0,12}?\s*deb-systemd-invoke stop',
                     scripts["prerm"])
    text = "\n".join(scripts.values())
    assert not re.search(r"systemctl\s+(--\S+\s+)*(start|restart|enable|try-restart)\b", text)
    # deb-systemd-helper enable only re-creates what the admin had enabled: it runs only for a
    # unit that was installed before (debian-installed), not on a first install.
    for m in re.finditer(r"deb-systemd-helper enable", text):
        block = text[max(0, m.start() - 400):m.start()]
        assert "deb-systemd-helper debian-installed" in block, block


def test_man_page(unpacked: Path) -> None:
    page = unpacked / "usr/share/man/man8/overlayctl.8.gz"
    roff = gzip.decompress(page.read_bytes()).decode()
    # (pandoc 3 writes the date's "-" as "\-", as every other "-")
    assert re.search(r'^\.TH "OVERLAYCTL" "8" "\d{4}\\?-\d\d\\?-\d\d" "overlayctl '
                     + re.escape(overlayctl.__version__) + '"', roff, re.M)
    assert re.search(r"^\.SH NAME\n(\.PP\n)?overlayctl \\- merge ", roff, re.M)
    # Generated from the reference: each of its sections is a section of the page.
    doc = (REPO / "docs/overlayctl.md").read_text()
    for heading in re.findall(r"^## (.+)$", doc, re.M):
        assert re.search(rf'^\.SH "?{re.escape(heading)}"?$', roff, re.M), heading
    for heading in re.findall(r"^### (.+)$", doc, re.M):
        assert re.search(rf'^\.SS "?{re.escape(heading)}"?$', roff, re.M), heading
    # Links to the other documents name the installed files.
    assert not re.search(r"\]\([\w.-]+\.md\b", roff)
    assert "/usr/share/doc/overlayctl/design.md" in roff
    if shutil.which("man"):
        env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
        r = run("man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", page, env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        text = run("man", "-l", page, env=env).stdout
        assert "--mutable=MODE" in text and "SYSTEMD_SYSEXT_HIERARCHIES" in text
    if shutil.which("lexgrog"):
        assert "overlayctl - merge system and configuration extensions" in run(
            "lexgrog", page).stdout


def test_unpacked_runs(unpacked: Path, tmp_path: Path) -> None:
    """/usr/bin/overlayctl from the package, with the package's module (not the checkout's)."""
    script = unpacked / "usr/bin/overlayctl"
    # The lean launcher (tools/launcher.sh): -IS, the package's directory added by hand.
    assert re.match(r"#!/usr/bin/python3 -IS\n", script.read_text())
    assert "/usr/lib/python3/dist-packages" in script.read_text()
    site = unpacked / "usr/lib/python3/dist-packages"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYSTEMD_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    # The test venv's interpreter has psutil; the system one may not.
    python = "/usr/bin/python3" if run("/usr/bin/python3", "-c", "import psutil").returncode == 0 \
        else sys.executable
    where = run(python, "-c", "import overlayctl; print(overlayctl.__file__)", env=env,
                cwd=tmp_path)
    assert where.stdout.strip() == str(site / "overlayctl/__init__.py")
    r = run(python, script, "--version", env=env, cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"overlayctl {overlayctl.__version__}\n", "")
    r = run(python, script, "--help", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "merge" in r.stdout and "unmerge" in r.stdout, r.stderr
    (tmp_path / "root/var/lib/extensions/hello").mkdir(parents=True)
    r = run(python, script, f"--root={tmp_path / 'root'}", "list", "--json=short", env=env)
    assert r.returncode == 0, r.stderr
    assert [(e["name"], e["type"]) for e in json.loads(r.stdout)] == [("hello", "directory")]


# What the package depends on (debian/control) that a minbase tree lacks: `dpkg -i` fails
# without it, so a tree must have it installed to be used.
RUNTIME_DEPENDS = {"python3", "python3-psutil", "python3-cryptography", "python3-asn1crypto"}


def installed_packages(tree: Path) -> set[str]:
    names: set[str] = set()
    try:
        text = (tree / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return names
    for para in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            names.add(fields["Package"])
    return names


def trixie_tree() -> Path | None:
    for t in TRIXIE_TREES:
        osr = t / "etc/os-release"
        if (t / "usr/bin/dpkg").exists() and osr.exists() and \
                "VERSION_CODENAME=trixie" in osr.read_text() and \
                (t.name != "rootfs" or (t / ".complete").exists()) and \
                RUNTIME_DEPENDS <= installed_packages(t):
            return t
    return None


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Path]:
    """A writable throw-away view of a trixie tree: an overlay over it, with /proc."""
    if not CAN_MOUNT:
        pytest.skip("needs root in a private mount namespace: use ./run-tests.sh")
    tree = trixie_tree()
    if tree is None:
        pytest.skip("no Debian trixie tree with " + ", ".join(sorted(RUNTIME_DEPENDS)) +
                    " installed (e.g. /var/cache/overlayctl-vm/rootfs from vm-tests, or "
                    "$OVERLAYCTL_TRIXIE_TREE)")
    g = tmp_path / "guest"
    for d in ("upper", "work", "guest"):
        (tmp_path / d).mkdir(exist_ok=True)
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={tree},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}", g,
        check=True)
    try:
        run("mount", "-t", "proc", "proc", g / "proc", check=True)
        yield g
    finally:
        umount_all_below(str(g))
        assert not mounts_below(str(g))


def in_guest(g: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}
    return run("chroot", g, *cmd, env=env)


@pytest.mark.root
def test_installs_in_trixie(deb: Path, guest: Path) -> None:
    # The maintainer scripts act on units only where systemd runs (/run/systemd/system), through
    # deb-systemd-invoke: pretend it runs, and record what they would ask of it.
    (guest / "run/systemd/system").mkdir(parents=True, exist_ok=True)
    invoke = guest / "usr/local/sbin/deb-systemd-invoke"
    invoke.parent.mkdir(parents=True, exist_ok=True)
    invoke.write_text('#!/bin/sh\necho "$@" >> /tmp/invoked\n')
    invoke.chmod(0o755)
    invoked = guest / "tmp/invoked"

    shutil.copy(deb, guest / "tmp/overlayctl.deb")
    r = in_guest(guest, "dpkg", "-i", "/tmp/overlayctl.deb")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Created symlink" not in r.stdout + r.stderr
    assert not invoked.exists()                      # nothing started
    r = in_guest(guest, "overlayctl", "--version")
    assert (r.returncode, r.stdout) == (0, f"overlayctl {overlayctl.__version__}\n"), r.stderr
    assert in_guest(guest, "overlayctl", "--help").returncode == 0
    assert (guest / "usr/share/man/man8/overlayctl.8.gz").is_file()
    # Byte-compiled for the guest's Python by the postinst (py3compile).
    assert list((guest / "usr/lib/python3/dist-packages/overlayctl/__pycache__").glob("cli.*.pyc"))
    # Installed, not enabled: nothing in /etc/systemd/system refers to overlayctl.
    for unit in SOURCE_UNITS:
        if "@" not in unit.name:
            r = in_guest(guest, "systemctl", "--root=/", "is-enabled", unit.name)
            assert r.stdout.strip() == "disabled", (unit.name, r.stdout, r.stderr)
    assert not [p for p in (guest / "etc/systemd/system").rglob("*overlayctl*")]
    # What the admin enables stays enabled across an upgrade (here: the same version again),
    # which neither stops nor starts nor restarts a unit.
    r = in_guest(guest, "systemctl", "--root=/", "enable", "overlayctl-sysext.service")
    assert r.returncode == 0, r.stderr
    r = in_guest(guest, "dpkg", "-i", "/tmp/overlayctl.deb")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not invoked.exists()
    r = in_guest(guest, "systemctl", "--root=/", "is-enabled", "overlayctl-sysext.service")
    assert r.stdout.strip() == "enabled", r.stderr

    # The installed command merges an extension, with the guest's Python and psutil.
    t = guest / "srv/t"
    (t / "usr/lib").mkdir(parents=True)
    (t / "usr/lib/os-release").write_text("ID=debian\nVERSION_ID=13\n")
    ext = t / "var/lib/extensions/hello"
    (ext / "usr/lib/extension-release.d").mkdir(parents=True)
    (ext / "usr/lib/extension-release.d/extension-release.hello").write_text("ID=_any\n")
    (ext / "usr/share/hello").mkdir(parents=True)
    (ext / "usr/share/hello/greeting").write_text("hi\n")
    try:
        r = in_guest(guest, "overlayctl", "--root=/srv/t", "sysext", "merge")
        assert r.returncode == 0, r.stderr
        assert (t / "usr/share/hello/greeting").read_text() == "hi\n"
        rows = json.loads(in_guest(guest, "overlayctl", "--root=/srv/t", "sysext", "status",
                                   "--json=short").stdout)
        assert [(x["hierarchy"], x["extensions"]) for x in rows] == [("/usr", ["hello"])]
        r = in_guest(guest, "overlayctl", "--root=/srv/t", "sysext", "unmerge")
        assert r.returncode == 0, r.stderr
        assert not (t / "usr/share/hello").exists()
    finally:
        umount_all_below(str(t))

    # Removal stops the units (they unmerge while overlayctl is still there); purge forgets
    # that the admin enabled one.
    r = in_guest(guest, "dpkg", "-r", "overlayctl")
    assert r.returncode == 0, r.stdout + r.stderr
    words = invoked.read_text().split()
    assert words[0] == "stop" and sorted(words[1:]) == sorted(
        u.name for u in SOURCE_UNITS if "@" not in u.name and u.suffix in (".service", ".socket"))
    assert [p.name for p in (guest / "etc/systemd/system").rglob("*overlayctl*")] == [
        "overlayctl-sysext.service"]
    r = in_guest(guest, "dpkg", "--purge", "overlayctl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (guest / "usr/bin/overlayctl").exists()
    assert not (guest / "usr/lib/python3/dist-packages/overlayctl").exists()
    assert not list((guest / "usr/lib/systemd/system").glob("overlayctl*"))
    assert not [p for p in (guest / "etc/systemd/system").rglob("*overlayctl*")]
