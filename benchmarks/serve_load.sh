#!/usr/bin/env bash
# Load test of `cskd serve` on loopback: batch-1 serving against dynamic batching, same model, one run.
# Usage: bash benchmarks/serve_load.sh MODEL_DIR [SECONDS] [CLIENTS] [OUT_DIR]
# For each setting: start the server, record its memory (VmRSS) once ready, drive it with
# `cskd bench http` (CLIENTS concurrent clients for SECONDS), record memory again, stop it.
set -euo pipefail
model=${1:?usage: serve_load.sh MODEL_DIR [SECONDS] [CLIENTS] [OUT_DIR]}
seconds=${2:-60}; clients=${3:-32}; out=${4:-bench-serve}
mkdir -p "$out"
run() {  # name, extra serve flags...
  local name=$1; shift
  local port=$((18000 + RANDOM % 1000))
  python -m cskd serve "$model" --port "$port" --log-level warning "$@" > "$out/$name.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.5; done
  local server_pid
  server_pid=$(pgrep -f "cskd serve $model --port $port" | head -1)
  local before after
  before=$(awk '/VmRSS/ {print $2}' "/proc/$server_pid/status")
  python -m cskd bench http "http://127.0.0.1:$port" --concurrency "$clients" --duration "$seconds" --out "$out/$name" || true
  after=$(awk '/VmRSS/ {print $2}' "/proc/$server_pid/status")
  kill -INT "$pid"; wait "$pid" || true
  echo "$name: server RSS ${before} kB before, ${after} kB after" | tee "$out/$name.memory.txt"
}
run batch1 --max-batch 1 --max-wait-ms 0 --max-queue 1024
run batched --max-batch 32 --max-wait-ms 5 --max-queue 1024
