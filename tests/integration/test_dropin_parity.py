"""Issue 12, a drop-in for systemd-sysext: what tools and scripts see, compared with systemd 262
(the peer: tests/integration/peer.py) on twin roots, or on the same root where timestamps are
compared. Upstream runs in its own private namespace prepared like peer-ns; overlayctl in the
test's namespace, so that a mount it leaks fails the test.

Covered: status/list JSON keys, types and values; argv[0] personalities; SYSTEMD_LOG_LEVEL
(err: silent on success; debug: the decisions); configuration-file warnings and the problems
that make the whole configuration ignored; a search directory that is no directory; a stray
file where a mode-no merge does not look; release files (quotes, NUL, UTF-8, size); .v
directories; the kernel command line kill switch; the 262 units' conditions; the
io.systemd.SysUpdate.Notify service; no service-manager actions with --root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Root, mounts_below
from tests.data import config_cases
from tests.integration.peer import Upstream, need_peer, peer_dir, run_plan, upstream_peer
from tests.unit.test_discovery import VPICK_CASES

PEER = upstream_peer()

pytestmark = pytest.mark.root

Steps = Callable[[str], list[list[str]]]


def oc_cmd(root: Path, env: dict[str, str] | None = None,
           argv0: str | None = None) -> list[str]:
    """overlayctl on ROOT (as ARGV0: a launcher named so), with ENV."""
    cmd = [argv0] if argv0 else [sys.executable, "-m", "overlayctl"]
    return ["env", *(f"{k}={v}" for k, v in (env or {}).items()), *cmd, f"--root={root}"]


def up_cmd(peer: Upstream, root: Path, env: dict[str, str] | None = None,
           cls: str = "sysext") -> list[str]:
    tool = peer.confext if cls == "confext" else peer.sysext
    assert tool is not None
    return ["env", *(f"{k}={v}" for k, v in (env or {}).items()), tool, f"--root={root}"]


def twin(tmp: Path, build: Callable[[Root], None],
         tools: Callable[[str, Path], dict[str, list[str]]], steps: list[list[str]],
         *, same_root: bool = False) -> tuple[list[Any], list[Any]]:
    """Run STEPS with upstream (tool "T" of TOOLS("up", root)) and with overlayctl (TOOLS("oc",
    root)), each on a root built by BUILD (one shared root with SAME_ROOT: for read-only
    steps). Returns (upstream's step results, overlayctl's)."""
    need_peer(PEER)
    out = []
    shared = Root(tmp / "root") if same_root else None
    if shared:
        build(shared)
    for who in ("up", "oc"):
        r = shared or Root(tmp / who)
        if not shared:
            build(r)
        res = run_plan(r.path, steps, peer=PEER, namespace=who == "up",
                       extra_tools=tools(who, r.path))
        assert res["left"] == [], f"{who} left mounts: {res['left']}"
        assert not mounts_below(str(r.path))
        out.append(res["steps"])
    return out[0], out[1]


def base(r: Root) -> None:
    (r / "usr/share").mkdir(parents=True)
    (r / "usr/share/base").write_text("base")
    (r / "opt").mkdir()
    (r / "opt/base").write_text("base")
    (r / "etc").mkdir()
    (r / "etc/base.conf").write_text("base")
    r.sysext("foo", {"usr/share/foo/hello": "foo", "opt/foo": "foo"})
    r.sysext("usronly", {"usr/share/usronly": "u"})
    r.sysext("bad", {"opt/bad": "bad"}, release="ID=otheros\n")
    r.confext("cc", {"etc/cc.conf": "cc"})


# ---------------------------------------------------------------------------------------------
# status and list JSON: every key 262 prints, with its type (and value where the roots allow)

def _types(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{k: type(v).__name__ for k, v in row.items()} for row in rows]


def _assert_keys_and_types(up: list[Any], oc: list[Any], steps: tuple[int, ...],
                           values: bool) -> None:
    for i in steps:
        u, o = json.loads(up[i]["out"]), json.loads(oc[i]["out"])
        assert len(u) == len(o), (i, u, o)
        for ur, orow in zip(u, o, strict=True):
            for k, v in ur.items():
                assert k in orow, f"step {i}: key {k} missing: {orow}"
                assert type(orow[k]) is type(v), f"step {i}: {k}: {orow[k]!r} vs {v!r}"
                # upstream's "since" is the host path's mtime, not the one in --root
                if values and k != "since":
                    assert orow[k] == v, f"step {i}: {k}: {orow[k]!r} vs upstream {v!r}"


def _tools_both_classes(who: str, root: Path) -> dict[str, list[str]]:
    assert PEER is not None
    if who == "up":
        return {"T:sysext": up_cmd(PEER, root), "T:confext": up_cmd(PEER, root, cls="confext")}
    return {"T:sysext": [*oc_cmd(root), "sysext"], "T:confext": [*oc_cmd(root), "confext"]}


def test_list_and_status_json_as_upstream(tmp_path: Path) -> None:
    """On one root (so that paths and timestamps are the same values): every key of list and
    of an unmerged status, with the same type and value (a directory's "time" is its
    creation time, a raw image's its modification time)."""
    def build(r: Root) -> None:
        base(r)
        (r / "var/lib/extensions/img.raw").write_bytes(b"\0" * 4096)
        (r / "var/lib/extensions/vv.v/vv_1.2").mkdir(parents=True)

    steps = [["run", "T:sysext", "list", "--json=short"],
             ["run", "T:confext", "list", "--json=short"],
             ["run", "T:sysext", "status", "--json=short"],
             ["run", "T:confext", "status", "--json=pretty"]]
    up, oc = twin(tmp_path, build, _tools_both_classes, steps, same_root=True)
    _assert_keys_and_types(up, oc, (0, 1, 2, 3), values=True)
    assert {r["type"] for r in json.loads(oc[0]["out"])} == {"directory", "raw"}
    assert [r["extensions"] for r in json.loads(oc[3]["out"])] == [[]]


def test_merged_status_json_as_upstream(tmp_path: Path) -> None:
    steps = [["run", "T:sysext", "merge", "--no-reload"],
             ["run", "T:sysext", "status", "--json=short"],
             ["run", "T:confext", "merge", "--no-reload"],
             ["run", "T:confext", "status", "--json=short"],
             ["run", "T:sysext", "unmerge", "--no-reload"],
             ["run", "T:confext", "unmerge", "--no-reload"]]
    up, oc = twin(tmp_path, base, _tools_both_classes, steps)
    for i in (0, 2, 4, 5):
        assert up[i]["rc"] == oc[i]["rc"] == 0, (up[i], oc[i])
    _assert_keys_and_types(up, oc, (1, 3), values=True)
    assert {r["hierarchy"]: r["extensions"] for r in json.loads(oc[1]["out"])} == {
        "/opt": ["foo", "usronly"], "/usr": ["foo", "usronly"]}
    assert _types(json.loads(oc[3]["out"])) == [{"hierarchy": "str", "extensions": "list",
                                                 "since": "int", "mutable": "str",
                                                 "upperdir": "NoneType", "writable": "bool",
                                                 "defaults": "NoneType",
                                                 "atomic_refresh": "bool", "merged": "bool"}]


# ---------------------------------------------------------------------------------------------
# argv[0]: systemd-sysext and systemd-confext (symlinks to a launcher)

def _launchers(tmp: Path) -> dict[str, str]:
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    launcher = d / "overlayctl-launcher"
    launcher.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                        "from overlayctl.cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    out = {}
    for name in ("systemd-sysext", "systemd-confext"):
        (d / name).symlink_to(launcher.name)
        out[name] = str(d / name)
    return out


@pytest.mark.parametrize("name", ["systemd-sysext", "systemd-confext"])
def test_personality_as_upstream(tmp_path: Path, name: str) -> None:
    """Run as systemd-sysext, overlayctl merges only /usr and /opt; as systemd-confext only
    /etc; status shows only those; the class words are no verbs; --help is that tool's."""
    assert PEER is not None
    exe = _launchers(tmp_path)[name]
    cls = name.removeprefix("systemd-")
    need_peer(PEER, cls)

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root, cls=cls) if who == "up" else oc_cmd(root, argv0=exe)}

    steps = [["run", "T", "merge", "--no-reload"], ["snap"],
             ["run", "T", "status", "--json=short"],
             ["run", "T", "sysext", "status"], ["run", "T", "confext", "status"],
             ["run", "T", "unmerge", "--no-reload"], ["snap"], ["run", "T", "--help"]]
    up, oc = twin(tmp_path, base, tools, steps)
    for i in (0, 5):
        assert up[i]["rc"] == oc[i]["rc"] == 0, (up[i], oc[i])
    assert oc[1]["overlays"] == up[1]["overlays"]
    assert set(oc[1]["overlays"]) == ({"etc"} if cls == "confext" else {"usr", "opt"})
    assert ({r["hierarchy"]: r["extensions"] for r in json.loads(oc[2]["out"])}
            == {r["hierarchy"]: r["extensions"] for r in json.loads(up[2]["out"])})
    for i in (3, 4):
        assert up[i]["rc"] == oc[i]["rc"] == 1
        assert oc[i]["err"].startswith(f"{name}: unknown verb"), oc[i]["err"]
    assert oc[6]["overlays"] == up[6]["overlays"] == {}
    other = "confext" if cls == "sysext" else "sysext"
    for res in (up[7], oc[7]):
        assert res["rc"] == 0 and name in res["out"].splitlines()[0]
        assert other not in res["out"] and "diff" not in res["out"].split()


