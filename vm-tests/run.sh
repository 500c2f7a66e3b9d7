#!/bin/bash
# vm-tests/run.sh: overlayctl in a real VM, across real reboots (QEMU TCG, Debian trixie).
#
#   sudo vm-tests/run.sh
#
# Builds or reuses (cache: $OVERLAYCTL_VM_CACHE, default /var/cache/overlayctl-vm) a Debian
# cloud kernel and a debootstrap'ed trixie root (python3, python3-psutil, python3-cryptography,
# python3-cffi-backend, python3-asn1crypto, systemd, squashfs-tools, erofs-utils), builds this
# tree's Debian package (tools/build-deb.sh), then runs the sequences of $OVERLAYCTL_VM_SEQUENCES
# (SCENARIO@KERNEL_SUITE), each on its own writable copy of that root, $OVERLAYCTL_VM_PARALLEL
# at once (default: the host's cores). By default "main" on each kernel of
# $OVERLAYCTL_VM_KERNELS ("trixie trixie-backports": Debian 13's 6.12 cloud kernel and the
# newer one from backports), "flatcar" and "usr-dpkg" on Debian 13's own:
#
# main (guest.py, verity_guest.py):
#   boot 0  vm-init   install overlayctl's Debian package (dpkg -i): its files, its units,
#                     nothing enabled; enable the units (systemctl enable, the socket too)
#                     and add the fixtures
#   boot 1  systemd   the units merge a sysext (directory + squashfs + erofs + GPT images)
#                     and a confext over a defaults layer with the real /etc as upper;
#                     hello-ext.service runs the sysext's binary; /etc is written; ours of
#                     the two conflicting io.systemd.sysext sockets listens;
#                     /usr is re-merged --mutable=ephemeral and written
#   (host)            checks the root on disk, then "updates the OS": changes two defaults
#   boot 2  systemd   /etc writes kept, ephemeral /usr writes gone, diff reports
#                     default_changed; 20 sysext and 10 confext refreshes under a reader loop;
#                     EXTENSION_RELOAD_MANAGER=1 (a sysext's unit comes and goes);
#                     io.systemd.sysext through overlayctl-sysext.socket with varlinkctl;
#                     on one kernel restart_units_guest.py (EXTENSION_RESTART_UNITS=, ...)
#   boot 3  vm-init   verified images (verity_guest.py): dm-verity, signatures, EIO, Flatcar
# flatcar (flatcar_commit_guest.py): boots 0-5, Flatcar's first boot to an immutable /etc
#   (confext commit site, the real /etc emptied, read-only and ephemeral-import merges), then
#   debugfs on the host: the real /etc is empty, site.raw is there
# usr-dpkg (usr_dpkg_guest.py): boots 0-3, dpkg on a /usr that is its own upper, then
#   debugfs on the host: no whiteout and no stale opaque marker in the plain /usr
#
# A boot whose guest kernel crashed before the payload started is retried once, loudly, from
# the disks as they were before it (OVERLAYCTL_VM_INJECT_PANIC=STAGE simulates that).
#
# Prints every boot's console (lines "guest| ..."), its duration, and "N passed, N failed".
# Exit status 0 only when everything passed. The first run needs Debian's package mirror ($MIRROR,
# by default the one the host's apt configuration names); without it, it fails loudly. See
# vm-tests/README.md.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${OVERLAYCTL_VM_CACHE:-/var/cache/overlayctl-vm}
. "$REPO/tools/mirror.sh"
MIRROR=${MIRROR:-$(debian_mirror 2>/dev/null || true)}   # needed only while the cache is incomplete
export MIRROR
KERNELS=${OVERLAYCTL_VM_KERNELS:-trixie trixie-backports}
# The scenarios that need one kernel only run on Debian 13's own (6.12, the kernel a Debian user
# has), or on the first of $KERNELS when that is not among them.
ONE_KERNEL=trixie
case " $KERNELS " in *" trixie "*) ;; *) ONE_KERNEL=${KERNELS%% *} ;; esac
# The sequences, SCENARIO@KERNEL_SUITE, each on its own fresh copy of the root: "main" (guest.py's
# boots 0-2, then verity_guest.py) on every kernel, "flatcar" (flatcar_commit_guest.py) and
# "usr-dpkg" (usr_dpkg_guest.py) on one. Longest first: they are started in this order.
SEQUENCES=${OVERLAYCTL_VM_SEQUENCES:-$(for k in $KERNELS; do printf 'main@%s ' "$k"; done; echo "flatcar@$ONE_KERNEL usr-dpkg@$ONE_KERNEL")}
for s in $SEQUENCES; do
    case ${s%@*} in main|flatcar|usr-dpkg) ;; *)
        echo "vm-tests: unknown scenario '${s%@*}' in \$OVERLAYCTL_VM_SEQUENCES (main, flatcar, usr-dpkg)" >&2; exit 2 ;;
    esac
