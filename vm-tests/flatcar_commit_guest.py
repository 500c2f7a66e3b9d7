#!/usr/bin/python3
"""vm-tests: Flatcar's first boot to an immutable /etc (issue 13), in the guest.

Flatcar keeps the image's /etc in /usr/share/flatcar/etc and merges it, before systemd
starts, as the defaults below the real /etc (which is the upper). Here, after the first
boot has written /etc, `overlayctl confext commit site` turns the local state into
/var/lib/confexts/site.raw, the real /etc is emptied, and every later boot merges the
defaults and `site` read-only (and, later, with --mutable=ephemeral-import).

    flatcar_commit_guest.py install     boot 0, vm-init as PID 1: overlayctl's package, the
                                        image's /etc moved to /usr/share/flatcar/etc (the real
                                        /etc left empty), the PID-1 wrapper below
    flatcar_commit_guest.py setup-root  run by /usr/local/sbin/flatcar-vm-init, PID 1, before
                                        it execs systemd (what Flatcar's initrd does): empty
                                        the real /etc when boot 1 asked for it, then
                                        `overlayctl confext merge` in this boot's mode
    flatcar_commit_guest.py boot1       first boot (mode yes: the real /etc is the upper):
                                        a new file, an edit, a deletion, a new directory;
                                        `cleanup`, `confext commit site`; next boot: empty
                                        /etc, mode no
    flatcar_commit_guest.py boot2       read-only: exactly the committed /etc, writes refused,
                                        the real /etc empty
    flatcar_commit_guest.py boot3       the same after a reboot; next boot: ephemeral-import
    flatcar_commit_guest.py boot4       ephemeral-import: the same /etc, writable; writes go
                                        to a tmpfs, the real /etc stays empty
    flatcar_commit_guest.py boot5       after a reboot: the ephemeral writes are gone

Boots 1-5 need systemd started through the wrapper: init=/usr/local/sbin/flatcar-vm-init
(it mounts /proc, /sys, /dev and /run, loads the modules, runs `setup-root`, then execs
/lib/systemd/systemd with the kernel's arguments).

vm-tests/run.sh runs it as its "flatcar" sequence, on its own fresh copy of the root image
(install moves the whole image /etc away, so it cannot share a root with guest.py), with a
payload of this file and overlayctl's Debian package, the run script
    exec python3 /payload/flatcar_commit_guest.py "$(cat /payload/stage)"
and the boots
    boot 0 install vm-init
    boot N bootN /usr/local/sbin/flatcar-vm-init     for N = 1 .. 5 (vm-boot.sh's INIT=/PATH)
then, on the host, `debugfs -R 'ls /etc' root.ext4` lists nothing (the real /etc stayed
empty) and /var/lib/confexts/site.raw is there.
The guest needs nothing beyond the cached rootfs (python3, systemd, util-linux, kmod,
squashfs-tools); the setup-root step prints its CHECK lines on the console like the rest.

On a development host the same sequence runs without a VM:

    flatcar_commit_guest.py --root=DIR --overlayctl="python3 -m overlayctl" simulate

lays out a small OS tree in DIR, runs `install`, then each boot in a fresh private mount
namespace (`setup-root` and the boot's stage; the namespace going away is the reboot).
tests/integration/test_flatcar_vm_guest.py does that on every test run.

Every check prints one line "CHECK PASS|FAIL name :: detail", as guest.py does; command
output is indented with "| ". The exit status is 1 when a check failed. Stdlib only."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmcheck import Checks  # beside this script, in the payload too

CHECKS = Checks()
say, check = CHECKS.say, CHECKS.check

ROOT = "/"
OL: list[str] = ["/usr/bin/overlayctl"]       # from the Debian package
SIMULATED = False
PAYLOAD = "/payload"
HERE_LIB = "/usr/local/lib/flatcar-vm"
WRAPPER = "/usr/local/sbin/flatcar-vm-init"
DEFAULTS = "/usr/share/flatcar/etc"
STATE = "/var/lib/flatcar-vm"
SITE = "/var/lib/confexts/site.raw"
RELEASE = "extension-release.d/extension-release.site"
T0 = time.monotonic()

WRAPPER_SH = """#!/bin/sh
# PID 1 of the Flatcar scenario's systemd boots (vm-tests/flatcar_commit_guest.py): what
# Flatcar's initrd does before the real init, then systemd itself.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount --make-rshared /
for m in overlay squashfs erofs loop; do
    modprobe -q $m || echo "flatcar-vm-init: modprobe $m failed"