def test_personality_messages_name_the_tool(root: Root, tmp_path: Path) -> None:
    exe = _launchers(tmp_path)["systemd-sysext"]
    (root / "opt").mkdir()
    root.sysext("e", {"opt/e": "e"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, f"--root={root.path}", *args], capture_output=True,
                              text=True, env=env)

    r = run("--bogus")
    assert r.returncode == 1 and r.stderr.startswith("systemd-sysext: ") and "overlayctl" \
        not in r.stderr.split("(hint")[0]
    assert "see systemd-sysext --help" in r.stderr
    assert run("merge").returncode == 0
    try:
        r = run("merge")
        assert r.returncode == 1
        last = r.stderr.splitlines()[-1]
        assert last.startswith("systemd-sysext: ") and "'systemd-sysext refresh'" in last
    finally:
        assert run("unmerge").returncode == 0
    r = run("--version")
    assert r.stdout.startswith("systemd-sysext ")


def test_plain_overlayctl_keeps_both_classes(root: Root) -> None:
    (root / "etc").mkdir()
    rows = json.loads(root.run("status", "--json=short", check=True).stdout)
    assert [r["hierarchy"] for r in rows] == ["/etc", "/usr"]
    assert root.run("sysext", "status", check=True).returncode == 0


# ---------------------------------------------------------------------------------------------
# SYSTEMD_LOG_LEVEL

