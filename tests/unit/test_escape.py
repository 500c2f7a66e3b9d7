"""systemd's C escaping of the work_dir file (hole 8 of issue 9): everything cescape()
writes is decoded, and malformed escapes are errors, not silently kept."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayctl.metadata import c_escape, c_unescape


@pytest.mark.parametrize(("escaped", "plain"), [
    ("a\\ab", "a\ab"), ("\\b\\f\\n\\r\\t\\v", "\b\f\n\r\t\v"), ("\\\\", "\\"),
    ("\\\"\\'", "\"'"), ("x\\sy", "x y"), ("\\x41", "A"), ("\\101", "A"),
    ("\\303\\244", "ä"), ("\\u00e4", "ä"), ("\\U0001F600", "\U0001F600"),
    ("plain/path", "plain/path"), ("\\177", "\x7f"),
])
def test_decodes_every_escape(escaped: str, plain: str) -> None:
    assert c_unescape(escaped) == plain


@pytest.mark.parametrize("bad", ["\\", "ab\\", "\\q", "\\x4", "\\xZZ", "\\000", "\\x00",
                                 "\\400", "\\19", "\\u12", "\\UFFFFFFFF", "\\ud800"])
def test_malformed_escapes_are_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        c_unescape(bad)


def test_escape_writes_what_cescape_writes() -> None:
    # systemd's cescape(): C escapes for \a\b\f\n\r\t\v\\\"\', octal for other control
    # bytes and for every byte from 127 on (so UTF-8 comes out as octal).
    assert c_escape("a b") == "a b"
    assert c_escape("tab\there") == "tab\\there"
    assert c_escape("quote\"'") == "quote\\\"\\'"
    assert c_escape("\x01") == "\\001"
    assert c_escape("ä") == "\\303\\244"
    assert c_escape("\x7f") == "\\177"


@given(st.binary(min_size=1, max_size=64).filter(lambda b: b"\0" not in b))
def test_round_trip(raw: bytes) -> None:
    path = os.fsdecode(raw)
    assert c_unescape(c_escape(path)) == path