done
# restart_units_guest.py runs in one main sequence: on Debian 13's kernel if there is such a
# sequence, else on the first main sequence's kernel
MAIN_KERNELS=$(for s in $SEQUENCES; do [ "${s%@*}" = main ] && echo "${s#*@}"; done | tr '\n' ' ')
RESTART_UNITS_KERNEL=${OVERLAYCTL_VM_RESTART_UNITS_KERNEL:-}
if [ -z "$RESTART_UNITS_KERNEL" ]; then
    case " $MAIN_KERNELS " in *" $ONE_KERNEL "*) RESTART_UNITS_KERNEL=$ONE_KERNEL ;;
                               *) RESTART_UNITS_KERNEL=${MAIN_KERNELS%% *} ;; esac
fi
# each sequence once (a repeated one would share its run directory and console)
SEQUENCES=$(for s in $SEQUENCES; do echo "$s"; done | awk '!seen[$0]++' | tr '\n' ' ')
# the kernels the sequences boot
KERNELS=$(for s in $SEQUENCES; do echo "${s#*@}"; done | awk '!seen[$0]++' | tr '\n' ' ')
seq_name() { if [ "${1%@*}" = main ]; then echo "${1#*@}"; else echo "${1%@*}-${1#*@}"; fi; }
PASS=0
FAIL=0
FAILED_NAMES=()
BOOT_TIMES=()
RETRIED=()
now() { date +%s.%N; }
el() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
say() { echo "vm-tests: $*"; }
hostcheck() {  # hostcheck NAME CONDITION-RC [DETAIL]
    if [ "$2" = 0 ]; then PASS=$((PASS + 1)); echo "host | CHECK PASS $1 :: ${3:-}"
    else FAIL=$((FAIL + 1)); FAILED_NAMES+=("$1"); echo "host | CHECK FAIL $1 :: ${3:-}"; fi
}
T_START=$(now)

if [ "$(id -u)" != 0 ]; then
    echo "vm-tests: must run as root (sudo vm-tests/run.sh)" >&2
    exit 2
fi

# ------------------------------------------------------------------ 1. the cached VM parts
# A cache that is not complete needs the Debian archive. Say so loudly instead of failing
# somewhere in apt-get or debootstrap (and never skip).
complete=1
for k in $KERNELS; do
    if [ "$k" = trixie ]; then kd=$CACHE/kernel ri=$CACHE/root.ext4; else kd=$CACHE/kernel-$k ri=$CACHE/root-$k.ext4; fi
    [ -e "$kd/.complete" ] && [ -e "$ri" ] || complete=0