VERBS = [["merge", "--no-reload"], ["refresh", "--no-reload"],
         ["refresh", "--no-reload", "--always-refresh=yes"], ["status"], ["list"],
         ["unmerge", "--no-reload"]]


@pytest.mark.parametrize("cls", ["sysext", "confext"])
def test_err_level_is_silent_on_success_as_upstream(tmp_path: Path, cls: str) -> None:
    env = {"SYSTEMD_LOG_LEVEL": "err"}
    need_peer(PEER, cls)

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root, env, cls) if who == "up" else [*oc_cmd(root, env), cls]}

    up, oc = twin(tmp_path, base, tools, [["run", "T", *v] for v in VERBS])
    for v, u, o in zip(VERBS, up, oc, strict=True):
        assert u["rc"] == o["rc"] == 0, (v, u, o)
        assert u["err"] == "", (v, u["err"])
        assert o["err"] == "", (v, o["err"])


def test_debug_level_logs_the_decisions_as_upstream(tmp_path: Path) -> None:
    """Both tools log at debug level: every image and why one is ignored, each hierarchy an
    extension has nothing for, each layer of each overlay, its mount options, and what is
    merged already; at the default level neither says any of that."""
    def build(r: Root) -> None:
        base(r)
        (r / "var/lib/extensions/stray-file").write_text("")

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        out = {}
        for lvl in ("debug", "info"):
            env = {"SYSTEMD_LOG_LEVEL": lvl}
            out[f"T:{lvl}"] = (up_cmd(PEER, root, env) if who == "up"
                               else [*oc_cmd(root, env), "sysext"])
        return out

    steps = [["run", "T:debug", "merge", "--no-reload"], ["run", "T:debug", "refresh",
                                                          "--no-reload"],
             ["run", "T:debug", "unmerge", "--no-reload"], ["run", "T:info", "merge",
                                                            "--no-reload"],
             ["run", "T:info", "unmerge", "--no-reload"]]
    up, oc = twin(tmp_path, build, tools, steps)
    for side, res in (("upstream", up), ("overlayctl", oc)):
        merge, refresh, unmerge, quiet = (res[0]["err"], res[1]["err"], res[2]["err"],
                                          res[3]["err"])
        assert all(r["rc"] == 0 for r in res), (side, res)
        topics = {
            "the ignored image and why": re.search(r"'bad'.*otheros|otheros.*'bad'", merge),
            "a compatible image": re.search(r"Extension 'foo'.*matches", merge),
            "an entry that is no image": "stray-file" in merge,
            "a hierarchy an extension lacks": re.search(
                r"Hierarchy '/opt' in extension '[^']*usronly' doesn't exist", merge),
            "the extension layer": "extensions/foo/opt" in merge,
            "the base layer": re.search(r"lowerdir=\S*:/\S+/opt\b", merge),
            "the mount options": re.search(r"(MS_RDONLY|ro,nodev)", merge),
            "no mutable directory": "not resolving mutable directory" in merge,
            "not merged before": re.search(r"Hierarchy '\S*/opt' is not (a mount point|merged)",
                                           merge),
            "merged at refresh": re.search(r"no change", refresh, re.I),
        }
        missing = [t for t, found in topics.items() if not found]
        assert not missing, f"{side} does not log {missing}:\n{merge}"
        assert "Unmerged" in unmerge
        assert "lowerdir" not in quiet and "stray-file" not in quiet, (side, quiet)


