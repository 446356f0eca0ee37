#!/usr/bin/env bash
# Usage: tests/cluster/build-node-image.sh  -> image distcomp-node:bookworm; run it with systemd as PID 1 via tests/cluster/up.sh (flags there).
# Builds a Debian bookworm rootfs with debootstrap (no registry needed) and imports it into Docker.
# Skips the build when the image already exists; set REBUILD=1 to force it.
set -euo pipefail

IMAGE=${NODE_IMAGE:-distcomp-node:bookworm}
SUITE=${NODE_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,sudo,iproute2,procps,ca-certificates,gnupg,iputils-ping,netcat-openbsd,locales

die() { echo "build-node-image.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs it)"
command -v debootstrap >/dev/null || die "debootstrap missing: run tests/cluster/install-docker.sh first"
docker info >/dev/null 2>&1 || die "docker engine not answering: run tests/cluster/install-docker.sh first"

if [ "${REBUILD:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "build-node-image.sh: $IMAGE already present"
    exit 0
fi

rootfs=$(mktemp -d /var/tmp/distcomp-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "build-node-image.sh: debootstrap $SUITE into $rootfs"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"

# Plain-HTTP apt works from containers; HTTPS through the host proxy does not.
echo "deb $MIRROR $SUITE main" >"$rootfs/etc/apt/sources.list"
echo "deb $MIRROR $SUITE-updates main" >>"$rootfs/etc/apt/sources.list"
# No console in a container: these units only fail or wait there.
for unit in getty@tty1.service console-getty.service systemd-remount-fs.service \
            systemd-firstboot.service systemd-udevd.service systemd-modules-load.service; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
: >"$rootfs/etc/machine-id"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
# Ansible's apt cache_valid_time judges freshness by this directory's mtime: make the empty
# index look stale so the first apt task downloads it.
touch -d 2000-01-01 "$rootfs/var/lib/apt/lists"

echo "build-node-image.sh: importing as $IMAGE"
tar -C "$rootfs" -c . | docker import \
    -c 'CMD ["/lib/systemd/systemd"]' \
    -c 'ENV container=docker' \
    - "$IMAGE"
echo "build-node-image.sh: built $IMAGE"
