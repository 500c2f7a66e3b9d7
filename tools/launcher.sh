#!/bin/bash
# launcher.sh OUT PYTHON DIR...: writes OUT, the lean way to start overlayctl at boot.
# `PYTHON -IS`: -I ignores PYTHON* variables, the user's site and the current directory; -S
# skips site, whose .pth files cost milliseconds to tens of them (a venv's editable finder);
# the directories that hold overlayctl and psutil (DIR...) are added instead, after the
# standard library. The Debian package installs it as /usr/bin/overlayctl
# (PYTHON=/usr/bin/python3, DIR=/usr/lib/python3/dist-packages); bench/ times it.
set -euo pipefail
out=${1:?usage: launcher.sh OUT PYTHON DIR...}
py=${2:?usage: launcher.sh OUT PYTHON DIR...}
shift 2
[ $# -gt 0 ] || { echo "launcher.sh: name at least one directory" >&2; exit 2; }
dirs=$(printf '%s\n' "$@" | python3 -c 'import sys; print(repr([l.rstrip("\n") for l in sys.stdin]))')
cat >"$out.tmp" <<LAUNCHER
#!$py -IS
import sys
sys.path.extend($dirs)
from overlayctl.cli import main
sys.exit(main())
LAUNCHER
chmod 755 "$out.tmp"
mv "$out.tmp" "$out"
