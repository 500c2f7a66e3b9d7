"""Building overlays detached: the workspace layers, the metadata, the upper and work dir
(a private tmpfs for ephemeral ones), then the overlay itself with fsopen/fsconfig/fsmount
(or, where the kernel refuses detached layers, all of them in one child namespace: see
legacy.py). Nothing built here is visible anywhere until attach.py puts it in place."""

from __future__ import annotations

import os
import time

from overlayctl import kernel as k
from overlayctl import metadata
from overlayctl.errors import die, hint_for
from overlayctl.live import EPHEMERAL_DIR, PlainView
from overlayctl.metadata import Origin
from overlayctl.overlayfs import OverlaySpec, overlay_new_api
from overlayctl.paths import inside, single_component
from overlayctl.plan import HierarchyPlan
from overlayctl.resources import ExitStack
from overlayctl.settings import ExtClass, Settings
from overlayctl.state import MergeRecord, RecordedLayer


class Built:
    """One overlay under construction, and what attaching it needs. The overlay fd and the
    fds to graft are owned by the ExitStack that prepare() and create_overlays() were
    given."""

    __slots__ = ("plan", "spec", "fd", "meta_dir", "pending_binds", "created", "record",
                 "stale", "built_at")

    def __init__(self, plan: HierarchyPlan, spec: OverlaySpec, meta_dir: str,
                 record: MergeRecord, created: list[str], stale: list[str]) -> None:
        self.plan = plan
        self.spec = spec
        self.fd = -1                                    # the detached overlay
        self.meta_dir = meta_dir                        # .systemd-* in the workspace
        self.pending_binds: list[tuple[int, str]] = []  # (fd, rel) to graft onto it
        self.created = created                          # persistent dirs this run made
        self.record = record
        self.stale = stale                              # old ephemeral work dirs to drop
        self.built_at = 0.0                             # perf_counter() when the overlay was made


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


def _policy_text(settings: Settings) -> str | None:
    if settings.image_policy is None:
        return None
    from overlayctl.policy import policy_to_string
    return policy_to_string(settings.image_policy)


def undo_created(created: list[str]) -> None:
    import shutil
    for d in reversed(created):
        try:
            if os.path.basename(d).startswith(".systemd-") and "-workdir" in d:
                shutil.rmtree(d, ignore_errors=True)
            else:
                os.rmdir(d)
        except OSError:
            pass


def _layer_paths(plan: HierarchyPlan, ws: str, view: PlainView | None
                 ) -> tuple[list[str], str | None, str | None]:
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
    if plan.upper_kind in ("persistent", "host"):
        assert plan.upperdir is not None and plan.workdir is not None
        upper, work = plan.upperdir, plan.workdir
        if plan.upper_kind == "host" and view is not None and not view.rel:
            raise die(f"{plan.target} is a mount point of its own and cannot be its own upper",
                      "its work directory would be on another mount")
    return lowers, upper, work


def _ephemeral_dirs(plan: HierarchyPlan, carry: int | None, stale: list[str],
                    stack: ExitStack) -> tuple[str, str, str]:
    """Upper and work dir of an ephemeral overlay in a tmpfs of its own (new, or carried over
    from the overlay being replaced), exposed read-only in the metadata dir."""
    # A new tmpfs is closed once the overlay exists (STACK): the overlay and its read-only
    # clone keep it alive, and it vanishes with them.
    efd = k.owned(stack, k.tmpfs()) if carry is None else carry
    base = k.fd_path(efd)
    upper = os.path.join(base, "upper")
    if not os.path.isdir(upper):
        os.mkdir(upper)
    os.chmod(upper, plan.top_mode)
    work = os.path.join(base, "work")
    if os.path.exists(work):
        stale.append(work)
        work = os.path.join(base, "work.1")
        if os.path.exists(work):
            import shutil
            shutil.rmtree(work)
    else:
        old = os.path.join(base, "work.1")
        if os.path.exists(old):
            stale.append(old)
    os.mkdir(work, 0o700)
    return upper, work, base


