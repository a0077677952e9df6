#!/usr/bin/env bash
# Build gpu-device-watcher's image from this checkout with buildah.
#
#   deploy/container/build.sh [--base IMAGE] [--python-version X.Y]
#
# Without --base, the base is made from Debian packages (no registry needed): mmdebstrap
# --variant=minbase --include=python3,python3-venv bookworm, imported with `buildah from
# scratch`. It is built once and kept as localhost/gpu-device-watcher-base:bookworm (the
# rootfs tarball is cached in ${XDG_CACHE_HOME:-~/.cache}/gpu-device-watcher too); later
# builds reuse it, and `buildah build --layers` reuses the install layer while the wheels
# are the same. The wheels (this checkout's and its dependencies', for the image's Python)
# are staged in the build context, so nothing is fetched inside the build.
#
# Prints the image name on its last line: localhost/gpu-device-watcher:<version>.
set -euo pipefail

IMAGE_NAME="localhost/gpu-device-watcher"
BASE_IMAGE="localhost/gpu-device-watcher-base:bookworm"
SUITE=bookworm

die() {
    printf 'build.sh: %s\n' "$*" >&2
    exit 2
}

base=""
python_version=3.11  # bookworm's; give the base image's with --base
while [[ $# -gt 0 ]]; do
    case "$1" in
        --base) [[ $# -ge 2 ]] || die "--base needs an image"; base=$2; shift 2 ;;
        --python-version) [[ $# -ge 2 ]] || die "--python-version needs X.Y"; python_version=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

here=$(cd -- "$(dirname -- "$0")" && pwd -P)
checkout=$(cd -- "$here/../.." && pwd -P)
command -v buildah >/dev/null || die "buildah not found (apt-get install buildah)"
python=${PYTHON:-python3}
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (set PYTHON=)"
version=$(cd "$checkout" && "$python" -c 'import re,sys; print(re.search(r"^__version__ = \"(.+)\"", open("watcher/__init__.py").read(), re.M).group(1))')

# --- the base, from Debian packages -------------------------------------------------------
if [[ -z "$base" ]]; then
    base=$BASE_IMAGE
    if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
        command -v mmdebstrap >/dev/null || die "mmdebstrap not found (apt-get install mmdebstrap), or give --base"
        cache="${XDG_CACHE_HOME:-$HOME/.cache}/gpu-device-watcher"
        mkdir -p "$cache"
        rootfs="$cache/rootfs-$SUITE.tar"
        if [[ ! -s "$rootfs" ]]; then
            # The machine's own Debian mirror, when its apt sources name one.
            mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit} /^deb / && $2 ~ /debian\/?$/ {print $2; exit}' \
                /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)
            # --format: mmdebstrap tells the format by the name's ending, and `.tmp` made it
            # a directory.
            mmdebstrap --quiet --variant=minbase --format=tar --include=python3,python3-venv \
                "$SUITE" "$rootfs.tmp" ${mirror:+"$mirror"}
            mv "$rootfs.tmp" "$rootfs"
        fi
        container=$(buildah from scratch)
        trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
        buildah add --quiet "$container" "$rootfs" /
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            --cmd /bin/sh "$container"
        buildah commit --quiet --rm "$container" "$base" >/dev/null
        trap - EXIT
    fi
fi

# --- the wheels ---------------------------------------------------------------------------
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/wheels"
cp "$here/Containerfile" "$context/"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$context/wheels" "$checkout"
# Pure-Python dependencies published as source only (pyinotify) are built here once...
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$context/wheels" pyinotify
# ...and the rest are the binary wheels for the image's Python and this machine's CPU.
"$python" -m pip download --quiet --dest "$context/wheels" --find-links "$context/wheels" \
    --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform "manylinux2014_$(uname -m)" \
    "$context/wheels/gpu_device_watcher-$version-py3-none-any.whl"

# The image's one RUN step needs no namespaces of its own: chroot isolation builds the same
# layers without an OCI runtime, so a build host whose runtime cannot start a container
# (crun on a host with hybrid cgroups, a nested sandbox) still builds. BUILDAH_ISOLATION
# in the environment wins.
buildah build --quiet --layers --pull=false --isolation "${BUILDAH_ISOLATION:-chroot}" \
    --build-arg "BASE=$base" --build-arg "VERSION=$version" \
    --tag "$IMAGE_NAME:$version" --file "$context/Containerfile" "$context" >/dev/null
echo "$IMAGE_NAME:$version"
