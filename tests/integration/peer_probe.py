"""Runs one peer-comparison scenario against a prepared root and prints what it observed as JSON.

Used by test_peer.py. It is a standalone script (stdlib only) because, for upstream
systemd-sysext, it has to run *inside* a private mount namespace prepared the way upstream needs
it (see peer-ns: /run a fresh tmpfs, the root a shared bind mount): mounts made there are not
visible to the test process, so everything that must be looked at is looked at here.

    python peer_probe.py PLAN.json

PLAN = {"root": DIR, "ro": [REL...], "tools": {NAME: [ARGV prefix...]}, "steps": [STEP...]}
STEP = ["run", TOOL, ARG...] | ["snap"] | ["write", REL, TEXT] | ["rm", REL] | ["put", REL, TEXT]
("put" also creates missing parent directories: for adding an extension between steps)
Output: {"steps": [RESULT...], "left": [mount points below the root after the ro binds went]}.
Read-only binds of PLAN["ro"] are made first and removed last (in both kinds of namespace).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

# Extension sources, and the tools' private state (overlayctl keeps records in <root>/run/overlayctl
# and <root>/var/lib/overlayctl; upstream keeps nothing below the root): not what a user sees.
SKIP = {"var/lib/extensions", "var/lib/confexts", "run", "var/lib/overlayctl"}
META = (".systemd-sysext", ".systemd-confext")
WORKDIR = re.compile(r"^\.systemd-.*-workdir(\.[0-9]+)?$")


def mounts(root: str) -> list[tuple[str, str, str, str]]:
    """(relative mount point, fstype, source, per-mount ro/rw) below ROOT, in mount order."""
    from overlayctl import mountinfo
    out = []
    for m in mountinfo.read():
        if m.mountpoint.startswith(root + "/"):
            rel = m.mountpoint[len(root) + 1:]
            if not any(c.startswith(".systemd-") for c in rel.split("/")):
                out.append((rel, m.fstype, m.source, m.options.split(",")[0]))
    return out


def snap(root: str) -> dict[str, object]:
    files: dict[str, str] = {}

    def walk(path: str, rel: str) -> None:
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            r = rel + e.name
            if r in SKIP or e.name in META:
                continue
            try:
                st = os.lstat(e.path)
            except FileNotFoundError:
                # overlayfs lists the whiteouts of a directory that only one lower layer has,
                # but looking them up finds nothing.
                files[r] = "listed, not found"
                continue
            if stat.S_ISLNK(st.st_mode):
                files[r] = "link " + os.readlink(e.path).replace(root, "<ROOT>")
            elif stat.S_ISDIR(st.st_mode):
                files[r + "/"] = f"dir {stat.S_IMODE(st.st_mode):04o}"
                if not WORKDIR.match(e.name):
                    walk(e.path, r + "/")
            elif stat.S_ISREG(st.st_mode):
                with open(e.path, encoding="utf-8", errors="replace") as f:
                    files[r] = f.read()
            elif stat.S_ISCHR(st.st_mode):
                files[r] = f"chr {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                files[r] = "other"

    walk(root, "")
    writable = {}
    for h in ("usr", "opt", "etc"):
        p = os.path.join(root, h)
        if not os.path.isdir(p):
            continue
        probe = os.path.join(p, ".peer-write-probe")
        try:
            with open(probe, "w") as f:
                f.write("x")
            os.unlink(probe)
            writable[h] = True
        except OSError:
            writable[h] = False
    overlays = {m[0]: f"{m[1]} {m[3]}" for m in mounts(root) if m[1] == "overlay"}
    return {"files": files, "writable": writable, "overlays": overlays}


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        plan = json.load(f)
    root = os.path.realpath(plan["root"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SYSTEMD_SYSEXT", "SYSTEMD_CONFEXT"))}
    env.update(plan.get("env", {}))
    ro = [os.path.join(root, r) for r in plan.get("ro", [])]
    results: list[object] = []
    try:
        for p in ro:
            subprocess.run(["mount", "--bind", p, p], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", p], check=True)
        for step in plan["steps"]:
            kind = step[0]
            if kind == "run":
                argv = plan["tools"][step[1]] + step[2:]
                p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/")
                results.append({"rc": p.returncode, "out": p.stdout, "err": p.stderr})
            elif kind == "snap":
                results.append(snap(root))
            elif kind in ("write", "rm", "put"):
                try:
                    if kind == "put":
                        os.makedirs(os.path.dirname(os.path.join(root, step[1])), exist_ok=True)
                    if kind in ("write", "put"):
                        with open(os.path.join(root, step[1]), "w") as f:
                            f.write(step[2])
                    else:
                        os.unlink(os.path.join(root, step[1]))
                    results.append("ok")
                except OSError as e:
                    results.append(f"error {e.strerror}")
            else:
                raise ValueError(step)
    finally:
        left_before_ro = [m[0] for m in mounts(root)]
        for p in reversed(ro):
            subprocess.run(["umount", p], check=False, capture_output=True)
    json.dump({"steps": results, "left": [m for m in left_before_ro
                                          if os.path.join(root, m) not in ro]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
