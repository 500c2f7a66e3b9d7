"""The kernel command line kill switch: systemd.sysext=0 / systemd.confext=0.

As systemd 262's systemd-sysext, the switch only counts when the service manager started the
process ($SYSTEMD_EXEC_PID is its PID, or "*" as systemd accepts for tests): a unit that runs
it is then a no-op, while an admin who runs it by hand is not stopped. The command line is
$SYSTEMD_PROC_CMDLINE if set (systemd's own override, for tests), else /proc/cmdline; the last
assignment of a key wins; a key without a value is true. Only imported when
$SYSTEMD_EXEC_PID is set."""

from __future__ import annotations

import os

from overlayctl import log
from overlayctl.release import parse_boolean


def invoked_by_systemd(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """systemd's invoked_by_systemd(): $SYSTEMD_EXEC_PID names this process."""
    e = (os.environ if environ is None else environ).get("SYSTEMD_EXEC_PID")
    if not e:
        return False
    if e == "*":
        return True
    try:
        return int(e) == os.getpid()
    except ValueError:
        log.debug(f"Failed to parse \"SYSTEMD_EXEC_PID={e}\", ignoring.")
        return False


def words(text: str) -> list[str]:
    """The words of a kernel command line: split at blanks, double or single quotes kept
    together (and removed), as systemd's proc_cmdline parser does."""
    out: list[str] = []
    cur: list[str] = []
    quote: str | None = None
    started = False
    for c in text:
        if quote:
            if c == quote:
                quote = None
            else:
                cur.append(c)
        elif c in "\"'":
            quote = c
            started = True
        elif c.isspace():
            if started or cur:
                out.append("".join(cur))
            cur, started = [], False
        else:
            cur.append(c)
    if started or cur:
        out.append("".join(cur))
    return out


def _cmdline() -> str:
    override = os.environ.get("SYSTEMD_PROC_CMDLINE")
    if override is not None:
        return override
    with open("/proc/cmdline", encoding="utf-8", errors="replace") as f:
        return f.read()


def _same_key(a: str, b: str) -> bool:
    """proc_cmdline_key_streq(): '-' and '_' are the same in kernel command line keys."""
    return a.replace("-", "_") == b.replace("-", "_")


def get_bool(key: str) -> bool | None:
    """The last value KEY is given on the kernel command line (KEY alone: True), None if it
    is not there; ValueError if that value is no boolean."""
    value: bool | None = None
    for w in words(_cmdline()):
        k, eq, v = w.partition("=")
        if not _same_key(k, key):
            continue
        if not eq:
            value = True
            continue
        b = parse_boolean(v)
        if b is None:
            raise ValueError(v)
        value = b
    return value


def disabled(class_name: str) -> bool:
    """Is CLASS_NAME switched off for this invocation (systemd.sysext=0 or systemd.confext=0
    while the service manager runs us)? Says so at notice level, as upstream."""
    if not invoked_by_systemd():
        return False
    key = f"systemd.{class_name}"
    try:
        on = get_bool(key)
    except (OSError, ValueError) as e:
        why = "Invalid argument" if isinstance(e, ValueError) else (e.strerror or str(e))
        log.debug(f"Failed to check '{key}=' kernel command line option, proceeding: {why}")
        return False
    if on is False:
        log.notice(f"Disabled by the kernel command line option '{key}=', skipping execution.")
        return True
    return False
