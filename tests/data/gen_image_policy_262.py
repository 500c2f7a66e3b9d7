#!/usr/bin/env python3
"""Record what upstream systemd 262 says about each policy string of policy_oracle.py into
image_policy_262.json (read by tests/unit/test_policy.py).

Needs the sid tree under /work/peer (see /work/shared/peer/peer-sysext.sh) and root (the
systemd-sysext run uses a private mount namespace). Run from the repository:

    python3 tests/data/gen_image_policy_262.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policy_oracle as oracle


def main() -> int:
    if not oracle.available():
        print("the systemd 262 tree is not under /work/peer", file=sys.stderr)
        return 1
    version = subprocess.run(
        [str(oracle.LOADER), "--library-path", oracle.LIBS,
         str(oracle.SID / "usr/bin/systemd-analyze"), "--version"],
        capture_output=True, text=True, check=True).stdout.splitlines()[0]
    cases = []
    for s in oracle.all_policies():
        a = oracle.analyze(s)
        ok, msg = oracle.sysext_accepts(s)
        if ok != a["ok"]:
            print(f"systemd-analyze and systemd-sysext disagree on {s!r}", file=sys.stderr)
            return 1
        cases.append({"policy": s, **a, "sysext_error": None if ok else msg})
    # One case per line: small diffs when upstream changes its mind.
    head = json.dumps({"generator": "tests/data/gen_image_policy_262.py",
                       "upstream": version})[:-1]
    lines = ",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":"))
                        for c in cases)
    oracle.DATA.write_text(f'{head}, "cases": [\n{lines}\n]}}\n')
    n_ok = sum(c["ok"] for c in cases)
    print(f"{oracle.DATA}: {len(cases)} policies, {n_ok} accepted, {len(cases) - n_ok} refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
