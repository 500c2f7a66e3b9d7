"""Discovery of extension images in the search directories of a class."""

from __future__ import annotations

import os
import stat

from overlayctl import log
from overlayctl.errors import die
from overlayctl.kernel import uname_architecture
from overlayctl.paths import chase, chase_strict, inside
from overlayctl.record import Record
from overlayctl.release import ReleaseLookup, find_extension_release, valid_image_name
from overlayctl.settings import ExtClass, Settings
from overlayctl.versions import vercmp, version_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from overlayctl.verity import Protection


class Image(Record):
    """An extension found in a search directory. Discovery fills it in steps, each a
    replace(): found, then (raw images) mounted, then its release file read."""

    __slots__ = ("name", "type", "path", "entry", "mtime_us", "release", "source", "usr_root",
                 "protection")
    name: str
    type: str                 # directory, raw, block
    path: str                 # resolved host path
    entry: str                # the search-directory entry it was found as (host path)
    mtime_us: int
    release: ReleaseLookup | None
    source: str | None        # raw images: the image file; path is then its mounted root
    usr_root: bool            # the mounted root is the image's /usr (a /usr partition)
    protection: Protection | None   # raw images, once mounted: verity, signature, policy

    def __init__(self, name: str, type: str, path: str, entry: str, mtime_us: int = 0,
                 release: ReleaseLookup | None = None, source: str | None = None,
                 usr_root: bool = False, protection: Protection | None = None) -> None:
        self._fill(locals())

    def tree_path(self, path: str) -> str | None:
        """Host path of PATH (absolute, inside the image's tree), resolved inside the image;
        None if it is not there."""
        if not self.usr_root:
            return chase(self.path, path, must_exist=True)
        if path != "/usr" and not path.startswith("/usr/"):
            return None
        return chase(self.path, path[4:] or "/", must_exist=True)


def _strip_class_suffix(name: str, cls: ExtClass) -> str:
    suffix = f".{cls.name}"
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name


# systemd 262's version_is_valid(): a version is ASCII letters, digits and "-.~^" only, so
# "foo_ 2" or "foo_1,5" is no version at all and never picked. (No regex: start-up time.)
_VERSION_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.~^-")
_DIGITS = frozenset("0123456789")


def _valid_version(v: str) -> bool:
    return bool(v) and all(c in _VERSION_CHARS for c in v)


def _tries(tail: str) -> tuple[int, int] | None:
    """(left, done) for a "+LEFT" or "+LEFT-DONE" suffix (ASCII digits), else None."""
    if not tail.startswith("+"):
        return None
    left, dash, done = tail[1:].partition("-")
    if not left or any(c not in _DIGITS for c in left) or (dash and (
            not done or any(c not in _DIGITS for c in done))):
        return None
    return int(left), int(done or 0)
_UINT_MAX = 2**32 - 1

# systemd's architecture names (architecture_from_string), and the secondary architecture
# a native one also runs (ARCHITECTURE_SECONDARY).
_ARCHES = {"arm64", "arm64-be", "arm", "arm-be", "alpha", "arc", "arc-be", "cris", "x86-64",
           "x86", "ia64", "loongarch64", "m68k", "mips64-le", "mips64", "mips-le", "mips",
           "nios2", "parisc64", "parisc", "ppc64-le", "ppc64", "ppc", "ppc-le", "riscv32",
           "riscv64", "s390x", "s390", "sh64", "sh", "sparc64", "sparc", "tilegx"}
_SECONDARY = {"x86-64": "x86", "arm64": "arm", "arm64-be": "arm-be", "ppc64": "ppc",
              "ppc64-le": "ppc-le", "s390x": "s390"}


class _Candidate(Record):
    """One entry of a .v directory as systemd's vpick ranks it."""

    __slots__ = ("name", "version", "arch_rank", "tries_left", "tries_done", "path")
    name: str
    version: str
    arch_rank: int            # 0 native, 1 secondary, 2 no (or an unknown) architecture
    tries_left: int           # _UINT_MAX: no "+LEFT" counter
    tries_done: int
    path: str

    def __init__(self, name: str, version: str, arch_rank: int, tries_left: int,
                 tries_done: int, path: str) -> None:
        self._fill(locals())

    def better_than(self, other: _Candidate) -> bool:
        """vpick's order: entries with tries left, then the newer version, then the native
        architecture, then more tries left, then fewer tries done, then the larger name."""
        if (self.tries_left != 0) != (other.tries_left != 0):
            return self.tries_left != 0
        d = vercmp(self.version, other.version)
        if d:
            return d > 0
        for a, b in ((other.arch_rank, self.arch_rank), (self.tries_left, other.tries_left),
                     (other.tries_done, self.tries_done)):
            if a != b:
                return a > b
        return self.name.encode() > other.name.encode()


