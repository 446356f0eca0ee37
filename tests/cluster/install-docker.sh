#!/usr/bin/env bash
# Make sure a Docker engine answers and debootstrap is present (Debian/Ubuntu, as root).
# Idempotent: installs nothing and starts nothing when both are already there.
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
DOCKERD_WAIT=${DOCKERD_WAIT:-120}

die() { echo "install-docker.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get and dockerd need it)"

missing=()
# The engine, not the client: some machines ship a client-only docker binary
# (/usr/local/bin/docker here) with no dockerd behind it.
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-docker.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

if docker info >/dev/null 2>&1; then
    echo "install-docker.sh: docker engine already answering"
    exit 0
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "install-docker.sh: starting dockerd (log: $DOCKERD_LOG)"
    nohup dockerd >"$DOCKERD_LOG" 2>&1 &
fi

deadline=$((SECONDS + DOCKERD_WAIT))
until docker info >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
        tail -n 20 "$DOCKERD_LOG" >&2 || true
        die "docker engine did not answer within ${DOCKERD_WAIT}s; see $DOCKERD_LOG"
    fi
    sleep 2
done
echo "install-docker.sh: docker engine ready"
