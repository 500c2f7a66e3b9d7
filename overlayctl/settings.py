"""Where every setting comes from: the extension class, the hierarchies, the search
directories, and the mutable mode (command line > environment > config files)."""

from __future__ import annotations

import os

from overlayctl import log
from overlayctl.errors import die
from overlayctl.paths import chase
from overlayctl.record import Record
from overlayctl.release import ClassInfo, parse_boolean
from overlayctl.vocab import MUTABLE_MODES

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from overlayctl.policy import ImagePolicy
    from overlayctl.vocab import ClassName, MutableMode

__all__ = ["CLASSES", "MUTABLE_MODES", "ExtClass", "Settings", "load_settings"]

SYSEXT = ClassInfo("sysext", "usr/lib/extension-release.d", "SYSEXT_LEVEL", "SYSEXT_SCOPE")
CONFEXT = ClassInfo("confext", "etc/extension-release.d", "CONFEXT_LEVEL", "CONFEXT_SCOPE")


class ExtClass(Record):
    """Everything that differs between system and configuration extensions."""

    __slots__ = ("info", "hierarchies", "search_dirs", "initrd_search_dirs", "env_prefix",
                 "section", "meta_dir", "list_file", "noexec_default", "nosuid")
    info: ClassInfo
    hierarchies: tuple[str, ...]
    search_dirs: tuple[str, ...]
    initrd_search_dirs: tuple[str, ...]
    env_prefix: str           # SYSTEMD_SYSEXT / SYSTEMD_CONFEXT
    section: str              # [SysExt] / [ConfExt]
    meta_dir: str             # .systemd-sysext
    list_file: str            # extensions / confexts
    noexec_default: bool
    nosuid: bool

    def __init__(self, info: ClassInfo, hierarchies: tuple[str, ...],
                 search_dirs: tuple[str, ...], initrd_search_dirs: tuple[str, ...],
                 env_prefix: str, section: str, meta_dir: str, list_file: str,
                 noexec_default: bool, nosuid: bool) -> None:
        self._fill(locals())

    @property
    def name(self) -> ClassName:
        n: ClassName = "sysext" if self.info.name == "sysext" else "confext"
        return n


CLASSES: dict[str, ExtClass] = {
    "sysext": ExtClass(
        SYSEXT, ("/usr", "/opt"),
        ("/etc/extensions", "/run/extensions", "/var/lib/extensions"),
        ("/etc/extensions", "/run/extensions", "/var/lib/extensions", "/.extra/sysext",
         "/.extra/global_sysext"),
        "SYSTEMD_SYSEXT", "SysExt", ".systemd-sysext", "extensions", False, False),
    "confext": ExtClass(
        CONFEXT, ("/etc",),
        ("/run/confexts", "/var/lib/confexts", "/usr/local/lib/confexts", "/usr/lib/confexts"),
        ("/run/confexts", "/var/lib/confexts", "/usr/local/lib/confexts", "/.extra/confext",
         "/.extra/global_confext"),
        "SYSTEMD_CONFEXT", "ConfExt", ".systemd-confext", "confexts", True, True),
}

CONF_PARENTS = ("/etc", "/run", "/usr/local/lib", "/usr/lib")


def parse_mutable(value: str) -> MutableMode | None:
    """A mutable mode name, or None when VALUE is not one. Names are case-sensitive;
    boolean spellings are not."""
    for m in MUTABLE_MODES:
        if value == m:
            return m
    b = parse_boolean(value)
    if b is None:
        return None
    return "yes" if b else "no"


def parse_hierarchies(value: str, env: str) -> tuple[str, ...]:
    items = value.split(":")
    if not value or any(not i for i in items):
        raise die(f"${env} has an empty entry: '{value}'",
                  "give a colon-separated list of absolute paths, e.g. /usr:/opt")
    for i in items:
        if not i.startswith("/") or os.path.normpath(i) != i or i == "/" or "//" in i:
            raise die(f"${env}: '{i}' is not a normalized absolute path other than /",
                      "give a colon-separated list of absolute paths, e.g. /usr:/opt")
    return tuple(items)


def class_hierarchies(cls: ExtClass) -> tuple[str, ...]:
    """The hierarchies of CLS: $SYSTEMD_SYSEXT_HIERARCHIES / $SYSTEMD_CONFEXT_HIERARCHIES, or
    the class's own."""
    env = f"{cls.env_prefix}_HIERARCHIES"
    value = os.environ.get(env)
    return parse_hierarchies(value, env) if value is not None else cls.hierarchies


