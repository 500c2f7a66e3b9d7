"""dm-verity data of an extension image, found and checked as systemd 262 does it. Pure:
it reads files, never touches device-mapper (dm.py does that).

* Sidecars of a plain file-system image NAME.raw (verity_settings_load()): the root hash
  from the ``user.verity.roothash`` xattr or NAME.roothash, else ``user.verity.usrhash`` /
  NAME.usrhash; its signature NAME.roothash.p7s / NAME.usrhash.p7s; the hash tree
  NAME.verity. ``$SYSTEMD_DISSECT_VERITY_SIDECAR=0`` turns them off.
* DDIs (GPT): the root/usr data, verity and signature partitions by type UUID (every
  architecture systemd 262 knows), systemd's choice among several, the UUID <-> root hash
  rule, and the signature partition's JSON (``$SYSTEMD_DISSECT_VERITY_EMBEDDED=0`` ignores
  it; ``$SYSTEMD_DISSECT_VERITY_GUESS=0`` stops guessing the root hash from the UUIDs).
* The verity superblock (veritysetup's format) and the kernel's table line for it
  (Documentation/admin-guide/device-mapper/verity.rst), and a cheap check that a root
  hash belongs to a hash tree (the top hash block, no full scan).
* Userspace signature checks (validate_signature_userspace()): a detached PKCS#7
  signature of the hex root hash, against the ``*.crt`` files of ``verity.d/``.
  asn1crypto and cryptography are imported only there.

Every function that reads an image raises OverlayctlError with one line naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from overlayctl.errors import die
from overlayctl.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import hashlib
    from collections.abc import Mapping, Sequence

# hashlib, json, base64 and uuid are imported where they are needed: finding the sidecars of
# an image without verity, on every merge, needs none of them.

# ---------------------------------------------------------------------------------------------
# Environment switches (getenv_bool_secure(): unset or unparsable means the default)

_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")


def _parse_bool(value: str) -> bool | None:
    """systemd's parse_boolean(): case-insensitive, nothing stripped."""
    v = value.lower()
    return True if v in _TRUE else False if v in _FALSE else None


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean environment switch; unset or not a boolean gives DEFAULT (as upstream, which
    logs and ignores a bad value)."""
    value = (os.environ if environ is None else environ).get(name)
    if value is None:
        return default
    b = _parse_bool(value)
    return default if b is None else b


def sidecars_enabled(environ: Mapping[str, str] | None = None) -> bool:
    return env_bool("SYSTEMD_DISSECT_VERITY_SIDECAR", True, environ)


def embedded_enabled(environ: Mapping[str, str] | None = None) -> bool:
    return env_bool("SYSTEMD_DISSECT_VERITY_EMBEDDED", True, environ)


def guess_enabled(environ: Mapping[str, str] | None = None) -> bool:
    return env_bool("SYSTEMD_DISSECT_VERITY_GUESS", True, environ)


def signature_checks_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``$SYSTEMD_DISSECT_VERITY_SIGNATURE`` (default on). Upstream, off means a signature
    is neither given to the kernel nor checked in userspace: the volume is activated with
    its root hash alone."""
    return env_bool("SYSTEMD_DISSECT_VERITY_SIGNATURE", True, environ)


def _cmdline_bool(key: str, cmdline: str) -> bool | str | None:
    """proc_cmdline_get_bool(): the last KEY or KEY=VALUE ('-' and '_' the same) of the
    kernel command line; True for a bare KEY, None when absent, the raw value when it is not
    a boolean."""
    want = key.replace("-", "_")
    found: bool | str | None = None
    for word in cmdline.split():
        k, eq, v = word.partition("=")
        if k.replace("-", "_") != want:
            continue
        if not eq:
            found = True
        else:
            b = _parse_bool(v)
            found = v if b is None else b
    return found


def userspace_verification_allowed(environ: Mapping[str, str] | None = None,
                                   cmdline: str | None = None) -> tuple[bool, str]:
    """Whether a signature may be checked against verity.d/ in userspace, and if not why:
    ``$SYSTEMD_ALLOW_USERSPACE_VERITY`` and ``systemd.allow_userspace_verity=`` on the
    kernel command line (both default to yes; a value that is not a boolean refuses, as in
    systemd 262). CMDLINE defaults to $SYSTEMD_PROC_CMDLINE or /proc/cmdline."""
    env = os.environ if environ is None else environ
    value = env.get("SYSTEMD_ALLOW_USERSPACE_VERITY")
    if value is not None:
        b = _parse_bool(value)
        if b is None:
            return False, (f"$SYSTEMD_ALLOW_USERSPACE_VERITY={value} is not a boolean, "
                           "userspace signature checks refused")
        if not b:
            return False, "userspace signature checks are disabled by " \
                "$SYSTEMD_ALLOW_USERSPACE_VERITY"
    if cmdline is None:
        cmdline = env.get("SYSTEMD_PROC_CMDLINE")
    if cmdline is None:
        try:
            with open("/proc/cmdline", encoding="utf-8", errors="replace") as f:
                cmdline = f.read()
        except OSError:
            cmdline = ""
    c = _cmdline_bool("systemd.allow_userspace_verity", cmdline)
    if isinstance(c, str):
        return False, (f"systemd.allow_userspace_verity={c} on the kernel command line is "
                       "not a boolean, userspace signature checks refused")
    if c is False:
        return False, "userspace signature checks are disabled by " \
            "systemd.allow_userspace_verity= on the kernel command line"
    return True, ""


# ---------------------------------------------------------------------------------------------
# Hex and files as systemd reads them

def parse_hex(text: str) -> bytes:
    """unhexmem(): hex digits in either case, whitespace ignored; ValueError otherwise."""
    digits = "".join(text.split())
    if len(digits) % 2:
        raise ValueError("an odd number of hex digits")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise ValueError("not hexadecimal") from None


def _first_line(data: bytes) -> str:
    """read_one_line_file(): up to the first newline, CR or NUL."""
    for i, c in enumerate(data):
        if c in b"\n\r\0":
            data = data[:i]
            break
    return data.decode("utf-8", errors="surrogateescape")


def _aux_path(image: str, suffix: str) -> str:
    """build_auxiliary_path(): NAME.raw -> NAME<suffix>, anything else -> image<suffix>."""
    return (image[:-4] if image.endswith(".raw") else image) + suffix


def is_device_path(path: str) -> bool:
    return path.startswith(("/dev/", "/sys/"))


MAX_SIGNATURE_SIZE = 4 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# (a) Sidecars