# ---------------------------------------------------------------------------------------------
# configuration files (tests/data/config_cases.py)

@pytest.mark.parametrize("name", sorted(config_cases.CASES))
def test_config_file_problems_as_upstream(tmp_path: Path, name: str) -> None:
    case = config_cases.CASES[name]

    def build(r: Root) -> None:
        base(r)
        config_cases.lay_out(r.path, case)

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root) if who == "up" else [*oc_cmd(root), "sysext"]}

    steps = [["run", "T", "merge", "--no-reload"], ["write", "opt/probe", "x"],
             ["run", "T", "unmerge", "--no-reload"]]
    up, oc = twin(tmp_path, build, tools, steps)
    for side, res in (("upstream", up), ("overlayctl", oc)):
        assert res[0]["rc"] == 0 and res[2]["rc"] == 0, (side, res)
        assert (res[1] == "ok") is case.applied, f"{side}: Mutable=yes applied: {res[1]}"
        said = res[0]["err"]
        assert ("sysext.conf" in said) is case.warns, f"{side}: {said}"
    if case.warns:
        assert "warning" in oc[0]["err"]


# ---------------------------------------------------------------------------------------------
# a search directory that is no directory

@pytest.mark.parametrize("kind", ["file", "loop"])
def test_search_dir_not_a_directory_as_upstream(tmp_path: Path, kind: str) -> None:
    def build(r: Root) -> None:
        base(r)
        (r / "run").mkdir()
        if kind == "file":
            (r / "run/extensions").write_text("")
        else:
            (r / "run/extensions").symlink_to("extensions")

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root) if who == "up" else [*oc_cmd(root), "sysext"]}

    verbs = [["list"], ["merge", "--no-reload"], ["refresh", "--no-reload"], ["status"],
             ["unmerge", "--no-reload"]]
    up, oc = twin(tmp_path, build, tools, [*(["run", "T", *v] for v in verbs), ["snap"]])
    for v, u, o in zip(verbs, up, oc, strict=False):
        assert u["rc"] == o["rc"], (v, u, o)
    assert [r["rc"] for r in oc[:5]] == [1, 1, 1, 0, 0]
    assert "Failed to discover images" in up[0]["err"]
    for o in oc[:3]:
        [line] = o["err"].splitlines()
        assert line.startswith("overlayctl: failed to discover images") and "/run/extensions" \
            in line and "(hint: " in line
    assert oc[5]["overlays"] == up[5]["overlays"] == {}


# ---------------------------------------------------------------------------------------------
# a stray file where the mutable directory would be, in modes that do not use it

