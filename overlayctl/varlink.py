"""The io.systemd.sysext varlink service: overlayctl's second front end, beside cli.py.

systemd-sysext (v255 and later) serves the interface io.systemd.sysext when it is started as a
varlink service: by socket activation with one file descriptor named "varlink"
(systemd-sysext.socket with Accept=yes, or `varlinkctl call exec:PATH ...`), or with
$SYSTEMD_VARLINK_LISTEN. cli.main() hands over to main() here in that case; nothing on the
merge path imports this module otherwise.

The protocol (https://varlink.org), as systemd's sd-varlink speaks it:
* messages are JSON objects, each terminated by a NUL byte, over a unix stream socket;
* a call is {"method": "iface.Method", "parameters": {...}, "more": bool, "oneway": bool};
  a reply is {"parameters": {...}} (the key is left out when there are none), with
  "continues": true on every reply of a "more" call but the last; an error is
  {"error": "iface.Name", "parameters": {...}};
* "oneway": the method runs and nothing is sent back;
* a malformed message (not JSON, not an object, an unknown key, no method, "more" together
  with "oneway") ends the connection without a reply;
* parameters are checked against the interface description before the method runs: each
  declared input field in declared order (a wrong type, or null for a field that is not
  nullable, gives org.varlink.service.InvalidParameter with that field), then the keys that
  no field of the method declares, in the order they came; then, as the method's own
  dispatch does, a key that is no input field or whose value is null (in the order they
  came). A method marked "[Requires 'more' flag]" called without it gives
  org.varlink.service.ExpectedMore; an unknown method org.varlink.service.MethodNotFound;
  a failure inside a method io.systemd.System {origin, errno, errnoName}.

The interface descriptions are systemd 262's, byte for byte (varlinkctl introspect prints the
same text for both tools). The calls into overlayctl's engine are all in the adapter section
below (_options, _settings, _merge, _unmerge, _list), so that a change of the engine's API is
one edit there.
"""

from __future__ import annotations

import errno as errnos
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field

from overlayctl import __version__
from overlayctl.errors import OverlayctlError, die
from overlayctl.kernel import birth_time_us

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from overlayctl.vocab import MutableMode

BUFFER_MAX = 16 * 1024 * 1024        # sd-varlink's VARLINK_BUFFER_MAX: a longer message ends it
READ_SIZE = 64 * 1024

METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
INTERFACE_NOT_FOUND = "org.varlink.service.InterfaceNotFound"
INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
PERMISSION_DENIED = "org.varlink.service.PermissionDenied"
EXPECTED_MORE = "org.varlink.service.ExpectedMore"
SYSTEM = "io.systemd.System"
NO_IMAGES_FOUND = "io.systemd.sysext.NoImagesFound"
ALREADY_MERGED = "io.systemd.sysext.AlreadyMerged"


def _idl(text: str) -> str:
    """Interface text as written here (4-space indents) -> as served (tab indents)."""
    return "".join("\t" + line[4:] if line.startswith("    ") else line
                   for line in text.splitlines(keepends=True))


# --- interface descriptions (systemd 262) --------------------------------------------------

IO_SYSTEMD_SYSEXT = _idl("""\
interface io.systemd.sysext

type ImageClass(
    sysext,
    confext
)

type ImageType(
    directory,
    subvolume,
    raw,
    block,
    mstack
)

method Merge(
    class: ?ImageClass,
    force: ?bool,
    noReload: ?bool,
    noexec: ?bool,
    # Controls whether interactive authentication (via polkit) shall be allowed. If unspecified defaults to false.
    allowInteractiveAuthentication: ?bool
) -> ()

method Unmerge(
    class: ?ImageClass,
    noReload: ?bool,
    # Controls whether interactive authentication (via polkit) shall be allowed. If unspecified defaults to false.
    allowInteractiveAuthentication: ?bool
) -> ()

method Refresh(
    class: ?ImageClass,
    force: ?bool,
    noReload: ?bool,
    alwaysRefresh: ?bool,
    noexec: ?bool,
    # Controls whether interactive authentication (via polkit) shall be allowed. If unspecified defaults to false.
    allowInteractiveAuthentication: ?bool
) -> ()

# [Requires 'more' flag]
method List(
    class: ?ImageClass,
    # Controls whether interactive authentication (via polkit) shall be allowed. If unspecified defaults to false.
    allowInteractiveAuthentication: ?bool
) -> (
    Class: ImageClass,
    Type: ImageType,
    Name: string,
    Path: ?string,
    ReadOnly: bool,
    CreationTimestamp: ?int,
    ModificationTimestamp: ?int,
    Usage: ?int,
    UsageExclusive: ?int,
    Limit: ?int,
    LimitExclusive: ?int
)

error NoImagesFound()

error AlreadyMerged(
    hierarchy: string
)
""")  # noqa: E501

