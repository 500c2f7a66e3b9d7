#!/usr/bin/python3
"""What systemd 262 added for the service manager, checked in a guest where systemd is PID 1
(the steps of upstream's TEST-50-DISSECT sysext cases for EXTENSION_RESTART_UNITS= and
EXTENSION_RELOAD_OR_RESTART_UNITS=, plus the kill switch and the sysupdate notification
socket, which need a real service manager too).

    restart_units_guest.py [OVERLAYCTL]     # as root, systemd as PID 1; default: the
                                            # overlayctl on PATH

Self-contained (stdlib only): it makes its own units in /run/systemd/system and its own
system extensions in /var/lib/extensions, and removes them again. If sysexts were merged when
it started (the boot units merged them), it unmerges them first and refreshes at the end, so
the guest is as before. Each check prints one line "CHECK PASS|FAIL name :: detail" (as
guest.py does, so run.sh counts them); the exit status is 1 when a check failed.

What it checks:
 1. --no-reload: merge and refresh neither restart the host unit nor start the unit the
    extension ships.
 2. EXTENSION_RESTART_UNITS="host ext": merge restarts the host unit (new MainPID) and starts
    the extension's unit; refresh --always-refresh=yes restarts both; unmerge restarts the
    host unit (its file is still in /run) and stops the extension's unit (its file went with
    the extension).
 3. EXTENSION_RELOAD_OR_RESTART_UNITS="host ext" (both have ExecReload=): merge reloads the
    host unit (same MainPID, its stamp file) and starts the extension's unit; refresh reloads
    both; unmerge reloads the host unit and stops the extension's.
 4. A unit in both lists is only restarted; an invalid unit name is warned about and the
    rest still happens.
 5. --root=DIR never touches the service manager.
 6. systemd.sysext=0 on the kernel command line ($SYSTEMD_PROC_CMDLINE, which systemd and
    overlayctl both honour) makes a run started by the service manager (a oneshot unit) a
    no-op with a notice; systemd.sysext=1 after it does not; a run by hand ignores it.
 7. If overlayctl-sysupdate-notify.socket is installed: a call of
    io.systemd.SysUpdate.Notify.OnCompletedUpdate on its socket (what systemd-sysupdate does
    after an update) merges a newly added extension.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmcheck import Checks  # beside this script, in the payload too

CHECKS = Checks("restart-units: ")
say, check = CHECKS.say, CHECKS.check

OL = sys.argv[1] if len(sys.argv) > 1 else (shutil.which("overlayctl") or "overlayctl")
RUN_UNITS = "/run/systemd/system"
EXTS = "/var/lib/extensions"
HOST = "rt-host.service"
EXT = "rt-ext.service"
STAMPS = "/run/rt-test"


def sh(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = subprocess.run(argv, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    out = (r.stdout + r.stderr).rstrip("\n")
    say(f"$ {' '.join(argv)}   [rc={r.returncode}]")
    for line in out.splitlines():
        say(f"  | {line}")
    return r.returncode, out


def ol(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    return sh(OL, *args, env=env)


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main_pid(unit: str) -> str:
    r = subprocess.run(["systemctl", "show", "-P", "MainPID", unit], capture_output=True,
                       text=True)
    return r.stdout.strip()


def active(unit: str) -> bool:
    return subprocess.run(["systemctl", "--quiet", "is-active", unit]).returncode == 0


def stamp(unit: str) -> str:
    return f"{STAMPS}/{unit}.reloaded"


def take_stamp(unit: str) -> bool:
    """Was UNIT reloaded since the last look? (its ExecReload= touches the stamp)"""
    p = stamp(unit)
    if os.path.exists(p):
        os.unlink(p)
        return True
    return False


def unit_text(unit: str) -> str:
    return (f"[Unit]\nDescription=restart_units_guest {unit}\n\n[Service]\nType=simple\n"
            f"ExecStart=/bin/sleep infinity\nExecReload=/bin/touch {stamp(unit)}\n")


def extension(name: str, release: str, ships_unit: bool = True) -> str:
    d = f"{EXTS}/{name}"
    write(f"{d}/usr/lib/extension-release.d/extension-release.{name}",
          f"ID=_any\nARCHITECTURE=_any\n{release}")
    if ships_unit:
        write(f"{d}/usr/lib/systemd/system/{EXT}", unit_text(EXT))
    return d


def sysext_merged() -> bool:
    r = subprocess.run([OL, "sysext", "status", "--json=short"], capture_output=True,
                       text=True)
    try:
        return any(row.get("extensions") for row in json.loads(r.stdout))
    except ValueError:
        return False


def start_host_unit() -> str:
    write(f"{RUN_UNITS}/{HOST}", unit_text(HOST))
    sh("systemctl", "daemon-reload")
    sh("systemctl", "restart", HOST)
    take_stamp(HOST)
    return main_pid(HOST)


def case_restart() -> None:
    d = extension("rt-restart", f'EXTENSION_RESTART_UNITS="{HOST} {EXT}"\n')
    pid = start_host_unit()
    check("host unit runs", pid not in ("", "0"), pid)

    ol("sysext", "merge", "--no-reload")
    ol("sysext", "refresh", "--always-refresh=yes", "--no-reload")
    check("--no-reload: host unit not restarted", main_pid(HOST) == pid, main_pid(HOST))
    check("--no-reload: extension unit not started", not active(EXT))
    ol("sysext", "unmerge", "--no-reload")

    rc, out = ol("sysext", "merge")
    merged_pid = main_pid(HOST)
    check("merge succeeds", rc == 0, out)
    check("merge restarts the host unit", merged_pid not in (pid, "", "0"), merged_pid)
    check("merge starts the extension's unit", active(EXT))

    rc, _ = ol("sysext", "refresh", "--always-refresh=yes")
    refreshed_pid = main_pid(HOST)
    check("refresh restarts the host unit", rc == 0 and refreshed_pid != merged_pid,
          refreshed_pid)
    check("refresh: the extension's unit still runs", active(EXT))

    rc, _ = ol("sysext", "unmerge")
    check("unmerge restarts the host unit (its file stays)",
          rc == 0 and main_pid(HOST) not in (refreshed_pid, "", "0"), main_pid(HOST))
    check("unmerge stops the extension's unit (its file is gone)", not active(EXT))
    shutil.rmtree(d)


def case_reload_or_restart() -> None:
    d = extension("rt-reload", f'EXTENSION_RELOAD_OR_RESTART_UNITS="{HOST} {EXT}"\n')
    pid = start_host_unit()
    take_stamp(EXT)

    rc, _ = ol("sysext", "merge")
    check("merge reloads the host unit (same MainPID)", rc == 0 and main_pid(HOST) == pid,
          main_pid(HOST))
    check("merge: the host unit's ExecReload= ran", take_stamp(HOST))
    check("merge starts the extension's unit (not running: no reload)",
          active(EXT) and not take_stamp(EXT))
    ext_pid = main_pid(EXT)

    rc, _ = ol("sysext", "refresh", "--always-refresh=yes")
    check("refresh reloads both units (same MainPIDs)",
          rc == 0 and main_pid(HOST) == pid and main_pid(EXT) == ext_pid,
          f"{main_pid(HOST)} {main_pid(EXT)}")
    check("refresh: both ExecReload= ran", take_stamp(HOST) and take_stamp(EXT))

    rc, _ = ol("sysext", "unmerge")
    check("unmerge reloads the host unit", rc == 0 and main_pid(HOST) == pid and
          take_stamp(HOST), main_pid(HOST))
    check("unmerge stops the extension's unit", not active(EXT))
    shutil.rmtree(d)


def case_both_lists_and_bad_names() -> None:
    d = extension("rt-both", f'EXTENSION_RESTART_UNITS="{HOST} bad/name"\n'
                             f'EXTENSION_RELOAD_OR_RESTART_UNITS="{HOST}"\n', ships_unit=False)
    pid = start_host_unit()
    rc, out = ol("sysext", "merge")
    check("a unit in both lists is restarted, not reloaded",
          rc == 0 and main_pid(HOST) != pid and not take_stamp(HOST), main_pid(HOST))
    check("an invalid unit name is warned about", "warning" in out and "bad/name" in out, out)
    ol("sysext", "unmerge", "--no-reload")
    shutil.rmtree(d)


def case_root() -> None:
    root = "/srv/rt-root"
    shutil.rmtree(root, ignore_errors=True)
    write(f"{root}/usr/lib/os-release", "ID=rttest\n")
    write(f"{root}{EXTS}/rt-root/usr/lib/extension-release.d/extension-release.rt-root",
          f'ID=_any\nEXTENSION_RELOAD_MANAGER=1\nEXTENSION_RESTART_UNITS="{HOST}"\n')
    write(f"{root}{EXTS}/rt-root/usr/share/rt-root", "x\n")
    pid = start_host_unit()
    rc1, _ = ol(f"--root={root}", "sysext", "merge")
    rc2, _ = ol(f"--root={root}", "sysext", "unmerge")
    check("--root: merge and unmerge leave the host unit alone",
          rc1 == rc2 == 0 and main_pid(HOST) == pid, main_pid(HOST))
    shutil.rmtree(root)


def case_kill_switch() -> None:
    extension("rt-kill", "", ships_unit=False)
    write(f"{EXTS}/rt-kill/usr/share/rt-kill", "x\n")
    for cmdline, merges in (("quiet systemd.sysext=0", False),
                            ("systemd.sysext=0 systemd.sysext=1", True)):
        # a oneshot unit of our own: systemd-run needs D-Bus, which the guest has not
        out_file = "/run/rt-kill.out"
        write("/run/systemd/system/rt-kill.service",
              "[Service]\nType=oneshot\n"
              f"Environment=\"SYSTEMD_PROC_CMDLINE={cmdline}\"\n"
              f"ExecStart={OL} sysext merge --no-reload\n"
              f"StandardOutput=truncate:{out_file}\nStandardError=inherit\n")
        sh("systemctl", "daemon-reload")
        rc, _ = sh("systemctl", "start", "rt-kill.service")
        with open(out_file) as f:
            out = f.read()
        say(f"  | {out_file}: {out.strip()}")
        os.unlink("/run/systemd/system/rt-kill.service")
        sh("systemctl", "daemon-reload")
        here = os.path.exists("/usr/share/rt-kill")
        check(f"started by systemd with {cmdline!r}: "
              f"{'merges' if merges else 'a no-op with a notice'}",
              rc == 0 and here is merges and
              ("Disabled by the kernel command line option 'systemd.sysext='" in out)
              is not merges, out)
        ol("sysext", "unmerge", "--no-reload")
    rc, _ = ol("sysext", "merge", "--no-reload", env={"SYSTEMD_PROC_CMDLINE": "systemd.sysext=0"})
    check("run by hand, systemd.sysext=0 does not apply",
          rc == 0 and os.path.exists("/usr/share/rt-kill"))
    ol("sysext", "unmerge", "--no-reload")
    shutil.rmtree(f"{EXTS}/rt-kill")


def case_sysupdate_notify() -> None:
    unit = "overlayctl-sysupdate-notify.socket"
    if subprocess.run(["systemctl", "cat", unit], capture_output=True).returncode != 0:
        say(f"(skipping the sysupdate notification: {unit} is not installed)")
        return
    varlinkctl = shutil.which("varlinkctl") or "/usr/bin/varlinkctl"
    sh("systemctl", "start", unit)
    extension("rt-notify", "", ships_unit=False)
    write(f"{EXTS}/rt-notify/usr/share/rt-notify", "x\n")
    rc, out = sh(varlinkctl, "call", "unix:/run/systemd/sysupdate/notify/io.systemd.sysext",
                 "io.systemd.SysUpdate.Notify.OnCompletedUpdate", "{}")
    check("OnCompletedUpdate on the notification socket merges the new extension",
          rc == 0 and os.path.exists("/usr/share/rt-notify"), out)
    ol("sysext", "unmerge", "--no-reload")
    shutil.rmtree(f"{EXTS}/rt-notify")
    sh("systemctl", "stop", unit)


def main() -> int:
    os.makedirs(STAMPS, exist_ok=True)
    was_merged = sysext_merged()
    if was_merged:
        ol("sysext", "unmerge", "--no-reload")
    try:
        for case in (case_restart, case_reload_or_restart, case_both_lists_and_bad_names,
                     case_root, case_kill_switch, case_sysupdate_notify):
            try:
                case()
            except Exception as e:   # one broken case must not hide the others
                check(f"{case.__name__} ran to the end", False, repr(e))
    finally:
        for name in ("rt-restart", "rt-reload", "rt-both", "rt-kill", "rt-notify"):
            shutil.rmtree(f"{EXTS}/{name}", ignore_errors=True)
        sh("systemctl", "stop", HOST, EXT)
        for p in (f"{RUN_UNITS}/{HOST}",):
            if os.path.exists(p):
                os.unlink(p)
        shutil.rmtree(STAMPS, ignore_errors=True)
        sh("systemctl", "daemon-reload")
        if was_merged:
            ol("sysext", "refresh")
    say(f"restart_units_guest: {CHECKS.failed} failed")
    return 1 if CHECKS.failed else 0


if __name__ == "__main__":
    sys.exit(main())