done
[ -e "$CACHE/rootfs/.complete" ] || complete=0
command -v qemu-system-x86_64 >/dev/null || complete=0
if [ $complete = 0 ]; then
    if [ -z "$MIRROR" ]; then
        debian_mirror >/dev/null
        echo "vm-tests: FAILED: the VM cache in $CACHE is not complete and no package mirror is known." >&2
        echo "0 passed, 1 failed"
        exit 3
    fi
    host=$(mirror_host "$MIRROR")
    port=$(mirror_port "$MIRROR")
    if ! timeout 15 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then
        echo "vm-tests: FAILED: the VM cache in $CACHE is not complete and $host:$port" \
             "(Debian's package mirror, \$MIRROR=$MIRROR) cannot be reached." >&2
        echo "vm-tests: the first run downloads qemu-system-x86, debootstrap, a kernel package" \
             "and a trixie root (about 3 minutes with network). Run it once where the network works," \
             "or point OVERLAYCTL_VM_CACHE at a complete cache." >&2
        echo "0 passed, 1 failed"
        exit 3
    fi
    say "cache in $CACHE is not complete: building it (needs $host)"
fi
missing=()
command -v mksquashfs >/dev/null || missing+=(squashfs-tools)
command -v mkfs.erofs >/dev/null || missing+=(erofs-utils)
command -v sfdisk >/dev/null || missing+=(fdisk)
command -v debugfs >/dev/null || missing+=(e2fsprogs)
command -v veritysetup >/dev/null || missing+=(cryptsetup-bin)     # verity_guest.py build
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing host tools: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { echo "vm-tests: FAILED: cannot install ${missing[*]}" >&2; echo "0 passed, 1 failed"; exit 3; }
fi
t=$(now)
mkdir -p "$CACHE"
declare -A ROOT_OF
for k in $KERNELS; do
    RUN_DIR=$CACHE/build KERNEL_SUITE=$k BOOTS=0 "$HERE/vm-boot.sh" "$CACHE" >"$CACHE/build-$k.log" 2>&1
    rc=$?
    grep -v '^vm-boot: total wall time' "$CACHE/build-$k.log"
    if [ "$rc" != 0 ]; then
        echo "vm-tests: FAILED: building the VM for kernel suite $k (kernel, debootstrap, root image) failed (rc $rc)" >&2
        echo "0 passed, 1 failed"
        exit 3
    fi
    ROOT_OF[$k]=$(sed -n 's/^vm-boot: root image \([^ ]*\) .*/\1/p' "$CACHE/build-$k.log")
done
T_PREP=$(el "$t")
say "VM parts ready in ${T_PREP}s (cache $CACHE)"

# ------------------------------------------------------------------ the Debian package of this tree
# tools/build-deb.sh builds it from the tree as it is (tracked and new files); the guests install
# it with dpkg -i.
t=$(now)
rm -rf "$CACHE/deb"
if ! DEB=$("$REPO/tools/build-deb.sh" "$CACHE/deb") || [ ! -f "$DEB" ]; then
    echo "vm-tests: FAILED: tools/build-deb.sh could not build the Debian package" >&2
    echo "0 passed, 1 failed"
    exit 3
fi
T_DEB=$(el "$t")
say "Debian package $DEB built in ${T_DEB}s"


# ------------------------------------------------------------------ the .debs of the usr-dpkg sequence
# hello and bash-completion from tools/debian-tree.sh's cache (.ci/run builds it before; here it
# is built when missing, which needs Debian's package mirror once).
DEBTREE=${OVERLAYCTL_DEBTREE_DIR:-/var/cache/overlayctl/debian-trixie}
case " $SEQUENCES " in *" usr-dpkg@"*)
    if ! "$REPO/tools/debian-tree.sh" "$DEBTREE" || ! ls "$DEBTREE"/debs/hello_*.deb "$DEBTREE"/debs/bash-completion_*.deb >/dev/null; then
        echo "vm-tests: FAILED: tools/debian-tree.sh could not provide hello and bash-completion in $DEBTREE/debs" >&2
        echo "0 passed, 1 failed"
        exit 3
    fi ;;
esac

# ------------------------------------------------------------------ upstream's systemd-repart
# verity_guest.py build makes two of its DDIs with systemd 262's own systemd-repart, from
# tools/peer.sh's cache (.ci/run's test suite builds it before; here it is built when missing,
# which needs Debian's package mirror once).
case " $SEQUENCES " in *" main@"*)
    if ! "$REPO/tools/peer.sh" >"$CACHE/peer.log" 2>&1; then
        tail -5 "$CACHE/peer.log" >&2
        echo "vm-tests: FAILED: tools/peer.sh could not provide upstream's systemd-repart (see $CACHE/peer.log)" >&2
        echo "0 passed, 1 failed"
        exit 3
    fi ;;
