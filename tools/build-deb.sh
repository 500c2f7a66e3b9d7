#!/bin/bash
# Builds overlayctl's Debian package: tools/build-deb.sh [OUTPUT_DIR]   (default: ./dist)
# Installs the build dependencies of debian/control with apt when some are missing (that part
# needs root), builds with dpkg-buildpackage -us -uc -b in a temporary copy of the tree, and
# copies overlayctl_VERSION_all.deb into OUTPUT_DIR. The checkout itself is not touched: no
# build/, .pybuild/ or egg-info in it, and nothing in its parent directory.
# Prints the path of the .deb on standard output; VERBOSE=1 shows the build's output.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/dist}
say() { echo "build-deb: $*" >&2; }

apt_get() {
    if [ "$(id -u)" != 0 ]; then
        say "missing build dependencies; run as root to install them, or: apt-get build-dep $here"
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -qq \
        --no-install-recommends "$@" >/dev/null
}
updated=
apt_update() { [ -n "$updated" ] || apt-get -o DPkg::Lock::Timeout=600 update -qq; updated=1; }

if ! command -v dpkg-checkbuilddeps >/dev/null; then
    say "installing dpkg-dev"
    apt_update; apt_get install dpkg-dev
fi
if ! unmet=$(cd "$here" && dpkg-checkbuilddeps 2>&1); then
    say "installing the build dependencies (${unmet##*: })"
    apt_update; apt_get build-dep "$here"
    (cd "$here" && dpkg-checkbuilddeps)
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/overlayctl-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
src=$tmp/overlayctl
mkdir "$src"
# The tree as it is now (tracked and new files, not ignored ones such as .venv or dist/).
if git -C "$here" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$here" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -C "$src" -xf -
else
    tar -C "$here" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude='__pycache__' \
        --exclude=./build --exclude='*.egg-info' -cf - . | tar -C "$src" -xf -
fi

# Debian's own interpreter and tools, not a pyenv or .venv python that PATH may put first.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV
log=$tmp/build.log
rc=0
if [ -n "${VERBOSE:-}" ]; then
    (cd "$src" && dpkg-buildpackage -us -uc -b) 2>&1 | tee "$log" >&2 || rc=$?
else
    (cd "$src" && dpkg-buildpackage -us -uc -b) >"$log" 2>&1 || rc=$?
fi
if [ "$rc" != 0 ]; then
    [ -n "${VERBOSE:-}" ] || tail -n 40 "$log" >&2
    say "dpkg-buildpackage failed"
    exit 1
fi
debs=("$tmp"/overlayctl_*_all.deb)
if [ ! -e "${debs[0]}" ]; then
    say "dpkg-buildpackage made no overlayctl_*_all.deb"; exit 1
fi
mkdir -p "$out"
for d in "${debs[@]}"; do
    cp "$d" "$out/"
    echo "$(cd "$out" && pwd)/${d##*/}"
done
