#!/usr/bin/env bash
# Load test of `cskd serve` on loopback: batch-1 serving against dynamic batching, same model, one run,
# driven by `hey` (Debian package `hey`: a compiled load generator that leaves the cores to the server).
# Usage: bash benchmarks/serve_load.sh MODEL_DIR [SECONDS] [CLIENTS] [OUT_DIR] [BODY]
#   BODY: raw (one PNG as the body, Content-Type image/png: the cheapest request, default) or multipart.
# For each setting: start the server, read its CPU time and memory once ready, drive it with CLIENTS
# concurrent connections for SECONDS, read them again and its Prometheus metrics, stop it. The
# report (benchmarks/serve_load_report.py) gives requests/s, latency percentiles, non-2xx answers,
# the server's CPU per request and how much of it is outside inference.
set -euo pipefail
model=${1:?usage: serve_load.sh MODEL_DIR [SECONDS] [CLIENTS] [OUT_DIR] [BODY]}
seconds=${2:-30}; clients=${3:-32}; out=${4:-bench-serve}; body=${5:-raw}
command -v hey > /dev/null || { echo "serve_load.sh needs hey: apt-get install hey" >&2; exit 2; }
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/serve_load_report.py" --make-bodies "$out"
if [ "$body" = multipart ]; then
  request=(-T "multipart/form-data; boundary=cskdloadboundary" -D "$out/multipart.body")
else
  request=(-T "image/png" -D "$out/image.png")
fi
run() {  # name, extra serve flags...
  local name=$1; shift
  local port=$((18000 + RANDOM % 1000))
  python3 -m cskd serve "$model" --port "$port" --grpc-port 0 --log-level warning "$@" > "$out/$name.server.log" 2>&1 &
  local launcher=$!
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.5; done
  local pid
  pid=$(pgrep -f "cskd serve $model --port $port" | head -1)
  python3 "$here/serve_load_report.py" --snapshot "$pid" "http://127.0.0.1:$port" > "$out/$name.before.json"
  hey -z "${seconds}s" -c "$clients" -m POST "${request[@]}" "http://127.0.0.1:$port/predict" > "$out/$name.hey.txt"
  python3 "$here/serve_load_report.py" --snapshot "$pid" "http://127.0.0.1:$port" > "$out/$name.after.json"
  kill -INT "$launcher"; wait "$launcher" || true
}
run batch1 --max-batch 1 --max-wait-ms 0 --max-queue 1024
run batched --max-batch 32 --max-wait-ms 2 --max-queue 1024
python3 "$here/serve_load_report.py" --report "$out" batch1 batched --model "$model"
