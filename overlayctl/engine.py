"""The verbs that change things, in upstream's order of operations: discover, read
metadata, validate, plan, build (every class of the call), then attach them all under one
lock; and the read-only verbs' data (status rows, the image list).

merge/refresh of a call:
  1. lock; for each class: discover and read images, resolve hierarchies, refuse an
     'already merged' (merge), open plain views of merged hierarchies (refresh), plan,
     skip an unchanged refresh, compute the manifests, build every overlay detached;
  2. journals; attach every overlay of every class (attach.attach_all; one rollback);
  3. commit: unmerge hierarchies that lost their content, save records and manifests,
     drop the journals, reload the service manager if an extension asks for it.
Nothing visible changes before step 2, so a call that fails in step 1 changes nothing."""

from __future__ import annotations

import errno
import os

from overlayctl import attach, faults, live, log, metadata, state
from overlayctl.errors import AlreadyMerged, OverlayctlError, die
from overlayctl.images import Image, discover, read_metadata
from overlayctl.metadata import Origin
from overlayctl.mountns import Locked, lock
from overlayctl.paths import chase, inside
from overlayctl.plan import HierarchyPlan, make_plan
from overlayctl.record import Record
from overlayctl.release import check_compatible, host_os_release, parse_boolean, shown
from overlayctl.resources import ExitStack
from overlayctl.settings import Settings
from overlayctl.state import Manifest, MergeRecord
from overlayctl.vocab import WRITABLE_UPPERS

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

    from overlayctl.hygiene import Hygiene
    from overlayctl.policy import ImagePolicy
    from overlayctl.rawimage import ImagePlan


def require_root(what: str = "merge or unmerge") -> None:
    if os.geteuid() != 0:
        raise die(f"need to be privileged to {what}", "run as root")


# ---------------------------------------------------------------------------------------------
# Discovery


def _policy_for(s: Settings, img: Image) -> ImagePolicy:
    """The image policy for IMG: --image-policy= or ImagePolicy=, else the class default
    (the strict ones for what systemd-stub put in /.extra/ of an initrd)."""
    from overlayctl.policy import pick_policy
    return pick_policy(s.cls.name, inside(s.root, img.entry), s.image_policy,
                       in_initrd=s.initrd)


def checked_images(s: Settings) -> list[tuple[Image, ImagePlan | None]]:
    """Every image of S's class, raw ones inspected: file system or partitions, verity
    data, image policy, device-mapper (rawimage.inspect). Reads files only: no device
    exists yet, and one refused image fails the call. Directory extensions are not subject
    to image policies (as upstream)."""
    out: list[tuple[Image, ImagePlan | None]] = []
    for img in discover(s):
        plan = None
        if img.type in ("raw", "block"):
            from overlayctl import rawimage
            plan = rawimage.inspect(img.path, _policy_for(s, img), cls_name=s.cls.name,
                                    cert_root=s.root)
        out.append((img, plan))
    return out


def _mount_raw(s: Settings, img: Image, plan: ImagePlan, stack: ExitStack) -> Image:
    """Mount a raw image (detached) for the rest of the call: its root becomes the image's
    path, the file is kept as its source."""
    from overlayctl import rawimage
    fd, usr_only, prot = rawimage.mount_image(plan, stack, cert_root=s.root)
    return img.replace(source=img.path, path=f"/proc/self/fd/{fd}", usr_root=usr_only,
                       protection=prot)


