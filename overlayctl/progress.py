"""A progress line on a terminal for the local-change verbs that walk a whole upper: shown
on stderr only when it is a terminal and the work has taken longer than a second, redrawn at
most ten times a second, erased when the work ends. Nothing at all when stderr is not a
terminal, nor when the verb's own output streams to the same terminal (it shows progress
by itself there)."""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import TextIO

DELAY = 1.0       # seconds before the line first appears
INTERVAL = 0.1    # seconds between redraws
CHECK_EVERY = 64  # entries between looks at the clock


class Progress:
    __slots__ = ("what", "count", "start", "next_draw", "shown", "stream", "_skip")

    def __init__(self, what: str, *, streaming: bool = False,
                 stream: TextIO | None = None) -> None:
        """WHAT: what is counted ("entries of /etc read"). STREAMING: the verb writes its
        results to stdout as it goes."""
        self.what = what
        self.count = 0
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.next_draw = self.start + DELAY
        self.shown = False
        self._skip = not _isatty(self.stream) or (streaming and _isatty(sys.stdout))

    def tick(self, n: int = 1) -> None:
        """N more entries done. Cheap: the clock is read every CHECK_EVERY entries."""
        self.count += n
        if self._skip or self.count % CHECK_EVERY:
            return
        now = time.monotonic()
        if now >= self.next_draw:
            self.next_draw = now + INTERVAL
            self._draw(now)

    def _draw(self, now: float) -> None:
        line = f"overlayctl: {self.count:,} {self.what} ({now - self.start:.0f} s)"
        try:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self.shown = True
        except (OSError, ValueError):
            self._skip = True

    def clear(self) -> None:
        """Erase the line, if it was drawn (before printing, and at the end)."""
        if self.shown:
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self.shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


def _isatty(stream: TextIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
