"""Carry out plans with real mounts.

Every overlay is built detached (fsopen/fsconfig/fsmount, or mount(2) in a private child
namespace on older kernels) together with its read-only metadata and the nested mounts it
has to carry, and only then put into place. Nothing is visible until every hierarchy of the
invocation has been built; if putting one into place fails, the ones already placed are
taken down again, so a merge either happens for every hierarchy or for none.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from overlayctl import faults, metadata, mountinfo, state
from overlayctl import kernel as k
from overlayctl.errors import OverlayctlError, die
from overlayctl.images import Image
from overlayctl.paths import inside, single_component
from overlayctl.plan import HierarchyPlan
from overlayctl.settings import ExtClass, Settings

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Resources


_held: dict[str, int] = {}


@contextmanager
def lock(root: str) -> Iterator[None]:
    """Serialise every overlayctl invocation on one root (upstream has no lock).
    Re-entrant within one process."""
    if _held.get(root):
        _held[root] += 1
        try:
            yield
        finally:
            _held[root] -= 1
        return
    d = os.path.join(root, "run", "overlayctl")
    try:
        os.makedirs(d, 0o755, exist_ok=True)
        fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise die(f"cannot create the lock file in {d}: {e.strerror}",
                  "run as root on a writable /run") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[root] = 1
        yield
    finally:
        _held[root] = 0
        os.close(fd)


@contextmanager
def workspace() -> Iterator[str]:
    """A private tmpfs that is mounted nowhere: reachable only through our fd, and through
    the overlays that use it (metadata layers) once they exist."""
    mfd = _tmpfs()
    try:
        yield f"/proc/self/fd/{mfd}"
    finally:
        os.close(mfd)


def _unshare_private() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    k.mount("none", "/", None, k.MS_REC | k.MS_PRIVATE, None)


def _in_child(fn: Any) -> tuple[dict[str, Any], list[int]]:
    """Run FN in a forked child with a private mount namespace; FN returns (data, fds).
    The fds (detached mounts) and the JSON data come back over a socket."""
    import socket  # only on this path: keep it off the common start-up
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            parent_sock.close()
            _unshare_private()
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


# ---------------------------------------------------------------------------------------------
# Who is merged


def is_ours(path: str, cls: ExtClass, mounts: list[mountinfo.Mount] | None = None) -> bool:
    """Upstream's rule: a mount point whose metadata 'dev' equals its st_dev."""
    if not mountinfo.is_mountpoint(path, mounts):
        return False
    dev = metadata.read_dev(path, cls)
    if dev is None:
        return False
    st = os.lstat(path)
    return (os.major(st.st_dev), os.minor(st.st_dev)) == dev


def plain_views(targets: list[str], cls: ExtClass) -> dict[str, PlainView]:
    """For merged targets: detached mounts through which the plain directory under the
    overlay can be read and used as a layer, while the overlay stays in place."""
    if not targets:
        return {}

    def child() -> tuple[dict[str, Any], list[int]]:
        rels: list[str] = []
        fds: list[int] = []
        for t in targets:
            while is_ours(t, cls):
                k.umount(t)
            if mountinfo.is_mountpoint(t):
                fds.append(k.open_tree(t))
                rels.append("")
            else:
                fds.append(k.open_tree(os.path.dirname(t)))
                rels.append(os.path.basename(t))
        return {"rels": rels}, fds

    data, fds = _in_child(child)
    return {t: PlainView(fd, rel) for t, fd, rel in zip(targets, fds, data["rels"], strict=True)}


@dataclass
class PlainView:
    """A detached mount showing the plain directory under a merged hierarchy."""

    fd: int
    rel: str

    @property
    def path(self) -> str:
        base = f"/proc/self/fd/{self.fd}"
        return os.path.join(base, self.rel) if self.rel else base


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class Built:
    plan: HierarchyPlan
    fd: int                                    # the detached overlay
    meta_dir: str                              # .systemd-* in the workspace
    pending_binds: list[tuple[int, str]] = field(default_factory=list)  # (fd, rel) to graft
    created: list[str] = field(default_factory=list)   # persistent dirs this run made
    originals: list[int] = field(default_factory=list)  # O_PATH fds of carried mounts
    record: dict[str, Any] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)   # old ephemeral work dirs to drop
    # What create_overlays() needs: layer paths, and binds to make read-only inside.
    lowers: list[str] = field(default_factory=list)
    upper: str | None = None
    work: str | None = None
    meta_rel: str | None = None
    eph_base: str | None = None
    eph_rel: str | None = None
    owned: list[int] = field(default_factory=list)    # fds to close once the overlay exists