@pytest.mark.parametrize("mode", ["no", "ephemeral", "yes"])
def test_stray_mutable_file_as_upstream(tmp_path: Path, mode: str) -> None:
    def build(r: Root) -> None:
        base(r)
        (r / "var/lib/extensions.mutable/usr").write_text("stray")

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root) if who == "up" else [*oc_cmd(root), "sysext"]}

    steps = [["run", "T", "merge", "--no-reload", f"--mutable={mode}"], ["snap"],
             ["run", "T", "unmerge", "--no-reload"]]
    up, oc = twin(tmp_path, build, tools, steps)
    assert up[0]["rc"] == oc[0]["rc"] == (1 if mode == "yes" else 0), (up[0], oc[0])
    assert set(oc[1]["overlays"]) == set(up[1]["overlays"])
    if mode != "yes":
        assert oc[1]["files"]["usr/share/foo/hello"] == "foo"


# ---------------------------------------------------------------------------------------------
# release files

RELEASES = {
    "plain": "ID=_any\n",
    "dq": 'ID="_any"\n',
    "sq": "ID='_any'\n",
    "unclosed-dq": 'ID="_any\n',
    "unclosed-sq": "ID='_any\nVERSION_ID=1\n",
    "unclosed-dq-eof": 'ID="_any',
    "joined": "ID=_a\\\nny\n",
    "quoted-parts": "ID=\"_a\"'ny'\n",
    "trailing-blanks": "ID=_any   \t\n",
    "escaped-blank": "ID=_any\\ \n",
    "leading-blank-key": "   ID=_any\n",
    "blank-before-eq": "ID =_any\n",
    "comment-after": "ID=_any # c\n",
    "cr-lines": "X=1\rID=_any\r",
    "no-newline": "ID=_any",
    "dq-escape": 'ID="\\_any"\n',
    "later-wins": "ID=_any\nID=other\n",
    "comment-continues": "# c \\\nID=_any\n",
    "nul": "ID=_any\n\0\n",
    "bad-utf8": "ID=_any\nX=\udcff\n",
    "bad-utf8-comment": "#\udcff\nID=_any\n",
}


def test_release_files_read_as_upstream(tmp_path: Path) -> None:
    """Each extension has one of RELEASES; which of them both tools merge (ID=_any, exactly,
    after parsing) must be the same."""
    def build(r: Root) -> None:
        (r / "opt").mkdir()
        for name, text in RELEASES.items():
            e = r.sysext(name, {f"opt/{name}": name}, release=None)
            rel = e / "usr/lib/extension-release.d"
            rel.mkdir(parents=True)
            (rel / f"extension-release.{name}").write_bytes(
                text.encode("utf-8", "surrogateescape"))

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root) if who == "up" else [*oc_cmd(root), "sysext"]}

    steps = [["run", "T", "merge", "--no-reload"], ["run", "T", "status", "--json=short"],
             ["run", "T", "unmerge", "--no-reload"]]
    up, oc = twin(tmp_path, build, tools, steps)
    used = [{r["hierarchy"]: r["extensions"] for r in json.loads(res[1]["out"])}["/opt"]
            for res in (up, oc)]
    assert used[1] == used[0], f"(upstream, overlayctl): {used}"
    assert "unclosed-dq" not in used[1] and "plain" in used[1] and "nul" not in used[1]
    for line in oc[0]["err"].splitlines():
        assert "\n" not in line and "\x00" not in line


_HWM = """\
import sys
sys.argv = ["overlayctl", *sys.argv[1:]]
from overlayctl.cli import main
rc = main()
with open("/proc/self/status") as f:
    hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
print(hwm, file=sys.stderr)
sys.exit(rc)
"""


