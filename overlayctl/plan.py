"""The plan: for every hierarchy, the exact overlay to build. Pure: it reads the file
system but never writes to it and never mounts; apply.py carries it out."""

from __future__ import annotations

import os
import stat

from overlayctl import log
from overlayctl.errors import die
from overlayctl.images import Image
from overlayctl.paths import chase, inside, is_empty_dir, single_component
from overlayctl.record import Record
from overlayctl.settings import Settings

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Callable

    from overlayctl.vocab import LayerRole, MutableMode, UpperKind

MAX_LOWERS = 500
MUTABLE_DEFAULT_OPTIONS = "redirect_dir=on,noatime,metacopy=off,index=off"
VFS_WORDS = {"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
             "relatime", "strictatime", "nodiratime", "diratime"}
MUTABLE_ROOT = "/var/lib/extensions.mutable"


class Layer(Record):
    """One lower layer of an overlay."""

    __slots__ = ("role", "path", "name", "image", "protection")
    role: LayerRole
    path: str | None           # host path; None for layers in the private workspace
    name: str | None           # the extension name, for role "extension"
    image: str | None          # raw images: the image file the layer comes from
    protection: dict[str, str | None] | None   # raw images: verity.Protection.to_json()

    def __init__(self, role: LayerRole, path: str | None, name: str | None = None,
                 image: str | None = None,
                 protection: dict[str, str | None] | None = None) -> None:
        self._fill(locals())

    def describe(self) -> str:
        if self.path is None:
            return f"<workspace>/{self.role}"
        if self.image:
            # /proc/self/fd/N/usr of a mounted image means nothing later: IMAGE:/usr does.
            inner = self.path.split("/")[5:]
            return f"{self.image}:/{'/'.join(inner)}"
        return self.path


class HierarchyPlan(Record):
    """The exact overlay of one hierarchy, decided before anything is mounted."""

    __slots__ = ("hierarchy", "target", "mode", "merge", "skip_reason", "upper_kind",
                 "upperdir", "workdir", "create_upper", "mutable_dir", "lowers", "fs_options",
                 "vfs_options", "extensions", "top_mode", "base_used", "self_import")
    hierarchy: str                     # as configured, e.g. /usr
    target: str                        # host path the overlay is mounted on
    mode: MutableMode                  # mutable mode in force
    merge: bool                        # False: left unmerged (see skip_reason)
    skip_reason: str | None
    upper_kind: UpperKind | None       # persistent, host, ephemeral, or None
    upperdir: str | None               # host path (None for ephemeral: lives in the workspace)
    workdir: str | None
    create_upper: bool                 # mode yes: the persistent dir has to be made
    mutable_dir: str | None            # resolved persistent dir consulted, if any
    lowers: tuple[Layer, ...]          # top to bottom
    fs_options: tuple[str, ...]        # overlayfs options (key[=value])
    vfs_options: tuple[str, ...]       # per-mount flags (ro, nodev, ...)
    extensions: tuple[str, ...]        # every accepted name, ascending
    top_mode: int
    base_used: bool
    self_import: bool                  # import modes: the mutable dir is the hierarchy itself

    def __init__(self, *, hierarchy: str, target: str, mode: MutableMode, merge: bool,
                 skip_reason: str | None = None, upper_kind: UpperKind | None = None,
                 upperdir: str | None = None, workdir: str | None = None,
                 create_upper: bool = False, mutable_dir: str | None = None,
                 lowers: tuple[Layer, ...] = (), fs_options: tuple[str, ...] = (),
                 vfs_options: tuple[str, ...] = (), extensions: tuple[str, ...] = (),
                 top_mode: int = 0o755, base_used: bool = False,
                 self_import: bool = False) -> None:
        self._fill(locals())

    @property
    def keeps_manifest(self) -> bool:
        """Whether the merge keeps a manifest of the upper (manifest.py, docs/defaults.md):
        where it is cheap and useful, a persistent upper over a defaults layer, or /etc."""
        return self.merge and self.upper_kind in ("persistent", "host") and (
            any(layer.role == "defaults" for layer in self.lowers) or self.hierarchy == "/etc")

    @property
    def readonly(self) -> bool:
        return self.upper_kind is None

    def as_json(self) -> dict[str, object]:
        return {
            "hierarchy": self.hierarchy,
            "target": self.target,
            "mode": self.mode,
            "merge": self.merge,
            "skip_reason": self.skip_reason,
            "upper": self.upper_kind,
            "upperdir": self.upperdir if self.upper_kind != "ephemeral" else "<workspace>/upper",
            "workdir": self.workdir if self.upper_kind != "ephemeral" else "<workspace>/work",
            "create_upper": self.create_upper,
            "lowerdirs": [layer.describe() for layer in self.lowers],
            "layers": [layer.fields() for layer in self.lowers],
            "options": list(self.fs_options),
            "mount_flags": list(self.vfs_options),
            "readonly": self.readonly,
            "extensions": list(self.extensions),
            "mode_bits": f"{self.top_mode:04o}",
            "self_import": self.self_import,
        }