def _flags(vfs: list[str]) -> tuple[int, int]:
    attr = ms = 0
    for w in vfs:
        if w in k.VFS_FLAGS:
            a, m = k.VFS_FLAGS[w]
            if w in ("noatime", "relatime", "strictatime"):
                attr &= ~k.MOUNT_ATTR__ATIME
                ms &= ~(k.MS_NOATIME | k.MS_RELATIME | k.MS_STRICTATIME)
            attr |= a
            ms |= m
        elif w in k.VFS_CLEAR:
            a, m = k.VFS_FLAGS[k.VFS_CLEAR[w]]
            attr &= ~a
            ms &= ~m
    return attr, ms


def _makedirs(path: str, mode: int, created: list[str]) -> None:
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)   # not narrowed by the umask, as upstream v260
        created.append(d)
    os.chmod(path, mode)


def _overlay_new_api(plan: HierarchyPlan, source: str, lowers: list[str], upper: str | None,
                     work: str | None) -> int:
    fd = k.fsopen("overlay")
    try:
        k.fsconfig_string(fd, "source", source)
        for p in lowers:
            k.fsconfig_string(fd, "lowerdir+", p)
        if upper and work:
            # overlayfs unescapes backslashes in these two (not in lowerdir+).
            k.fsconfig_string(fd, "upperdir", upper.replace("\\", "\\\\"))
            k.fsconfig_string(fd, "workdir", work.replace("\\", "\\\\"))
        for opt in plan.fs_options:
            key, sep, value = opt.partition("=")
            if sep:
                k.fsconfig_string(fd, key, value)
            else:
                k.fsconfig_flag(fd, key)
        k.fsconfig_create(fd)
        attr, _ = _flags(plan.vfs_options)
        return k.fsmount(fd, attr)
    finally:
        os.close(fd)