class VeritySettings(Record):
    """What is known about an image's verity: which data partition it protects ("root",
    "usr", or None when nothing says), the root hash, its PKCS#7 signature, the sidecar
    hash-tree file (plain file-system images only), and where the root hash came from."""

    __slots__ = ("designator", "root_hash", "root_hash_sig", "data_path", "root_hash_source",
                 "sig_source")
    designator: str | None
    root_hash: bytes | None
    root_hash_sig: bytes | None
    data_path: str | None
    root_hash_source: str | None
    sig_source: str | None

    def __init__(self, designator: str | None = None, root_hash: bytes | None = None,
                 root_hash_sig: bytes | None = None, data_path: str | None = None,
                 root_hash_source: str | None = None, sig_source: str | None = None) -> None:
        self._fill(locals())

    def covers(self, designator: str) -> bool:
        """verity_settings_data_covers(): enough to set up verity for DESIGNATOR from a
        sidecar hash tree."""
        return ((self.designator is None and designator == "root")
                or self.designator == designator) \
            and self.root_hash is not None and self.data_path is not None

    @property
    def root_hash_hex(self) -> str | None:
        return None if self.root_hash is None else self.root_hash.hex()

    def protection(self) -> str:
        """What a plain file-system image offers the policy (dissect_image()'s found_flags
        for its single partition, 'root'): "signed" or "verity" when the sidecars cover it,
        else "unprotected" (a root hash without a .verity file, or a usrhash, give no
        verity: the image is then mounted without it, as upstream does)."""
        if self.covers("root"):
            return "signed" if self.root_hash_sig is not None else "verity"
        return "unprotected"


def _read_hash_sidecar(image: str, xattr: str, suffix: str) -> tuple[str, str] | None:
    try:
        value = os.getxattr(image, xattr)
        # getxattr_malloc(), then unhexmem() up to the first NUL (whitespace is ignored).
        return value.split(b"\0")[0].decode("utf-8", errors="surrogateescape"), \
            f"xattr {xattr} of {image}"
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP, errno.EOPNOTSUPP,
                           errno.ENOSYS):
            raise die(f"cannot read the xattr {xattr} of {image}: {e.strerror}",
                      "check the file") from None
    p = _aux_path(image, suffix)
    try:
        with open(p, "rb") as f:
            return _first_line(f.read(64 * 1024)), p
    except FileNotFoundError:
        return None
    except OSError as e:
        raise die(f"cannot read {p}: {e.strerror}", "check the file") from None