def split_options(text: str) -> list[str]:
    """Split a comma-separated option string; a backslash escapes the next character."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == ",":
            if cur:
                out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if cur:
        out.append("".join(cur))
    return out


_LAYER_KEYS = {"lowerdir", "lowerdir+", "upperdir", "workdir", "datadir+"}


def _options(settings: Settings, mutable: bool) -> tuple[list[str], list[str]]:
    cls = settings.cls
    vfs = ["nodev"]
    if cls.nosuid:
        vfs.append("nosuid")
    noexec = cls.noexec_default if settings.noexec is None else settings.noexec
    if noexec:
        vfs.append("noexec")
    if not mutable:
        vfs.insert(0, "ro")
    text = settings.overlay_options
    if text is None:
        text = MUTABLE_DEFAULT_OPTIONS if mutable else ""
    fs: list[str] = []
    for opt in split_options(text):
        key = opt.partition("=")[0]
        if key in _LAYER_KEYS:
            raise die(f"${cls.env_prefix}_OVERLAYFS_MOUNT_OPTIONS may not set '{key}'",
                      "layers are chosen by overlayctl; set only options such as metacopy=off")
        if opt in VFS_WORDS:
            vfs.append(opt)
        else:
            fs.append(opt)
    return fs, vfs


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _same(a: str, b: str) -> bool:
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _overlaps(a: str, b: str) -> bool:
    a, b = os.path.normpath(a) + "/", os.path.normpath(b) + "/"
    return a.startswith(b) or b.startswith(a)


if TYPE_CHECKING:
    BaseView = Callable[[str], str]


def plan_hierarchy(settings: Settings, hierarchy: str, accepted: list[Image],
                   base_view: BaseView | None = None,
                   live_workdir: str | None = None) -> HierarchyPlan:
    """The overlay for one hierarchy. base_view maps the target to a path through which the
    plain (unmerged) directory can be read, for hierarchies that are merged right now;
    live_workdir is the work dir the overlay merged there now uses (a refresh gives the new
    overlay another one)."""
    root = settings.root
    mode = settings.mutable
    name = single_component(hierarchy)
    target = chase(root, hierarchy) or os.path.join(root, hierarchy.lstrip("/"))
    view = base_view(target) if base_view else target
    names = tuple(i.name for i in accepted)

    base_exists = os.path.lexists(view)
    if base_exists and not os.path.isdir(view):
        raise die(f"hierarchy {target} is not a directory",
                  f"make {hierarchy} a directory inside the root, or leave it out")
    top_mode = stat.S_IMODE(os.stat(view).st_mode) if base_exists else 0o755
    base_nonempty = base_exists and not is_empty_dir(view)

    # Extension layers, topmost (newest) first.
    ext_layers: list[Layer] = []
    for img in reversed(accepted):
        if img.type != "directory" and img.source is None:
            continue   # a raw image that was not mounted
        lp = img.tree_path(hierarchy)
        if lp is None:
            log.debug(f"Hierarchy '{hierarchy}' in extension '{img.name}' doesn't exist, not "
                      "merging.")
            continue
        if not os.path.isdir(lp):
            raise die(f"extension '{img.name}': {inside(img.path, lp)} in {img.path} is not a "
                      "directory", f"make {hierarchy} a directory in the extension or remove it")
        if is_empty_dir(lp):
            log.debug(f"Hierarchy '{hierarchy}' in extension '{img.name}' is empty, not "
                      "merging.")
            continue
        ext_layers.append(Layer("extension", lp, img.name, img.source,
                                img.protection.to_json() if img.protection else None))

    defaults: str | None = None
    if hierarchy in settings.defaults:
        defaults = chase(root, settings.defaults[hierarchy], must_exist=True)
        if defaults is None or not os.path.isdir(defaults):
            raise die(f"defaults directory {settings.defaults[hierarchy]} for {hierarchy} does "
                      f"not exist in {root}",
                      "give --defaults=DIR a directory inside the root, or drop the setting")
        if _overlaps(defaults, target):
            raise die(f"defaults directory {defaults} lies inside or above {target}",
                      f"keep the defaults outside {hierarchy}, e.g. in /usr/share/factory")
        if is_empty_dir(defaults):
            defaults = None

    if not ext_layers and mode == "no" and defaults is None:
        log.debug(f"No extension has content for '{hierarchy}' and mutability is disabled: "
                  "not merging it.")
        return HierarchyPlan(hierarchy=hierarchy, target=target, mode=mode, merge=False,
                             skip_reason="no extension has content for it", extensions=names,
                             top_mode=top_mode)

    # The persistent mutable dir ("write routing directory"). Modes that do not use it do
    # not look at it, as upstream: a stray file there does not stop a read-only merge.
    mpath_unresolved = f"{MUTABLE_ROOT}/{name}"
    mdir = (chase(root, mpath_unresolved, must_exist=True)
            if mode in ("yes", "auto", "import", "ephemeral-import") else None)
    if mode in ("no", "ephemeral"):
        how = "disabled" if mode == "no" else "ephemeral"
        log.debug(f"Mutability for hierarchy '{hierarchy}' is {how}, not resolving mutable "
                  "directory.")
    elif mdir is None:
        log.debug(f"No mutable directory found for '{hierarchy}' "
                  f"({root.rstrip('/')}{mpath_unresolved}).")
    if mdir is not None and not os.path.isdir(mdir):
        raise die(f"mutable directory {mdir} is not a directory",
                  f"remove it or make {root.rstrip('/')}{mpath_unresolved} a directory")
    import_dir: str | None = None
    upper_kind: UpperKind | None = None
    upperdir: str | None = None
    workdir: str | None = None
    mutable_dir: str | None = None
    create_upper = False
    self_import = False

    def is_hierarchy(d: str) -> bool:
        return os.path.normpath(d) == os.path.normpath(target) or _same(d, view)

    if mode in ("yes", "auto"):
        if mdir is not None:
            is_host = is_hierarchy(mdir)
            have = stat.S_IMODE(os.stat(view if is_host else mdir).st_mode)
            if have != top_mode:
                raise die(f"mutable directory {mdir} has mode {have:04o}, ought to have mode "
                          f"{top_mode:04o} like {hierarchy}",
                          f"chmod {top_mode:04o} {mdir}")
            upper_kind = "host" if is_host else "persistent"
            upperdir = view if is_host else mdir
            mutable_dir = mdir
        elif mode == "yes":
            upper_kind = "persistent"
            create_upper = True
            upperdir = chase(root, mpath_unresolved)
            mutable_dir = upperdir
    elif mode in ("import", "ephemeral-import"):
        if mdir is not None:
            # Upstream refuses a mutable dir that is the hierarchy itself. overlayctl makes the
            # real directory the top lower layer instead (read through the plain view when it
            # is merged now): it wins over the extensions and the defaults, and, as the import
            # layer, it is not also the base.
            self_import = is_hierarchy(mdir)
            import_dir = view if self_import else mdir
            mutable_dir = mdir
    if mode in ("ephemeral", "ephemeral-import"):
        upper_kind = "ephemeral"

    if upper_kind in ("persistent", "host"):
        assert upperdir is not None
        probe = _nearest_existing(upperdir)
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise die(f"can't use {upperdir} as an upper directory: it is read-only",
                      f"make {probe} writable or use --mutable=ephemeral")
        parent = os.path.dirname(upperdir.rstrip("/"))
        if upper_kind == "host" and view != target:
            parent = os.path.dirname(view)
        work = f".systemd-{name}-workdir"
        if live_workdir and os.path.basename(live_workdir) == work:
            # Mounting over the work dir the old overlay still uses would pull its 'work'
            # directory out from under it: the two alternate.
            work += ".1"
        workdir = os.path.join(parent, work)
        if root != "/" and not workdir.startswith("/proc/") and not (
                os.path.normpath(workdir).startswith(os.path.normpath(root) + "/")):
            raise die(f"work directory {workdir} would lie outside the root {root}",
                      f"let {mpath_unresolved} point to a directory inside the root")
        if not create_upper and os.stat(_nearest_existing(parent)).st_dev != os.stat(
                upperdir).st_dev:
            raise die(f"unable to find a work directory for {upperdir}: its parent {parent} is "
                      "on another file system",
                      "point the mutable directory at a subdirectory of a mount, not its root")

    lowers: list[Layer] = [Layer("meta", None)]
    if import_dir:
        log.debug(f"Importing mutable directory {import_dir} as a lower layer of "
                  f"'{hierarchy}'.")
        lowers.append(Layer("import", import_dir))
    lowers.extend(ext_layers)
    base_used = base_nonempty and upper_kind != "host" and not self_import
    if upper_kind == "host":
        log.debug(f"Host hierarchy '{target}' will serve as upperdir.")
    elif not base_exists:
        log.debug(f"Host hierarchy '{target}' does not exist, will not be used as lowerdir.")
    elif not base_nonempty:
        log.debug(f"Host hierarchy '{target}' is empty, will not be used as lower dir.")
    if base_used:
        lowers.append(Layer("base", view))
    if defaults is not None:
        # Lowest of all: host content beats defaults, extensions beat both.
        lowers.append(Layer("defaults", defaults))
    if upper_kind is None and len(lowers) < 2:
        # The kernel refuses a read-only overlay of one layer; an empty layer keeps the
        # hierarchy read-only as asked instead of failing the whole merge (upstream does).
        lowers.append(Layer("filler", None))
    if len(lowers) > MAX_LOWERS:
        raise die(f"{hierarchy} would need {len(lowers)} lower layers; the kernel allows "
                  f"{MAX_LOWERS}", "merge fewer extensions")

    real = [layer.path for layer in lowers if layer.path]
    fixed = [x for x in (upperdir, workdir) if x]
    for a in real:
        for b in fixed:
            if _overlaps(a, b):
                raise die(f"layer {a} overlaps {b} of {hierarchy}",
                          "keep extensions and mutable directories outside each other")
    fs, vfs = _options(settings, upper_kind is not None)
    return HierarchyPlan(
        hierarchy=hierarchy, target=target, mode=mode, merge=True, upper_kind=upper_kind,
        upperdir=upperdir, workdir=workdir, create_upper=create_upper,
        mutable_dir=mutable_dir, lowers=tuple(lowers), fs_options=tuple(fs),
        vfs_options=tuple(vfs), extensions=names, top_mode=top_mode, base_used=base_used,
        self_import=self_import)


def make_plan(settings: Settings, accepted: list[Image], base_view: BaseView | None = None,
              live_workdirs: dict[str, str] | None = None) -> list[HierarchyPlan]:
    return [plan_hierarchy(settings, h, accepted, base_view,
                           (live_workdirs or {}).get(
                               chase(settings.root, h) or os.path.join(settings.root,
                                                                       h.lstrip("/"))))
            for h in settings.hierarchies]