done
python3 -I @HERE@/flatcar_commit_guest.py setup-root </dev/console >/dev/console 2>&1
exec /lib/systemd/systemd "$@"
"""


# ------------------------------------------------------------------------------------ helpers

def R(path: str) -> str:
    """PATH (absolute, as the system sees it) on the tree under test."""
    return os.path.join(ROOT, path.lstrip("/")) if ROOT != "/" else path




def run(argv: list[str], show: bool = True) -> tuple[int, str, str]:
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True)
    if show:
        say(f"$ {shlex.join(argv)}   [rc={r.returncode}, {time.monotonic() - t:.2f}s]")
        for line in (r.stdout + r.stderr).rstrip("\n").splitlines():
            say(f"  | {line}")
    return r.returncode, r.stdout, r.stderr


def ol(*args: str, show: bool = True) -> tuple[int, str, str]:
    return run([*OL, *([f"--root={ROOT}"] if SIMULATED else []), *args], show)


def ol_json(*args: str) -> object:
    _, out, _ = ol(*args, "--json=short")
    try:
        return json.loads(out)
    except ValueError:
        return None


def read(path: str) -> str | None:
    try:
        with open(R(path)) as f:
            return f.read()
    except OSError:
        return None


def write(path: str, text: str, mode: int = 0o644) -> None:
    p = R(path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(text)
    os.chmod(p, mode)


def state(name: str) -> str | None:
    v = read(f"{STATE}/{name}")
    return v.strip() if v is not None else None


def set_state(name: str, value: str) -> None:
    write(f"{STATE}/{name}", value + "\n")


def boot_id() -> str:
    if SIMULATED:
        return state("sim-boot") or "?"
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def etc_status() -> dict[str, object]:
    rows = ol_json("confext", "status")
    return next((r for r in rows if r.get("hierarchy") == "/etc"), {}) if isinstance(
        rows, list) else {}


def etc_tree() -> dict[str, list[object]]:
    """The merged /etc as a user sees it: rel -> [type and mode, uid, gid, rdev, content
    digest or link target, xattrs]; the metadata dir left out."""
    top = R("/etc")
    out: dict[str, list[object]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == top:
            dirnames[:] = [d for d in dirnames if d != ".systemd-confext"]
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            body = None
            if stat.S_ISREG(st.st_mode):
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
                with open(fd, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            try:
                xa = sorted(os.listxattr(p, follow_symlinks=False))
            except OSError:
                xa = []
            out[os.path.relpath(p, top)] = [stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                                           st.st_rdev, body, xa]
    return out


def raw_etc() -> list[str] | None:
    """What the real /etc holds under the overlay, seen from a private mount namespace in
    which the overlay is taken off (the system's own view is left alone)."""
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"umount -l {shlex.quote(R('/etc'))} 2>/dev/null; "
                        f"ls -A {shlex.quote(R('/etc'))}"], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else None


