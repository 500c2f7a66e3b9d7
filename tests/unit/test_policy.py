"""Image policies: parsing, rendering and evaluation, against what systemd 262 answers.

tests/data/image_policy_262.json holds upstream's answers for 400+ policy strings (recorded by
tests/data/gen_image_policy_262.py from systemd-analyze image-policy and systemd-sysext
--image-policy= of the sid tree); the table-driven tests compare overlayctl with them, and
test_live_peer asks the live upstream again where /work/peer is there.
"""

from __future__ import annotations

import json
import os

import pytest

from overlayctl import policy as P
from overlayctl.errors import OverlayctlError
from overlayctl.policy import (
    ABSENT,
    ENCRYPTED,
    SIGNED,
    UNPROTECTED,
    UNUSED,
    VERITY,
    Partition,
    PolicyError,
    PolicyRefused,
    allows,
    check_fstype,
    check_partitions,
    check_single_filesystem,
    flags_to_string,
    parse_policy,
    pick_policy,
    policy_to_string,
)
from tests.data import policy_oracle as oracle

DATA = json.loads(oracle.DATA.read_text())
CASES = DATA["cases"]
ERRNO = {"Invalid argument": "EINVAL", "Invalid request code": "EBADRQC",
         "Invalid slot": "EBADSLT", "Name not unique on network": "ENOTUNIQ"}


def _errno_of(error: str) -> str:
    return ERRNO[error.rsplit(": ", 1)[1]]


def _table(pol: P.ImagePolicy) -> dict[str, list[str]]:
    """The rows systemd-analyze image-policy prints, computed by overlayctl."""
    def row(f: int) -> list[str]:
        ro = {P.READ_ONLY_ON: "yes", P.READ_ONLY_OFF: "no"}.get(f & P.READ_ONLY_MASK, "-")
        gr = {P.GROWFS_ON: "yes", P.GROWFS_OFF: "no"}.get(f & P.GROWFS_MASK, "-")
        return [flags_to_string(f & P.USE_MASK), ro, gr, flags_to_string(f & P.FSTYPE_MASK)]
    out = {d: row(pol.flags(d)) for d in P.DESIGNATORS}
    out["default"] = row(pol.default)
    return out


def test_data_is_large_and_mixed() -> None:
    assert DATA["upstream"].startswith("systemd 262")
    assert len(CASES) >= 40
    assert sum(c["ok"] for c in CASES) >= 20
    assert sum(not c["ok"] for c in CASES) >= 20
    assert {_errno_of(c["error"]) for c in CASES if not c["ok"]} == set(ERRNO.values())


@pytest.mark.parametrize("case", CASES, ids=[repr(c["policy"])[:60] for c in CASES])
def test_matches_systemd_262(case: dict[str, object]) -> None:
    text = str(case["policy"])
    if not case["ok"]:
        with pytest.raises(PolicyError) as e:
            parse_policy(text)
        assert e.value.kind == _errno_of(str(case["error"]))
        assert "\n" not in e.value.message and "\r" not in e.value.message   # one line
        return
    pol = parse_policy(text)
    assert policy_to_string(pol) == case["short"]
    assert policy_to_string(pol, simplify=False) == case["long"]
    assert _table(pol) == case["table"]
    # What we render parses back to the same effective policy.
    again = parse_policy(policy_to_string(pol, simplify=False))
    assert all(again.flags(d) == pol.flags(d) for d in P.DESIGNATORS)


@pytest.mark.skipif(not oracle.available() or os.geteuid() != 0,
                    reason="needs the systemd 262 tree under /work/peer, and root")
def test_live_peer() -> None:
    """The recorded answers are still upstream's, and overlayctl agrees with it live."""
    for case in CASES[::3]:
        text = str(case["policy"])
        live = oracle.analyze(text)
        assert live["ok"] == case["ok"], text
        if live["ok"]:
            assert live["short"] == case["short"] and live["table"] == case["table"], text
            assert policy_to_string(parse_policy(text)) == live["short"], text
        else:
            with pytest.raises(PolicyError):
                parse_policy(text)
    for text in ("root=signed+absent", "root=bogus", "root=verity:", "=:="):
        ok, _ = oracle.sysext_accepts(text)
        try:
            parse_policy(text)
            mine = True
        except PolicyError:
            mine = False
        assert ok == mine, text


# ---------------------------------------------------------------------------------------------
# Parsing details

def test_error_names_the_bad_part() -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy("root=verity:usr=nonsense")
    assert "'nonsense'" in e.value.message and "usr=nonsense" in e.value.message
    assert e.value.hint and "verity" in e.value.hint
    with pytest.raises(PolicyError) as e:
        parse_policy("rot=verity", source="ImagePolicy")
    assert e.value.message.startswith("ImagePolicy=rot=verity:") and "'rot'" in e.value.message
    assert isinstance(e.value, OverlayctlError)


