"""The command line as getopt_long takes it (overlayctl.args)."""

from __future__ import annotations

import pytest

from overlayctl.args import parse
from overlayctl.errors import OverlayctlError


def test_values_both_ways_and_anywhere() -> None:
    a = parse(["--root", "/x", "sysext", "--mutable=yes", "merge", "--json=short"])
    assert a.root == "/x" and a.mutable == "yes" and a.json == "short"
    assert a.words == ["sysext", "merge"]


def test_defaults() -> None:
    a = parse([])
    assert a.root == "/" and a.json == "off" and a.mutable is None and a.defaults == []
    assert a.noexec is None and a.always_refresh is False and a.force is False


def test_prefixes_flags_lists_booleans() -> None:
    a = parse(["--no-rel", "--def=/a", "--defaults", "/etc=/b", "--noexec=no", "-h",
               "--always-refresh=yes"])
    assert a.no_reload and a.help and a.defaults == ["/a", "/etc=/b"]
    assert a.noexec is False and a.always_refresh is True


def test_double_dash_ends_options() -> None:
    assert parse(["diff", "--", "--not-an-option"]).words == ["diff", "--not-an-option"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--no"], "ambiguous"),
    (["--root"], "requires an argument"),
    (["--force=yes"], "doesn't allow an argument"),
    (["--json=xml"], "invalid choice"),
    (["--noexec=maybe"], "boolean"),
    (["-x"], "invalid option"),
])
def test_mistakes_are_one_line_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(OverlayctlError) as e:
        parse(argv)
    assert needle in e.value.message and e.value.hint