IO_SYSTEMD_SYSUPDATE_NOTIFY = _idl("""\
interface io.systemd.SysUpdate.Notify

type Resource(
    transfer: string,
    path: ?string
)

method OnCompletedUpdate(
    component: ?string,
    version: ?string,
    resources: ?[]Resource
) -> ()
""")

IO_SYSTEMD = _idl("""\
interface io.systemd

# Local error if a Varlink connection is disconnected (this never crosses the wire and is synthesized locally only).
error Disconnected()

# A method call time-out has been reached (also synthesized locally, does not cross wire)
error TimedOut()

# Some form of protocol error (also synthesized locally, does not cross wire)
error Protocol()

# A generic Linux system error ("errno"s).
error System(
    # The origin of this system error, typically 'linux' to indicate Linux error numbers.
    origin: ?string,
    # The Linux error name, i.e. ENOENT, EHWPOISON or similar.
    errnoName: ?string,
    # The numeric Linux error number. Typically the name is preferable, if specified.
    errno: ?int
)
""")  # noqa: E501

ORG_VARLINK_SERVICE = _idl("""\
# General Varlink service interface
interface org.varlink.service

# Get service meta information
method GetInfo() -> (
    # String identifying the vendor of this service
    vendor: string,
    # String identifying the product implementing this service
    product: string,
    # Version string of this product
    version: string,
    # Web URL pointing to additional information about this service
    url: string,
    # List of interfaces implemented by this service
    interfaces: []string
)

# Get description of an implemented interface in Varlink IDL format
method GetInterfaceDescription(
    # Name of interface to query interface description of
    interface: string
) -> (
    # Interface description in Varlink IDL format
    description: string
)

# Error returned if a method is called on an unknown interface
error InterfaceNotFound(
    # Name of interface that was called but does not exist
    interface: string
)

# Error returned if an unknown method is called on an known interface
error MethodNotFound(
    # Name of method that was called but does not exist
    method: string
)

# Error returned if a method is called that is known but not implemented
error MethodNotImplemented(
    # Name of method that was called but is not implemented
    method: string
)

# Error returned if a method is called with an invalid parameter
error InvalidParameter(
    # Name of the invalid parameter
    parameter: string
)

# General permission error
error PermissionDenied()

# A method was called with the 'more' flag off, but it may only be called with the flag turned on
error ExpectedMore()
""")


# --- the interface definition language, as far as these interfaces use it -------------------

@dataclass(frozen=True)
class Field:
    name: str
    type: str            # bool, int, float, string, object, or the name of a type
    nullable: bool = False
    array: bool = False  # []T
    map: bool = False    # [string]T


@dataclass
class Method:
    name: str
    inputs: list[Field]
    outputs: list[Field]
    requires_more: bool = False


@dataclass
class Interface:
    name: str
    description: str
    methods: dict[str, Method] = field(default_factory=dict)
    enums: dict[str, list[str]] = field(default_factory=dict)
    structs: dict[str, list[Field]] = field(default_factory=dict)
    errors: dict[str, list[Field]] = field(default_factory=dict)


_SYMBOL = re.compile(r"\b(type|method|error)\s+(\w+)\s*\(([^()]*)\)(?:\s*->\s*\(([^()]*)\))?")