esac

run_sequence() {  # run_sequence SCENARIO@KERNEL_SUITE: that scenario's boots on a fresh copy of the root
SC=${1%@*} KS=${1#*@}
NAME=$(seq_name "$1")
TAG=$KS; [ "$SC" = main ] || TAG="$KS $SC"      # the prefix of this sequence's check names
RUN=$CACHE/run-$NAME
PASS=0 FAIL=0 FAILED_NAMES=() BOOT_TIMES=() RETRIED=()
echo
echo "################### $SC: guest kernel from Debian $KS"

# ------------------------------------------------------------------ 2. this run: root copy, payload
t=$(now)
rm -rf "$RUN"
mkdir -p "$RUN/payload" "$RUN/src"
# a writable copy of the pristine root: it persists across the boots of this run only
cp --sparse=always "${ROOT_OF[$KS]}" "$RUN/root.ext4"
PL=$RUN/payload
cp "$DEB" "$PL/"
case $SC in
main)
    cp "$HERE/guest.py" "$PL/guest.py"
    cat >"$PL/run" <<'EOF'
#!/bin/sh
stage=$(cat /payload/stage)
case $stage in
    verity) exec python3 /payload/verity_guest.py run /payload/verity ;;
    *) exec python3 /payload/guest.py "$stage" ;;
esac
EOF
    mkdir -p "$PL/images"
    # raw sysext images, built here on the host
    mkimg_tree() {  # mkimg_tree NAME FILE TEXT: a sysext tree with a release file and one file
        local d=$RUN/src/$1
        mkdir -p "$d/usr/lib/extension-release.d" "$d/usr/share/vmtest"
        echo "ID=_any" >"$d/usr/lib/extension-release.d/extension-release.$1"
        echo "$3" >"$d/usr/share/vmtest/$2"
        echo "$d"
    }
    ok=0
    mksquashfs "$(mkimg_tree sqext squashfs.txt 'from squashfs')" "$PL/images/sqext.raw" -quiet -noappend >/dev/null || ok=1
    mkfs.erofs --quiet "$PL/images/erofsext.raw" "$(mkimg_tree erofsext erofs.txt 'from erofs')" >/dev/null || ok=1
    # GPT disk image with one /usr partition (DPS type for x86-64) holding a squashfs of usr/
    g=$(mkimg_tree gptext gpt.txt 'from gpt')
    mksquashfs "$g/usr" "$RUN/src/gpt-usr.sqfs" -quiet -noappend >/dev/null || ok=1
    sectors=$(( $(stat -c %s "$RUN/src/gpt-usr.sqfs") / 512 + 8 ))
    truncate -s $(( (2048 + sectors + 64) * 512 )) "$PL/images/gptext.raw"
    echo "label: gpt
start=2048, size=$sectors, type=8484680C-9521-48C6-9C11-B0720656F69E" | sfdisk -q "$PL/images/gptext.raw" >/dev/null || ok=1
    dd if="$RUN/src/gpt-usr.sqfs" of="$PL/images/gptext.raw" bs=512 seek=2048 conv=notrunc status=none || ok=1
    hostcheck "[$TAG] host: squashfs, erofs and GPT sysext images built" $ok \
        "$(cd "$PL/images" && for f in *.raw; do printf '%s (%s) ' "$f" "$(file -b "$f" 2>/dev/null | cut -d, -f1 || true)"; done)"
    # the verified images of the last boot (verity_guest.py build: squashfs, veritysetup, openssl,
    # sfdisk); the guest imports the installed package, not the checkout
    python3 "$HERE/verity_guest.py" build "$PL/verity" >"$RUN/verity-build.log" 2>&1
    hostcheck "[$TAG] host: verified images built (verity_guest.py build)" $? "$(tail -1 "$RUN/verity-build.log")"
    cp "$HERE/verity_guest.py" "$HERE/verity_smoke.py" "$PL/"
    # EXTENSION_RESTART_UNITS= and the rest of restart_units_guest.py: guest.py boot2 runs it
    # when it is in the payload, on one kernel
    [ "$KS" = "$RESTART_UNITS_KERNEL" ] && cp "$HERE/restart_units_guest.py" "$PL/"
    ;;
