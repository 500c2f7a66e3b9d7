#!/bin/bash
# vm-boot.sh DIR [PAYLOAD_DIR]
#
# overlayctl's copy of ../shared/reference/vm-boot.sh, adapted for vm-tests/run.sh:
#   * python3-psutil is in the root (overlayctl depends on it), and python3-cryptography and
#     python3-asn1crypto (for verity signatures, which the package may soon depend on), with
#     python3-cffi-backend named: python3-cryptography depends on the virtual packages
#     python3-cffi-backend-api-min/-max, which debootstrap does not resolve;
#   * ROOT_DISK=FILE boots a writable copy of the root image (no snapshot=on), so the
#     guest's /etc, /usr and /var persist from one boot to the next, as on a real machine;
#   * RUN_DIR=DIR keeps payload.ext4, persist.ext4 and the boot logs out of the cache;
#   * vm-init remounts / read-only (sysrq u) before powering off, so the root is clean;
#   * console lines are printed as "[  t.tt] guest| LINE", LOG_TAG names the log file;
#   * KERNEL_SUITE=trixie-backports (or sid) boots that suite's cloud kernel instead; its
#     root image (with its modules) is ROOT_IMAGE, printed as "vm-boot: root image FILE";
#   * TCG runs both vCPUs in one host thread (TCG_THREAD=single, see below) and the kernel
#     panics on any oops (oops=panic), so that a crashed guest ends the VM at once;
#   * APPEND=... is added to the kernel command line;
#   * INIT=systemd boots vm-test.target: sysinit.target, sockets.target and the payload;
#     INIT=/ABSOLUTE/PATH boots that guest program as PID 1 with the same systemd options
#     (a wrapper that prepares the root, then execs systemd);
#   * only the root is NVMe (the nvme driver probes asynchronously, so with three NVMe disks
#     nvme0n1 was sometimes not the root); persist and payload are virtio-blk (a module,
#     loaded by vm-run-payload).
#
# Builds (once) and boots a throw-away Linux VM that runs PAYLOAD_DIR/run as its test
# and powers off, printing the guest's output (serial console) and the timing.
#
#   kernel : Debian's linux-image-cloud-amd64 from SUITE (trixie: 6.12). It has NVMe and
#            ext4 built in, so no initramfs is needed. (It has no 9p; overlay, squashfs,
#            erofs and loop are modules, loaded from the root image.)
#   root   : debootstrap SUITE minbase + python3 + systemd + fs tools, packed with
#            `mke2fs -d` into DIR/root.ext4 (no loop mount needed) and attached as NVMe
#            with snapshot=on, so every boot starts from the same pristine image.
#   payload: PAYLOAD_DIR (default: a built-in smoke test) packed into an ext4 image with
#            label "vmpayload", mounted read-only at /payload; /payload/run is executed.
#   persist: DIR/persist.ext4 (label "vmpersist", mounted at /persist) survives reboots.
#   init   : /sbin/vm-init (default; payload starts ~3.5 s after launch, VM gone after
#            ~6 s with the smoke test, QEMU TCG on this 2-core machine) or INIT=systemd
#            (real systemd as PID 1: payload at ~8 s, gone after ~10.5 s).
#   engine : ENGINE=qemu (default, ACCEL=tcg; this machine's /dev/kvm cannot run a guest)
#            or ENGINE=uml (Debian's user-mode-linux from SUITE, run inside the trixie tree
#            because it needs glibc >= 2.38; ~3 s per boot with the smoke test).
#   results: serial console (stdout) and the exit status; files can be read back from
#            DIR/persist.ext4 without mounting: debugfs -R 'cat /FILE' DIR/persist.ext4
#
# Env: SUITE=trixie MIRROR=... ENGINE=qemu|uml ACCEL=tcg|kvm INIT=vm-init|systemd|/PATH BOOTS=1
#      SMP=2 MEM=1024 EXTRA_PKGS=python3-pytest,... RESET_PERSIST=1 KEEP_GOING=1
#      TCG_THREAD=single|multi APPEND="kernel options" SHUTDOWN_GRACE=60 (seconds the guest
#      may take to power off after the payload's exit marker before it is killed)
# TCG_THREAD=single (default): QEMU's multi-threaded TCG (one host thread per vCPU, QEMU's
# default) races with the guest kernel's live code patching (static keys, text_poke_bp's int3
# protocol): a vCPU sometimes runs a stale translation of the patched code and hits an int3
# after the patch is done, "Oops: int3 ... Kernel panic - not syncing: Fatal exception". With
# one thread for both vCPUs it does not happen (vm-tests/README.md: "The TCG oops").
# Exit status: the payload's exit status of the last boot (99: payload missing,
#              124: time-out, 125: no exit marker seen on the console).
# Idempotent: downloads/debootstrap/image builds are skipped when their outputs exist (the
# rootfs is rebuilt when SUITE/EXTRA_PKGS change, the image when the rootfs or this script
# is newer). Needs root and, on the first run only, Debian's package mirror (apt-get install,
# apt-get update, apt-get download, debootstrap): ~65 s from nothing, ~6 s per boot after.
# MIRROR defaults to the mirror of the host's apt configuration (tools/mirror.sh); it is only
# needed while something is still to be downloaded.
set -euo pipefail

