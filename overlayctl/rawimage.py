"""Raw extension images: a squashfs, erofs or ext4 file system in a file (with dm-verity
sidecars or without), or a GPT disk image (DDI) with a root or /usr partition and maybe its
verity and signature partitions (Discoverable Partitions Specification). Two steps, so that
no device exists before every image of the call has passed its checks:

* ``inspect()`` reads the image file and its sidecars, nothing else: the file system or the
  partitions, the verity data (verity.py), the image policy (policy.py), the root hash
  against the top of the hash tree, and, where the kernel has no device-mapper, the
  signature in userspace so that the error can say whether it was valid. It returns an
  ``ImagePlan`` or raises one line naming the image.
* ``mount_image()`` attaches it read-only to a loop device (LOOP_CONFIGURE, auto-clear, the
  partition selected by offset and size, so no partition devices or udev are needed), puts
  a dm-verity device on top where the plan says so (devices.py: the kernel checks the
  signature first, then userspace against verity.d), and mounts it as a detached mount:
  nothing appears anywhere, and the mount, the dm device (deferred removal) and the loop
  devices go away with the last user."""

from __future__ import annotations

import errno
import os
import struct

from overlayctl import devices, log
from overlayctl import kernel as k
from overlayctl.errors import die
from overlayctl.record import Record
from overlayctl.resources import ExitStack

TYPE_CHECKING = False
if TYPE_CHECKING:
    from overlayctl.policy import ImagePolicy
    from overlayctl.verity import Protection, SignatureCheck, VerityParams

LUKS_MAGIC = b"LUKS\xba\xbe"


def _detect_fs(f: int, offset: int) -> str | None:
    head = os.pread(f, 2048, offset)
    if head[:6] == LUKS_MAGIC:
        return "crypto_LUKS"
    if head[:4] == b"hsqs":
        return "squashfs"
    if len(head) >= 1028 and struct.unpack_from("<I", head, 1024)[0] == 0xE0F5E1E2:
        return "erofs"
    if len(head) >= 1082 and struct.unpack_from("<H", head, 1080)[0] == 0xEF53:
        return "ext4"
    return None


def _fs_size(f: int, offset: int, fstype: str) -> int:
    """The size the file system's superblock claims (0 when unknown)."""
    head = os.pread(f, 2048, offset)
    if fstype == "squashfs" and len(head) >= 48:
        return int(struct.unpack_from("<Q", head, 40)[0])          # bytes_used
    if fstype == "erofs" and len(head) >= 1064:
        blkszbits = head[1024 + 12]
        return int(struct.unpack_from("<I", head, 1024 + 36)[0]) << blkszbits
    if fstype == "ext4" and len(head) >= 1048:
        count = struct.unpack_from("<I", head, 1024 + 4)[0]
        log_bs = struct.unpack_from("<I", head, 1024 + 24)[0]
        return int(count) << (10 + int(log_bs))
    return 0


def _check_size(f: int, path: str, region: Region, avail: int) -> None:
    need = _fs_size(f, region.offset, region.fstype)
    if need > avail:
        raise die(f"{path} is truncated: its {region.fstype} {region.what} needs {need} bytes, "
                  f"{avail} are there", "copy the image again")


class Region(Record):
    """The part of an image file that holds the file system to mount."""

    __slots__ = ("fstype", "offset", "size", "what", "usr_only")
    fstype: str
    offset: int
    size: int          # 0: to the end of the file
    what: str          # "file system" or "partition N (usr)"
    usr_only: bool     # a /usr partition: its root is the image's /usr

    def __init__(self, fstype: str, offset: int, size: int, what: str,
                 usr_only: bool = False) -> None:
        self._fill(locals())