def _peak_rss_kib(argv: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    """Run overlayctl with ARGV; its exit status, peak RSS (VmHWM, KiB: of the overlayctl
    process itself, from its exec on) and stderr (without the VmHWM line)."""
    p = subprocess.run([sys.executable, "-c", _HWM, *argv], capture_output=True, text=True,
                       env=env, cwd=str(REPO))
    *err, hwm = p.stderr.splitlines()
    return p.returncode, int(hwm), "\n".join(err)


@pytest.mark.parametrize("content", ["text", "zeros"])
def test_64mib_release_file_is_not_used_and_not_read(root: Root, content: str) -> None:
    """A 64 MiB extension-release file is over systemd's READ_FULL_BYTES_MAX (64 MiB - 1):
    that extension is ignored with a warning, the others merge, and overlayctl's peak RSS
    stays far below the file's size (it is refused by its size, unread). (262 in fact reads a
    few KiB beyond the limit through its malloc'ed buffer, so it takes a 64 MiB text file;
    one of zeros it refuses for the NUL bytes.)"""
    (root / "opt").mkdir()
    root.sysext("good", {"opt/good": "g"})
    big = root.sysext("big", {"opt/big": "b"})
    f = big / "usr/lib/extension-release.d/extension-release.big"
    with open(f, "wb") as out:
        out.write(b"ID=_any\n")
        if content == "text":
            chunk = (b"# " + b"p" * 61 + b"\n") * (1 << 14)       # 1 MiB
            for _ in range(64):
                out.write(chunk)
        out.truncate(64 << 20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env["PYTHONPATH"] = str(REPO)
    argv = [f"--root={root.path}", "sysext"]
    rc, rss, err = _peak_rss_kib([*argv, "merge", "--no-reload"], env)
    try:
        assert rc == 0, err
        assert rss < 64 * 1024, f"peak RSS {rss} KiB"
        assert (root / "opt/good").exists() and not (root / "opt/big").exists()
        [warning] = [line for line in err.splitlines() if "big" in line]
        assert "warning" in warning and str(f) in warning and "64 MiB" in warning
    finally:
        root.run("sysext", "unmerge", "--no-reload", check=True)
    if content == "zeros":
        need_peer(PEER)
        twin_root = Root(root.path.parent / "upstream")
        (twin_root / "opt").mkdir()
        twin_root.sysext("good", {"opt/good": "g"})
        tb = twin_root.sysext("big", {"opt/big": "b"})
        os.replace(f, tb / "usr/lib/extension-release.d/extension-release.big")
        assert PEER is not None
        res = run_plan(twin_root.path, [["run", "up:sysext", "merge", "--no-reload"], ["snap"],
                                        ["run", "up:sysext", "unmerge", "--no-reload"]],
                       peer=PEER, namespace=True)
        assert res["steps"][0]["rc"] == 0
        files = res["steps"][1]["files"]
        assert "opt/good" in files and "opt/big" not in files


# ---------------------------------------------------------------------------------------------
# .v directories (tests/unit/test_discovery.py's VPICK_CASES)

def test_vpick_picks_as_upstream(tmp_path: Path) -> None:
    def build(r: Root) -> None:
        for case, (names, _) in VPICK_CASES.items():
            for n in names:
                (r / f"var/lib/extensions/{case}.v/{n.replace('foo', case, 1)}").mkdir(
                    parents=True)

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root) if who == "up" else [*oc_cmd(root), "sysext"]}

    up, oc = twin(tmp_path, build, tools, [["run", "T", "list", "--json=short"]],
                  same_root=True)
    picked = [{r["name"]: os.path.basename(r["path"]) for r in json.loads(res[0]["out"])}
              for res in (up, oc)]
    assert picked[1] == picked[0]
    assert picked[1]["space"] == "space_1"
    want = {c: w.replace("foo", c, 1) for c, (_, w) in VPICK_CASES.items()}
    if os.uname().machine == "x86_64":
        assert picked[1] == want


# ---------------------------------------------------------------------------------------------
# the kernel command line kill switch

KILL = [("quiet systemd.sysext=0", "*"), ("systemd.sysext=no", "*"),
        ("systemd.sysext=0 systemd.sysext=1", "*"), ("systemd.sysext", "*"),
        ("systemd.sysext=bogus", "*"), ("systemd.confext=0", "*"),
        ("systemd.sysext=0", None), ("systemd.sysext=0", "1")]


@pytest.mark.parametrize(("cmdline", "exec_pid"), KILL)
def test_kill_switch_as_upstream(tmp_path: Path, cmdline: str, exec_pid: str | None) -> None:
    """Only when started by the service manager ($SYSTEMD_EXEC_PID, "*" for tests) does
    systemd.sysext=0 turn every verb into a no-op (with a notice)."""
    env = {"SYSTEMD_PROC_CMDLINE": cmdline}
    if exec_pid:
        env["SYSTEMD_EXEC_PID"] = exec_pid

    def tools(who: str, root: Path) -> dict[str, list[str]]:
        assert PEER is not None
        return {"T": up_cmd(PEER, root, env) if who == "up" else [*oc_cmd(root, env), "sysext"]}

    steps = [["run", "T", "merge", "--no-reload"], ["snap"], ["run", "T", "bogus-verb"],
             ["run", "T", "unmerge", "--no-reload"]]
    up, oc = twin(tmp_path, base, tools, steps)
    off = "Disabled by the kernel command line option 'systemd.sysext='"
    for i in (0, 2, 3):
        assert oc[i]["rc"] == up[i]["rc"], (i, up[i], oc[i])
        assert (off in oc[i]["err"]) is (off in up[i]["err"]), (i, up[i], oc[i])
    assert oc[1]["overlays"] == up[1]["overlays"]


