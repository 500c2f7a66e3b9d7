"""Configuration files systemd 262's parser warns about or refuses, as found by running 262's
systemd-sysext on them (tests/integration/test_dropin_parity.py runs each case through both
tools; tests/unit/test_settings.py checks overlayctl alone).

Every case sets Mutable=yes somewhere; APPLIED says whether that still takes effect (False:
the problem makes systemd ignore the whole configuration, main file and drop-ins alike);
WARNS whether a warning naming the file is printed. FILES maps a path below the root to the
bytes to write there; the values "DIR", "LOOP" and "DANGLING" make a directory, a symlink
to itself and a dangling symlink instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

MAIN = "etc/systemd/sysext.conf"
DROPIN = "etc/systemd/sysext.conf.d"
YES = b"[SysExt]\nMutable=yes\n"


class Case(NamedTuple):
    files: dict[str, bytes | str]
    applied: bool
    warns: bool
    line: int | None = None        # the line a warning names, where there is one


CASES: dict[str, Case] = {
    "plain": Case({MAIN: YES}, True, False),
    "unknown-key": Case({MAIN: YES + b"Bogus=1\n"}, True, True, 3),
    "unknown-section": Case({MAIN: YES + b"[Foo]\nX=1\n"}, True, True, 3),
    "confext-section": Case({MAIN: YES + b"[ConfExt]\nMutable=no\n"}, True, True, 3),
    "x-prefixed": Case({MAIN: YES + b"X-Foo=1\n[X-Mine]\nA=1\nnoeq\n"}, True, False),
    "missing-equals": Case({MAIN: YES + b"noeq\n"}, True, True, 3),
    "missing-key": Case({MAIN: YES + b"=x\n"}, True, True, 3),
    "outside-section": Case({MAIN: b"Early=1\n" + YES}, True, True, 1),
    "bad-mutable-later": Case({MAIN: YES + b"Mutable=bogus\n"}, True, True, 3),
    "continuation-comment": Case({MAIN: b"[SysExt]\nMutable=y\\\n#es\n"}, True, False),
    "crlf-bom": Case({MAIN: b"\xef\xbb\xbf[SysExt]\r\nMutable=yes\r\n"}, True, False),
    "non-utf8-comment": Case({MAIN: YES + b"#\xff\n"}, True, False),
    "non-utf8-value": Case({MAIN: YES + b"X=\xff\n"}, False, True, 3),
    "non-utf8-ignored-section": Case({MAIN: YES + b"[Foo]\nX=\xff\n"}, False, True, 4),
    "broken-header": Case({MAIN: YES + b"[Broken\n"}, False, True, 3),
    "bad-image-policy": Case({MAIN: YES + b"ImagePolicy=bogus\n"}, False, True, 3),
    "dropin-non-utf8": Case({MAIN: YES, f"{DROPIN}/bad.conf": b"[SysExt]\nX=\xff\n"},
                            False, True, 2),
    "dropin-directory": Case({MAIN: YES, f"{DROPIN}/d.conf": "DIR"}, False, True),
    "main-directory": Case({MAIN: "DIR", f"{DROPIN}/x.conf": YES}, False, True),
    "main-loop": Case({MAIN: "LOOP", f"{DROPIN}/x.conf": YES}, False, True),
    "main-dangling": Case({MAIN: "DANGLING", f"{DROPIN}/x.conf": YES}, True, False),
    "dropin-loop": Case({MAIN: YES, f"{DROPIN}/x.conf": "LOOP"}, True, True),
    "dropin-dangling": Case({MAIN: YES, f"{DROPIN}/x.conf": "DANGLING"}, True, False),
}


def lay_out(root: Path, case: Case) -> None:
    """Write CASE's files below ROOT."""
    for rel, data in case.files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if data == "DIR":
            p.mkdir()
        elif data == "LOOP":
            p.symlink_to(p.name)
        elif data == "DANGLING":
            p.symlink_to("/nonexistent/file.conf")
        else:
            assert isinstance(data, bytes)
            p.write_bytes(data)