def read_ini(root: str, base: str, section: str) -> dict[str, str]:
    """The last assignment of each key (see read_ini_items)."""
    return {k: v for k, v, _ in read_ini_items(root, base, section)}


def read_ini_items(root: str, base: str, section: str) -> list[tuple[str, str, str]]:
    """KEY=VALUE settings of [SECTION] from BASE (a path below each of CONF_DIRS' parents:
    /etc, /run, /usr/local/lib, /usr/lib) and BASE.d/*.conf drop-ins, systemd style."""
    files: list[str] = []
    for d in CONF_PARENTS:
        p = chase(root, f"{d}/{base}", must_exist=True)
        if p and os.path.isfile(p):
            files.append(p)
            break
    dropins: dict[str, str] = {}
    for d in CONF_PARENTS:
        dd = chase(root, f"{d}/{base}.d", must_exist=True)
        if not dd or not os.path.isdir(dd):
            continue
        for name in os.listdir(dd):
            if name.endswith(".conf") and name not in dropins:
                dropins[name] = os.path.join(dd, name)
    files.extend(dropins[n] for n in sorted(dropins))
    result: list[tuple[str, str, str]] = []
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as e:
            log.warning(f"cannot read {f}: {e.strerror}; ignoring it")
            continue
        current = None
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            if current != section or "=" not in line:
                continue
            k, _, v = line.partition("=")
            result.append((k.strip(), v.strip(), f))
    return result


def read_config(root: str, cls: ExtClass) -> dict[str, str]:
    """[SysExt]/[ConfExt] of systemd's sysext.conf/confext.conf and drop-ins."""
    return read_ini(root, f"systemd/{cls.name}.conf", cls.section)


class Settings(Record):
    """Everything one invocation needs, resolved once. Frozen: variants via replace()."""

    __slots__ = ("root", "cls", "hierarchies", "mutable", "mutable_source",
                 "overlay_options", "force", "noexec", "always_refresh", "no_reload",
                 "dry_run", "image_policy", "initrd", "extra", "defaults", "keep_defaults")
    root: str
    cls: ExtClass
    hierarchies: tuple[str, ...]
    mutable: MutableMode
    mutable_source: str                 # default, --mutable, $VAR, NAME.conf
    overlay_options: str | None
    force: bool
    noexec: bool | None
    always_refresh: bool
    no_reload: bool
    dry_run: bool
    image_policy: ImagePolicy | None    # --image-policy= or ImagePolicy=; None: per image
    initrd: bool
    extra: dict[str, str]
    defaults: dict[str, str]            # hierarchy -> dir inside root
    keep_defaults: tuple[str, ...]      # cleanup: never keep whiteouts of these

    def __init__(self, *, root: str, cls: ExtClass, hierarchies: tuple[str, ...],
                 mutable: MutableMode = "no", mutable_source: str = "default",
                 overlay_options: str | None = None, force: bool = False,
                 noexec: bool | None = None, always_refresh: bool = False,
                 no_reload: bool = False, dry_run: bool = False,
                 image_policy: ImagePolicy | None = None, initrd: bool = False,
                 extra: dict[str, str] | None = None, defaults: dict[str, str] | None = None,
                 keep_defaults: tuple[str, ...] = ()) -> None:
        v = locals()
        v["extra"] = extra or {}
        v["defaults"] = defaults or {}
        self._fill(v)

    @property
    def search_dirs(self) -> tuple[str, ...]:
        return self.cls.initrd_search_dirs if self.initrd else self.cls.search_dirs


