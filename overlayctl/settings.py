"""Where every setting comes from: the extension class, the hierarchies, the search
directories, and the mutable mode (command line > environment > config files)."""

from __future__ import annotations

import os

from overlayctl import log
from overlayctl.errors import die
from overlayctl.paths import chase, chase_strict
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


# The keys systemd-sysext/-confext know in their own section; the other sections of
# overlayctl's own files.
SYSTEMD_KEYS = ("Mutable", "ImagePolicy")
LONG_LINE_MAX = 1024 * 1024


class _ConfigFailed(Exception):
    """A problem for which systemd's config parser refuses the whole configuration."""


def read_ini(root: str, base: str, section: str,
             sections: dict[str, tuple[str, ...] | None] | None = None) -> dict[str, str]:
    """The last assignment of each key of SECTION (see read_ini_items)."""
    return {k: v for sec, k, v, _ in read_ini_items(root, base, sections or {section: None})
            if sec == section}


def read_ini_items(root: str, base: str, sections: dict[str, tuple[str, ...] | None]
                   ) -> list[tuple[str, str, str, str]]:
    """(section, key, value, where) of every assignment in BASE (the first of /etc, /run,
    /usr/local/lib, /usr/lib below ROOT that has it) and its BASE.d/*.conf drop-ins (a name
    in an earlier directory masks it in later ones; applied in name order), read as
    systemd's config parser does, with its warnings. SECTIONS names the known sections and
    their keys (None: any key). WHERE is FILE:LINE, for messages.

    As systemd, a problem in any file that its parser treats as fatal (a directory or a
    symlink loop where a file should be, an unreadable file, a line that is not UTF-8, a
    broken section header, an unparsable ImagePolicy=) makes the whole configuration
    ignored, with a warning; an unknown section or key, or a line that is no assignment, is
    warned about and skipped."""
    try:
        files = _config_files(root, base)
        out: list[tuple[str, str, str, str]] = []
        for f in files:
            out.extend(_parse_ini(f, sections))
        return out
    except _ConfigFailed as e:
        log.warning(f"{e}; ignoring all of {base} and its drop-ins, as systemd does")
        return []


def _config_file(root: str, rel: str, *, main: bool) -> str | None:
    """The host path of config file REL, None if it does not exist (or, as a drop-in, is a
    symlink loop: skipped with a warning, as systemd)."""
    import errno
    shown = os.path.join(root, rel.lstrip("/"))
    try:
        p = chase_strict(root, rel)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        if not main and e.errno == errno.ELOOP:
            log.warning(f"{shown}: too many levels of symbolic links; ignoring this drop-in")
            return None
        raise _ConfigFailed(f"cannot open {shown}: {e.strerror}") from None
    if os.path.isdir(p):
        raise _ConfigFailed(f"cannot open {shown}: it is a directory, not a file")
    if not os.path.isfile(p):
        raise _ConfigFailed(f"cannot open {shown}: it is not a regular file")
    return p


def _config_files(root: str, base: str) -> list[str]:
    files: list[str] = []
    for d in CONF_PARENTS:
        p = _config_file(root, f"{d}/{base}", main=True)
        if p:
            files.append(p)
            break
    dropins: dict[str, str] = {}
    for d in CONF_PARENTS:
        dd = chase(root, f"{d}/{base}.d", must_exist=True)
        if not dd or not os.path.isdir(dd):
            continue
        for name in os.listdir(dd):
            if name.endswith(".conf") and name not in dropins:
                dropins[name] = f"{d}/{base}.d/{name}"
    for n in sorted(dropins):
        p = _config_file(root, dropins[n], main=False)
        if p:
            files.append(p)
    return files


