#!/bin/bash
# The whole test suite: lint, types, unit tests and integration tests with real overlayfs
# mounts. The integration tests run inside a private mount namespace, so nothing they mount
# is visible outside it, and they only touch temporary directories (--root=<tmpdir>).
set -euo pipefail
cd "$(dirname "$0")"
./tools/setup.sh
.venv/bin/ruff check overlayctl tests
.venv/bin/mypy overlayctl
exec unshare -m --propagation private -- .venv/bin/python -m pytest -q "$@"
