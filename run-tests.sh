#!/bin/bash
# The whole test suite: lint, types, unit tests and integration tests with real overlayfs
# mounts. The integration tests run inside a private mount namespace, so nothing they mount
# is visible outside it, and they only touch temporary directories (--root=<tmpdir>).
set -euo pipefail
cd "$(dirname "$0")"
./tools/setup.sh
# What the comparison and dpkg tests run against, cached outside the checkout
# (/var/cache/overlayctl): upstream systemd-sysext 262 (tools/peer.sh) and a Debian trixie
# tree with a few .deb files (tools/debian-tree.sh). Built once from Debian's package mirror
# (about 25 s each), a few milliseconds once cached. If one cannot be built (no network), its
# tests skip and say why, unless OVERLAYCTL_REQUIRE_PEER=1 / OVERLAYCTL_REQUIRE_DEBTREE=1 (CI)
# make them fail. OVERLAYCTL_NO_CACHES=1 skips both builds.
if [ "${OVERLAYCTL_NO_CACHES:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
    ./tools/peer.sh || echo "run-tests: tools/peer.sh failed: the comparisons with upstream will skip" >&2
    ./tools/debian-tree.sh || echo "run-tests: tools/debian-tree.sh failed: the dpkg tests will skip" >&2
fi
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
