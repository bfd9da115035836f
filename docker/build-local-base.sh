#!/usr/bin/env bash
# Build a local stand-in for the public Python base image, for machines that can run containers
# but cannot pull from an image registry.
#
#   docker/build-local-base.sh            # -> image localhost/blueedit-base:bookworm
#   docker build --build-arg BASE_IMAGE=localhost/blueedit-base:bookworm -f docker/Dockerfile.cpu .
#
# The image is a debootstrapped Debian bookworm (minbase variant) with python3, venv and pip,
# and a virtual environment at /opt/venv first on PATH, so that `pip install` in the Dockerfiles
# works as on python:3.11-slim (bookworm's python3 is 3.11). The host's extra CA certificates
# (HOST_CA_DIR, default /usr/local/share/ca-certificates) are trusted inside it.
#
# Idempotent and cached: nothing is done when the image already exists in the engine; the root
# filesystem tarball is kept under $BLUEEDIT_BASE_CACHE (default ~/.cache/blueedit-docker) and
# re-imported without debootstrap when only the image was removed. FORCE=1 rebuilds both.
#
# Needs root (debootstrap), debootstrap itself, access to a Debian package mirror, and podman or
# docker (ENGINE=podman|docker picks one; podman is preferred when both exist).
set -euo pipefail

IMAGE="${BASE_IMAGE_NAME:-localhost/blueedit-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE_DIR="${BLUEEDIT_BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/blueedit-docker}"
TARBALL="$CACHE_DIR/rootfs-$SUITE.tar"
PACKAGES="python3,python3-venv,python3-pip,ca-certificates"
HOST_CA_DIR="${HOST_CA_DIR:-/usr/local/share/ca-certificates}"

log() { printf '[build-local-base] %s\n' "$*" >&2; }

pick_engine() {
    if [[ -n "${ENGINE:-}" ]]; then echo "$ENGINE"; return; fi
    if command -v podman >/dev/null 2>&1; then echo podman; return; fi
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
    log "no container engine: install podman (or start a Docker daemon)"
    exit 2
}
ENGINE="$(pick_engine)"

if [[ "${FORCE:-0}" != 1 ]] && "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already in $ENGINE (FORCE=1 rebuilds it)"
    exit 0
fi

if [[ "${FORCE:-0}" == 1 || ! -s "$TARBALL" ]]; then
    command -v debootstrap >/dev/null 2>&1 || { log "debootstrap is not installed"; exit 2; }
    [[ "$(id -u)" == 0 ]] || { log "debootstrap needs root"; exit 2; }
    mkdir -p "$CACHE_DIR"
    ROOTFS="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    trap 'rm -rf "$ROOTFS"' EXIT
    log "debootstrap --variant=minbase $SUITE (+ $PACKAGES) into $ROOTFS"
    start=$SECONDS
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >&2
    # The same virtual environment layout as Dockerfile.cuda: PEP 668 forbids pip on the system
    # python3, and the venv keeps pip's installs apart from Debian's.
    chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/venv
    # Trust what the host trusts: a host behind a TLS-inspecting proxy has its CA under
    # /usr/local/share/ca-certificates, and pip inside the image must accept it too.
    if compgen -G "$HOST_CA_DIR/*.crt" >/dev/null; then
        cp "$HOST_CA_DIR"/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
        chroot "$ROOTFS" /usr/sbin/update-ca-certificates >&2
    fi
    # Trim what an image does not need: package lists, caches, docs and locales.
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
        "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/usr/share/doc/* \
        "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/*
    # A resolv.conf from the host would leak into the image; the engine writes its own.
    : > "$ROOTFS/etc/resolv.conf"
    tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$ROOTFS"
    trap - EXIT
    log "root filesystem cached at $TARBALL ($(du -h "$TARBALL" | cut -f1), $((SECONDS - start)) s)"
fi

log "importing $TARBALL into $ENGINE as $IMAGE"
"$ENGINE" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    "$TARBALL" "$IMAGE" >/dev/null
log "done: $IMAGE"