usr-dpkg)
    cp "$HERE/usr_dpkg_guest.py" "$PL/"
    mkdir -p "$PL/debs"
    for p in hello bash-completion; do cp "$(ls "$DEBTREE"/debs/"${p}"_*.deb | tail -1)" "$PL/debs/"; done
    printf '#!/bin/sh\nexec python3 /payload/usr_dpkg_guest.py "$(cat /payload/stage)"\n' >"$PL/run"
    ;;
flatcar)
    cp "$HERE/flatcar_commit_guest.py" "$PL/"
    printf '#!/bin/sh\nexec python3 /payload/flatcar_commit_guest.py "$(cat /payload/stage)"\n' >"$PL/run"
    ;;
esac
cp "$HERE/vmcheck.py" "$PL/"      # the CHECK lines of every guest script
chmod +x "$PL/run"
say "run directory $RUN prepared in $(el "$t")s"

# ------------------------------------------------------------------ 3. boots
# A guest kernel that crashed before the payload started is retried once, loudly, on the root
# disk as it was before that boot. The disk is not untouched by such a boot: the kernel mounts
# it read-write, and under systemd journald, the overlayctl units (their merge records in
# /var/lib/overlayctl, the /etc work dir of Mutable=yes) and others write to it before
# vm-test.service starts the payload. So each boot starts from a copy taken just before it, and
# the retry starts from that copy again. Never retried: a boot whose payload started (whatever
# failed in it), a time-out, a VM that ended without a kernel crash on its console.
crashed_before_payload() {  # crashed_before_payload LOG: prints the crash's first lines
    grep -q 'VM: payload start' "$1" && return 1
    grep -m1 -E 'Kernel panic|Oops:|BUG:|general protection fault' "$1" >/dev/null || return 1
    grep -E 'Kernel panic|Oops:|BUG:|general protection fault|RIP: 0010' "$1" | head -4 | sed -E 's/^\[ *[0-9.]+\] //'
}