def _parse_ini(path: str, sections: dict[str, tuple[str, ...] | None]
               ) -> list[tuple[str, str, str, str]]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise _ConfigFailed(f"cannot read {path}: {e.strerror}") from None
    log.debug(f"Reading configuration file {path}.")
    out: list[tuple[str, str, str, str]] = []
    section: str | None = None
    ignored = False
    pending: str | None = None
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    todo: list[bytes | None] = [*lines, None]     # None: the end, to finish a continuation
    for n, raw in enumerate(todo, 1):
        where = f"{path}:{n}"
        if raw is None:
            if pending is None:
                break
            text, pending = pending, None
        else:
            if len(raw) > LONG_LINE_MAX:
                raise _ConfigFailed(f"{where}: line longer than {LONG_LINE_MAX} bytes")
            if raw.lstrip(b" \t")[:1] in (b"#", b";"):
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _ConfigFailed(f"{where}: not UTF-8 clean: "
                                    f"{raw.decode('utf-8', 'replace')}") from None
            if pending is not None:
                text, pending = pending + text, None
            stripped = text.rstrip("\\")
            if (len(text) - len(stripped)) % 2:
                pending = text[:-1] + " "
                continue
        line = text.strip(" \t")
        if not line:
            continue
        if line.startswith("["):
            if len(line) < 2 or not line.endswith("]"):
                raise _ConfigFailed(f"{where}: invalid section header '{line}'")
            section = line[1:-1]
            ignored = section not in sections
            if ignored and not section.startswith("X-"):
                log.warning(f"{where}: unknown section [{section}], ignoring it")
            continue
        if section is None:
            log.warning(f"{where}: assignment outside of any section, ignoring it")
            continue
        if ignored:
            continue
        key, eq, value = line.partition("=")
        if not eq:
            log.warning(f"{where}: missing '=', ignoring the line")
            continue
        key, value = key.strip(" \t"), value.strip(" \t")
        if not key:
            log.warning(f"{where}: missing key name before '=', ignoring the line")
            continue
        known = sections[section]
        if known is not None and key not in known:
            if not key.startswith("X-"):
                log.warning(f"{where}: unknown key '{key}' in section [{section}], ignoring it")
            continue
        if key == "ImagePolicy" and value:
            from overlayctl.policy import PolicyError, parse_policy
            try:
                parse_policy(value, graceful=True, source=f"{where}: ImagePolicy")
            except PolicyError as e:
                raise _ConfigFailed(e.message) from None
        out.append((section, key, value, where))
    return out


def read_config(root: str, cls: ExtClass) -> dict[str, str]:
    """[SysExt]/[ConfExt] of systemd's sysext.conf/confext.conf and drop-ins."""
    return {k: v for _, k, v, _ in read_ini_items(root, f"systemd/{cls.name}.conf",
                                                  {cls.section: SYSTEMD_KEYS})}


OWN_SECTIONS: dict[str, tuple[str, ...] | None] = {
    "Defaults": None,
    "Cleanup": ("KeepDefaults", "KeepDefaultsFile", "KeepUserDatabase", "IgnoreXattrs")}


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
    items = read_ini_items(root, f"systemd/{cls.name}.conf", {cls.section: SYSTEMD_KEYS})
    conf_policy, items = _config_policy(items, cls.name)
    conf = {k: v for _, k, v, _ in items}
    if source == "default":
        for _, key, value, where in items:
            if key != "Mutable":
                continue
            m = parse_mutable(value)
            if m is None:
                log.warning(f"{where}: cannot parse Mutable={value}, ignoring it "
                            f"(use one of {', '.join(MUTABLE_MODES)}, or a boolean)")
            else:
                # The last valid assignment wins, as in systemd's config parser.
                mutable, source = m, f"{cls.name}.conf"
    policy = conf_policy
    if image_policy is not None:
        policy = parse_image_policy(image_policy)
    ours = f"overlayctl/{cls.name}.conf"
    own = read_ini_items(root, ours, OWN_SECTIONS)
    dflt: dict[str, str] = {}
    for _, h, d, where in (i for i in own if i[0] == "Defaults"):
        if h in all_h:
            dflt[h] = d
        else:
            log.warning(f"{where}: ignoring [Defaults] {h}=: not a hierarchy of {cls.name}")
    for h, d in (defaults or {}).items():
        h = h or ("/etc" if cls.name == "confext" else "")
        if h in all_h:
            dflt[h] = d
    keep = next((v for sec, k, v, _ in reversed(own) if sec == "Cleanup" and k == "KeepDefaults"),
                "")
    log.debug(f"{cls.name}: mutable mode '{mutable}' (from {source}).")
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


