#!/usr/bin/env bash
# Install and configure podman for docker/smoke.sh on a Debian/Ubuntu machine (used by .ci/run).
#
#   sudo docker/setup-podman.sh
#
# Installs podman, runc and debootstrap with apt-get when podman is missing, and makes sure
# /etc/containers/containers.conf selects runc with the cgroupfs manager and no default ulimits:
# in a nested container (a CI runner, a sandbox) the default runtime crun fails on rlimits and
# hybrid cgroups. An existing containers.conf is left alone unless it lacks these settings, in
# which case a copy is kept as containers.conf.orig. Safe to run again.
# Exit status: 0 ready; 2 cannot install here (not root, no apt-get, apt-get failed).
set -euo pipefail

log() { printf '[setup-podman] %s\n' "$*" >&2; }

if ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
        || ! command -v runc >/dev/null 2>&1; then
    [[ "$(id -u)" == 0 ]] || { log "not root: cannot apt-get install podman"; exit 2; }
    command -v apt-get >/dev/null 2>&1 || { log "no apt-get on this machine"; exit 2; }
    export DEBIAN_FRONTEND=noninteractive
    start=$SECONDS
    # Bounded: a stuck mirror must not eat the CI budget.
    if ! timeout 600 apt-get update -qq >&2 \
        || ! timeout 900 apt-get install -y -qq \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            podman runc debootstrap >&2; then
        log "apt-get could not install podman"
        exit 2
    fi
    log "installed $(podman --version) in $((SECONDS - start)) s"
fi

CONF=/etc/containers/containers.conf
if [[ -f "$CONF" ]] && grep -Eq '^\s*runtime\s*=\s*"runc"' "$CONF" \
        && grep -Eq '^\s*cgroup_manager\s*=\s*"cgroupfs"' "$CONF" \
        && grep -Eq '^\s*default_ulimits\s*=\s*\[\s*\]' "$CONF"; then
    log "$CONF already selects runc + cgroupfs"
else
    [[ "$(id -u)" == 0 ]] || { log "not root: cannot write $CONF"; exit 2; }
    mkdir -p "$(dirname "$CONF")"
    [[ -f "$CONF" && ! -f "$CONF.orig" ]] && cp "$CONF" "$CONF.orig"
    cat > "$CONF" <<'EOF'
# Written by blueedit's docker/setup-podman.sh (the previous file, if any: containers.conf.orig).
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    log "wrote $CONF"
fi
podman info >/dev/null 2>&1 || { log "podman is installed but \`podman info\` fails"; exit 2; }
log "podman ready"