def _escape_opt(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,")


_FD_PATH = re.compile(r"^/proc/self/fd/(\d+)(/.*)?$")


def _overlays_in_child(built: list[Built], source: str) -> list[int]:
    """Build the overlays in one private child namespace, for kernels that refuse detached
    mounts as layers (before about Linux 6.15) and for the mount(2) path. The workspace,
    image and plain-view mounts the layers live on are attached there (once each: a detached
    mount can be attached only once), on a directory only that namespace sees; each overlay,
    with its read-only metadata (and ephemeral) binds, comes back as a detached mount.

    With mount(2), layers are given as short relative symlinks, so one option page holds 500
    layers and no path needs escaping."""
    legacy = not k.have_new_mount_api()
    # A fresh empty directory hides nothing; it is removed again right after.
    import tempfile
    stage = tempfile.mkdtemp(prefix=".overlayctl-stage-",
                             dir="/run" if os.path.isdir("/run") else None)

    attached: dict[str, str] = {}

    def real(p: str) -> str:
        """In the child: a /proc/self/fd/N path on a detached mount, as attached there."""
        m = _FD_PATH.match(p)
        if not m:
            return p
        n = m.group(1)
        if n not in attached:
            d = os.path.join(stage, "fd" + n)
            os.mkdir(d)
            k.move_mount(int(n), d)
            attached[n] = d
        return attached[n] + (m.group(2) or "")

    def child() -> tuple[dict[str, Any], list[int]]:
        k.mount("overlayctl", stage, "tmpfs", 0, "mode=0700")
        out: list[int] = []
        for i, b in enumerate(built):
            try:
                out.append(one(i, b))
            except OSError as e:
                raise die(f"cannot build the overlay for {b.plan.target}: {e.strerror}",
                          _hint_for(e)) from None
        return {}, out

    def one(i: int, b: Built) -> int:
        plan = b.plan
        _, ms = _flags(plan.vfs_options)
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
            opts += [_escape_opt(o) for o in plan.fs_options]
            data = ",".join(opts)
            if len(data) >= 4096:
                raise die(f"the mount options for {plan.hierarchy} exceed one page",
                          "use a kernel with lowerdir+ (Linux 6.8+) or fewer options")
            os.chdir(links)
            k.mount(source, ovl, "overlay", ms, data)
            os.chdir("/")
        else:
            ofd = _overlay_new_api(plan, source, low, up, wk)
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
        _, fds = _in_child(child)
    except OSError as e:
        # The staging directory means nothing to the user; the caller names the hierarchy.
        raise OSError(e.errno, e.strerror) from None
    finally:
        os.rmdir(stage)
    return fds


def _mount_layers(plan: HierarchyPlan, ws: str,
                  views: dict[str, PlainView]) -> tuple[list[str], str | None, str | None]:
    view = views.get(plan.target)

    name = single_component(plan.hierarchy)   # unique per hierarchy: /a/usr -> a.usr
    lowers: list[str] = []
    for layer in plan.lowers:
        if layer.role == "meta":
            lowers.append(os.path.join(ws, "meta", name))
        elif layer.role == "filler":
            lowers.append(os.path.join(ws, "filler", name))
        else:
            assert layer.path is not None
            lowers.append(layer.path)
    upper = work = None
    if plan.upper_kind == "ephemeral":
        pass   # chosen by build(): a tmpfs of its own
    elif plan.upper_kind is not None:
        assert plan.upperdir is not None and plan.workdir is not None
        upper, work = plan.upperdir, plan.workdir
        if plan.upper_kind == "host" and view is not None and not view.rel:
            raise die(f"{plan.target} is a mount point of its own and cannot be its own upper",
                      "its work directory would be on another mount")
    return lowers, upper, work


def origin_of(settings: Settings, plans: list[HierarchyPlan],
              accepted: list[Image]) -> dict[str, Any]:
    root = settings.root
    exts: dict[str, Any] = {}
    for img in accepted:
        src = img.source or img.path
        st = os.stat(src)
        exts[img.name] = {"path": inside(root, src), "inode": st.st_ino, "dev": st.st_dev,
                          "mtime": st.st_mtime_ns // 1000}
    mutable: dict[str, Any] = {"mode": settings.mutable}
    dirs = {p.hierarchy: inside(root, p.mutable_dir) for p in plans if p.mutable_dir}
    if dirs:
        mutable["mutableDirs"] = dirs
    origin: dict[str, Any] = {"mutable": mutable, "extensions": exts}
    if settings.overlay_options is not None:
        origin["mountOptions"] = settings.overlay_options
    origin["noexec"] = settings.noexec
    origin["hierarchies"] = [p.hierarchy for p in plans if p.merge]
    defaults: dict[str, Any] = {}
    for p in plans:
        d = next((layer.path for layer in p.lowers if layer.role == "defaults"), None)
        if d:
            st = os.stat(d)
            defaults[p.hierarchy] = {"path": inside(root, d), "inode": st.st_ino,
                                     "mtime": st.st_mtime_ns // 1000}
    if defaults:
        origin["defaults"] = defaults
    return origin


def _backing(plan: HierarchyPlan) -> str | None:
    base = next((layer.path for layer in plan.lowers if layer.role == "base"), None)
    if base is None:
        return None
    dev = os.stat(base).st_dev
    if os.path.exists(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"):
        return f"{os.major(dev)}:{os.minor(dev)}"
    return None


def _tmpfs() -> int:
    fd = k.fsopen("tmpfs")
    try:
        k.fsconfig_string(fd, "mode", "0700")
        k.fsconfig_create(fd)
        return k.fsmount(fd, k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOSUID)
    finally:
        os.close(fd)


EPHEMERAL_DIR = "ephemeral"


def carried_ephemeral(target: str, cls: ExtClass) -> int | None:
    """A writable clone of the ephemeral tmpfs of the overlay merged on TARGET (exposed
    read-only at .systemd-*/ephemeral), so that a refresh keeps ephemeral writes."""
    path = os.path.join(target, cls.meta_dir, EPHEMERAL_DIR)
    if not mountinfo.is_mountpoint(path):
        return None
    fd = k.open_tree(path)
    try:
        k.mount_setattr(fd, "", 0, k.MOUNT_ATTR_RDONLY)
    except OSError:
        os.close(fd)
        raise
    return fd


def _ephemeral_dirs(plan: HierarchyPlan, carry: int | None, stale: list[str],
                    owned: list[int]) -> tuple[str, str, str]:
    """Upper and work dir of an ephemeral overlay in a tmpfs of its own (new, or carried over
    from the overlay being replaced), exposed read-only in the metadata dir."""
    efd = _tmpfs() if carry is None else carry
    if carry is None:
        # Closed once the overlay exists: it and the read-only clone keep the tmpfs alive,
        # and it vanishes with them.
        owned.append(efd)
    base = f"/proc/self/fd/{efd}"
    upper = os.path.join(base, "upper")
    if not os.path.isdir(upper):
        os.mkdir(upper)
    os.chmod(upper, plan.top_mode)
    work = os.path.join(base, "work")
    if os.path.exists(work):
        stale.append(work)
        work = os.path.join(base, "work.1")
        if os.path.exists(work):
            _rmtree(work)
    else:
        old = os.path.join(base, "work.1")
        if os.path.exists(old):
            stale.append(old)
    os.mkdir(work, 0o700)
    return upper, work, base


def build(settings: Settings, plan: HierarchyPlan, ws: str, origin: dict[str, Any],
          views: dict[str, PlainView], carry: int | None = None) -> Built:
    cls = settings.cls
    root = settings.root
    name = single_component(plan.hierarchy)   # unique per hierarchy: /a/usr -> a.usr
    created: list[str] = []
    owned: list[int] = []
    view = views.get(plan.target)

    def shown(path: str) -> str:
        """The path as the user knows it (a plain view maps back to the hierarchy)."""
        if view is not None:
            fdpath = f"/proc/self/fd/{view.fd}"
            if path == fdpath or path.startswith(fdpath + "/"):
                real = os.path.dirname(plan.target) if view.rel else plan.target
                path = real + path[len(fdpath):]
        return inside(root, path)
    try:
        meta_root = os.path.join(ws, "meta", name)
        os.makedirs(meta_root)
        if any(layer.role == "filler" for layer in plan.lowers):
            os.makedirs(os.path.join(ws, "filler", name))
        if plan.create_upper:
            assert plan.upperdir is not None
            _makedirs(plan.upperdir, plan.top_mode, created)
        lowers, upper, work = _mount_layers(plan, ws, views)
        stale: list[str] = []
        eph_base: str | None = None
        if plan.upper_kind == "ephemeral":
            upper, work, eph_base = _ephemeral_dirs(plan, carry, stale, owned)
        elif plan.upper_kind is not None:
            assert work is not None
            if not os.path.isdir(work):
                os.mkdir(work, 0o700)
                created.append(work)
        else:
            os.chmod(meta_root, plan.top_mode)
        work_rel = None
        if plan.upper_kind in ("persistent", "host") and plan.workdir:
            work_rel = shown(plan.workdir).lstrip("/")
        record = {
            "class": cls.name, "hierarchy": plan.hierarchy, "mode": plan.mode,
            "upper": plan.upper_kind,
            "upperdir": shown(plan.upperdir) if plan.upperdir and plan.upper_kind in
            ("persistent", "host") else None,
            "workdir": "/" + work_rel if work_rel else None,
            "layers": [{"role": layer.role, "name": layer.name,
                        "path": (inside(root, layer.image) if layer.image else
                                 shown(layer.path) if layer.path else None)}
                       for layer in plan.lowers],
            "overlayctl": True,
            "noexec": settings.noexec,
            "force": settings.force,
            "mount_options": settings.overlay_options,
            "defaults": next((shown(layer.path) for layer in plan.lowers
                              if layer.role == "defaults" and layer.path), None),
        }
        meta_dir = metadata.write_meta(meta_root, cls, names=plan.extensions,
                                       work_dir_rel=work_rel, origin=origin,
                                       backing=_backing(plan), record=record)
        eph_rel = os.path.join(cls.meta_dir, EPHEMERAL_DIR) if eph_base else None
        if eph_base:
            os.mkdir(os.path.join(meta_dir, EPHEMERAL_DIR), 0o700)
        b = Built(plan, -1, meta_dir, created=created, record=record, stale=stale,
                  lowers=lowers, upper=upper, work=work,
                  meta_rel=cls.meta_dir if plan.upper_kind else None,
                  eph_base=eph_base, eph_rel=eph_rel, owned=owned)
        owned = []
        return b
    except OSError as e:
        _undo_created(created)
        raise die(f"cannot build the overlay for {plan.target}: {e.strerror or e}"
                  + (f" ({e.filename})" if e.filename else ""),
                  _hint_for(e)) from None
    except BaseException:
        _undo_created(created)
        raise
    finally:
        for ofd in owned:
            os.close(ofd)


def _hint_for(e: OSError) -> str:
    return {
        errno.EXDEV: "upper and work directory must be on the same mount",
        errno.ELOOP: "a layer lies inside another layer; move the extension out of the hierarchy",
        errno.EROFS: "the upper directory is on a read-only file system",
        errno.EPERM: "run as root",
        errno.EINVAL: "see dmesg for what overlayfs objected to",
    }.get(e.errno or 0, "see dmesg for details")


def _undo_created(created: list[str]) -> None:
    for d in reversed(created):
        try:
            if os.path.basename(d).startswith(".systemd-") and "-workdir" in d:
                _rmtree(d, ignore_errors=True)
            else:
                os.rmdir(d)
        except OSError:
            pass


def _carry_nested(b: Built, mounts: list[mountinfo.Mount]) -> None:
    """Clone the mounts nested under the hierarchy into the new overlay (v257 semantics)."""
    target = b.plan.target
    for m in mountinfo.submounts(mounts, target):
        rel = os.path.relpath(m.mountpoint, target)
        if rel.split("/")[0] in (".systemd-sysext", ".systemd-confext"):
            continue
        try:
            fd = k.open_tree(m.mountpoint, recursive=True)
            orig = k.open_tree(m.mountpoint, clone=False)
        except OSError:
            continue
        b.pending_binds.append((fd, rel))
        b.originals.append(orig)


def _graft(b: Built, attached: bool) -> None:
    """Put the read-only metadata bind and carried mounts onto the overlay, while it is
    still detached when the kernel allows it, else right after it is attached."""
    left: list[tuple[int, str]] = []
    for fd, rel in b.pending_binds:
        try:
            if attached:
                dest = os.path.join(b.plan.target, rel)
                if os.path.isdir(dest) or os.path.exists(dest):
                    k.move_mount(fd, dest)
                else:
                    log(f"Not carrying the mount on {dest}: the merged tree has no such path.")
            else:
                k.move_mount(fd, rel, to_dirfd=b.fd)
        except OSError:
            if attached:
                log(f"Could not carry the mount on {os.path.join(b.plan.target, rel)}.")
            else:
                left.append((fd, rel))
                continue
        os.close(fd)
    b.pending_binds = left


# ---------------------------------------------------------------------------------------------
# Verbs


def _remove_workdir(root: str, rel: str | None, hierarchy_name: str) -> None:
    if not rel:
        return
    path = os.path.join(root, rel.lstrip("/"))
    if os.path.basename(path).startswith(".systemd-") and path.endswith(("-workdir",
                                                                        "-workdir.1")):
        _rmtree(path, ignore_errors=True)


def _detach(target: str, cls: ExtClass, root: str) -> tuple[list[tuple[int, str]], list[str]]:
    """Take our overlays off TARGET (all stacked ones). Returns the nested mounts (cloned)
    to put back, and the work dirs to remove."""
    carried: list[tuple[int, str]] = []
    workdirs: list[str] = []
    while is_ours(target, cls):
        merged = metadata.read_merged(target, cls)
        mounts = mountinfo.read()
        for m in mountinfo.submounts(mounts, target):
            rel = os.path.relpath(m.mountpoint, target)
            if rel == cls.meta_dir:
                continue
            try:
                carried.append((k.open_tree(m.mountpoint, recursive=True), rel))
            except OSError:
                pass
        k.umount(target)
        if merged.work_dir:
            workdirs.append(merged.work_dir)
    return carried, workdirs


def unmerge(settings: Settings) -> int:
    cls = settings.cls
    root = settings.root
    from overlayctl.paths import chase
    done = 0
    for h in settings.hierarchies:
        target = chase(root, h, must_exist=True)
        if target is None or not os.path.isdir(target):
            continue
        if not is_ours(target, cls):
            continue
        from overlayctl import busy
        users = busy.users_below(target)
        old_dev = os.stat(target).st_dev
        faults.checkpoint("unmerge-before-detach", h)
        carried, workdirs = _detach(target, cls, root)
        faults.checkpoint("unmerge-after-detach", h)
        if users:
            n = len(users)
            log(f"overlayctl: {n} process{'es' if n != 1 else ''} still use{'' if n != 1 else 's'}"
                f" the old {h}: {busy.describe(users)}")
            note_detached(root, cls.name, h, old_dev)
        for w in workdirs:
            _remove_workdir(root, w, h)
        for fd, rel in carried:
            dest = os.path.join(target, rel)
            try:
                if os.path.exists(dest):
                    k.move_mount(fd, dest)
            except OSError as e:
                log(f"Could not put the mount on {dest} back: {e.strerror}")
            finally:
                os.close(fd)
        faults.checkpoint("unmerge-done", h)
        log(f"Unmerged '{target}'.")
        done += 1
    if done == 0:
        log("No merged hierarchies found." if settings.cls.name == "sysext"
            else "No merged confext hierarchies found.")
    return 0


def create_overlays(built: list[Built], cls: ExtClass) -> None:
    """Create the overlays of prepared hierarchies (directly, or all in one child namespace
    where the kernel refuses detached layers), then write each 'dev' file."""
    try:
        if k.detached_layers_ok():
            for b in built:
                b.fd = _overlay_new_api(b.plan, cls.name, b.lowers, b.upper, b.work)
                if b.meta_rel:
                    # Read-only metadata (and the raw ephemeral upper, for diff and refresh),
                    # grafted onto the overlay before anyone can see it.
                    mfd = k.open_tree(b.meta_rel, dirfd=b.fd)
                    b.pending_binds.append((mfd, b.meta_rel))
                    k.mount_setattr(mfd, "", k.MOUNT_ATTR_RDONLY)
                if b.eph_base and b.eph_rel:
                    rfd = k.open_tree(b.eph_base)
                    b.pending_binds.append((rfd, b.eph_rel))
                    k.mount_setattr(rfd, "", k.MOUNT_ATTR_RDONLY)
        else:
            for b, fd in zip(built, _overlays_in_child(built, cls.name), strict=True):
                b.fd = fd
        for b in built:
            metadata.write_dev(b.meta_dir, os.fstat(b.fd).st_dev)
    except OSError as e:
        failed = next((b for b in built if b.fd < 0), built[-1])
        raise die(f"cannot build the overlay for {failed.plan.target}: {e.strerror or e}"
                  + (f" ({e.filename})" if e.filename else ""), _hint_for(e)) from None
    finally:
        for b in built:
            for fd in b.owned:
                os.close(fd)
            b.owned = []


def put_in_place(settings: Settings, plans: list[HierarchyPlan], origin: dict[str, Any],
                 views: dict[str, PlainView], replace: bool,
                 carry: dict[str, int] | None = None) -> None:
    """Build every overlay, then attach them all; on any failure nothing stays changed."""
    cls = settings.cls
    built: list[Built] = []
    attached: list[Built] = []
    with ExitStack() as stack:
        ws = stack.enter_context(workspace())
        try:
            mounts = mountinfo.read()
            for plan in plans:
                if not plan.merge:
                    continue
                faults.checkpoint("build", plan.hierarchy)
                built.append(build(settings, plan, ws, origin, views,
                                   (carry or {}).get(plan.target)))
            create_overlays(built, cls)
            for b in built:
                _carry_nested(b, mounts)
                _graft(b, attached=False)
                faults.checkpoint("built", b.plan.hierarchy)
            for b in built:
                t = b.plan.target
                h = b.plan.hierarchy
                if not os.path.lexists(t):
                    os.makedirs(t, 0o755)
                    b.created.append(t)
                faults.checkpoint("attach", h)
                if replace and is_ours(t, cls):
                    old_work = metadata.read_merged(t, cls).work_dir
                    if stacked_ours(t) > 1 or not _swap_beneath(b.fd, t, h):
                        # The upstream order, with a gap: after an interrupted refresh left
                        # overlays stacked, or without MOVE_MOUNT_BENEATH (Linux < 6.5).
                        if stacked_ours(t) <= 1:
                            log(f"The kernel cannot mount beneath {t}: replacing it with a "
                                "brief gap (needs Linux 6.5+).")
                        _detach(t, cls, settings.root)
                        faults.checkpoint("gap", h)
                        k.move_mount(b.fd, t)
                    new_work = (b.record.get("workdir") or "").lstrip("/")
                    if old_work and new_work != old_work.lstrip("/"):
                        _remove_workdir(settings.root, old_work, b.plan.hierarchy)
                else:
                    k.move_mount(b.fd, t)
                faults.checkpoint("attached", h)
                attached.append(b)
                _graft(b, attached=True)
                for w in b.stale:
                    _rmtree(w, ignore_errors=True)
                for orig in b.originals:
                    # The carried mounts now live in the overlay; the originals are covered.
                    try:
                        k.umount(f"/proc/self/fd/{orig}", k.MNT_DETACH)
                    except OSError as e:
                        if e.errno != errno.EINVAL:   # EINVAL: went with the old overlay
                            log(f"Could not detach a covered nested mount: {e.strerror}")
        except BaseException:
            for b in reversed(attached):
                try:
                    k.umount(b.plan.target)
                except OSError:
                    pass
            for b in built:
                _undo_created(b.created)
            raise
        finally:
            for b in built:
                if b.fd >= 0:
                    os.close(b.fd)
                for fd in b.owned:
                    os.close(fd)
                for fd, _ in b.pending_binds:
                    os.close(fd)
                for fd in b.originals:
                    os.close(fd)
    for b in attached:
        faults.checkpoint("record", b.plan.hierarchy)
        log(f"Merged extensions into '{b.plan.target}'.")
        try:
            state.save_record(settings.root, cls.name, b.plan.hierarchy, b.record)
        except OSError as e:
            log(f"Could not save the merge record of {b.plan.hierarchy}: {e.strerror}")


def stacked_ours(target: str) -> int:
    """How many of our overlays (sysext/confext) are stacked on TARGET."""
    return sum(1 for m in mountinfo.read()
               if m.mountpoint == target and m.fstype == "overlay"
               and m.source in ("sysext", "confext"))


def _swap_beneath(fd: int, target: str, hierarchy: str) -> bool:
    """Put the new overlay under the old one and detach the old: no moment without one."""
    try:
        k.move_mount(fd, target, beneath=True)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise
    faults.checkpoint("beneath", hierarchy)
    k.umount(target)
    return True


def can_mount_beneath() -> bool:
    """MOVE_MOUNT_BENEATH appeared in Linux 6.5."""
    return k.kernel_at_least(6, 5)


DETACHED = "run/overlayctl/detached.json"


def note_detached(root: str, cls_name: str, hierarchy: str, dev: int) -> None:
    """Remember an overlay that was detached while processes still used it."""
    path = os.path.join(root, DETACHED)
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, ValueError):
        items = []
    items.append({"class": cls_name, "hierarchy": hierarchy, "dev": dev,
                  "since": int(os.stat(os.path.dirname(path)).st_mtime)})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(items, f)
    os.replace(path + ".tmp", path)


def detached_alive(root: str, cls_name: str, hierarchy: str) -> list[dict[str, Any]]:
    """Detached overlays of HIERARCHY that processes still use (pruned as they go away)."""
    path = os.path.join(root, DETACHED)
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, ValueError):
        return []
    from overlayctl import busy
    alive: list[dict[str, Any]] = []
    keep: list[dict[str, Any]] = []
    for it in items:
        users = busy.users_of_dev(int(it.get("dev", -1)))
        if not users:
            continue
        keep.append(it)
        if it.get("class") == cls_name and it.get("hierarchy") == hierarchy:
            alive.append({"dev": f"{os.major(it['dev'])}:{os.minor(it['dev'])}",
                          "processes": [{"pid": pid, "name": name} for pid, name in users]})
    if len(keep) != len(items):
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(keep, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass
    return alive


def _rmtree(path: str, ignore_errors: bool = False) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=ignore_errors)