def tree_diff(a: dict[str, list[object]], b: dict[str, list[object]]) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys[:8]) + (
        f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")


def writes_refused() -> tuple[bool, str]:
    try:
        with open(R("/etc/flatcar-vm/written-when-read-only"), "w") as f:
            f.write("x")
    except OSError as e:
        return e.errno == errno.EROFS, e.strerror or str(e)
    return False, "the write succeeded"


# ------------------------------------------------------------------------------------ install

DEFAULT_FILES = {
    "flatcar-vm/edit.conf": "default edit\n",
    "flatcar-vm/delete.conf": "default delete\n",
    "flatcar-vm/keep.conf": "default keep\n",
    "flatcar-vm/dir/inner.conf": "default inner\n",
}


def stage_install() -> None:
    say("install: overlayctl, and the image's /etc moved to the defaults layer")
    if not SIMULATED:
        # overlayctl's Debian package (tools/build-deb.sh on the host): /usr/bin/overlayctl,
        # the units in /usr/lib/systemd/system
        debs = sorted(n for n in os.listdir(PAYLOAD) if n.startswith("overlayctl_")
                      and n.endswith(".deb"))
        rc, _, _ = run(["dpkg", "-i", *(f"{PAYLOAD}/{n}" for n in debs[-1:])])
        check("install: dpkg -i overlayctl's package", len(debs) == 1 and rc == 0, str(debs))
        rc, _, _ = run(["systemctl", "enable", "overlayctl-confext.service"])
        check("install: overlayctl-confext.service enabled", rc == 0)
        # A machine id in the image: boot 1 is then not systemd's "first boot" (presets).
        run(["systemd-machine-id-setup"])
        os.makedirs(HERE_LIB, exist_ok=True)
        shutil.copy(os.path.abspath(__file__), f"{HERE_LIB}/flatcar_commit_guest.py")
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vmcheck.py"),
                    f"{HERE_LIB}/vmcheck.py")
        write(WRAPPER, WRAPPER_SH.replace("@HERE@", HERE_LIB), 0o755)
    rc, out, _ = ol("--version")
    check("install: overlayctl runs", rc == 0 and out.startswith("overlayctl"), out.strip())
    for rel, text in DEFAULT_FILES.items():
        write(f"/etc/{rel}", text)
    # Flatcar's image build: the finished /etc goes to /usr/share/flatcar/etc, on the
    # read-only, A/B-updated /usr; the root file system keeps an empty /etc.
    os.makedirs(R(DEFAULTS), exist_ok=True)
    for n in os.listdir(R("/etc")):
        os.rename(os.path.join(R("/etc"), n), os.path.join(R(DEFAULTS), n))
    os.chmod(R("/etc"), 0o755)
    check("install: the real /etc is empty", os.listdir(R("/etc")) == [],
          f"{len(os.listdir(R(DEFAULTS)))} entries in {DEFAULTS}")
    write("/usr/lib/overlayctl/confext.conf", f"[Defaults]\n/etc={DEFAULTS}\n")
    os.makedirs(R("/var/lib/extensions.mutable"), exist_ok=True)
    if not os.path.islink(R("/var/lib/extensions.mutable/etc")):
        os.symlink("/etc", R("/var/lib/extensions.mutable/etc"))
    os.makedirs(R("/var/lib/confexts"), exist_ok=True)
    set_state("mode", "yes")
    plan = ol_json("confext", "merge", "--mutable=yes", "--dry-run")
    p = plan[0] if isinstance(plan, list) and plan else {}
    check("install: boot 1 will merge the real /etc as the upper over the defaults",
          p.get("upper") == "host" and [la.get("role") for la in p.get("layers", [])]
          == ["meta", "defaults"], json.dumps(p.get("layers")))


# ------------------------------------------------------------------------------------ setup-root

def stage_setup_root() -> None:
    """Before systemd (PID 1 wrapper): what Flatcar's initrd-setup-root does for /etc."""
    mode = state("mode") or "yes"
    say(f"setup-root: /etc in mode {mode}")
    if state("empty-etc") == "yes":
        mounted = subprocess.run(["mountpoint", "-q", R("/etc")]).returncode == 0
        if check("setup-root: /etc is not merged yet", not mounted):
            for n in os.listdir(R("/etc")):
                p = os.path.join(R("/etc"), n)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
        check("setup-root: the real /etc emptied", os.listdir(R("/etc")) == [],
              " ".join(sorted(os.listdir(R("/etc")))))
        set_state("empty-etc", "done")
    rc, _, _ = ol("confext", "merge", f"--mutable={mode}", "--no-reload")
    check(f"setup-root: confext merge --mutable={mode}", rc == 0)
    set_state("setup-root", f"{boot_id()} {mode} {rc}")


def setup_ran(boot: str, mode: str) -> None:
    got = (state("setup-root") or "").split()
    check(f"{boot}: /etc was merged before systemd, in this boot", got == [boot_id(), mode, "0"],
          " ".join(got))
    if not SIMULATED:
        r = subprocess.run(["systemctl", "show", "-p", "ActiveState,Result",
                            "overlayctl-confext.service"], capture_output=True, text=True)
        props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        check(f"{boot}: overlayctl-confext.service (refresh at boot) succeeded",
              props.get("Result") == "success", r.stdout.replace("\n", " "))


def merged_as(boot: str, mode: str, exts: list[str], writable: bool) -> None:
    row = etc_status()
    check(f"{boot}: /etc merged ({mode}, confexts {exts or 'none'}, "
          f"{'writable' if writable else 'read-only'})",
          row.get("merged") and row.get("mutable") == mode and row.get("extensions") == exts
          and row.get("writable") is writable and row.get("defaults") == DEFAULTS,
          json.dumps(row))