class VerityPlan(Record):
    """The dm-verity device to set up: the root hash, the signature to hand the kernel
    (None: unsigned, or $SYSTEMD_DISSECT_VERITY_SIGNATURE=0), the superblock, and the hash
    device (a .verity file, size 0: all of it; or the verity partition of a DDI)."""

    __slots__ = ("root_hash", "signature", "signed", "params", "hash_path", "hash_offset",
                 "hash_size", "sidecar")
    root_hash: bytes
    signature: bytes | None
    signed: bool               # the image carries a signature (checked or not)
    params: VerityParams
    hash_path: str
    hash_offset: int
    hash_size: int
    sidecar: bool              # the verity data are sidecar files (not partitions)

    def __init__(self, root_hash: bytes, signature: bytes | None, signed: bool,
                 params: VerityParams, hash_path: str, hash_offset: int, hash_size: int,
                 sidecar: bool) -> None:
        self._fill(locals())


class ImagePlan(Record):
    """What inspect() decided for one image: the file system to mount, how it is protected
    and under which policy, and the verity device to put in between (None: unprotected)."""

    __slots__ = ("path", "region", "protection", "verity")
    path: str
    region: Region
    protection: Protection
    verity: VerityPlan | None

    def __init__(self, path: str, region: Region, protection: Protection,
                 verity: VerityPlan | None) -> None:
        self._fill(locals())


def _open(path: str) -> tuple[int, int]:
    try:
        f = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise die(f"cannot open image {path}: {e.strerror}", "check the file") from None
    size = os.fstat(f).st_size
    if size < 1024:
        os.close(f)
        raise die(f"{path} is too small to be an image ({size} bytes)",
                  "use a squashfs, erofs or GPT disk image")
    return f, size


def dissect(path: str) -> Region:
    """What in the image file to mount, or a clear error (any policy; no verity)."""
    from overlayctl.policy import ALLOW_POLICY
    return inspect(path, ALLOW_POLICY, activate=False).region


