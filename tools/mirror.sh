# tools/mirror.sh: Debian's package mirror, as the host's apt is configured to use it (and
# debootstrap, which downloads from it).
# Sourced (not run) by the scripts that download Debian packages (tools/peer.sh,
# tools/debian-tree.sh, vm-tests/run.sh, vm-tests/vm-boot.sh), so that no mirror's host name is
# written into the repository:
#
#   . "$REPO/tools/mirror.sh"
#   MIRROR=$(debian_mirror) || exit 1     # $MIRROR when set, else the host's apt configuration
#   host=$(mirror_host "$MIRROR"); port=$(mirror_port "$MIRROR")
#
# The apt configuration read: deb822 stanzas in /etc/apt/sources.list.d/*.sources (`Types:`
# containing deb, `URIs:`, `Enabled: no` honoured) and one-line `deb` entries in
# /etc/apt/sources.list and /etc/apt/sources.list.d/*.list. $OVERLAYCTL_APT_ETC replaces
# /etc/apt (for the tests of this file). Only http:// and https:// URIs are used.

# apt_mirror_uris: every http(s) URI of a `deb` source, in configuration order, once each,
# without a trailing slash.
apt_mirror_uris() {
    local etc=${OVERLAYCTL_APT_ETC:-/etc/apt} f
    local -a sources=() lists=()
    for f in "$etc"/sources.list.d/*.sources; do [ -f "$f" ] && sources+=("$f"); done
    for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do [ -f "$f" ] && lists+=("$f"); done
    {
        if [ ${#sources[@]} -gt 0 ]; then
            awk '
                function flush(  n, i, a) {
                    if (uris != "" && (" " types " ") ~ /[ \t]deb[ \t]/ && tolower(enabled) != "no") {
                        n = split(uris, a, /[ \t]+/)
                        for (i = 1; i <= n; i++) if (a[i] != "") print a[i]
                    }
                    types = ""; uris = ""; enabled = ""; last = ""
                }
                FNR == 1 { flush() }
                /^#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { if (last == "uris") uris = uris " " $0; next }   # a folded field
                {
                    c = index($0, ":"); if (c == 0) next
                    last = tolower(substr($0, 1, c - 1)); val = substr($0, c + 1)
                    if (last == "types") types = val
                    else if (last == "uris") uris = val
                    else if (last == "enabled") enabled = val
                    gsub(/^[ \t]+|[ \t]+$/, "", enabled)
                }
                END { flush() }' "${sources[@]}"
        fi
        if [ ${#lists[@]} -gt 0 ]; then
            awk '$1 == "deb" {
                    i = 2
                    if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                    print $i
                }' "${lists[@]}"
        fi
    } | sed -E 's|/+$||' | awk '/^[Hh][Tt][Tt][Pp][Ss]?:\/\// && !seen[$0]++'
}

# debian_mirror: $MIRROR if set, else the configured URI of the Debian archive itself (the first
# whose path ends in /debian; else the first that is not a security archive; else the first).
# Fails with a message naming what to do when there is none.
debian_mirror() {
    if [ -n "${MIRROR:-}" ]; then echo "$MIRROR"; return 0; fi
    local uris m
    uris=$(apt_mirror_uris) || true
    m=$(awk '/\/debian$/ { print; exit }' <<<"$uris")
    [ -n "$m" ] || m=$(awk '!/-security/ { print; exit }' <<<"$uris")
    [ -n "$m" ] || m=$(awk 'NF { print; exit }' <<<"$uris")
    if [ -z "$m" ]; then
        echo "mirror: no http(s) deb source in ${OVERLAYCTL_APT_ETC:-/etc/apt}/sources.list.d/*.sources" \
             "or ${OVERLAYCTL_APT_ETC:-/etc/apt}/sources.list (hint: set MIRROR=<URL of Debian's package mirror>)" >&2
        return 1
    fi
    echo "$m"
}

# mirror_host URI: the host name of URI (no user, no port).
mirror_host() { sed -E 's#^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*@)?(\[[^]]*\]|[^/:]+).*#\2#' <<<"$1"; }

# mirror_port URI: the port of URI (80 for http, 443 for https unless given).
mirror_port() {
    local p
    p=$(sed -nE 's#^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*@)?(\[[^]]*\]|[^/:]+):([0-9]+).*#\3#p' <<<"$1")
    if [ -n "$p" ]; then echo "$p"; elif [[ $1 == https:* ]]; then echo 443; else echo 80; fi
}

# need_debootstrap: install Debian's debootstrap with the host's apt when it is missing.
need_debootstrap() {
    command -v debootstrap >/dev/null && return 0
    echo "mirror: installing debootstrap" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}
