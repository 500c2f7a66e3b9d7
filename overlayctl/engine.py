"""The verbs that change things, in upstream's order of operations: discover, read
metadata, validate, plan, then apply under a lock."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from overlayctl import apply, faults
from overlayctl.errors import AlreadyMergedError, die
from overlayctl.images import Image, discover, read_metadata
from overlayctl.paths import chase
from overlayctl.plan import HierarchyPlan, make_plan
from overlayctl.release import check_compatible, host_os_release
from overlayctl.settings import Settings

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def mount_raw(img: Image, stack: contextlib.ExitStack) -> None:
    """Mount a raw image (detached) for the rest of this invocation: its root becomes the
    image's path, the file is kept as its source."""
    from overlayctl import rawimage
    fd, usr_only = rawimage.mount_image(img.path)
    stack.callback(os.close, fd)
    img.source, img.path, img.usr_root = img.path, f"/proc/self/fd/{fd}", usr_only


def accepted_images(s: Settings, stack: contextlib.ExitStack) -> list[Image]:
    images = discover(s)
    for img in images:
        if img.type in ("raw", "block"):
            mount_raw(img, stack)
        read_metadata(s, img)
    host = host_os_release(s.root)
    scope = "initrd" if s.initrd else "system"
    accepted: list[Image] = []
    ignored = 0
    for img in images:
        if img.source and s.cls.name == "sysext" and not s.force and img.tree_path(
                "/usr/lib/os-release"):
            log(f"Ignoring extension '{img.name}': it contains usr/lib/os-release.")
            ignored += 1
            continue
        if not host.get("ID"):
            raise die(f"the host os-release in {s.root} has no ID=",
                      "add ID= to etc/os-release or usr/lib/os-release in the root")
        if s.force:
            accepted.append(img)
            continue
        reason = check_compatible(img.release.data if img.release and img.release.path else None,
                                  host, s.cls.info, scope, img.name)
        if reason:
            log(f"Ignoring extension '{img.name}': {reason}.")
            ignored += 1
            continue
        accepted.append(img)
    if accepted:
        log("Using extensions " + ", ".join(f"'{i.name}'" for i in accepted) + ".")
    elif s.mutable == "no":
        log("No suitable extensions found" + (f" ({ignored} ignored due to incompatible "
                                               "image(s))." if ignored else "."))
    else:
        log("No extensions found, proceeding in mutable mode.")
    return accepted


def journal_path(root: str, name: str) -> str:
    """Marks a merge under way: left behind only by a process that was killed."""
    return os.path.join(root, "run", "overlayctl", f"{name}.merging")


