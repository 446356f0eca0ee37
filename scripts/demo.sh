#!/usr/bin/env bash
# Local demo of the runtime alone: a private redis-server, two workers with different sizes,
# the example taskfiles, a live progress view, then the results and their index. Everything
# under ./demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
VENV=${VENV:-.venv}
DC="$VENV/bin/distcomp"
PORT=${DEMO_PORT:-6390}
rm -rf demo && mkdir -p demo/results
export DISTCOMP_REDIS_URL=redis://127.0.0.1:$PORT/0 DISTCOMP_NAMESPACE=demo DISTCOMP_CONFIG=/dev/null

redis-server --port "$PORT" --bind 127.0.0.1 --dir "$PWD/demo" --save '' --appendonly no \
    --daemonize yes --pidfile "$PWD/demo/redis.pid" --logfile "$PWD/demo/redis.log"
cleanup() {
    kill "${W1:-}" "${W2:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done

"$DC" submit examples/sweep.txt
"$DC" submit examples/sweep.jsonl
"$DC" submit examples/sweep.txt   # idempotent: adds nothing

"$DC" worker --name big --cores 2 --memory-limit 2G --results-dir demo/results --workdir "$PWD" \
    >demo/worker-big.log 2>&1 & W1=$!
"$DC" worker --name small --cores 1 --memory-limit 1G --results-dir demo/results --workdir "$PWD" \
    >demo/worker-small.log 2>&1 & W2=$!

"$DC" watch --interval 0.5
"$DC" workers
"$DC" status --state finished --limit 20
first=$("$DC" status --state finished --limit 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"][0]["id"])')
"$DC" show "$first"
"$DC" export -o demo/tasks.csv
echo "index of every task (id, params, state, exit code, times, peak memory): demo/tasks.csv"
echo "full outputs: demo/results/<id[:2]>/<id>.out and .err; worker logs: demo/worker-*.log"