def load_settings(root: str, class_name: str, *, cli_mutable: MutableMode | None = None,
                  force: bool = False, noexec: bool | None = None, always_refresh: bool = False,
                  no_reload: bool = False, dry_run: bool = False,
                  image_policy: str | None = None,
                  defaults: dict[str, str] | None = None,
                  hierarchies: tuple[str, ...] | None = None) -> Settings:
    """Settings of one class: command line > environment > config files. HIERARCHIES
    narrows the class's hierarchies (a rebuild of one)."""
    cls = CLASSES[class_name]
    all_h = class_hierarchies(cls)
    mutable: MutableMode = "no"
    source = "default"
    env_m = f"{cls.env_prefix}_MUTABLE_MODE"
    ev = os.environ.get(env_m)
    if ev is not None:
        m = parse_mutable(ev)
        if m is None:
            log.warning(f"ignoring ${env_m}={ev}: not a mutable mode ({', '.join(MUTABLE_MODES)})")
        else:
            mutable, source = m, f"${env_m}"
    if cli_mutable is not None:
        mutable, source = cli_mutable, "--mutable"
    items = read_ini_items(root, f"systemd/{cls.name}.conf", cls.section)
    conf_policy, items = _config_policy(items, cls.name)
    conf = {k: v for k, v, _ in items}
    if source == "default":
        for key, value, path in items:
            if key != "Mutable":
                continue
            m = parse_mutable(value)
            if m is None:
                log.warning(f"ignoring Mutable={value} in {path}: not a mutable mode")
            else:
                # The last valid assignment wins, as in systemd's config parser.
                mutable, source = m, f"{cls.name}.conf"
    policy = conf_policy
    if image_policy is not None:
        policy = parse_image_policy(image_policy)
    ours = f"overlayctl/{cls.name}.conf"
    dflt: dict[str, str] = {}
    for h, d in read_ini(root, ours, "Defaults").items():
        if h in all_h:
            dflt[h] = d
        else:
            log.warning(f"ignoring [Defaults] {h}= in {ours}: not a hierarchy of {cls.name}")
    for h, d in (defaults or {}).items():
        h = h or ("/etc" if cls.name == "confext" else "")
        if h in all_h:
            dflt[h] = d
    keep = read_ini(root, ours, "Cleanup").get("KeepDefaults", "")
    return Settings(
        root=root, cls=cls, hierarchies=hierarchies if hierarchies is not None else all_h,
        mutable=mutable, mutable_source=source,
        overlay_options=os.environ.get(f"{cls.env_prefix}_OVERLAYFS_MOUNT_OPTIONS"),
        force=force, noexec=noexec, always_refresh=always_refresh,
        no_reload=no_reload or root != "/", dry_run=dry_run, image_policy=policy,
        initrd=os.path.exists(chase(root, "/etc/initrd-release") or "/nonexistent"),
        extra=conf, defaults=dflt, keep_defaults=tuple(keep.split()))


def parse_image_policy(text: str) -> ImagePolicy:
    """--image-policy=TEXT as systemd parses it (strictly): a one-line error otherwise.
    Only called when a policy is given: the class defaults are never parsed."""
    from overlayctl.policy import parse_policy
    return parse_policy(text)


def _config_policy(items: list[tuple[str, str, str]], cls_name: str
                   ) -> tuple[ImagePolicy | None, list[tuple[str, str, str]]]:
    """ImagePolicy= of the configuration files, parsed as systemd 262 parses it: unknown
    designators and flags are skipped, an empty value resets it; anything else it cannot
    parse (no '=', a rule given twice) makes 262 ignore the configuration altogether
    ("Failed to parse sysext config file, ignoring"): then ITEMS come back empty."""
    policy: ImagePolicy | None = None
    for key, value, path in items:
        if key != "ImagePolicy":
            continue
        if not value:
            policy = None
            continue
        from overlayctl.policy import PolicyError, parse_policy
        try:
            policy = parse_policy(value, graceful=True, source=f"{path}: ImagePolicy")
        except PolicyError as e:
            log.warning(f"{e.message}: ignoring the {cls_name} configuration files, as "
                        "systemd does")
            return None, []
    return policy, items


def parse_defaults_arg(values: list[str], class_names: list[str]) -> dict[str, str]:
    """--defaults=DIR or --defaults=HIERARCHY=DIR (repeatable). Without HIERARCHY= it is for
    /etc (confext); system extensions need the hierarchy named."""
    out: dict[str, str] = {}
    for v in values:
        h, sep, d = v.partition("=")
        if sep and h.startswith("/") and d.startswith("/"):
            out[h] = d
        elif v.startswith("/"):
            if class_names == ["sysext"]:
                raise die(f"--defaults={v}: say which hierarchy it is for",
                          f"use --defaults=/usr={v} (a bare DIR is for /etc)")
            out[""] = v
        else:
            raise die(f"--defaults={v}: not an absolute path inside the root",
                      "use --defaults=/usr/share/factory/etc or --defaults=/etc=/usr/share/...")
    return out
