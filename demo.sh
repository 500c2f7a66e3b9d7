#!/bin/bash
# A guided tour of overlayctl. Run as root on a Debian machine:
#
#     sudo ./demo.sh
#
# It installs what it needs (./tools/setup.sh), builds a throw-away root directory in /tmp with
# the sample extensions from demo/, and merges them in every interesting way. Everything runs
# inside a private mount namespace (unshare -m --propagation private) and with --root=<that
# directory>: the real /usr, /opt and /etc are never touched, no mount is visible outside the
# demo, and the directory is removed at the end.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
REPO=$PWD

if [ -t 1 ]; then
    B=$'\e[1m' H=$'\e[1;34m' C=$'\e[36m' D=$'\e[2m' G=$'\e[32m' R=$'\e[0m'
else
    B='' H='' C='' D='' G='' R=''
fi

# ---------------------------------------------------------------------------------------------
# Part 2: the tour itself, inside the private mount namespace (./demo.sh --inside ROOT).

heading() { printf '\n%s== %s ==%s\n' "$H" "$*" "$R"; }
say() { printf '%s%s%s\n' "$D" "$*" "$R"; }
# Print a command (with $ROOT unexpanded, as you would type it), then run it.
run() { printf '%s$ %s%s\n' "$C" "$1" "$R"; eval "$1"; }
# The same for a command that is meant to fail.
run_fails() {
    printf '%s$ %s%s\n' "$C" "$1" "$R"
    if eval "$1"; then echo "demo: '$1' should have failed" >&2; exit 1; fi
    printf '%s(failed, as it should)%s\n' "$G" "$R"
}

