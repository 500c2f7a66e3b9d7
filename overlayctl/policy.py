"""Image policies as systemd 262 has them (systemd.image-policy(7)): parsing, rendering and
evaluation. Pure: no I/O, no imports beyond the error type and Record.

A policy maps each partition designator of the Discoverable Partitions Specification to a
set of flags: how the partition may be protected (verity, signed, encrypted, ...), whether it
may be unused or absent, the GPT read-only/growfs flags it must have, and the file systems it
may carry. ``parse_policy()`` accepts exactly the strings 262's ``image_policy_from_string()``
accepts, ``policy_to_string()`` renders like ``image_policy_to_string()``, and
``ImagePolicy.flags()`` is ``image_policy_get_exhaustively()``: verity and signature
partitions without a rule of their own inherit from the data partition they protect.

The ``check_*`` functions are the checks systemd's image dissection makes, in its order; each
raises a ``PolicyRefused`` naming the image, the designator and the policy.
"""

from __future__ import annotations

from overlayctl.errors import OverlayctlError
from overlayctl.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# Designators in systemd's enum order (the order of rules in a rendered policy).
DESIGNATORS = ("root", "usr", "home", "srv", "esp", "xbootldr", "swap",
               "root-verity", "usr-verity", "root-verity-sig", "usr-verity-sig", "tmp", "var")

VERITY = 1 << 0
SIGNED = 1 << 1
ENCRYPTED = 1 << 2
ENCRYPTEDWITHINTEGRITY = 1 << 3
UNPROTECTED = 1 << 4
UNUSED = 1 << 5
ABSENT = 1 << 6
OPEN = VERITY | SIGNED | ENCRYPTED | ENCRYPTEDWITHINTEGRITY | UNPROTECTED | UNUSED | ABSENT
IGNORE = UNUSED | ABSENT
USE_MASK = OPEN

READ_ONLY_OFF = 1 << 7
READ_ONLY_ON = 1 << 8
READ_ONLY_MASK = READ_ONLY_OFF | READ_ONLY_ON
GROWFS_OFF = 1 << 9
GROWFS_ON = 1 << 10
GROWFS_MASK = GROWFS_OFF | GROWFS_ON
PFLAGS_MASK = READ_ONLY_MASK | GROWFS_MASK

# File systems a policy may name, in the order systemd renders them.
FSTYPES = ("btrfs", "erofs", "ext4", "f2fs", "squashfs", "vfat", "xfs")
FSTYPE_FLAGS = {name: 1 << (11 + i) for i, name in enumerate(FSTYPES)}
FSTYPE_MASK = sum(FSTYPE_FLAGS.values())

# Protection flags in rendering order.
_USE_NAMES = (("verity", VERITY), ("signed", SIGNED), ("encrypted", ENCRYPTED),
              ("encryptedwithintegrity", ENCRYPTEDWITHINTEGRITY),
              ("unprotected", UNPROTECTED), ("unused", UNUSED), ("absent", ABSENT))

FLAG_NAMES: dict[str, int] = {
    **dict(_USE_NAMES), "open": OPEN, "ignore": IGNORE,
    "read-only-on": READ_ONLY_ON, "read-only-off": READ_ONLY_OFF,
    "growfs-on": GROWFS_ON, "growfs-off": GROWFS_OFF,
    **FSTYPE_FLAGS,
}

_VERITY_OF = {"root": "root-verity", "usr": "usr-verity"}
_SIG_OF = {"root": "root-verity-sig", "usr": "usr-verity-sig"}
_DATA_OF_VERITY = {v: k for k, v in _VERITY_OF.items()}
_DATA_OF_SIG = {v: k for k, v in _SIG_OF.items()}
_ORDER = {d: i for i, d in enumerate(DESIGNATORS)}
_WHITESPACE = " \t\n\r"      # systemd's WHITESPACE, what strstrip() removes


class PolicyError(OverlayctlError):
    """A policy string systemd would refuse. ``kind`` is the errno systemd returns:
    ENOTUNIQ (a rule given twice), EBADSLT (unknown designator), EBADRQC (unknown flag) or
    EINVAL (anything else)."""

    def __init__(self, message: str, hint: str | None, kind: str) -> None:
        super().__init__(message, hint)
        self.kind = kind