boot() {  # boot N STAGE INIT TITLE
    local n=$1 stage=$2 init=$3 title=$4 t rc log attempt tag crash append
    echo
    echo "=================== [$TAG] boot $n (${init##*/} as PID 1): $title"
    echo "$stage" >"$PL/stage"
    t=$(now)
    cp --sparse=always "$RUN/root.ext4" "$RUN/root.before-$stage.ext4"
    [ -e "$RUN/persist.ext4" ] && cp --sparse=always "$RUN/persist.ext4" "$RUN/persist.before-$stage.ext4"
    for attempt in 1 2; do
        tag=$stage; [ $attempt = 1 ] || tag=$stage.retry
        # OVERLAYCTL_VM_INJECT_PANIC=STAGE: the first attempt of that boot panics before the
        # payload (init= of a missing file), to see the retry work
        append=
        [ $attempt = 1 ] && [ "${OVERLAYCTL_VM_INJECT_PANIC:-}" = "$stage" ] && append=init=/sbin/vm-test-injected-panic
        KERNEL_SUITE=$KS RUN_DIR=$RUN ROOT_DISK=$RUN/root.ext4 INIT=$init LOG_TAG=$tag TIMEOUT=${BOOT_TIMEOUT:-400} \
            APPEND=$append "$HERE/vm-boot.sh" "$CACHE" "$PL" 2>&1 | grep -v -E '^vm-boot: (prep|sizes|total wall)'
        rc=${PIPESTATUS[0]}
        log=$RUN/$tag-1.log
        [ $attempt = 1 ] || break
        crash=$(crashed_before_payload "$log") || break
        echo "vm-tests: RETRY: [$TAG] boot $n ($stage): the guest kernel crashed before the payload started:"
        echo "$crash" | sed 's/^/vm-tests: RETRY:   /'
        echo "vm-tests: RETRY: the root disk is put back as it was before this boot, and the boot runs once more" \
             "(first attempt's log: $log)"
        RETRIED+=("[$TAG] boot $n ($stage): $(echo "$crash" | head -1)")
        cp --sparse=always "$RUN/root.before-$stage.ext4" "$RUN/root.ext4"
        [ -e "$RUN/persist.before-$stage.ext4" ] && cp --sparse=always "$RUN/persist.before-$stage.ext4" "$RUN/persist.ext4"
    done
    rm -f "$RUN/root.before-$stage.ext4" "$RUN/persist.before-$stage.ext4"
    local p f
    p=$(grep -c '] CHECK PASS' "$log" 2>/dev/null)
    f=$(grep -c '] CHECK FAIL' "$log" 2>/dev/null)
    PASS=$((PASS + p)); FAIL=$((FAIL + f))
    while IFS= read -r line; do FAILED_NAMES+=("$line"); done \
        < <(grep '] CHECK FAIL' "$log" | sed -E "s/.*CHECK FAIL (.*) :: .*/[$TAG] \\1/")
    local exit
    exit=$(sed -n 's/.*VM-TEST-EXIT: \([0-9]*\).*/\1/p' "$log" | head -1)
    if [ -n "$exit" ] && [ "$exit" != 0 ] && [ "$f" = 0 ]; then
        # a payload that failed without saying which check: a crash of the guest script
        hostcheck "[$TAG] boot $n ($stage) ran its payload to the end" 1 \
            "the payload exited $exit, but no check failed (see $log)"
    elif [ -n "$exit" ]; then
        hostcheck "[$TAG] boot $n ($stage) ran its payload to the end" 0 "guest checks: $p passed, $f failed"
    elif crash=$(crashed_before_payload "$log"); then
        hostcheck "[$TAG] boot $n ($stage) ran its payload to the end" 1 \
            "the guest kernel crashed before the payload$([ "$tag" = "$stage" ] || echo ", twice"): $(echo "$crash" | head -1)"
    else
        hostcheck "[$TAG] boot $n ($stage) ran its payload to the end" 1 "no exit marker (rc $rc: 124 = time-out)"
    fi
    local hung=
    grep -q 'vm-boot: SHUTDOWN-HANG' "$log" && hung=" (the guest's shutdown hung: killed)"
    BOOT_TIMES+=("[$TAG] boot $n (${init##*/}, $stage): $(el "$t")s$([ "$tag" = "$stage" ] || echo " (retried)")$hung")
    echo "=================== boot $n done in $(el "$t")s (rc $rc)"
}

dbg() { debugfs -R "$1" "$RUN/root.ext4" 2>/dev/null; }
fsck_clean() {  # fsck_clean AFTER: e2fsck of the powered-off guest's root disk
    local rc
    e2fsck -fy "$RUN/root.ext4" >"$RUN/e2fsck.log" 2>&1; rc=$?
    hostcheck "[$TAG] host: guest root file system clean after $1 (e2fsck)" $([ $rc -le 1 ] && echo 0 || echo 1) \
        "e2fsck rc $rc: $(tail -1 "$RUN/e2fsck.log")"
}

