#!/usr/bin/env bash
# The demo, end to end: generate the data, fine-tune, score held-out tickets, serve the best
# checkpoint on Ray Serve and ask it one question over HTTP.
set -euo pipefail
cd "$(dirname "$0")/../.."
JOB=configs/examples/ticket-router.yaml
JOB_DIR=./forge-runs/jobs/ticket-router
PORT=${PORT:-8000}
export FORGE_API_KEYS=${FORGE_API_KEYS:-demo-token}
start=$(date +%s)

echo "== 1/4 data: configs/examples/data (synthetic support tickets, 4 teams)"
python configs/examples/make_dataset.py

echo "== 2/4 train: $JOB"
forge train "$JOB" --overwrite

echo "== 3/4 held-out accuracy of the best checkpoint"
forge eval "$JOB_DIR" --data configs/examples/data/test.jsonl

echo "== 4/4 serve the best checkpoint on Ray Serve (port $PORT) and ask once"
forge serve "$JOB_DIR" --port "$PORT" > forge-runs/serve.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break
  kill -0 $server 2>/dev/null || { echo "forge serve exited:"; tail -20 forge-runs/serve.log; exit 1; }
  sleep 1
done
request='{"text": "Hello, the courier is three days late.\n\n###\n\nTeam:", "top_k": 1, "length": 4}'
echo "POST /v1/models/ticket-router/complete $request"
curl -sS "http://127.0.0.1:$PORT/v1/models/ticket-router/complete" \
  -H "Authorization: Bearer $FORGE_API_KEYS" -H "Content-Type: application/json" -d "$request"
echo
echo "demo finished in $(( $(date +%s) - start ))s"