def accepted_images(s: Settings, stack: ExitStack,
                    checked: list[tuple[Image, ImagePlan | None]] | None = None) -> list[Image]:
    """The compatible images of S's class, in version order (raw ones mounted). CHECKED:
    what checked_images() found (the call checks every class's images first)."""
    host = host_os_release(s.root)
    if not host:
        raise die(f"the root {s.root} has no os-release (etc/os-release or "
                  "usr/lib/os-release)", "a root needs an os-release with ID=")
    if not host.get("ID"):
        raise die(f"the host os-release in {s.root} has no ID=",
                  "add ID= to etc/os-release or usr/lib/os-release in the root")
    images = []
    for img, plan in checked_images(s) if checked is None else checked:
        if plan is None:
            images.append(read_metadata(s, img))
            continue
        img = _mount_raw(s, img, plan, stack)
        try:
            images.append(read_metadata(s, img))
        except OSError as e:
            # Reading inside a mounted image: EIO is dm-verity refusing a damaged block.
            raise die(f"cannot read the release file of image {img.source}: {e.strerror}",
                      "the image is damaged: a block does not match its verity hash tree "
                      "(see dmesg); copy it again" if plan.verity is not None and
                      e.errno == errno.EIO else "check the image") from None
    scope = "initrd" if s.initrd else "system"
    accepted: list[Image] = []
    ignored = 0
    if s.force:
        log.debug("Force mode enabled, skipping version validation.")
    for img in images:
        if img.source and s.cls.name == "sysext" and not s.force and img.tree_path(
                "/usr/lib/os-release"):
            log.info(f"Ignoring extension '{img.name}': it contains usr/lib/os-release.")
            ignored += 1
            continue
        if s.force:
            accepted.append(img)
            continue
        problem = img.release.problem if img.release else None
        if problem:
            log.warning(f"Ignoring extension '{img.name}': its extension-release file {problem}.")
            ignored += 1
            continue
        reason = check_compatible(img.release.data if img.release and img.release.path else None,
                                  host, s.cls.info, scope, img.name)
        if reason:
            log.info(f"Ignoring extension '{img.name}': {reason}.")
            ignored += 1
            continue
        ext_id = img.release.data.get("ID", "") if img.release else ""
        log.debug(f"Extension '{img.name}' ({img.source or img.path}) matches "
                  f"'{shown(ext_id)}' OS: compatible.")
        accepted.append(img)
    if accepted:
        log.info("Using extensions " + ", ".join(f"'{i.name}'" for i in accepted) + ".")
    elif s.mutable == "no":
        log.info("No suitable extensions found" + (f" ({ignored} ignored due to incompatible "
                                                    "image(s))." if ignored else "."))
    else:
        log.info("No extensions found, proceeding in mutable mode.")
    return accepted


