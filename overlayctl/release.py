"""os-release and extension-release files: parsing, lookup inside an image, and the
compatibility check of an extension against the host."""

from __future__ import annotations

import os

from overlayctl.errors import die
from overlayctl.kernel import uname_architecture
from overlayctl.paths import chase
from overlayctl.record import Record

_KEY_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_KEY_CHARS = _KEY_START | frozenset("0123456789")


def _valid_key(key: str) -> bool:
    """An environment-variable name: [A-Za-z_][A-Za-z0-9_]* (no regex: start-up time)."""
    return bool(key) and key[0] in _KEY_START and all(c in _KEY_CHARS for c in key)
_TRUE = {"1", "yes", "y", "true", "t", "on"}
_FALSE = {"0", "no", "n", "false", "f", "off"}


def parse_boolean(value: str) -> bool | None:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def _unquote(value: str) -> str:
    r"""Shell-like quoting as systemd's env-file parser takes it: single quotes are literal,
    double quotes unescape \\ \" \` \$, outside quotes a backslash escapes anything."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(value):
        c = value[i]
        nxt = value[i + 1] if i + 1 < len(value) else ""
        if quote == "'":
            if c == "'":
                quote = None
            else:
                out.append(c)
        elif quote == '"':
            if c == '"':
                quote = None
            elif c == "\\" and nxt in ('"', "\\", "`", "$"):
                out.append(nxt)
                i += 1
            else:
                out.append(c)
        elif c in "'\"":
            quote = c
        elif c == "\\" and nxt:
            out.append(nxt)
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)


def parse_env_text(text: str) -> dict[str, str]:
    """KEY=VALUE lines as in os-release(5): comments, quotes, backslash escapes."""
    result: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _valid_key(key):
            continue
        result[key] = _unquote(value.strip())
    return result


def parse_env_file(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_env_text(f.read())


class ClassInfo(Record):
    """What differs between system and configuration extensions."""

    __slots__ = ("name", "release_dir", "level_key", "scope_key")
    name: str                 # "sysext" / "confext"
    release_dir: str          # inside an image
    level_key: str
    scope_key: str

    def __init__(self, name: str, release_dir: str, level_key: str, scope_key: str) -> None:
        self._fill(locals())


def host_os_release(root: str) -> dict[str, str]:
    override = os.environ.get("SYSTEMD_OS_RELEASE")
    candidates = [override] if override else ["/etc/os-release", "/usr/lib/os-release"]
    for c in candidates:
        p = chase(root, c, must_exist=True) if not override else c
        if p and os.path.isfile(p):
            return parse_env_file(p)
    return {}


def _cut_version(name: str) -> str:
    for suffix in (".sysext.raw", ".confext.raw", ".raw"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    cut = min((i for i in (name.find("_"), name.find("+")) if i >= 0), default=-1)
    return name[:cut] if cut >= 0 else name


def valid_image_name(name: str) -> bool:
    if not name or name in (".", "..") or "/" in name:
        return False
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return False
    if name.startswith(".#"):
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strict_xattr_false(path: str) -> bool:
    try:
        value = os.getxattr(path, "user.extension-release.strict")
    except OSError:
        return False
    return parse_boolean(value.decode("utf-8", "replace")) is False


class ReleaseLookup(Record):
    """The extension-release file found for an image (path None: none), and its content."""

    __slots__ = ("path", "data")
    path: str | None
    data: dict[str, str]

    def __init__(self, path: str | None, data: dict[str, str] | None = None) -> None:
        self._fill({"path": path, "data": data or {}})


def find_extension_release(image_root: str, image_name: str, cls: ClassInfo,
                           release_dir: str | None = None) -> ReleaseLookup:
    """Locate and read the extension-release file of an image (strict matching). RELEASE_DIR
    (relative to IMAGE_ROOT) overrides the class's usual place."""
    d = chase(image_root, release_dir or cls.release_dir, must_exist=True)
    if d is None or not os.path.isdir(d):
        return ReleaseLookup(None)
    exact = os.path.join(d, "extension-release." + image_name)
    if os.path.isfile(exact):
        return ReleaseLookup(exact, parse_env_file(exact))
    cut = _cut_version(image_name)
    accepted: list[str] = []
    for entry in sorted(os.listdir(d)):
        if not entry.startswith("extension-release."):
            continue
        x = entry[len("extension-release."):]
        p = os.path.join(d, entry)
        if not valid_image_name(x) or not os.path.isfile(p) or os.path.islink(p):
            continue
        if x == cut or _strict_xattr_false(p):
            accepted.append(p)
    if len(accepted) > 1:
        raise die(f"{image_root}: more than one extension-release file matches '{image_name}' "
                  f"in {d}", "keep exactly one extension-release.NAME file")
    if not accepted:
        return ReleaseLookup(None)
    return ReleaseLookup(accepted[0], parse_env_file(accepted[0]))


def check_compatible(ext: dict[str, str] | None, host: dict[str, str], cls: ClassInfo,
                     host_scope: str, image_name: str) -> str | None:
    """None if the extension fits the host, else the reason it is ignored."""
    if ext is None:
        return "no extension-release file"
    scopes = ext.get(cls.scope_key)
    allowed = scopes.split() if scopes is not None else ["system", "portable"]
    if host_scope not in allowed:
        return f"{cls.scope_key} does not include '{host_scope}'"
    arch = ext.get("ARCHITECTURE")
    if arch and arch != "_any" and arch != uname_architecture():
        return f"ARCHITECTURE={arch} does not match '{uname_architecture()}'"
    ext_id = ext.get("ID", "")
    if not ext_id:
        return "no ID= in extension-release"
    if ext_id == "_any":
        return None
    host_id = host.get("ID", "")
    if ext_id != host_id and ext_id not in host.get("ID_LIKE", "").split():
        return f"ID={ext_id} does not match host ID={host_id}"
    host_version = host.get("VERSION_ID", "")
    host_level = host.get(cls.level_key, "")
    if not host_version and not host_level:
        return None
    ext_level = ext.get(cls.level_key, "")
    if host_level and ext_level:
        if host_level != ext_level:
            return f"{cls.level_key}={ext_level} does not match host {cls.level_key}={host_level}"
        return None
    if host_version:
        ext_version = ext.get("VERSION_ID", "")
        if ext_version != host_version:
            return (f"VERSION_ID={ext_version or '(none)'} does not match host "
                    f"VERSION_ID={host_version}")
    return None


