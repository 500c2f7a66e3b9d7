#!/bin/bash
# tools/debian-tree.sh [DIR]: a debootstrapped Debian trixie minbase tree, with dpkg and apt,
# for the tests that run the real dpkg on a /usr that overlayctl merges (issue 10), and a few
# small .deb files for those tests to install offline. Run as root.
#
#   DIR  default $OVERLAYCTL_DEBTREE_DIR, else /var/cache/overlayctl/debian-trixie
#
#   DIR/root/          the tree (apt's package lists moved out, so that a copy is smaller)
#   DIR/debs/*.deb     the packages of $DEBS, with apt-get download; DIR/debs/INDEX lists
#                      "package version file" for each
#   DIR/apt/           private apt state (package lists of the tree's suite) for the download
#   DIR/.complete      "SUITE DEBS" once everything is there; a re-run then does nothing
#
# The tests copy DIR/root for each test (tests/integration/debtree.py) and never write here.
# Downloads from Debian's package mirror, as the host's apt configuration names it
# (tools/mirror.sh; $MIRROR overrides), only while something is missing. Whatever debootstrap
# mounts lives in a private mount namespace. Concurrent runs wait for each other (flock).
#
# The packages (each needs only what minbase has, so `dpkg -i` works offline; 0.7 MB in all).
# New directories are those a trixie minbase tree lacks:
#   hello            /usr/bin/hello; new /usr/share/doc/hello (files also in /usr/share/info,
#                    /usr/share/locale/*/LC_MESSAGES, /usr/share/man/man1: existing directories)
#   less             /usr/bin/less, lessecho, lesskey, lesspipe; new /usr/share/doc/less
#   bash-completion  (arch all, no dependencies) new /usr/share/cmake, /usr/share/pkgconfig,
#                    /usr/share/bash-completion/helpers, /usr/share/doc/bash-completion,
#                    /etc/bash_completion.d
#   kmod, libkmod2   a library and its tool (dpkg's ldconfig trigger runs); new directories
#                    directly in /usr/lib: /usr/lib/depmod.d, /usr/lib/modprobe.d; new
#                    /usr/share/initramfs-tools/hooks, /usr/share/zsh/site-functions,
#                    /etc/depmod.d, /etc/modprobe.d
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/tools/mirror.sh"
DIR=${1:-${OVERLAYCTL_DEBTREE_DIR:-/var/cache/overlayctl/debian-trixie}}
SUITE=trixie
DEBS=${DEBS:-hello less bash-completion kmod libkmod2}
say() { echo "debian-tree: $*" >&2; }
die() { echo "debian-tree: $1${2:+ (hint: $2)}" >&2; exit 1; }
el() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap)" "sudo $0"
mkdir -p "$DIR"
DIR=$(realpath "$DIR")
exec 9>"$DIR/.lock"
flock 9
WANT="$SUITE $DEBS"
[ "$(cat "$DIR/.complete" 2>/dev/null)" = "$WANT" ] && exit 0
rm -f "$DIR/.complete"
MIRROR=$(debian_mirror) || exit 1
APTD=$DIR/apt
APT=(-o Dir::Etc::SourceList="$APTD/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$APTD/lists" -o Dir::Cache="$APTD/cache" -o Dir::State::status=/dev/null
     -o APT::Sandbox::User=root)

# 1. the tree
if [ ! -e "$DIR/.tree-complete" ]; then
    need_debootstrap
    t=$(date +%s.%N)
    new=$DIR/root.new log=$DIR/debootstrap.log
    say "debootstrap $SUITE minbase into $DIR/root (log: $log)"
    rm -rf "$new"
    unshare -m --propagation private -- \
        debootstrap --variant=minbase "$SUITE" "$new" "$MIRROR" >"$log" 2>&1 \
        || { tail -20 "$log" >&2; die "debootstrap $SUITE failed" "see $log; the mirror was $MIRROR"; }
    rm -f "$new"/var/cache/apt/archives/*.deb "$new"/var/cache/apt/*.bin
    for tool in dpkg apt-get; do
        [ -x "$new/usr/bin/$tool" ] || die "the new tree has no /usr/bin/$tool" "see $log"
    done
    # The lists debootstrap fetched (tens of MB) serve the downloads below; the tree keeps an
    # empty lists directory, as a freshly cleaned image does.
    rm -rf "$APTD/lists"
    mkdir -p "$APTD"
    mv "$new/var/lib/apt/lists" "$APTD/lists"
    mkdir -p "$new/var/lib/apt/lists/partial"
    rm -rf "$DIR/root"
    mv "$new" "$DIR/root"
    touch "$DIR/.tree-complete"
    say "tree built in $(el "$t") s ($(du -sh "$DIR/root" | cut -f1))"
fi

# 2. the packages, with the host's apt on the tree's suite (the keyring of the host's apt
#    verifies the suite's Release file)
t=$(date +%s.%N)
mkdir -p "$APTD/lists/partial" "$APTD/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" >"$APTD/sources.list"
rm -rf "$DIR/debs.new"
mkdir -p "$DIR/debs.new"
# shellcheck disable=SC2086 # DEBS is a list of package names
if ! (cd "$DIR/debs.new" && apt-get "${APT[@]}" download -qq $DEBS) 2>"$DIR/download.log"; then
    say "refreshing the package lists of $SUITE"     # the lists are older than the mirror
    apt-get "${APT[@]}" update -qq
    # shellcheck disable=SC2086
    (cd "$DIR/debs.new" && apt-get "${APT[@]}" download -qq $DEBS) \
        || die "apt-get download $DEBS failed" "check the names against $SUITE"
fi
for deb in "$DIR"/debs.new/*.deb; do
    echo "$(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version) ${deb##*/}"
done >"$DIR/debs.new/INDEX"
rm -rf "$DIR/debs"
mv "$DIR/debs.new" "$DIR/debs"
echo "$WANT" >"$DIR/.complete"
say "$(wc -l <"$DIR/debs/INDEX") packages in $DIR/debs in $(el "$t") s ($(du -sh "$DIR/debs" | cut -f1))"
