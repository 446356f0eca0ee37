#!/usr/bin/env bash
# One entry point for the multi-node test: tools, the scenario's inventory (generated from a
# manifest), Docker, node image, the linters and the Molecule scenario (three systemd
# containers built from site.yml, checked end to end).
# Works as root on a fresh Debian 12 machine. Usage: tests/molecule/run.sh [molecule test args]
# MOLECULE_SKIP_LINT=1 skips the linters; MOLECULE_VENV picks the virtualenv (default .venv-molecule).
# A lint failure does not stop the scenario from running; the exit status reports both.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${MOLECULE_VENV:-$repo/.venv-molecule}
manifest=tests/fixtures/cloudlab/local-cluster.xml
inventory=tests/molecule/default/inventory/hosts.yml
cd "$repo"

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
failed=()

step "virtualenv $venv"
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        python3 -m venv "$venv"
    fi
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/molecule/requirements.txt
# distcomp too (editable: later code changes need no reinstall), for `distcomp inventory cloudlab`.
stamp=$venv/.distcomp-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check -e .
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"

# The scenario's hosts, groups and addresses come from a CloudLab-style manifest, through the same
# command a CloudLab user runs; molecule.yml links the result (git-ignored) into its inventory.
step "inventory from $manifest"
distcomp inventory cloudlab "$manifest" -o "$inventory"

step "docker engine and debootstrap"
tests/cluster/install-docker.sh
step "node image"
tests/cluster/build-node-image.sh

if [ "${MOLECULE_SKIP_LINT:-0}" != 1 ]; then
    step "yamllint"
    yamllint . || failed+=(yamllint)
    step "ansible-lint (production profile)"
    ansible-lint || failed+=(ansible-lint)
    step "syntax check of the top-level playbooks"
    for playbook in site.yml submit.yml teardown.yml status.yml results.yml; do
        [ -f "$playbook" ] || continue
        ANSIBLE_CONFIG=$repo/ansible.cfg ansible-playbook -i inventory/local --syntax-check "$playbook" \
            || failed+=("syntax-check $playbook")
    done
fi

step "molecule test"
(cd tests && molecule test --scenario-name default "$@") || failed+=("molecule test")

step "done"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "molecule scenario and linters passed"