def inspect(path: str, pol: ImagePolicy, *, cls_name: str = "sysext", cert_root: str = "/",
            activate: bool = True) -> ImagePlan:
    """Everything about the image PATH that can be known without a device: what to mount,
    its verity data, and whether the image policy POL allows it (else PolicyRefused naming
    the image, the partition and the policy). With ACTIVATE, a verity image also needs a
    kernel with device-mapper (else an error saying so, after a userspace check of its
    signature against CERT_ROOT's verity.d, so that the message tells a valid signature
    from an invalid one). CLS_NAME decides which partition wins where both root and /usr
    are usable: /usr for system extensions, root (its /etc) for configuration extensions."""
    from overlayctl import policy as P
    from overlayctl import verity as V
    shown = P.policy_to_string(pol)
    f, size = _open(path)
    try:
        fs = _detect_fs(f, 0)
        if fs == "crypto_LUKS":
            raise die(f"{path} is an encrypted (LUKS) image, which overlayctl cannot open",
                      "use a squashfs or erofs image, with dm-verity for integrity")
        vplan: VerityPlan | None = None
        if fs is not None:
            side = V.load_sidecars(path)
            kind = side.protection()
            try:
                P.check_single_filesystem(pol, path, kind, fs)
            except P.PolicyRefused as e:
                if kind != "unprotected" and P.allows(pol, "root", "unprotected"):
                    # As systemd: the policy cannot make it drop sidecar verity data.
                    e.hint = ("the image has verity sidecars; set "
                              "SYSTEMD_DISSECT_VERITY_SIDECAR=0 to mount it without verity")
                raise
            region = Region(fs, 0, 0, "file system")
            _check_size(f, path, region, size)
            designator = "root"
            if kind != "unprotected":
                assert side.root_hash is not None and side.data_path is not None
                vplan = _verity_plan(path, side.root_hash, side.root_hash_sig, side.data_path,
                                     0, 0, region, size, sidecar=True)
        else:
            parts = V.read_gpt(path)
            if parts is None:
                raise die(f"{path} is neither a squashfs, erofs or ext4 image nor a GPT disk "
                          "image", "build it with mksquashfs, mkfs.erofs or systemd-repart")
            side = V.load_sidecars(path)
            ddi = V.ddi_verity(path, parts, side)
            found: dict[str, P.Partition] = {}
            for d, p in ddi.partitions.items():
                fst = _detect_fs(f, p.offset) if d in ("root", "usr") else None
                found[d] = P.Partition(read_only=p.read_only, growfs=p.growfs,
                                       fstype=None if fst == "crypto_LUKS" else fst,
                                       encrypted=fst == "crypto_LUKS")
            used = P.check_partitions(pol, path, found)
            order = ("usr", "root") if cls_name == "sysext" else ("root", "usr")
            designator = next((d for d in order if d in used and found[d].fstype), "")
            if not designator:
                enc = next((d for d in order if d in used and found[d].encrypted), None)
                if enc:
                    raise die(f"{path}: partition '{enc}' is encrypted (LUKS), which overlayctl "
                              "cannot open", "use dm-verity for integrity instead")
                if any(d in found and d not in used for d in order):
                    raise P.PolicyRefused(
                        f"{path}: the image policy '{shown}' leaves no root or /usr partition "
                        "to use", "pass --image-policy= that allows the root or usr partition")
                raise die(f"{path}: the partition table has no root or /usr partition with a "
                          "file system overlayctl can mount",
                          "use the partition types of the Discoverable Partitions Specification")
            d = designator
            dp = ddi.partitions[d]
            fst = found[d].fstype
            assert fst is not None
            region = Region(fst, dp.offset, dp.size, f"partition {dp.number} ({d})",
                            usr_only=d == "usr")
            _check_size(f, path, region, region.size)
            kind = "unprotected"
            if f"{d}-verity" in found and f"{d}-verity" not in used:
                log.info(f"Using partition '{d}' of {path} without its verity data: the image "
                         f"policy '{shown}' ignores the verity partition.")
            if f"{d}-verity" in used:
                kind = "signed" if f"{d}-verity-sig" in used else "verity"
                vs = ddi.verity
                if kind == "verity" and vs.sig_source is not None and \
                        vs.sig_source == vs.root_hash_source:
                    # The policy ignores the signature partition: its root hash is not used
                    # either (as systemd, which does not load it then).
                    vs = V.ddi_verity(path, parts, side, environ={
                        **os.environ, "SYSTEMD_DISSECT_VERITY_EMBEDDED": "0"}).verity
                if vs.root_hash is None or vs.designator != d:
                    raise die(f"{path}: partition '{d}' has a verity partition, but there is no "
                              "root hash for it",
                              f"put it in {V._aux_path(path, '.' + d + 'hash')} or a signature "
                              "partition, or leave SYSTEMD_DISSECT_VERITY_GUESS unset")
                hp = ddi.partitions[f"{d}-verity"]
                vplan = _verity_plan(path, vs.root_hash,
                                     vs.root_hash_sig if kind == "signed" else None, path,
                                     hp.offset, hp.size, region, size, sidecar=False)
    finally:
        os.close(f)
    prot = V.Protection(kind, designator, vplan.root_hash.hex() if vplan else None,
                        None, shown)
    plan = ImagePlan(path, region, prot, vplan)
    log.debug(f"{path}: {kind} ({designator} partition"
              + (f", root hash {prot.root_hash}" if prot.root_hash else "")
              + f"), allowed by the image policy '{shown}'.")
    if activate and vplan is not None:
        _require_device_mapper(plan, cert_root)
    return plan