def merge(s: Settings, refresh: bool = False, recovering: bool = False) -> list[dict[str, Any]]:
    """merge or refresh one class. Returns the plans (as JSON) for --dry-run."""
    with contextlib.nullcontext() if s.dry_run else apply.lock(s.root), \
            contextlib.ExitStack() as images:
        accepted = accepted_images(s, images)
        targets = [t for t in (chase(s.root, h, must_exist=True) for h in s.hierarchies)
                   if t is not None]
        merged = [t for t in targets if apply.is_ours(t, s.cls)]
        journal = journal_path(s.root, s.cls.name)
        interrupted = recovering or os.path.exists(journal) or any(
            apply.stacked_ours(t) > 1 for t in merged)
        if merged and interrupted and not s.dry_run:
            # A killed merge or refresh: finish the job by rebuilding, never skip it.
            log(f"An earlier merge of {s.cls.name} was interrupted: completing it.")
            refresh = True
        if merged and not refresh:
            raise AlreadyMergedError(
                f"hierarchy '{merged[0]}' is already merged",
                f"use 'overlayctl {s.cls.name} refresh' or unmerge first",
                hierarchy=next(h for h in s.hierarchies
                               if chase(s.root, h, must_exist=True) == merged[0]))
        if not accepted and s.mutable == "no" and not s.defaults:
            if refresh and merged and not s.dry_run:
                apply.unmerge(s)
            return []
        views = apply.plain_views(merged, s.cls) if merged else {}
        carry: dict[str, int] = {}
        try:
            plans = make_plan(s, accepted, (lambda t: views[t].path if t in views else t))
            for p in plans:
                _own_workdir(s, p, merged)
            if s.dry_run:
                return [_shown_plan(p.as_json(), views) for p in plans]
            origin = apply.origin_of(s, plans, accepted)
            if (refresh and merged and not s.always_refresh and not interrupted
                    and _unchanged(s, merged, origin)):
                log("Skipping extension refresh because no change was found, use "
                    "--always-refresh=yes to always do a refresh.")
                return []
            if refresh:
                # Hierarchies that are merged now but get no overlay this time.
                for p in plans:
                    if not p.merge and p.target in merged:
                        sub = Settings(**{**s.__dict__, "hierarchies": (p.hierarchy,)})
                        apply.unmerge(sub)
            if any(p.merge and p.upper_kind in ("persistent", "host") for p in plans):
                from overlayctl.local import update_manifest
                for p in plans:
                    if p.merge:
                        update_manifest(s.root, s.cls, p)
            if refresh:
                for p in plans:
                    if p.upper_kind == "ephemeral" and p.target in merged:
                        fd = apply.carried_ephemeral(p.target, s.cls)
                        if fd is not None:
                            carry[p.target] = fd
            with open(journal, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")
            try:
                faults.checkpoint("journal")
                apply.put_in_place(s, plans, origin, views, replace=refresh, carry=carry)
            finally:
                # Only a killed process leaves it behind: put_in_place rolls back otherwise.
                os.unlink(journal)
            if any(p.merge for p in plans):
                maybe_reload(s, accepted)
        finally:
            for v in views.values():
                os.close(v.fd)
            for fd in carry.values():
                os.close(fd)
        return []


def _unchanged(s: Settings, merged: list[str], origin: dict[str, Any]) -> bool:
    from overlayctl import metadata
    old = metadata.read_merged(merged[0], s.cls).origin
    return old == origin and set(origin.get("hierarchies", [])) == {
        h for h in s.hierarchies if chase(s.root, h, must_exist=True) in merged}


def unmerge(s: Settings) -> None:
    with apply.lock(s.root):
        # As upstream: decided before unmounting (from the merged tree), reloaded after.
        reload = _reload_wanted_by_merged(s)
        apply.unmerge(s)
        if reload:
            _daemon_reload()


def _reload_wanted_by_merged(s: Settings) -> bool:
    """Does a merged extension ask for a service-manager reload (EXTENSION_RELOAD_MANAGER)?
    Read from the release files in the merged tree."""
    from overlayctl import metadata
    from overlayctl.release import parse_boolean, parse_env_file
    if s.no_reload or s.root != "/" or not os.path.isdir("/run/systemd/system"):
        return False
    release_dir = "/" + s.cls.info.release_dir
    for h in s.hierarchies:
        t = chase(s.root, h, must_exist=True)
        if t is None or not os.path.isdir(t) or not apply.is_ours(t, s.cls):
            continue
        if not release_dir.startswith(h.rstrip("/") + "/"):
            continue
        d = t + release_dir[len(h.rstrip("/")):]
        for name in metadata.read_merged(t, s.cls).names:
            try:
                data = parse_env_file(os.path.join(d, f"extension-release.{name}"))
            except OSError:
                continue
            if parse_boolean(data.get("EXTENSION_RELOAD_MANAGER", "")):
                return True
    return False


def _daemon_reload() -> None:
    import subprocess
    r = subprocess.run(["systemctl", "daemon-reload"], check=False)
    if r.returncode != 0:
        raise die("the service manager could not be reloaded (systemctl daemon-reload failed)",
                  "check 'journalctl -b' and reload by hand")


def maybe_reload(s: Settings, images: list[Image]) -> None:
    """EXTENSION_RELOAD_MANAGER=1 in a merged extension: reload the service manager, unless
    --no-reload or --root (which implies it), and only where systemd runs."""
    from overlayctl.release import parse_boolean
    if s.no_reload or s.root != "/" or not os.path.isdir("/run/systemd/system"):
        return
    want = False
    for img in images:
        value = img.release.data.get("EXTENSION_RELOAD_MANAGER") if img.release else None
        if value is None:
            continue
        b = parse_boolean(value)
        if b is None:
            log(f"Ignoring EXTENSION_RELOAD_MANAGER={value} of '{img.name}': not a boolean.")
        want = want or bool(b)
    if want:
        _daemon_reload()


def _own_workdir(s: Settings, p: HierarchyPlan, merged: list[str]) -> None:
    """A refresh gives the new overlay a work dir of its own: mounting over a work dir that
    the old overlay still uses would pull its 'work' directory out from under it."""
    if not p.workdir or p.target not in merged:
        return
    from overlayctl import metadata
    old = metadata.read_merged(p.target, s.cls).work_dir
    if old and os.path.basename(old) == os.path.basename(p.workdir):
        base = os.path.basename(p.workdir)
        alt = base[:-2] if base.endswith(".1") else base + ".1"
        p.workdir = os.path.join(os.path.dirname(p.workdir), alt)


def _shown_plan(j: dict[str, Any], views: dict[str, apply.PlainView]) -> dict[str, Any]:
    """A plan for --dry-run with plain views of merged hierarchies shown by their path."""
    text = json.dumps(j)
    for target, v in views.items():
        real = os.path.dirname(target) if v.rel else target
        base = f"/proc/self/fd/{v.fd}"
        text = text.replace(json.dumps(base)[1:-1], json.dumps(real)[1:-1])
    out: dict[str, Any] = json.loads(text)
    return out


def unmerge_dry_run(s: Settings) -> list[str]:
    """What unmerge would take down."""
    out = []
    for h in s.hierarchies:
        t = chase(s.root, h, must_exist=True)
        if t is not None and os.path.isdir(t) and apply.is_ours(t, s.cls):
            out.append(t)
    return out