inside() {
    ROOT=$1
    export PATH="$REPO/.venv/bin:$PATH"
    # A tmpfs under the demo root: it vanishes with this namespace, and unlike some /tmp
    # file systems (overlayfs in containers) it can hold an overlayfs upper directory.
    mount -t tmpfs -o mode=0755 overlayctl-demo "$ROOT"
    # If anything fails half-way, unmerge before the namespace goes away.
    trap 'overlayctl --root="$ROOT" unmerge >/dev/null 2>&1 || true' EXIT

    heading "0. A demo root with three extensions"
    mkdir -p "$ROOT"/usr/lib "$ROOT"/usr/bin "$ROOT"/opt "$ROOT"/etc \
             "$ROOT"/var/lib/extensions "$ROOT"/var/lib/confexts
    printf 'ID=overlayctl-demo\nVERSION_ID=1\n' > "$ROOT/usr/lib/os-release"
    printf '#!/bin/sh\necho "os-tool: part of the base OS"\n' > "$ROOT/usr/bin/os-tool"
    chmod 755 "$ROOT/usr/bin/os-tool"
    echo demo-host > "$ROOT/etc/hostname"
    cp -a demo/extensions/. "$ROOT/var/lib/extensions/"
    cp -a demo/confexts/. "$ROOT/var/lib/confexts/"
    say "overlayctl works on a root directory (--root, default /). The demo's root is a tiny OS"
    say "with two versions of a system extension (sysext) in /var/lib/extensions and one"
    say "configuration extension (confext) in /var/lib/confexts (their sources are in demo/):"
    run 'echo ROOT=$ROOT'
    run '(cd $ROOT && find usr opt etc var -not -type d | sort)'
    say "Each extension carries a release file; ID=_any means 'fits any OS'. A real"
    say "extension names the OS it was built for (ID=debian, VERSION_ID=13 or SYSEXT_LEVEL=)."

    heading "1. list: what overlayctl found"
    run 'overlayctl --root=$ROOT list'

    heading "2. merge (read-only, the default --mutable=no)"
    run 'overlayctl --root=$ROOT merge'
    run 'overlayctl --root=$ROOT status'
    say "The extensions' files now appear under /usr, /opt and /etc:"
    run '$ROOT/usr/bin/hello-ext'
    run '$ROOT/opt/tool/bin/tool'
    run '$ROOT/usr/bin/os-tool'
    run 'cat $ROOT/etc/demo.conf'
    say "Both hello versions ship usr/share/hello-ext/greeting. Extensions are stacked in"
    say "version order, so hello_2.0 lies above hello_1.0 and its copy wins. Every merged"
    say "hierarchy lists the extensions in its metadata directory:"
    run 'cat $ROOT/usr/.systemd-sysext/extensions'
    say "Each hierarchy is now a read-only overlayfs mount (a confext also gets nosuid,noexec):"
    run 'findmnt -R -o TARGET,SOURCE,FSTYPE,VFS-OPTIONS $ROOT'
    run_fails 'touch $ROOT/usr/bin/new-file'
    run 'overlayctl --root=$ROOT unmerge'
    run_fails 'ls $ROOT/usr/bin/hello-ext'

    heading "3. --mutable=ephemeral: writable, and every write vanishes at unmerge"
    run 'overlayctl --root=$ROOT sysext merge --mutable=ephemeral'
    run 'overlayctl --root=$ROOT sysext status'
    run 'echo "a scratch note" > $ROOT/usr/share/scratch.txt'
    run 'echo "patched on the fly" > $ROOT/usr/share/hello-ext/greeting'
    run '$ROOT/usr/bin/hello-ext'
    say "The writes live in a private tmpfs that only the overlay references."
    run 'overlayctl --root=$ROOT sysext unmerge'
    run_fails 'cat $ROOT/usr/share/scratch.txt'
    run 'ls -A $ROOT/var/lib/extensions.mutable 2>/dev/null || echo "(no mutable directory: nothing was kept)"'

    heading "4. --mutable=yes: writes go to /var/lib/extensions.mutable and survive"
    run 'overlayctl --root=$ROOT sysext merge --mutable=yes'
    run 'overlayctl --root=$ROOT sysext status'
    run 'echo "kept across merges" > $ROOT/opt/tool/notes.txt'
    run 'echo "a local greeting" > $ROOT/usr/share/hello-ext/greeting'
    run '$ROOT/usr/bin/hello-ext'
    say "New files and copied-up (modified) files are in the upper directory:"
    run '(cd $ROOT/var/lib/extensions.mutable && find . -not -type d | sort)'
    run 'overlayctl --root=$ROOT sysext unmerge'
    say "After unmerge the hierarchies are plain again, and the upper directory keeps the writes:"
    run_fails 'ls $ROOT/opt/tool'
    run 'cat $ROOT/var/lib/extensions.mutable/opt/tool/notes.txt'
    say "--mutable=auto uses the mutable directory because it now exists, so the writes come back:"
    run 'overlayctl --root=$ROOT sysext merge --mutable=auto'
    run 'cat $ROOT/opt/tool/notes.txt'
    run '$ROOT/usr/bin/hello-ext'
    run 'overlayctl --root=$ROOT sysext unmerge'

    heading "5. /etc as its own upper layer (confext)"
    say "When /var/lib/extensions.mutable/etc is a symlink to /etc, the real /etc becomes the"
    say "upper layer: the confext's files are added on top of it and every write goes straight"
    say "into the real directory. On a real system: ln -s /etc /var/lib/extensions.mutable/etc"
    say "(overlayctl resolves symlinks inside --root, so a relative link does the same here)."
    run 'ln -s ../../../etc $ROOT/var/lib/extensions.mutable/etc'
    run 'overlayctl --root=$ROOT confext merge --mutable=auto --dry-run'
    say "The real /etc is the upper ([host]) and not a lower layer; the work directory is its sibling."
    run 'overlayctl --root=$ROOT confext merge --mutable=auto'
    run 'overlayctl --root=$ROOT confext status'
    run 'cat $ROOT/etc/demo.conf'
    run 'echo "written while merged" > $ROOT/etc/local.conf'
    run_fails 'touch $ROOT/etc/.systemd-confext/extensions'
    say "(The metadata directory stays read-only even in a writable merge.)"
    run 'overlayctl --root=$ROOT confext unmerge'
    say "local.conf is a plain file in the real /etc now; demo.conf left with the confext, and"
    say "the work directory .systemd-etc-workdir is gone again (run/ holds overlayctl's lock):"
    run 'ls -A $ROOT/etc'
    run 'ls -A $ROOT'
    say "Deleting a file that comes from an extension leaves a whiteout (a 0:0 character"
    say "device) in the upper layer, here the real /etc, which hides it while merged:"
    run 'overlayctl --root=$ROOT confext merge --mutable=auto'
    run 'rm $ROOT/etc/demo.conf'
    run 'overlayctl --root=$ROOT diff /etc'
    say "At unmerge overlayctl drops such whiteouts (upstream leaves them in the plain /etc,"
    say "where they hide the file at every later merge), so the next merge shows it again:"
    run 'overlayctl --root=$ROOT confext unmerge'
    run_fails 'ls -l $ROOT/etc/demo.conf'
    run 'overlayctl --root=$ROOT confext merge --mutable=auto'
    run 'cat $ROOT/etc/demo.conf'
    run 'overlayctl --root=$ROOT confext unmerge'
    run 'rm $ROOT/etc/local.conf'

    heading "6. OS defaults under the real /etc (the Flatcar model), and what you changed"
    say "The OS ships its default /etc in /usr/share/factory/etc; --defaults puts it below"
    say "everything else, with the real /etc as the upper layer (the symlink from step 5)."
    run 'mkdir -p $ROOT/usr/share/factory/etc/ssh'
    run 'echo "PermitRootLogin no" > $ROOT/usr/share/factory/etc/ssh/sshd_config'
    run 'echo "Welcome (default)" > $ROOT/usr/share/factory/etc/motd'
    run 'overlayctl --root=$ROOT confext merge --mutable=yes --defaults=/usr/share/factory/etc'
    run 'cat $ROOT/etc/motd'
    say "Edit one default, delete another, add a file of your own:"
    run 'echo "PermitRootLogin yes" > $ROOT/etc/ssh/sshd_config'
    run 'rm $ROOT/etc/motd'
    run 'echo mine > $ROOT/etc/mine.conf'
    run 'overlayctl --root=$ROOT diff /etc'
    run 'overlayctl --root=$ROOT which /etc/demo.conf'
    run 'overlayctl --root=$ROOT which /etc/ssh/sshd_config'
    say "Put the deleted default back, while /etc stays merged (a new overlay is swapped in):"
    run 'overlayctl --root=$ROOT reset /etc/motd'
    run 'cat $ROOT/etc/motd'
    run 'overlayctl --root=$ROOT diff --content /etc/ssh/sshd_config'
    run 'overlayctl --root=$ROOT confext unmerge'
    run 'rm -r $ROOT/etc/ssh $ROOT/etc/mine.conf'

    heading "7. merge --dry-run: the plan, with nothing mounted"
    say "For each hierarchy: the upper and work directories, every lower layer from top to"
    say "bottom, the overlayfs options and the mount flags. auto decides per hierarchy: /usr and"
    say "/opt have a mutable directory from step 4, /etc is its own upper from step 5."
    run 'overlayctl --root=$ROOT merge --mutable=auto --dry-run'
    say "The same as JSON, for scripts (here for the confext only):"
    run 'overlayctl --root=$ROOT confext merge --mutable=auto --dry-run --json=pretty'
    run 'overlayctl --root=$ROOT status'

    heading "8. Clean up"
    trap - EXIT
    say "Nothing is merged; the only mount below the demo root is its own tmpfs:"
    run 'findmnt -R -o TARGET,SOURCE,FSTYPE $ROOT'
    if [ "$(findmnt -R -n -o TARGET "$ROOT" | wc -l)" != 1 ]; then
        echo "demo: mounts were left behind below $ROOT" >&2
        exit 1
    fi
    umount "$ROOT"
}

if [ "${1:-}" = "--inside" ]; then
    inside "$2"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Part 1: set up, then run part 2 in a private mount namespace, then clean up.

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh: run as root (sudo ./demo.sh): overlayctl mounts overlays" >&2
    exit 1
fi
printf '%sPreparing (./tools/setup.sh: Debian packages if missing, .venv with overlayctl)...%s\n' \
    "$B" "$R"
./tools/setup.sh
ROOT=$(mktemp -d /tmp/overlayctl-demo.XXXXXX)
cleanup() {
    if grep -qF " $ROOT" /proc/self/mountinfo; then
        echo "demo.sh: something is still mounted below $ROOT; not removing it" >&2
        return 1
    fi
    rm -rf "$ROOT"
}
trap cleanup EXIT
# --propagation private: the namespace gets its own copy of every mount, and nothing mounted
# in it (overlays, the demo tmpfs) propagates back. When the tour ends, so do its mounts.
unshare -m --propagation private -- "$REPO/demo.sh" --inside "$ROOT"
printf '\n%sDone.%s No mount was left behind, and %s is removed.\n' "$B" "$R" "$ROOT"
printf 'Next: %ssudo ./run-tests.sh%s runs the test suite; docs/ has the reference.\n' "$C" "$R"