def _field(text: str) -> Field:
    name, _, t = (s.strip() for s in text.partition(":"))
    nullable = t.startswith("?")
    t = t.removeprefix("?")
    array, mapped = t.startswith("[]"), t.startswith("[string]")
    t = t.removeprefix("[]").removeprefix("[string]")
    return Field(name, t, nullable, array, mapped)


def parse_interface(text: str) -> Interface:
    """The symbols of an interface description (comments dropped; anonymous nested types,
    which these interfaces do not use, are not understood)."""
    name = ""
    body: list[str] = []
    requires_more: set[str] = set()
    more_marker = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            more_marker = more_marker or s == "# [Requires 'more' flag]"
            continue
        if s.startswith("interface "):
            name = s.split()[1]
        elif s.startswith("method ") and more_marker:
            requires_more.add(s[len("method "):].split("(")[0].strip())
        if s:
            more_marker = False
        body.append(s)
    iface = Interface(name, text)
    for kind, sym, inner, outer in _SYMBOL.findall(" ".join(body)):
        items = [i.strip() for i in inner.split(",") if i.strip()]
        if kind == "type":
            if all(":" not in i for i in items):
                iface.enums[sym] = items
            else:
                iface.structs[sym] = [_field(i) for i in items]
        elif kind == "error":
            iface.errors[sym] = [_field(i) for i in items]
        else:
            outs = [_field(i) for i in outer.split(",") if i.strip()]
            iface.methods[sym] = Method(sym, [_field(i) for i in items], outs,
                                        sym in requires_more)
    return iface


def _valid_element(iface: Interface, t: str, v: Any) -> bool:
    if t == "bool":
        return isinstance(v, bool)
    if t == "int":   # sd-varlink takes strings too: integers over 53 bits are often sent so
        return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, str)
    if t == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if t == "string":
        return isinstance(v, str)
    if t == "object":
        return isinstance(v, dict)
    if t in iface.enums:
        return isinstance(v, str) and v in iface.enums[t]
    if t in iface.structs:
        return isinstance(v, dict) and _bad_field(iface, iface.structs[t], [], v) is None
    return True  # a type this interface does not define: not validated


def _valid(iface: Interface, f: Field, v: Any) -> bool:
    if v is None:
        return f.nullable
    if f.array:
        return isinstance(v, list) and all(_valid_element(iface, f.type, x) for x in v)
    if f.map:
        return isinstance(v, dict) and all(_valid_element(iface, f.type, x) for x in v.values())
    return _valid_element(iface, f.type, v)


def _bad_field(iface: Interface, fields: list[Field], others: list[Field],
               obj: dict[str, Any]) -> str | None:
    """The field sd-varlink's validation names for OBJ, or None if it passes: FIELDS in
    declared order, then keys that neither FIELDS nor OTHERS (a method's outputs) declare."""
    for f in fields:
        if not _valid(iface, f, obj.get(f.name)):
            return f.name
    known = {f.name for f in fields} | {f.name for f in others}
    return next((k for k in obj if k not in known), None)


def bad_parameter(iface: Interface, method: Method, params: dict[str, Any]) -> str | None:
    """The parameter that validation against the interface names, or None if it passes."""
    return _bad_field(iface, method.inputs, method.outputs, params)


def undispatchable(method: Method, params: dict[str, Any]) -> str | None:
    """The parameter a method's own dispatch table refuses after validation passed (a key that
    is only an output field, or null for any field), or None."""
    inputs = {f.name for f in method.inputs}
    return next((k for k, v in params.items() if k not in inputs or v is None), None)


# --- errors and the service ------------------------------------------------------------------

