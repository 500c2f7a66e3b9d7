"""Where every setting comes from: the extension class, the hierarchies, the search
directories, and the mutable mode (command line > environment > config files)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from overlayctl.errors import die
from overlayctl.paths import chase
from overlayctl.release import ClassInfo, parse_boolean

MUTABLE_MODES = ("no", "yes", "auto", "import", "ephemeral", "ephemeral-import")

SYSEXT = ClassInfo("sysext", "usr/lib/extension-release.d", "SYSEXT_LEVEL", "SYSEXT_SCOPE")
CONFEXT = ClassInfo("confext", "etc/extension-release.d", "CONFEXT_LEVEL", "CONFEXT_SCOPE")


@dataclass(frozen=True)
class ExtClass:
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

    @property
    def name(self) -> str:
        return self.info.name


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


def parse_mutable(value: str) -> str | None:
    """A mutable mode name, or None when VALUE is not one. Names are case-sensitive;
    boolean spellings are not."""
    if value in MUTABLE_MODES:
        return value
    b = parse_boolean(value)
    if b is None:
        return None
    return "yes" if b else "no"


def warn(msg: str) -> None:
    print(f"overlayctl: warning: {msg}", file=sys.stderr)


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
            warn(f"cannot read {f}: {e.strerror}; ignoring it")
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


@dataclass
class Settings:
    """Everything one invocation needs, resolved once."""

    root: str
    cls: ExtClass
    hierarchies: tuple[str, ...]
    mutable: str = "no"
    mutable_source: str = "default"
    overlay_options: str | None = None
    force: bool = False
    noexec: bool | None = None
    always_refresh: bool = False
    no_reload: bool = False
    dry_run: bool = False
    image_policy: str | None = None
    initrd: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)   # hierarchy -> dir inside root
    keep_defaults: tuple[str, ...] = ()                       # cleanup: never keep whiteouts

    @property
    def search_dirs(self) -> tuple[str, ...]:
        return self.cls.initrd_search_dirs if self.initrd else self.cls.search_dirs


def load_settings(root: str, class_name: str, *, cli_mutable: str | None = None,
                  force: bool = False, noexec: bool | None = None, always_refresh: bool = False,
                  no_reload: bool = False, dry_run: bool = False,
                  image_policy: str | None = None,
                  defaults: dict[str, str] | None = None) -> Settings:
    cls = CLASSES[class_name]
    env_h = f"{cls.env_prefix}_HIERARCHIES"
    hv = os.environ.get(env_h)
    hierarchies = parse_hierarchies(hv, env_h) if hv is not None else cls.hierarchies
    s = Settings(root=root, cls=cls, hierarchies=hierarchies, force=force, noexec=noexec,
                 always_refresh=always_refresh, no_reload=no_reload or root != "/",
                 dry_run=dry_run, image_policy=image_policy)
    s.initrd = os.path.exists(chase(root, "/etc/initrd-release") or "/nonexistent")
    env_m = f"{cls.env_prefix}_MUTABLE_MODE"
    ev = os.environ.get(env_m)
    if ev is not None:
        m = parse_mutable(ev)
        if m is None:
            warn(f"ignoring ${env_m}={ev}: not a mutable mode ({', '.join(MUTABLE_MODES)})")
        else:
            s.mutable, s.mutable_source = m, f"${env_m}"
    if cli_mutable is not None:
        s.mutable, s.mutable_source = cli_mutable, "--mutable"
    s.overlay_options = os.environ.get(f"{cls.env_prefix}_OVERLAYFS_MOUNT_OPTIONS")
    items = read_ini_items(root, f"systemd/{cls.name}.conf", cls.section)
    conf = {k: v for k, v, _ in items}
    from_config = s.mutable_source == "default"
    for key, value, path in items:
        if key != "Mutable" or not from_config:
            continue
        m = parse_mutable(value)
        if m is None:
            warn(f"ignoring Mutable={value} in {path}: not a mutable mode")
        else:
            # The last valid assignment wins, as in systemd's config parser.
            s.mutable, s.mutable_source = m, f"{cls.name}.conf"
    if "ImagePolicy" in conf and s.image_policy is None:
        s.image_policy = conf["ImagePolicy"]
    s.extra = conf
    ours = f"overlayctl/{cls.name}.conf"
    for h, d in read_ini(root, ours, "Defaults").items():
        if h in hierarchies:
            s.defaults[h] = d
        else:
            warn(f"ignoring [Defaults] {h}= in {ours}: not a hierarchy of {cls.name}")
    for h, d in (defaults or {}).items():
        h = h or ("/etc" if cls.name == "confext" else "")
        if h in hierarchies:
            s.defaults[h] = d
    keep = read_ini(root, ours, "Cleanup").get("KeepDefaults", "")
    s.keep_defaults = tuple(keep.split())
    return s


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
