#!/bin/bash
# Installs overlayctl's systemd units: install-units.sh [OVERLAYCTL_PATH] [UNIT_DIR]
# OVERLAYCTL_PATH defaults to the overlayctl on PATH, UNIT_DIR to /etc/systemd/system.
# Then: systemctl daemon-reload; systemctl enable overlayctl-confext.service overlayctl-sysext.service
# and, for the io.systemd.sysext varlink service: systemctl enable --now overlayctl-sysext.socket
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$(command -v overlayctl || true)}
dir=${2:-/etc/systemd/system}
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "install-units: no overlayctl executable found; give its path as the first argument" >&2
    exit 1
fi
# A console script that pip wrote (#!/path/to/python, site and .pth files at every start)
# gets a lean launcher beside it for the units, as the Debian package's /usr/bin/overlayctl
# (tools/launcher.sh: python -IS with the package's directories): the units run at boot.
first=$(head -n1 "$bin")
if [[ $first == "#!"*python* && $first != *" -IS" ]]; then
    py=${first#\#!}
    pkg=$("$py" -c 'import os, overlayctl; print(os.path.dirname(os.path.dirname(overlayctl.__file__)))')
    purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    lean="$(dirname "$bin")/overlayctl-boot"
    "$here/tools/launcher.sh" "$lean" "$py" "$pkg" "$purelib"
    "$py" -m compileall -q "$pkg/overlayctl" >/dev/null
    echo "wrote $lean (the lean launcher the units run)"
    bin=$lean
fi
mkdir -p "$dir"
for u in overlayctl-confext.service overlayctl-sysext.service overlayctl-sysext.socket \
         overlayctl-sysupdate-notify.socket overlayctl-sysupdate-notify@.service \
         overlayctl-sysext@.service; do
    sed "s|@OVERLAYCTL@|$bin|g" "$here/units/$u" > "$dir/$u"
    echo "installed $dir/$u"
done
