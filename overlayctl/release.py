"""os-release and extension-release files: parsing, lookup inside an image, and the
compatibility check of an extension against the host."""

from __future__ import annotations

import os

from overlayctl import log
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


# systemd's read_full_file() reads at most READ_FULL_BYTES_MAX (64 MiB - 1 byte); a longer
# os-release or extension-release file is refused, without reading it.
READ_FULL_BYTES_MAX = 64 * 1024 * 1024 - 1
_CHUNK = 1 << 20

_PRE_KEY, _IN_KEY, _PRE_VALUE, _VALUE, _VALUE_ESC, _SQ, _DQ, _DQ_ESC, _COMMENT = range(9)
_NEWLINE = b"\n\r"
_WS = frozenset(b" \t\n\r")
_BLANK = frozenset(b" \t")


class _Runs:
    """Where runs of bytes end in one chunk, without regular expressions (importing re
    costs milliseconds at every boot): the next position of any of some bytes, with each
    byte's next position remembered, so a whole chunk is scanned in linear time."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.n = len(data)
        self.next: dict[int, int] = {}

    def until(self, i: int, stops: bytes) -> int:
        """The first position >= I holding one of STOPS (the chunk's length if none)."""
        best = self.n
        for c in stops:
            p = self.next.get(c, -1)
            if p < i:
                p = self.data.find(c, i)
                p = self.n if p < 0 else p
                self.next[c] = p
            if p < best:
                best = p
        return best

    def skip(self, i: int, chars: frozenset[int]) -> int:
        """The first position >= I not holding one of CHARS."""
        data, n = self.data, self.n
        while i < n and data[i] in chars:
            i += 1
        return i


class EnvFileError(ValueError):
    """An env file systemd refuses as a whole (too large, a NUL byte, invalid UTF-8)."""


class _EnvParser:
    """systemd's env-file reader (parse_env_file_internal), fed in chunks so that a large
    file is never held in memory: KEY=VALUE assignments; '#' or ';' starts a comment only
    where a key could start; a value may be single- or double-quoted (and quotes may span
    lines: an unclosed quote runs to the end of the file), unquoted backslashes escape the
    next character (a backslash-newline joins lines), and unquoted trailing whitespace is
    dropped. Keys are not validated; the last assignment of a key wins."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = _PRE_KEY
        self.key = bytearray()
        self.value = bytearray()
        self.keep = 0             # value bytes from quotes or escapes: never stripped
        self.line = 1
        self.out: dict[str, str] = {}

    def _push(self, strip: bool) -> None:
        key = bytes(self.key).rstrip(b" \t")
        value = bytes(self.value)
        if strip:
            value = value[:self.keep] + value[self.keep:].rstrip(b" \t")
        try:
            k = key.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvFileError(f"invalid UTF-8 in key on line {self.line}") from None
        try:
            v = value.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvFileError(f"invalid UTF-8 in the value of {k} on line {self.line}") \
                from None
        self.out.pop(k, None)
        self.out[k] = v
        self.key = bytearray()
        self.value = bytearray()
        self.keep = 0

    def feed(self, data: bytes) -> None:
        if b"\0" in data:
            raise EnvFileError("it contains a NUL byte")
        i, n = 0, len(data)
        runs = _Runs(data)
        while i < n:
            st = self.state
            if st == _PRE_KEY:
                j = runs.skip(i, _WS)
                self.line += data.count(b"\n", i, j)
                i = j
                if i == n:
                    break
                c = data[i]
                i += 1
                if c in b"#;":
                    self.state = _COMMENT
                else:
                    self.state = _IN_KEY
                    self.key = bytearray((c,))
            elif st == _COMMENT:
                j = runs.until(i, _NEWLINE)
                if j == n:
                    break
                self.line += 1
                i = j + 1
                self.state = _PRE_KEY
            elif st == _IN_KEY:
                j = runs.until(i, b"=\n\r")
                self.key += data[i:j]
                i = j
                if i == n:
                    break
                c = data[i]
                i += 1
                if c == 0x3D:           # '='
                    self.state = _PRE_VALUE
                    self.value = bytearray()
                    self.keep = 0
                else:                   # a line without '=': not an assignment
                    self.line += 1
                    self.state = _PRE_KEY
                    self.key = bytearray()
            elif st == _PRE_VALUE:
                i = runs.skip(i, _BLANK)
                if i == n:
                    break
                c = data[i]
                i += 1
                if c in _NEWLINE:
                    self._push(strip=False)
                    self.line += 1
                    self.state = _PRE_KEY
                elif c == 0x27:         # '
                    self.state = _SQ
                elif c == 0x22:         # "
                    self.state = _DQ
                elif c == 0x5C:         # backslash
                    self.state = _VALUE_ESC
                else:
                    self.value.append(c)
                    self.state = _VALUE
            elif st == _VALUE:
                j = runs.until(i, b"\n\r\\")
                self.value += data[i:j]
                i = j
                if i == n:
                    break
                c = data[i]
                i += 1
                if c == 0x5C:
                    self.state = _VALUE_ESC
                else:
                    self._push(strip=True)
                    self.line += 1
                    self.state = _PRE_KEY
            elif st == _VALUE_ESC:
                c = data[i]
                i += 1
                if c not in _NEWLINE:   # a backslash-newline joins the lines
                    self.value.append(c)
                else:
                    self.line += 1
                self.keep = len(self.value)
                self.state = _VALUE
            elif st == _SQ:
                j = data.find(b"'", i)
                end = n if j < 0 else j
                self.line += data.count(b"\n", i, end)
                self.value += data[i:end]
                if j < 0:
                    break
                i = j + 1
                self.keep = len(self.value)
                self.state = _PRE_VALUE
            elif st == _DQ:
                j = runs.until(i, b'"\\')
                self.line += data.count(b"\n", i, j)
                self.value += data[i:j]
                i = j
                if i == n:
                    break
                c = data[i]
                i += 1
                if c == 0x22:
                    self.keep = len(self.value)
                    self.state = _PRE_VALUE
                else:
                    self.state = _DQ_ESC
            else:                       # _DQ_ESC
                c = data[i]
                i += 1
                if c in b'"\\`$':
                    self.value.append(c)
                elif c != 0x0A:         # other escapes keep their backslash, as in sh
                    self.value += bytes((0x5C, c))
                self.keep = len(self.value)
                self.state = _DQ
        self.keep = min(self.keep, len(self.value))

    def finish(self) -> dict[str, str]:
        if self.state in (_PRE_VALUE, _VALUE, _VALUE_ESC, _SQ, _DQ, _DQ_ESC):
            self._push(strip=self.state == _VALUE)
        return self.out


def parse_env_bytes(data: bytes, name: str = "") -> dict[str, str]:
    """KEY=VALUE assignments of an env file (os-release(5)), as systemd reads them; raises
    EnvFileError where systemd refuses the whole file."""
    p = _EnvParser(name)
    p.feed(data)
    return p.finish()


def parse_env_text(text: str) -> dict[str, str]:
    """parse_env_bytes() of TEXT, keeping only keys that are variable names (no lookup can
    see any other)."""
    env = parse_env_bytes(text.encode("utf-8", "surrogatepass"))
    return {k: v for k, v in env.items() if _valid_key(k)}


def parse_env_file(path: str) -> dict[str, str]:
    """An env file read as systemd reads it: refused (EnvFileError) when it is larger than
    systemd's limit, without reading it, or when it holds a NUL byte or invalid UTF-8.
    Read in chunks: memory stays small whatever the file's size."""
    import stat
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size > READ_FULL_BYTES_MAX:
            raise EnvFileError(f"it is larger than {READ_FULL_BYTES_MAX + 1 >> 20} MiB "
                               f"({st.st_size} bytes)")
        p = _EnvParser(path)
        total = 0
        while chunk := f.read(_CHUNK):
            total += len(chunk)
            if total > READ_FULL_BYTES_MAX:
                raise EnvFileError(f"it is larger than {READ_FULL_BYTES_MAX + 1 >> 20} MiB")
            p.feed(chunk)
        env = p.finish()
    return {k: v for k, v in env.items() if _valid_key(k)}


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
            try:
                return parse_env_file(p)
            except EnvFileError as e:
                raise die(f"cannot use the os-release file {p}: {e}",
                          "fix the file: systemd refuses it too") from None
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
    """The extension-release file found for an image (path None: none), and its content.
    PROBLEM: why a file that was found could not be used (path is then None)."""

    __slots__ = ("path", "data", "problem")
    path: str | None
    data: dict[str, str]
    problem: str | None

    def __init__(self, path: str | None, data: dict[str, str] | None = None,
                 problem: str | None = None) -> None:
        self._fill({"path": path, "data": data or {}, "problem": problem})


def _read_release(path: str) -> ReleaseLookup:
    """The lookup result of an extension-release file that was found: its content, or, where
    systemd would not use it (too large, NUL bytes, invalid UTF-8), why not."""
    try:
        data = parse_env_file(path)
    except EnvFileError as e:
        return ReleaseLookup(None, problem=f"{path} cannot be used: {e}")
    log.debug(f"Found extension-release file {path}.")
    return ReleaseLookup(path, data)


def find_extension_release(image_root: str, image_name: str, cls: ClassInfo,
                           release_dir: str | None = None) -> ReleaseLookup:
    """Locate and read the extension-release file of an image (strict matching). RELEASE_DIR
    (relative to IMAGE_ROOT) overrides the class's usual place."""
    d = chase(image_root, release_dir or cls.release_dir, must_exist=True)
    if d is None or not os.path.isdir(d):
        return ReleaseLookup(None)
    exact = os.path.join(d, "extension-release." + image_name)
    if os.path.isfile(exact):
        return _read_release(exact)
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
    return _read_release(accepted[0])


def shown(value: str) -> str:
    """VALUE for a one-line message: control characters (a newline an unclosed quote took
    in) escaped."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def check_compatible(ext: dict[str, str] | None, host: dict[str, str], cls: ClassInfo,
                     host_scope: str, image_name: str) -> str | None:
    """None if the extension fits the host, else the reason it is ignored."""
    reason = _incompatible(ext, host, cls, host_scope)
    return None if reason is None else shown(reason)


def _incompatible(ext: dict[str, str] | None, host: dict[str, str], cls: ClassInfo,
                  host_scope: str) -> str | None:
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


