#!/usr/bin/python3
"""The part of vm-tests that runs inside the guest (started by /payload/run).

    guest.py install   boot 0, vm-init as PID 1: install overlayctl's Debian package, enable
                       its units, add the test fixtures to the (persistent) root; merge
                       nothing
    guest.py boot1     systemd as PID 1: the units merged everything at boot; check it,
                       write to /etc, switch /usr to an ephemeral upper and write to it
    guest.py boot2     systemd as PID 1: /etc writes persisted, ephemeral writes gone,
                       diff reports the default that the host updated between the boots,
                       refresh under a reader loop, EXTENSION_RELOAD_MANAGER=1, varlink;
                       restart_units_guest.py when it is in the payload

Every check prints one line "CHECK PASS|FAIL name :: detail"; run.sh counts them. Command
output is printed indented with "| ". The exit status is 1 when a check failed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmcheck import Checks  # beside this script, in the payload too

CHECKS = Checks()
say, check = CHECKS.say, CHECKS.check

P = "/payload"
OL = "/usr/bin/overlayctl"           # installed by the Debian package (payload/overlayctl_*.deb)
UNIT_DIR = "/usr/lib/systemd/system"
# the package's units and what each runs (ExecStart=, "-" = failure ignored, as in the unit)
PACKAGE_UNITS = {
    "overlayctl-confext.service": f"{OL} confext refresh",
    "overlayctl-sysext.service": f"{OL} sysext refresh",
    "overlayctl-sysext.socket": None,
    "overlayctl-sysext@.service": f"-{OL}",
}
STATE = "/var/lib/vmtest"            # on the persistent root: results handed from boot to boot
DEFAULTS = "/usr/share/vmtest/etc-defaults"
T0 = time.monotonic()




def sh(cmd: str, show: bool = True, quiet_ok: bool = False) -> tuple[int, str]:
    t = time.monotonic()
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    out = (r.stdout + r.stderr).rstrip("\n")
    if show and not (quiet_ok and r.returncode == 0):
        say(f"$ {cmd}   [rc={r.returncode}, {time.monotonic() - t:.2f}s]")
        for line in out.splitlines():
            say(f"  | {line}")
    return r.returncode, out


def ol(args: str, show: bool = True) -> tuple[int, str]:
    return sh(f"{OL} {args}", show)


def ol_json(args: str) -> object:
    r = subprocess.run(f"{OL} {args}", shell=True, capture_output=True, text=True)
    say(f"$ overlayctl {args}   [rc={r.returncode}]")
    for line in (r.stdout + r.stderr).splitlines():
        say(f"  | {line}")
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def unit_prop(unit: str, *props: str) -> dict[str, str]:
    r = subprocess.run(["systemctl", "show", "-p", ",".join(props), unit],
                       capture_output=True, text=True)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def boot_id() -> str:
    return (read("/proc/sys/kernel/random/boot_id") or "").strip()


def status_by_hierarchy() -> dict[str, dict[str, object]]:
    rows = ol_json("status --json=short")
    return {r["hierarchy"]: r for r in rows} if isinstance(rows, list) else {}


def diff_by_path() -> dict[str, dict[str, object]]:
    rows = ol_json("confext diff --json=short")
    return {r["path"]: r for r in rows} if isinstance(rows, list) else {}


# ------------------------------------------------------------------------------------ install

HELLO = """#!/bin/sh
# /usr/bin/hello-ext: shipped only by the system extension 'hello'
echo "hello-ext $(cat /usr/share/hello-ext/version) boot_id=$(cat /proc/sys/kernel/random/boot_id)"
"""

HELLO_UNIT = """[Unit]
Description=Run /usr/bin/hello-ext, which only the system extension 'hello' provides
After=overlayctl-sysext.service
Wants=overlayctl-sysext.service
Before=vm-test.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mkdir -p /var/lib/vmtest && /usr/bin/hello-ext >/var/lib/vmtest/hello-ext.out'

