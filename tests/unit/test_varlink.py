"""The varlink service without the real client: framing, dispatch, validation, activation.

The server runs in a thread on one end of a socketpair; the test speaks the wire protocol on
the other end. The expected answers are what systemd 262's systemd-sysext sends for the same
messages (recorded with a raw client; tests/integration/test_varlink.py compares the two
through varlinkctl)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from overlayctl import varlink
from overlayctl.errors import OverlayctlError
from overlayctl.varlink import (
    IO_SYSTEMD_SYSEXT,
    ORG_VARLINK_SERVICE,
    Connection,
    Options,
    Service,
    bad_parameter,
    image_record,
    parse_interface,
    serve,
    undispatchable,
)
from tests.conftest import REPO, Root


class Client:
    """The other end of a socketpair whose first end a server thread serves."""

    def __init__(self, service: Service) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.thread = threading.Thread(target=serve,
                                       args=(service, [], [Connection.for_socket(theirs)]),
                                       daemon=True)
        self.thread.start()
        self.buf = b""

    def send(self, msg: dict[str, Any] | bytes) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\0"
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the server closed the connection."""
        while b"\0" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:     # closed with our data unread
                return None
            if not data:
                return None
            self.buf += data
        raw, self.buf = self.buf.split(b"\0", 1)
        msg: dict[str, Any] = json.loads(raw)
        return msg

    def call(self, method: str, params: dict[str, Any] | None = None,
             **flags: bool) -> dict[str, Any] | None:
        self.send({"method": method, "parameters": params or {}, **flags})
        return self.recv()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "server did not stop after the last connection"


@pytest.fixture
def client(tmp_path: Path) -> Any:
    c = Client(Service(Options(root=str(tmp_path))))
    yield c
    c.close()