class VarlinkError(Exception):
    """An error reply: NAME and its PARAMETERS (None: the reply has no parameters key)."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters


def system_error(err: int) -> VarlinkError:
    params: dict[str, Any] = {"origin": "linux", "errno": err}
    if err in errnos.errorcode:
        params["errnoName"] = errnos.errorcode[err]
    return VarlinkError(SYSTEM, params)


def log(msg: str) -> None:
    from overlayctl import log as logger
    logger.error(msg)


@dataclass
class Call:
    params: dict[str, Any]
    more: bool = False
    peer_uid: int | None = None   # None: not known (stdio); the caller started us


# Methods that check their parameters themselves after validation, not with a dispatch table
# that answers InvalidParameter.
RAW_DISPATCH = {"org.varlink.service.GetInterfaceDescription",
                "io.systemd.SysUpdate.Notify.OnCompletedUpdate"}


class Service:
    """Method calls in, replies out; knows nothing about sockets."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.interfaces = {i.name: i for i in map(parse_interface,
                                                  (IO_SYSTEMD, IO_SYSTEMD_SYSUPDATE_NOTIFY,
                                                   IO_SYSTEMD_SYSEXT, ORG_VARLINK_SERVICE))}
        self.handlers: dict[str, Callable[[Call], list[dict[str, Any] | None]]] = {
            "org.varlink.service.GetInfo": self.get_info,
            "org.varlink.service.GetInterfaceDescription": self.get_interface_description,
            "io.systemd.sysext.Merge": self.merge,
            "io.systemd.sysext.Unmerge": self.unmerge,
            "io.systemd.sysext.Refresh": self.refresh,
            "io.systemd.sysext.List": self.list_images,
            "io.systemd.SysUpdate.Notify.OnCompletedUpdate": self.on_completed_update,
        }

    def call(self, method: str, call: Call) -> list[dict[str, Any] | None]:
        """The replies (parameters, or None for none) of one call; raises VarlinkError."""
        handler = self.handlers.get(method)
        if handler is None:
            raise VarlinkError(METHOD_NOT_FOUND, {"method": method})
        iface_name, _, name = method.rpartition(".")
        iface = self.interfaces.get(iface_name)
        m = iface.methods.get(name) if iface else None
        if iface is not None and m is not None:
            if m.requires_more and not call.more:
                raise VarlinkError(EXPECTED_MORE)
            bad = bad_parameter(iface, m, call.params)
            if bad is None and method not in RAW_DISPATCH:
                bad = undispatchable(m, call.params)
            if bad is not None:
                raise VarlinkError(INVALID_PARAMETER, {"parameter": bad})
        replies: list[dict[str, Any] | None] = self.call_engine(lambda: handler(call))
        return replies

    def call_engine(self, fn: Callable[[], Any]) -> Any:
        """FN's result; its failures as the varlink errors upstream answers."""
        try:
            return fn()
        except VarlinkError:
            raise
        except OverlayctlError as e:
            msg = e.message[0].lower() + e.message[1:] if e.message else e.message
            log(msg + (f" (hint: {e.hint})" if e.hint else ""))
            # Upstream merges in a child process and reports its failure as EPROTO.
            raise system_error(errnos.EPROTO) from None
        except OSError as e:
            log(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
            raise system_error(e.errno or errnos.EIO) from None
        except Exception as e:
            if os.environ.get("OVERLAYCTL_DEBUG") == "1":
                raise
            log(f"internal error: {e!r} (this is a bug; OVERLAYCTL_DEBUG=1 shows where)")
            raise system_error(errnos.EIO) from None

    # org.varlink.service

    def get_info(self, call: Call) -> list[dict[str, Any] | None]:
        return [{"vendor": "overlayctl", "product": "overlayctl (systemd-sysext compatible)",
                 "version": __version__,
                 "url": "file:///usr/share/doc/overlayctl/overlayctl.md",
                 "interfaces": sorted(self.interfaces)}]

    def get_interface_description(self, call: Call) -> list[dict[str, Any] | None]:
        if set(call.params) != {"interface"}:
            # An output field passes validation; sd_json_dispatch() then refuses it.
            raise system_error(errnos.EADDRNOTAVAIL)
        name = call.params["interface"]
        if name not in self.interfaces:
            raise VarlinkError(INTERFACE_NOT_FOUND, {"interface": name})
        return [{"description": self.interfaces[name].description}]

    # io.systemd.sysext

    def _privileged(self, call: Call) -> None:
        if os.geteuid() != 0:
            log("need to be privileged to merge or unmerge (run the service as root)")
            raise system_error(errnos.EPERM)
        if call.peer_uid not in (None, 0):
            # Upstream asks polkit; overlayctl has no polkit agent, so only root may change
            # the merge. allowInteractiveAuthentication changes nothing for root.
            raise VarlinkError(PERMISSION_DENIED)

    def merge(self, call: Call) -> list[dict[str, Any] | None]:
        self._privileged(call)
        p, o = call.params, self.opts
        _merge(o, p.get("class", o.cls), refresh=False, force=p.get("force", o.force),
               no_reload=p.get("noReload", o.no_reload), noexec=p.get("noexec", o.noexec),
               always_refresh=o.always_refresh)
        return [None]

    def refresh(self, call: Call) -> list[dict[str, Any] | None]:
        self._privileged(call)
        p, o = call.params, self.opts
        _merge(o, p.get("class", o.cls), refresh=True, force=p.get("force", o.force),
               no_reload=p.get("noReload", o.no_reload), noexec=p.get("noexec", o.noexec),
               always_refresh=p.get("alwaysRefresh", o.always_refresh))
        return [None]

    def unmerge(self, call: Call) -> list[dict[str, Any] | None]:
        self._privileged(call)
        p, o = call.params, self.opts
        _unmerge(o, p.get("class", o.cls), no_reload=p.get("noReload", o.no_reload))
        return [None]

    # io.systemd.SysUpdate.Notify (262: systemd-sysupdate-notify-sysext.socket)

    def on_completed_update(self, call: Call) -> list[dict[str, Any] | None]:
        """systemd-sysupdate finished an update: refresh both classes (configuration
        extensions first), as a refresh with the service's own options. Only root may
        ask; the parameters (what was updated) do not matter. Both classes are refreshed
        even when the first fails; the first failure is the reply."""
        if call.peer_uid not in (None, 0):
            from overlayctl import log as logger
            logger.debug("Invoked by unprivileged Varlink peer, refusing.")
            raise VarlinkError(PERMISSION_DENIED)
        self._privileged(call)
        o = self.opts
        first: Exception | None = None
        for cls in ("confext", "sysext"):
            def refresh(c: str = cls) -> None:
                _merge(o, c, refresh=True, force=o.force, no_reload=o.no_reload,
                       noexec=o.noexec, always_refresh=o.always_refresh)
            try:
                self.call_engine(refresh)
            except VarlinkError as e:
                first = first or e
        if first is not None:
            raise first
        return [None]

    def list_images(self, call: Call) -> list[dict[str, Any] | None]:
        cls = call.params.get("class", self.opts.cls)
        records: list[dict[str, Any] | None] = [image_record(cls, t, n, p)
                                                for t, n, p in _list(self.opts, cls)]
        if not records:
            raise VarlinkError(NO_IMAGES_FOUND)
        return records


# --- List records: what upstream's image_to_json() reports -----------------------------------

FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x10
BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272


def _ioctl_int(path: str, flags: int, request: int, size: int) -> int | None:
    import fcntl
    try:
        fd = os.open(path, flags | os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        return int.from_bytes(fcntl.ioctl(fd, request, bytes(size)), sys.byteorder)
    except OSError:
        return None
    finally:
        os.close(fd)


def image_record(cls: str, typ: str, name: str, path: str) -> dict[str, Any]:
    """One List reply: Type, Class, Name, Path, ReadOnly, and what upstream adds when it knows
    it (CreationTimestamp, ModificationTimestamp, Usage, UsageExclusive, Limit,
    LimitExclusive), in upstream's key order."""
    st = os.stat(path)
    read_only = (path == "/usr" or path.startswith("/usr/")
                 or bool(os.statvfs(path).f_flag & os.ST_RDONLY))
    crtime = mtime = 0
    usage = limit = None
    if typ == "directory":
        # Not the top directory's mtime: that is not when the tree last changed.
        attrs = _ioctl_int(path, os.O_DIRECTORY, FS_IOC_GETFLAGS, 4)
        read_only = read_only or bool(attrs and attrs & FS_IMMUTABLE_FL)
        crtime = birth_time_us(path)
    elif typ == "raw":
        read_only = read_only or not st.st_mode & 0o222
        crtime = birth_time_us(path)
        mtime = st.st_mtime_ns // 1000
        usage, limit = st.st_blocks * 512, st.st_size
    elif typ == "block":
        if not read_only:
            read_only = bool(_ioctl_int(path, 0, BLKROGET, 4))
        read_only = read_only or not st.st_mode & 0o222
        size = _ioctl_int(path, 0, BLKGETSIZE64, 8)
        if size:
            usage = limit = size
    rec: dict[str, Any] = {"Type": typ, "Class": cls, "Name": name, "Path": path,
                           "ReadOnly": read_only}
    if crtime:
        rec["CreationTimestamp"] = crtime
    if mtime:
        rec["ModificationTimestamp"] = mtime
    if usage is not None:
        rec["Usage"] = rec["UsageExclusive"] = usage
    if limit is not None:
        rec["Limit"] = rec["LimitExclusive"] = limit
    return rec


# --- adapter: the only place that calls into overlayctl's engine -----------------------------

@dataclass
class Options:
    """The service's command line (as upstream: its defaults for every call)."""

    root: str = "/"
    cls: str = "sysext"          # the class of a call without "class"
    force: bool = False
    no_reload: bool = False
    noexec: bool | None = None
    always_refresh: bool = False
    mutable: MutableMode | None = None   # --mutable=; None: environment, config, default
    image_policy: str | None = None
    defaults: dict[str, str] = field(default_factory=dict)


def _default_class() -> str:
    """Upstream serves the class of its binary: systemd-confext serves confext."""
    from overlayctl.personality import current
    return "confext" if current().classes == ("confext",) else "sysext"


def _options(argv: list[str], parser: Callable[[list[str]], Any]) -> Options:
    """The service's defaults from its command line: the options systemd-sysext takes, plus
    overlayctl's class word (`overlayctl confext`). Verbs are ignored, as upstream does once
    it knows it is a varlink service."""
    from overlayctl.settings import CLASSES, MUTABLE_MODES, parse_defaults_arg, parse_mutable
    args = parser(argv)
    if args.dry_run:
        raise die("--dry-run cannot be combined with the varlink service",
                  "call the methods without it, or use 'overlayctl merge --dry-run'")
    classes = [w for w in args.words if w in CLASSES]
    cls = classes[0] if classes else _default_class()
    mutable = None
    if args.mutable is not None:
        mutable = parse_mutable(args.mutable)
        if mutable is None:
            raise die(f"failed to parse argument to --mutable=: {args.mutable}",
                      f"use one of {', '.join(MUTABLE_MODES)}, or a boolean")
    if args.image_policy is not None:
        from overlayctl.settings import parse_image_policy
        parse_image_policy(args.image_policy)
    root = os.path.realpath(args.root)
    if not os.path.isdir(root):
        raise die(f"--root={args.root}: no such directory", "give an existing directory")
    return Options(root=root, cls=cls, force=args.force, no_reload=args.no_reload,
                   noexec=args.noexec, always_refresh=args.always_refresh, mutable=mutable,
                   image_policy=args.image_policy,
                   defaults=parse_defaults_arg(args.defaults, [cls]))


def _settings(o: Options, cls: str, *, force: bool = False, no_reload: bool = False,
              noexec: bool | None = None, always_refresh: bool = False) -> Any:
    from overlayctl.settings import load_settings
    return load_settings(o.root, cls, cli_mutable=o.mutable, force=force, noexec=noexec,
                         always_refresh=always_refresh, no_reload=no_reload,
                         image_policy=o.image_policy, defaults=o.defaults)


def _merge(o: Options, cls: str, *, refresh: bool, force: bool, no_reload: bool,
           noexec: bool | None, always_refresh: bool) -> None:
    """`overlayctl CLS merge|refresh` (cli.cmd_merge for one class); AlreadyMerged as the
    varlink error."""
    from overlayctl import engine
    from overlayctl.errors import AlreadyMerged
    s = _settings(o, cls, force=force, no_reload=no_reload, noexec=noexec,
                  always_refresh=always_refresh)
    try:
        engine.merge([s], refresh=refresh)
    except AlreadyMerged as e:
        raise VarlinkError(ALREADY_MERGED, {"hierarchy": e.hierarchy}) from None


def _unmerge(o: Options, cls: str, *, no_reload: bool) -> None:
    """`overlayctl CLS unmerge` (cli.cmd_unmerge for one class)."""
    from overlayctl import engine
    engine.unmerge([_settings(o, cls, no_reload=no_reload)])


def _list(o: Options, cls: str) -> list[tuple[str, str, str]]:
    """(type, name, path) of every image of CLS, as `overlayctl CLS list` finds them."""
    from overlayctl.images import discover
    return [(img.type, img.name, img.path) for img in discover(_settings(o, cls))]


# --- connections ---------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


class Connection:
    """One client: messages are read from RFD and replies written to WFD (the same socket,
    or stdin and stdout)."""

    def __init__(self, rfd: int, wfd: int, peer_uid: int | None,
                 sock: socket.socket | None = None) -> None:
        self.rfd, self.wfd, self.peer_uid, self.sock = rfd, wfd, peer_uid, sock
        self.buf = bytearray()

    @classmethod
    def for_socket(cls, sock: socket.socket) -> Connection:
        import struct
        sock.setblocking(True)
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            uid: int | None = struct.unpack("3i", creds)[1]
        except OSError:
            uid = None
        return cls(sock.fileno(), sock.fileno(), uid, sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            return
        for fd in {self.rfd, self.wfd}:
            os.close(fd)

    def readable(self, service: Service) -> bool:
        """Read what is there and answer every complete message; False: close it."""
        try:
            data = os.read(self.rfd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        while True:
            end = self.buf.find(b"\0")
            if end < 0:
                return len(self.buf) <= BUFFER_MAX
            raw = bytes(self.buf[:end])
            del self.buf[:end + 1]
            if not self.handle(raw, service):
                return False

    def send(self, msg: dict[str, Any]) -> bool:
        data = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self.wfd, data):]
        except OSError:
            return False
        return True

    def handle(self, raw: bytes, service: Service) -> bool:
        """Answer one message; False on a protocol error (the connection is then closed)."""
        try:
            msg = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                             parse_constant=_no_constant)
        except ValueError:     # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return False
        if not isinstance(msg, dict):
            return False
        method: str | None = None
        params: dict[str, Any] | None = None
        more = oneway = False
        for k, v in msg.items():
            if k == "method":
                if not isinstance(v, str):
                    return False
                method = v
            elif k == "parameters":
                if v is not None and not isinstance(v, dict):
                    return False
                params = v
            elif k in ("more", "oneway"):
                if more or oneway or not isinstance(v, bool):
                    return False
                more, oneway = (v, False) if k == "more" else (False, v)
            elif k == "upgrade":
                # No method here supports an upgrade; as sd-varlink, the call runs as usual.
                if not isinstance(v, bool):
                    return False
            else:
                return False
        if method is None:
            return False
        try:
            replies = service.call(method, Call(params or {}, more, self.peer_uid))
        except VarlinkError as e:
            if oneway:
                return True
            err: dict[str, Any] = {"error": e.name}
            if e.parameters is not None:
                err["parameters"] = e.parameters
            return self.send(err)
        if oneway:
            return True
        for i, r in enumerate(replies):
            reply: dict[str, Any] = {} if r is None else {"parameters": r}
            if more and i < len(replies) - 1:
                reply["continues"] = True
            if not self.send(reply):
                return False
        return True


def serve(service: Service, listeners: list[socket.socket], conns: list[Connection]) -> None:
    """Answer CONNS, and clients of LISTENERS, until the last connection is gone (as
    sd_varlink_server_loop_auto: exit on idle)."""
    import selectors
    sel = selectors.DefaultSelector()
    for s in listeners:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, None)
    live = set(conns)
    for c in conns:
        sel.register(c.rfd, selectors.EVENT_READ, c)
    if not live and not listeners:
        return
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                c = Connection.for_socket(sock)
                live.add(c)
                sel.register(c.rfd, selectors.EVENT_READ, c)
                continue
            c = key.data
            if not c.readable(service):
                sel.unregister(c.rfd)
                c.close()
                live.discard(c)
                if not live:
                    return