def _vpick(root: str, vdir: str, base: str, suffix: str, want_dir: bool) -> str | None:
    """The entry systemd's path_pick() takes from a .v directory: BASE_VERSION[_ARCH]
    [+LEFT[-DONE]]SUFFIX of the wanted type, ranked as _Candidate.better_than says."""
    arch = uname_architecture()
    prefs = [arch, _SECONDARY.get(arch), None]
    best: _Candidate | None = None
    try:
        entries = sorted(os.listdir(vdir))
    except OSError as err:
        log.debug(f"Failed to read versioned directory '{vdir}', ignoring it: {err.strerror}")
        return None
    for entry in entries:
        if not entry.startswith(base + "_") or (suffix and not entry.endswith(suffix)):
            continue
        e = entry[len(base) + 1: len(entry) - len(suffix) if suffix else None]
        left = done = _UINT_MAX
        plus = e.rfind("+")
        t = _tries(e[plus:]) if plus >= 0 else None
        if t is not None and t[0] <= _UINT_MAX and t[1] <= _UINT_MAX:
            left, done = t
            e = e[:plus]
        under = e.rfind("_")
        a = e[under + 1:] if under >= 0 and e[under + 1:] in _ARCHES else None
        if a not in prefs:
            log.debug(f"Found entry with architecture '{a}' which is not what we are looking "
                      "for, ignoring entry.")
            continue
        if under >= 0:
            e = e[:under]
        if not _valid_version(e):
            log.debug(f"Version string '{e}' of entry '{entry}' is invalid, ignoring entry.")
            continue
        path = chase(root, inside(root, os.path.join(vdir, entry)), must_exist=True)
        if path is None:
            continue
        if want_dir != os.path.isdir(path) or (not want_dir and not os.path.isfile(path)):
            log.debug(f"Inode '{os.path.join(vdir, entry)}' has wrong type, ignoring entry.")
            continue
        c = _Candidate(entry, e, prefs.index(a), left, done, path)
        if best is not None and not c.better_than(best):
            log.debug(f"Found entry '{entry}' but previously found entry '{best.name}' matches "
                      "better, hence skipping entry.")
            continue
        best = c
    if best is None:
        log.debug(f"Found versioned directory '{vdir}', without matching entry, skipping.")
        return None
    return best.path


def _classify(root: str, cls: ExtClass, entry_name: str, entry_path: str) -> Image | None:
    resolved = chase(root, inside(root, entry_path), must_exist=True)
    if resolved is None:
        return None        # dangling symlink
    try:
        st = os.stat(resolved)
    except OSError:
        return None
    mtime = st.st_mtime_ns // 1000
    if stat.S_ISREG(st.st_mode):
        if not entry_name.endswith(".raw"):
            return None
        name = _strip_class_suffix(entry_name[:-4], cls)
        return Image(name, "raw", resolved, entry_path, mtime)
    if stat.S_ISBLK(st.st_mode):
        return Image(entry_name, "block", resolved, entry_path, mtime)
    if not stat.S_ISDIR(st.st_mode):
        return None
    if entry_name.endswith(".v"):
        base = entry_name[:-2]
        want_dir = True
        suffix = ""
        if base.endswith(".raw"):
            base, want_dir, suffix = base[:-4], False, ".raw"
        base = _strip_class_suffix(base, cls)
        picked = _vpick(root, resolved, base, suffix, want_dir)
        if picked is None:
            return None
        pst = os.stat(picked)
        return Image(base, "directory" if want_dir else "raw", picked, entry_path,
                     pst.st_mtime_ns // 1000)
    if entry_name.endswith(".mstack"):
        return None
    return Image(_strip_class_suffix(entry_name, cls), "directory", resolved, entry_path, mtime)


def discover(settings: Settings) -> list[Image]:
    """Every image of the class, first search directory winning a name; sorted by version."""
    root = settings.root
    found: dict[str, Image] = {}
    for d in settings.search_dirs:
        hd = _search_dir(root, d)
        if hd is None:
            continue
        for entry in sorted(os.listdir(hd)):
            img = _classify(root, settings.cls, entry, os.path.join(hd, entry))
            if img is None:
                log.debug(f"Skipping directory entry '{entry}' in {d}, which doesn't look "
                          "like an image.")
                continue
            if not valid_image_name(img.name):
                log.debug(f"Skipping '{entry}' in {d}: '{img.name}' is no valid image name.")
                continue
            if img.name in found:
                log.debug(f"Skipping '{img.name}' in {d}: an image of that name was found in "
                          f"an earlier search directory ({found[img.name].entry}).")
                continue
            log.debug(f"Found {img.type} image '{img.name}' at {img.path}.")
            found[img.name] = img
    return sorted(found.values(), key=lambda i: version_key(i.name))


def _search_dir(root: str, d: str) -> str | None:
    """The host path of search directory D, None if it does not exist. Anything else that
    is not a directory fails discovery, as upstream ("Failed to discover images")."""
    import errno
    shown = os.path.join(root, d.lstrip("/")) if root != "/" else d
    try:
        hd = chase_strict(root, d)
        if not os.path.isdir(hd):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), hd)
        os.listdir(hd)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        what = {errno.ENOTDIR: "is not a directory",
                errno.ELOOP: "is a symlink loop (too many levels of symbolic links)"}.get(
                    e.errno or 0, f"cannot be read ({e.strerror})")
        raise die(f"failed to discover images: the search directory {shown} {what}",
                  f"make {shown} a directory of extension images, or remove it") from None
    return hd


def read_metadata(settings: Settings, img: Image) -> Image:
    """The image with its release file read (raw ones must be mounted first); refuse a
    sysext directory with os-release."""
    if img.type not in ("directory", "raw", "block"):
        return img
    if settings.cls.name == "sysext" and img.type == "directory":
        osr = img.tree_path("/usr/lib/os-release")
        if osr is not None and os.path.lexists(osr):
            raise die(f"extension '{img.name}' ({img.path}) contains usr/lib/os-release, which "
                      "only the host may have",
                      "remove usr/lib/os-release from the extension "
                      "(--force does not override this)")
    rel_dir = img.tree_path("/" + settings.cls.info.release_dir)
    return img.replace(release=(
        find_extension_release(os.path.dirname(rel_dir), img.name, settings.cls.info,
                               release_dir=os.path.basename(rel_dir))
        if rel_dir else ReleaseLookup(None)))