def test_graceful_skips_unknown_names() -> None:
    pol = parse_policy("root=verity+frobnicate:bogus=signed:usr=signed", graceful=True)
    assert pol.rules == (("root", VERITY), ("usr", SIGNED))
    # Graceful does not forgive duplicates or a missing '='.
    for bad in ("root=verity:root=signed", "root"):
        with pytest.raises(PolicyError):
            parse_policy(bad, graceful=True)


def test_unlisted_designators_default_to_ignore() -> None:
    pol = parse_policy("root=signed")
    assert pol.flags("home") & P.USE_MASK == UNUSED | ABSENT
    assert pol.flags("usr") & P.USE_MASK == UNUSED | ABSENT


def test_verity_partitions_inherit_from_their_data_partition() -> None:
    pol = parse_policy("usr=signed+absent+read-only-on")
    for d in ("usr-verity", "usr-verity-sig"):
        f = pol.flags(d)
        assert f & P.USE_MASK == UNPROTECTED | ABSENT
        assert f & P.READ_ONLY_MASK == P.READ_ONLY_ON
    # verity only: the signature partition is not derived, the default applies.
    pol = parse_policy("root=verity")
    assert pol.flags("root-verity") & P.USE_MASK == UNPROTECTED
    assert pol.flags("root-verity-sig") & P.USE_MASK == UNUSED | ABSENT


# ---------------------------------------------------------------------------------------------
# Class defaults (sysext.c: image_class_info[].default_image_policy)

def test_class_defaults() -> None:
    both = "verity+signed+encrypted+encryptedwithintegrity+unprotected+absent"
    assert policy_to_string(P.SYSEXT_POLICY) == f"root={both}:usr={both}"
    assert policy_to_string(P.CONFEXT_POLICY) == f"root={both}"
    # The man page's spelling (without encryptedwithintegrity) parses to a stricter policy.
    man = parse_policy("root=verity+signed+encrypted+unprotected+absent")
    assert man.flags("root") != P.CONFEXT_POLICY.flags("root")
    assert pick_policy("sysext", "/var/lib/extensions/a.raw") is P.SYSEXT_POLICY
    assert pick_policy("confext", "/.extra/confext/a.raw") is P.CONFEXT_POLICY
    assert pick_policy("sysext", "/.extra/sysext/a.raw", in_initrd=True) is \
        P.SYSEXT_STRICT_POLICY
    assert pick_policy("confext", "/.extra/confext/a.raw", in_initrd=True) is \
        P.CONFEXT_STRICT_POLICY
    # 262 gives /.extra/global_sysext/ the strict policy too (a signed image passes the
    # policy there, an unsigned one is refused: observed with systemd-sysext 262 in a chroot).
    assert pick_policy("sysext", "/.extra/global_sysext/a.raw", in_initrd=True) is \
        P.SYSEXT_STRICT_POLICY
    assert pick_policy("confext", "/.extra/global_confext/a.raw", in_initrd=True) is \
        P.CONFEXT_STRICT_POLICY
    assert pick_policy("sysext", "/.extra/other/a.raw", in_initrd=True) is P.DENY_POLICY
    explicit = parse_policy("root=signed")
    assert pick_policy("sysext", "/.extra/sysext/a.raw", explicit, in_initrd=True) is explicit


@pytest.mark.skipif(not oracle.available(), reason="needs the systemd 262 tree under /work/peer")
def test_builtin_policies_are_upstreams() -> None:
    for name, pol in (("@sysext", P.SYSEXT_POLICY), ("@confext", P.CONFEXT_POLICY),
                      ("@sysext-strict", P.SYSEXT_STRICT_POLICY),
                      ("@confext-strict", P.CONFEXT_STRICT_POLICY)):
        live = oracle.analyze(name)
        assert live["ok"], name
        assert policy_to_string(pol) == live["short"], name
        assert _table(pol) == live["table"], name


# ---------------------------------------------------------------------------------------------
# Evaluation (dissect_image()'s checks; the upstream behaviour for single file systems was
# observed with systemd-sysext 262: see test_live_sidecar_policy in test_verity.py)

@pytest.mark.parametrize(("policy", "offer", "ok"), [
    ("root=signed", "signed", True),
    ("root=signed", "verity", False),
    ("root=signed", "unprotected", False),
    ("root=verity", "signed", False),        # 262: signed is not plain verity
    ("root=verity", "verity", True),
    ("root=verity+signed", "signed", True),
    ("root=unprotected", "verity", False),
    ("root=encrypted", "unprotected", False),
    ("root=absent", "absent", True),
    ("root=absent", "unprotected", False),
    ("*", "signed", True),
    ("-", "unprotected", False),
    ("root=open", "encrypted", True),
    ("=verity", "verity", True),             # the default rule, for root
    ("=verity", "absent", False),
])
def test_allows(policy: str, offer: str, ok: bool) -> None:
    assert allows(parse_policy(policy), "root", offer) is ok