# ------------------------------------------------------------------------------------ boots

def stage_boot1() -> None:
    setup_ran("boot1", "yes")
    merged_as("boot1", "yes", [], True)
    check("boot1: the defaults show through", read("/etc/flatcar-vm/edit.conf")
          == "default edit\n" and read("/etc/flatcar-vm/dir/inner.conf") == "default inner\n")
    # The machine's own /etc, as a first boot (Ignition, an admin) writes it.
    write("/etc/flatcar-vm/new.conf", "new in boot 1\n", 0o600)
    write("/etc/flatcar-vm/edit.conf", "edited in boot 1\n")
    os.unlink(R("/etc/flatcar-vm/delete.conf"))
    write("/etc/flatcar-vm/newdir/file.conf", "in a new directory\n")
    os.symlink("new.conf", R("/etc/flatcar-vm/new.link"))
    raw = raw_etc()
    check("boot1: the writes are in the real /etc (the upper)", raw is not None
          and "flatcar-vm" in raw, str(raw))
    ol("confext", "diff")
    # Flatcar's initrd drops identical copies (systemd's first boot makes a few: machine-id,
    # ld.so.cache, .pwd.lock) on every boot; here it happens live, before the commit.
    rc, _, _ = ol("confext", "cleanup")
    check("boot1: cleanup of identical copies (on the merged /etc)", rc == 0)
    ol("confext", "commit", "site", "--dry-run")
    before = etc_tree()
    rc, out, _ = ol("confext", "commit", "site")
    after = etc_tree()
    check("boot1: confext commit site", rc == 0 and "Committed" in out, out.strip())
    with open(R(SITE), "rb") as f:
        magic = f.read(4)
    check("boot1: /var/lib/confexts/site.raw is a squashfs image", magic == b"hsqs", repr(magic))
    check("boot1: nothing wrote to /etc while it was committed", before == after,
          tree_diff(before, after))
    with open(R(f"{STATE}/tree.json"), "w") as f:
        json.dump(before, f)
    set_state("empty-etc", "yes")
    set_state("mode", "no")


def committed_etc(boot: str) -> None:
    with open(R(f"{STATE}/tree.json")) as f:
        want = json.load(f)
    got = etc_tree()
    release = got.pop(RELEASE, None)
    if os.path.dirname(RELEASE) not in want:
        got.pop(os.path.dirname(RELEASE), None)      # the image brought the directory too
    text = read(f"/etc/{RELEASE}") or ""
    check(f"{boot}: the committed image's release file", release is not None
          and text.startswith("ID="), repr(text))
    check(f"{boot}: /etc is exactly the committed one", got == want, tree_diff(want, got))
    check(f"{boot}: the new file, the edit and the new directory",
          read("/etc/flatcar-vm/new.conf") == "new in boot 1\n"
          and read("/etc/flatcar-vm/edit.conf") == "edited in boot 1\n"
          and read("/etc/flatcar-vm/newdir/file.conf") == "in a new directory\n"
          and os.readlink(R("/etc/flatcar-vm/new.link")) == "new.conf")
    check(f"{boot}: the deleted default stays deleted",
          not os.path.lexists(R("/etc/flatcar-vm/delete.conf")))
    check(f"{boot}: an untouched default is there", read("/etc/flatcar-vm/keep.conf")
          == "default keep\n")


def real_etc_empty(boot: str) -> None:
    raw = raw_etc()
    check(f"{boot}: the real /etc under the overlay is empty", raw == [], str(raw))


def stage_readonly(boot: str) -> None:
    setup_ran(boot, "no")
    merged_as(boot, "no", ["site"], False)
    committed_etc(boot)
    ok, why = writes_refused()
    check(f"{boot}: writes to /etc are refused (EROFS)", ok, why)
    real_etc_empty(boot)
    if not SIMULATED:
        mid = (read("/etc/machine-id") or "").strip()
        check(f"{boot}: systemd booted with the committed machine id",
              len(mid) == 32 and mid == (read(f"{DEFAULTS}/machine-id") or "").strip(), mid)
    seen = (state("readonly-boots") or "").split()
    check(f"{boot}: a new boot", boot_id() not in seen, boot_id())
    set_state("readonly-boots", " ".join([*seen, boot_id()]))


def stage_boot2() -> None:
    stage_readonly("boot2")