DIR=${1:?usage: vm-boot.sh DIR [PAYLOAD_DIR]}
PAYLOAD_SRC=${2:-}
SUITE=${SUITE:-trixie}
KERNEL_SUITE=${KERNEL_SUITE:-$SUITE}
. "$(dirname "$(realpath "$0")")/../tools/mirror.sh"
MIRROR=${MIRROR:-$(debian_mirror 2>/dev/null || true)}
need_mirror() { [ -n "$MIRROR" ] || { debian_mirror >/dev/null; exit 1; }; }
ENGINE=${ENGINE:-qemu}
ACCEL=${ACCEL:-tcg}
INIT=${INIT:-vm-init}
BOOTS=${BOOTS:-1}
SMP=${SMP:-2}
MEM=${MEM:-1024}
TIMEOUT=${TIMEOUT:-300}
TCG_THREAD=${TCG_THREAD:-single}
APPEND=${APPEND:-}
PKGS=python3,kmod,util-linux,mount,e2fsprogs,squashfs-tools,erofs-utils,systemd,python3-psutil,python3-cryptography,python3-cffi-backend,python3-asn1crypto${EXTRA_PKGS:+,$EXTRA_PKGS}
mkdir -p "$DIR"
DIR=$(realpath "$DIR")
SELF=$(realpath "$0")
RUN_DIR=${RUN_DIR:-$DIR}
mkdir -p "$RUN_DIR"
ROOT_DISK=${ROOT_DISK:-}
LOG_TAG=${LOG_TAG:-boot}
if [ "$ENGINE" = uml ] && { [ -n "$ROOT_DISK" ] || [ "$RUN_DIR" != "$DIR" ] || [ "$KERNEL_SUITE" != "$SUITE" ]; }; then
    echo "vm-boot: ENGINE=uml does not support ROOT_DISK, RUN_DIR or KERNEL_SUITE" >&2; exit 2
fi
now() { date +%s.%N; }
el() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "vm-boot: $*"; }
T_START=$(now)

# ---------------------------------------------------------------- 1. host tools
t=$(now); missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v mke2fs >/dev/null || missing+=(e2fsprogs)
[ "$ENGINE" = uml ] || command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
T_TOOLS=$(el "$t")

# ---------------------------------------------------------------- 2. private apt config for SUITE
APTD=$DIR/apt
mkdir -p "$APTD/lists/partial" "$APTD/cache/archives/partial"
[ -z "$MIRROR" ] || echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" >"$APTD/sources.list"
APT=(-o Dir::Etc::SourceList="$APTD/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$APTD/lists" -o Dir::Cache="$APTD/cache" -o Dir::State::status=/dev/null
     -o APT::Sandbox::User=root)
