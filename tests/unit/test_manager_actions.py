"""What merged extensions ask of the service manager (systemd 262, systemd-sysext(8)):
EXTENSION_RELOAD_MANAGER=, EXTENSION_RESTART_UNITS=, EXTENSION_RELOAD_OR_RESTART_UNITS=.
Carrying the actions out needs systemd as PID 1: vm-tests/restart_units_guest.py does that."""

from __future__ import annotations

import pytest

from overlayctl.engine import ManagerActions, manager_actions, unit_name_valid


def test_nothing_asked() -> None:
    assert manager_actions([("a", {"ID": "_any"})]) == ManagerActions()


@pytest.mark.parametrize("value,reload", [("1", True), ("yes", True), ("0", False),
                                          ("", False)])
def test_reload_manager(value: str, reload: bool) -> None:
    assert manager_actions([("a", {"EXTENSION_RELOAD_MANAGER": value})]).reload is reload


def test_reload_manager_not_a_boolean_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    assert manager_actions([("a", {"EXTENSION_RELOAD_MANAGER": "banana"})]) == ManagerActions()
    err = capsys.readouterr().err
    assert "warning" in err and "banana" in err and "'a'" in err


def test_listing_units_implies_the_reload_and_keeps_order() -> None:
    a = manager_actions([("a", {"EXTENSION_RESTART_UNITS": "  y.service x.service "}),
                         ("b", {"EXTENSION_RELOAD_OR_RESTART_UNITS": "z@1.service"})])
    assert a == ManagerActions(True, ("y.service", "x.service"), ("z@1.service",))


def test_restart_wins_over_reload_or_restart_across_extensions() -> None:
    a = manager_actions([("a", {"EXTENSION_RELOAD_OR_RESTART_UNITS": "x.service w.socket"}),
                         ("b", {"EXTENSION_RESTART_UNITS": "x.service x.service"})])
    assert a.restart == ("x.service",) and a.reload_or_restart == ("w.socket",)


def test_invalid_unit_names_are_warned_about_and_skipped(
        capsys: pytest.CaptureFixture[str]) -> None:
    a = manager_actions([("a", {"EXTENSION_RESTART_UNITS": "foo.service bad/x nosuffix"})])
    assert a == ManagerActions(True, ("foo.service",), ())
    err = capsys.readouterr().err
    assert "'bad/x'" in err and "'nosuffix'" in err and "EXTENSION_RESTART_UNITS=" in err


def test_only_invalid_units_ask_for_nothing() -> None:
    assert manager_actions([("a", {"EXTENSION_RESTART_UNITS": "bad/x"})]) == ManagerActions()


@pytest.mark.parametrize("name,ok", [
    ("foo.service", True), ("foo@bar.service", True), ("a-b_c:d.timer", True),
    ("dev-sda1.device", True), ("x\\x2dy.mount", True),
    ("foo@.service", False), ("foo", False), ("foo.bogus", False), (".service", False),
    ("@x.service", False), ("a@b@c.service", False), ("a b.service", False),
    ("a/b.service", False), ("x" * 250 + ".service", False),
])
def test_unit_names(name: str, ok: bool) -> None:
    assert unit_name_valid(name) is ok


def test_actions_add_up() -> None:
    a = ManagerActions(False, ("a.service",), ("b.service",))
    b = ManagerActions(True, ("b.service",), ("c.service",))
    assert a + b == ManagerActions(True, ("a.service", "b.service"), ("c.service",))
