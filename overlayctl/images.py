"""Discovery of extension images in the search directories of a class."""

from __future__ import annotations

import os
import stat

from overlayctl.errors import die
from overlayctl.kernel import uname_architecture
from overlayctl.paths import chase, inside
from overlayctl.record import Record
from overlayctl.release import ReleaseLookup, find_extension_release, valid_image_name
from overlayctl.settings import ExtClass, Settings
from overlayctl.versions import version_key

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


def _tries(stem: str) -> tuple[int, str] | None:
    """(tries left, the stem without them) for a stem ending in +LEFT or +LEFT-DONE."""
    head, plus, tail = stem.rpartition("+")
    left, dash, done = tail.partition("-")
    if not plus or not left.isdigit() or (dash and not done.isdigit()):
        return None
    return int(left), head


def _vpick(root: str, vdir: str, base: str, suffix: str, want_dir: bool) -> str | None:
    """Pick the newest entry BASE_VERSION[_ARCH][+LEFT[-DONE]]SUFFIX in a .v directory."""
    arch = uname_architecture()
    best: tuple[str, bool, str] | None = None   # version, good, path
    try:
        entries = sorted(os.listdir(vdir))
    except OSError:
        return None
    for entry in entries:
        if not entry.startswith(base + "_") or (suffix and not entry.endswith(suffix)):
            continue
        stem = entry[len(base) + 1: len(entry) - len(suffix) if suffix else None]
        good = True
        tries = _tries(stem)
        if tries is not None:
            good = tries[0] > 0
            stem = tries[1]
        version, _, maybe_arch = stem.rpartition("_")
        if version and (maybe_arch in _ARCHES or maybe_arch == "any"):
            if maybe_arch not in (arch, "any"):
                continue
        else:
            version = stem
        if not version:
            continue
        path = chase(root, inside(root, os.path.join(vdir, entry)), must_exist=True)
        if path is None:
            continue
        if want_dir != os.path.isdir(path) or (not want_dir and not os.path.isfile(path)):
            continue
        if best is None or (good, version_key(version)) > (best[1], version_key(best[0])):
            best = (version, good, path)
    return best[2] if best else None


_ARCHES = {"x86-64", "x86", "arm64", "arm64-be", "arm", "arm-be", "ppc64-le", "ppc64", "ppc",
           "s390x", "s390", "riscv64", "riscv32", "loongarch64", "mips64", "mips", "alpha",
           "parisc", "sparc64", "sparc", "sh", "ia64", "arc", "cris", "m68k", "tilegx"}


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
        hd = chase(root, d, must_exist=True)
        if hd is None or not os.path.isdir(hd):
            continue
        for entry in sorted(os.listdir(hd)):
            img = _classify(root, settings.cls, entry, os.path.join(hd, entry))
            if img is None or not valid_image_name(img.name) or img.name in found:
                continue
            found[img.name] = img
    return sorted(found.values(), key=lambda i: version_key(i.name))


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