def _config_policy(items: list[tuple[str, str, str, str]], cls_name: str
                   ) -> tuple[ImagePolicy | None, list[tuple[str, str, str, str]]]:
    """ImagePolicy= of the configuration files, parsed as systemd 262 parses it: unknown
    designators and flags are skipped, an empty value resets it. (A value it cannot parse
    at all made read_ini_items ignore the whole configuration already.)"""
    policy: ImagePolicy | None = None
    for _, key, value, where in items:
        if key != "ImagePolicy":
            continue
        if not value:
            policy = None
            continue
        from overlayctl.policy import parse_policy
        policy = parse_policy(value, graceful=True, source=f"{where}: ImagePolicy")
    return policy, items


USER_DATABASE = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


class CleanupSettings(Record):
    """[Cleanup] of overlayctl's CLASS.conf: what cleanup may undo besides identical copies
    (see docs/defaults.md, "cleanup", and Flatcar's initrd-setup-root)."""

    __slots__ = ("keep_defaults", "keep_defaults_file", "keep_user_database", "ignore_xattrs")
    keep_defaults: tuple[str, ...]     # KeepDefaults=: whiteouts of these paths are dropped
    keep_defaults_file: str | None     # KeepDefaultsFile=: more such paths, one a line
    keep_user_database: bool           # KeepUserDatabase=: also /etc/passwd, group, ...
    ignore_xattrs: frozenset[str]      # IgnoreXattrs=: not compared (security.selinux)

    def __init__(self, keep_defaults: tuple[str, ...] = (),
                 keep_defaults_file: str | None = None, keep_user_database: bool = False,
                 ignore_xattrs: frozenset[str] = frozenset()) -> None:
        self._fill(locals())

    def keep_paths(self, root: str) -> dict[str, str]:
        """Every path whose whiteout cleanup drops -> where it was named."""
        out = {p: "KeepDefaults" for p in self.keep_defaults}
        if self.keep_defaults_file:
            for p in _path_list(root, self.keep_defaults_file):
                out.setdefault(p, f"KeepDefaultsFile {self.keep_defaults_file}")
        if self.keep_user_database:
            for p in USER_DATABASE:
                out.setdefault(p, "KeepUserDatabase")
        return out


def _path_list(root: str, path: str) -> list[str]:
    """The paths in PATH (inside ROOT): one a line, as Flatcar's etc-no-whiteouts; empty
    lines and # comments skipped."""
    f = chase(root, path, must_exist=True)
    try:
        if f is None:
            raise FileNotFoundError(path)
        with open(f, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        log.warning(f"ignoring KeepDefaultsFile={path}: "
                    f"{e.strerror or 'no such file'} in {root}")
        return []
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("/"):
            log.warning(f"ignoring '{line}' in {path}: not an absolute path")
            continue
        out.append(os.path.normpath(line))
    return out


def load_cleanup(root: str, class_name: str) -> CleanupSettings:
    """[Cleanup] of overlayctl/CLASS.conf (and its drop-ins)."""
    ours = f"overlayctl/{class_name}.conf"
    conf = read_ini(root, ours, "Cleanup", OWN_SECTIONS)
    user_db = False
    if "KeepUserDatabase" in conf:
        b = parse_boolean(conf["KeepUserDatabase"])
        if b is None:
            log.warning(f"ignoring KeepUserDatabase={conf['KeepUserDatabase']} in {ours}: "
                        "not a boolean")
        else:
            user_db = b
    return CleanupSettings(
        keep_defaults=tuple(conf.get("KeepDefaults", "").split()),
        keep_defaults_file=conf.get("KeepDefaultsFile") or None,
        keep_user_database=user_db,
        ignore_xattrs=frozenset(conf.get("IgnoreXattrs", "").split()))


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