def test_kill_switch_for_one_class_of_two(root: Root) -> None:
    """Plain overlayctl acts on both classes: the switch turns off only the one named."""
    base(root)
    env = {"SYSTEMD_PROC_CMDLINE": "systemd.sysext=0", "SYSTEMD_EXEC_PID": "*"}
    r = root.run("merge", "--no-reload", env=env, check=True)
    try:
        assert "'systemd.sysext='" in r.stderr
        assert (root / "etc/cc.conf").exists() and not (root / "usr/share/foo").exists()
    finally:
        root.run("unmerge", "--no-reload", check=True)


# ---------------------------------------------------------------------------------------------
# the units: 262's conditions

def _unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        k, eq, v = line.partition("=")
        if eq and not line.startswith("#"):
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize(("ours", "theirs"), [
    ("overlayctl-sysext.service", "systemd-sysext.service"),
    ("overlayctl-confext.service", "systemd-confext.service"),
    ("overlayctl-sysupdate-notify.socket", "systemd-sysupdate-notify-sysext.socket"),
    ("overlayctl-sysupdate-notify@.service", "systemd-sysupdate-notify-sysext@.service"),
    ("overlayctl-sysext.socket", "systemd-sysext.socket"),
])
def test_units_have_the_conditions_of_262(ours: str, theirs: str) -> None:
    need_peer(PEER)
    up = _unit(peer_dir() / "sid/usr/lib/systemd/system" / theirs)
    oc = _unit(REPO / "units" / ours)
    for key in [k for k in up if k.startswith("Condition")]:
        assert set(up[key]) <= set(oc.get(key, [])), f"{ours} {key}: {oc.get(key)} vs {up[key]}"
    for key in ("ListenStream", "SocketMode", "Accept", "FileDescriptorName",
                "MaxConnectionsPerSource", "DefaultDependencies", "Before", "After", "Type",
                "RemainAfterExit", "WantedBy"):
        for value in up.get(key, []):
            # Ordered against each other as upstream's units are, by overlayctl's names.
            want = value.replace("systemd-sysext", "overlayctl-sysext").replace(
                "systemd-confext", "overlayctl-confext").split()
            have = " ".join(oc.get(key, [])).split()
            assert set(want) <= set(have), f"{ours} {key}={value}: {oc.get(key)}"
    if "@" not in ours:     # an instance goes with its socket, which conflicts
        assert any(theirs in v for v in oc.get("Conflicts", [])), f"{ours}: Conflicts={theirs}"


# ---------------------------------------------------------------------------------------------
# io.systemd.SysUpdate.Notify (systemd-sysupdate-notify-sysext.socket)

def test_sysupdate_notification_refreshes_as_upstream(tmp_path: Path) -> None:
    from tests.integration.test_varlink import VARLINKCTL, both, vl

    if not os.access(VARLINKCTL, os.X_OK):
        pytest.skip(f"no {VARLINKCTL}")
    method = "io.systemd.SysUpdate.Notify.OnCompletedUpdate"
    calls = ['{"component":"x","version":"1","resources":[{"transfer":"t","path":null}]}',
             '{"bogus":1}', '{"version":5}', '{"resources":[{"transfer":"t","extra":1}]}',
             '{"resources":{}}', '{"component":null}']

    def steps(s: str) -> list[list[str]]:
        return [vl(s, method, "{}"), ["snap"],
                *(vl(s, method, c) for c in calls), ["snap"],
                vl(s, "org.varlink.service.GetInterfaceDescription",
                   '{"interface":"io.systemd.SysUpdate.Notify"}'),
                vl(s, "io.systemd.sysext.Unmerge", "{}"),
                vl(s, "io.systemd.sysext.Unmerge", '{"class":"confext"}')]

    oc, up = both(tmp_path, steps, base)
    assert oc == up
    merged = oc[1]["files"]
    assert merged["usr/share/foo/hello"] == "foo" and merged["etc/cc.conf"] == "cc"
    assert oc[0] == {"rc": 0, "replies": [{}], "said": []}
    assert [r["rc"] for r in oc[2:8]] == [0, 1, 1, 1, 1, 0]


