"""state.atomic_write: whole or not at all, and a file that already holds the text is left
alone (no rewrite, no fsync: a boot that merges what the last one merged writes nothing)."""

from __future__ import annotations

import os
from pathlib import Path

from overlayctl.state import atomic_write


def test_same_text_is_not_rewritten(tmp_path: Path) -> None:
    p = tmp_path / "d" / "rec.json"
    atomic_write(str(p), '{"a":1}\n')
    ino = p.stat().st_ino
    atomic_write(str(p), '{"a":1}\n')
    assert p.stat().st_ino == ino                    # not replaced
    assert not [n for n in os.listdir(p.parent) if ".tmp." in n]


def test_other_text_replaces_the_file(tmp_path: Path) -> None:
    p = tmp_path / "rec.json"
    atomic_write(str(p), '{"a":1}\n')
    ino = p.stat().st_ino
    for text in ('{"a":2}\n', '{"a":2}\nmore\n', '{"a"'):   # changed, longer, a prefix
        atomic_write(str(p), text)
        assert p.read_text() == text
    assert p.stat().st_ino != ino
