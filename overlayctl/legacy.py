"""Overlays for kernels that refuse detached mounts as layers (before about Linux 6.15),
and the mount(2) path (before Linux 6.8, or OVERLAYCTL_LEGACY_MOUNT=1).

All overlays of an invocation are made in ONE private child namespace: the detached mounts
the layers live on (workspace, ephemeral tmpfs, raw images, plain views) are attached there
once each (a detached mount can be attached only once), on a fresh directory only that
namespace sees; each overlay, with its read-only metadata (and ephemeral) binds, comes back
to the parent as a detached clone. With mount(2), layers are given as short relative
symlinks, so one option page holds 500 layers and no path needs escaping."""

from __future__ import annotations

import os

from overlayctl import kernel as k
from overlayctl.errors import die, hint_for
from overlayctl.mountns import in_child
from overlayctl.overlayfs import OverlaySpec, overlay_new_api, vfs_flags

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

_FD_PREFIX = "/proc/self/fd/"


def _escape_opt(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,")


def _split_fd_path(p: str) -> tuple[str, str] | None:
    """('N', '/rest') for /proc/self/fd/N[/rest], else None."""
    if not p.startswith(_FD_PREFIX):
        return None
    n, sep, rest = p[len(_FD_PREFIX):].partition("/")
    return (n, sep + rest) if n.isdigit() else None


def overlays_in_child(specs: list[OverlaySpec], source: str) -> list[int]:
    """The detached overlays of SPECS, made in one child namespace; the caller owns them."""
    legacy = not k.have_new_mount_api()
    # A fresh empty directory hides nothing; it is removed again right after.
    import tempfile
    stage = tempfile.mkdtemp(prefix=".overlayctl-stage-",
                             dir="/run" if os.path.isdir("/run") else None)
    attached: dict[str, str] = {}

    def real(p: str) -> str:
        """In the child: a /proc/self/fd/N path on a detached mount, as attached there."""
        split = _split_fd_path(p)
        if split is None:
            return p
        n, rest = split
        if n not in attached:
            d = os.path.join(stage, "fd" + n)
            os.mkdir(d)
            k.move_mount(int(n), d)
            attached[n] = d
        return attached[n] + rest

    def child() -> tuple[dict[str, Any], list[int]]:
        k.mount("overlayctl", stage, "tmpfs", 0, "mode=0700")
        out: list[int] = []
        for i, b in enumerate(specs):
            try:
                out.append(one(i, b))
            except OSError as e:
                raise die(f"cannot build the overlay for {b.target}: {e.strerror}",
                          hint_for(e)) from None
        return {}, out

    def one(i: int, b: OverlaySpec) -> int:
        _, ms = vfs_flags(b.vfs_options)
        low = [real(p) for p in b.lowers]
        up = real(b.upper) if b.upper else None
        wk = real(b.work) if b.work else None
        ovl = os.path.join(stage, f"overlay{i}")
        os.mkdir(ovl)
        if legacy:
            links = os.path.join(stage, f"links{i}")
            os.mkdir(links)
            for j, p in enumerate(low):
                os.symlink(p, os.path.join(links, str(j)))
            opts = ["lowerdir=" + ":".join(str(j) for j in range(len(low)))]
            if up and wk:
                os.symlink(up, os.path.join(links, "u"))
                os.symlink(wk, os.path.join(links, "w"))
                opts += ["upperdir=u", "workdir=w"]
            opts += [_escape_opt(o) for o in b.fs_options]
            data = ",".join(opts)
            if len(data) >= 4096:
                raise die(f"the mount options for {b.hierarchy} exceed one page",
                          "use a kernel with lowerdir+ (Linux 6.8+) or fewer options")
            os.chdir(links)
            k.mount(source, ovl, "overlay", ms, data)
            os.chdir("/")
        else:
            ofd = overlay_new_api(source, low, up, wk, b.fs_options, b.vfs_options)
            try:
                k.move_mount(ofd, ovl)
            finally:
                os.close(ofd)
        for rel, src in ((b.meta_rel, None), (b.eph_rel, b.eph_base)):
            if not rel:
                continue
            m = os.path.join(ovl, rel)
            k.mount(real(src) if src else m, m, None, k.MS_BIND, None)
            k.mount("none", m, None, k.MS_BIND | k.MS_REMOUNT | k.MS_RDONLY | ms, None)
        return k.open_tree(ovl, recursive=True)

    try:
        _, fds = in_child(child)
    except OSError as e:
        # The staging directory means nothing to the user; the caller names the hierarchy.
        raise OSError(e.errno, e.strerror) from None
    finally:
        os.rmdir(stage)
    return fds
