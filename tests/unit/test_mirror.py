"""tools/mirror.sh: the scripts read Debian's package mirror from the host's apt configuration,
and no mirror's host name is written into the repository (BRIEF rules; issue 9, hole 15)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

MIRROR_SH = REPO / "tools/mirror.sh"


def sh(script: str, apt_etc: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run SCRIPT in bash -euo pipefail with tools/mirror.sh sourced (as the scripts use it)."""
    full = {k: v for k, v in os.environ.items() if k not in ("MIRROR", "OVERLAYCTL_APT_ETC")}
    if apt_etc is not None:
        full["OVERLAYCTL_APT_ETC"] = str(apt_etc)
    full.update(env)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", f'. "$0"; {script}', str(MIRROR_SH)],
                          capture_output=True, text=True, env=full)


@pytest.fixture
def apt(tmp_path: Path) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    return tmp_path


DEB822 = """\
# a comment line
Types: deb-src
URIs: http://src.example/debian

Types: deb
URIs: http://off.example/debian
Enabled: no

Types: deb deb-src
URIs: https://one.example/debian/
 http://two.example/debian-security
Suites: sid
Components: main
"""

ONE_LINE = """\
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://three.example/debian trixie main
deb-src http://four.example/debian trixie main
# deb http://commented.example/debian sid main
deb http://five.example/ports/ sid main
deb cdrom:[Debian]/ sid main
deb http://three.example/debian trixie-updates main
"""


def test_uris_from_deb822_and_one_line_sources(apt: Path) -> None:
    (apt / "sources.list.d/a.sources").write_text(DEB822)
    (apt / "sources.list").write_text(ONE_LINE)
    r = sh("apt_mirror_uris", apt)
    assert r.returncode == 0, r.stderr
    # deb822 first, then one-line entries; deb-src, disabled and non-http sources left out;
    # folded fields read; trailing slashes dropped; each URI once.
    assert r.stdout.split() == ["https://one.example/debian", "http://two.example/debian-security",
                                "http://three.example/debian", "http://five.example/ports"]


@pytest.mark.parametrize(("uris", "main"), [
    ("http://a.example/debian-security http://b.example/debian", "http://b.example/debian"),
    ("http://a.example/debian-security http://b.example/mirror", "http://b.example/mirror"),
    ("http://a.example/debian-security", "http://a.example/debian-security"),
])
def test_debian_mirror_prefers_the_archive(apt: Path, uris: str, main: str) -> None:
    (apt / "sources.list.d/debian.sources").write_text(f"Types: deb\nURIs: {uris}\n")
    r = sh("debian_mirror", apt)
    assert (r.returncode, r.stdout.strip()) == (0, main), r.stderr


def test_mirror_variable_overrides(apt: Path) -> None:
    (apt / "sources.list").write_text("deb http://conf.example/debian sid main\n")
    r = sh("debian_mirror", apt, MIRROR="http://given.example/debian")
    assert r.stdout.strip() == "http://given.example/debian"


def test_no_source_is_a_clear_error(apt: Path) -> None:
    r = sh('m=$(debian_mirror) || { echo "rc=$?"; exit 0; }; echo "got $m"', apt)
    assert r.stdout.strip() == "rc=1"
    assert r.stderr.count("\n") == 1 and "hint: set MIRROR=" in r.stderr
    assert str(apt / "sources.list") in r.stderr


@pytest.mark.parametrize(("uri", "host", "port"), [
    ("http://m.example/debian", "m.example", "80"),
    ("https://m.example/debian", "m.example", "443"),
    ("http://user:pw@m.example:3142/debian", "m.example", "3142"),
    ("http://[2001:db8::1]:8080/debian", "[2001:db8::1]", "8080"),
])
def test_host_and_port(uri: str, host: str, port: str) -> None:
    r = sh(f'mirror_host "{uri}"; mirror_port "{uri}"')
    assert r.stdout.split() == [host, port], r.stderr


def _configured_hosts() -> set[str]:
    r = sh("apt_mirror_uris")
    assert r.returncode == 0, r.stderr
    hosts = set()
    for uri in r.stdout.split():
        host = sh(f'mirror_host "{uri}"').stdout.strip().strip("[]").lower()
        try:
            ipaddress.ip_address(host)
            continue            # an address is no mirror's name
        except ValueError:
            pass
        if host and host != "localhost":
            hosts.add(host)
    return hosts


def test_no_mirror_host_in_tracked_files() -> None:
    """Every host name of a mirror in this machine's apt configuration is absent from every file
    git tracks: the scripts read the mirror from the apt configuration (tools/mirror.sh)."""
    hosts = _configured_hosts()
    if not hosts:
        pytest.skip("the host's apt configuration names no package mirror to look for")
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    found = []
    for name in filter(None, files):
        path = REPO / name
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_bytes().lower()
        for host in hosts:
            if host.encode() in text:
                lines = [i for i, line in enumerate(text.splitlines(), 1) if host.encode() in line]
                found.append(f"{name}:{','.join(map(str, lines))}: {host}")
    assert len(files) > 50
    assert not found, "mirror host names in tracked files (say \"Debian's package mirror\" and " \
        "read it with tools/mirror.sh):\n" + "\n".join(found)
