"""commit: turn a hierarchy's local state into an extension (issue 13).

What is captured is the raw upper layer of each hierarchy of the class, relative to the
layers below it, exactly as overlayfs reads it: new and modified entries with their modes,
owners, xattrs and times; deleted entries as whiteouts (character devices 0/0); opaque
directories with trusted.overlay.opaque=y, so that the image, merged over the same layers,
hides what the upper hid; renamed (redirected) directories as plain directories with their
full content. Confexts and defaults below the upper are not copied: they stay their own
layers. The image gets an extension-release file with the host's ID and VERSION_ID (or
ID=_any), and is written as squashfs (mksquashfs), erofs (mkfs.erofs) or a directory, with
optional verity sidecars (veritysetup) and a PKCS#7 signature of the root hash (openssl).

The upper is never changed: directories and files are read with O_NOATIME; every regular
file is copied under a read lease (inuse.py), which a writer's open has to wait for; a file
open for writing is refused; and the whole upper is compared before and after the copy
(inode, type, mode, owner, size, mtime, ctime), the copy done again when something changed
meanwhile, and refused when it keeps changing. Everything is built in a hidden directory
next to the output (".#NAME...", which discovery skips, as upstream does) and renamed into
place at the end, sidecars before the image."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess

from overlayctl import engine, faults, inuse, local, log, state
from overlayctl.errors import die
from overlayctl.mountns import Locked
from overlayctl.paths import chase, inside
from overlayctl.release import host_os_release, valid_image_name
from overlayctl.resources import ExitStack
from overlayctl.settings import CLASSES, ExtClass, class_hierarchies, load_settings
from overlayctl.upper import (
    LowerDirs,
    classify,
    is_opaque,
    is_whiteout,
    lower_children,
    lower_dirs_below,
    overlay_xattr,
    redirect_of,
    redirected_dirs,
    upper_lookup,
    user_xattrs,
)
from overlayctl.versions import version_key

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

    from overlayctl.local import Stack
    from overlayctl.upper import LayerRef

FORMATS = ("squashfs", "erofs", "directory")
TOOLS = {"squashfs": ("mksquashfs", "squashfs-tools"), "erofs": ("mkfs.erofs", "erofs-utils")}
# The xattr namespaces each format keeps (mksquashfs drops others with a mere warning, e.g.
# POSIX ACLs; erofs keeps ACLs; a directory keeps whatever its file system keeps).
CARRIES: dict[str, tuple[str, ...] | None] = {
    "squashfs": ("user.", "trusted.", "security."),
    "erofs": ("user.", "trusted.", "security.", "system.posix_acl_access",
              "system.posix_acl_default"),
    "directory": None,
}
OPAQUE = "trusted.overlay.opaque"
ATTEMPTS = 3
O_NOATIME = getattr(os, "O_NOATIME", 0)


class Options:
    __slots__ = ("name", "fmt", "output", "any_id", "dry_run", "verity", "sign_key",
                 "certificate")

    def __init__(self, name: str, fmt: str = "squashfs", output: str | None = None,
                 any_id: bool = False, dry_run: bool = False, verity: bool = False,
                 sign_key: str | None = None, certificate: str | None = None) -> None:
        self.name = name
        self.fmt = fmt
        self.output = output
        self.any_id = any_id
        self.dry_run = dry_run
        self.verity = verity
        self.sign_key = sign_key
        self.certificate = certificate


class Item:
    """One entry of an upper, as it goes into the image."""

    __slots__ = ("st", "rel", "path", "lst", "kind", "change", "opaque", "origin", "lowers")

    def __init__(self, st: Stack, rel: str, path: str, lst: os.stat_result, kind: str,
                 change: str | None, opaque: bool = False, origin: str | None = None,
                 lowers: LowerDirs | None = None) -> None:
        self.st = st
        self.rel = rel                  # relative to the hierarchy
        self.path = path                # host path in the raw upper
        self.lst = lst
        self.kind = kind                # file, directory, symlink, whiteout, fifo, device,
        self.change = change            # renamed (a directory with its full content)
        self.opaque = opaque
        self.origin = origin            # renamed: where from (relative to the hierarchy)
        self.lowers = lowers            # renamed: the lower directories of its content

    @property
    def shown(self) -> str:
        return self.st.shown(self.rel)

    def as_json(self) -> dict[str, Any]:
        j: dict[str, Any] = {"path": self.shown, "type": self.kind, "change": self.change,
                             "opaque": self.opaque}
        if self.origin is not None:
            j["from"] = self.st.shown(self.origin)
        return j


# ---------------------------------------------------------------------------------------------
# Reading the upper without touching it


def _open_dir(path: str, dir_fd: int | None = None) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(path, flags, dir_fd=dir_fd)   # O_NOATIME needs the owner or root


def _open_file(path: str) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(path, flags | O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


Sig = tuple[int, int, int, int, int, int, int, int]


def _sig(st: os.stat_result) -> Sig:
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns, st.st_nlink)


def scan(upper: str) -> dict[str, os.stat_result]:
    """rel -> lstat of every entry of UPPER ("" for UPPER itself), parents first, sorted."""
    out: dict[str, os.stat_result] = {"": os.lstat(upper)}

    def walk(rel_dir: str, fd: int) -> None:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            st = e.stat(follow_symlinks=False)
            rel = os.path.join(rel_dir, e.name)
            out[rel] = st
            if stat.S_ISDIR(st.st_mode):
                cfd = _open_dir(e.name, dir_fd=fd)
                try:
                    walk(rel, cfd)
                finally:
                    os.close(cfd)

    fd = _open_dir(upper)
    try:
        walk("", fd)
    finally:
        os.close(fd)
    return out


def _changed(a: dict[str, os.stat_result], b: dict[str, os.stat_result]) -> str | None:
    """A path whose entry is not the same in both scans, or None."""
    for rel in sorted(set(a) | set(b)):
        sa, sb = a.get(rel), b.get(rel)
        if sa is None or sb is None or _sig(sa) != _sig(sb):
            return rel
    return None


# ---------------------------------------------------------------------------------------------
# What goes in


def _items(st: Stack, snap: dict[str, os.stat_result]) -> tuple[list[Item], list[dict[str, str]]]:
    """The entries of ST's upper that the image carries, and the ones skipped (orphan
    whiteouts, which hide nothing)."""
    assert st.upper is not None
    upper = st.upper
    changes = {c.rel: c.change for c in classify(upper, st.layers)}
    items: list[Item] = []
    skipped: list[dict[str, str]] = []
    covered: list[str] = []          # renamed directories, captured whole
    for rel, lst in snap.items():
        if not rel or any(rel.startswith(c + "/") for c in covered):
            continue
        if rel == st.cls.meta_dir:
            skipped.append({"path": st.shown(rel), "reason": "overlayctl's metadata dir"})
            covered.append(rel)
            continue
        p = os.path.join(upper, rel)
        mode = lst.st_mode
        if is_whiteout(p, lst):
            if st.lower(rel) is None:
                skipped.append({"path": st.shown(rel),
                                "reason": "orphan whiteout: nothing below to hide"})
            else:
                items.append(Item(st, rel, p, lst, "whiteout", "deleted"))
            continue
        change = changes.get(rel)
        if stat.S_ISDIR(mode):
            opaque = is_opaque(p)
            r = None if opaque else redirect_of(p)
            if r is not None:
                parts = [x for x in rel.split("/") if x]
                low = st.lower(rel)
                items.append(Item(st, rel, p, lst, "directory", "renamed",
                                  opaque=low is not None and stat.S_ISDIR(low.st.st_mode),
                                  origin=(r.strip("/") if r.startswith("/") else
                                          os.path.join(os.path.dirname(rel), r)),
                                  lowers=lower_dirs_below(upper, st.layers, parts)))
                covered.append(rel)
            else:
                items.append(Item(st, rel, p, lst, "directory", change, opaque=opaque))
        elif stat.S_ISREG(mode):
            items.append(Item(st, rel, p, lst, "file", change))
        elif stat.S_ISLNK(mode):
            items.append(Item(st, rel, p, lst, "symlink", change))
        elif stat.S_ISFIFO(mode):
            items.append(Item(st, rel, p, lst, "fifo", change))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            items.append(Item(st, rel, p, lst, "device", change))
        elif stat.S_ISSOCK(mode):
            raise die(f"cannot commit {st.shown(rel)}: it is a socket, which an image cannot "
                      "carry (it would be a dead endpoint)",
                      "sockets belong in /run; remove it from the upper while unmerged")
        else:
            raise die(f"cannot commit {st.shown(rel)}: unknown file type {mode:o}",
                      "remove it from the upper")
    return items, skipped


def _check_carry(path: str, shown: str, fmt: str) -> dict[str, bytes]:
    """The xattrs of PATH to copy; refuses what FMT cannot carry, and metadata-only copies."""
    if overlay_xattr(path, "metacopy") is not None:
        raise die(f"cannot commit {shown}: it is a metadata-only copy (metacopy=on), its data "
                  "lives in a lower layer", "merge without metacopy=on, or copy the file up "
                  "whole (e.g. rewrite it), then commit again")
    xa = user_xattrs(path)
    keep = CARRIES[fmt]
    if keep is not None:
        for n in xa:
            if not n.startswith(keep):
                kind = "POSIX ACLs" if n.startswith("system.posix_acl") else f"the xattr {n}"
                raise die(f"cannot commit {shown} as {fmt}: {fmt} cannot carry {kind}",
                          "use --format=erofs or --format=directory, or remove it")
    return xa


def _in_use(items: list[Item]) -> None:
    """Refuse a regular file that a process has open for writing."""
    files: dict[str, str] = {}
    idents: dict[tuple[int, int], str] = {}
    for it in items:
        if it.kind != "file":
            continue
        files[os.path.join(it.st.target, it.rel)] = it.shown
        if not it.path.startswith("/proc/"):
            files[it.path] = it.shown
        idents[(it.lst.st_dev, it.lst.st_ino)] = it.shown
    if not files:
        return
    busy = inuse.users(files, {}, idents)
    for shown, who in sorted(busy.items()):
        raise die(f"cannot commit {shown}: it is open for writing by {inuse.describe(who)}",
                  "close it (or stop the program), then commit again")


# ---------------------------------------------------------------------------------------------
# The stage: a private copy, built next to the output


class Stage:
    def __init__(self, top: str, fmt: str) -> None:
        self.top = top
        self.fmt = fmt
        self.links: dict[tuple[int, int], str] = {}
        self.dir_times: list[tuple[str, int, int]] = []

    def attrs(self, src: str, sst: os.stat_result, dst: str, xa: dict[str, bytes],
              extra: dict[str, bytes] | None = None) -> None:
        link = stat.S_ISLNK(sst.st_mode)
        os.chown(dst, sst.st_uid, sst.st_gid, follow_symlinks=False)
        if not link:
            os.chmod(dst, stat.S_IMODE(sst.st_mode))
        for k, v in {**xa, **(extra or {})}.items():
            try:
                os.setxattr(dst, k, v, follow_symlinks=False)
            except OSError as e:
                raise die(f"cannot keep the xattr {k} of {src} in the image: {e.strerror}",
                          "remove the xattr, or use another --format") from None
        if stat.S_ISDIR(sst.st_mode):
            self.dir_times.append((dst, sst.st_atime_ns, sst.st_mtime_ns))
        else:
            os.utime(dst, ns=(sst.st_atime_ns, sst.st_mtime_ns), follow_symlinks=False)

    def mkdir(self, src: str, sst: os.stat_result, dst: str, shown: str,
              opaque: bool = False) -> None:
        os.mkdir(dst, 0o700)
        self.attrs(src, sst, dst, _check_carry(src, shown, self.fmt),
                   {OPAQUE: b"y"} if opaque else None)

    def copy(self, src: str, sst: os.stat_result, dst: str, shown: str,
             lease: bool = True) -> None:
        """A non-directory entry, with its attributes (hard links kept as such)."""
        mode = sst.st_mode
        if stat.S_ISSOCK(mode):
            raise die(f"cannot commit {shown}: it is a socket, which an image cannot carry",
                      "sockets belong in /run")
        xa = _check_carry(src, shown, self.fmt)
        key = (sst.st_dev, sst.st_ino)
        if sst.st_nlink > 1 and not stat.S_ISDIR(mode) and key in self.links:
            os.link(self.links[key], dst, follow_symlinks=False)
            return
        if stat.S_ISREG(mode):
            self._copy_file(src, dst, shown, lease)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        else:
            os.mknod(dst, mode, sst.st_rdev)
        self.attrs(src, sst, dst, xa)
        if sst.st_nlink > 1:
            self.links[key] = dst

    def _copy_file(self, src: str, dst: str, shown: str, lease: bool) -> None:
        held = None
        if lease:
            held = inuse.try_lease(src)
            if held is None:
                raise die(f"cannot commit {shown}: it was opened for writing just now",
                          "close it, then commit again")
        try:
            # Under the lease, nobody can open the file for writing while it is copied (an
            # open for writing waits for it); a change before or after shows in the scan that
            # follows the copy.
            fd = _open_file(src)
            try:
                out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    while True:
                        chunk = os.read(fd, 1 << 20)
                        if not chunk:
                            break
                        os.write(out, chunk)
                finally:
                    os.close(out)
            finally:
                os.close(fd)
        finally:
            if held is not None:
                held.release()

    def finish(self) -> None:
        for dst, atime, mtime in reversed(self.dir_times):
            os.utime(dst, ns=(atime, mtime), follow_symlinks=False)


def _copy_merged(stage: Stage, layers: list[LayerRef], upper_d: str | None, lowers: LowerDirs,
                 dst: str, shown: str) -> None:
    """The full content of a renamed directory: its upper entries over what the layers below
    show at the place it came from (overlayfs's rules), as plain entries (no whiteouts)."""
    seen, subdirs = lower_children(lowers) if lowers else ({}, {})
    names = set(seen)
    if upper_d is not None:
        names |= set(os.listdir(upper_d))
    for n in sorted(names):
        here, sub_shown = os.path.join(dst, n), os.path.join(shown, n)
        up = os.path.join(upper_d, n) if upper_d is not None else None
        ust = os.lstat(up) if up is not None and os.path.lexists(up) else None
        if up is not None and ust is not None:
            if is_whiteout(up, ust):
                continue
            if stat.S_ISDIR(ust.st_mode):
                low = seen.get(n)
                if is_opaque(up):
                    sub: LowerDirs = []
                elif (r := redirect_of(up)) is not None:
                    sub = redirected_dirs(layers, lowers, r)
                else:
                    sub = subdirs.get(n, []) if low is not None and stat.S_ISDIR(
                        low.st.st_mode) else []
                stage.mkdir(up, ust, here, sub_shown)
                _copy_merged(stage, layers, up, sub, here, sub_shown)
            else:
                stage.copy(up, ust, here, sub_shown)
            continue
        e = seen[n]
        if stat.S_ISDIR(e.st.st_mode):
            stage.mkdir(e.path, e.st, here, sub_shown)
            _copy_merged(stage, layers, None, subdirs.get(n, []), here, sub_shown)
        else:
            stage.copy(e.path, e.st, here, sub_shown, lease=False)


def _fill(stage: Stage, st: Stack, items: list[Item]) -> None:
    """ST's captured entries into the stage, below its hierarchy's path."""
    assert st.upper is not None
    top = os.path.join(stage.top, st.hierarchy.lstrip("/"))
    _parents(stage.top, os.path.dirname(top))
    root_st = os.lstat(st.upper)
    stage.mkdir(st.upper, root_st, top, st.hierarchy)
    for it in items:
        dst = os.path.join(top, it.rel)
        if it.kind == "whiteout":
            os.mknod(dst, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif it.kind == "directory":
            stage.mkdir(it.path, it.lst, dst, it.shown, opaque=it.opaque)
            if it.change == "renamed":
                _copy_merged(stage, st.layers, it.path, it.lowers or [], dst, it.shown)
        else:
            stage.copy(it.path, it.lst, dst, it.shown)


def _parents(top: str, path: str) -> None:
    missing = []
    while path != top and not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)


# ---------------------------------------------------------------------------------------------
# The release file, the image, verity


def release_text(root: str, cls: ExtClass, any_id: bool) -> str:
    if any_id:
        return "ID=_any\n"
    host = host_os_release(root)
    if not host.get("ID"):
        raise die(f"the root {root} has no os-release with ID= to tag the extension with",
                  "add ID= to etc/os-release or usr/lib/os-release, or use --any")
    lines = [f"ID={host['ID']}"]
    for key in ("VERSION_ID", cls.info.level_key):
        if host.get(key):
            lines.append(f"{key}={host[key]}")
    return "\n".join(lines) + "\n"


def _write_release(stage: Stage, stacks: list[Stack], cls: ExtClass, name: str,
                   text: str) -> str:
    rel_dir = cls.info.release_dir                  # etc/extension-release.d
    d = os.path.join(stage.top, rel_dir)
    # Missing parents get the attributes of what the layers below show there, so that
    # the image does not change /usr/lib's mode when it is merged.
    missing = []
    p = d
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for q in reversed(missing):
        shown = "/" + os.path.relpath(q, stage.top)
        low = None
        for st in stacks:
            h = st.hierarchy.rstrip("/")
            if shown.startswith(h + "/"):
                low = st.lower(shown[len(h) + 1:])
        os.mkdir(q, 0o755)
        if low is not None and stat.S_ISDIR(low.st.st_mode):
            os.chown(q, low.st.st_uid, low.st.st_gid)
            os.chmod(q, stat.S_IMODE(low.st.st_mode))
        else:
            os.chmod(q, 0o755)
    f = os.path.join(d, f"extension-release.{name}")
    if os.path.lexists(f):
        log.warning(f"/{rel_dir}/extension-release.{name} of the upper is replaced by the "
                    "committed image's own release file.")
        os.unlink(f)
    with open(f, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(f, 0o644)
    return f


def _run(argv: list[str], what: str) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as e:
        raise die(f"cannot run {argv[0]}: {e.strerror}", f"install {what}") from None
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise die(f"{argv[0]} failed: {last[-1] if last else f'exit status {p.returncode}'}",
                  "check the free space of the output's file system")
    return p.stdout


def _build_image(stage_top: str, fmt: str, out: str) -> None:
    if fmt == "squashfs":
        _run(["mksquashfs", stage_top, out, "-noappend", "-quiet", "-no-progress", "-xattrs"],
             "squashfs-tools")
    else:
        _run(["mkfs.erofs", "--quiet", out, stage_top], "erofs-utils")
    os.chmod(out, 0o644)


def _verity(image: str, tree: str) -> bytes:
    out = _run(["veritysetup", "format", image, tree], "cryptsetup-bin (veritysetup)")
    for line in out.splitlines():
        if line.startswith("Root hash:"):
            return bytes.fromhex(line.split()[-1])
    raise die("veritysetup format printed no root hash", "check the cryptsetup version")


def _sign(root_hash: bytes, key: str, cert: str, out: str, tmpdir: str) -> bytes:
    msg = os.path.join(tmpdir, "roothash.txt")
    with open(msg, "w", encoding="ascii") as f:
        f.write(root_hash.hex())
    _run(["openssl", "smime", "-sign", "-binary", "-in", msg, "-signer", cert, "-inkey", key,
          "-outform", "der", "-out", out, "-nocerts", "-noattr"], "openssl")
    with open(out, "rb") as f:
        sig = f.read()
    from overlayctl.verity import verify_signature
    check = verify_signature(root_hash, sig, cert_files=[cert], environ={})
    if not check.ok:
        raise die(f"the signature made with {key} does not verify against {cert}: "
                  f"{check.reason}", "give the key that belongs to the certificate")
    return sig


def sidecar_base(image: str) -> str:
    """NAME.raw -> NAME, as systemd looks for NAME.verity and NAME.roothash."""
    return image[:-4] if image.endswith(".raw") else image


# ---------------------------------------------------------------------------------------------
# Where it sits among the other extensions


def _order(root: str, cls: ExtClass, name: str, captured: list[Item],
           stack: ExitStack) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """(names ordered below NAME, names above it, paths an extension above hides)."""
    s = load_settings(root, cls.name, dry_run=True, no_reload=True)
    with log.quiet():
        accepted = engine.accepted_images(s, stack)
    key = version_key(name)
    below = [i.name for i in accepted if version_key(i.name) < key]
    above = [i for i in accepted if version_key(i.name) > key]
    hidden: list[dict[str, str]] = []
    for img in above:
        for it in captured:
            tree = img.tree_path(it.st.hierarchy)
            if tree is None or not it.rel:
                continue
            look = upper_lookup(tree, it.rel)
            if look.blocker is not None:
                hidden.append({"path": it.shown, "by": img.name})
                continue
            if look.st is None or look.path is None:
                continue
            if it.kind == "directory" and stat.S_ISDIR(look.st.st_mode) and not is_opaque(
                    look.path) and not is_whiteout(look.path, look.st):
                continue
            hidden.append({"path": it.shown, "by": img.name})
    return below, [i.name for i in above], hidden


# ---------------------------------------------------------------------------------------------
# The verb


def _output(root: str, cls: ExtClass, opts: Options) -> str:
    if opts.output is None:
        where = "/var/lib/confexts" if cls.name == "confext" else "/var/lib/extensions"
        shown = f"{where}/{opts.name}" + ("" if opts.fmt == "directory" else ".raw")
    else:
        shown = opts.output
        if not shown.startswith("/"):
            raise die(f"--output={shown}: not an absolute path inside the root",
                      f"e.g. --output=/var/lib/{cls.name}s/{opts.name}.raw")
    parent = chase(root, os.path.dirname(shown.rstrip("/")) or "/")
    assert parent is not None
    out = os.path.join(parent, os.path.basename(shown.rstrip("/")))
    for h in class_hierarchies(cls):
        t = chase(root, h) or os.path.join(root, h.lstrip("/"))
        if out == t or out.startswith(t.rstrip("/") + "/"):
            raise die(f"the output {shown} lies inside {h}, which it captures",
                      f"write it outside {h}, e.g. to /var/lib/{cls.name}s")
    if os.path.lexists(out):
        raise die(f"{shown} exists already", "remove it first, or commit under another name")
    if opts.fmt != "directory":
        for suffix in (".verity", ".roothash", ".usrhash", ".roothash.p7s", ".usrhash.p7s"):
            side = sidecar_base(out) + suffix
            if os.path.lexists(side):
                raise die(f"{inside(root, side)} exists already: it would be taken as the "
                          "verity data of the new image", "remove it first")
    if opts.output is not None:
        stem = os.path.basename(out)
        for suffix in (f".{cls.name}.raw", ".raw"):
            if stem.endswith(suffix):
                stem = stem[:-len(suffix)]
                break
        if stem != opts.name:
            log.warning(f"{shown} will be merged as '{stem}', but its release file is "
                        f"extension-release.{opts.name}: name the file {opts.name}.raw")
    return out


def _preflight(opts: Options) -> None:
    if not valid_image_name(opts.name) or opts.name.startswith(".") or opts.name.endswith(
            ".raw"):
        raise die(f"'{opts.name}' is not a valid extension name",
                  "use a plain name such as 'site' (no '/', no leading '.', no '.raw')")
    if opts.fmt not in FORMATS:
        raise die(f"--format={opts.fmt}: unknown format", f"use one of {', '.join(FORMATS)}")
    if (opts.sign_key is None) != (opts.certificate is None):
        raise die("--sign-key and --certificate go together",
                  "give both: the private key and the certificate that checks it")
    if opts.sign_key is not None:
        opts.verity = True
        for p in (opts.sign_key, opts.certificate):
            assert p is not None
            if not os.path.isfile(p):
                raise die(f"{p}: no such file", "give the path of the key and certificate")
    if opts.verity and opts.fmt == "directory":
        raise die("--verity needs an image: a directory has no verity data",
                  "use --format=squashfs or --format=erofs")
    need = [TOOLS[opts.fmt]] if opts.fmt in TOOLS else []
    if opts.verity:
        need.append(("veritysetup", "cryptsetup-bin"))
    if opts.sign_key:
        need.append(("openssl", "openssl"))
    if not opts.dry_run:
        for tool, package in need:
            if shutil.which(tool) is None:
                raise die(f"{tool} is not installed, and --format={opts.fmt}"
                          + (" --verity" if tool == "veritysetup" else "") + " needs it",
                          f"install {package}")


def _drop_stale(parent: str) -> None:
    """Hidden build directories of a commit that was killed (its process is gone)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in names:
        # .#NAME.commit-PID (the stage), .#NAME.raw.commit-PID[.verity|.roothash|...]
        _, sep, tail = n.rpartition(".commit-")
        pid = tail.split(".")[0]
        if n.startswith(".#") and sep and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            p = os.path.join(parent, n)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except OSError:
                    pass


def commit(locked: Locked, cls_name: str, opts: Options) -> dict[str, Any]:
    root = locked.root
    cls = CLASSES[cls_name]
    _preflight(opts)
    with ExitStack() as stack:
        stacks: list[Stack] = []
        for h in class_hierarchies(cls):
            rec = state.load_record(root, cls.name, h) or engine.assumed_record(
                root, cls.name, h, stack)
            if rec is None or rec.upper is None:
                continue
            if any(la.role == "extension" and la.name == opts.name for la in rec.layers):
                raise die(f"'{opts.name}' is one of the layers below the upper of {h}: "
                          f"committing the upper as '{opts.name}' would replace it and lose "
                          "what it holds",
                          f"commit under a name ordered after it, e.g. {opts.name}-2")
            st = stack.enter_context(local.open_stack(root, cls, h))
            if st.upper is None or not os.path.isdir(st.upper):
                log.info(f"Skipping {h}: its {rec.upper} upper is not there now.")
                continue
            stacks.append(st)
        if not stacks:
            raise die(f"no hierarchy of {cls.name} has an upper layer to commit",
                      "merge with --mutable=yes, or configure a defaults layer, first")
        out = _output(root, cls, opts)
        text = release_text(root, cls, opts.any_id)
        # An extension that keeps this name elsewhere in the search path would shadow it.
        from overlayctl.images import discover
        s = load_settings(root, cls.name, dry_run=True, no_reload=True)
        other = next((i for i in discover(s) if i.name == opts.name), None)
        if other is not None:
            raise die(f"an extension named '{opts.name}' exists already: "
                      f"{inside(root, other.entry)}",
                      "remove it first, or commit under another name")
        result: dict[str, Any] = {"class": cls.name, "name": opts.name, "format": opts.fmt,
                                  "output": inside(root, out), "dry_run": opts.dry_run,
                                  "hierarchies": [st.hierarchy for st in stacks],
                                  "release": text.splitlines()}
        parent = os.path.dirname(out)
        if not opts.dry_run:
            os.makedirs(parent, 0o755, exist_ok=True)
            _drop_stale(parent)
        stage_top = os.path.join(parent, f".#{opts.name}.commit-{os.getpid()}")
        try:
            captured, skipped = _capture(stacks, cls, opts, stage_top, text)
            result["entries"] = [it.as_json() for it in captured]
            result["skipped"] = skipped
            below, above, hidden = _order(root, cls, opts.name, captured, stack)
            result["order"] = {"below": below, "above": above}
            result["hidden"] = hidden
            result["verity"] = None if opts.dry_run else _produce(stage_top, out, opts)
        finally:
            shutil.rmtree(stage_top, ignore_errors=True)
        return result
    raise AssertionError("unreachable")


def _capture(stacks: list[Stack], cls: ExtClass, opts: Options, stage_top: str,
             release: str) -> tuple[list[Item], list[dict[str, str]]]:
    """What the uppers hold, checked, and (unless a dry run) copied into STAGE_TOP from one
    consistent state of them: the copy is made again when an upper changed meanwhile."""
    moved = None
    for attempt in range(1, ATTEMPTS + 1):
        captured: list[Item] = []
        skipped: list[dict[str, str]] = []
        scans = []
        for st in stacks:
            assert st.upper is not None
            snap = scan(st.upper)
            items, skip = _items(st, snap)
            for it in items:
                if it.kind != "whiteout":
                    _check_carry(it.path, it.shown, opts.fmt)
            captured.extend(items)
            skipped.extend(skip)
            scans.append(snap)
        _in_use(captured)
        if opts.dry_run:
            return captured, skipped
        shutil.rmtree(stage_top, ignore_errors=True)
        os.mkdir(stage_top, 0o700)
        stage = Stage(stage_top, opts.fmt)
        for st in stacks:
            _fill(stage, st, [it for it in captured if it.st is st])
        faults.checkpoint("commit-copied", cls.name)
        moved = None
        for st, snap in zip(stacks, scans, strict=True):
            assert st.upper is not None
            rel = _changed(snap, scan(st.upper))
            if rel is not None:
                moved = st.shown(rel)
                break
        if moved is None:
            _write_release(stage, stacks, cls, opts.name, release)
            stage.finish()
            os.chmod(stage_top, 0o755)
            return captured, skipped
        log.info(f"{moved} changed while it was being committed: copying again "
                 f"(attempt {attempt} of {ATTEMPTS}).")
    raise die(f"the upper kept changing while it was being committed ({moved})",
              "stop what writes there, or commit while the hierarchy is unmerged")


def _produce(stage_top: str, out: str, opts: Options) -> dict[str, Any] | None:
    """The image (or directory) from the stage, verity sidecars, and the renames into place
    (sidecars first, the image last)."""
    parent = os.path.dirname(out)
    if opts.fmt == "directory":
        os.rename(stage_top, out)
        return None
    tmp = os.path.join(parent, f".#{os.path.basename(out)}.commit-{os.getpid()}")
    temps = [tmp]
    try:
        _build_image(stage_top, opts.fmt, tmp)
        moves: list[tuple[str, str]] = []
        info: dict[str, Any] | None = None
        if opts.verity:
            base = sidecar_base(out)
            tree_tmp = tmp + ".verity"
            temps.append(tree_tmp)
            rh = _verity(tmp, tree_tmp)
            os.chmod(tree_tmp, 0o644)
            hash_tmp = tmp + ".roothash"
            temps.append(hash_tmp)
            with open(hash_tmp, "w", encoding="ascii") as f:
                f.write(rh.hex() + "\n")
            os.chmod(hash_tmp, 0o644)
            moves += [(tree_tmp, base + ".verity"), (hash_tmp, base + ".roothash")]
            info = {"roothash": rh.hex(), "files": [base + ".verity", base + ".roothash"],
                    "signed": False}
            if opts.sign_key is not None:
                assert opts.certificate is not None
                sig_tmp = tmp + ".roothash.p7s"
                temps.append(sig_tmp)
                _sign(rh, opts.sign_key, opts.certificate, sig_tmp, stage_top)
                os.chmod(sig_tmp, 0o644)
                moves.append((sig_tmp, base + ".roothash.p7s"))
                info["files"].append(base + ".roothash.p7s")
                info["signed"] = True
        for a, b in moves:
            os.rename(a, b)
        os.rename(tmp, out)
        return info
    except OSError as e:
        raise die(f"cannot write {out}: {e.strerror}",
                  "check the free space and permissions of " + parent) from None
    finally:
        for t in temps:
            try:
                os.unlink(t)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