def _read_sig(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIGNATURE_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise die(f"cannot read {path}: {e.strerror}", "check the file") from None
    if not data:
        raise die(f"{path} is empty", "remove it, or put the PKCS#7 signature there")
    if len(data) > MAX_SIGNATURE_SIZE:
        raise die(f"{path} is larger than 4 MiB: not a signature",
                  "put the DER PKCS#7 signature of the root hash there")
    return data


def load_sidecars(image: str, environ: Mapping[str, str] | None = None) -> VeritySettings:
    """verity_settings_load() for IMAGE (a path as the merge sees it): the root hash (xattr,
    then file; root first, then usr), the signature for the same designator, the .verity
    hash tree. Nothing for device nodes or with $SYSTEMD_DISSECT_VERITY_SIDECAR=0."""
    if is_device_path(image) or not sidecars_enabled(environ):
        return VeritySettings()
    designator: str | None = None
    root_hash = None
    source = None
    for d, xattr, suffix in (("root", "user.verity.roothash", ".roothash"),
                             ("usr", "user.verity.usrhash", ".usrhash")):
        found = _read_hash_sidecar(image, xattr, suffix)
        if found is None:
            continue
        text, source = found
        try:
            root_hash = parse_hex(text)
        except ValueError as e:
            raise die(f"{source}: the verity root hash is not valid: {e}",
                      "write the hex root hash that veritysetup format printed") from None
        if len(root_hash) < 16:
            raise die(f"{source}: the verity root hash is too short ({len(root_hash)} bytes)",
                      "write the hex root hash that veritysetup format printed")
        designator = d
        break
    sig = sig_source = None
    if root_hash is not None:
        p = _aux_path(image, ".roothash.p7s" if designator == "root" else ".usrhash.p7s")
        sig = _read_sig(p)
        sig_source = p if sig is not None else None
    tree = _aux_path(image, ".verity")
    data_path = tree if os.path.exists(tree) else None
    return VeritySettings(designator, root_hash, sig, data_path, source, sig_source)


# ---------------------------------------------------------------------------------------------
# (b) DDIs: GPT partitions

# Partition type UUIDs systemd 262 knows (systemd-id128 show), canonical architecture names.
GPT_TYPES: dict[str, tuple[str, str]] = {
    "6523f8ae-3eb1-4e2a-a05a-18b695ae656f": ("root", "alpha"),
    "fc56d9e9-e6e5-4c06-be32-e74407ce09a5": ("root-verity", "alpha"),
    "d46495b7-a053-414f-80f7-700c99921ef8": ("root-verity-sig", "alpha"),
    "e18cf08c-33ec-4c0d-8246-c6c6fb3da024": ("usr", "alpha"),
    "8cce0d25-c0d0-4a44-bd87-46331bf1df67": ("usr-verity", "alpha"),
    "5c6e1c76-076a-457a-a0fe-f3b4cd21ce6e": ("usr-verity-sig", "alpha"),
    "d27f46ed-2919-4cb8-bd25-9531f3c16534": ("root", "arc"),
    "24b2d975-0f97-4521-afa1-cd531e421b8d": ("root-verity", "arc"),
    "143a70ba-cbd3-4f06-919f-6c05683a78bc": ("root-verity-sig", "arc"),
    "7978a683-6316-4922-bbee-38bff5a2fecc": ("usr", "arc"),
    "fca0598c-d880-4591-8c16-4eda05c7347c": ("usr-verity", "arc"),
    "94f9a9a1-9971-427a-a400-50cb297f0f35": ("usr-verity-sig", "arc"),
    "69dad710-2ce4-4e3c-b16c-21a1d49abed3": ("root", "arm"),
    "7386cdf2-203c-47a9-a498-f2ecce45a2d6": ("root-verity", "arm"),
    "42b0455f-eb11-491d-98d3-56145ba9d037": ("root-verity-sig", "arm"),
    "7d0359a3-02b3-4f0a-865c-654403e70625": ("usr", "arm"),
    "c215d751-7bcd-4649-be90-6627490a4c05": ("usr-verity", "arm"),
    "d7ff812f-37d1-4902-a810-d76ba57b975a": ("usr-verity-sig", "arm"),
    "b921b045-1df0-41c3-af44-4c6f280d3fae": ("root", "arm64"),
    "df3300ce-d69f-4c92-978c-9bfb0f38d820": ("root-verity", "arm64"),
    "6db69de6-29f4-4758-a7a5-962190f00ce3": ("root-verity-sig", "arm64"),
    "b0e01050-ee5f-4390-949a-9101b17104e9": ("usr", "arm64"),
    "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e": ("usr-verity", "arm64"),
    "c23ce4ff-44bd-4b00-b2d4-b41b3419e02a": ("usr-verity-sig", "arm64"),
    "993d8d3d-f80e-4225-855a-9daf8ed7ea97": ("root", "ia64"),
    "86ed10d5-b607-45bb-8957-d350f23d0571": ("root-verity", "ia64"),
    "e98b36ee-32ba-4882-9b12-0ce14655f46a": ("root-verity-sig", "ia64"),
    "4301d2a6-4e3b-4b2a-bb94-9e0b2c4225ea": ("usr", "ia64"),
    "6a491e03-3be7-4545-8e38-83320e0ea880": ("usr-verity", "ia64"),
    "8de58bc2-2a43-460d-b14e-a76e4a17b47f": ("usr-verity-sig", "ia64"),
    "77055800-792c-4f94-b39a-98c91b762bb6": ("root", "loongarch64"),
    "f3393b22-e9af-4613-a948-9d3bfbd0c535": ("root-verity", "loongarch64"),
    "5afb67eb-ecc8-4f85-ae8e-ac1e7c50e7d0": ("root-verity-sig", "loongarch64"),
    "e611c702-575c-4cbe-9a46-434fa0bf7e3f": ("usr", "loongarch64"),
    "f46b2c26-59ae-48f0-9106-c50ed47f673d": ("usr-verity", "loongarch64"),
    "b024f315-d330-444c-8461-44bbde524e99": ("usr-verity-sig", "loongarch64"),
    "e9434544-6e2c-47cc-bae2-12d6deafb44c": ("root", "mips"),
    "7a430799-f711-4c7e-8e5b-1d685bd48607": ("root-verity", "mips"),
    "bba210a2-9c5d-45ee-9e87-ff2ccbd002d0": ("root-verity-sig", "mips"),
    "773b2abc-2a99-4398-8bf5-03baac40d02b": ("usr", "mips"),
    "6e5a1bc8-d223-49b7-bca8-37a5fcceb996": ("usr-verity", "mips"),
    "97ae158d-f216-497b-8057-f7f905770f54": ("usr-verity-sig", "mips"),
    "d113af76-80ef-41b4-bdb6-0cff4d3d4a25": ("root", "mips64"),
    "579536f8-6a33-4055-a95a-df2d5e2c42a8": ("root-verity", "mips64"),
    "43ce94d4-0f3d-4999-8250-b9deafd98e6e": ("root-verity-sig", "mips64"),
    "57e13958-7331-4365-8e6e-35eeee17c61b": ("usr", "mips64"),
    "81cf9d90-7458-4df4-8dcf-c8a3a404f09b": ("usr-verity", "mips64"),
    "05816ce2-dd40-4ac6-a61d-37d32dc1ba7d": ("usr-verity-sig", "mips64"),
    "37c58c8a-d913-4156-a25f-48b1b64e07f0": ("root", "mips-le"),
    "d7d150d2-2a04-4a33-8f12-16651205ff7b": ("root-verity", "mips-le"),
    "c919cc1f-4456-4eff-918c-f75e94525ca5": ("root-verity-sig", "mips-le"),
    "0f4868e9-9952-4706-979f-3ed3a473e947": ("usr", "mips-le"),
    "46b98d8d-b55c-4e8f-aab3-37fca7f80752": ("usr-verity", "mips-le"),
    "3e23ca0b-a4bc-4b4e-8087-5ab6a26aa8a9": ("usr-verity-sig", "mips-le"),
    "700bda43-7a34-4507-b179-eeb93d7a7ca3": ("root", "mips64-le"),
    "16b417f8-3e06-4f57-8dd2-9b5232f41aa6": ("root-verity", "mips64-le"),
    "904e58ef-5c65-4a31-9c57-6af5fc7c5de7": ("root-verity-sig", "mips64-le"),
    "c97c1f32-ba06-40b4-9f22-236061b08aa8": ("usr", "mips64-le"),
    "3c3d61fe-b5f3-414d-bb71-8739a694a4ef": ("usr-verity", "mips64-le"),
    "f2c2c7ee-adcc-4351-b5c6-ee9816b66e16": ("usr-verity-sig", "mips64-le"),
    "1aacdb3b-5444-4138-bd9e-e5c2239b2346": ("root", "parisc"),
    "d212a430-fbc5-49f9-a983-a7feef2b8d0e": ("root-verity", "parisc"),
    "15de6170-65d3-431c-916e-b0dcd8393f25": ("root-verity-sig", "parisc"),
    "dc4a4480-6917-4262-a4ec-db9384949f25": ("usr", "parisc"),
    "5843d618-ec37-48d7-9f12-cea8e08768b2": ("usr-verity", "parisc"),
    "450dd7d1-3224-45ec-9cf2-a43a346d71ee": ("usr-verity-sig", "parisc"),
    "1de3f1ef-fa98-47b5-8dcd-4a860a654d78": ("root", "ppc"),
    "98cfe649-1588-46dc-b2f0-add147424925": ("root-verity", "ppc"),
    "1b31b5aa-add9-463a-b2ed-bd467fc857e7": ("root-verity-sig", "ppc"),
    "7d14fec5-cc71-415d-9d6c-06bf0b3c3eaf": ("usr", "ppc"),
    "df765d00-270e-49e5-bc75-f47bb2118b09": ("usr-verity", "ppc"),
    "7007891d-d371-4a80-86a4-5cb875b9302e": ("usr-verity-sig", "ppc"),
    "912ade1d-a839-4913-8964-a10eee08fbd2": ("root", "ppc64"),
    "9225a9a3-3c19-4d89-b4f6-eeff88f17631": ("root-verity", "ppc64"),
    "f5e2c20c-45b2-4ffa-bce9-2a60737e1aaf": ("root-verity-sig", "ppc64"),
    "2c9739e2-f068-46b3-9fd0-01c5a9afbcca": ("usr", "ppc64"),
    "bdb528a5-a259-475f-a87d-da53fa736a07": ("usr-verity", "ppc64"),
    "0b888863-d7f8-4d9e-9766-239fce4d58af": ("usr-verity-sig", "ppc64"),
    "c31c45e6-3f39-412e-80fb-4809c4980599": ("root", "ppc64-le"),
    "906bd944-4589-4aae-a4e4-dd983917446a": ("root-verity", "ppc64-le"),
    "d4a236e7-e873-4c07-bf1d-bf6cf7f1c3c6": ("root-verity-sig", "ppc64-le"),
    "15bb03af-77e7-4d4a-b12b-c0d084f7491c": ("usr", "ppc64-le"),
    "ee2b9983-21e8-4153-86d9-b6901a54d1ce": ("usr-verity", "ppc64-le"),
    "c8bfbd1e-268e-4521-8bba-bf314c399557": ("usr-verity-sig", "ppc64-le"),
    "60d5a7fe-8e7d-435c-b714-3dd8162144e1": ("root", "riscv32"),
    "ae0253be-1167-4007-ac68-43926c14c5de": ("root-verity", "riscv32"),
    "3a112a75-8729-4380-b4cf-764d79934448": ("root-verity-sig", "riscv32"),
    "b933fb22-5c3f-4f91-af90-e2bb0fa50702": ("usr", "riscv32"),
    "cb1ee4e3-8cd0-4136-a0a4-aa61a32e8730": ("usr-verity", "riscv32"),
    "c3836a13-3137-45ba-b583-b16c50fe5eb4": ("usr-verity-sig", "riscv32"),
    "72ec70a6-cf74-40e6-bd49-4bda08e8f224": ("root", "riscv64"),
    "b6ed5582-440b-4209-b8da-5ff7c419ea3d": ("root-verity", "riscv64"),
    "efe0f087-ea8d-4469-821a-4c2a96a8386a": ("root-verity-sig", "riscv64"),
    "beaec34b-8442-439b-a40b-984381ed097d": ("usr", "riscv64"),
    "8f1056be-9b05-47c4-81d6-be53128e5b54": ("usr-verity", "riscv64"),
    "d2f9000a-7a18-453f-b5cd-4d32f77a7b32": ("usr-verity-sig", "riscv64"),
    "08a7acea-624c-4a20-91e8-6e0fa67d23f9": ("root", "s390"),
    "7ac63b47-b25c-463b-8df8-b4a94e6c90e1": ("root-verity", "s390"),
    "3482388e-4254-435a-a241-766a065f9960": ("root-verity-sig", "s390"),
    "cd0f869b-d0fb-4ca0-b141-9ea87cc78d66": ("usr", "s390"),
    "b663c618-e7bc-4d6d-90aa-11b756bb1797": ("usr-verity", "s390"),
    "17440e4f-a8d0-467f-a46e-3912ae6ef2c5": ("usr-verity-sig", "s390"),
    "5eead9a9-fe09-4a1e-a1d7-520d00531306": ("root", "s390x"),
    "b325bfbe-c7be-4ab8-8357-139e652d2f6b": ("root-verity", "s390x"),
    "c80187a5-73a3-491a-901a-017c3fa953e9": ("root-verity-sig", "s390x"),
    "8a4f5770-50aa-4ed3-874a-99b710db6fea": ("usr", "s390x"),
    "31741cc4-1a2a-4111-a581-e00b447d2d06": ("usr-verity", "s390x"),
    "3f324816-667b-46ae-86ee-9b0c0c6c11b4": ("usr-verity-sig", "s390x"),
    "c50cdd70-3862-4cc3-90e1-809a8c93ee2c": ("root", "tilegx"),
    "966061ec-28e4-4b2e-b4a5-1f0a825a1d84": ("root-verity", "tilegx"),
    "b3671439-97b0-4a53-90f7-2d5a8f3ad47b": ("root-verity-sig", "tilegx"),
    "55497029-c7c1-44cc-aa39-815ed1558630": ("usr", "tilegx"),
    "2fb4bf56-07fa-42da-8132-6b139f2026ae": ("usr-verity", "tilegx"),
    "4ede75e2-6ccc-4cc8-b9c7-70334b087510": ("usr-verity-sig", "tilegx"),
    "44479540-f297-41b2-9af7-d131d5f0458a": ("root", "x86"),
    "d13c5d3b-b5d1-422a-b29f-9454fdc89d76": ("root-verity", "x86"),
    "5996fc05-109c-48de-808b-23fa0830b676": ("root-verity-sig", "x86"),
    "75250d76-8cc6-458e-bd66-bd47cc81a812": ("usr", "x86"),
    "8f461b0d-14ee-4e81-9aa9-049b6fb97abd": ("usr-verity", "x86"),
    "974a71c0-de41-43c3-be5d-5c5ccd1ad2c0": ("usr-verity-sig", "x86"),
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": ("root", "x86-64"),
    "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5": ("root-verity", "x86-64"),
    "41092b05-9fc8-4523-994f-2def0408b176": ("root-verity-sig", "x86-64"),
    "8484680c-9521-48c6-9c11-b0720656f69e": ("usr", "x86-64"),
    "77ff5f63-e7b6-4633-acf4-1565b864c0e6": ("usr-verity", "x86-64"),
    "e7bb33fb-06cf-4e81-8273-e543b413e2e2": ("usr-verity-sig", "x86-64"),
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": ("esp", ""),
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": ("xbootldr", ""),
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": ("swap", ""),
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": ("home", ""),
    "3b8f8425-20e0-4f3b-907f-1a25a76f98e8": ("srv", ""),
    "4d21b016-b534-45c2-a9fb-5c16e091fd2d": ("var", ""),
    "7ec6f557-3bc5-4aca-b293-16ef5df639d1": ("tmp", ""),
}

GPT_FLAG_REQUIRED_PARTITION = 1 << 0
GPT_FLAG_NO_BLOCK_IO_PROTOCOL = 1 << 1
GPT_FLAG_LEGACY_BIOS_BOOTABLE = 1 << 2
GPT_FLAG_GROWFS = 1 << 59
GPT_FLAG_READ_ONLY = 1 << 60
GPT_FLAG_NO_AUTO = 1 << 63

_VERSIONED = ("root", "usr", "root-verity", "usr-verity", "root-verity-sig", "usr-verity-sig")
_SECONDARY = {"x86-64": "x86", "arm64": "arm"}


class GptPartition(Record):
    __slots__ = ("number", "type_uuid", "uuid", "label", "flags", "offset", "size", "designator",
                 "arch")
    number: int  # 1-based, as the kernel numbers partitions
    type_uuid: str
    uuid: str  # the partition's own UUID, lower case with dashes
    label: str
    flags: int
    offset: int  # bytes
    size: int  # bytes
    designator: str | None
    arch: str | None

    def __init__(self, number: int, type_uuid: str, uuid: str, label: str, flags: int,
                 offset: int, size: int, designator: str | None, arch: str | None) -> None:
        self._fill(locals())

    @property
    def read_only(self) -> bool:
        return bool(self.flags & GPT_FLAG_READ_ONLY)

    @property
    def growfs(self) -> bool:
        return bool(self.flags & GPT_FLAG_GROWFS)

    @property
    def no_auto(self) -> bool:
        return bool(self.flags & GPT_FLAG_NO_AUTO)


def read_gpt(path: str) -> list[GptPartition] | None:
    """The partitions of a GPT image (512 or 4096-byte sectors), or None without a GPT."""
    import uuid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise die(f"cannot open image {path}: {e.strerror}", "check the file") from None
    try:
        size = os.fstat(fd).st_size
        for sector in (512, 4096):
            hdr = os.pread(fd, 92, sector)
            if hdr[:8] != b"EFI PART":
                continue
            entries_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
            if esize < 128 or count > 1024 or esize > 4096:
                raise die(f"{path}: the partition table is damaged", "rebuild the image")
            table = os.pread(fd, count * esize, entries_lba * sector)
            out = []
            for i in range(count):
                ent = table[i * esize:(i + 1) * esize]
                if len(ent) < 128 or ent[:16] == bytes(16):
                    continue
                tid = str(uuid.UUID(bytes_le=bytes(ent[:16])))
                pid = str(uuid.UUID(bytes_le=bytes(ent[16:32])))
                first, last, flags = struct.unpack_from("<QQQ", ent, 32)
                label = ent[56:128].decode("utf-16-le", errors="replace").split("\0")[0]
                if last < first or (last + 1) * sector > size:
                    raise die(f"{path}: partition {i + 1} lies beyond the end of the image "
                              "(truncated?)", "copy the image again")
                d, arch = GPT_TYPES.get(tid, (None, None))
                out.append(GptPartition(i + 1, tid, pid, label, flags, first * sector,
                                        (last - first + 1) * sector, d, arch or None))
            return out
        return None
    finally:
        os.close(fd)


def _arch_rank(arch: str | None, native: str) -> int:
    return 2 if arch == native else 1 if arch == _SECONDARY.get(native) else 0


def select_partitions(parts: Sequence[GptPartition], *, native_arch: str | None = None,
                      uuid_filter: Mapping[str, str] | None = None
                      ) -> dict[str, GptPartition]:
    """dissect_image()'s choice of one partition per designator: partitions marked no-auto
    are skipped; the native architecture beats the secondary one beats others; among equals
    the higher version in the label wins for root/usr and their verity partitions, else
    the first. UUID_FILTER (designator -> UUID) keeps only the partition with that UUID, as
    a known root hash does for the data and verity partitions."""
    from overlayctl.versions import vercmp

    if native_arch is None:
        from overlayctl.kernel import uname_architecture
        native_arch = uname_architecture()
    chosen: dict[str, GptPartition] = {}
    for p in parts:
        d = p.designator
        if d is None or p.no_auto:
            continue
        if d == "esp" and p.flags & GPT_FLAG_NO_BLOCK_IO_PROTOCOL:
            continue
        if uuid_filter and d in uuid_filter and p.uuid != uuid_filter[d]:
            continue
        old = chosen.get(d)
        if old is not None:
            c = _arch_rank(p.arch, native_arch) - _arch_rank(old.arch, native_arch)
            if c < 0:
                continue
            if c == 0 and (d not in _VERSIONED or vercmp(p.label, old.label) <= 0):
                continue
        chosen[d] = p
    return chosen


class SigPartition(Record):
    __slots__ = ("root_hash", "signature", "certificate_fingerprint")
    root_hash: bytes
    signature: bytes
    certificate_fingerprint: str | None

    def __init__(self, root_hash: bytes, signature: bytes,
                 certificate_fingerprint: str | None) -> None:
        self._fill(locals())


def parse_sig_json(data: bytes, where: str) -> SigPartition:
    """The content of a verity signature partition: JSON padded with NUL bytes (nothing but
    NUL after the first one), at most 4 MiB, with ``rootHash`` (hex), ``signature`` (base64
    DER PKCS#7) and optionally ``certificateFingerprint`` (hex SHA-256 of the signer's
    certificate; systemd 262 does not use it)."""
    import base64
    import binascii
    import json
    if len(data) > MAX_SIGNATURE_SIZE:
        raise die(f"{where}: the verity signature partition is larger than 4 MiB",
                  "rebuild the image")
    nul = data.find(b"\0")
    if nul >= 0:
        if data[nul:].count(0) != len(data) - nul:
            raise die(f"{where}: the verity signature data has an embedded NUL byte",
                      "rebuild the image")
        data = data[:nul]
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise die(f"{where}: the verity signature is not JSON ({e})",
                  "rebuild the image") from None
    if not isinstance(obj, dict):
        raise die(f"{where}: the verity signature JSON is not an object", "rebuild the image")
    rh, sig = obj.get("rootHash"), obj.get("signature")
    if not isinstance(rh, str) or not isinstance(sig, str):
        missing = "rootHash" if not isinstance(rh, str) else "signature"
        raise die(f"{where}: the verity signature JSON has no string '{missing}'",
                  "rebuild the image")
    try:
        root_hash = parse_hex(rh)
    except ValueError as e:
        raise die(f"{where}: rootHash in the verity signature is not valid: {e}",
                  "rebuild the image") from None
    try:
        signature = base64.b64decode("".join(sig.split()), validate=True)
    except binascii.Error:
        raise die(f"{where}: the signature in the verity signature JSON is not base64",
                  "rebuild the image") from None
    if len(root_hash) < 16 or not signature:
        raise die(f"{where}: the verity signature JSON has an empty or short field",
                  "rebuild the image")
    fp = obj.get("certificateFingerprint")
    return SigPartition(root_hash, signature, fp.lower() if isinstance(fp, str) else None)


def read_sig_partition(path: str, part: GptPartition) -> SigPartition:
    where = f"{path} (partition {part.number}, {part.designator})"
    if part.size > MAX_SIGNATURE_SIZE:
        raise die(f"{where}: the verity signature partition is larger than 4 MiB",
                  "rebuild the image")
    try:
        with open(path, "rb") as f:
            f.seek(part.offset)
            data = f.read(part.size)
    except OSError as e:
        raise die(f"cannot read {where}: {e.strerror}", "check the file") from None
    if len(data) != part.size:
        raise die(f"{where}: the image is truncated", "copy the image again")
    return parse_sig_json(data, where)


def _uuid_halves(root_hash: bytes) -> tuple[str, str]:
    import uuid
    return str(uuid.UUID(bytes=root_hash[:16])), str(uuid.UUID(bytes=root_hash[-16:]))


class DdiVerity(Record):
    """The outcome for a GPT image: the partitions to use (designator -> partition, as
    policy.check_partitions() wants them) and the verity settings for the protected data
    partition (designator None: no verity)."""

    __slots__ = ("partitions", "verity", "uuid_rule")
    partitions: dict[str, GptPartition]
    verity: VeritySettings
    uuid_rule: bool  # the data/verity partition UUIDs are the root hash's halves

    def __init__(self, partitions: dict[str, GptPartition], verity: VeritySettings,
                 uuid_rule: bool) -> None:
        self._fill(locals())


def ddi_verity(path: str, parts: Sequence[GptPartition], sidecar: VeritySettings, *,
               environ: Mapping[str, str] | None = None,
               native_arch: str | None = None) -> DdiVerity:
    """dissect_image() and dissected_image_load_verity_sig_partition() and
    dissected_image_guess_verity_roothash() for a GPT image. SIDECAR comes from
    load_sidecars(): a root hash there selects the partitions whose UUIDs are its halves (and
    one must exist); a .verity hash tree next to a partitioned image is refused."""
    import uuid
    if sidecar.data_path is not None:
        raise die(f"{path}: a partitioned image cannot use the external verity data "
                  f"{sidecar.data_path}",
                  "remove it, or set SYSTEMD_DISSECT_VERITY_SIDECAR=0")
    uf: dict[str, str] = {}
    if sidecar.root_hash is not None:
        if len(sidecar.root_hash) < 16:
            raise die(f"{path}: the verity root hash is too short", "fix the .roothash file")
        data_u, verity_u = _uuid_halves(sidecar.root_hash)
        sd = sidecar.designator or "root"
        uf = {sd: data_u, f"{sd}-verity": verity_u}
    chosen = select_partitions(parts, native_arch=native_arch, uuid_filter=uf)
    for d in ("root", "usr"):
        if f"{d}-verity-sig" in chosen and f"{d}-verity" not in chosen:
            raise die(f"{path}: a {d} verity signature partition without a {d} verity "
                      "partition", "rebuild the image")
        if d not in chosen and (f"{d}-verity" in chosen or f"{d}-verity-sig" in chosen):
            what = "the root hash" if uf else "its verity partition"
            raise die(f"{path}: no {d} partition for {what}",
                      "rebuild the image, or fix the .roothash/.usrhash file")
    if "root-verity" in chosen:
        if "usr-verity" in chosen:
            raise die(f"{path}: both root and usr have verity partitions; one image carries "
                      "one verity partition", "rebuild the image")
        if "usr" in chosen:
            raise die(f"{path}: a verity root partition with a separate usr partition",
                      "rebuild the image")
    if sidecar.designator is not None and sidecar.designator not in chosen:
        raise die(f"{path}: no {sidecar.designator} partition for the root hash "
                  f"{sidecar.root_hash_hex}", "fix the .roothash/.usrhash file")

    settings = sidecar
    if not (settings.root_hash is not None and settings.root_hash_sig is not None) \
            and embedded_enabled(environ):
        wanted = settings.designator
        if wanted is None:
            wanted = "usr" if "usr-verity-sig" in chosen else \
                "root" if "root-verity-sig" in chosen else None
        if wanted is not None and f"{wanted}-verity-sig" in chosen:
            d = wanted
            sp = read_sig_partition(path, chosen[f"{d}-verity-sig"])
            if settings.root_hash is not None and settings.root_hash != sp.root_hash:
                raise die(f"{path}: the root hash in the signature partition "
                          f"({sp.root_hash.hex()}) is not the one of "
                          f"{settings.root_hash_source} ({settings.root_hash_hex})",
                          "rebuild the image, or fix the .roothash/.usrhash file")
            settings = VeritySettings(d, sp.root_hash, sp.signature, None,
                                      f"{path} (partition {chosen[d + '-verity-sig'].number})",
                                      f"{path} (partition {chosen[d + '-verity-sig'].number})")
            # Where there are several (A/B), use the pair the signed root hash names.
            data_u, verity_u = _uuid_halves(sp.root_hash)
            better = select_partitions(parts, native_arch=native_arch,
                                       uuid_filter={d: data_u, f"{d}-verity": verity_u})
            if d in better and f"{d}-verity" in better:
                chosen[d], chosen[f"{d}-verity"] = better[d], better[f"{d}-verity"]
    if settings.root_hash is None and guess_enabled(environ):
        for d in ("usr", "root"):
            if d in chosen and f"{d}-verity" in chosen:
                guessed = uuid.UUID(chosen[d].uuid).bytes + \
                    uuid.UUID(chosen[f"{d}-verity"].uuid).bytes
                settings = VeritySettings(d, guessed, None, None,
                                          f"{path} (partition UUIDs)", None)
                break
    prot = settings.designator
    rule = False
    if prot is not None and settings.root_hash is not None and prot in chosen \
            and f"{prot}-verity" in chosen:
        data_u, verity_u = _uuid_halves(settings.root_hash)
        rule = chosen[prot].uuid == data_u and chosen[f"{prot}-verity"].uuid == verity_u
    return DdiVerity(chosen, settings, rule)


# ---------------------------------------------------------------------------------------------
# (c) The verity superblock and the table line

VERITY_MAGIC = b"verity\0\0"
SUPERBLOCK_SIZE = 512
_SB = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert _SB.size == SUPERBLOCK_SIZE


class VerityParams(Record):
    """A verity hash device's superblock (cryptsetup's struct verity_sb), and where it is."""

    __slots__ = ("version", "hash_type", "uuid", "algorithm", "data_block_size",
                 "hash_block_size", "data_blocks", "salt", "hash_offset")
    version: int
    hash_type: int
    uuid: str
    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes
    hash_offset: int  # bytes from the start of the hash device to the superblock

    def __init__(self, version: int, hash_type: int, uuid: str, algorithm: str,
                 data_block_size: int, hash_block_size: int, data_blocks: int, salt: bytes,
                 hash_offset: int = 0) -> None:
        self._fill(locals())

    @property
    def hash_start_block(self) -> int:
        """The first hash block after the superblock (VERITY_hash_offset_block())."""
        return (self.hash_offset + SUPERBLOCK_SIZE + self.hash_block_size - 1) \
            // self.hash_block_size

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @property
    def digest_size(self) -> int:
        return _hash(self.algorithm).digest_size


def _hash(name: str) -> hashlib._Hash:
    import hashlib
    try:
        return hashlib.new(name)
    except ValueError:
        raise die(f"the verity hash algorithm {name} is not supported",
                  "use sha256 (veritysetup format --hash=sha256)") from None


def _block_size_ok(n: int) -> bool:
    return 512 <= n <= 512 * 1024 and n & (n - 1) == 0


def parse_superblock(data: bytes, where: str, hash_offset: int = 0) -> VerityParams:
    """VERITY_read_sb(): the checks cryptsetup makes, each a one-line error."""
    import uuid
    if len(data) < SUPERBLOCK_SIZE:
        raise die(f"{where}: too short for a verity superblock", "run veritysetup format")
    (magic, version, hash_type, raw_uuid, alg, dbs, hbs, blocks, salt_size, _p1, salt,
     _p2) = _SB.unpack_from(data)
    if magic != VERITY_MAGIC:
        raise die(f"{where}: no verity superblock (veritysetup format writes one)",
                  "build the hash tree with veritysetup format")
    if version != 1:
        raise die(f"{where}: verity superblock version {version} is not supported",
                  "build the hash tree with veritysetup format")
    if hash_type > 1:
        raise die(f"{where}: verity hash type {hash_type} is not supported",
                  "build the hash tree with veritysetup format")
    if not _block_size_ok(dbs) or not _block_size_ok(hbs):
        raise die(f"{where}: unsupported verity block sizes {dbs}/{hbs}",
                  "build the hash tree with veritysetup format")
    if salt_size > 256:
        raise die(f"{where}: the verity superblock is corrupted (salt size {salt_size})",
                  "build the hash tree again")
    if blocks == 0:
        raise die(f"{where}: the verity superblock covers no data", "build the hash tree again")
    name = alg.split(b"\0")[0].decode("ascii", errors="replace")
    _hash(name)
    return VerityParams(version, hash_type, str(uuid.UUID(bytes=raw_uuid)), name, dbs, hbs,
                        blocks, salt[:salt_size], hash_offset)


def read_superblock(path: str, hash_offset: int = 0, *, base: int = 0) -> VerityParams:
    """The superblock of the hash device that starts BASE bytes into PATH (a partition of a
    DDI; 0 for a .verity file), HASH_OFFSET bytes into that device (veritysetup
    --hash-offset; 0 for what systemd-repart and veritysetup write by default)."""
    if hash_offset % 512:
        raise die(f"{path}: verity hash offset {hash_offset} is not a multiple of 512",
                  "rebuild the image")
    try:
        with open(path, "rb") as f:
            f.seek(base + hash_offset)
            data = f.read(SUPERBLOCK_SIZE)
    except OSError as e:
        raise die(f"cannot read {path}: {e.strerror}", "check the file") from None
    where = path if not base + hash_offset else f"{path} at byte {base + hash_offset}"
    return parse_superblock(data, where, hash_offset)


def _levels(p: VerityParams) -> tuple[int, int]:
    """(levels, hash_per_block_bits) as drivers/md/dm-verity-target.c computes them."""
    bits = (p.hash_block_size // p.digest_size).bit_length() - 1
    levels = 0
    while bits * levels < 64 and (p.data_blocks - 1) >> (bits * levels):
        levels += 1
    return levels, bits


def hash_device_size(p: VerityParams) -> int:
    """Bytes of the hash device the tree needs (superblock and offset included)."""
    levels, bits = _levels(p)
    blocks = 0
    for i in range(levels):
        blocks += (p.data_blocks + (1 << ((i + 1) * bits)) - 1) >> ((i + 1) * bits)
    return (p.hash_start_block + blocks) * p.hash_block_size


def _digest(p: VerityParams, block: bytes) -> bytes:
    h = _hash(p.algorithm)
    if p.hash_type == 1:
        h.update(p.salt)
        h.update(block)
    else:
        h.update(block)
        h.update(p.salt)
    return h.digest()


def check_root_hash(p: VerityParams, root_hash: bytes, hash_path: str, data_path: str, *,
                    hash_base: int = 0, data_base: int = 0) -> None:
    """Whether ROOT_HASH is the root of the tree in HASH_PATH, by hashing its top block (or,
    for a single data block, that block): what the kernel compares first. Catches a wrong or
    tampered root hash or hash tree before anything is activated. HASH_BASE and DATA_BASE
    are where the hash and data devices start in their files (partition offsets of a DDI).
    Raises on a mismatch."""
    if len(root_hash) != p.digest_size:
        raise die(f"{hash_path}: the root hash has {len(root_hash)} bytes, {p.algorithm} "
                  f"digests have {p.digest_size}", "use the root hash veritysetup printed")
    levels, _ = _levels(p)
    if levels:
        path, off = hash_path, hash_base + p.hash_start_block * p.hash_block_size
        size = p.hash_block_size
    else:
        path, off, size = data_path, data_base, p.data_block_size
    try:
        with open(path, "rb") as f:
            f.seek(off)
            block = f.read(size)
    except OSError as e:
        raise die(f"cannot read {path}: {e.strerror}", "check the file") from None
    if len(block) != size:
        raise die(f"{path} is truncated: its verity data ends early", "copy the image again")
    if _digest(p, block) != root_hash:
        raise die(f"{hash_path}: the verity root hash {root_hash.hex()} does not match the "
                  "hash tree", "the image, its hash tree or its root hash was changed: "
                  "rebuild or copy them again")


def verity_table(p: VerityParams, data_dev: str, hash_dev: str, root_hash: bytes, *,
                 sig_key_desc: str | None = None,
                 options: Sequence[str] = ()) -> tuple[int, int, str, str]:
    """The dm table entry for the device: (start sector, length in sectors, "verity",
    parameters), the parameters as verity.rst gives them:
    ``<version> <dev> <hash_dev> <data_block_size> <hash_block_size> <num_data_blocks>
    <hash_start_block> <algorithm> <digest> <salt> [<#opt_params> <opt_params>]``.
    DATA_DEV and HASH_DEV are "major:minor" or device paths. SIG_KEY_DESC names the kernel
    keyring key holding the PKCS#7 signature (root_hash_sig_key_desc); OPTIONS are further
    optional words (e.g. "panic_on_corruption")."""
    if len(root_hash) != p.digest_size:
        raise die(f"the verity root hash has {len(root_hash)} bytes, {p.algorithm} digests "
                  f"have {p.digest_size}", "use the root hash veritysetup printed")
    for dev in (data_dev, hash_dev):
        if not dev or any(c.isspace() for c in dev):
            raise ValueError(f"bad device {dev!r} for a dm table")
    opt = list(options)
    if sig_key_desc is not None:
        if not sig_key_desc or any(c.isspace() for c in sig_key_desc):
            raise ValueError(f"bad key description {sig_key_desc!r}")
        opt += ["root_hash_sig_key_desc", sig_key_desc]
    words = [str(p.hash_type), data_dev, hash_dev, str(p.data_block_size),
             str(p.hash_block_size), str(p.data_blocks), str(p.hash_start_block), p.algorithm,
             root_hash.hex(), p.salt.hex() if p.salt else "-"]
    if opt:
        words += [str(len(opt)), *opt]
    return 0, p.data_size // 512, "verity", " ".join(words)


def verity_table_line(p: VerityParams, data_dev: str, hash_dev: str, root_hash: bytes, *,
                      sig_key_desc: str | None = None, options: Sequence[str] = ()) -> str:
    """The same as one line of ``dmsetup table``: ``0 <sectors> verity <parameters>``."""
    start, length, target, params = verity_table(p, data_dev, hash_dev, root_hash,
                                                 sig_key_desc=sig_key_desc, options=options)
    return f"{start} {length} {target} {params}"


def reusable(table_params: str, root_hash: bytes, signed: bool) -> bool:
    """Whether a live verity device with these table parameters (dm.table_status(...,
    table=True)) may be shared: the same root hash, and signed the same way (a device set up
    without the kernel checking a signature is not reused for a signed activation, nor the
    other way round; verity_can_reuse())."""
    words = table_params.split()
    if len(words) < 10 or words[8].lower() != root_hash.hex():
        return False
    try:
        n = int(words[10]) if len(words) > 10 else 0
    except ValueError:
        return False
    return ("root_hash_sig_key_desc" in words[11:11 + n]) == signed


def device_name(root_hash: bytes) -> str:
    """The name systemd gives a shared verity device (DISSECT_IMAGE_VERITY_SHARE)."""
    return f"{root_hash.hex()}-verity"


def dm_uuid(p: VerityParams, name: str) -> str:
    """The dm UUID libcryptsetup gives a verity device ("CRYPT-VERITY-<uuid>-<name>"), by which
    libcryptsetup (and so systemd) recognises it as verity when it looks at it to reuse it."""
    return f"CRYPT-VERITY-{p.uuid.replace('-', '')}-{name}"[:128]


def key_description(p: VerityParams, name: str) -> str:
    """The description libcryptsetup gives the "user" key carrying the signature
    (VERITY_activate(): "cryptsetup:<uuid>-<name>")."""
    return f"cryptsetup:{p.uuid}-{name}"


# ---------------------------------------------------------------------------------------------
# (d) Userspace signature checks

CERT_DIRS = ("/etc/verity.d", "/run/verity.d", "/usr/local/lib/verity.d", "/usr/lib/verity.d")


def certificate_files(root: str = "/") -> list[str]:
    """conf_files_list_nulstr(".crt", CONF_FILES_REGULAR|CONF_FILES_FILTER_MASKED,
    CONF_PATHS_NULSTR("verity.d")) below ROOT: *.crt regular files by name, a name in an
    earlier directory hiding the same name in later ones, masked entries (empty, or a link
    to /dev/null) hiding and then dropped."""
    seen: dict[str, str | None] = {}
    for d in CERT_DIRS:
        top = os.path.join(root, d.lstrip("/"))
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for n in names:
            if not n.endswith(".crt") or n.startswith(".") or n in seen:
                continue
            p = os.path.join(top, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if (stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)) or \
                    (stat.S_ISREG(st.st_mode) and st.st_size == 0):
                seen[n] = None       # masked
            elif stat.S_ISREG(st.st_mode):
                seen[n] = p
    return [p for _, p in sorted(seen.items()) if p is not None]


class SignatureCheck(Record):
    """``ok`` with the certificate file and subject that verified it, or why not."""

    __slots__ = ("ok", "reason", "cert", "subject")
    ok: bool
    reason: str
    cert: str | None
    subject: str | None

    def __init__(self, ok: bool, reason: str, cert: str | None = None,
                 subject: str | None = None) -> None:
        self._fill(locals())


_DIGESTS = ("sha224", "sha256", "sha384", "sha512", "sha3_224", "sha3_256", "sha3_384",
            "sha3_512")


def verify_signature(root_hash: bytes, signature: bytes, *, root: str = "/",
                     environ: Mapping[str, str] | None = None,
                     cmdline: str | None = None,
                     cert_files: Sequence[str] | None = None) -> SignatureCheck:
    """validate_signature_userspace(): SIGNATURE must be a detached DER PKCS#7 SignedData
    over the lower-case hex ROOT_HASH, each SignerInfo by a certificate among CERT_FILES
    (default: certificate_files(ROOT)), identified by issuer and serial number or subject
    key identifier; certificates inside the signature are not trusted and chains are not
    checked (PKCS7_NOINTERN|PKCS7_NOVERIFY). With signed attributes, the message-digest
    attribute must be the content's digest and the signature covers the DER SET of the
    attributes. RSA (PKCS#1 v1.5; not PSS, as OpenSSL's PKCS7_verify()) and ECDSA keys;
    MD5 and SHA-1 digests are refused. Never raises for a bad signature: the result says
    what is wrong."""
    allowed, why = userspace_verification_allowed(environ, cmdline)
    if not allowed:
        return SignatureCheck(False, why)
    files = certificate_files(root) if cert_files is None else list(cert_files)
    if not files:
        where = ", ".join(os.path.join(root, d.lstrip("/")) for d in CERT_DIRS)
        return SignatureCheck(False, f"no *.crt certificate in {where}")

    import hashlib

    from asn1crypto import cms  # heavy: only when a signature is checked
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    certs = []
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(1024 * 1024)
            certs.append((path, x509.load_pem_x509_certificate(data)))
        except (OSError, ValueError):
            continue        # as PEM_read_X509() failing: skipped
    if not certs:
        return SignatureCheck(False, "none of " + ", ".join(files) + " holds a PEM certificate")

    content = root_hash.hex().encode()
    try:
        info = cms.ContentInfo.load(signature, strict=True)
        if info["content_type"].native != "signed_data":
            return SignatureCheck(False, "the signature is not PKCS#7 SignedData")
        sd = info["content"]
        if sd["encap_content_info"]["content"].native is not None:
            return SignatureCheck(False, "the signature embeds content; a detached "
                                  "signature of the root hash is needed")
        signers = list(sd["signer_infos"])
    except (ValueError, TypeError, KeyError) as e:
        return SignatureCheck(False, f"the signature is not valid DER PKCS#7 ({e})")
    if not signers:
        return SignatureCheck(False, "the signature has no signer")

    first: tuple[str, str] | None = None
    for si in signers:
        try:
            sid = si["sid"]
            if sid.name == "issuer_and_serial_number":
                iss = sid.chosen["issuer"].dump()
                serial = sid.chosen["serial_number"].native
                match = [(p, c) for p, c in certs
                         if c.serial_number == serial and c.issuer.public_bytes() == iss]
            else:
                ski = sid.chosen.native
                match = []
                for p, c in certs:
                    try:
                        ext = c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
                    except x509.ExtensionNotFound:
                        continue
                    if ext.value.digest == ski:
                        match.append((p, c))
            if not match:
                return SignatureCheck(False, "signed by a key whose certificate is not in "
                                      "verity.d (" + _signer_name(sid) + ")")
            path, cert = match[0]
            dname = si["digest_algorithm"]["algorithm"].native
            if dname not in _DIGESTS:
                return SignatureCheck(False, f"digest algorithm {dname} is refused")
            hcls = getattr(hashes, dname.upper())
            attrs = si["signed_attrs"]
            if attrs.native is not None and len(attrs):
                md = ct = None
                for a in attrs:
                    t = a["type"].native
                    if t == "message_digest":
                        md = a["values"][0].native
                    elif t == "content_type":
                        ct = a["values"][0].native
                if md is None or ct is None:
                    return SignatureCheck(False, "the signed attributes lack the message "
                                          "digest or the content type")
                if ct != "data":
                    return SignatureCheck(False, f"the signed content type is {ct}, not data")
                h = hashlib.new(dname, content).digest()
                if md != h:
                    return SignatureCheck(False, "the signature is not for this root hash "
                                          "(message digest mismatch)")
                signed = b"\x31" + attrs.dump()[1:]
            else:
                signed = content
            sig_alg = si["signature_algorithm"]
            sig_bytes = si["signature"].native
            key = cert.public_key()
            if isinstance(key, rsa.RSAPublicKey):
                if sig_alg["algorithm"].native == "rsassa_pss":
                    # OpenSSL's PKCS7_verify(), which systemd uses, checks PKCS#1 v1.5 only.
                    return SignatureCheck(False, "RSA-PSS signatures are not supported (as "
                                          "in systemd's userspace check)")
                else:
                    key.verify(sig_bytes, signed, padding.PKCS1v15(), hcls())
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig_bytes, signed, ec.ECDSA(hcls()))
            else:
                return SignatureCheck(False, f"{path}: unsupported key type")
        except InvalidSignature:
            return SignatureCheck(False, f"the signature does not verify with {path}",
                                  path, cert.subject.rfc4514_string())
        except (ValueError, TypeError, KeyError, AttributeError, UnsupportedAlgorithm) as e:
            return SignatureCheck(False, f"the signature cannot be checked ({e})")
        if first is None:
            first = (path, cert.subject.rfc4514_string())
    assert first is not None
    return SignatureCheck(True, f"signed by {first[1]} ({first[0]})", first[0], first[1])


def _signer_name(sid: object) -> str:
    try:
        chosen = sid.chosen  # type: ignore[attr-defined]
        if sid.name == "issuer_and_serial_number":  # type: ignore[attr-defined]
            return (f"issuer {chosen['issuer'].human_friendly}, serial "
                    f"{chosen['serial_number'].native:x}")
        return f"subject key identifier {chosen.native.hex()}"
    except (AttributeError, KeyError, ValueError):
        return "unknown signer"


# ---------------------------------------------------------------------------------------------
# (e) What list, status and the merge record say about a raw image

class Protection(Record):
    """How a raw image is (or would be) mounted: ``kind`` is what it offers the policy
    ("unprotected", "verity" or "signed"), ``designator`` the partition used ("root" or
    "usr"), ``root_hash`` hex, ``signature`` how the signature was checked once activated
    ("kernel", "userspace", or "unchecked" under $SYSTEMD_DISSECT_VERITY_SIGNATURE=0; None
    before activation or without one), ``policy`` the image policy it was checked against."""

    __slots__ = ("kind", "designator", "root_hash", "signature", "policy")
    kind: str
    designator: str
    root_hash: str | None
    signature: str | None
    policy: str

    def __init__(self, kind: str, designator: str, root_hash: str | None,
                 signature: str | None, policy: str) -> None:
        self._fill(locals())

    def to_json(self) -> dict[str, str | None]:
        return {"protection": self.kind, "designator": self.designator,
                "root_hash": self.root_hash, "signature": self.signature,
                "policy": self.policy}

    @classmethod
    def from_json(cls, j: object) -> Protection | None:
        if not isinstance(j, dict) or j.get("protection") not in ("unprotected", "verity",
                                                                    "signed"):
            return None
        return cls(str(j["protection"]), str(j.get("designator") or "root"),
                   j.get("root_hash") if isinstance(j.get("root_hash"), str) else None,
                   j.get("signature") if isinstance(j.get("signature"), str) else None,
                   str(j.get("policy") or ""))
