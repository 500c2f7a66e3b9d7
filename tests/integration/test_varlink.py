"""The io.systemd.sysext varlink service, driven by systemd 262's own client, varlinkctl, against
overlayctl and against upstream systemd-sysext side by side.

`varlinkctl call exec:SERVER ...` starts SERVER with a connected socket as fd 3 (LISTEN_FDS=1,
LISTEN_FDNAMES=varlink), as systemd-sysext@.service gets one from systemd-sysext.socket. SERVER
is a two-line wrapper that adds --root=<the test root> and execs the tool (the PID stays the
same, so LISTEN_PID still matches). The same calls go to both tools on twin roots (List: on the
same root, so even the timestamps can be compared), and the exit status, the replies (root
path and timestamp values normalised) and the error lines varlinkctl prints must be the same.
Upstream runs in a private namespace prepared like peer-ns; overlayctl in the test's own, so
that a mount it leaks fails the test.

Skipped without the peer (/work/peer/bin, see tests/integration/peer.py), unless
$OVERLAYCTL_REQUIRE_PEER=1, which makes that a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Root, absent
from tests.integration.peer import REQUIRE_PEER, need_peer, peer_dir, run_plan, upstream_peer

PEER = upstream_peer()
VARLINKCTL = peer_dir() / "bin" / "varlinkctl-sid"

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _need_varlinkctl() -> None:
    need_peer(PEER)
    if not os.access(VARLINKCTL, os.X_OK):
        absent(f"no {VARLINKCTL}", REQUIRE_PEER, "run tools/peer.sh")

TIMESTAMPS = ("CreationTimestamp", "ModificationTimestamp")


def wrapper(where: Path, name: str, root: Path, tool: list[str]) -> str:
    """An executable that runs TOOL --root=ROOT with the arguments it gets, in its own PID."""
    p = where / name
    argv = " ".join(f"'{a}'" for a in [*tool, f"--root={root}"])
    p.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {argv} "$@"\n')
    p.chmod(0o755)
    return str(p)


def servers(tmp: Path, oc_root: Path, up_root: Path) -> dict[str, str]:
    assert PEER is not None
    return {"oc": wrapper(tmp, "oc-server", oc_root, [sys.executable, "-m", "overlayctl"]),
            "up": wrapper(tmp, "up-server", up_root, [PEER.sysext])}


def vl(server: str, *args: str, flags: tuple[str, ...] = ()) -> list[str]:
    """A run step: varlinkctl [FLAGS] call exec:SERVER METHOD [PARAMS]."""
    return ["run", "vl", *flags, "--json=short", "call", f"exec:{server}", *args]


def lines(out: str) -> list[str]:
    """The JSON objects varlinkctl printed (with --more: JSON-SEQ, each after an RS)."""
    return [line for line in out.replace("\x1e", "").split("\n") if line.strip()]


def normalise(res: Any, root: Path) -> Any:
    """A varlinkctl result as compared: status, reply objects with the root path cut and
    timestamp values replaced by their type, and the lines varlinkctl itself prints about
    failures (the services' own log lines are not part of the interface)."""
    if not isinstance(res, dict) or "rc" not in res:
        return res
    replies = []
    for line in lines(res["out"]):
        obj = json.loads(line.replace(str(root), "<ROOT>"))
        for k in TIMESTAMPS:
            if k in obj:
                obj[k] = type(obj[k]).__name__
        replies.append(obj)
    said = [line for line in res["err"].splitlines()
            if line.startswith(("Method call", "Failed to"))]
    return {"rc": res["rc"], "replies": replies, "said": said}


def both(tmp: Path, steps_for: Any, build: Any) -> tuple[list[Any], list[Any]]:
    """Build two twin roots with BUILD, run STEPS_FOR(server) against each tool, and return
    the normalised results (overlayctl's, upstream's)."""
    assert PEER is not None
    out = []
    srv = servers(tmp, tmp / "oc-root", tmp / "up-root")
    for who, root in (("oc", tmp / "oc-root"), ("up", tmp / "up-root")):
        r = Root(root)
        build(r)
        res = run_plan(root, steps_for(srv[who]), peer=PEER if who == "up" else None,
                       namespace=who == "up", extra_tools={"vl": [str(VARLINKCTL)]})
        assert res["left"] == [], f"{who} left mounts: {res['left']}"
        out.append([normalise(s, root) for s in res["steps"]])
        if who == "oc":
            assert not r.mounts(), r.mounts()
    return out[0], out[1]


def base(r: Root) -> None:
    (r / "usr/share").mkdir(parents=True)
    (r / "usr/share/base").write_text("base")
    (r / "etc").mkdir()
    (r / "etc/base.conf").write_text("base")
    r.sysext("foo", {"usr/share/foo/hello": "foo"})
    r.sysext("bar", {"usr/share/bar/hello": "bar", "opt/bar/hello": "bar"})
    r.confext("cc", {"etc/cc.conf": "cc"})


def test_merge_refresh_unmerge_as_upstream(tmp_path: Path) -> None:
    def steps(s: str) -> list[list[str]]:
        return [
            vl(s, "io.systemd.sysext.Merge", "{}"),
            ["snap"],
            vl(s, "io.systemd.sysext.Merge", "{}"),                       # AlreadyMerged
            vl(s, "io.systemd.sysext.Merge", '{"class":"confext","noReload":true}'),
            vl(s, "io.systemd.sysext.Merge", '{"class":"confext"}'),      # AlreadyMerged /etc
            ["snap"],
            vl(s, "io.systemd.sysext.Refresh", "{}"),                     # nothing changed
            ["put", "var/lib/extensions/baz/usr/lib/extension-release.d/extension-release.baz",
             "ID=_any\n"],
            ["put", "var/lib/extensions/baz/usr/share/baz/hello", "baz"],
            vl(s, "io.systemd.sysext.Refresh", '{"noReload":true}'),
            ["snap"],
            vl(s, "io.systemd.sysext.Refresh", '{"alwaysRefresh":true,"force":true}'),
            ["snap"],
            vl(s, "io.systemd.sysext.Unmerge", "{}"),
            vl(s, "io.systemd.sysext.Unmerge", '{"class":"confext"}'),
            ["snap"],
            vl(s, "io.systemd.sysext.Unmerge", "{}"),                     # nothing merged
            # (varlinkctl kills an exec: server once a oneway call is sent: nothing that
            # mounts here)
            vl(s, "io.systemd.sysext.Nope", "{}", flags=("--oneway",)),
            vl(s, "io.systemd.sysext.Merge", '{"noexec":true}', flags=("--more",)),
            ["snap"],
            vl(s, "io.systemd.sysext.Unmerge", "{}", flags=("--more",)),
            ["snap"],
        ]

    oc, up = both(tmp_path, steps, base)
    assert oc == up
    # And it did what it says, on both sides:
    merged, etc_merged, refreshed = oc[1]["files"], oc[5]["files"], oc[10]["files"]
    assert merged["usr/share/foo/hello"] == "foo" and merged["opt/bar/hello"] == "bar"
    assert "etc/cc.conf" not in merged and etc_merged["etc/cc.conf"] == "cc"
    assert "usr/share/baz/hello" not in etc_merged and refreshed["usr/share/baz/hello"] == "baz"
    assert "usr/share/foo/hello" not in oc[15]["files"] and "etc/cc.conf" not in oc[15]["files"]
    assert oc[17] == {"rc": 0, "replies": [], "said": []}
    assert oc[19]["files"]["usr/share/foo/hello"] == "foo"
    assert oc[19]["overlays"] == {"usr": "overlay ro", "opt": "overlay ro"}
    assert "usr/share/foo/hello" not in oc[21]["files"]
    assert oc[0] == {"rc": 0, "replies": [{}], "said": []}
    assert oc[2]["rc"] == 1 and oc[2]["replies"] == [{"hierarchy": "/usr"}]
    assert oc[2]["said"] == [
        "Method call io.systemd.sysext.Merge() failed: io.systemd.sysext.AlreadyMerged"]
    assert oc[4]["replies"] == [{"hierarchy": "/etc"}]


def test_bad_parameters_and_methods_as_upstream(tmp_path: Path) -> None:
    calls = [
        ("io.systemd.sysext.Merge", '{"force":"yes"}'),
        ("io.systemd.sysext.Merge", '{"bogus":1}'),
        ("io.systemd.sysext.Merge", '{"bogus":1,"noexec":"x"}'),
        ("io.systemd.sysext.Merge", '{"class":"portable"}'),
        ("io.systemd.sysext.Refresh", '{"alwaysRefresh":null}'),
        ("io.systemd.sysext.Unmerge", '{"class":null}'),
        ("io.systemd.sysext.Unmerge", '{"force":true}'),
        ("io.systemd.sysext.List", '{"Name":"x"}'),
        ("io.systemd.sysext.Nope", "{}"),
        ("org.varlink.service.GetInterfaceDescription", '{"interface":"io.nope"}'),
    ]

    def steps(s: str) -> list[list[str]]:
        return [vl(s, m, p, flags=("--more",) if "List" in m else ()) for m, p in calls]

    oc, up = both(tmp_path, steps, base)
    assert oc == up
    assert all(r["rc"] != 0 for r in oc)
    assert oc[0]["replies"] == [{"parameter": "force"}]
    assert oc[2]["replies"] == [{"parameter": "noexec"}]
    assert oc[8]["replies"] == [{"method": "io.systemd.sysext.Nope"}]


def test_list_without_more_and_without_images(tmp_path: Path) -> None:
    def steps(s: str) -> list[list[str]]:
        return [vl(s, "io.systemd.sysext.List", "{}"),
                vl(s, "io.systemd.sysext.List", '{"class":"confext"}', flags=("--more",)),
                vl(s, "io.systemd.sysext.List", "{}", flags=("--more",)),
                vl(s, "io.systemd.sysext.Merge", "{}"),       # mode no, nothing to merge: {}
                vl(s, "io.systemd.sysext.Refresh", "{}"),
                ["snap"]]

    oc, up = both(tmp_path, steps, lambda r: r.confext("cc"))
    assert oc == up
    assert oc[0]["rc"] == 1 and oc[0]["said"] == [
        "Method call io.systemd.sysext.List() failed: "
        "called without 'more' flag, but flag needs to be set."]
    assert oc[1]["rc"] == 0 and [r["Name"] for r in oc[1]["replies"]] == ["cc"]
    assert oc[2]["rc"] == 1 and oc[2]["said"] == [
        "Method call failed: io.systemd.sysext.NoImagesFound"]  # (--more: no method name)
    assert oc[3] == oc[4] == {"rc": 0, "replies": [{}], "said": []}
    assert not oc[5]["overlays"]


def varlinkctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VARLINKCTL), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_list_records_are_upstreams(root: Root, tmp_path: Path) -> None:
    """Both tools list the same root: every key and value, timestamps included."""
    root.sysext("dir")
    (root / "var/lib/extensions/named.sysext").mkdir()
    (root / "var/lib/extensions/img.raw").write_bytes(os.urandom(10000))
    ro = root / "var/lib/extensions/ro.raw"
    ro.write_bytes(b"\0" * 100)
    ro.chmod(0o444)
    with open(root / "var/lib/extensions/sparse.raw", "wb") as f:
        f.truncate(1 << 20)
    for v in ("1", "2"):
        (root / f"var/lib/extensions/ver.v/ver_{v}").mkdir(parents=True)
    (root / "var/lib/extensions/rv.raw.v").mkdir()
    (root / "var/lib/extensions/rv.raw.v/rv_3.raw").write_bytes(b"r" * 5000)
    (root / "var/lib/other/lnk").mkdir(parents=True)
    (root / "etc/extensions").mkdir(parents=True)
    (root / "etc/extensions/lnk").symlink_to("/var/lib/other/lnk")
    (root / "etc/extensions/rel").symlink_to("../../var/lib/other/lnk")
    root.confext("conf")
    srv = servers(tmp_path, root.path, root.path)
    for params in ("{}", '{"class":"confext"}', '{"class":"sysext"}'):
        got = {}
        for who in ("oc", "up"):
            p = varlinkctl("--json=short", "--more", "call", f"exec:{srv[who]}",
                           "io.systemd.sysext.List", params)
            assert p.returncode == 0, p.stderr
            got[who] = sorted(map(json.loads, lines(p.stdout)), key=lambda r: r["Name"])
        assert got["oc"] == got["up"]
        assert got["oc"], params
    names = {r["Name"]: r for r in got["oc"]}
    assert set(names) == {"dir", "named", "img", "ro", "sparse", "ver", "rv", "lnk", "rel"}
    assert names["ro"]["ReadOnly"] is True and names["img"]["Limit"] == 10000
    assert names["ver"]["Path"].endswith("/ver.v/ver_2")
    assert "ModificationTimestamp" not in names["dir"] and "Usage" not in names["dir"]


