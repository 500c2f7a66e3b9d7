"""The resources every changing verb works inside: the lock, the private workspace tmpfs,
and a forked child with a private mount namespace (for what must not be seen outside)."""

from __future__ import annotations

import fcntl
import os

from overlayctl import kernel as k
from overlayctl.errors import OverlayctlError, die

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class Locked:
    """Proof that the caller holds the lock of ROOT: functions that change mounts or
    records take one, so that nothing takes the lock twice or forgets it."""

    __slots__ = ("root",)

    def __init__(self, root: str) -> None:
        self.root = root


class lock:
    """Serialise every overlayctl invocation on one root (upstream has no lock):
    ``with lock(root) as locked``. (A class rather than a contextlib generator: contextlib
    is not imported at boot.)"""

    __slots__ = ("root", "fd")

    def __init__(self, root: str) -> None:
        self.root = root
        self.fd = -1

    def __enter__(self) -> Locked:
        d = os.path.join(self.root, "run", "overlayctl")
        try:
            os.makedirs(d, 0o755, exist_ok=True)
            fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise die(f"cannot create the lock file in {d}: {e.strerror}",
                      "run as root on a writable /run") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return Locked(self.root)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


class workspace:
    """A private tmpfs that is mounted nowhere: reachable only through our fd, and through
    the overlays that use it (metadata layers) once they exist. ``with workspace() as
    path``."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = -1

    def __enter__(self) -> str:
        self.fd = k.tmpfs()
        return k.fd_path(self.fd)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def in_child(fn: Callable[[], tuple[dict[str, Any], list[int]]]) -> tuple[dict[str, Any],
                                                                           list[int]]:
    """Run FN in a forked child with a private mount namespace; FN returns (data, fds).
    The fds (detached mounts) and the data (plain values, marshalled: parent and child are
    the same interpreter) come back over a socket; the caller owns the fds. The socket
    module and json are not used: they import enum and re, milliseconds at every refresh."""
    import _socket
    import marshal
    parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        fds: list[int] = []
        try:
            parent_sock.close()
            k.unshare_mount_ns()
            data, fds = fn()
            payload = marshal.dumps({"ok": True, **data})
        except OverlayctlError as e:
            payload, fds, code = marshal.dumps({"ok": False, "error": e.message,
                                                "hint": e.hint}), [], 1
        except OSError as e:
            payload, fds, code = marshal.dumps({"ok": False, "errno": e.errno,
                                                "error": e.strerror or str(e),
                                                "filename": e.filename, "hint": None}), [], 1
        except BaseException as e:
            payload, fds, code = marshal.dumps({"ok": False, "error": repr(e),
                                                "hint": None}), [], 1
        try:
            _send_fds(child_sock, payload, fds)
        finally:
            os._exit(code)
    child_sock.close()
    try:
        msg, fds = _recv_fds(parent_sock, 1 << 20, 600)
    finally:
        parent_sock.close()
        os.waitpid(pid, 0)
    data = marshal.loads(msg) if msg else {"ok": False, "error": "helper died"}
    if not data.get("ok"):
        for fd in fds:
            os.close(fd)
        if data.get("errno"):
            raise OSError(data["errno"], data.get("error"), data.get("filename"))
        raise die(data.get("error", "helper failed"), data.get("hint"))
    return data, fds


def _send_fds(sock: Any, payload: bytes, fds: list[int]) -> None:
    """socket.send_fds: PAYLOAD with FDS as SCM_RIGHTS."""
    import _socket
    import struct
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
        if fds else []
    sock.sendmsg([payload], anc)


def _recv_fds(sock: Any, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """socket.recv_fds: the message and the fds that came with it."""
    import _socket
    import struct
    msg, anc, _flags, _addr = sock.recvmsg(bufsize, _socket.CMSG_SPACE(maxfds * 4))
    fds: list[int] = []
    for level, kind, data in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            n = len(data) // 4
            fds.extend(struct.unpack(f"{n}i", data[:n * 4]))
    return msg, fds
