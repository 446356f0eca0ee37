#!/usr/bin/env bash
# Install what the runtime's tests, demo and benchmarks need on a fresh Debian/Ubuntu machine:
# redis-server and GNU parallel from apt, and a virtualenv (.venv) with distcomp installed.
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v parallel >/dev/null || need_apt+=(parallel)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    echo "bootstrap: installing ${need_apt[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian starts a system redis-server on 6379 after installing it; the tests and the demo run
# their own servers on other ports, so leave it as the system has it.

VENV=${VENV:-.venv}
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
fi
stamp=$VENV/.distcomp-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[test]'
    touch "$stamp"
fi
echo "bootstrap: ready ($VENV, $(redis-server --version | cut -d' ' -f3), $(parallel --version | head -1))" >&2