class PolicyRefused(OverlayctlError):
    """An image the policy does not allow."""


class _Inval(Exception):
    pass


class ImagePolicy(Record):
    """``default`` applies to designators without a rule; ``rules`` are (designator, flags)
    in designator order, flags as written (not normalized)."""

    __slots__ = ("default", "rules")
    default: int
    rules: tuple[tuple[str, int], ...]

    def __init__(self, default: int, rules: tuple[tuple[str, int], ...] = ()) -> None:
        self._fill(locals())

    def rule(self, designator: str) -> int | None:
        for d, f in self.rules:
            if d == designator:
                return f
        return None

    def get(self, designator: str) -> int | None:
        """image_policy_get(): the normalized flags from a rule of this designator or, for a
        verity or signature partition, derived from its data partition; None without."""
        f = self.rule(designator)
        if f is not None:
            return normalized(designator, f)
        data = _DATA_OF_VERITY.get(designator)
        if data is not None:
            df = self.get(data)
            if df is None or not df & (SIGNED | VERITY):
                return None
            return normalized(designator, UNPROTECTED | (df & (UNUSED | ABSENT))
                              | (df & PFLAGS_MASK))
        data = _DATA_OF_SIG.get(designator)
        if data is not None:
            df = self.get(data)
            if df is None or not df & SIGNED:
                return None
            return normalized(designator, UNPROTECTED | (df & (UNUSED | ABSENT))
                              | (df & PFLAGS_MASK))
        return None

    def flags(self, designator: str) -> int:
        """image_policy_get_exhaustively(): what applies to DESIGNATOR, falling back to the
        default. Every flag group is filled in (an unset group means "any")."""
        if designator not in _ORDER:
            raise ValueError(f"unknown partition designator {designator!r}")
        f = self.get(designator)
        return normalized(designator, self.default) if f is None else f


def extend(flags: int) -> int:
    """partition_policy_flags_extend(): an empty group of flags means all of it."""
    if not flags & USE_MASK:
        flags |= OPEN
    if not flags & READ_ONLY_MASK:
        flags |= READ_ONLY_MASK
    if not flags & GROWFS_MASK:
        flags |= GROWFS_MASK
    return flags


def normalized(designator: str, flags: int) -> int:
    """partition_policy_normalized_flags(): the flags extended, minus those that make no
    sense for DESIGNATOR."""
    flags = extend(flags)
    if designator in _DATA_OF_VERITY or designator in _DATA_OF_SIG:
        # The verity and signature partitions are the protection; they need none.
        flags &= ~(VERITY | SIGNED | ENCRYPTED | ENCRYPTEDWITHINTEGRITY)
    if designator not in _VERITY_OF:
        flags &= ~(VERITY | SIGNED)
    if flags & USE_MASK == ABSENT:
        flags &= ~PFLAGS_MASK
    return flags


# ---------------------------------------------------------------------------------------------
# Parsing

def _extract(s: str | None, sep: str) -> tuple[str | None, str | None]:
    """systemd's extract_first_word(s, sep, EXTRACT_DONT_COALESCE_SEPARATORS): the next word
    (backslash escapes the next character; a trailing one is an error) and what follows the
    separator, None when the string ended. (None, None) once everything was consumed."""
    if s is None:
        return None, None
    if not s:
        return "", None
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s):
                raise _Inval
            out.append(s[i + 1])
            i += 2
            continue
        if c in sep:
            return "".join(out), s[i + 1:]
        out.append(c)
        i += 1
    return "".join(out), None


_HINT = ("see systemd.image-policy(7): DESIGNATOR=FLAG+FLAG rules separated by ':', "
         "or '*', '-', '~'")


def _flags_from_string(s: str, graceful: bool, *, where: str, rule: str) -> int:
    if s in ("", "-"):
        return 0
    flags = 0
    rest: str | None = s
    while True:
        try:
            word, rest = _extract(rest, "+")
        except _Inval:
            raise PolicyError(f"{where}: bad escape in rule '{rule}'", _HINT, "EINVAL") from None
        if word is None:
            return flags
        name = word.strip(_WHITESPACE)
        f = FLAG_NAMES.get(name)
        if f is None:
            if graceful:
                continue
            what = f"empty flag in rule '{rule}'" if not name else \
                f"unknown flag '{name}' in rule '{rule}'"
            raise PolicyError(f"{where}: {what}",
                              "flags are " + ", ".join(FLAG_NAMES), "EBADRQC")
        flags |= f


