#!/bin/bash
# tools/peer.sh [DIR] [SUITE...]: upstream systemd-sysext/systemd-confext for the comparison
# tests (tests/integration/test_peer.py), built from Debian packages. Run as root.
#
#   DIR    default $OVERLAYCTL_PEER_DIR, else /var/cache/overlayctl/peer (outside the checkout)
#   SUITE  sid (systemd 262, the default) and/or trixie (systemd 257, only the report
#          tests/integration/peer_report.py uses it)
#
# For each suite: debootstrap --variant=minbase --include=systemd into DIR/SUITE from Debian's
# package mirror as the host's apt configuration names it (tools/mirror.sh; $MIRROR overrides),
# once: DIR/SUITE/.peer-complete marks a finished tree and holds its systemd version, and a
# re-run with every tree complete only rewrites the wrappers (a few milliseconds). The tree's
# binaries need its own glibc, so the wrappers start them through the tree's dynamic loader:
#
#   DIR/bin/systemd-sysext-SUITE, DIR/bin/systemd-confext-SUITE, DIR/bin/varlinkctl-SUITE
#   DIR/bin/systemd-repart-sid   upstream's image builder (with libcryptsetup for verity), for
#                                the tests of verity DDIs as upstream makes them
#   DIR/bin/peer-ns ROOT CMD...  CMD in a private mount namespace prepared as upstream needs it
#
# varlinkctl needs nothing beyond the systemd package (it is in it, with libsystemd-shared).
# `varlinkctl-SUITE call exec:PROGRAM ...` runs PROGRAM as a normal executable: the loader's
# --library-path is not inherited, so PROGRAM must be a wrapper (or a host program), never a
# binary inside the tree.
#
# sid moves on: the tree is checked to hold systemd 262 (trixie: 257), the version the tests
# are written against; another version is used with a loud warning (a comparison against a
# newer upstream still compares something), or refused with OVERLAYCTL_PEER_STRICT=1. Installs debootstrap with apt-get when it is missing. Whatever debootstrap
# mounts lives in a private mount namespace. Concurrent runs wait for each other (flock).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/tools/mirror.sh"
DIR=${1:-${OVERLAYCTL_PEER_DIR:-/var/cache/overlayctl/peer}}
[ $# -gt 0 ] && shift
SUITES=("$@")
[ ${#SUITES[@]} -gt 0 ] || SUITES=(sid)
say() { echo "peer: $*" >&2; }
die() { echo "peer: $1${2:+ (hint: $2)}" >&2; exit 1; }
case $DIR in sid | trixie) die "'$DIR' is taken as DIR" "tools/peer.sh DIR $DIR" ;; esac
for s in "${SUITES[@]}"; do
    case $s in sid | trixie) ;; *) die "unknown suite '$s'" "use sid and/or trixie" ;; esac
done
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap)" "sudo $0"
mkdir -p "$DIR/bin"
DIR=$(realpath "$DIR")
exec 9>"$DIR/.lock"
flock 9

expected() { case $1 in sid) echo 262 ;; trixie) echo 257 ;; esac; }

# loader TREE: the tree's dynamic loader, relative to TREE (usr/lib64/ld-linux-x86-64.so.2 on amd64)
loader() {
    local l
    for l in "$1"/usr/lib64/ld-linux-*.so.* "$1"/usr/lib/ld-linux-*.so.*; do
        [ -e "$l" ] && { echo "${l#"$1"/}"; return 0; }
    done
    return 1
}

# run_in TREE BINARY ARGS...: run TREE/usr/bin/BINARY with the tree's loader and libraries.
run_in() {
    local tree=$1 bin=$2 ld lib
    shift 2
    ld=$(loader "$tree") || die "no dynamic loader in $tree" "remove $tree and run $0 again"
    lib=$(dirname "$(realpath "$tree/$ld")")
    "$tree/$ld" --library-path "$lib/systemd:$lib" "$tree/usr/bin/$bin" "$@"
}

packages() {  # packages SUITE: what debootstrap adds to minbase
    case $1 in sid) echo systemd,systemd-repart,libcryptsetup12 ;; *) echo systemd ;; esac
}

