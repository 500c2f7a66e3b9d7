#!/usr/bin/python3
"""Guest side of the VM scenario of issue 10: the real /usr as its own upper, a sysext merged
at boot by the units, dpkg installing and removing .debs across reboots (docs/modes.md,
"Writable /usr on a package-managed distro"). Self-contained: it installs overlayctl's
Debian package from the payload itself and needs the .debs in the payload. vm-tests/run.sh
runs it as its "usr-dpkg" sequence, on a fresh copy of the root image:

    payload:  /payload/usr_dpkg_guest.py (this file)
              /payload/overlayctl_*.deb   this tree's package (tools/build-deb.sh)
              /payload/debs/*.deb         DEBS below, from tools/debian-tree.sh's cache
                                          (/var/cache/overlayctl/debian-trixie/debs)
    boots:    usr_dpkg_guest.py install   vm-init as PID 1
              usr_dpkg_guest.py boot1     systemd as PID 1, then reboot
              usr_dpkg_guest.py boot2     systemd as PID 1, then reboot
              usr_dpkg_guest.py boot3     systemd as PID 1, then power off
    host:     after boot 3, with the guest's root disk image:
              for c in HOST_DEBUGFS: debugfs -R "$c" ROOT.img  (output of each, in order)
              then host_check(outputs) -> lines "CHECK PASS|FAIL name :: detail"
              (`python3 usr_dpkg_guest.py host ROOT.img` does both)

It must not share a VM run with guest.py's boot 1, which re-merges /usr ephemeral.

dpkg --verify is compared with its output at install time, before anything was merged: the
guest's root image lacks the documentation, man pages and locales of the packages it was
built with (vm-boot.sh removes them to keep it small), which dpkg reports as missing; a check
fails on any line that was not there then.

What each boot checks:
  install  dpkg -i overlayctl's package, its two boot units enabled;
           /var/lib/extensions.mutable/usr -> ../../../usr, Mutable=yes for sysext, the
           sysext "tools" (/usr/bin/hello, a script; an empty /usr/share/doc/hello; files in
           /usr/share/tools, so that /usr/share is a directory of a lower layer).
  boot1    merged at boot, /usr its own upper and writable; dpkg -i hello bash-completion:
           the package's hello wins over the extension's; bash-completion made
           /usr/share/pkgconfig and /usr/share/cmake while merged; dpkg --verify clean.
  boot2    after the reboot: merged again, the packages' files there, dpkg --verify clean;
           a later sysext "pc" ships /usr/share/pkgconfig/pc-ext.pc: after
           `systemctl reload overlayctl-sysext.service` it shows beside bash-completion's
           files; a refresh with no mode anywhere (config moved away) keeps /usr writable;
           dpkg -r hello: /usr/bin/hello and /usr/share/doc/hello are gone while merged.
  boot3    after the reboot (the shutdown's unmerge dropped the whiteouts; if it did not
           run, this boot's merge did): the extension's hello is back; in a private mount
           namespace with the overlay taken off, the plain /usr holds no 0:0 device;
           dpkg --verify clean; dpkg lists hello as removed.
  host     debugfs on the powered-off disk: /usr/bin/hello and /usr/share/doc/hello do not
           exist in the plain /usr (no whiteout), bash-completion's files do, and the
           opaque marker of /usr/share/pkgconfig is gone.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmcheck import Checks  # beside this script, in the payload too

CHECKS = Checks("usr-dpkg ")
say, check = CHECKS.say, CHECKS.check

P = "/payload"
OL = "/usr/bin/overlayctl"             # from the Debian package in the payload
STATE = "/var/lib/vmtest/usr-dpkg"
DEBS = ("hello", "bash-completion")
EXT = "/var/lib/extensions"
EXT_HELLO = "#!/bin/sh\necho 'hello from the tools extension'\n"
PKG_HELLO = "Hello, world!"
PC = "/usr/share/pkgconfig/pc-ext.pc"




def sh(cmd: str) -> tuple[int, str]:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    out = (r.stdout + r.stderr).rstrip("\n")
    say(f"$ {cmd}   [rc={r.returncode}]")
    for line in out.splitlines():
        say(f"  | {line}")
    return r.returncode, out


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def sysext(name: str, files: dict[str, str], dirs: tuple[str, ...] = ()) -> None:
    root = f"{EXT}/{name}"
    write(f"{root}/usr/lib/extension-release.d/extension-release.{name}",
          "ID=debian\nVERSION_ID=13\n")
    for rel, text in files.items():
        write(f"{root}/{rel}", text, 0o755 if rel.startswith("usr/bin/") else 0o644)
    for d in dirs:
        os.makedirs(f"{root}/{d}", exist_ok=True)


def status_usr() -> dict[str, Any]:
    import json
    r = subprocess.run(f"{OL} sysext status --json=short", shell=True, capture_output=True,
                       text=True)
    try:
        rows: list[dict[str, Any]] = json.loads(r.stdout)
    except ValueError:
        return {}
    return next((row for row in rows if row.get("hierarchy") == "/usr"), {})


def writable(path: str) -> bool:
    probe = os.path.join(path, ".usr-dpkg-probe")
    try:
        with open(probe, "w") as f:
            f.write("x")
        os.unlink(probe)
        return True
    except OSError:
        return False


def debs() -> list[str]:
    found = []
    for name in DEBS:
        got = sorted(glob.glob(f"{P}/debs/{name}_*.deb"))
        check(f"payload has {name}.deb", got, f"{P}/debs")
        found += got[-1:]
    return found


def merged_usr(boot: str) -> None:
    st = status_usr()
    check(f"{boot}: /usr merged at boot by overlayctl-sysext.service",
          st.get("merged") and "tools" in (st.get("extensions") or []), str(st))
    check(f"{boot}: /usr is its own upper, mode yes, writable",
          st.get("upperdir") == "/usr" and st.get("mutable") == "yes" and writable("/usr"),
          str(st))


def plain_usr_whiteouts() -> list[str]:
    """0:0 devices in the plain /usr: in a private mount namespace with every overlay taken off
    /usr (the system's own mounts stay as they are)."""
    r = subprocess.run("unshare -m --propagation private sh -c "
                       "'while mountpoint -q /usr; do umount -l /usr; done; "
                       "find /usr -xdev -type c'",
                       shell=True, capture_output=True, text=True)
    say(f"plain /usr character devices: {r.stdout.split()} (rc {r.returncode})")
    return r.stdout.split() if r.returncode == 0 else ["<find failed>"]


# ---------------------------------------------------------------------------------------------


def dpkg_verify() -> str:
    """What dpkg --verify reports now and did not report at install time (printed)."""
    r = subprocess.run(["dpkg", "--verify"], capture_output=True, text=True)
    base = set((read(f"{STATE}/verify.base") or "").splitlines())
    new = [line for line in r.stdout.splitlines() if line not in base]
    say(f"$ dpkg --verify   [rc={r.returncode}, {len(r.stdout.splitlines())} lines, "
        f"{len(new)} not in the install-time baseline]")
    for line in new + r.stderr.splitlines():
        say(f"  | {line}")
    return "\n".join(new)


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def stage_install() -> None:
    pkg = sorted(glob.glob(f"{P}/overlayctl_*.deb"))
    rc, out = sh("dpkg -i " + " ".join(pkg[-1:]))
    check("install: dpkg -i overlayctl's package", len(pkg) == 1 and rc == 0, out[-300:])
    rc, out = sh("systemctl enable overlayctl-sysext.service overlayctl-confext.service")
    check("install: the boot units enabled", rc == 0, out)
    # a machine id now, so that boot 1 is not systemd's "first boot"
    sh("systemd-machine-id-setup")
    os.makedirs(STATE, exist_ok=True)
    base = subprocess.run(["dpkg", "--verify"], capture_output=True, text=True).stdout
    write(f"{STATE}/verify.base", base)
    say(f"dpkg --verify at install, before any merge (the baseline): {len(base.splitlines())} "
        f"lines, e.g. {base.splitlines()[:1]}")
    os.makedirs("/var/lib/extensions.mutable", exist_ok=True)
    link = "/var/lib/extensions.mutable/usr"
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("../../../usr", link)
    write("/etc/systemd/sysext.conf", "[SysExt]\nMutable=yes\n")
    sysext("tools", {"usr/bin/hello": EXT_HELLO, "usr/share/tools/README": "tools\n"},
           dirs=("usr/share/doc/hello",))
    for d in debs():
        shutil.copy(d, STATE)
    check("install: /usr will be its own upper", os.readlink(link) == "../../../usr")
    check("install: hello is not installed", not os.path.exists("/usr/bin/hello"))


def stage_boot1() -> None:
    merged_usr("boot1")
    rc, out = sh("hello")
    check("boot1: before the install, hello is the extension's",
          rc == 0 and "tools extension" in out, out)
    pkgs = sorted(glob.glob(f"{STATE}/*.deb"))
    rc, out = sh("dpkg -i " + " ".join(pkgs))
    check("boot1: dpkg -i hello bash-completion while merged", rc == 0, out[-300:])
    rc, out = sh("hello")
    check("boot1: the package's hello wins over the extension's", out.strip() == PKG_HELLO, out)
    for d in ("/usr/share/pkgconfig", "/usr/share/cmake", "/usr/share/bash-completion/helpers"):
        check(f"boot1: bash-completion made {d}", os.path.isdir(d))
    v = dpkg_verify()
    check("boot1: dpkg --verify clean while merged (nothing new)", v == "", v)


def stage_boot2() -> None:
    merged_usr("boot2")
    rc, out = sh("hello")
    check("boot2: the package's hello is still there after the reboot",
          out.strip() == PKG_HELLO, out)
    v = dpkg_verify()
    check("boot2: dpkg --verify clean after the reboot (nothing new)", v == "", v)
    sysext("pc", {PC.lstrip("/"): "Name: pc-ext\n"})
    rc, out = sh("systemctl reload overlayctl-sysext.service")
    check("boot2: systemctl reload overlayctl-sysext.service", rc == 0, out)
    check("boot2: the later extension's file in the package-made /usr/share/pkgconfig",
          os.path.isfile(PC), str(os.listdir("/usr/share/pkgconfig")))
    check("boot2: bash-completion's own files there too",
          any(n != "pc-ext.pc" for n in os.listdir("/usr/share/pkgconfig")),
          str(os.listdir("/usr/share/pkgconfig")))
    check("boot2: /usr writable after the reload", writable("/usr"))
    # A refresh that names no mode at all (config moved away) keeps /usr writable.
    os.rename("/etc/systemd/sysext.conf", "/etc/systemd/sysext.conf.away")
    try:
        rc, out = sh(f"{OL} sysext refresh --always-refresh=yes")
        check("boot2: refresh with no mode anywhere", rc == 0 and "Keeping mutable mode 'yes'"
              in out, out)
        check("boot2: /usr still writable after it", writable("/usr"))
    finally:
        os.rename("/etc/systemd/sysext.conf.away", "/etc/systemd/sysext.conf")
    rc, out = sh("dpkg -r hello")
    check("boot2: dpkg -r hello while merged", rc == 0, out[-300:])
    check("boot2: /usr/bin/hello and /usr/share/doc/hello gone while merged",
          not os.path.lexists("/usr/bin/hello") and not os.path.lexists("/usr/share/doc/hello"))
    v = dpkg_verify()
    check("boot2: dpkg --verify clean after the removal (nothing new)", v == "", v)


def stage_boot3() -> None:
    merged_usr("boot3")
    rc, out = sh("hello")
    check("boot3: the extension's hello is back", rc == 0 and "tools extension" in out, out)
    check("boot3: the extension's empty /usr/share/doc/hello is back",
          os.path.isdir("/usr/share/doc/hello"))
    check("boot3: the later extension's file still shows", os.path.isfile(PC))
    check("boot3: no 0:0 device in the plain /usr", plain_usr_whiteouts() == [])
    v = dpkg_verify()
    check("boot3: dpkg --verify clean (nothing new)", v == "", v)
    rc, out = sh("dpkg-query -W -f '${Status}' hello")
    check("boot3: dpkg knows hello as removed", "installed" not in out or "not-installed" in out,
          out)
    rc, out = sh("journalctl -b -1 -u overlayctl-sysext.service --no-pager -o cat")
    say("(the previous boot's unmerge, for the record: whiteouts dropped there or now)")


# ---------------------------------------------------------------------------------------------
# On the host, after boot 3 powered off: debugfs on the guest's root disk image.

HOST_DEBUGFS = ("stat /usr/bin/hello", "stat /usr/share/doc/hello",
                "stat /usr/share/bash-completion/bash_completion",
                "ea_list /usr/share/pkgconfig")


def host_check(outputs: list[str]) -> list[str]:
    """The CHECK lines for debugfs's OUTPUTS (one per HOST_DEBUGFS command, in order)."""
    hello, doc, bc, ea = outputs
    lines = []

    def add(name: str, ok: bool, detail: str) -> None:
        lines.append(f"CHECK {'PASS' if ok else 'FAIL'} usr-dpkg host: {name} :: "
                     f"{detail.strip()[:200]}")

    gone = "File not found by ext2_lookup"
    add("no /usr/bin/hello in the plain /usr (no whiteout)", gone in hello, hello)
    add("no /usr/share/doc/hello in the plain /usr (no whiteout)", gone in doc, doc)
    add("bash-completion's files are in the plain /usr", "Type: regular" in bc, bc)
    add("/usr/share/pkgconfig has no opaque marker any more", "overlay.opaque" not in ea
        and "not found" not in ea.lower(), ea)
    return lines


def host(image: str) -> int:
    outs = []
    for c in HOST_DEBUGFS:
        r = subprocess.run(["debugfs", "-R", c, image], capture_output=True, text=True)
        outs.append(r.stdout + r.stderr)
    lines = host_check(outs)
    for line in lines:
        say(line)
    return 1 if any(" FAIL " in line for line in lines) else 0


def main() -> int:
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    if stage == "host":
        return host(sys.argv[2])
    stages = {"install": stage_install, "boot1": stage_boot1, "boot2": stage_boot2,
              "boot3": stage_boot3}
    if stage not in stages:
        say(f"usage: {sys.argv[0]} install|boot1|boot2|boot3|host IMAGE")
        return 2
    try:
        stages[stage]()
    except Exception as e:      # a crash is a failed check, with the traceback on the console
        import traceback
        for line in traceback.format_exc().splitlines():
            say(f"  | {line}")
        check(f"{stage}: guest script completed", False, repr(e))
    sys.stdout.flush()
    os.sync()
    return 1 if CHECKS.failed else 0


if __name__ == "__main__":
    sys.exit(main())