def test_single_filesystem_refusals_name_image_designator_and_policy() -> None:
    pol = parse_policy("root=signed:usr=signed")
    with pytest.raises(PolicyRefused) as e:
        check_single_filesystem(pol, "/x/foo.raw", "unprotected")
    msg = e.value.message
    assert "/x/foo.raw" in msg and "'root'" in msg and "root=signed:usr=signed" in msg
    check_single_filesystem(pol, "/x/foo.raw", "signed")
    # Ignored root: nothing to use.
    with pytest.raises(PolicyRefused):
        check_single_filesystem(parse_policy("usr=verity"), "a.raw", "verity")
    with pytest.raises(PolicyRefused, match="must be absent"):
        check_single_filesystem(parse_policy("root=absent"), "a.raw", "unprotected")
    # No partition table: the GPT flags count as off.
    with pytest.raises(PolicyRefused, match="read-only"):
        check_single_filesystem(parse_policy("root=signed+read-only-on"), "a.raw", "signed")
    check_single_filesystem(parse_policy("root=signed+read-only-off"), "a.raw", "signed")
    with pytest.raises(PolicyRefused, match="growfs"):
        check_single_filesystem(parse_policy("root=verity+growfs-on"), "a.raw", "verity")
    # Default class policies take anything unencrypted or verity.
    for prot in ("unprotected", "verity", "signed", "encrypted"):
        check_single_filesystem(P.SYSEXT_POLICY, "a.raw", prot)


def test_fstype() -> None:
    pol = parse_policy("root=erofs+squashfs")
    check_fstype(pol, "root", "squashfs", "a.raw")
    with pytest.raises(PolicyRefused, match="ext4"):
        check_fstype(pol, "root", "ext4", "a.raw")
    check_fstype(parse_policy("root=verity"), "root", "ext4", "a.raw")   # none named: any


def test_gpt_partitions() -> None:
    ro = Partition(read_only=True, fstype="erofs")
    ddi = {"usr": ro, "usr-verity": Partition(read_only=True),
           "usr-verity-sig": Partition(read_only=True)}
    assert check_partitions(P.SYSEXT_POLICY, "a.raw", ddi) == frozenset(ddi)
    assert check_partitions(parse_policy("usr=signed"), "a.raw", ddi) == frozenset(ddi)
    # verity only: the signature partition is ignored (not derived from usr, and the default
    # ignores it), so the image is used with verity and without its signature (as upstream;
    # the man page's note on "verity").
    assert check_partitions(parse_policy("usr=verity"), "a.raw", ddi) == \
        frozenset({"usr", "usr-verity"})
    # ... unless a rule forbids the signature partition outright.
    with pytest.raises(PolicyRefused, match="'usr-verity-sig' exists but must be absent"):
        check_partitions(parse_policy("usr=verity:usr-verity-sig=absent"), "a.raw", ddi)
    # Without the signature partition it is plain verity.
    unsigned = {k: v for k, v in ddi.items() if k != "usr-verity-sig"}
    check_partitions(parse_policy("usr=verity"), "a.raw", unsigned)
    with pytest.raises(PolicyRefused):
        check_partitions(parse_policy("usr=signed"), "a.raw", unsigned)
    # Without verity: encrypted|unprotected, then the probe says unprotected.
    plain = {"usr": ro}
    check_partitions(parse_policy("usr=unprotected"), "a.raw", plain)
    with pytest.raises(PolicyRefused):
        check_partitions(parse_policy("usr=encrypted"), "a.raw", plain)
    # GPT flags are checked against the policy.
    with pytest.raises(PolicyRefused, match="read-only"):
        check_partitions(parse_policy("usr=verity+read-only-off"), "a.raw", unsigned)
    # An ignored partition is not used; a forbidden one refuses the image.
    used = check_partitions(parse_policy("usr=signed:root=ignore"), "a.raw",
                            {**ddi, "root": Partition()})
    assert "root" not in used
    with pytest.raises(PolicyRefused, match="'root' exists but must be absent"):
        check_partitions(parse_policy("usr=signed:root=absent"), "a.raw",
                         {**ddi, "root": Partition()})
    # A required partition that is missing.
    with pytest.raises(PolicyRefused, match="'root' is absent"):
        check_partitions(parse_policy("usr=signed:root=signed"), "a.raw", ddi)
    # Encrypted after probing.
    with pytest.raises(PolicyRefused):
        check_partitions(parse_policy("usr=unprotected"), "a.raw",
                         {"usr": Partition(encrypted=True)})
    check_partitions(parse_policy("usr=encrypted"), "a.raw", {"usr": Partition(encrypted=True)})
    assert ENCRYPTED & P.SYSEXT_POLICY.flags("usr")