case $SC in
main)
    boot 0 install vm-init "install overlayctl, units, extensions, confext, defaults"
    boot 1 boot1 systemd "units merge at boot; hello-ext.service; /etc written; ephemeral /usr written"

    echo
    echo "=================== between boot 1 and boot 2 (host, on the guest's root image)"
    t=$(now)
    fsck_clean "boot 1"
    got=$(dbg 'cat /etc/vmtest/local.conf')
    hostcheck "[$TAG] host: /etc/vmtest/local.conf of boot 1 is in the real /etc on disk" \
        $([ "$got" = "written in boot 1" ] && echo 0 || echo 1) "'$got'"
    got=$(dbg 'cat /etc/vmtest/default.conf' | tr '\n' '|')
    hostcheck "[$TAG] host: the edited default was copied up into the real /etc" \
        $([ "$got" = "default v1|local edit in boot 1|" ] && echo 0 || echo 1) "'$got'"
    got=$(debugfs -R 'stat /usr/share/vmtest/ephemeral.txt' "$RUN/root.ext4" 2>&1 | grep -v '^debugfs [0-9]' | head -1)
    hostcheck "[$TAG] host: the ephemeral /usr write of boot 1 never reached the disk" \
        $(echo "$got" | grep -q 'not found' && echo 0 || echo 1) "$got"
    # "OS update": new versions of two defaults
    echo "default v2" >"$RUN/src/default.conf"
    echo "untouched v2" >"$RUN/src/untouched.conf"
    debugfs -w -f - "$RUN/root.ext4" >"$RUN/debugfs-update.log" 2>&1 <<EOF
cd /usr/share/vmtest/etc-defaults/vmtest
rm default.conf
write $RUN/src/default.conf default.conf
rm untouched.conf
write $RUN/src/untouched.conf untouched.conf
EOF
    got="$(dbg 'cat /usr/share/vmtest/etc-defaults/vmtest/default.conf') / $(dbg 'cat /usr/share/vmtest/etc-defaults/vmtest/untouched.conf')"
    hostcheck "[$TAG] host: defaults updated on the root image (debugfs)" \
        $([ "$got" = "default v2 / untouched v2" ] && echo 0 || echo 1) "$got"
    echo "=================== host step done in $(el "$t")s"

    boot 2 boot2 systemd "persistence, ephemeral gone, diff default_changed, refresh under a reader loop$([ -e "$PL/restart_units_guest.py" ] && echo ", restart units")"
    boot 3 verity vm-init "verified images (verity_guest.py): dm-verity, signatures, EIO, the Flatcar model"
    ;;
usr-dpkg)
    boot 0 install vm-init "install overlayctl, enable its units; /usr its own upper; the sysext 'tools'"
    boot 1 boot1 systemd "merged at boot, writable; dpkg -i hello bash-completion"
    boot 2 boot2 systemd "after the reboot: dpkg --verify; a later sysext in a package-made directory; dpkg -r hello"
    boot 3 boot3 systemd "after the reboot: the extension's hello back, no whiteout in the plain /usr"
    echo
    echo "=================== after boot 3 (host, on the guest's root image)"
    t=$(now)
    fsck_clean "boot 3"
    while IFS= read -r line; do
        name=${line#CHECK PASS usr-dpkg }; name=${name#CHECK FAIL usr-dpkg }; name=${name%% :: *}
        detail=${line#* :: }
        case $line in "CHECK PASS "*) st=0 ;; *) st=1 ;; esac
        hostcheck "[$TAG] $name" $st "$detail"
    done < <(python3 "$HERE/usr_dpkg_guest.py" host "$RUN/root.ext4" | grep '^CHECK ')
    echo "=================== host step done in $(el "$t")s"
    ;;
flatcar)
    boot 0 install vm-init "install overlayctl; the image's /etc moved to /usr/share/flatcar/etc"
    W=/usr/local/sbin/flatcar-vm-init
    boot 1 boot1 $W "first boot, /etc mode yes: written, cleanup, confext commit site"
    boot 2 boot2 $W "the real /etc emptied before systemd; read-only: defaults + site"
    boot 3 boot3 $W "read-only again after a reboot"
    boot 4 boot4 $W "ephemeral-import: the same /etc, writable, writes to a tmpfs"
    boot 5 boot5 $W "after a reboot: the ephemeral writes are gone"
    echo
    echo "=================== after boot 5 (host, on the guest's root image)"
    t=$(now)
    fsck_clean "boot 5"
    # ls -p: /INODE/MODE/UID/GID/NAME/SIZE/ a line (an empty directory block shows inode 0)
    got=$(dbg 'ls -p /etc' | awk -F/ '$2 != 0 && $6 != "" && $6 != "." && $6 != ".." { print $6 }' | tr '\n' ' ')
    hostcheck "[$TAG] host: the real /etc on disk is empty (everything is in site.raw and the defaults)" \
        $([ -z "$got" ] && echo 0 || echo 1) "entries in /etc: ${got:-none}"
    got=$(dbg 'stat /var/lib/confexts/site.raw' | head -1)
    hostcheck "[$TAG] host: /var/lib/confexts/site.raw is on disk" \
        $(echo "$got" | grep -q 'Type: regular' && echo 0 || echo 1) "$got"
    echo "=================== host step done in $(el "$t")s"
    ;;
