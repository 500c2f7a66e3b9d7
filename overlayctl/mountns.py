"""The resources every changing verb works inside: the lock, the private workspace tmpfs,
and a forked child with a private mount namespace (for what must not be seen outside)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from overlayctl import kernel as k
from overlayctl.errors import OverlayctlError, die

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any


class Locked:
    """Proof that the caller holds the lock of ROOT: functions that change mounts or
    records take one, so that nothing takes the lock twice or forgets it."""

    __slots__ = ("root",)

    def __init__(self, root: str) -> None:
        self.root = root


@contextmanager
def lock(root: str) -> Iterator[Locked]:
    """Serialise every overlayctl invocation on one root (upstream has no lock)."""
    d = os.path.join(root, "run", "overlayctl")
    try:
        os.makedirs(d, 0o755, exist_ok=True)
        fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise die(f"cannot create the lock file in {d}: {e.strerror}",
                  "run as root on a writable /run") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield Locked(root)
    finally:
        os.close(fd)


@contextmanager
def workspace() -> Iterator[str]:
    """A private tmpfs that is mounted nowhere: reachable only through our fd, and through
    the overlays that use it (metadata layers) once they exist."""
    mfd = k.tmpfs()
    try:
        yield k.fd_path(mfd)
    finally:
        os.close(mfd)


def in_child(fn: Callable[[], tuple[dict[str, Any], list[int]]]) -> tuple[dict[str, Any],
                                                                           list[int]]:
    """Run FN in a forked child with a private mount namespace; FN returns (data, fds).
    The fds (detached mounts) and the JSON data come back over a socket; the caller owns
    the fds."""
    import json  # only on this path: keep both off the common start-up
    import socket
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        fds: list[int] = []
        try:
            parent_sock.close()
            k.unshare_mount_ns()
            data, fds = fn()
            payload = json.dumps({"ok": True, **data}).encode()
        except OverlayctlError as e:
            payload, fds, code = json.dumps({"ok": False, "error": e.message,
                                             "hint": e.hint}).encode(), [], 1
        except OSError as e:
            payload, fds, code = json.dumps({"ok": False, "errno": e.errno,
                                             "error": e.strerror or str(e),
                                             "filename": e.filename, "hint": None}).encode(), [], 1
        except BaseException as e:
            payload, fds, code = json.dumps({"ok": False, "error": repr(e),
                                             "hint": None}).encode(), [], 1
        try:
            socket.send_fds(child_sock, [payload], fds)
        finally:
            os._exit(code)
    child_sock.close()
    try:
        msg, fds, _, _ = socket.recv_fds(parent_sock, 1 << 20, 600)
    finally:
        parent_sock.close()
        os.waitpid(pid, 0)
    data = json.loads(msg.decode() or '{"ok": false, "error": "helper died"}')
    if not data.get("ok"):
        for fd in fds:
            os.close(fd)
        if data.get("errno"):
            raise OSError(data["errno"], data.get("error"), data.get("filename"))
        raise die(data.get("error", "helper failed"), data.get("hint"))
    return data, list(fds)