def origin_of(s: Settings, plans: list[HierarchyPlan], accepted: list[Image]) -> Origin:
    """What this merge is made from (compared by the refresh-skip decision)."""
    root = s.root
    exts: dict[str, dict[str, Any]] = {}
    for img in accepted:
        src = img.source or img.path
        prot = img.protection
        if prot is not None and prot.root_hash is not None:
            # The root hash names the content (dm-verity checks every block against it):
            # a copy of the same image, or the same image touched, is no change.
            exts[img.name] = {"path": inside(root, src), "root_hash": prot.root_hash,
                              "protection": prot.kind}
            continue
        st = os.stat(src)
        exts[img.name] = {"path": inside(root, src), "inode": st.st_ino, "dev": st.st_dev,
                          "mtime": st.st_mtime_ns // 1000}
    defaults: dict[str, dict[str, Any]] = {}
    for p in plans:
        d = next((layer.path for layer in p.lowers if layer.role == "defaults"), None)
        if d:
            st = os.stat(d)
            defaults[p.hierarchy] = {"path": inside(root, d), "inode": st.st_ino,
                                     "mtime": st.st_mtime_ns // 1000}
    return Origin(mode=s.mutable,
                  mutable_dirs={p.hierarchy: inside(root, p.mutable_dir) for p in plans
                                if p.mutable_dir},
                  extensions=exts, mount_options=s.overlay_options, noexec=s.noexec,
                  hierarchies=tuple(p.hierarchy for p in plans if p.merge), defaults=defaults)


def _unchanged(s: Settings, merged: list[str], origin: Origin) -> bool:
    old = metadata.read_origin_text(merged[0], s.cls)
    return old == metadata.origin_text(origin) and set(origin.hierarchies) == {
        h for h in s.hierarchies if chase(s.root, h, must_exist=True) in merged}


def _with_merged_mode(s: Settings, merged: list[str]) -> Settings:
    """A refresh that names no mode (command line, environment, config) keeps the mode the
    hierarchies are merged in: re-merging read-only under a running apt would break it."""
    if s.mutable_source != "default" or not merged:
        return s
    for t in merged:
        rec = metadata.read_merged(t, s.cls).record
        if rec is not None:
            if rec.mode != s.mutable:
                log.info(f"Keeping mutable mode '{rec.mode}' of the merged {s.cls.name} "
                         "hierarchies (no mode given).")
            return s.replace(mutable=rec.mode, mutable_source="merged")
        origin = metadata.read_merged(t, s.cls).origin or {}
        mode = (origin.get("mutable") or {}).get("mode")
        from overlayctl.vocab import MUTABLE_MODES
        if mode in MUTABLE_MODES and mode != s.mutable:
            log.info(f"Keeping mutable mode '{mode}' of the merged {s.cls.name} hierarchies "
                     "(no mode given).")
            return s.replace(mutable=mode, mutable_source="merged")
    return s


# ---------------------------------------------------------------------------------------------
# merge / refresh


class Prepared:
    """One class of a merge or refresh call, built and ready to attach."""

    __slots__ = ("settings", "accepted", "staged", "drop", "manifests", "journal", "actions",
                 "hygiene")

    def __init__(self, settings: Settings, accepted: list[Image], staged: attach.Staged | None,
                 drop: list[tuple[str, str]], manifests: dict[str, Manifest],
                 journal: str, actions: ManagerActions,
                 hygiene: dict[str, Hygiene] | None = None) -> None:
        self.settings = settings
        self.accepted = accepted
        self.staged = staged
        self.drop = drop                 # (hierarchy, target) merged now, no overlay after
        self.manifests = manifests       # hierarchy -> manifest to save once merged
        self.journal = journal
        self.actions = actions           # for the service manager, after the commit
        self.hygiene = hygiene or {}     # hierarchy -> opaque markers and whiteouts to tidy


def _hygiene(s: Settings, plans: list[HierarchyPlan], merged: list[str]) -> dict[str, Hygiene]:
    """Classify the opaque markers of every persistent or host upper (read only)."""
    want = [p for p in plans if p.merge and p.upper_kind in WRITABLE_UPPERS]
    if not want:
        return {}
    from overlayctl import hygiene, mountinfo, nested
    mounts = mountinfo.read() if merged else []
    out: dict[str, Hygiene] = {}
    for p in want:
        prev = state.load_dirs(s.root, s.cls.name, p.hierarchy)
        here = p.target in merged
        valid = prev is not None
        below: list[str] = []
        if here:
            # Over a merge: the record is this merge's, or (upstream, or a merge killed
            # before its commit) there is none to go by.
            live_rec = metadata.read_merged(p.target, s.cls).record
            valid = valid and live_rec is not None and prev is not None and \
                live_rec.since == prev.since
            below = [r for m in mountinfo.submounts(mounts, p.target)
                     if (r := os.path.relpath(m.mountpoint, p.target)).split("/")[0]
                     not in nested.META_DIRS]
        out[p.hierarchy] = hygiene.prepare(s.root, p, prev, valid, here, below)
    return out


def _prepare(locked: Locked | None, s: Settings, refresh: bool, stack: ExitStack,
             undo: list[tuple[str, str]],
             checked: list[tuple[Image, ImagePlan | None]] | None = None
             ) -> Prepared | list[dict[str, Any]] | None:
    """Step 1 for one class: the plans (returned for --dry-run), or the staged overlays;
    None when there is nothing to do (an unchanged refresh). Opaque markers cleared before
    building (hierarchies not merged now) are added to UNDO."""
    accepted = accepted_images(s, stack, checked)
    targets = [(h, t) for h in s.hierarchies
               if (t := chase(s.root, h, must_exist=True)) is not None]
    merged = [t for _, t in targets if os.path.isdir(t) and live.is_ours(t, s.cls)]
    for h in s.hierarchies:
        t = next((t for hh, t in targets if hh == h), None)
        log.debug(f"Hierarchy '{h}' does not exist in {s.root}." if t is None else
                  f"Hierarchy '{t}' is {'merged' if t in merged else 'not merged'}.")
    journal = state.journal_path(s.root, s.cls.name)
    interrupted = os.path.exists(journal) or any(live.stacked_ours(t) > 1 for t in merged)
    if merged and interrupted and not s.dry_run:
        # A killed merge or refresh: finish the job by rebuilding, never skip it.
        log.notice(f"An earlier merge of {s.cls.name} was interrupted: completing it.")
        refresh = True
    if merged and not refresh:
        raise AlreadyMerged(merged[0], next(h for h, t in targets if t == merged[0]),
                            s.cls.name)
    if refresh:
        s = _with_merged_mode(s, merged)
    drop_all = [(h, t) for h, t in targets if t in merged]
    if not accepted and s.mutable == "no" and not s.defaults:
        # Nothing to merge: a refresh unmerges, and acts on what the merged extensions ask.
        return [] if s.dry_run else Prepared(s, accepted, None, drop_all, {}, journal,
                                             _wanted_by_merged(s))
    views = live.plain_views(merged, s.cls, stack)
    live_work = {t: w for t in merged
                 if (w := metadata.read_merged(t, s.cls).work_dir) is not None}
    plans = make_plan(s, accepted, (lambda t: views[t].path if t in views else t), live_work)
    for p in plans:
        _log_plan(p)
    if s.dry_run:
        hyg = _hygiene(s, plans, merged)
        return [_shown_plan({**p.as_json(), **(hyg[p.hierarchy].as_json()
                                               if p.hierarchy in hyg else {})}, views)
                for p in plans]
    origin = origin_of(s, plans, accepted)
    if refresh and merged and not interrupted:
        if not _unchanged(s, merged, origin):
            log.debug("Found changes based on origin entry, continuing with the refresh.")
        elif s.always_refresh:
            log.debug("No change found based on origin entry but continuing as requested by "
                      "--always-refresh=yes.")
        else:
            log.info("Skipping extension refresh because no change was found, use "
                     "--always-refresh=yes to always do a refresh.")
            return None
    hyg = _hygiene(s, plans, merged)
    manifests: dict[str, Manifest] = {}
    if any(p.keeps_manifest for p in plans):
        from overlayctl import manifest
        for p in plans:
            m = manifest.updated(s.root, s.cls.name, p)
            if m is not None:
                manifests[p.hierarchy] = m
    carry: dict[str, int] = {}
    for p in plans:
        if refresh and p.upper_kind == "ephemeral" and p.target in merged:
            fd = live.carried_ephemeral(p.target, s.cls, stack)
            if fd is not None:
                carry[p.target] = fd
        elif refresh and p.target in merged:
            old = metadata.read_merged(p.target, s.cls).record
            if old is not None and old.upper == "ephemeral":
                live.say_ephemeral_dropped(s.root, p.hierarchy, p.target, s.cls, old.since,
                                           f"it is merged in mode '{s.mutable}' now")
    assert locked is not None
    if hyg:
        from overlayctl import hygiene
        for hy in hyg.values():
            if not hy.late:
                # Not merged now: tidy the upper before the overlay exists.
                hygiene.drop(hy.upper, hy.hierarchy, hy.whiteouts,
                             "left by a merge that was not unmerged cleanly")
                hygiene.clear(hy, undo)
    staged = attach.build_all(locked, s, plans, origin, views, replace=refresh, carry=carry,
                              stack=stack)
    drop = [(p.hierarchy, p.target) for p in plans if not p.merge and p.target in merged]
    actions = _wanted(s, accepted) if staged.built else ManagerActions()
    return Prepared(s, accepted, staged, drop, manifests, journal, actions, hyg)


def _log_plan(p: HierarchyPlan) -> None:
    """At debug level: the overlay a hierarchy gets (upstream logs its mount(2) call)."""
    if not p.merge:
        log.debug(f"Not merging '{p.target}': {p.skip_reason}.")
        return
    layers = ":".join(layer.describe() for layer in p.lowers)
    upper = (f", upperdir={p.upperdir}, workdir={p.workdir}" if p.upper_kind != "ephemeral"
             else ", upperdir and workdir on a private tmpfs") if p.upper_kind else ""
    log.debug(f"Overlay for '{p.target}' (mutable={p.mode}): lowerdir={layers}{upper}, "
              f"options '{','.join(p.fs_options)}', mount flags {','.join(p.vfs_options)}.")


def _shown_plan(j: dict[str, Any], views: dict[str, live.PlainView]) -> dict[str, Any]:
    """A plan for --dry-run with plain views of merged hierarchies shown by their path."""
    import json
    text = json.dumps(j)
    for target, v in views.items():
        real = os.path.dirname(target) if v.rel else target
        text = text.replace(json.dumps(v.fd_prefix)[1:-1], json.dumps(real)[1:-1])
    out: dict[str, Any] = json.loads(text)
    return out


def merge(settings: list[Settings], refresh: bool = False) -> list[dict[str, Any]]:
    """merge or refresh every class of SETTINGS (in order: confext first) as one call, all
    or nothing. Returns the plans (as JSON) for --dry-run."""
    if settings and settings[0].dry_run:
        plans: list[dict[str, Any]] = []
        checked = [checked_images(s) for s in settings]
        for s, c in zip(settings, checked, strict=True):
            with ExitStack() as stack:
                got = _prepare(None, s, refresh, stack, [], c)
                if isinstance(got, list):
                    plans.extend(got)
        return plans
    root = settings[0].root
    with lock(root) as locked:
        run(locked, settings, refresh)
    return []


def run(locked: Locked, settings: list[Settings], refresh: bool) -> list[str]:
    """merge or refresh under a lock the caller holds (local verbs rebuild through this).
    Returns the opaque markers it cleared (paths as the hierarchy shows them)."""
    undo: list[tuple[str, str]] = []     # opaque markers this call cleared
    with ExitStack() as stack:           # (restored, if the call fails, while views are open)
        try:
            # Every raw image of every class passes the image policy (and the other checks
            # that need no device) before the first loop or dm device exists.
            checked = [checked_images(s) for s in settings]
            prepared: list[Prepared] = []
            for s, c in zip(settings, checked, strict=True):
                got = _prepare(locked, s, refresh, stack, undo, c)
                if isinstance(got, Prepared):
                    prepared.append(got)
            if not prepared:
                return []
            for p in prepared:
                state.write_journal(p.journal)
            faults.checkpoint("journal")
            late = [h for p in prepared for h in p.hygiene.values() if h.late and h.clear]
            if late:
                # A refresh: every overlay is built, nothing but the swap is left; the old
                # overlay sees no difference (docs/guarantees.md, "The refresh window").
                from overlayctl import hygiene
                for h in late:
                    hygiene.clear(h, undo)
            try:
                attach.attach_all(locked, [p.staged for p in prepared if p.staged is not None])
            except BaseException:
                for p in prepared:
                    state.drop_journal(p.journal)
                raise
        except BaseException:
            if undo:
                from overlayctl import hygiene
                hygiene.restore(undo)
            raise
        _commit(locked, prepared)
    return [h.shown(rel) for p in prepared for h in p.hygiene.values() for rel in h.cleared]


def _commit(locked: Locked, prepared: list[Prepared]) -> None:
    """Everything is in place: unmerge what lost its content, save the records, and the
    manifests, drop the journals (a kill before this completes the call next time)."""
    actions = ManagerActions()
    for p in prepared:
        s = p.settings
        for h, t in p.drop:
            live.unmerge_one(locked, s.replace(hierarchies=(h,)), h, t)
        for b in p.staged.built if p.staged else []:
            log.info(f"Merged extensions into '{b.plan.target}'.")
            # Past the last attach nothing is undone: a record that cannot be saved (an I/O
            # error, a name it cannot hold) is a warning, and the merge stands.
            try:
                faults.checkpoint("record", b.plan.hierarchy)
                state.save_record(s.root, b.record)
                m = p.manifests.get(b.plan.hierarchy)
                if m is not None:
                    state.save_manifest(s.root, s.cls.name, b.plan.hierarchy, m)
                hy = p.hygiene.get(b.plan.hierarchy)
                if hy is not None:
                    state.save_dirs(s.root, s.cls.name, b.plan.hierarchy,
                                    hy.record(b.record.since))
                    log.debug(f"hygiene of {b.plan.hierarchy}: {len(hy.cleared)} opaque "
                              f"markers cleared, {hy.examined} directories examined, "
                              f"{len(hy.deliberate)} deliberate, in {hy.ms:.1f} ms")
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                log.warning(f"Could not save the merge record of {b.plan.hierarchy}: {why}")
        state.drop_journal(p.journal)
        actions = actions + p.actions
    apply_actions(actions)


def rebuild(locked: Locked, root: str, rec: MergeRecord) -> list[str]:
    """Put a rebuilt overlay of one hierarchy in place after its raw upper changed (reset,
    cleanup): the same mode, options, defaults and image policy as its record says, swapped
    in atomically. Quietly: the messages of a merge mean nothing to the user of reset or
    cleanup; returns the opaque markers the rebuild cleared, for them to report."""
    from overlayctl.settings import load_settings
    defaults = {rec.hierarchy: rec.defaults} if rec.defaults else None
    s = load_settings(root, rec.cls, cli_mutable=rec.mode, noexec=rec.noexec,
                      always_refresh=True, no_reload=True, defaults=defaults, force=rec.force,
                      hierarchies=(rec.hierarchy,), image_policy=rec.image_policy)
    s = s.replace(overlay_options=rec.mount_options)
    with log.quiet():
        return run(locked, [s], refresh=True)


def assumed_record(root: str, cls_name: str, hierarchy: str,
                   stack: ExitStack) -> MergeRecord | None:
    """For a hierarchy overlayctl never merged: the record that a merge with today's
    configuration (images, mode, defaults from the config files and environment) would make,
    so that diff and cleanup work on a fresh machine. With a defaults layer and no upper in
    that mode, the hierarchy itself is the upper: the real /etc over the image's defaults.
    None when that merge would have no upper."""
    from overlayctl.build import record_of
    from overlayctl.settings import load_settings
    s = load_settings(root, cls_name, hierarchies=(hierarchy,), dry_run=True, no_reload=True)
    with log.quiet():
        accepted = accepted_images(s, stack)
    plan = make_plan(s, accepted)[0]
    if not plan.merge:
        return None
    rec = record_of(s, plan, None)
    if rec.upper is None and rec.defaults:
        # The hierarchy is then the upper, so not also a layer below it.
        rec = rec.replace(upper="host", upperdir=hierarchy,
                          layers=tuple(la for la in rec.layers if la.role != "base"))
    return rec if rec.upper is not None else None


# ---------------------------------------------------------------------------------------------
# unmerge


def unmerge(settings: list[Settings]) -> None:
    """Unmerge every class of SETTINGS (sysext first, confext last)."""
    if not settings:
        return
    done = 0
    with lock(settings[0].root) as locked:
        for s in settings:
            # As upstream: decided before unmounting (from the merged tree), done after.
            actions = _wanted_by_merged(s)
            done += len(live.unmerge(locked, s))
            apply_actions(actions)
    if done == 0:
        log.info("No merged hierarchies found.")


def unmerge_dry_run(s: Settings) -> list[str]:
    """What unmerge would take down."""
    return live.merged_targets(s)


# ---------------------------------------------------------------------------------------------
# The service manager


def _reload_possible(s: Settings) -> bool:
    """The service manager is only told anything with --root=/ (or none), without
    --no-reload, and where systemd runs (sd_booted: /run/systemd/system exists)."""
    return not s.no_reload and s.root == "/" and os.path.isdir("/run/systemd/system")


UNIT_TYPES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer",
              "path", "slice", "scope")
_UNIT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:_.\\-")


def unit_name_valid(name: str) -> bool:
    """systemd's unit_name_is_valid() for a unit that can be started: NAME.TYPE or
    TEMPLATE@INSTANCE.TYPE (not a bare template), at most 255 characters of the unit-name
    alphabet."""
    if not name or len(name) > 255:
        return False
    prefix, dot, utype = name.rpartition(".")
    if not dot or utype not in UNIT_TYPES or not prefix:
        return False
    base, at, instance = prefix.partition("@")
    if not base or (at and (not instance or "@" in instance)):
        return False
    return all(all(c in _UNIT_CHARS for c in p) for p in (base, instance) if p)


class ManagerActions(Record):
    """What the merged extensions ask of the service manager: a daemon-reload, units to
    restart and units to reload (or restart, when they cannot reload)."""

    __slots__ = ("reload", "restart", "reload_or_restart")
    reload: bool
    restart: tuple[str, ...]
    reload_or_restart: tuple[str, ...]

    def __init__(self, reload: bool = False, restart: tuple[str, ...] = (),
                 reload_or_restart: tuple[str, ...] = ()) -> None:
        self._fill(locals())

    def __add__(self, other: ManagerActions) -> ManagerActions:
        restart = tuple(dict.fromkeys(self.restart + other.restart))
        return ManagerActions(
            self.reload or other.reload, restart,
            tuple(u for u in dict.fromkeys(self.reload_or_restart + other.reload_or_restart)
                  if u not in restart))


def manager_actions(releases: list[tuple[str, dict[str, str]]]) -> ManagerActions:
    """The actions (extension name, its extension-release data) ask for: 262's
    EXTENSION_RELOAD_MANAGER=, EXTENSION_RESTART_UNITS= and EXTENSION_RELOAD_OR_RESTART_UNITS=.
    Listing a unit implies the reload; a unit in both lists is only restarted; invalid unit
    names and non-boolean values are warned about and ignored."""
    reload = False
    restart: list[str] = []
    reload_or_restart: list[str] = []
    for name, data in releases:
        value = data.get("EXTENSION_RELOAD_MANAGER")
        if value:
            b = parse_boolean(value)
            if b is None:
                log.warning(f"Failed to parse EXTENSION_RELOAD_MANAGER={shown(value)} of "
                            f"'{name}', ignoring it: not a boolean.")
            reload = reload or bool(b)
        for key, out in (("EXTENSION_RESTART_UNITS", restart),
                         ("EXTENSION_RELOAD_OR_RESTART_UNITS", reload_or_restart)):
            for unit in data.get(key, "").split():
                if not unit_name_valid(unit):
                    log.warning(f"Invalid unit name '{shown(unit)}' in {key}= of '{name}', "
                                "ignoring.")
                    continue
                reload = True
                out.append(unit)
    return ManagerActions(reload) + ManagerActions(False, tuple(restart),
                                                   tuple(reload_or_restart))


def _wanted(s: Settings, images: list[Image]) -> ManagerActions:
    """What the extensions just merged ask for (nothing with --no-reload or --root, or
    without systemd)."""
    if not _reload_possible(s):
        return ManagerActions()
    return manager_actions([(img.name, img.release.data) for img in images
                            if img.release and img.release.path])


def _wanted_by_merged(s: Settings) -> ManagerActions:
    """What the extensions merged now ask for, read from the release files in the merged
    tree (as upstream: decided before unmerging, done after)."""
    from overlayctl.release import EnvFileError, parse_env_file
    if not _reload_possible(s):
        return ManagerActions()
    release_dir = "/" + s.cls.info.release_dir
    releases: list[tuple[str, dict[str, str]]] = []
    for h in s.hierarchies:
        t = chase(s.root, h, must_exist=True)
        if t is None or not os.path.isdir(t) or not live.is_ours(t, s.cls):
            continue
        if not release_dir.startswith(h.rstrip("/") + "/"):
            continue
        d = t + release_dir[len(h.rstrip("/")):]
        for name in metadata.read_merged(t, s.cls).names:
            try:
                releases.append((name, parse_env_file(
                    os.path.join(d, f"extension-release.{name}"))))
            except (OSError, EnvFileError) as e:
                log.debug(f"Failed to parse extension-release metadata of {name}, ignoring: "
                          f"{e}")
    return manager_actions(releases)


def _systemctl(*args: str) -> tuple[int, str]:
    import subprocess
    r = subprocess.run(["systemctl", *args], check=False, capture_output=True, text=True)
    return r.returncode, (r.stderr.strip().splitlines() or [""])[-1]


def apply_actions(a: ManagerActions) -> None:
    """Reload the service manager, then restart and reload-or-restart the units, as 262 does
    over D-Bus (RestartUnit, ReloadOrRestartUnit, mode replace, waiting for each job). A unit
    that is gone (its file left with an unmerged extension) is stopped instead, so that it
    does not stay behind running. A unit that fails is warned about; the verb still succeeds.
    While the system boots, jobs are queued without waiting: the unit may be ordered after
    the very target this call is part of."""
    if a.reload:
        log.debug("Reloading the service manager.")
        rc, err = _systemctl("daemon-reload")
        if rc != 0:
            raise die(f"the service manager could not be reloaded (systemctl daemon-reload: "
                      f"{err})", "check 'journalctl -b' and reload by hand")
    if not a.restart and not a.reload_or_restart:
        return
    booting = ["--no-block"] if _system_state() in ("initializing", "starting") else []
    for verb, method, units in (("restart", "RestartUnit", a.restart),
                                ("reload-or-restart", "ReloadOrRestartUnit",
                                 a.reload_or_restart)):
        for unit in units:
            log.debug(f"Calling {method} for unit '{unit}'.")
            rc, err = _systemctl(*booting, verb, unit)
            if rc == 0:
                continue
            if _load_state(unit) in ("not-found", "error", "bad-setting"):
                # Gone with the extension, maybe still running: stop it.
                rc, err = _systemctl(*booting, "stop", unit)
                if rc == 0:
                    log.debug(f"Stopped unit '{unit}', which is gone.")
                elif "not loaded" in err:
                    log.debug(f"Unit '{unit}' is already gone, nothing to stop.")
                else:
                    log.warning(f"Failed to StopUnit unit '{unit}': {err}")
                continue
            log.warning(f"Failed to {method} unit '{unit}': {err}")


def _system_state() -> str:
    import subprocess
    r = subprocess.run(["systemctl", "is-system-running"], check=False, capture_output=True,
                       text=True)
    return r.stdout.strip()


def _load_state(unit: str) -> str:
    import subprocess
    r = subprocess.run(["systemctl", "show", "--property=LoadState", "--value", unit],
                       check=False, capture_output=True, text=True)
    return r.stdout.strip()


# ---------------------------------------------------------------------------------------------
# status and list


def status_rows(s: Settings) -> list[dict[str, Any]]:
    """One row per hierarchy of S: what is merged there, since when, in which mode."""
    from overlayctl import kernel, mountinfo
    rows = []
    mounts = mountinfo.read()
    atomic = kernel.can_mount_beneath()
    for h in s.hierarchies:
        target = chase(s.root, h, must_exist=True)
        if target is None or not os.path.isdir(target):
            continue
        row: dict[str, Any] = {"hierarchy": h, "extensions": [], "since": None,
                               "mutable": None, "upperdir": None, "writable": False,
                               "defaults": None, "atomic_refresh": atomic, "merged": False}
        if live.is_ours(target, s.cls, mounts):
            merged = metadata.read_merged(target, s.cls)
            rec = merged.record
            origin = merged.origin or {}
            row["merged"] = True
            row["extensions"] = merged.names
            row["since"] = rec.since if rec and rec.since else _merge_time(target, s)
            row["mutable"] = rec.mode if rec else (origin.get("mutable") or {}).get("mode")
            top = mountinfo.top_mount(mounts, target)
            upper = top.super_option("upperdir") if top else None
            if rec is not None:
                row["upperdir"] = rec.upperdir
            elif upper:
                row["upperdir"] = (upper if s.root == "/" or not upper.startswith(s.root)
                                   else upper[len(s.root.rstrip("/")):])
            if row["mutable"] is None:
                row["mutable"] = "yes" if upper else "no"
            row["writable"] = bool(upper) and not os.statvfs(target).f_flag & os.ST_RDONLY
            if rec is not None and rec.upper == "ephemeral":
                # The raw ephemeral upper, exposed read-only inside the metadata directory.
                eph = os.path.join(target, s.cls.meta_dir, live.EPHEMERAL_DIR, "upper")
                row["upperdir"] = (os.path.join(h, s.cls.meta_dir, live.EPHEMERAL_DIR, "upper")
                                   if os.path.isdir(eph) else None)
                row["ephemeral"] = True
                # Its writes go at unmerge (or a merge in another mode): say how many.
                row["ephemeral_entries"] = live.ephemeral_entries(target, s.cls)
            row["defaults"] = rec.defaults if rec else None
            if rec is not None:
                # Raw images: how each is protected (verity, signature), as merged.
                prot = {la.name: la.protection for la in rec.layers
                        if la.role == "extension" and la.name and la.protection}
                if prot:
                    row["protection"] = prot
        detached = state.detached_alive(s.root, s.cls.name, h)
        if detached:
            row["detached"] = detached
        rows.append(row)
    return rows


def _merge_time(target: str, s: Settings) -> int:
    """When a merge without our record (upstream's) was made: its metadata directory is
    written then. The hierarchy's own mtime would be that of its upper, which for the real
    /usr as its own upper is whenever a package was last installed."""
    for p in (os.path.join(target, s.cls.meta_dir), target):
        try:
            return os.stat(p).st_mtime_ns // 1000
        except OSError:
            continue
    return 0


def list_rows(s: Settings) -> list[dict[str, Any]]:
    """Every image of S's class (upstream's keys, plus "class"); raw images also say how
    they are protected and whether the image policy allows them ("refused": why not).
    Refused and broken images are listed too."""
    from overlayctl.kernel import birth_time_us
    rows = []
    for img in discover(s):
        # "time": a directory's creation time, as upstream (its mtime says nothing about
        # the tree below), a file's modification time.
        row: dict[str, Any] = {"name": img.name, "type": img.type, "path": img.path,
                               "time": (birth_time_us(img.path) if img.type == "directory"
                                        else img.mtime_us), "class": s.cls.name}
        if img.type in ("raw", "block"):
            row.update(_list_protection(s, img))
        rows.append(row)
    return rows


def _list_protection(s: Settings, img: Image) -> dict[str, Any]:
    from overlayctl import rawimage
    from overlayctl.policy import ALLOW_POLICY, PolicyRefused, policy_to_string
    pol = _policy_for(s, img)
    out: dict[str, Any] = {"protection": None, "root_hash": None,
                           "policy": policy_to_string(pol), "refused": None}
    try:
        plan = rawimage.inspect(img.path, pol, cls_name=s.cls.name, activate=False)
    except PolicyRefused as e:
        out["refused"] = e.message
        try:
            plan = rawimage.inspect(img.path, ALLOW_POLICY, cls_name=s.cls.name,
                                    activate=False)
        except OverlayctlError:
            return out
    except OverlayctlError as e:
        out["refused"] = e.message
        return out
    out["protection"] = plan.protection.kind
    out["root_hash"] = plan.protection.root_hash
    return out


__all__ = ["OverlayctlError", "merge", "rebuild", "run", "status_rows", "unmerge"]
