#!/usr/bin/env bash
# Start the three-node local cluster for inventory/local: local-node0 (manager), local-node1
# and local-node2 (workers), systemd as PID 1, on the docker network distcomp-local.
#   tests/cluster/up.sh && ansible-playbook -i inventory/local site.yml
# Idempotent: existing containers are started, not recreated. tests/cluster/down.sh removes them.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
IMAGE=${NODE_IMAGE:-distcomp-node:bookworm}
NETWORK=distcomp-local
SUBNET=172.31.250.0/24
NODES=(node0:172.31.250.10 node1:172.31.250.11 node2:172.31.250.12)
BOOT_WAIT=${BOOT_WAIT:-120}

"$here/install-docker.sh"
NODE_IMAGE=$IMAGE "$here/build-node-image.sh"

if ! docker network inspect "$NETWORK" >/dev/null 2>&1; then
    docker network create --subnet "$SUBNET" "$NETWORK" >/dev/null
fi

for node in "${NODES[@]}"; do
    name=${node%%:*}
    ip=${node#*:}
    container=local-$name
    if docker container inspect "$container" >/dev/null 2>&1; then
        docker start "$container" >/dev/null
        continue
    fi
    # systemd needs these; --privileged fails on this kind of host (see shared/ENVIRONMENT.md).
    docker run -d --name "$container" --hostname "$name" \
        --network "$NETWORK" --ip "$ip" --network-alias "$name" \
        --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
        --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
        --tmpfs /run --tmpfs /run/lock --device /dev/fuse \
        "$IMAGE" >/dev/null
done

for node in "${NODES[@]}"; do
    container=local-${node%%:*}
    deadline=$((SECONDS + BOOT_WAIT))
    until state=$(docker exec "$container" systemctl is-system-running 2>/dev/null); \
          [ "$state" = running ] || [ "$state" = degraded ]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "up.sh: $container did not finish booting within ${BOOT_WAIT}s (state: ${state:-none})" >&2
            exit 1
        fi
        sleep 1
    done
    echo "up.sh: $container $state"
done