def test_sysupdate_notification_from_an_unprivileged_peer(tmp_path: Path) -> None:
    """The service runs as root, listening ($SYSTEMD_VARLINK_LISTEN, as both tools take it);
    a caller that is not root gets org.varlink.service.PermissionDenied, and nothing is
    merged."""
    import shutil
    import tempfile

    from tests.integration.test_varlink import VARLINKCTL

    if not os.access(VARLINKCTL, os.X_OK):
        pytest.skip(f"no {VARLINKCTL}")
    assert PEER is not None
    need_peer(PEER)
    sockets = Path(tempfile.mkdtemp(prefix="overlayctl-vl-"))
    try:
        os.chmod(sockets, 0o755)
        for who in ("oc", "up"):
            r = Root(tmp_path / f"{who}-root")
            base(r)
            sock = sockets / f"{who}.sock"
            cmd = (up_cmd(PEER, r.path) if who == "up" else oc_cmd(r.path))
            server = subprocess.Popen([*cmd], env={**os.environ, "PYTHONPATH": str(REPO),
                                                   "SYSTEMD_VARLINK_LISTEN": str(sock)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
            try:
                deadline = time.monotonic() + 20
                while (not sock.exists() and server.poll() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                assert sock.exists(), (who, server.poll())
                p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                    "--clear-groups", str(VARLINKCTL), "call", f"unix:{sock}",
                                    "io.systemd.SysUpdate.Notify.OnCompletedUpdate", "{}"],
                                   capture_output=True, text=True, timeout=60)
                assert p.returncode == 1, (who, p.stdout, p.stderr)
                assert p.stdout.strip() == "{}" and "Permission denied" in p.stderr, (who, p)
            finally:
                server.kill()
                server.wait()
            assert not mounts_below(str(r.path))
            assert not (r / "usr/share/foo").exists()
    finally:
        shutil.rmtree(sockets)


# ---------------------------------------------------------------------------------------------
# EXTENSION_RESTART_UNITS= and friends: never with --root (vm-tests/restart_units_guest.py
# does the rest with systemd as PID 1)

def test_no_service_manager_actions_with_root(root: Root, tmp_path: Path) -> None:
    spy = tmp_path / "spy"
    spy.mkdir()
    log = tmp_path / "systemctl.log"
    (spy / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (spy / "systemctl").chmod(0o755)
    base(root)
    (root / "var/lib/extensions/foo/usr/lib/extension-release.d/extension-release.foo"
     ).write_text('ID=_any\nEXTENSION_RELOAD_MANAGER=1\nEXTENSION_RESTART_UNITS="a.service"\n'
                  'EXTENSION_RELOAD_OR_RESTART_UNITS="b.service bad/name"\n')
    env = {"PATH": f"{spy}:{os.environ['PATH']}"}
    for verb in (["merge"], ["refresh", "--always-refresh=yes"], ["unmerge"]):
        root.run("sysext", *verb, env=env, check=True)
    assert not log.exists(), log.read_text()


# ---------------------------------------------------------------------------------------------
# --root= (empty) is /, as upstream (read-only: status of the real hierarchies)

def test_empty_root_is_slash_as_upstream(tmp_path: Path) -> None:
    need_peer(PEER)
    assert PEER is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    out = {}
    for who, cmd in (("oc", [sys.executable, "-m", "overlayctl", "sysext"]),
                     ("up", [PEER.sysext])):
        runs = [subprocess.run([*cmd, *root, "status", "--json=short"], capture_output=True,
                               text=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
                for root in (["--root="], [])]
        assert [r.returncode for r in runs] == [0, 0], (who, runs)
        assert runs[0].stdout == runs[1].stdout, who
        out[who] = [(r["hierarchy"], r["extensions"]) for r in json.loads(runs[0].stdout)]
    assert out["oc"] == out["up"]