def invalid(name: str) -> dict[str, Any]:
    return {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": name}}


# -- the interface descriptions --------------------------------------------------------------

def test_sysext_interface_has_262s_methods_and_fields() -> None:
    i = parse_interface(IO_SYSTEMD_SYSEXT)
    assert i.name == "io.systemd.sysext"
    auth = "allowInteractiveAuthentication"
    assert {m.name: [f.name for f in m.inputs] for m in i.methods.values()} == {
        "Merge": ["class", "force", "noReload", "noexec", auth],
        "Unmerge": ["class", "noReload", auth],
        "Refresh": ["class", "force", "noReload", "alwaysRefresh", "noexec", auth],
        "List": ["class", auth]}
    assert [m.name for m in i.methods.values() if m.requires_more] == ["List"]
    assert all(f.nullable for m in i.methods.values() for f in m.inputs)
    assert [(f.name, f.type, f.nullable) for f in i.methods["List"].outputs] == [
        ("Class", "ImageClass", False), ("Type", "ImageType", False), ("Name", "string", False),
        ("Path", "string", True), ("ReadOnly", "bool", False),
        *((k, "int", True) for k in ("CreationTimestamp", "ModificationTimestamp", "Usage",
                                     "UsageExclusive", "Limit", "LimitExclusive"))]
    assert i.enums == {"ImageClass": ["sysext", "confext"],
                       "ImageType": ["directory", "subvolume", "raw", "block", "mstack"]}
    assert {k: [f.name for f in v] for k, v in i.errors.items()} == {
        "NoImagesFound": [], "AlreadyMerged": ["hierarchy"]}


def test_descriptions_are_tab_indented_as_served() -> None:
    for text in (IO_SYSTEMD_SYSEXT, ORG_VARLINK_SERVICE):
        lines = text.splitlines()
        assert not any(line.startswith(" ") for line in lines)
        assert any(line.startswith("\t") for line in lines)
        assert text.endswith(")\n")
    assert "\tclass: ?ImageClass,\n" in IO_SYSTEMD_SYSEXT


@pytest.mark.parametrize(("method", "params", "bad"), [
    # validation: declared fields first (in declared order), then undeclared keys
    ("Merge", {"force": "yes"}, "force"),
    ("Merge", {"bogus": 1, "force": "yes"}, "force"),
    ("Merge", {"bogus": 1}, "bogus"),
    ("Merge", {"class": "portable"}, "class"),
    ("Merge", {"class": 5}, "class"),
    ("Merge", {"Name": "x"}, "Name"),
    ("List", {"class": "bogus", "Type": 1}, "class"),
    ("List", {"allowInteractiveAuthentication": 1}, "allowInteractiveAuthentication"),
    # then the method's dispatch table: output-only keys and nulls, in the order they came
    ("Merge", {"noexec": None, "force": None}, "noexec"),
    ("Merge", {"force": None, "noexec": None}, "force"),
    ("Unmerge", {"class": None}, "class"),
    ("Refresh", {"alwaysRefresh": None}, "alwaysRefresh"),
    ("List", {"Type": 1, "class": None}, "Type"),
    ("List", {"class": None, "Type": 1}, "class"),
    ("Refresh", {"class": "confext", "force": True, "noReload": False, "alwaysRefresh": True,
                 "noexec": False, "allowInteractiveAuthentication": False}, None),
    ("List", {}, None),
])
def test_parameter_checks_name_what_upstream_names(method: str, params: dict[str, Any],
                                                   bad: str | None) -> None:
    i = parse_interface(IO_SYSTEMD_SYSEXT)
    m = i.methods[method]
    assert (bad_parameter(i, m, params) or undispatchable(m, params)) == bad


# -- the wire protocol -----------------------------------------------------------------------

def test_get_info_and_interface_description(client: Client) -> None:
    info = client.call("org.varlink.service.GetInfo")
    assert info is not None and set(info) == {"parameters"}
    p = info["parameters"]
    assert list(p) == ["vendor", "product", "version", "url", "interfaces"]
    assert p["interfaces"] == ["io.systemd", "io.systemd.SysUpdate.Notify", "io.systemd.sysext",
                               "org.varlink.service"]
    d = client.call("org.varlink.service.GetInterfaceDescription",
                    {"interface": "io.systemd.sysext"})
    assert d == {"parameters": {"description": IO_SYSTEMD_SYSEXT}}
    assert client.call("org.varlink.service.GetInterfaceDescription",
                       {"interface": "io.nope"}) == {
        "error": "org.varlink.service.InterfaceNotFound", "parameters": {"interface": "io.nope"}}
    assert client.call("org.varlink.service.GetInterfaceDescription", {}) == invalid("interface")
    assert client.call("org.varlink.service.GetInfo", {"x": 1}) == invalid("x")
    assert client.call("org.varlink.service.GetInfo", {"vendor": "x"}) == invalid("vendor")
    assert client.call("org.varlink.service.GetInterfaceDescription",
                       {"interface": "io.systemd", "description": "x"}) == {
        "error": "io.systemd.System",
        "parameters": {"origin": "linux", "errno": 99, "errnoName": "EADDRNOTAVAIL"}}


def test_unknown_methods(client: Client) -> None:
    for m in ("io.systemd.sysext.Nope", "io.nope.Nope", "nodots"):
        assert client.call(m) == {"error": "org.varlink.service.MethodNotFound",
                                  "parameters": {"method": m}}


def test_bad_parameters_on_the_wire(client: Client) -> None:
    assert client.call("io.systemd.sysext.Merge", {"bogus": 1, "force": "yes"}) == \
        invalid("force")
    assert client.call("io.systemd.sysext.Unmerge", {"noReload": None}) == invalid("noReload")


def test_list_needs_more_and_sends_continues(tmp_path: Path) -> None:
    root = Root(tmp_path / "r")
    root.sysext("foo")
    root.sysext("bar")
    c = Client(Service(Options(root=str(root.path))))
    try:
        assert c.call("io.systemd.sysext.List") == {"error": "org.varlink.service.ExpectedMore"}
        c.send({"method": "io.systemd.sysext.List", "more": True})
        first, last = c.recv(), c.recv()
        assert first is not None and last is not None
        assert first["continues"] is True and "continues" not in last
        names = [first["parameters"]["Name"], last["parameters"]["Name"]]
        assert names == ["bar", "foo"]
        rec = first["parameters"]
        assert list(rec)[:5] == ["Type", "Class", "Name", "Path", "ReadOnly"]
        assert rec["Type"] == "directory" and rec["Class"] == "sysext"
        assert rec["Path"] == str(root / "var/lib/extensions/bar") and rec["ReadOnly"] is False
        assert "ModificationTimestamp" not in rec and "Usage" not in rec
        # confext: none there
        assert c.call("io.systemd.sysext.List", {"class": "confext"}, more=True) == {
            "error": "io.systemd.sysext.NoImagesFound"}
    finally:
        c.close()


def test_oneway_gets_no_reply_and_messages_are_answered_in_order(client: Client) -> None:
    client.send({"method": "io.systemd.sysext.Nope", "oneway": True})
    client.send({"method": "io.systemd.sysext.List", "oneway": True})   # would be ExpectedMore
    two = (json.dumps({"method": "org.varlink.service.GetInfo"}).encode() + b"\0"
           + json.dumps({"method": "io.nope.X"}).encode() + b"\0")
    client.send(two[:7])
    client.send(two[7:60])
    client.send(two[60:])
    first, second = client.recv(), client.recv()
    assert first is not None and "vendor" in first["parameters"]
    assert second == {"error": "org.varlink.service.MethodNotFound",
                      "parameters": {"method": "io.nope.X"}}


def test_null_parameters_and_false_flags_are_a_plain_call(client: Client) -> None:
    client.send({"method": "org.varlink.service.GetInfo", "parameters": None, "more": False,
                 "oneway": False})
    r = client.recv()
    assert r is not None and "continues" not in r and "vendor" in r["parameters"]


@pytest.mark.parametrize("raw", [
    b"not json\0",
    b"[1]\0",
    b'{"parameters": {}}\0',
    b'{"method": 1}\0',
    b'{"method": "org.varlink.service.GetInfo", "parameters": []}\0',
    b'{"method": "org.varlink.service.GetInfo", "more": true, "oneway": true}\0',
    b'{"method": "org.varlink.service.GetInfo", "more": "yes"}\0',
    b'{"method": "org.varlink.service.GetInfo", "bogus": 1}\0',
    b'{"method": "org.varlink.service.GetInfo", "method": "x"}\0',
    b'{"method": "org.varlink.service.GetInfo", "parameters": {"x": NaN}}\0',
    b'{"method": "\xff"}\0',
])
def test_a_malformed_message_ends_the_connection(client: Client, raw: bytes) -> None:
    client.send(raw)
    assert client.recv() is None


def test_a_message_over_16_mib_ends_the_connection(client: Client) -> None:
    chunk = b" " * (1024 * 1024)
    try:
        for _ in range(17):
            client.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert client.recv() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a client as another user")
def test_only_root_may_change_the_merge(tmp_path: Path) -> None:
    root = Root(tmp_path / "r")
    root.sysext("foo")
    path = f"\0overlayctl-test-{os.getpid()}"    # abstract: no directory permissions involved
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    t = threading.Thread(target=serve, args=(Service(Options(root=str(root.path))), [listener],
                                             []), daemon=True)
    t.start()
    code = f"""
import json, os, socket
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX); s.connect({path!r})
out = []
for m in ({{"method": "io.systemd.sysext.Merge"}}, {{"method": "io.systemd.sysext.Unmerge"}},
          {{"method": "io.systemd.sysext.Refresh"}},
          {{"method": "io.systemd.sysext.List", "more": True}}):
    s.sendall(json.dumps(m).encode() + b"\\0")
    b = b""
    while not b.endswith(b"\\0"):
        b += s.recv(65536)
    out.append(json.loads(b[:-1]))
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    t.join(10)
    listener.close()
    assert p.returncode == 0, p.stderr
    denied = {"error": "org.varlink.service.PermissionDenied"}
    out = json.loads(p.stdout)
    assert out[:3] == [denied] * 3
    assert out[3]["parameters"]["Name"] == "foo"
    assert not root.mounts()


# -- List records ----------------------------------------------------------------------------

def test_raw_image_record(tmp_path: Path) -> None:
    f = tmp_path / "img.raw"
    f.write_bytes(b"x" * 5000)
    f.chmod(0o444)
    st = f.stat()
    rec = image_record("sysext", "raw", "img", str(f))
    assert rec["ReadOnly"] is True                 # no write bit: read-only, even for root
    assert rec["ModificationTimestamp"] == st.st_mtime_ns // 1000
    assert rec["Usage"] == rec["UsageExclusive"] == st.st_blocks * 512
    assert rec["Limit"] == rec["LimitExclusive"] == 5000
    f.chmod(0o644)
    assert image_record("sysext", "raw", "img", str(f))["ReadOnly"] is False


def test_vendor_tree_is_read_only() -> None:
    # Upstream: an image whose path is below /usr is a vendor image, read-only.
    assert image_record("confext", "directory", "x", "/usr/lib")["ReadOnly"] is True
    assert image_record("confext", "directory", "x", "/etc")["ReadOnly"] is False


# -- activation --------------------------------------------------------------------------------

def test_invocation_needs_one_fd_for_this_process_named_varlink() -> None:
    me = str(os.getpid())
    assert not varlink.invoked({})
    assert not varlink.invoked({"LISTEN_FDS": "1", "LISTEN_PID": me})       # names: unknown
    assert not varlink.invoked({"LISTEN_FDS": "1", "LISTEN_PID": "1",
                                "LISTEN_FDNAMES": "varlink"})
    assert not varlink.invoked({"LISTEN_FDS": "0", "LISTEN_PID": me, "LISTEN_FDNAMES": ""})
    assert not varlink.invoked({"LISTEN_FDS": "1", "LISTEN_PID": me, "LISTEN_FDNAMES": "x"})
    assert varlink.invoked({"LISTEN_FDS": "1", "LISTEN_PID": me, "LISTEN_FDNAMES": "varlink"})
    assert varlink.invoked({"SYSTEMD_VARLINK_LISTEN": "-"})
    with pytest.raises(OverlayctlError):
        varlink.invoked({"LISTEN_FDS": "2", "LISTEN_PID": me,
                         "LISTEN_FDNAMES": "varlink:varlink"})


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "SYSTEMD_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_stdio_service_through_the_command_line(tmp_path: Path) -> None:
    msgs = (json.dumps({"method": "org.varlink.service.GetInfo"}).encode() + b"\0"
            + json.dumps({"method": "io.systemd.sysext.List", "more": True}).encode() + b"\0")
    p = subprocess.run([sys.executable, "-m", "overlayctl", f"--root={tmp_path}"], input=msgs,
                       capture_output=True, env=_env(SYSTEMD_VARLINK_LISTEN="-"), timeout=60)
    assert p.returncode == 0, p.stderr
    replies = [json.loads(m) for m in p.stdout.split(b"\0")[:-1]]
    assert replies[0]["parameters"]["vendor"] == "overlayctl"
    assert replies[1] == {"error": "io.systemd.sysext.NoImagesFound"}
    assert p.stdout.endswith(b"\0")


def test_fds_for_another_process_leave_the_command_line_alone() -> None:
    p = subprocess.run([sys.executable, "-m", "overlayctl", "--version"], capture_output=True,
                       text=True, env=_env(LISTEN_FDS="1", LISTEN_PID="1",
                                           LISTEN_FDNAMES="varlink"), timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("overlayctl "), p.stderr


def test_a_bad_service_command_line_is_one_line(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "overlayctl", f"--root={tmp_path}/nope"],
                       capture_output=True, text=True, env=_env(SYSTEMD_VARLINK_LISTEN="-"),
                       timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith("overlayctl: --root=") and p.stderr.count("\n") == 1
