"""Property-based tests of the os-release / extension-release parser."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from overlayctl.release import parse_env_text

KEYS = st.from_regex(r"[A-Z_][A-Z0-9_]{0,15}", fullmatch=True)
VALUES = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)


def quote(value: str) -> str:
    """How a tool writing os-release would quote VALUE (double quotes, shell escapes)."""
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{out}"'


@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_quoted_values_round_trip(pairs: dict[str, str]) -> None:
    text = "".join(f"{k}={quote(v)}\n" for k, v in pairs.items())
    assert parse_env_text(text) == pairs


@given(st.dictionaries(KEYS, st.text(alphabet=string.ascii_letters + string.digits + "._-",
                                     min_size=1, max_size=20), max_size=8))
def test_plain_values_round_trip(pairs: dict[str, str]) -> None:
    text = "".join(f"{k}={v}\n" for k, v in pairs.items())
    assert parse_env_text(text) == pairs


@settings(max_examples=300)
@given(st.text(max_size=400).filter(lambda t: "\0" not in t))
def test_any_text_parses_without_error_and_only_to_valid_keys(text: str) -> None:
    result = parse_env_text(text)
    for key in result:
        assert key and (key[0].isalpha() or key[0] == "_")
        assert all(c.isalnum() or c == "_" for c in key)


@given(st.dictionaries(KEYS, VALUES, max_size=6), st.lists(st.sampled_from(
    ["# comment", "; comment", "", "   ", "not a pair", "=nokey"]), max_size=6))
def test_comments_and_junk_lines_change_nothing(pairs: dict[str, str], junk: list[str]) -> None:
    lines = [f"{k}={quote(v)}" for k, v in pairs.items()]
    mixed = [x for pair in zip(lines, junk + [""] * len(lines), strict=False) for x in pair]
    assert parse_env_text("\n".join(mixed + lines[len(junk):]) + "\n") == pairs