add_repart() {  # add_repart: systemd-repart into a complete sid tree built before it was wanted
    local root=$DIR/sid log=$DIR/apt-sid-repart.log
    [ -e "$root/.peer-complete" ] && [ ! -e "$root/usr/bin/systemd-repart" ] || return 0
    say "sid: installing systemd-repart and libcryptsetup12 into $root (log: $log)"
    unshare -m --propagation private -- sh -c '
        mount -t proc proc "$1/proc" && mount --bind /dev "$1/dev" &&
        chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends systemd-repart libcryptsetup12' add-repart "$root" >"$log" 2>&1 \
        || { say "installing into the old tree failed (its package lists may be gone from the mirror; see $log): building it anew"
             rm -rf "$root"; build sid; return 0; }
    rm -f "$root"/var/cache/apt/archives/*.deb
}

build() {  # build SUITE: debootstrap DIR/SUITE unless it is complete
    local suite=$1 root=$DIR/$1 new=$DIR/$1.new log=$DIR/debootstrap-$1.log t0 mirror ver want
    [ -e "$root/.peer-complete" ] && return 0
    t0=$(date +%s.%N)
    need_debootstrap
    mirror=$(debian_mirror) || exit 1
    say "debootstrap $suite minbase + $(packages "$suite") into $root (log: $log)"
    rm -rf "$new"
    # debootstrap mounts /proc (and more) inside the tree: keep those mounts in a namespace
    # that dies with it, even when it fails halfway.
    unshare -m --propagation private -- \
        debootstrap --variant=minbase --include="$(packages "$suite")" "$suite" "$new" "$mirror" >"$log" 2>&1 \
        || { tail -20 "$log" >&2; die "debootstrap $suite failed" "see $log; the mirror was $mirror"; }
    rm -f "$new"/var/cache/apt/archives/*.deb
    ver=$(run_in "$new" systemd-sysext --version | head -1) \
        || die "systemd-sysext of the new $suite tree does not run" "see $log"
    want=$(expected "$suite")
    case $ver in
        "systemd $want "*) ;;
        *) [ "${OVERLAYCTL_PEER_STRICT:-}" = 1 ] \
               && die "$suite now has '$ver', not systemd $want, which the comparison tests are written against" \
                      "unset OVERLAYCTL_PEER_STRICT to use it anyway; the tree is left in $new"
           say "WARNING: $suite now has '$ver', not systemd $want, which the comparison tests are written against" ;;
    esac
    echo "$ver" >"$new/.peer-complete"
    rm -rf "$root"
    mv "$new" "$root"
    say "$suite: $ver, built in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
}

put() {  # put FILE: write stdin to FILE (mode 0755) unless it holds that already; atomically
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else chmod 0755 "$tmp"; mv -f "$tmp" "$1"; fi
}

wrappers() {  # wrappers SUITE
    local suite=$1 root=$DIR/$1 ld lib ver tool bin
    ld=$root/$(loader "$root")
    lib=$(dirname "$(realpath "$ld")")
    ver=$(cat "$root/.peer-complete")
    # systemd-confext is a symlink to systemd-sysext that picks its mode from argv[0]; ld.so
    # passes the program's path as argv[0], so the confext wrapper names the symlink.
    for tool in systemd-sysext systemd-confext varlinkctl; do
        bin=$root/usr/bin/$tool
        [ -e "$bin" ] || die "$bin is missing" "remove $root and run $0 again"
        put "$DIR/bin/$tool-$suite" <<EOF
#!/bin/sh
# $tool of Debian $suite, $ver, written by overlayctl's tools/peer.sh: run with the
# tree's own loader and libraries (its glibc is newer than the host's).
exec "$ld" --library-path "$lib/systemd:$lib" "$bin" "\$@"
EOF
    done
    [ "$suite" = sid ] || return 0
    # systemd-repart runs the host's mksquashfs and mkfs.erofs (found on PATH) and dlopen()s
    # the tree's libcryptsetup for the verity hash tree
    put "$DIR/bin/systemd-repart-sid" <<EOF
#!/bin/sh
# systemd-repart of Debian sid, $ver, written by overlayctl's tools/peer.sh: run with the
# tree's own loader and libraries (its glibc is newer than the host's).
exec "$ld" --library-path "$lib/systemd:$lib" "$root/usr/bin/systemd-repart" "\$@"
EOF
}

for s in "${SUITES[@]}"; do
    build "$s"
    [ "$s" = sid ] && add_repart
    wrappers "$s"
done

put "$DIR/bin/peer-ns" <<'EOF'
#!/bin/sh
# peer-ns ROOT CMD...: run CMD in a new private mount namespace set up the way upstream
# systemd-sysext needs it for --root=ROOT (written by overlayctl's tools/peer.sh):
#   * /run is a fresh tmpfs: systemd-sysext remounts /run with MS_SLAVE|MS_REC, which fails
#     with EINVAL unless /run is a mount point;
#   * ROOT is bind-mounted onto itself with shared propagation: systemd-sysext builds the
#     overlays in a child namespace and relies on propagation to bring them back (with private
#     propagation it reports success and nothing is visible).
# Every mount dies with the namespace.
set -e
[ $# -ge 2 ] || { echo "usage: peer-ns ROOT CMD..." >&2; exit 2; }
root=$(realpath "$1"); shift
exec unshare -m --propagation private -- sh -ec '
root=$1; shift
mount -t tmpfs -o mode=0755 tmpfs /run
mount --bind "$root" "$root"
mount --make-rshared "$root"
exec "$@"' peer-ns "$root" "$@"
EOF

for s in "${SUITES[@]}"; do
    say "$s: $("$DIR/bin/systemd-sysext-$s" --version | head -1) in $DIR/bin"
done