esac
}

# ------------------------------------------------------------------ 4. the sequences, side by side
# Each guest runs its two vCPUs in one host thread (vm-boot.sh, TCG_THREAD=single), so the
# sequences run at the same time, $OVERLAYCTL_VM_PARALLEL at once (default: the host's cores):
# whenever one ends, the next one starts. Each one's console goes to $CACHE/console-NAME.log and
# is shown here in the order of $SEQUENCES: the first one live, each other one from its start
# once the one before it has been shown. Each sequence leaves its counts in
# $CACHE/result-NAME.sh.
PARALLEL=${OVERLAYCTL_VM_PARALLEL:-$(nproc)}
[ "$PARALLEL" -ge 1 ] 2>/dev/null || PARALLEL=1
for s in $SEQUENCES; do rm -f "$CACHE/result-$(seq_name "$s").sh" "$CACHE/pid-$(seq_name "$s")"; done
(   # the scheduler: at most $PARALLEL sequences at once
    running=0
    for s in $SEQUENCES; do
        n=$(seq_name "$s")
        if [ $running -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
        ( run_sequence "$s"
          declare -p PASS FAIL FAILED_NAMES BOOT_TIMES RETRIED >"$CACHE/result-$n.sh" ) >"$CACHE/console-$n.log" 2>&1 &
        echo $! >"$CACHE/pid-$n"
        running=$((running + 1))
    done
    wait
) &
SCHED=$!
for s in $SEQUENCES; do
    n=$(seq_name "$s")
    while [ ! -s "$CACHE/pid-$n" ]; do sleep 0.5; done
    tail -n +1 --pid="$(cat "$CACHE/pid-$n")" -f "$CACHE/console-$n.log"
done
wait $SCHED
TOTAL_PASS=0 TOTAL_FAIL=0 ALL_FAILED=() ALL_TIMES=() ALL_RETRIED=()
for s in $SEQUENCES; do
    n=$(seq_name "$s")
    PASS=0 FAIL=1 FAILED_NAMES=("[$s] the sequence left no result (see $CACHE/console-$n.log)") BOOT_TIMES=() RETRIED=()
    [ -e "$CACHE/result-$n.sh" ] && . "$CACHE/result-$n.sh"
    TOTAL_PASS=$((TOTAL_PASS + PASS)); TOTAL_FAIL=$((TOTAL_FAIL + FAIL))
    ALL_FAILED+=("${FAILED_NAMES[@]}"); ALL_TIMES+=("${BOOT_TIMES[@]}"); ALL_RETRIED+=("${RETRIED[@]}")
    rm -f "$CACHE/pid-$n"
done

# ------------------------------------------------------------------ 5. summary
echo
echo "=================== summary"
for b in "${ALL_TIMES[@]}"; do echo "  $b"; done
echo "  VM preparation: ${T_PREP}s; Debian package: ${T_DEB}s; sequences: $PARALLEL at once; whole run: $(el "$T_START")s; logs in $CACHE/run-*/ and $CACHE/console-*.log"
for n in "${ALL_RETRIED[@]}"; do echo "  RETRIED (guest kernel crash before the payload): $n"; done
for n in "${ALL_FAILED[@]}"; do echo "  FAILED: $n"; done
echo "$TOTAL_PASS passed, $TOTAL_FAIL failed"
[ "$TOTAL_FAIL" = 0 ]
