"""progress.Progress on a real pseudo-terminal: a line after the delay, redrawn, erased at
the end; nothing before the delay, nothing on a pipe, nothing when the verb's own output
streams to the terminal."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator

import pytest

from overlayctl import progress
from overlayctl.progress import Progress
from tests.conftest import pty_output


@pytest.fixture
def tty() -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A text stream on the slave side of a pty, and the master fd to read what it shows."""
    master, slave = os.openpty()
    stream = io.TextIOWrapper(io.FileIO(slave, "w"), encoding="utf-8")
    yield stream, master
    stream.close()
    os.close(master)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    monkeypatch.setattr(progress, "CHECK_EVERY", 1)


def test_line_after_the_delay_then_erased(tty: tuple[io.TextIOWrapper, int], fast: None) -> None:
    stream, master = tty
    with Progress("entries read", stream=stream) as p:
        for _ in range(3):
            p.tick()
    out = pty_output(master)
    assert "\roverlayctl: 1 entries read (0 s)\x1b[K" in out
    assert "\roverlayctl: 3 entries read (0 s)\x1b[K" in out
    assert out.endswith("\r\x1b[K")          # erased: the terminal is as it was


def test_nothing_within_the_first_second(tty: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = tty
    with Progress("entries read", stream=stream) as p:
        for _ in range(10 * progress.CHECK_EVERY):
            p.tick()
    assert pty_output(master) == ""


def test_nothing_on_a_pipe(fast: None) -> None:
    r, w = os.pipe()
    stream = io.TextIOWrapper(io.FileIO(w, "w"), encoding="utf-8")
    with Progress("entries read", stream=stream) as p:
        for _ in range(5):
            p.tick()
    stream.close()
    assert os.read(r, 100) == b""
    os.close(r)


def test_nothing_when_the_output_streams_to_the_terminal(
        tty: tuple[io.TextIOWrapper, int], fast: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stream, master = tty
    monkeypatch.setattr(sys, "stdout", stream)      # stdout is that terminal too
    with Progress("entries read", streaming=True, stream=stream) as p:
        p.tick()
    assert pty_output(master) == ""
    with Progress("entries read", streaming=False, stream=stream) as p:
        p.tick()
    assert "entries read" in pty_output(master)
