"""Named checkpoints on the paths that change the system, for fault-injection tests.

OVERLAYCTL_FAULT=NAME kills the process with SIGKILL when it reaches checkpoint NAME (or
NAME@HIERARCHY for a checkpoint reached once per hierarchy); OVERLAYCTL_FAULT_ERROR=NAME
makes the step fail there with an I/O error instead (what a failing system call does);
OVERLAYCTL_FAULT_PAUSE=NAME=FILE creates FILE there and waits until it is removed (to let a
test act in that moment); OVERLAYCTL_FAULT_TRACE=FILE appends the name of every checkpoint
reached to FILE. For tests only."""

from __future__ import annotations

import os


def checkpoint(name: str, hierarchy: str | None = None) -> None:
    full = f"{name}@{hierarchy}" if hierarchy else name
    trace = os.environ.get("OVERLAYCTL_FAULT_TRACE")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(full + "\n")
    want = os.environ.get("OVERLAYCTL_FAULT")
    if want and want in (name, full):
        import signal  # not at the top: it imports enum, which a merge does not need
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get("OVERLAYCTL_FAULT_PAUSE")
    if pause:
        at, _, path = pause.partition("=")
        if at in (name, full) and path:
            import time
            open(path, "w").close()
            while os.path.exists(path):
                time.sleep(0.01)
    fail = os.environ.get("OVERLAYCTL_FAULT_ERROR")
    if fail and fail in (name, full):
        import errno
        raise OSError(errno.EIO, f"injected failure at {full}")
