"""One logger for every message overlayctl prints on stderr, with systemd's levels.

$SYSTEMD_LOG_LEVEL picks the most verbose level shown (a name, emerg … debug, or 0 … 7;
"console:LEVEL" pairs as systemd takes them are understood too). The default is info: what
upstream prints on a terminal. At err, a successful run prints nothing."""

from __future__ import annotations

import os
import sys

from overlayctl.personality import current

EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)
LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


def parse_level(value: str) -> int | None:
    """A level name or number, or None if VALUE is neither."""
    v = value.strip().lower()
    if v in LEVELS:
        return LEVELS.index(v)
    if v.isdigit() and int(v) < len(LEVELS):
        return int(v)
    return None


def _level_from_env() -> int:
    value = os.environ.get("SYSTEMD_LOG_LEVEL")
    if not value:
        return INFO
    level = None
    for item in value.split(","):
        target, sep, lvl = item.partition(":")
        if not sep:
            level = parse_level(target) if level is None else level
        elif target.strip() == "console":
            level = parse_level(lvl)
    return INFO if level is None else level


max_level = _level_from_env()


def log(level: int, msg: str) -> None:
    if level > max_level:
        return
    if level <= ERR:
        msg = f"{current().name}: {msg}"
    elif level == WARNING:
        msg = f"{current().name}: warning: {msg}"
    try:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    except OSError:
        pass


def debug(msg: str) -> None:
    log(DEBUG, msg)


def info(msg: str) -> None:
    log(INFO, msg)


def notice(msg: str) -> None:
    log(NOTICE, msg)


def warning(msg: str) -> None:
    log(WARNING, msg)


def error(msg: str) -> None:
    log(ERR, msg)


class quiet:
    """Within it, messages below LEVEL (default: warnings) are not shown: for work done on
    the way to something else (a rebuild after reset prints no 'Merged extensions')."""

    def __init__(self, level: int = WARNING) -> None:
        self.level = level
        self.saved = max_level

    def __enter__(self) -> None:
        global max_level
        self.saved = max_level
        max_level = min(max_level, self.level)

    def __exit__(self, *exc: object) -> None:
        global max_level
        max_level = self.saved
