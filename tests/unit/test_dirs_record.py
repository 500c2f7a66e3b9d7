"""state.DirsRecord's line format (read on every writable merge without the json module):
what is saved is what is loaded, for any directory names, and damage reads as no record."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from overlayctl.state import DirsRecord

NAMES = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=8)
TREES: st.SearchStrategy[dict[str, Any]] = st.recursive(
    st.just({}), lambda t: st.dictionaries(NAMES, t, max_size=4), max_leaves=12)
PATHS = st.lists(st.lists(NAMES, min_size=1, max_size=3).map("/".join), max_size=4)


def rec(**kw: Any) -> DirsRecord:
    v: dict[str, Any] = dict(since=1, upper="/usr", dirs={}, window={}, whiteout_dirs={},
                             deliberate=(), pending=(), base=False, closed=False,
                             drop_whiteouts=True, clean=False)
    v.update(kw)
    return DirsRecord(**v)


@given(dirs=TREES, window=TREES, wd=TREES, deliberate=PATHS, pending=PATHS,
       upper=st.lists(NAMES, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
       since=st.integers(0, 2**63))
def test_round_trip(dirs: dict[str, Any], window: dict[str, Any], wd: dict[str, Any],
                    deliberate: list[str], pending: list[str], upper: str,
                    flags: tuple[bool, bool, bool, bool], since: int) -> None:
    r = rec(since=since, upper=upper, dirs=dirs, window=window, whiteout_dirs=wd,
            deliberate=tuple(deliberate), pending=tuple(pending), base=flags[0],
            closed=flags[1], drop_whiteouts=flags[2], clean=flags[3])
    assert DirsRecord.from_text(r.to_text()) == r


def test_odd_names_stay_one_line_each() -> None:
    r = rec(dirs={"a\nb": {"c\\d": {}}, "e f": {}}, deliberate=("a\nb/c\\d",))
    text = r.to_text()
    assert "dirs a\\nb/c\\\\d\n" in text and "dirs e f\n" in text
    assert DirsRecord.from_text(text) == r


def test_damage_is_no_record() -> None:
    assert DirsRecord.from_text("") is None
    assert DirsRecord.from_text('{"version": 1}') is None
    assert DirsRecord.from_text("overlayctl-dirs 1\nsince x\n") is None
    assert DirsRecord.from_text("overlayctl-dirs 1\nupper /usr\n") is None   # no since


def test_fsync_only_when_more_than_the_merge_time_changed(tmp_path: Any,
                                                          monkeypatch: Any) -> None:
    """A boot that merges the lower directories of the last one writes a new `since` without
    waiting for the disk; any other change is synced."""
    import os

    from overlayctl import state
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    root = str(tmp_path)
    state.save_dirs(root, "sysext", "/usr", rec(since=1, dirs={"lib": {}}))
    assert len(synced) == 1                                   # new: synced
    state.save_dirs(root, "sysext", "/usr", rec(since=2, dirs={"lib": {}}))
    assert len(synced) == 1                                   # only since: not synced
    assert state.load_dirs(root, "sysext", "/usr") == rec(since=2, dirs={"lib": {}})
    state.save_dirs(root, "sysext", "/usr", rec(since=3, dirs={"lib": {}, "share": {}}))
    assert len(synced) == 2                                   # the directories: synced
    state.save_dirs(root, "sysext", "/usr", rec(since=3, dirs={"lib": {}, "share": {}},
                                                 clean=True))
    assert len(synced) == 3                                   # a flag: synced
    state.save_dirs(root, "sysext", "/usr", rec(since=3, dirs={"lib": {}, "share": {}},
                                                 clean=True))
    assert len(synced) == 3                                   # nothing: not even written