# --- activation ----------------------------------------------------------------------------

LISTEN_FDS_START = 3


def invoked(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Is this a varlink service invocation (sd_varlink_invocation)? $SYSTEMD_VARLINK_LISTEN,
    or exactly one fd passed to this process ($LISTEN_PID) named "varlink"."""
    env = os.environ if environ is None else environ
    return "SYSTEMD_VARLINK_LISTEN" in env or _passed(env)


def _passed(env: dict[str, str] | os._Environ[str]) -> bool:
    """One fd passed to this process, named "varlink" (sd_listen_fds_with_names)."""
    try:
        pid, n = int(env.get("LISTEN_PID", "")), int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return False
    if pid != os.getpid() or n <= 0:
        return False
    if n > 1:
        raise die(f"$LISTEN_FDS={n}: a varlink service takes exactly one socket",
                  "pass one socket, named 'varlink'")
    return env.get("LISTEN_FDNAMES", "").split(":") == ["varlink"]


def activation(environ: dict[str, str] | os._Environ[str] | None = None
               ) -> tuple[list[socket.socket], list[Connection]]:
    """The passed socket (listening or connected), and $SYSTEMD_VARLINK_LISTEN ("-": stdin
    and stdout; else a socket path to listen on)."""
    env = os.environ if environ is None else environ
    listeners: list[socket.socket] = []
    conns: list[Connection] = []
    listen = env.get("SYSTEMD_VARLINK_LISTEN")
    if _passed(env):
        try:
            sock = socket.socket(fileno=LISTEN_FDS_START)
        except OSError as e:
            raise die(f"the passed file descriptor {LISTEN_FDS_START} is not a socket "
                      f"({e.strerror})", "pass a unix stream socket") from None
        os.set_inheritable(sock.fileno(), False)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listeners.append(sock)
        else:
            conns.append(Connection.for_socket(sock))
    for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID"):
        if environ is None:
            os.environ.pop(k, None)
    if listen == "-":
        rfd, wfd = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        conns.append(Connection(rfd, wfd, None))
    elif listen:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(listen) and not os.path.isdir(listen):
                os.unlink(listen)
            old = os.umask(0o111)
            try:
                s.bind(listen)
            finally:
                os.umask(old)
            s.listen(socket.SOMAXCONN)
        except OSError as e:
            s.close()
            raise die(f"$SYSTEMD_VARLINK_LISTEN={listen}: cannot listen there ({e.strerror})",
                      "give a socket path in a writable directory, or '-'") from None
        listeners.append(s)
    return listeners, conns


def main(argv: list[str], parser: Callable[[list[str]], Any]) -> int | None:
    """Serve varlink if this is a varlink invocation; None if it is not (run the CLI).
    PARSER makes the command line's parser (cli.py's: the service takes the same options)."""
    try:
        if not invoked():
            return None
        opts = _options(argv, parser)
        if "SYSTEMD_EXEC_PID" in os.environ:
            from overlayctl import kcmdline
            if kcmdline.disabled(opts.cls):
                return 0
        listeners, conns = activation()
    except OverlayctlError as e:
        msg = e.message[0].lower() + e.message[1:] if e.message else e.message
        log(msg + (f" (hint: {e.hint})" if e.hint else ""))
        return 1
    # Replies go only through the connection: anything printed goes to the log (stderr).
    sys.stdout.flush()
    os.dup2(2, 1)
    serve(Service(opts), listeners, conns)
    return 0
