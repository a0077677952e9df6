#!/usr/bin/env bash
# Fetch a working CRIU 4.x (Debian trixie's criu) into DEST_DIR without touching the
# machine's apt setup or anything outside DEST_DIR.
#
#   tests/criu/fetch_criu.sh DEST_DIR
#
# Result: DEST_DIR/criu, a wrapper that runs trixie's criu through trixie's own dynamic
# loader with trixie's libraries (DEST_DIR/root), so the host's older glibc is never mixed in.
set -euo pipefail

die() {
    printf 'fetch_criu.sh: %s\n' "$*" >&2
    exit 1
}

[[ $# -eq 1 && -n "$1" ]] || die "usage: fetch_criu.sh DEST_DIR"
mkdir -p -- "$1" || die "cannot create $1"
DEST=$(cd -- "$1" && pwd -P)
WRAPPER="$DEST/criu"

# Idempotent: a working wrapper means there is nothing to do.
if [[ -x "$WRAPPER" ]] && "$WRAPPER" --version >/dev/null 2>&1; then
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (a Debian-like host is required)"
done

ARCH=amd64
TRIPLET=x86_64-linux-gnu
SUITE=trixie

# The mirror this machine already uses: the first http(s) Debian URI in its own apt sources
# (deb822 "URIs:" or one-line "deb URI"), excluding the security archive.
MIRROR=""
shopt -s nullglob
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [[ -r "$f" ]] || continue
    MIRROR=$(awk '
        /^[[:space:]]*#/ { next }
        $1 == "URIs:" { for (i = 2; i <= NF; i++) print $i; next }
        $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }
    ' "$f" | grep -E '^https?://[^ ]*/debian/?$' | head -n 1 || true)
    if [[ -n "$MIRROR" ]]; then break; fi
done
shopt -u nullglob
[[ -n "$MIRROR" ]] || die "no Debian mirror in this machine's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/*.sources or *.list): add the mirror apt should use, then run again"
MIRROR=${MIRROR%/}

KEYRING=""
for k in /usr/share/keyrings/debian-archive-keyring.gpg \
         /usr/share/keyrings/debian-archive-trixie-stable.gpg; do
    if [[ -r "$k" ]]; then KEYRING=$k; break; fi
done
[[ -n "$KEYRING" ]] || die "no Debian archive keyring in /usr/share/keyrings (install debian-archive-keyring)"

# --- a private apt configuration -----------------------------------------------------------
APTDIR="$DEST/apt"
mkdir -p "$APTDIR/etc/apt.conf.d" "$APTDIR/etc/sources.list.d" "$APTDIR/etc/preferences.d" \
         "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/state" \
         "$APTDIR/log" "$DEST/debs"
: > "$APTDIR/state/status"
cat > "$APTDIR/etc/sources.list" <<SRC
deb [arch=$ARCH signed-by=$KEYRING] $MIRROR $SUITE main
SRC
cat > "$APTDIR/apt.conf" <<CONF
// Private configuration for fetch_criu.sh: nothing here reads or writes the host's apt state.
Dir::Etc "$APTDIR/etc/";
Dir::Etc::Main "$APTDIR/etc/apt.conf";
Dir::Etc::Parts "$APTDIR/etc/apt.conf.d/";
Dir::Etc::SourceList "$APTDIR/etc/sources.list";
Dir::Etc::SourceParts "$APTDIR/etc/sources.list.d/";
Dir::Etc::Preferences "$APTDIR/etc/preferences";
Dir::Etc::PreferencesParts "$APTDIR/etc/preferences.d/";
Dir::State "$APTDIR/state/";
Dir::State::Lists "$APTDIR/lists/";
Dir::State::status "$APTDIR/state/status";
Dir::State::extended_states "$APTDIR/state/extended_states";
Dir::Cache "$APTDIR/cache/";
Dir::Cache::Archives "$APTDIR/cache/archives/";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "$APTDIR/log/";
APT::Architecture "$ARCH";
APT::Architectures { "$ARCH"; };
APT::Update::Post-Invoke-Success "";
APT::Update::Post-Invoke "";
Acquire::Languages "none";
Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";
CONF
export APT_CONFIG="$APTDIR/apt.conf"

apt_q() {
    apt-get -q -o Dir::Etc::Parts="$APTDIR/etc/apt.conf.d/" "$@"
}

apt_q update >"$APTDIR/log/update.log" 2>&1 \
    || die "apt-get update for $SUITE from $MIRROR failed (see $APTDIR/log/update.log)"

# criu, libcompel1 and the shared-library closure of trixie's criu 4.1.1 (libc6 included:
# the point is to run against trixie's glibc and loader, never the host's). Found by running
# the binary through the trixie loader and reading "cannot open shared object file" until it
# ran; checked below with the loader's --list. libgcc-s1: glibc dlopens libgcc_s for unwinding.
PACKAGES=(
    criu libcompel1
    libc6 libgcc-s1
    libbsd0 libmd0
    libgnutls30t64 libnettle8t64 libhogweed6t64 libgmp10 libidn2-0 libunistring5
    libtasn1-6 libp11-kit0 libffi8
    libnftables1 libmnl0 libnftnl11 libjansson4 libxtables12
    libnl-3-200 libnet1 libprotobuf-c1 libuuid1
)

cd "$DEST/debs"
rm -f -- ./*.deb
apt_q download "${PACKAGES[@]}" >"$APTDIR/log/download.log" 2>&1 \
    || die "apt-get download failed (see $APTDIR/log/download.log)"

ROOT="$DEST/root"
rm -rf -- "$ROOT"
mkdir -p "$ROOT"
for deb in ./*.deb; do
    dpkg-deb -x "$deb" "$ROOT" || die "cannot unpack $deb"
done

LOADER="$ROOT/usr/lib/$TRIPLET/ld-linux-x86-64.so.2"
[[ -e "$LOADER" ]] || LOADER="$ROOT/lib64/ld-linux-x86-64.so.2"
[[ -e "$LOADER" ]] || die "trixie's loader not found under $ROOT"
[[ -x "$ROOT/usr/sbin/criu" ]] || die "criu binary not found under $ROOT/usr/sbin"

LIBPATH="$ROOT/usr/lib/$TRIPLET:$ROOT/lib/$TRIPLET"
missing=$("$LOADER" --list --library-path "$LIBPATH" "$ROOT/usr/sbin/criu" 2>&1 \
    | awk '/not found/ { print $1 }' | tr '\n' ' ' || true)
[[ -z "$missing" ]] || die "trixie libraries missing for criu: $missing(add their packages to PACKAGES)"

TMP_WRAPPER="$WRAPPER.tmp.$$"
cat > "$TMP_WRAPPER" <<WRAP
#!/bin/sh
# Generated by tests/criu/fetch_criu.sh: Debian $SUITE's criu through $SUITE's own loader.
exec "$LOADER" --library-path "$LIBPATH" "$ROOT/usr/sbin/criu" "\$@"
WRAP
chmod 0755 "$TMP_WRAPPER"
mv -f -- "$TMP_WRAPPER" "$WRAPPER"

if ! out=$("$WRAPPER" --version 2>&1); then
    die "criu does not run: $(printf '%s' "$out" | head -n 1)"
fi
printf 'fetch_criu.sh: %s ready at %s\n' "$(printf '%s' "$out" | head -n 1)" "$WRAPPER"