def test_introspect_and_info(tmp_path: Path) -> None:
    srv = servers(tmp_path, tmp_path, tmp_path)
    out = {}
    for who in ("oc", "up"):
        intro = varlinkctl("introspect", f"exec:{srv[who]}", "io.systemd.sysext")
        each = [varlinkctl("introspect", f"exec:{srv[who]}", i)
                for i in ("io.systemd", "org.varlink.service", "io.nope")]
        info = varlinkctl("info", f"exec:{srv[who]}")
        info_json = varlinkctl("--json=short", "info", f"exec:{srv[who]}")
        methods = varlinkctl("list-methods", f"exec:{srv[who]}", "io.systemd.sysext")
        out[who] = {
            "intro": (intro.returncode, intro.stdout),
            "each": [(p.returncode, p.stdout) for p in each],
            "info_rc": info.returncode,
            "info_labels": [line.split(":", 1)[0].strip() for line in info.stdout.splitlines()
                            if ":" in line],
            "info_keys": list(json.loads(info_json.stdout)),
            "methods": (methods.returncode, methods.stdout),
            "interfaces": json.loads(info_json.stdout)["interfaces"],
        }
    oc, up = out["oc"], out["up"]
    assert oc["intro"][0] == 0 and oc["intro"][1].startswith("interface io.systemd.sysext\n")
    assert oc["interfaces"] == ["io.systemd", "io.systemd.SysUpdate.Notify", "io.systemd.sysext",
                                "org.varlink.service"]
    # 262 also serves io.systemd.SysUpdate.Notify (its sysupdate hook), which overlayctl does
    # not implement yet; everything else is the same.
    assert oc.pop("interfaces") == up.pop("interfaces")
    assert oc == up