def parse_policy(text: str, *, graceful: bool = False,
                 source: str = "--image-policy") -> ImagePolicy:
    """image_policy_from_string(): the policy TEXT describes, or a PolicyError naming the part
    of it that is wrong (SOURCE says where TEXT came from). With GRACEFUL (as for ImagePolicy=
    in configuration files) unknown designators and flags are skipped, as systemd does."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode()
    where = f"{source}={shown}"
    if text in ("", "-"):
        return IGNORE_POLICY
    if text == "*":
        return ALLOW_POLICY
    if text == "~":
        return DENY_POLICY
    default: int | None = None
    rules: dict[str, int] = {}
    rest: str | None = text
    while True:
        try:
            entry, rest = _extract(rest, ":")
            if entry is None:
                break
            name, flags_text = _extract(entry, "=")
        except _Inval:
            raise PolicyError(f"{where}: a trailing backslash", _HINT, "EINVAL") from None
        if not entry:
            raise PolicyError(f"{where}: an empty rule (a stray ':')", _HINT, "EINVAL")
        if flags_text is None:
            raise PolicyError(f"{where}: rule '{entry}' has no '='", _HINT, "EINVAL")
        assert name is not None
        designator = name.strip(_WHITESPACE)
        if not designator:
            if default is not None:
                raise PolicyError(f"{where}: the default rule ('={flags_text}') is given twice",
                                  _HINT, "ENOTUNIQ")
        elif designator not in _ORDER:
            if graceful:
                continue
            raise PolicyError(f"{where}: unknown partition designator '{designator}'",
                              "designators are " + ", ".join(DESIGNATORS), "EBADSLT")
        elif designator in rules:
            raise PolicyError(f"{where}: partition designator '{designator}' is given twice",
                              _HINT, "ENOTUNIQ")
        flags = _flags_from_string(flags_text.strip(_WHITESPACE), graceful,
                                   where=where, rule=entry)
        if designator:
            rules[designator] = flags
        else:
            default = flags
    return ImagePolicy(IGNORE if default is None else default,
                       tuple(sorted(rules.items(), key=lambda r: _ORDER[r[0]])))


# ---------------------------------------------------------------------------------------------
# Rendering

def flags_to_string(flags: int, simplify: bool = True) -> str:
    """partition_policy_flags_to_string()."""
    words: list[str] = []
    use = flags & USE_MASK
    if simplify and use == OPEN:
        words.append("open")
    elif simplify and use == IGNORE:
        words.append("ignore")
    else:
        words += [n for n, f in _USE_NAMES if flags & f]
    ro_on, ro_off = bool(flags & READ_ONLY_ON), bool(flags & READ_ONLY_OFF)
    if not simplify or ro_on != ro_off:
        words += ["read-only-on"] * ro_on + ["read-only-off"] * ro_off
    gr_on, gr_off = bool(flags & GROWFS_ON), bool(flags & GROWFS_OFF)
    if not simplify or gr_on != gr_off:
        words += ["growfs-off"] * gr_off + ["growfs-on"] * gr_on
    words += [n for n in FSTYPES if flags & FSTYPE_FLAGS[n]]
    return "+".join(words) if words else "-"


def _all_match(policy: ImagePolicy, expected: int) -> bool:
    if extend(policy.default) != extend(expected):
        return False
    return all(policy.flags(d) == normalized(d, expected) for d in DESIGNATORS)


def policy_to_string(policy: ImagePolicy, simplify: bool = True) -> str:
    """image_policy_to_string(): SIMPLIFY gives the short form systemd prints in messages
    ('*', '-', '~' where equivalent, rules equal to the default left out)."""
    if simplify:
        for symbol, flags in (("*", OPEN), ("-", IGNORE), ("~", ABSENT)):
            if _all_match(policy, flags):
                return symbol
    parts: list[str] = []
    for d, f in policy.rules:
        if simplify and normalized(d, policy.default) == f:
            continue
        parts.append(f"{d}={flags_to_string(f, simplify)}")
    if not simplify or extend(policy.default) != extend(IGNORE):
        parts.append(f"={flags_to_string(policy.default, simplify)}")
    return ":".join(parts) if parts else "-"


# ---------------------------------------------------------------------------------------------
# Policies built into systemd 262 (src/shared/image-policy.c), and the choice of sysext.c

_ANY_PROTECTION = VERITY | SIGNED | ENCRYPTED | ENCRYPTEDWITHINTEGRITY | UNPROTECTED | ABSENT

ALLOW_POLICY = ImagePolicy(OPEN)
DENY_POLICY = ImagePolicy(ABSENT)
IGNORE_POLICY = ImagePolicy(IGNORE)
SYSEXT_POLICY = ImagePolicy(IGNORE, (("root", _ANY_PROTECTION), ("usr", _ANY_PROTECTION)))
SYSEXT_STRICT_POLICY = ImagePolicy(IGNORE, (("root", SIGNED | ABSENT), ("usr", SIGNED | ABSENT)))
CONFEXT_POLICY = ImagePolicy(IGNORE, (("root", _ANY_PROTECTION),))
CONFEXT_STRICT_POLICY = ImagePolicy(IGNORE, (("root", SIGNED | ABSENT),))

CLASS_POLICIES = {"sysext": SYSEXT_POLICY, "confext": CONFEXT_POLICY}


def pick_policy(class_name: str, image_path: str, explicit: ImagePolicy | None = None, *,
                in_initrd: bool = False) -> ImagePolicy:
    """sysext.c's pick_image_policy(): an explicit policy wins; in the initrd, images that
    systemd-stub placed in /.extra/sysext/, /.extra/global_sysext/ (and the confext ones)
    from an untrusted ESP get the strict policies, anything else in /.extra/ nothing (as
    systemd 262 does, observed in a chroot); otherwise the class default. IMAGE_PATH is
    relative to the root."""
    if explicit is not None:
        return explicit
    if in_initrd:
        if image_path.startswith(("/.extra/sysext/", "/.extra/global_sysext/")):
            return SYSEXT_STRICT_POLICY
        if image_path.startswith(("/.extra/confext/", "/.extra/global_confext/")):
            return CONFEXT_STRICT_POLICY
        if image_path.startswith("/.extra/"):
            return DENY_POLICY
    return CLASS_POLICIES[class_name]


# ---------------------------------------------------------------------------------------------
# Evaluation: the checks of systemd's dissect_image(), in its order

# What an image offers for one designator, as systemd's found_flags.
FOUND: dict[str, int] = {
    "absent": ABSENT,           # no such partition
    "unused": UNUSED,           # there, but the policy said to ignore it
    "unprotected": UNPROTECTED,
    "verity": VERITY,           # a verity hash tree, no signature
    "signed": SIGNED,           # a verity hash tree and a signature of its root hash
    "encrypted": ENCRYPTED,     # LUKS
}


def allows(policy: ImagePolicy, designator: str, offer: str) -> bool:
    """Whether POLICY allows DESIGNATOR in state OFFER (a key of FOUND). A signed partition is
    "signed" only: a policy of plain "verity" does not take it (as in systemd 262)."""
    return bool(FOUND[offer] & policy.flags(designator))


def _refused(image: str, designator: str, policy: ImagePolicy, what: str) -> PolicyRefused:
    return PolicyRefused(
        f"{image}: {what}; the image policy '{policy_to_string(policy)}' does not allow it",
        "use an image that fits the policy, or pass --image-policy= that allows it")


def may_use(policy: ImagePolicy, designator: str, image: str) -> bool:
    """image_policy_may_use() for a partition that exists: refused if the policy wants it
    absent, False if the policy says to ignore it, else True."""
    f = policy.flags(designator) & USE_MASK
    if f == ABSENT:
        raise _refused(image, designator, policy,
                       f"partition '{designator}' exists but must be absent")
    return (f & ~ABSENT) != UNUSED


def check_protection(policy: ImagePolicy, designator: str, found: int, image: str) -> None:
    """image_policy_check_protection(): FOUND (FOUND values or'ed) must overlap the policy."""
    need = policy.flags(designator)
    if not found & need:
        raise _refused(image, designator, policy,
                       f"partition '{designator}' is {flags_to_string(found)}, the policy "
                       f"requires {flags_to_string(need & USE_MASK)}")


def check_partition_flags(policy: ImagePolicy, designator: str, image: str, *,
                          read_only: bool = False, growfs: bool = False) -> None:
    """image_policy_check_partition_flags(): the GPT read-only and growfs flags (both off for
    an image without a partition table)."""
    f = policy.flags(designator)
    for name, state, on, off in (("read-only", read_only, READ_ONLY_ON, READ_ONLY_OFF),
                                 ("growfs", growfs, GROWFS_ON, GROWFS_OFF)):
        if f & (on | off) == (off if state else on):
            raise _refused(image, designator, policy,
                           f"partition '{designator}' has the {name} flag "
                           f"{'on' if state else 'off'}, the policy requires it "
                           f"{'off' if state else 'on'}")


def check_fstype(policy: ImagePolicy, designator: str, fstype: str, image: str) -> None:
    """The file system must be one the policy names (if it names any). systemd 262 forces a
    single named file system type at mount time and does not check a list of several;
    overlayctl refuses anything outside the list, before mounting."""
    f = policy.flags(designator) & FSTYPE_MASK
    if f and not f & FSTYPE_FLAGS.get(fstype, 0):
        raise _refused(image, designator, policy,
                       f"partition '{designator}' is {fstype}, the policy allows "
                       f"{flags_to_string(f)}")


class Partition(Record):
    """What an image has for one designator: the GPT flags (False without a partition
    table) and the file system found on it (None before probing)."""

    __slots__ = ("read_only", "growfs", "fstype", "encrypted")
    read_only: bool
    growfs: bool
    fstype: str | None
    encrypted: bool

    def __init__(self, read_only: bool = False, growfs: bool = False, fstype: str | None = None,
                 encrypted: bool = False) -> None:
        self._fill(locals())


def check_single_filesystem(policy: ImagePolicy, image: str, protection: str,
                            fstype: str | None = None) -> None:
    """An image without a partition table is a root partition. PROTECTION is "unprotected",
    "verity" (root hash and hash tree sidecars), "signed" (and a signature) or "encrypted".
    A policy that ignores the root partition leaves nothing to use: refused too."""
    if not may_use(policy, "root", image):
        raise _refused(image, "root", policy, "the policy ignores its only partition, 'root'")
    check_protection(policy, "root", FOUND[protection], image)
    check_partition_flags(policy, "root", image)
    if fstype is not None:
        check_fstype(policy, "root", fstype, image)


def check_partitions(policy: ImagePolicy, image: str,
                     found: Mapping[str, Partition]) -> frozenset[str]:
    """A GPT image with the partitions FOUND (by designator, after systemd's selection):
    refuses what the policy forbids and returns the designators to use (those the policy
    does not say to ignore). The verity level of a data partition follows from its verity
    and signature partitions being there."""
    for d in found:
        if d not in _ORDER:
            raise ValueError(f"unknown partition designator {d!r}")
    used = {d for d in DESIGNATORS if d in found and may_use(policy, d, image)}
    for d in DESIGNATORS:
        if d in used:
            v, s = _VERITY_OF.get(d), _SIG_OF.get(d)
            if v is not None and v in used:
                flags = SIGNED if s is not None and s in used else VERITY
            else:
                flags = ENCRYPTED | UNPROTECTED
        else:
            flags = UNUSED if d in found else ABSENT
        check_protection(policy, d, flags, image)
        if d in used:
            p = found[d]
            check_partition_flags(policy, d, image, read_only=p.read_only, growfs=p.growfs)
    # After probing the file systems: encrypted or not.
    for d in DESIGNATORS:
        if d not in used:
            continue
        p = found[d]
        check_protection(policy, d, ENCRYPTED if p.encrypted else
                         UNPROTECTED | VERITY | SIGNED, image)
        if p.fstype is not None and d not in _DATA_OF_VERITY and d not in _DATA_OF_SIG:
            check_fstype(policy, d, p.fstype, image)
    return frozenset(used)


def describe(policy: ImagePolicy, designators: Iterable[str] = DESIGNATORS) -> dict[str, str]:
    """For messages and JSON: the protection each designator may have, as systemd-analyze
    image-policy shows it."""
    return {d: flags_to_string(policy.flags(d) & USE_MASK) for d in designators}
