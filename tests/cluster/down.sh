#!/usr/bin/env bash
# Remove the local cluster made by tests/cluster/up.sh (its containers and network only).
set -euo pipefail

for container in local-node0 local-node1 local-node2; do
    if docker container inspect "$container" >/dev/null 2>&1; then
        docker rm -f "$container" >/dev/null
        echo "down.sh: removed $container"
    fi
done
if docker network inspect distcomp-local >/dev/null 2>&1; then
    docker network rm distcomp-local >/dev/null
    echo "down.sh: removed network distcomp-local"
fi
