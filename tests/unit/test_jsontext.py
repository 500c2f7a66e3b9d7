"""overlayctl.jsontext writes exactly what json.dumps writes (sorted keys, compact, ASCII)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayctl.jsontext import dumps

scalars = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.text()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(), inner, max_size=5), max_leaves=30)


def reference(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


@settings(max_examples=500)
@given(values)
def test_same_text_as_json(v: Any) -> None:
    assert dumps(v) == reference(v)


@pytest.mark.parametrize("s", ["", "plain", 'q"uote', "back\\slash", "\x00\x1f\x7f", "ä€",
                               "\U0001F600", "\udcff", "tab\tnl\ncr\r\b\f"])
def test_strings(s: str) -> None:
    assert dumps(s) == reference(s)
    assert json.loads(dumps(s)) == s


def test_tuples_are_lists_and_bad_types_refused() -> None:
    assert dumps({"a": (1, 2)}) == '{"a":[1,2]}'
    with pytest.raises(TypeError):
        dumps({1: "x"})
    with pytest.raises(TypeError):
        dumps(1.5)
