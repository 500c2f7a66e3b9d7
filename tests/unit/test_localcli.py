"""localcli: the pieces of diff's output that are built by hand print what the library
they stand in for would (json.dumps of the whole list, difflib.unified_diff)."""

from __future__ import annotations

import difflib
import io
import json
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayctl.localcli import _stream_json, added_diff

lines = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
                 .map(lambda s: s.replace("\n", "") + "\n"), max_size=6)


@given(lines, st.booleans())
def test_added_diff_is_unified_diff_from_nothing(new: list[str], cut_last_newline: bool) -> None:
    if new and cut_last_newline:
        new[-1] = new[-1].rstrip("\n")
    want = list(difflib.unified_diff([], new, fromfile="a/etc/x (none)",
                                     tofile="b/etc/x (upper)"))
    assert added_diff(new, "a/etc/x (none)", "b/etc/x (upper)") == want


@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 257, 600])
def test_stream_json_is_json_dumps(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[dict[str, Any]] = [{"path": f"/etc/f{i}", "change": "added", "x": None,
                                   "é": [i, True]} for i in range(n)]
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    _stream_json(iter(rows))
    assert out.getvalue() == json.dumps(rows, separators=(",", ":")) + "\n"