def test_refresh_without_a_mode_keeps_the_merged_one(tmp_path: Path) -> None:
    """A deliberate difference (docs/design.md, "Refresh keeps the merged mode"): merged
    writable (Mutable=yes in sysext.conf, since gone), a varlink Refresh that names no mode
    keeps /usr writable; 262 re-merges it read-only."""
    def steps(s: str) -> list[list[str]]:
        return [["put", "etc/systemd/sysext.conf", "[SysExt]\nMutable=yes\n"],
                vl(s, "io.systemd.sysext.Merge", '{"noReload":true}'),
                ["snap"],
                ["rm", "etc/systemd/sysext.conf"],
                vl(s, "io.systemd.sysext.Refresh", '{"noReload":true,"alwaysRefresh":true}'),
                ["snap"],
                vl(s, "io.systemd.sysext.Unmerge", "{}")]

    oc, up = both(tmp_path, steps, base)
    for res in (oc, up):
        assert res[1]["rc"] == res[4]["rc"] == res[6]["rc"] == 0, res
        assert res[2]["writable"]["usr"] and res[2]["overlays"]["usr"] == "overlay rw"
    assert oc[5]["writable"]["usr"] and oc[5]["overlays"]["usr"] == "overlay rw"
    assert not up[5]["writable"]["usr"] and up[5]["overlays"]["usr"] == "overlay ro"