def _verity_plan(path: str, root_hash: bytes, signature: bytes | None, hash_path: str,
                 hash_offset: int, hash_size: int, region: Region, size: int, *,
                 sidecar: bool) -> VerityPlan:
    """The superblock of the hash device, checked against the data and the root hash."""
    from overlayctl import verity as V
    params = V.read_superblock(hash_path, base=hash_offset)
    avail = region.size or size - region.offset
    if params.data_size > avail:
        raise die(f"{path}: the verity hash tree covers {params.data_size} bytes, the "
                  f"{region.what} has {avail} (truncated?)", "copy the image again")
    have = hash_size or os.path.getsize(hash_path)
    if V.hash_device_size(params) > have:
        raise die(f"{hash_path}: the verity hash tree is truncated "
                  f"({have} of {V.hash_device_size(params)} bytes)", "copy it again")
    V.check_root_hash(params, root_hash, hash_path, path, hash_base=hash_offset,
                      data_base=region.offset)
    return VerityPlan(root_hash, signature if V.signature_checks_enabled() else None,
                      signature is not None, params, hash_path, hash_offset, hash_size, sidecar)


def _userspace_check(path: str, v: VerityPlan, cert_root: str) -> SignatureCheck:
    from overlayctl import verity as V
    assert v.signature is not None
    try:
        return V.verify_signature(v.root_hash, v.signature, root=cert_root)
    except ImportError as e:
        return V.SignatureCheck(False, f"checking it needs python3-cryptography and "
                                f"python3-asn1crypto ({e.name} is missing)")


def _no_dm_hint(v: VerityPlan, designator: str) -> str:
    load = "load the dm_mod and dm_verity kernel modules (modprobe dm_verity)"
    if v.sidecar:
        return (f"{load}, or set SYSTEMD_DISSECT_VERITY_SIDECAR=0 to mount it without verity, "
                "as systemd does (no image policy can waive sidecar verity data)")
    return (f"{load}, or pass --image-policy={designator}=unprotected to use the partition "
            "without its verity data")


def _require_device_mapper(plan: ImagePlan, cert_root: str) -> None:
    """Verity is never dropped silently: without device-mapper, a verity image fails."""
    from overlayctl import dm
    if dm.dm_available():
        return
    v = plan.verity
    assert v is not None
    d = plan.protection.designator
    what = f"{plan.path} (partition '{d}', root hash {v.root_hash.hex()[:16]}...)"
    no_dm = "this kernel has no device-mapper to set up dm-verity"
    if v.signature is not None:
        chk = _userspace_check(plan.path, v, cert_root)
        if not chk.ok:
            raise die(f"{what}: its verity signature is refused: {chk.reason}; and {no_dm}",
                      f"sign the root hash with a key whose certificate is in "
                      f"{os.path.join(cert_root, 'etc/verity.d')}, and "
                      + _no_dm_hint(v, d))
        raise die(f"{what}: its verity signature is valid ({chk.reason}), but {no_dm}",
                  _no_dm_hint(v, d))
    if v.signed:
        raise die(f"{what}: a signed dm-verity image (signature not checked: "
                  f"$SYSTEMD_DISSECT_VERITY_SIGNATURE=0), but {no_dm}", _no_dm_hint(v, d))
    raise die(f"{what} is a dm-verity image, but {no_dm}", _no_dm_hint(v, d))


