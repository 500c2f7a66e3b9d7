"""Upstream systemd 262 as the oracle for image policies.

Two upstream programs from the sid tree under /work/peer answer for a policy string:
``systemd-analyze image-policy STRING`` (parse result, short and long form, and the effective
flags of every designator) and ``systemd-sysext --image-policy=STRING list`` (accepted or not,
with the message of parse_image_policy_argument()). Both run through the tree's own loader;
systemd-sysext inside a private mount namespace with --root= a throw-away directory.

Used by gen_image_policy_262.py (which records the answers in image_policy_262.json) and by
tests/unit/test_policy.py (which re-asks the live peer when /work/peer is there).
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from pathlib import Path

PEER = Path("/work/peer")
SID = PEER / "sid"
LOADER = SID / "usr/lib64/ld-linux-x86-64.so.2"
LIBS = f"{SID}/usr/lib/x86_64-linux-gnu/systemd:{SID}/usr/lib/x86_64-linux-gnu"
SYSEXT = PEER / "bin/systemd-sysext-sid"
DATA = Path(__file__).with_name("image_policy_262.json")


def available() -> bool:
    return LOADER.exists() and (SID / "usr/bin/systemd-analyze").exists()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env.update(SYSTEMD_LOG_COLOR="0", SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C")
    return env


def analyze(policy: str) -> dict[str, object]:
    """What systemd-analyze image-policy says about POLICY."""
    p = subprocess.run([str(LOADER), "--library-path", LIBS, str(SID / "usr/bin/systemd-analyze"),
                        "--no-pager", "image-policy", "--", policy],
                       capture_output=True, text=True, env=_env(), check=False)
    if p.returncode != 0:
        return {"ok": False, "error": p.stderr.strip().splitlines()[-1]}
    short = long = None
    for line in (p.stdout + p.stderr).splitlines():
        line = line.strip()
        if line.startswith("Analyzing policy: "):
            short = long = line[len("Analyzing policy: "):]
        elif line.startswith("Long form: "):
            long = line[len("Long form: "):]
    table: dict[str, list[str]] = {}
    for line in p.stdout.splitlines():
        cols = line.split()
        if len(cols) == 5 and cols[0] != "PARTITION":
            table[cols[0]] = cols[1:]
    return {"ok": True, "short": short, "long": long, "table": table}


def sysext_accepts(policy: str) -> tuple[bool, str]:
    """Whether systemd-sysext 262 accepts --image-policy=POLICY (list on an empty root)."""
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(f"{d}/usr/lib")
        Path(f"{d}/usr/lib/os-release").write_text("ID=oracle\n")
        p = subprocess.run(["unshare", "-m", "--propagation", "private", "--", str(SYSEXT),
                            f"--root={d}", f"--image-policy={policy}", "list"],
                           capture_output=True, text=True, env=_env(), check=False)
    err = p.stderr.strip().splitlines()
    return p.returncode == 0, err[-1] if err else ""


# Policy strings worth asking about: the man page's examples, each special form, every
# designator and flag, and the corners of systemd's word splitting.
CURATED = [
    # systemd.image-policy(7) examples and special policies
    "usr=verity+read-only-on:root=encrypted:swap=encrypted",
    "root=encrypted+read-only-off:srv=encrypted+absent:swap=absent",
    "root=unprotected+encrypted:swap=absent+unused:=unprotected+encrypted+absent",
    "root=erofs+squashfs:swap=absent+unused:=unprotected+encrypted+absent",
    "*", "-", "~", "", "=", "=-", "=*", "=~", "=open", "=ignore", "=absent",
    # the class defaults as sysext.c and the man page spell them
    "root=verity+signed+encrypted+unprotected+absent:usr=verity+signed+encrypted+unprotected+absent",
    "root=verity+signed+encrypted+unprotected+absent",
    "root=verity+signed+encrypted+encryptedwithintegrity+unprotected+absent",
    "root=signed+absent:usr=signed+absent",
    # every designator
    *[f"{d}=verity" for d in ("root", "usr", "home", "srv", "esp", "xbootldr", "swap",
                              "root-verity", "usr-verity", "root-verity-sig", "usr-verity-sig",
                              "tmp", "var")],
    # every flag
    *[f"root={f}" for f in ("verity", "signed", "encrypted", "encryptedwithintegrity",
                            "unprotected", "unused", "absent", "open", "ignore",
                            "read-only-on", "read-only-off", "growfs-on", "growfs-off",
                            "btrfs", "erofs", "ext4", "f2fs", "squashfs", "vfat", "xfs")],
    # verity and signature partitions inheriting from their data partition
    "root=signed", "root=verity", "root=verity+unused", "usr=signed+absent+read-only-on",
    "root=unprotected", "root=signed:root-verity-sig=absent", "usr=verity:=open",
    "root=verity+growfs-on+read-only-on", "root=absent+read-only-on",
    "root=read-only-on+read-only-off:usr=growfs-on+growfs-off",
    "root=verity:usr=signed:home=encrypted:srv=unprotected:esp=absent:xbootldr=unused:swap=ignore"
    ":root-verity=open:usr-verity=unprotected:root-verity-sig=absent:usr-verity-sig=unused"
    ":tmp=encrypted+absent:var=encryptedwithintegrity",
    "root=verity:=verity", "=verity+signed", "home=verity+encrypted",
    "root=open+xfs", "root=ignore+erofs", "=open+xfs", "=squashfs",
    # refused: unknown names, duplicates, missing '='
    "root=nonsense", "nonsense=verity", "ROOT=verity", "root=Verity", "usr=signed:usr=verity",
    "=verity:=signed", "root=verity:root=signed", "root", "root=verity:usr", "=:=",
    "*:root=verity", "root=*", "root=~", "-:root=verity", "root=verity=signed",
    "root-verity-sig=signed+", "root=+verity", "root=verity++signed", "root=verity+",
    "root=-+verity", "root=verity:", ":root=verity", "::", ":", "root=verity::usr=verity",
    "root=ver ity", "root=verity, usr=verity", "root=verity;usr=verity",
    "root=ignore:home=open:", "sysext",
    # whitespace and escapes as extract_first_word() and strstrip() treat them
    " root = verity + signed ", "root=verity\t", "\troot=verity", " ", " -", "- ", " *",
    "root= - ", "root=-", "root=", "ro\\ot=verity", "root=ver\\ity", "root=verity\\",
    "root=verity\\:usr=verity", "root\\=verity", "root=verity\\+signed", "\\", "root=\\",
    'root="verity"', "root='verity'", "root=ver\"ity\"", "root=verity\n", "root=verity\r",
    "root=verity\v", "root=\u00a0verity",
]


def random_policies(n: int, seed: int = 262) -> list[str]:
    """N random policy strings made of valid and invalid pieces (fixed seed: reproducible)."""
    rng = random.Random(seed)
    names = ["root", "usr", "home", "swap", "root-verity", "usr-verity", "root-verity-sig",
             "usr-verity-sig", "tmp", "var", "esp", ""]
    flags = ["verity", "signed", "encrypted", "encryptedwithintegrity", "unprotected",
             "unused", "absent", "open", "ignore", "read-only-on", "read-only-off",
             "growfs-on", "growfs-off", "erofs", "squashfs", "ext4"]
    out = []
    for _ in range(n):
        rules = []
        for d in rng.sample(names, rng.randint(1, 4)):
            fl = "+".join(rng.sample(flags, rng.randint(0, 4)))
            if rng.random() < 0.03:
                fl = rng.choice(["-", "-+verity", "verity+-", " - "])
            rules.append(f"{d}={fl}")
        s = ":".join(rules)
        if rng.random() < 0.08:
            s = s.replace("=", " = ", 1)
        if rng.random() < 0.05:
            s += ":" + rng.choice(["bogus=verity", "root=bogus", "x", ":", "root=verity"])
        out.append(s)
    return out


def all_policies() -> list[str]:
    seen: dict[str, None] = {}
    for s in CURATED + random_policies(300):
        seen.setdefault(s, None)
    return list(seen)
