"""The merge units' re-merge paths carry no mode of their own: start and reload run a plain
`refresh`, which keeps the mode the hierarchies are merged in (docs/design.md, "Refresh keeps
the merged mode"); a mode belongs in sysext.conf/confext.conf, read by every path alike."""

from __future__ import annotations

from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "units"


def exec_lines(unit: Path) -> dict[str, str]:
    out = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("Exec"):
            out[key] = value
    return out


@pytest.mark.parametrize("cls", ["sysext", "confext"])
def test_start_and_reload_are_a_plain_refresh(cls: str) -> None:
    ex = exec_lines(UNITS / f"overlayctl-{cls}.service")
    assert ex["ExecStart"] == ex["ExecReload"] == f"@OVERLAYCTL@ {cls} refresh"
    assert ex["ExecStop"] == f"@OVERLAYCTL@ {cls} unmerge"
    assert "--mutable" not in " ".join(ex.values())


def test_varlink_service_names_no_mode() -> None:
    assert exec_lines(UNITS / "overlayctl-sysext@.service") == {"ExecStart": "-@OVERLAYCTL@"}
