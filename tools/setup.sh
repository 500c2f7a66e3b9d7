#!/bin/bash
# Installs what overlayctl's demo and tests need on a fresh Debian machine (run as root):
# Debian's python3-venv and util-linux if missing, then a virtual environment in .venv with
# overlayctl (editable) and its test tools. Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (overlayctl mounts overlays)" >&2; exit 1
fi
need=()
command -v unshare >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# Image tools for the raw-image tests (squashfs, erofs, GPT disk images).
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v mkfs.erofs >/dev/null || need+=(erofs-utils)
command -v sfdisk >/dev/null || need+=(fdisk)
# dm-verity hash trees (veritysetup format) and throw-away signing keys for the verity tests.
command -v veritysetup >/dev/null || need+=(cryptsetup-bin)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt .venv/.installed ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
    touch .venv/.installed
fi
# Byte code for every module (an editable install compiles nothing; a run that cannot write
# __pycache__, or runs with PYTHONDONTWRITEBYTECODE=1, would compile from source each time).
.venv/bin/python -m compileall -q overlayctl >/dev/null
