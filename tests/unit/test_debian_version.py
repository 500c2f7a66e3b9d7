"""The Debian package's version (debian/changelog) is the module's, which --version prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import overlayctl

REPO = Path(__file__).resolve().parents[2]


def upstream_version(entry: str) -> str:
    """The upstream part of a changelog entry's version: no epoch, no Debian revision."""
    m = re.match(r"^(?P<source>[a-z0-9][a-z0-9+.-]+) \((?P<version>[^()\s]+)\) ", entry)
    if not m:
        raise ValueError(f"not a debian/changelog entry line: {entry!r}")
    version = m["version"].split(":", 1)[1] if ":" in m["version"] else m["version"]
    return version.rsplit("-", 1)[0] if "-" in version else version


@pytest.mark.parametrize(("entry", "upstream"), [
    ("overlayctl (0.1.0) unstable; urgency=medium", "0.1.0"),
    ("overlayctl (0.2.0-1) unstable; urgency=medium", "0.2.0"),
    ("overlayctl (1:0.2.0~rc1-0.1) trixie; urgency=low", "0.2.0~rc1"),
    ("overlayctl (0.2.0-1-2) unstable; urgency=medium", "0.2.0-1"),
])
def test_upstream_version(entry: str, upstream: str) -> None:
    assert upstream_version(entry) == upstream


def test_not_an_entry() -> None:
    with pytest.raises(ValueError):
        upstream_version("  * First release.")


def test_changelog_version_is_the_module_version() -> None:
    entry = (REPO / "debian/changelog").read_text(encoding="utf-8").splitlines()[0]
    assert entry.startswith("overlayctl ("), entry
    assert upstream_version(entry) == overlayctl.__version__, (
        "debian/changelog and overlayctl/__init__.py disagree: add a changelog entry "
        f"for {overlayctl.__version__} (dch -v {overlayctl.__version__})")