def _activate(plan: ImagePlan, own: ExitStack, cert_root: str) -> tuple[int, str | None]:
    """The dm-verity device of PLAN (shared, reused when one with the same root hash is
    there); returns an fd of it (owned by OWN) and how the signature was checked. The
    kernel checks a signature first; if it refuses (the certificate is in none of its
    keyrings, or it lacks signature support), userspace checks it against verity.d and the
    device is set up without handing the kernel the signature; if neither accepts it, the
    image is refused."""
    from overlayctl import verity as V
    v = plan.verity
    assert v is not None
    name = V.device_name(v.root_hash)
    unchecked = "unchecked" if v.signed and v.signature is None else None
    for _ in range(3):
        shared = devices.shared_verity_device(name, v.root_hash, own)
        if shared is not None:
            fd, kernel_signed = shared
            if v.signature is None:
                return fd, unchecked
            if kernel_signed:
                return fd, "kernel"
            chk = _userspace_check(plan.path, v, cert_root)
            if not chk.ok:
                raise die(f"{plan.path}: its verity signature is refused: {chk.reason} (the "
                          f"shared device {name} was set up without the kernel checking one)",
                          "sign the root hash with a key whose certificate is in "
                          f"{os.path.join(cert_root, 'etc/verity.d')}")
            return fd, "userspace"
        data = (plan.path, plan.region.offset, plan.region.size)
        hashdev = (v.hash_path, v.hash_offset, v.hash_size)
        try:
            how = unchecked
            if v.signature is not None:
                try:
                    return devices.verity_device(name, data, hashdev, v.params, v.root_hash,
                                                 signature=v.signature, stack=own), "kernel"
                except OSError as e:
                    if e.errno in (errno.EBUSY, errno.EEXIST):
                        raise
                    log.debug(f"{plan.path}: the kernel refused the verity signature "
                              f"({e.strerror}); checking it in userspace.")
                    chk = _userspace_check(plan.path, v, cert_root)
                    if not chk.ok:
                        raise die(f"{plan.path}: its verity signature is refused by the kernel "
                                  f"({e.strerror}) and in userspace: {chk.reason}",
                                  "sign the root hash with a key whose certificate is in "
                                  f"{os.path.join(cert_root, 'etc/verity.d')} or in the "
                                  "kernel's keyrings") from None
                    how = "userspace"
            return devices.verity_device(name, data, hashdev, v.params, v.root_hash,
                                         signature=None, stack=own), how
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.EEXIST):
                continue        # set up by someone else meanwhile: share it
            raise die(f"cannot set up dm-verity for {plan.path}: {e.strerror}",
                      "load dm_verity (modprobe dm_verity) and see dmesg") from None
    raise die(f"cannot set up dm-verity for {plan.path}: the device {name} is busy",
              f"check 'dmsetup info {name}'")


def mount_image(plan: ImagePlan, stack: ExitStack, *, cert_root: str = "/"
                ) -> tuple[int, bool, Protection]:
    """Attach and mount the image of PLAN read-only (through dm-verity where the plan says
    so); returns a detached mount fd (owned by STACK), whether its root is the image's /usr
    (a /usr partition), and its protection with how the signature was checked. The loop
    devices clear themselves and the dm device goes (deferred removal) once the mount, and
    every overlay using it, is gone."""
    path, region = plan.path, plan.region
    prot = plan.protection
    with ExitStack() as own:
        if plan.verity is None:
            try:
                source = devices.loop_device(path, region.offset, region.size, own)
            except OSError as e:
                raise die(f"cannot attach {path} to a loop device: {e.strerror}",
                          "load the loop module (modprobe loop) and run as root") from None
        else:
            try:
                dmfd, how = _activate(plan, own, cert_root)
            except OSError as e:
                raise die(f"cannot set up dm-verity for {path}: {e.strerror}",
                          "load the loop and dm_verity modules and run as root") from None
            source = f"/proc/self/fd/{dmfd}"
            prot = prot.replace(signature=how)
            log.debug(f"{path}: dm-verity device {devices.verity_name(plan.verity.root_hash)}"
                      + (f", signature checked by the {how}" if how in ("kernel", "userspace")
                         else "") + ".")
        try:
            fd = k.owned(own, k.fsopen(region.fstype))
        except OSError as e:
            raise die(f"the kernel cannot mount {region.fstype} ({path}): {e.strerror}",
                      f"modprobe {region.fstype}") from None
        try:
            k.fsconfig_string(fd, "source", source)
            k.fsconfig_flag(fd, "ro")
            if region.fstype == "ext4":
                k.fsconfig_flag(fd, "noload")
            k.fsconfig_create(fd)
            mfd = k.fsmount(fd, k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOSUID)
        except OSError as e:
            raise die(f"{path}: the {region.fstype} {region.what} cannot be mounted: "
                      f"{e.strerror} (truncated or damaged?)", "rebuild the image") from None
    return k.owned(stack, mfd), region.usr_only, prot