def stage_boot3() -> None:
    stage_readonly("boot3")
    set_state("mode", "ephemeral-import")


def stage_boot4() -> None:
    setup_ran("boot4", "ephemeral-import")
    merged_as("boot4", "ephemeral-import", ["site"], True)
    committed_etc("boot4")
    write("/etc/flatcar-vm/ephemeral.conf", "written in boot 4\n")
    write("/etc/flatcar-vm/edit.conf", "edited in boot 4\n")
    os.unlink(R("/etc/flatcar-vm/new.conf"))
    check("boot4: writes work", read("/etc/flatcar-vm/ephemeral.conf") == "written in boot 4\n"
          and read("/etc/flatcar-vm/edit.conf") == "edited in boot 4\n"
          and not os.path.lexists(R("/etc/flatcar-vm/new.conf")))
    check("boot4: the writes are in the private tmpfs",
          os.path.exists(R("/etc/.systemd-confext/ephemeral/upper/flatcar-vm/ephemeral.conf")))
    real_etc_empty("boot4")
    set_state("ephemeral-boot", boot_id())


def stage_boot5() -> None:
    setup_ran("boot5", "ephemeral-import")
    check("boot5: a new boot", boot_id() != state("ephemeral-boot"), boot_id())
    merged_as("boot5", "ephemeral-import", ["site"], True)
    check("boot5: the writes of boot 4 are gone",
          not os.path.lexists(R("/etc/flatcar-vm/ephemeral.conf")))
    committed_etc("boot5")
    real_etc_empty("boot5")


STAGES = {"install": stage_install, "setup-root": stage_setup_root, "boot1": stage_boot1,
          "boot2": stage_boot2, "boot3": stage_boot3, "boot4": stage_boot4,
          "boot5": stage_boot5}
BOOTS = ["boot1", "boot2", "boot3", "boot4", "boot5"]


# ------------------------------------------------------------------------------------ simulation

def simulate(argv0: str, args: argparse.Namespace) -> None:
    """The whole sequence on a tree below --root, each boot in a private mount namespace."""
    for d in ("etc", "usr/lib", "var/lib", "run"):
        os.makedirs(R(f"/{d}"), exist_ok=True)
    write("/usr/lib/os-release", "ID=flatcar\nVERSION_ID=4000.0.0\n")
    write("/etc/hostname", "flatcar-vm\n")
    write("/etc/passwd", "root:x:0:0::/root:/bin/sh\n")
    os.symlink("../usr/lib/os-release", R("/etc/os-release"))
    stage_install()
    base = [sys.executable, os.path.abspath(argv0), f"--root={ROOT}",
            f"--overlayctl={args.overlayctl}"]
    for n, boot in enumerate(BOOTS, 1):
        set_state("sim-boot", f"simulated-boot-{n}")
        say(f"=== simulated {boot}")
        script = " && ".join(shlex.join([*base, s]) for s in ("setup-root", boot))
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            script], capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        check(f"simulated {boot}: every check passed", r.returncode == 0,
              f"rc {r.returncode}, {r.stdout.count('CHECK FAIL')} failed")


def main() -> int:
    global ROOT, OL, SIMULATED
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=[*STAGES, "simulate"])
    ap.add_argument("--root", default="/")
    ap.add_argument("--overlayctl", default="/usr/bin/overlayctl")
    args = ap.parse_args()
    ROOT = os.path.realpath(args.root)
    OL = shlex.split(args.overlayctl)
    SIMULATED = ROOT != "/"
    if args.stage == "simulate" and not SIMULATED:
        ap.error("simulate needs --root=DIR")
    say(f"flatcar_commit_guest.py {args.stage}: kernel {os.uname().release}"
        + (f", simulated in {ROOT}" if SIMULATED else ""))
    try:
        if args.stage == "simulate":
            simulate(sys.argv[0], args)
        else:
            STAGES[args.stage]()
    except Exception as e:      # a crash is a failed check, with the traceback shown
        import traceback
        for line in traceback.format_exc().splitlines():
            say(f"  | {line}")
        check(f"{args.stage}: guest script completed", False, repr(e))
    say(f"flatcar_commit_guest.py {args.stage}: done in {time.monotonic() - T0:.1f}s, "
        f"{CHECKS.failed} failed")
    sys.stdout.flush()
    os.sync()
    return 1 if CHECKS.failed else 0


if __name__ == "__main__":
    sys.exit(main())
