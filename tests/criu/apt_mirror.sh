# Sourced by fetch_criu.sh and build_cuda_plugin.sh: the Debian mirror this machine's apt
# already uses, so that nothing here names a mirror of its own.
#
#   debian_mirror   prints the first http(s) Debian URI of the apt sources (deb822 "URIs:"
#                   or one-line "deb URI"), the security archive excluded, without a
#                   trailing slash; returns 1, printing nothing, when the sources name none.
debian_mirror() {
    local f mirror=""
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        mirror=$(awk '
            /^[[:space:]]*#/ { next }
            $1 == "URIs:" { for (i = 2; i <= NF; i++) print $i; next }
            $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }
        ' "$f" | grep -E '^https?://[^ ]*/debian/?$' | head -n 1 || true)
        if [[ -n "$mirror" ]]; then
            printf '%s\n' "${mirror%/}"
            return 0
        fi
    done
    return 1
}

NO_MIRROR="no Debian mirror in this machine's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/*.sources or *.list): add the mirror apt should use, then run again"