def _backing(plan: HierarchyPlan) -> str | None:
    base = next((layer.path for layer in plan.lowers if layer.role == "base"
                 or (plan.self_import and layer.role == "import")), None)
    if base is None:
        return None
    dev = os.stat(base).st_dev
    if os.path.exists(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"):
        return f"{os.major(dev)}:{os.minor(dev)}"
    return None


def record_of(settings: Settings, plan: HierarchyPlan, view: PlainView | None) -> MergeRecord:
    """The merge record of PLAN: its layers and dirs as paths inside the root (a plain view
    of a merged hierarchy maps back to the hierarchy)."""
    root = settings.root

    def shown(path: str) -> str:
        if view is not None:
            fdpath = view.fd_prefix
            if path == fdpath or path.startswith(fdpath + "/"):
                real = os.path.dirname(plan.target) if view.rel else plan.target
                path = real + path[len(fdpath):]
        return inside(root, path)

    work_rel = None
    if plan.upper_kind in ("persistent", "host") and plan.workdir:
        work_rel = shown(plan.workdir).lstrip("/")
    return MergeRecord(
        cls=settings.cls.name, hierarchy=plan.hierarchy, mode=plan.mode, upper=plan.upper_kind,
        upperdir=(shown(plan.upperdir) if plan.upperdir and plan.upper_kind in
                  ("persistent", "host") else None),
        workdir="/" + work_rel if work_rel else None,
        layers=tuple(RecordedLayer(layer.role, layer.name,
                                   inside(root, layer.image) if layer.image else
                                   shown(layer.path) if layer.path else None,
                                   layer.protection)
                     for layer in plan.lowers),
        noexec=settings.noexec, force=settings.force, mount_options=settings.overlay_options,
        defaults=next((shown(layer.path) for layer in plan.lowers
                       if layer.role == "defaults" and layer.path), None),
        since=time.time_ns() // 1000, image_policy=_policy_text(settings))


def prepare(settings: Settings, plan: HierarchyPlan, ws: str, origin: Origin,
            view: PlainView | None, carry: int | None, stack: ExitStack) -> Built:
    """Everything of one overlay but the overlay itself: workspace layers, metadata, the
    upper and work dir. Directories it creates are removed again if it fails."""
    cls = settings.cls
    name = single_component(plan.hierarchy)
    created: list[str] = []
    try:
        meta_root = os.path.join(ws, "meta", name)
        os.makedirs(meta_root)
        if any(layer.role == "filler" for layer in plan.lowers):
            os.makedirs(os.path.join(ws, "filler", name))
        if plan.create_upper:
            assert plan.upperdir is not None
            _makedirs(plan.upperdir, plan.top_mode, created)
        lowers, upper, work = _layer_paths(plan, ws, view)
        stale: list[str] = []
        eph_base: str | None = None
        if plan.upper_kind == "ephemeral":
            upper, work, eph_base = _ephemeral_dirs(plan, carry, stale, stack)
        elif plan.upper_kind is not None:
            assert work is not None
            if not os.path.isdir(work):
                os.mkdir(work, 0o700)
                created.append(work)
        else:
            os.chmod(meta_root, plan.top_mode)
        record = record_of(settings, plan, view)
        work_rel = record.workdir.lstrip("/") if record.workdir else None
        meta_dir = metadata.write_meta(meta_root, cls, names=plan.extensions,
                                       work_dir_rel=work_rel, origin=origin,
                                       backing=_backing(plan), record=record)
        eph_rel = os.path.join(cls.meta_dir, EPHEMERAL_DIR) if eph_base else None
        if eph_base:
            os.mkdir(os.path.join(meta_dir, EPHEMERAL_DIR), 0o700)
        spec = OverlaySpec(plan.target, plan.hierarchy, lowers, upper, work, plan.fs_options,
                           plan.vfs_options, cls.meta_dir if plan.upper_kind else None,
                           eph_base, eph_rel)
        return Built(plan, spec, meta_dir, record, created, stale)
    except OSError as e:
        undo_created(created)
        raise die(f"cannot build the overlay for {plan.target}: {e.strerror or e}"
                  + (f" ({e.filename})" if e.filename else ""), hint_for(e)) from None
    except BaseException:
        undo_created(created)
        raise


def create_overlays(built: list[Built], cls: ExtClass, stack: ExitStack) -> None:
    """Create the overlays of prepared hierarchies (directly, or all in one child namespace
    where the kernel refuses detached layers), then write each 'dev' file. The overlay fds
    and their read-only binds are owned by STACK."""
    try:
        if k.detached_layers_ok():
            for b in built:
                sp = b.spec
                b.fd = k.owned(stack, overlay_new_api(cls.name, sp.lowers, sp.upper, sp.work,
                                                      sp.fs_options, sp.vfs_options))
                if sp.meta_rel:
                    # Read-only metadata (and the raw ephemeral upper, for diff and refresh),
                    # grafted onto the overlay before anyone can see it.
                    mfd = k.owned(stack, k.open_tree(sp.meta_rel, dirfd=b.fd))
                    k.mount_setattr(mfd, "", k.MOUNT_ATTR_RDONLY)
                    b.pending_binds.append((mfd, sp.meta_rel))
                if sp.eph_base and sp.eph_rel:
                    rfd = k.owned(stack, k.open_tree(sp.eph_base))
                    k.mount_setattr(rfd, "", k.MOUNT_ATTR_RDONLY)
                    b.pending_binds.append((rfd, sp.eph_rel))
        else:
            from overlayctl.legacy import overlays_in_child
            fds = overlays_in_child([b.spec for b in built], cls.name)
            for fd in fds:
                k.owned(stack, fd)
            for b, fd in zip(built, fds, strict=True):
                b.fd = fd
        now = time.perf_counter()
        for b in built:
            b.built_at = now
            metadata.write_dev(b.meta_dir, os.fstat(b.fd).st_dev)
    except OSError as e:
        failed = next((b for b in built if b.fd < 0), built[-1])
        raise die(f"cannot build the overlay for {failed.plan.target}: {e.strerror or e}"
                  + (f" ({e.filename})" if e.filename else ""), hint_for(e)) from None
