#!/bin/bash
# The whole test suite: lint, types, unit tests and integration tests with real overlayfs
# mounts. The integration tests run inside a private mount namespace, so nothing they mount
# is visible outside it, and they only touch temporary directories (--root=<tmpdir>).
set -euo pipefail
cd "$(dirname "$0")"
./tools/setup.sh
.venv/bin/ruff check overlayctl tests bench
.venv/bin/mypy overlayctl
in_ns() { unshare -m --propagation private -- "$@"; }
in_ns .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
    # Again, on the path for kernels that refuse detached mounts as overlay layers (before
    # about Linux 6.15): every overlay is then built in a private child namespace.
    OVERLAYCTL_NO_DETACHED_LAYERS=1 in_ns .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/integration/test_smoke.py tests/integration/test_modes.py \
        tests/integration/test_modes_confext.py tests/integration/test_raw.py \
        tests/integration/test_refresh.py tests/integration/test_defaults.py \
        tests/integration/test_verity_policy.py
fi
