#!/usr/bin/env bash
# Build CRIU 4.1.1's own CUDA plugin (plugins/cuda/cuda_plugin.so) from CRIU's release
# tarball, as Debian's mirror serves it, for the criu 4.1.1 that fetch_criu.sh prepares.
#
#   tests/criu/build_cuda_plugin.sh DEST_DIR
#
# Result: DEST_DIR/cuda_plugin.so (CRIU loads it with `--libdir DEST_DIR`). Debian's criu
# package ships no CUDA plugin; the build needs a C compiler, make and CRIU's build
# dependencies (libcap-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
# python3-protobuf libnl-3-dev libnet1-dev pkg-config libbsd-dev libgnutls28-dev
# libnftables-dev libaio-dev), and the mirror reachable once (the tarball is kept).
set -euo pipefail

die() {
    printf 'build_cuda_plugin.sh: %s\n' "$*" >&2
    exit 1
}

[[ $# -eq 1 && -n "$1" ]] || die "usage: build_cuda_plugin.sh DEST_DIR"
mkdir -p -- "$1" || die "cannot create $1"
DEST=$(cd -- "$1" && pwd -P)
PLUGIN="$DEST/cuda_plugin.so"
VERSION=4.1.1
TARBALL="criu_$VERSION.orig.tar.xz"

[[ -s "$PLUGIN" ]] && exit 0

for tool in cc make pkg-config protoc-c xz; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (install CRIU's build dependencies)"
done

# The mirror this machine's apt uses (as fetch_criu.sh picks it).
# shellcheck source=tests/criu/apt_mirror.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/apt_mirror.sh"
MIRROR=$(debian_mirror) || die "$NO_MIRROR"

fetch() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 2 -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O "$2" "$1"
    else
        # apt's own HTTP method is always there on a Debian host.
        /usr/lib/apt/apt-helper download-file "$1" "$2" >/dev/null
    fi
}

cd "$DEST"
if [[ ! -s "$TARBALL" ]]; then
    fetch "$MIRROR/pool/main/c/criu/$TARBALL" "$TARBALL.part" \
        || die "cannot download $MIRROR/pool/main/c/criu/$TARBALL"
    mv -f -- "$TARBALL.part" "$TARBALL"
fi

rm -rf -- src
mkdir src
tar -xJf "$TARBALL" -C src --strip-components=1 || die "cannot unpack $TARBALL"
[[ -f src/plugins/cuda/cuda_plugin.c ]] || die "$TARBALL has no plugins/cuda/cuda_plugin.c"

# `cuda_plugin` builds CRIU's generated headers (images, compel) and then the plugin.
make -C src -j"$(nproc)" cuda_plugin >build.log 2>&1 \
    || die "make cuda_plugin failed (see $DEST/build.log: $(tail -n 3 build.log | tr '\n' ' '))"
cp -f -- src/plugins/cuda/cuda_plugin.so "$PLUGIN.tmp"
mv -f -- "$PLUGIN.tmp" "$PLUGIN"
rm -rf -- src
printf 'build_cuda_plugin.sh: %s\n' "$PLUGIN"
