#!/usr/bin/env bash
# The whole product on one machine: three containers as a cluster (tests/cluster/up.sh), provisioned
# with site.yml, fed examples/cluster.txt with submit.yml (waiting with progress), then status,
# the task index (results.yml) and a few results. `make cluster-down` removes the containers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-molecule
if [[ ! -x $VENV/bin/ansible-playbook ]]; then
    # A fresh Debian has python3 without its venv module.
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q -r tests/molecule/requirements.txt
fi
export PATH=$PWD/$VENV/bin:$PATH
tests/cluster/up.sh
ansible-playbook -i inventory/local site.yml
ansible-playbook -i inventory/local submit.yml -e taskfile=examples/cluster.txt -e wait=true
ansible-playbook -i inventory/local status.yml
ansible-playbook -i inventory/local results.yml   # the index, to results/tasks.csv here
echo "--- a few results from the shared filesystem (/mnt/mfs/distcomp/results on every node) ---"
docker exec local-node0 sh -c 'find /mnt/mfs/distcomp/results -name "*.out" | head -5 | xargs -r head -v'
