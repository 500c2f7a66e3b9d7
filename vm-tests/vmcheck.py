"""The check lines the guest scripts print (guest.py, restart_units_guest.py,
usr_dpkg_guest.py, flatcar_commit_guest.py): one line "CHECK PASS|FAIL PREFIXNAME :: DETAIL"
per check, which run.sh counts. run.sh copies this file into every payload beside them; each
script puts its own directory on sys.path first (it may run with python3 -I, which leaves it
out). Stdlib only."""

from __future__ import annotations


class Checks:
    """The checks of one script: PREFIX goes before each name; `failed` counts the failures."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.failed = 0

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def check(self, name: str, cond: object, detail: str = "") -> bool:
        ok = bool(cond)
        if not ok:
            self.failed += 1
        self.say(f"CHECK {'PASS' if ok else 'FAIL'} {self.prefix}{name} :: {detail}")
        return ok