t=$(now)
if ! ls "$APTD"/lists/*_Packages* >/dev/null 2>&1; then need_mirror; apt-get "${APT[@]}" update -qq; fi
T_APT=$(el "$t")

# ---------------------------------------------------------------- 3. kernel (cloud flavour) and, for uml, the UML kernel
t=$(now)
KDIR=$DIR/kernel
ROOT_IMAGE=$DIR/root.ext4
if [ "$KERNEL_SUITE" != "$SUITE" ]; then
    KDIR=$DIR/kernel-$KERNEL_SUITE
    ROOT_IMAGE=$DIR/root-$KERNEL_SUITE.ext4
    if [ ! -e "$KDIR/.complete" ]; then
        # the kernel suite's own private apt state (lists only; packages land in $APTD/cache)
        APTK=$DIR/apt-$KERNEL_SUITE
        mkdir -p "$APTK/lists/partial"
        need_mirror
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $KERNEL_SUITE main" >"$APTK/sources.list"
        APT=(-o Dir::Etc::SourceList="$APTK/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o Dir::State::Lists="$APTK/lists" -o Dir::Cache="$APTD/cache" -o Dir::State::status=/dev/null
             -o APT::Sandbox::User=root)
        ls "$APTK"/lists/*_Packages* >/dev/null 2>&1 || apt-get "${APT[@]}" update -qq
    fi
fi
dl() {  # dl METAPACKAGE DESTDIR : download the package the metapackage depends on and unpack it
    local meta=$1 dest=$2 pkg
    [ -e "$dest/.complete" ] && return 0
    pkg=$(apt-cache "${APT[@]}" depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    pkg=${pkg:-$meta}
    rm -rf "$dest"; mkdir -p "$dest"
    (cd "$APTD/cache/archives" && apt-get "${APT[@]}" download -qq "$pkg")
    dpkg -x "$APTD/cache/archives/${pkg}_"*.deb "$dest"
    # newer Debian kernels (7.x) split the image: vmlinuz in linux-binary-*, modules in linux-modules-*
    if [ "${pkg#linux-image-}" != "$pkg" ] && ! { ls "$dest"/boot/vmlinuz-* || ls "$dest"/usr/lib/modules/*/vmlinuz; } >/dev/null 2>&1; then
        local part
        for part in linux-binary linux-modules; do
            (cd "$APTD/cache/archives" && apt-get "${APT[@]}" download -qq "$part-${pkg#linux-image-}")
            dpkg -x "$APTD/cache/archives/$part-${pkg#linux-image-}_"*.deb "$dest"
        done
    fi
    touch "$dest/.complete"
}
dl linux-image-cloud-amd64 "$KDIR"
if ls "$KDIR"/boot/vmlinuz-* >/dev/null 2>&1; then
    VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-* | head -1)
    KV=${VMLINUZ##*/vmlinuz-}
else  # 7.x packages: /usr/lib/modules/KV/vmlinuz
    VMLINUZ=$(ls "$KDIR"/usr/lib/modules/*/vmlinuz | head -1)
    KV=$(basename "$(dirname "$VMLINUZ")")
fi
if [ "$ENGINE" = uml ]; then dl user-mode-linux "$DIR/uml"; fi
T_KERNEL=$(el "$t")

# ---------------------------------------------------------------- 4. root file system tree
t=$(now)
if [ "$(cat "$DIR/rootfs/.complete" 2>/dev/null)" != "$SUITE $PKGS" ]; then
    need_mirror
    rm -rf "$DIR/rootfs"
    log "debootstrap $SUITE ($PKGS)"
    debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$DIR/rootfs" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$DIR/debootstrap.log"; exit 1; }
    rm -f "$DIR"/rootfs/var/cache/apt/archives/*.deb
    echo "$SUITE $PKGS" >"$DIR/rootfs/.complete"
fi
T_DEBOOTSTRAP=$(el "$t")

# ---------------------------------------------------------------- 5. guest tree + root image
t=$(now)
if [ ! -e "$ROOT_IMAGE" ] || [ "$DIR/rootfs/.complete" -nt "$ROOT_IMAGE" ] || [ "$SELF" -nt "$ROOT_IMAGE" ] \
   || { [ "$ENGINE" = uml ] && ! [ -e "$DIR/.root-has-uml" ]; }; then
    G=$DIR/guest
    rm -rf "$G" "$ROOT_IMAGE" "$DIR/.root-has-uml"
    cp -a "$DIR/rootfs" "$G"
    rm -rf "$G"/var/lib/apt/lists/* "$G"/usr/share/doc "$G"/usr/share/man "$G"/usr/share/locale "$G"/usr/share/info
    mkdir -p "$G/usr/lib/modules"
    cp -a "$KDIR/usr/lib/modules/$KV" "$G/usr/lib/modules/"
    chroot "$G" depmod "$KV"
    if [ -d "$DIR/uml/usr/lib/uml/modules" ]; then
        UKV=$(ls "$DIR/uml/usr/lib/uml/modules" | head -1)
        # UML modules are uncompressed (~160 MB): keep file systems, block, lib and crypto only (~57 MB)
        mkdir -p "$G/usr/lib/modules/$UKV/kernel"
        cp -a "$DIR/uml/usr/lib/uml/modules/$UKV"/modules.builtin* "$DIR/uml/usr/lib/uml/modules/$UKV/modules.order" "$G/usr/lib/modules/$UKV/"
        for sub in fs drivers/block lib crypto; do
            mkdir -p "$G/usr/lib/modules/$UKV/kernel/$(dirname $sub)"
            cp -a "$DIR/uml/usr/lib/uml/modules/$UKV/kernel/$sub" "$G/usr/lib/modules/$UKV/kernel/$sub"
        done
        chroot "$G" depmod "$UKV"
        touch "$DIR/.root-has-uml"
    fi
    cat >"$G/sbin/vm-run-payload" <<'EOF'
#!/bin/sh
# mounts the extra disks by label, runs /payload/run, prints the exit marker
for m in overlay squashfs erofs loop virtio_blk; do modprobe -q $m || echo "VM: modprobe $m failed"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/vdb ] && break; sleep 0.2; done
d=$(blkid -L vmpersist 2>/dev/null) && mkdir -p /persist && mount -t ext4 "$d" /persist
d=$(blkid -L vmpayload 2>/dev/null) && mkdir -p /payload && mount -t ext4 -o ro "$d" /payload
echo "VM: payload start at $(cut -d' ' -f1 /proc/uptime)s (kernel $(uname -r), init $(cat /proc/1/comm))"
if [ -x /payload/run ]; then (cd /payload && ./run); rc=$?; else echo "VM: no /payload/run"; rc=99; fi
echo "VM-TEST-EXIT: $rc at $(cut -d' ' -f1 /proc/uptime)s"
sync
if [ -d /persist ]; then umount /persist; fi
exit 0
EOF
    cat >"$G/sbin/vm-init" <<'EOF'
#!/bin/sh
# PID 1 without systemd: minimal mounts, then the payload, then power off
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
# systemd makes every mount shared at boot; tools such as systemd-sysext rely on it
mount --make-rshared /
/sbin/vm-run-payload
sync
# emergency remount read-only (sysrq u) so that the root file system is clean at power off
echo u > /proc/sysrq-trigger
sleep 0.3
echo o > /proc/sysrq-trigger
sleep 30
EOF
    chmod +x "$G/sbin/vm-init" "$G/sbin/vm-run-payload"
    mkdir -p "$G/etc/systemd/system"
    cat >"$G/etc/systemd/system/vm-test.service" <<'EOF'
[Unit]
Description=VM test payload
After=local-fs.target sockets.target
Wants=sockets.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
ExecStart=/sbin/vm-run-payload
EOF
    cat >"$G/etc/systemd/system/vm-test.target" <<'EOF'
[Unit]
Description=VM test
Requires=sysinit.target vm-test.service
After=sysinit.target vm-test.service
AllowIsolate=yes
EOF
    echo vm >"$G/etc/hostname"
    # size: content + 50% + 64 MiB of free space for the tests
    SZ=$(( $(du -sm "$G" | cut -f1) * 3 / 2 + 64 ))
    mke2fs -q -F -t ext4 -L vmroot -d "$G" "$ROOT_IMAGE" "${SZ}M" 2>&1 | grep -v '^Creating regular file' || true
    rm -rf "$G"
fi
T_IMAGE=$(el "$t")

# ---------------------------------------------------------------- 6. payload + persistent disk
t=$(now)
if [ -z "$PAYLOAD_SRC" ]; then
    PAYLOAD_SRC=$DIR/payload-default
    mkdir -p "$PAYLOAD_SRC"
    cat >"$PAYLOAD_SRC/run" <<'EOF'
#!/usr/bin/python3
# default smoke test: overlayfs on /usr, squashfs, erofs, persistence across boots, peer sysext
import os, subprocess, sys, time
t0 = time.time()
ok = True
def sh(c):
    r = subprocess.run(c, shell=True, capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()
def check(name, cond, info=""):
    global ok
    ok &= bool(cond)
    print(f"  {'PASS' if cond else 'FAIL'} {name} {info}", flush=True)
print(f"  python {sys.version.split()[0]}, kernel {os.uname().release}", flush=True)
sh("mkdir -p /tmp/ext/usr/share/vmtest /tmp/up /tmp/wk && echo from-ext > /tmp/ext/usr/share/vmtest/hello")
# 'umount -l': the umount binary itself runs from the overlay, so a plain umount is EBUSY
rc, out = sh("mount -t overlay overlay -o lowerdir=/tmp/ext/usr:/usr,upperdir=/tmp/up,workdir=/tmp/wk /usr"
             " && cat /usr/share/vmtest/hello && umount -l /usr")
check("overlayfs-on-/usr", rc == 0 and out == "from-ext", out)
rc, out = sh("mksquashfs /tmp/ext /tmp/ext.sqfs -quiet -noappend >/dev/null && mkdir -p /mnt/sq"
             " && mount -t squashfs -o loop,ro /tmp/ext.sqfs /mnt/sq && cat /mnt/sq/usr/share/vmtest/hello && umount /mnt/sq")
check("squashfs", rc == 0 and out == "from-ext", out)
rc, out = sh("mkfs.erofs /tmp/ext.erofs /tmp/ext >/dev/null 2>&1 && mkdir -p /mnt/er"
             " && mount -t erofs -o loop,ro /tmp/ext.erofs /mnt/er && cat /mnt/er/usr/share/vmtest/hello && umount /mnt/er")
check("erofs", rc == 0 and out == "from-ext", out)
if os.path.isdir("/persist"):
    p = "/persist/boot-count"
    n = int(open(p).read()) if os.path.exists(p) else 0
    open(p, "w").write(str(n + 1))
    os.makedirs("/persist/usr-upper", exist_ok=True); os.makedirs("/persist/usr-work", exist_ok=True)
    rc, out = sh("mount -t overlay overlay -o lowerdir=/usr,upperdir=/persist/usr-upper,workdir=/persist/usr-work /usr"
                 f" && cat /usr/share/persisted 2>/dev/null; echo boot{n + 1} > /usr/share/persisted; umount -l /usr")
    check("overlay-upper-on-persistent-disk", rc == 0, f"boot #{n + 1}, file from previous boot: {out or '<none>'}")
    if n >= 1:
        check("persisted-across-reboot", out == f"boot{n}", out)
if os.path.exists("/usr/bin/systemd-sysext"):
    sh("mkdir -p /var/lib/extensions/t/usr/lib/extension-release.d && echo ID=_any > "
       "/var/lib/extensions/t/usr/lib/extension-release.d/extension-release.t && echo x > /var/lib/extensions/t/usr/lib/t-file")
    s = time.time()
    rc, out = sh("systemd-sysext merge --no-reload --mutable=ephemeral && cat /usr/lib/t-file && systemd-sysext unmerge --no-reload")
    check("peer systemd-sysext merge/unmerge", rc == 0 and "\nx\n" in f"\n{out}\n", f"({time.time() - s:.2f}s)")
print(f"  payload done in {time.time() - t0:.2f}s", flush=True)
sys.exit(0 if ok else 1)
EOF
    chmod +x "$PAYLOAD_SRC/run"
fi
[ -x "$PAYLOAD_SRC/run" ] || { echo "vm-boot: $PAYLOAD_SRC/run missing or not executable" >&2; exit 2; }
PSZ=$(( $(du -sm "$PAYLOAD_SRC" | cut -f1) * 2 + 16 ))
mke2fs -q -F -t ext4 -L vmpayload -d "$PAYLOAD_SRC" "$RUN_DIR/payload.ext4" "${PSZ}M" 2>&1 | grep -v '^Creating regular file' || true
if [ ! -e "$RUN_DIR/persist.ext4" ] || [ -n "${RESET_PERSIST:-}" ]; then
    mke2fs -q -F -t ext4 -L vmpersist "$RUN_DIR/persist.ext4" 64M 2>&1 | grep -v '^Creating regular file' || true
fi
T_PAYLOAD=$(el "$t")

# ---------------------------------------------------------------- 7. boot
case $INIT in
    vm-init) INITARG="init=/sbin/vm-init" ;;
    systemd) INITARG="init=/lib/systemd/systemd systemd.unit=vm-test.target systemd.show_status=0" ;;
    # a program of the guest's that execs systemd in the end (vm-tests/flatcar_commit_guest.py's
    # flatcar-vm-init: what Flatcar's initrd does to /etc first), booted like INIT=systemd
    /*) INITARG="init=$INIT systemd.unit=vm-test.target systemd.show_status=0" ;;
    *) echo "vm-boot: INIT must be vm-init, systemd or the absolute path of a guest program that execs systemd" >&2; exit 2 ;;
esac
boot_cmd() {
    if [ "$ENGINE" = uml ]; then
        # linux.uml needs glibc >= 2.38: run it inside the (trixie) rootfs tree, DIR bind-mounted at /mnt/vm
        local R=$DIR/rootfs
        echo unshare -m --propagation private -- sh -c "'mkdir -p $R/mnt/vm && mount --bind $DIR $R/mnt/vm && mount -t proc proc $R/proc && mount --rbind /dev $R/dev && mount -t tmpfs tmpfs $R/tmp && rm -f $DIR/root.cow && exec chroot $R env TMPDIR=/tmp /mnt/vm/uml/usr/bin/linux.uml mem=${MEM}M ubd0=/mnt/vm/root.cow,/mnt/vm/root.ext4 ubd1=/mnt/vm/persist.ext4 ubd2r=/mnt/vm/payload.ext4 root=/dev/ubda rw $INITARG con=null con0=null,fd:1 quiet'"
    else
        local accel="-accel tcg,thread=$TCG_THREAD -cpu max"
        local rootdrive="-drive file=$ROOT_IMAGE,if=none,id=root,format=raw,snapshot=on"
        [ -n "$ROOT_DISK" ] && rootdrive="-drive file=$ROOT_DISK,if=none,id=root,format=raw"
        [ "$ACCEL" = kvm ] && accel="-enable-kvm -cpu host"
        echo qemu-system-x86_64 $accel -M q35 -smp "$SMP" -m "$MEM" -nodefaults -display none -serial stdio -no-reboot \
            -kernel "$VMLINUZ" \
            -append "'console=ttyS0 root=/dev/nvme0n1 rootfstype=ext4 rw $INITARG panic=-1 oops=panic quiet${APPEND:+ $APPEND}'" \
            $rootdrive -device nvme,drive=root,serial=root \
            -drive file="$RUN_DIR/persist.ext4",if=none,id=persist,format=raw -device virtio-blk-pci,drive=persist,serial=persist \
            -drive file="$RUN_DIR/payload.ext4",if=none,id=payload,format=raw,readonly=on -device virtio-blk-pci,drive=payload,serial=payload
    fi
}
CMD=$(boot_cmd)
echo "$CMD" >"$RUN_DIR/boot-command.txt"
log "prep: tools ${T_TOOLS}s, apt lists ${T_APT}s, kernel ${T_KERNEL}s, debootstrap ${T_DEBOOTSTRAP}s, root image ${T_IMAGE}s, payload ${T_PAYLOAD}s"
log "root image $ROOT_IMAGE (kernel $KV from $KERNEL_SUITE)"
log "sizes: kernel $(du -sh "$VMLINUZ" | cut -f1) (+$(du -sh "$KDIR/usr/lib/modules" | cut -f1) modules), rootfs tree $(du -sh "$DIR/rootfs" | cut -f1), root image $(du -sh --apparent-size "$ROOT_IMAGE" | cut -f1) apparent / $(du -sh "$ROOT_IMAGE" | cut -f1) allocated"
rc=0
for i in $(seq "$BOOTS"); do
    log "boot $i/$BOOTS (engine $ENGINE, accel $ACCEL, init $INIT)"
    set +e
    TIMEOUT=$TIMEOUT CMD=$CMD LOG="$RUN_DIR/$LOG_TAG-$i.log" python3 - <<'EOF'
import os, re, signal, subprocess, sys, threading, time
t0 = time.monotonic()
p = subprocess.Popen(["timeout", os.environ["TIMEOUT"], "sh", "-c", os.environ["CMD"]],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)
first = start = None; rc = 125
grace = float(os.environ.get("SHUTDOWN_GRACE", "60"))
hung = []
def shutdown_hang():
    # the payload has ended and synced, the guest has not powered off: a hang of the guest's
    # shutdown (seen once in systemd-shutdown after its loop-device step under TCG)
    if p.poll() is None:
        hung.append(time.monotonic() - t0)
        os.killpg(p.pid, signal.SIGKILL)
timer = None
with open(os.environ["LOG"], "w") as log:
    for raw in p.stdout:
        line = raw.decode(errors="replace").rstrip("\r\n")
        t = time.monotonic() - t0
        log.write(f"[{t:7.2f}] {line}\n")
        if first is None: first = t
        if "payload start" in line: start = t
        if re.search(r"sysrq|reboot: Power down|mmapper_init", line): continue
        print(f"[{t:6.2f}] guest| {line}", flush=True)
        m = re.search(r"VM-TEST-EXIT: (\d+)", line)
        if m:
            rc = int(m.group(1))
            if timer is None:
                timer = threading.Timer(grace, shutdown_hang); timer.daemon = True; timer.start()
p.wait()
if timer is not None: timer.cancel()
total = time.monotonic() - t0
if hung:
    msg = (f"vm-boot: SHUTDOWN-HANG: the guest was still running {grace:.0f}s after its payload "
           f"ended; killed at {hung[0]:.2f}s (the payload's result stands)")
    print(msg, flush=True)
    with open(os.environ["LOG"], "a") as log:
        log.write(f"[{hung[0]:7.2f}] {msg}\n")
elif p.returncode == 124: rc = 124
print(f"vm-boot: timing: first console output {first or 0:.2f}s, payload started {start or 0:.2f}s, "
      f"VM exited {total:.2f}s (engine rc={p.returncode}, payload rc={rc})", flush=True)
sys.exit(rc)
EOF
    rc=$?
    set -e
    if [ $rc -ne 0 ] && [ -z "${KEEP_GOING:-}" ]; then break; fi
done
log "total wall time $(el "$T_START")s, exit $rc"
exit $rc