[Install]
WantedBy=vm-test.target multi-user.target
"""


def stage_install() -> None:
    say("installing overlayctl and the test fixtures into the guest's persistent root")
    osr = dict(line.split("=", 1) for line in (read("/usr/lib/os-release") or "").splitlines()
               if "=" in line)
    vid = osr.get("VERSION_ID", "").strip('"')
    # the project: the Debian package built on the host (tools/build-deb.sh)
    debs = sorted(n for n in os.listdir(P) if n.startswith("overlayctl_") and n.endswith(".deb"))
    if not check("install: the payload holds one overlayctl .deb", len(debs) == 1, " ".join(debs)):
        return
    deb = f"{P}/{debs[0]}"
    want_version = debs[0].split("_")[1]
    rc, out = sh(f"dpkg -i {deb}")
    _, status = sh("dpkg-query -W -f '${Status} ${Version}' overlayctl", show=False)
    check("install: dpkg -i of the package, its dependencies met by the guest",
          rc == 0 and status == f"install ok installed {want_version}", f"rc={rc} {status!r}")
    check("install: dpkg -i printed no error or warning",
          not any(w in out.lower() for w in ("error", "warning", "dependency problems")),
          "")
    _, audit = sh("dpkg --audit", show=False)
    check("install: dpkg --audit is clean", audit == "", audit[:200])
    check("install: /usr/bin/overlayctl from the package",
          os.access(OL, os.X_OK) and OL in sh("dpkg -L overlayctl", show=False)[1].split("\n"))
    rc, out = ol("--version")
    check("install: overlayctl runs in the guest, the package's version",
          rc == 0 and out == f"overlayctl {want_version}", out)
    rc, out = sh("python3 -c 'import overlayctl; print(overlayctl.__file__)'")
    check("install: the module is the package's (dist-packages)",
          rc == 0 and out == "/usr/lib/python3/dist-packages/overlayctl/__init__.py", out)
    for unit, run in PACKAGE_UNITS.items():
        text = read(f"{UNIT_DIR}/{unit}")
        execs = [line.split("=", 1)[1] for line in (text or "").splitlines()
                 if line.startswith("ExecStart=")]
        check(f"install: {UNIT_DIR}/{unit} from the package"
              + (f", ExecStart={run}" if run else ""),
              text is not None and "@OVERLAYCTL@" not in text
              and (execs == [run] if run else "ListenStream=" in text),
              f"ExecStart={execs}")
    # for verity signatures, which the package may soon depend on: in the cached root already
    rc, out = sh("python3 -c 'import cryptography, asn1crypto; "
                 "print(cryptography.__version__, asn1crypto.__version__)'")
    check("install: python3-cryptography and python3-asn1crypto are in the guest", rc == 0, out)
    # installing enabled nothing: not the units, not their [Install] targets' wants
    enabled_units = [u for u in PACKAGE_UNITS if "@" not in u]
    rc, out = sh("systemctl is-enabled " + " ".join(enabled_units))
    check("install: installing the package enabled nothing (systemctl is-enabled: disabled)",
          out.split() == ["disabled"] * len(enabled_units), " ".join(out.split()))
    _, links = sh("find /etc/systemd/system -lname '*overlayctl*'", show=False)
    check("install: no symlink to an overlayctl unit in /etc/systemd/system", links == "", links)

    # sysext 'hello' (directory) with the binary that hello-ext.service runs at boot
    ext = "/var/lib/extensions/hello"
    write(f"{ext}/usr/lib/extension-release.d/extension-release.hello",
          f"ID={osr.get('ID', 'debian')}\nVERSION_ID={vid}\n")
    write(f"{ext}/usr/bin/hello-ext", HELLO, 0o755)
    write(f"{ext}/usr/share/hello-ext/version", "1.0\n")
    # raw images built on the host (squashfs, erofs, GPT with a /usr partition)
    for name in sorted(os.listdir(f"{P}/images")):
        shutil.copy(f"{P}/images/{name}", f"/var/lib/extensions/{name}")
    write("/etc/systemd/system/hello-ext.service", HELLO_UNIT)

    # confext 'vmconf' over a defaults layer, the real /etc as the upper (Flatcar model)
    write("/var/lib/confexts/vmconf/etc/extension-release.d/extension-release.vmconf",
          "ID=_any\n")
    write("/var/lib/confexts/vmconf/etc/vmtest/from-confext.conf", "from confext vmconf\n")
    write(f"{DEFAULTS}/vmtest/default.conf", "default v1\n")
    write(f"{DEFAULTS}/vmtest/untouched.conf", "untouched v1\n")
    write("/usr/lib/overlayctl/confext.conf", f"[Defaults]\n/etc={DEFAULTS}\n")
    write("/etc/systemd/confext.conf", "[ConfExt]\nMutable=yes\n")
    os.makedirs("/var/lib/extensions.mutable", exist_ok=True)
    if not os.path.islink("/var/lib/extensions.mutable/etc"):
        os.symlink("/etc", "/var/lib/extensions.mutable/etc")

    # enable offline (PID 1 is not systemd here), as the admin does after installing
    rc, _ = sh("systemctl enable overlayctl-confext.service overlayctl-sysext.service "
               "overlayctl-sysext.socket hello-ext.service")
    wd = "/etc/systemd/system/sysinit.target.wants"
    wants = {w: os.readlink(f"{wd}/{w}") for w in sorted(os.listdir(wd)) if "overlayctl" in w}
    check("install: units enabled (sysinit.target.wants -> the package's units)", rc == 0 and
          wants == {u: f"{UNIT_DIR}/{u}" for u in ("overlayctl-confext.service",
                                                   "overlayctl-sysext.service")},
          str(wants))
    sock = "/etc/systemd/system/sockets.target.wants/overlayctl-sysext.socket"
    check("install: overlayctl-sysext.socket enabled (sockets.target.wants), systemd's "
          "systemd-sysext.socket enabled as shipped",
          os.path.islink(sock) and os.readlink(sock) == f"{UNIT_DIR}/overlayctl-sysext.socket"
          and os.path.islink(f"{UNIT_DIR}/sockets.target.wants/systemd-sysext.socket"),
          os.readlink(sock) if os.path.islink(sock) else "no link")
    # a machine id now, so that boot 1 is not systemd's "first boot"
    sh("systemd-machine-id-setup", quiet_ok=True)
    os.makedirs(STATE, exist_ok=True)
    ol("list")
    rows = ol_json("sysext list --json=short") or []
    types = {r["name"]: r["type"] for r in rows} if isinstance(rows, list) else {}
    check("install: sysext list sees the directory and the raw images",
          types == {"hello": "directory", "sqext": "raw", "erofsext": "raw", "gptext": "raw"},
          str(types))
    # nothing is merged now: boot 1's units must do it
    st = status_by_hierarchy()
    check("install: nothing merged before boot 1",
          st and all(r.get("merged") is False and r.get("extensions") == []
                     for r in st.values()),
          " ".join(f"{h}={r.get('extensions')}" for h, r in sorted(st.items())))


# ------------------------------------------------------------------------------------ boot 1

def units_merged_at_boot(boot: str) -> None:
    for u in ("overlayctl-confext.service", "overlayctl-sysext.service"):
        p = unit_prop(u, "UnitFileState", "ActiveState", "SubState", "Result",
                      "ExecMainStatus", "ExecMainExitTimestampMonotonic")
        check(f"{boot}: {u} enabled and ran at boot",
              p.get("UnitFileState") == "enabled" and p.get("ActiveState") == "active"
              and p.get("Result") == "success",
              f"{p.get('UnitFileState')} {p.get('ActiveState')}/{p.get('SubState')} "
              f"result={p.get('Result')} status={p.get('ExecMainStatus')}")
        sh(f"journalctl -b -o cat --no-pager -u {u}")
    # order: confext before sysext before hello-ext (as the units say)
    conf = unit_prop("overlayctl-confext.service", "ExecMainExitTimestampMonotonic")
    sysx = unit_prop("overlayctl-sysext.service", "ExecMainStartTimestampMonotonic",
                     "ExecMainExitTimestampMonotonic")
    hello = unit_prop("hello-ext.service", "ActiveState", "Result",
                      "ExecMainStartTimestampMonotonic")
    tmpf = unit_prop("systemd-tmpfiles-setup.service", "ExecMainStartTimestampMonotonic")
    c_end = int(conf.get("ExecMainExitTimestampMonotonic") or 0)
    s_start = int(sysx.get("ExecMainStartTimestampMonotonic") or 0)
    s_end = int(sysx.get("ExecMainExitTimestampMonotonic") or 0)
    h_start = int(hello.get("ExecMainStartTimestampMonotonic") or 0)
    t_start = int(tmpf.get("ExecMainStartTimestampMonotonic") or 0)
    check(f"{boot}: order confext -> sysext -> hello-ext.service",
          0 < c_end <= s_start and 0 < s_end <= h_start,
          f"confext done {c_end / 1e6:.2f}s, sysext {s_start / 1e6:.2f}-{s_end / 1e6:.2f}s, "
          f"hello-ext start {h_start / 1e6:.2f}s (monotonic)")
    if t_start:
        check(f"{boot}: sysext merged before systemd-tmpfiles-setup", s_end <= t_start,
              f"tmpfiles start {t_start / 1e6:.2f}s")
    out = (read(f"{STATE}/hello-ext.out") or "").strip()
    check(f"{boot}: hello-ext.service ran /usr/bin/hello-ext from the sysext at boot",
          hello.get("Result") == "success" and out == f"hello-ext 1.0 boot_id={boot_id()}",
          f"result={hello.get('Result')} output={out!r}")
    st = status_by_hierarchy()
    usr, etc = st.get("/usr", {}), st.get("/etc", {})
    check(f"{boot}: /usr merged by the unit with the directory and raw sysexts",
          usr.get("extensions") == ["erofsext", "gptext", "hello", "sqext"]
          and usr.get("mutable") == "no",
          f"{usr.get('extensions')} mutable={usr.get('mutable')}")
    check(f"{boot}: /etc merged by the unit: confext over defaults, real /etc as upper",
          etc.get("extensions") == ["vmconf"] and etc.get("mutable") == "yes"
          and etc.get("defaults") == DEFAULTS and etc.get("writable") is True,
          f"{etc.get('extensions')} mutable={etc.get('mutable')} upper={etc.get('upperdir')} "
          f"defaults={etc.get('defaults')}")
    for name, path, want in (("squashfs", "/usr/share/vmtest/squashfs.txt", "from squashfs\n"),
                             ("erofs", "/usr/share/vmtest/erofs.txt", "from erofs\n"),
                             ("GPT /usr partition", "/usr/share/vmtest/gpt.txt", "from gpt\n")):
        got = read(path)
        check(f"{boot}: {name} sysext image merged at boot", got == want, f"{path}: {got!r}")
    sh("grep -E ' (/usr|/etc|/opt)( |/)' /proc/self/mountinfo | cut -d' ' -f5,9,10 "
       "| sed 's/lowerdir=/\\n      lowerdir=/'")
    sh("losetup -l -O NAME,RO,AUTOCLEAR,BACK-FILE")


def diagnose_unmerged() -> None:
    """Not a check: when the units could not merge, show what the kernel said and whether
    the legacy mount(2) path (OVERLAYCTL_LEGACY_MOUNT=1) works on this kernel."""
    if read("/usr/bin/hello-ext") is not None:
        return
    say("DIAGNOSIS: nothing is merged; kernel messages and a try with OVERLAYCTL_LEGACY_MOUNT=1:")
    sh("dmesg | grep -i overlay | tail -4")
    sh(f"OVERLAYCTL_LEGACY_MOUNT=1 {OL} sysext merge --no-reload"
       f" && cat /usr/share/vmtest/squashfs.txt && {OL} sysext unmerge")
    sh("dmesg | grep -i overlay | tail -2")
    sh(f"OVERLAYCTL_LEGACY_MOUNT=1 {OL} confext merge --no-reload"
       f" && cat /etc/vmtest/from-confext.conf && {OL} confext unmerge")
    sh("dmesg | grep -i overlay | tail -2")


# ------------------------------------------------------------------ varlink, socket unit

VARLINK = "unix:/run/systemd/io.systemd.sysext"
SOCKETS = ("overlayctl-sysext.socket", "systemd-sysext.socket")


def socket_states() -> dict[str, dict[str, str]]:
    return {u: unit_prop(u, "LoadState", "UnitFileState", "ActiveState", "SubState")
            for u in SOCKETS}


def varlink(method: str, params: str = "{}", more: bool = False,
            user: str = "") -> tuple[int, list[object], str]:
    """varlinkctl call (trixie's) on the socket: rc, the replies (JSON), the output."""
    prefix = f"setpriv --reuid={user} --regid={user} --clear-groups " if user else ""
    rc, out = sh(f"{prefix}varlinkctl call --json=short {'--more ' if more else ''}"
                 f"{VARLINK} {method} '{params}'")
    replies: list[object] = []
    for line in out.splitlines():
        try:
            replies.append(json.loads(line))
        except ValueError:
            pass
    return rc, replies, out


def vendor() -> str:
    _, replies, _ = varlink("org.varlink.service.GetInfo")
    r = replies[0] if replies and isinstance(replies[0], dict) else {}
    return f"{r.get('vendor')} / {r.get('product')}"


def listening(boot: str, what: str, want: str) -> None:
    """Exactly one of the two conflicting sockets is active, WANT, and the service behind the
    path is that tool's (org.varlink.service.GetInfo)."""
    st = socket_states()
    active = [u for u, p in st.items() if p.get("ActiveState") == "active"]
    who = vendor()
    ours = want.startswith("overlayctl")
    check(f"{boot}: varlink: {what}: {want} listens on /run/systemd/io.systemd.sysext, "
          "the other socket is inactive",
          active == [want] and st[want].get("SubState") == "listening"
          and (who.startswith("overlayctl /") if ours else not who.startswith("overlayctl")
               and who != "None / None"),
          f"active: {active}; GetInfo: {who}")


def sockets_conflict(boot: str) -> None:
    """overlayctl-sysext.socket (enabled by the admin) and systemd-sysext.socket (enabled
    statically, as the systemd package ships it) both want /run/systemd/io.systemd.sysext.
    Ours has Conflicts=systemd-sysext.socket: it wins at boot (the stop job it pulls in matters
    more than the other's start, wanted by sockets.target), and starting one stops the other."""
    for u, p in socket_states().items():
        say(f"  {u}: {p}")
    listening(boot, "at boot, both enabled", "overlayctl-sysext.socket")
    sh("systemctl start systemd-sysext.socket")
    listening(boot, "after 'systemctl start systemd-sysext.socket'", "systemd-sysext.socket")
    sh("systemctl start overlayctl-sysext.socket")
    listening(boot, "after 'systemctl start overlayctl-sysext.socket'", "overlayctl-sysext.socket")


def varlink_socket(boot: str) -> None:
    """io.systemd.sysext through overlayctl-sysext.socket (Accept=yes: one
    overlayctl-sysext@.service per connection), called with trixie's varlinkctl."""
    listening(boot, "at boot, both enabled", "overlayctl-sysext.socket")
    # List, both classes: the same images as the command line lists
    for cls, want in (("sysext", {"erofsext", "gptext", "hello", "sqext"}),
                      ("confext", {"vmconf"})):
        rc, replies, _ = varlink("io.systemd.sysext.List", f'{{"class":"{cls}"}}', more=True)
        names = {r.get("Name") for r in replies if isinstance(r, dict)}
        cli = ol_json(f"{cls} list --json=short") or []
        cli_names = {r["name"] for r in cli} if isinstance(cli, list) else set()
        check(f"{boot}: varlink: List --more ({cls}) replies one record per image, as "
              f"'overlayctl {cls} list'",
              rc == 0 and names == want == cli_names and len(replies) == len(want)
              and all(isinstance(r, dict) and r.get("Class") == cls for r in replies),
              f"rc={rc} {sorted(n for n in names if n)}")
    # Merge: unmerged by the command line, merged through the socket
    rc1, _ = ol("sysext unmerge")
    gone = read("/usr/bin/hello-ext") is None
    rc, replies, out = varlink("io.systemd.sysext.Merge")
    usr = status_by_hierarchy().get("/usr", {})
    rc3, _ = sh("/usr/bin/hello-ext")
    # varlinkctl prints nothing for a reply without parameters
    check(f"{boot}: varlink: Merge through the socket merged /usr (reply {{}})",
          rc1 == 0 and gone and rc == 0 and replies in ([], [{}])
          and usr.get("extensions") == ["erofsext", "gptext", "hello", "sqext"] and rc3 == 0,
          f"rc={rc} replies={replies} /usr {usr.get('extensions')} hello-ext rc={rc3}")
    rc, _, out = varlink("io.systemd.sysext.Merge")
    check(f"{boot}: varlink: a second Merge: io.systemd.sysext.AlreadyMerged",
          rc != 0 and "io.systemd.sysext.AlreadyMerged" in out, f"rc={rc}")
    # Refresh with a new extension, and without it
    ext = "/var/lib/extensions/vlflip"
    write(f"{ext}/usr/lib/extension-release.d/extension-release.vlflip", "ID=_any\n")
    write(f"{ext}/usr/share/vmtest/vlflip.txt", "from vlflip\n")
    rc, replies, _ = varlink("io.systemd.sysext.Refresh")
    got = read("/usr/share/vmtest/vlflip.txt")
    shutil.rmtree(ext)
    rc2, replies2, _ = varlink("io.systemd.sysext.Refresh")
    check(f"{boot}: varlink: Refresh through the socket adds an extension, and removes it",
          rc == 0 and replies in ([], [{}]) and got == "from vlflip\n" and rc2 == 0
          and replies2 in ([], [{}]) and not os.path.exists("/usr/share/vmtest/vlflip.txt"),
          f"rc={rc}/{rc2} vlflip.txt={got!r}")
    # the socket is 0666: anyone may List, only root may change the merge
    rc, replies, _ = varlink("io.systemd.sysext.List", more=True, user="65534")
    rc2, _, out2 = varlink("io.systemd.sysext.Unmerge", user="65534")
    check(f"{boot}: varlink: an unprivileged user may List, and gets PermissionDenied for "
          "Unmerge", rc == 0 and len(replies) == 4 and rc2 != 0
          and "org.varlink.service.PermissionDenied" in out2
          and read("/usr/bin/hello-ext") is not None, f"List rc={rc} Unmerge rc={rc2}")
    _, out = sh("journalctl -b -o cat --no-pager -u 'overlayctl-sysext@*.service'")
    check(f"{boot}: varlink: the calls ran in socket-activated overlayctl-sysext@.service "
          "instances", "Merged extensions into '/usr'." in out, "")


def stage_boot1() -> None:
    units_merged_at_boot("boot1")
    diagnose_unmerged()
    sockets_conflict("boot1")
    write(f"{STATE}/boot1.boot_id", boot_id())
    # the confext over the defaults layer
    check("boot1: /etc/vmtest/from-confext.conf from the confext",
          read("/etc/vmtest/from-confext.conf") == "from confext vmconf\n")
    check("boot1: /etc/vmtest/default.conf from the defaults layer",
          read("/etc/vmtest/default.conf") == "default v1\n")
    w = ol_json("which /etc/vmtest/untouched.conf --json=short") or {}
    check("boot1: which: untouched.conf comes from the defaults layer",
          isinstance(w, dict) and w.get("layer") == "defaults", str(w))
    # writes to the merged /etc land in the real /etc (the upper)
    write("/etc/vmtest/local.conf", "written in boot 1\n")
    with open("/etc/vmtest/default.conf", "a") as f:
        f.write("local edit in boot 1\n")
    check("boot1: a write to /etc is visible",
          read("/etc/vmtest/local.conf") == "written in boot 1\n"
          and read("/etc/vmtest/default.conf") == "default v1\nlocal edit in boot 1\n")
    d = diff_by_path()
    dl, dd = d.get("/etc/vmtest/local.conf", {}), d.get("/etc/vmtest/default.conf", {})
    check("boot1: diff: local.conf added, default.conf modified (default not changed yet)",
          dl.get("change") == "added" and dd.get("change") == "modified"
          and dd.get("layer") == "defaults" and dd.get("default_changed") is False,
          f"local={dl} default={dd}")

    # an ephemeral /usr: writable, and the writes go to a tmpfs
    rc1, _ = ol("sysext unmerge")
    rc2, _ = ol("sysext merge --mutable=ephemeral")
    write("/usr/share/vmtest/ephemeral.txt", "written to the ephemeral /usr in boot 1\n")
    os.makedirs("/usr/local/share/vmtest-ephemeral", exist_ok=True)
    st = status_by_hierarchy().get("/usr", {})
    rc3, _ = sh("/usr/bin/hello-ext")
    check("boot1: /usr re-merged with --mutable=ephemeral and written to",
          rc1 == 0 and rc2 == 0 and st.get("mutable") == "ephemeral"
          and read("/usr/share/vmtest/ephemeral.txt") is not None and rc3 == 0,
          f"status mutable={st.get('mutable')} writable={st.get('writable')}")
    # left merged (ephemeral) at power off, like a machine that is just switched off


# ------------------------------------------------------------------------------------ boot 2

READER = r"""
import os, subprocess, sys, time
stop, out = sys.argv[1], sys.argv[2]
files = [(p, open(p).read()) for p in sys.argv[3:]]
n = bad = runs = 0
errors = []
while not os.path.exists(stop):
    for p, want in files:
        try:
            with open(p) as f:
                got = f.read()
            if got != want:
                bad += 1
                errors.append(f"{p}: content {got!r}")
        except OSError as e:
            bad += 1
            errors.append(f"{p}: {e}")
    n += 1
    if n % 25 == 0 and files[0][0].startswith("/usr"):
        runs += 1
        r = subprocess.run(["/usr/bin/hello-ext"], capture_output=True)
        if r.returncode != 0:
            bad += 1
            errors.append(f"exec /usr/bin/hello-ext: rc={r.returncode} {r.stderr[-200:]!r}")
import json
json.dump({"loops": n, "bad": bad, "execs": runs, "errors": errors[:10]}, open(out, "w"))
"""


def refresh_under_reader(boot: str, cls: str, files: list[str], rounds: int,
                         flip_dir: str, flip_file: str, release: str) -> None:
    """Start a reader loop over FILES, run ROUNDS refreshes, each with a real change
    (extension 'flip' added or removed), and count what the reader missed."""
    missing = [f for f in files if read(f) is None]
    if missing:
        check(f"{boot}: {rounds} x '{cls} refresh' under a reader loop", False,
              f"not run: {' '.join(missing)} missing (nothing merged?)")
        return
    stop, out = f"/tmp/reader-{cls}.stop", f"/tmp/reader-{cls}.json"
    write("/tmp/reader.py", READER)
    rd = subprocess.Popen([sys.executable, "/tmp/reader.py", stop, out, *files])
    time.sleep(0.5)
    times, errs, wrong = [], [], 0
    for i in range(rounds):
        if i % 2 == 0:
            write(f"{flip_dir}/{release}", "ID=_any\n")
            write(f"{flip_dir}/{flip_file}", f"flip {i}\n")
        else:
            shutil.rmtree(flip_dir)
        t = time.monotonic()
        r = subprocess.run([OL, cls, "refresh"], capture_output=True, text=True)
        times.append(time.monotonic() - t)
        if r.returncode != 0:
            errs.append(f"round {i}: rc={r.returncode} {r.stderr.strip()}")
        want = f"flip {i}\n" if i % 2 == 0 else None
        if read("/" + flip_file) != want:
            wrong += 1
            errs.append(f"round {i}: /{flip_file} is {read('/' + flip_file)!r}, want {want!r}")
    time.sleep(0.3)
    write(stop, "")
    rd.wait(timeout=60)
    res = json.loads(read(out) or "{}")
    say(f"  {cls} refresh x{rounds}: {min(times):.2f}-{max(times):.2f}s each "
        f"(median {sorted(times)[len(times) // 2]:.2f}s); reader: {res.get('loops')} loops, "
        f"{res.get('execs')} execs of /usr/bin/hello-ext, {res.get('bad')} misses")
    for e in errs[:10] + res.get("errors", []):
        say(f"  | {e}")
    check(f"{boot}: {rounds} x '{cls} refresh' all succeeded and changed the tree", not errs,
          f"{len(errs)} problems")
    check(f"{boot}: a reader loop over {' '.join(files)} missed nothing during the "
          f"{cls} refreshes", res.get("bad") == 0 and res.get("loops", 0) > rounds,
          f"{res.get('loops')} loops, {res.get('bad')} misses")


# ------------------------------------------------------------------ EXTENSION_RELOAD_MANAGER

RELOAD_EXT = "/run/extensions/vmtest-reload"
RELOAD_UNIT = "vmtest-ext.service"
RELOAD_MARKER = "/run/vmtest-ext.marker"
RELOAD_UNIT_TEXT = """[Unit]
Description=Shipped by the system extension vmtest-reload (EXTENSION_RELOAD_MANAGER=1)

[Service]
Type=oneshot
# active after it ran: the manager keeps it loaded (not garbage-collected) until it is stopped
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "vmtest-ext ran, boot_id=$$(cat /proc/sys/kernel/random/boot_id)" \
    >/run/vmtest-ext.marker'
"""


def manager_reloads() -> int:
    """How often the service manager was reloaded in this boot (its own journal lines)."""
    subprocess.run(["journalctl", "--sync"], capture_output=True)
    r = subprocess.run(["journalctl", "-b", "_PID=1", "-o", "cat", "--no-pager"],
                       capture_output=True, text=True)
    return sum(1 for line in r.stdout.splitlines() if line.startswith("Reloading finished"))


def ext_unit() -> dict[str, str]:
    return unit_prop(RELOAD_UNIT, "LoadState", "ActiveState", "NeedDaemonReload", "FragmentPath")


def ol_reloads(args: str) -> tuple[int, int]:
    """Run overlayctl ARGS; how often did the service manager reload meanwhile?"""
    before = manager_reloads()
    rc, _ = ol(args)
    n = manager_reloads() - before
    say(f"  (service manager reloads during the call: {n})")
    return rc, n


def ext_unit_runs(boot: str, what: str, rc: int, reloads: int) -> None:
    u = ext_unit()
    if os.path.exists(RELOAD_MARKER):
        os.unlink(RELOAD_MARKER)
    rc2, _ = sh(f"systemctl start {RELOAD_UNIT}")
    got = (read(RELOAD_MARKER) or "").strip()
    check(f"{boot}: reload: '{what}' with an EXTENSION_RELOAD_MANAGER=1 extension reloaded "
          "the service manager once", rc == 0 and reloads == 1, f"rc={rc} reloads={reloads}")
    check(f"{boot}: reload: after '{what}' the extension's {RELOAD_UNIT} is known and starts",
          u.get("LoadState") == "loaded"
          and u.get("FragmentPath") == f"/usr/lib/systemd/system/{RELOAD_UNIT}"
          and rc2 == 0 and got == f"vmtest-ext ran, boot_id={boot_id()}",
          f"{u} start rc={rc2} marker={got!r}")


def reload_manager(boot: str) -> None:
    """EXTENSION_RELOAD_MANAGER=1 (engine._daemon_reload, only with root=/ and systemd as PID 1):
    a sysext that ships a unit; merge, refresh and unmerge reload the service manager, so the
    unit comes and goes. The controls with --no-reload show that the checks see a missing
    reload: the unit, active, stays loaded with its file gone."""
    if read("/usr/bin/hello-ext") is None:
        check(f"{boot}: reload: EXTENSION_RELOAD_MANAGER", False, "not run: nothing merged")
        return
    u = ext_unit()
    check(f"{boot}: reload: {RELOAD_UNIT} unknown before its extension is merged",
          u.get("LoadState") == "not-found", str(u))
    write(f"{RELOAD_EXT}/usr/lib/extension-release.d/extension-release.vmtest-reload",
          "ID=_any\nEXTENSION_RELOAD_MANAGER=1\n")
    write(f"{RELOAD_EXT}/usr/lib/systemd/system/{RELOAD_UNIT}", RELOAD_UNIT_TEXT)
    # /usr is merged by the unit at boot: a refresh adds the extension
    rc, n = ol_reloads("sysext refresh")
    ext_unit_runs(boot, "sysext refresh", rc, n)
    rc, n = ol_reloads("sysext unmerge")
    u = ext_unit()
    rc2, _ = sh(f"systemctl cat {RELOAD_UNIT}")
    check(f"{boot}: reload: 'sysext unmerge' reloaded the service manager once and "
          f"{RELOAD_UNIT} is gone (not-found, systemctl cat fails)",
          rc == 0 and n == 1 and u.get("LoadState") == "not-found" and rc2 != 0,
          f"rc={rc} reloads={n} {u} systemctl cat rc={rc2}")
    sh(f"systemctl stop {RELOAD_UNIT}", quiet_ok=True)
    rc, n = ol_reloads("sysext merge")
    ext_unit_runs(boot, "sysext merge", rc, n)
    # controls: --no-reload leaves the manager as it was
    rc, n = ol_reloads("sysext unmerge --no-reload")
    u = ext_unit()
    check(f"{boot}: reload: control: 'sysext unmerge --no-reload' did not reload: the unit "
          "stays loaded, its file gone (NeedDaemonReload=yes)",
          rc == 0 and n == 0 and u.get("LoadState") == "loaded"
          and u.get("NeedDaemonReload") == "yes", f"rc={rc} reloads={n} {u}")
    before = manager_reloads()
    sh("systemctl daemon-reload")
    n = manager_reloads() - before
    u = ext_unit()
    check(f"{boot}: reload: control: a daemon-reload by hand is counted, and the unit is gone",
          n == 1 and u.get("LoadState") == "not-found", f"reloads={n} {u}")
    sh(f"systemctl stop {RELOAD_UNIT}", quiet_ok=True)
    rc, n = ol_reloads("sysext merge --no-reload")
    check(f"{boot}: reload: control: 'sysext merge --no-reload' did not reload",
          rc == 0 and n == 0, f"rc={rc} reloads={n}")
    # back to the boot's merge: the extension removed by a refresh (which judges by what it
    # merges, as upstream does: nothing asks for a reload then)
    shutil.rmtree(RELOAD_EXT)
    rc, n = ol_reloads("sysext refresh")
    say(f"  refresh that removed the extension: rc={rc}, reloads={n}")
    sh("systemctl daemon-reload")
    st = status_by_hierarchy().get("/usr", {})
    check(f"{boot}: reload: /usr merged as at boot again, {RELOAD_UNIT} gone",
          rc == 0 and st.get("extensions") == ["erofsext", "gptext", "hello", "sqext"]
          and ext_unit().get("LoadState") == "not-found", str(st.get("extensions")))


def stage_boot2() -> None:
    units_merged_at_boot("boot2")
    prev = (read(f"{STATE}/boot1.boot_id") or "").strip()
    check("boot2: this is another boot than boot 1", prev and prev != boot_id(),
          f"boot 1 {prev[:8]}, now {boot_id()[:8]}")
    # persistence of /etc
    check("boot2: the file written to /etc in boot 1 is there",
          read("/etc/vmtest/local.conf") == "written in boot 1\n",
          repr(read("/etc/vmtest/local.conf")))
    check("boot2: the local edit of default.conf still wins over the updated default",
          read("/etc/vmtest/default.conf") == "default v1\nlocal edit in boot 1\n",
          repr(read("/etc/vmtest/default.conf")))
    check("boot2: an untouched default follows the update",
          read("/etc/vmtest/untouched.conf") == "untouched v2\n",
          repr(read("/etc/vmtest/untouched.conf")))
    check("boot2: the confext is still merged over the defaults",
          read("/etc/vmtest/from-confext.conf") == "from confext vmconf\n")
    d = diff_by_path()
    dd, dl = d.get("/etc/vmtest/default.conf", {}), d.get("/etc/vmtest/local.conf", {})
    check("boot2: diff --json=short: default.conf default_changed=true",
          dd.get("change") == "modified" and dd.get("layer") == "defaults"
          and dd.get("default_changed") is True, str(dd))
    check("boot2: diff: local.conf still 'added', not default_changed",
          dl.get("change") == "added" and dl.get("default_changed") is False, str(dl))
    sh(f"{OL} confext diff --content /etc/vmtest/default.conf")
    # the ephemeral /usr of boot 1
    check("boot2: the write to the ephemeral /usr of boot 1 is gone",
          not os.path.exists("/usr/share/vmtest/ephemeral.txt")
          and not os.path.exists("/usr/local/share/vmtest-ephemeral"))
    # refresh under a reader loop: one file from an extension, one from the base
    refresh_under_reader("boot2", "sysext",
                         ["/usr/share/hello-ext/version", "/usr/lib/os-release",
                          "/usr/share/vmtest/squashfs.txt"], 20,
                         "/var/lib/extensions/flip", "usr/share/vmtest/flip.txt",
                         "usr/lib/extension-release.d/extension-release.flip")
    refresh_under_reader("boot2", "confext",
                         ["/etc/vmtest/from-confext.conf", "/etc/vmtest/local.conf",
                          "/etc/vmtest/untouched.conf", "/etc/hostname"], 10,
                         "/var/lib/confexts/flip", "etc/vmtest/flip.conf",
                         "etc/extension-release.d/extension-release.flip")
    st = status_by_hierarchy()
    check("boot2: after the refreshes /usr and /etc are merged as before",
          st.get("/usr", {}).get("extensions") == ["erofsext", "gptext", "hello", "sqext"]
          and st.get("/etc", {}).get("extensions") == ["vmconf"]
          and st.get("/etc", {}).get("mutable") == "yes",
          f"/usr {st.get('/usr', {}).get('extensions')}, "
          f"/etc {st.get('/etc', {}).get('extensions')}")
    sh("losetup -l -O NAME,BACK-FILE")
    reload_manager("boot2")
    varlink_socket("boot2")
    restart_units("boot2")


def restart_units(boot: str) -> None:
    """vm-tests/restart_units_guest.py (EXTENSION_RESTART_UNITS=, ..._RELOAD_OR_RESTART_UNITS=,
    the kill switch through a oneshot unit, the sysupdate notification socket), when run.sh put it
    in the payload (on one kernel). It prints its own CHECK lines; its exit status is one more."""
    script = f"{P}/restart_units_guest.py"
    if not os.path.exists(script):
        return
    say(f"$ python3 {script} {OL}")
    t = time.monotonic()
    rc = subprocess.run([sys.executable, script, OL]).returncode
    check(f"{boot}: restart_units_guest.py exited 0", rc == 0,
          f"rc={rc}, {time.monotonic() - t:.1f}s")
    st = status_by_hierarchy().get("/usr", {})
    check(f"{boot}: after restart_units_guest.py /usr is merged as at boot",
          st.get("extensions") == ["erofsext", "gptext", "hello", "sqext"],
          str(st.get("extensions")))


def main() -> int:
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    say(f"guest.py {stage}: kernel {os.uname().release}, PID 1 is {read('/proc/1/comm')!r}"
        .replace("\\n", ""))
    try:
        {"install": stage_install, "boot1": stage_boot1, "boot2": stage_boot2}[stage]()
    except Exception as e:      # a crash is a failed check, with the traceback on the console
        import traceback
        for line in traceback.format_exc().splitlines():
            say(f"  | {line}")
        check(f"{stage}: guest script completed", False, repr(e))
    say(f"guest.py {stage}: done in {time.monotonic() - T0:.1f}s, {CHECKS.failed} failed")
    sys.stdout.flush()
    os.sync()
    return 1 if CHECKS.failed else 0


if __name__ == "__main__":
    sys.exit(main())
