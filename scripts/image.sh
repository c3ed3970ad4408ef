#!/usr/bin/env bash
# Assembles keygate's container image without Docker or a registry: an OCI image archive (an
# OCI image layout in a tar, what `skopeo`/`podman` call `oci-archive`) holding a keygate binary,
# the shared libraries it loads (found with `ldd`, the dynamic loader with them), CA
# certificates, the users of distroless (root and nonroot, 65532) and nothing else: no shell.
# The image declares what the Dockerfile's runtime stage declares (user, entrypoint, command,
# ports, environment, working directory, labels); tests/image.rs checks that they agree.
#
#     scripts/image.sh [ARCHIVE]     # default: target/keygate-image.tar
#
# KEYGATE_BIN picks the binary (default: target/release/keygate, from `cargo build --release`).
# The image's tag is the binary's version (`keygate --version`). Needs umoci
# (`apt-get install umoci`) and root, to give the image's files their owners.
set -euo pipefail
cd "$(dirname "$0")/.."

archive=${1:-target/keygate-image.tar}
bin=${KEYGATE_BIN:-target/release/keygate}

# What the Dockerfile's runtime stage declares.
user=65532:65532
entrypoint=/usr/local/bin/keygate
cmd=serve
ports=(8080 9090)
workdir=/var/lib/keygate
env=(KEYGATE__SERVER__ADMIN_LISTEN=0.0.0.0:9090)
# What the distroless base image's config gives the Dockerfile's image.
base_env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt)
title=keygate
description="Authentication sidecar and edge gateway that guards HTTP services with bearer API keys"
source_url=https://github.com/keygate/keygate
licenses=Apache-2.0

die() {
    echo "image.sh: $*" >&2
    exit 1
}
command -v umoci >/dev/null 2>&1 || die "needs umoci: apt-get install -y umoci"
command -v ldd >/dev/null 2>&1 || die "needs ldd (libc-bin)"
[ "$(id -u)" = "0" ] || die "needs root, to give the image's files their owners (root, and 65532 for $workdir)"
[ -x "$bin" ] || die "no keygate binary at $bin: run cargo build --release, or set KEYGATE_BIN"

version=$("$bin" --version | awk '{print $2}')
[ -n "$version" ] || die "$bin --version printed no version"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
layout=$work/oci
image=$layout:$version

umoci init --layout "$layout"
umoci new --image "$image"
umoci unpack --image "$image" "$work/bundle"
root=$work/bundle/rootfs

# The binary and every library it loads, each at the path the loader looks for it (the loader
# itself at the path written in the binary). `ldd` lists `name => path (address)` for libraries
# and `path (address)` for the loader; the vDSO has no file.
install -D -m 0755 "$bin" "$root$entrypoint"
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
    while read -r lib; do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done

# The rest of what distroless gives a program: its users and groups, name lookup from files
# then DNS, the CA certificates (keygate's https upstreams and rediss:// verify against the
# system's trust store by default), and a /tmp.
install -d -m 0755 "$root/etc"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$root/etc/group"
printf '%s\n' 'hosts: files dns' >"$root/etc/nsswitch.conf"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
else
    echo "image.sh: no /etc/ssl/certs/ca-certificates.crt here: the image has no CA certificates" >&2
fi
install -d -m 1777 "$root/tmp"
install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
install -d -m 0755 -o 65532 -g 65532 "$root$workdir"

umoci repack --image "$image" --history.created_by "scripts/image.sh" "$work/bundle"

config=(--config.user "$user" --config.entrypoint "$entrypoint" --config.cmd "$cmd"
    --config.workingdir "$workdir")
for port in "${ports[@]}"; do config+=(--config.exposedports "$port/tcp"); done
for e in "${base_env[@]}" "${env[@]}"; do config+=(--config.env "$e"); done
for label in "title=$title" "description=$description" "source=$source_url" \
    "version=$version" "licenses=$licenses"; do
    config+=(--config.label "org.opencontainers.image.$label")
done
umoci config --image "$image" --no-history "${config[@]}"
umoci gc --layout "$layout"

mkdir -p "$(dirname "$archive")"
tar -C "$layout" -cf "$archive.tmp" .
mv "$archive.tmp" "$archive"

# Sizes: the archive (its layer is compressed: about what a registry stores and a node pulls)
# and the unpacked root filesystem (what a node keeps on disk).
echo "image.sh: $archive (tag $version): $(stat -c %s "$archive") bytes," \
    "$(du -sb "$root" | awk '{print $1}') bytes unpacked"
