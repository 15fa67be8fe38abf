#!/usr/bin/env bash
# NVIDIA's perf_analyzer (the load tool Triton users run) against `cskd serve`: KServe v2 over HTTP
# and gRPC, binary tensors, batch 1 per request, at several concurrencies, servers interleaved.
#
#   bash benchmarks/serve_perf_analyzer.sh OUT PACKAGE...            # e.g. teacher, student fp32, student int8
#   CONCURRENCY="1 16" PROTOCOLS=http WINDOW_MS=3000 bash benchmarks/serve_perf_analyzer.sh OUT PKG...
#   SERVE="python3 -m cskd serve" SERVE_ARGS="--max-wait-ms 5" ...   # another server command or settings
#
# Every package gets its own `cskd serve` (HTTP and gRPC on free loopback ports, same settings); all
# are up at once (idle servers cost nothing: their runtimes do not spin) and perf_analyzer drives one
# at a time, round-robin per protocol and concurrency, so drift hits every package alike. Results:
# OUT/<package>.<protocol>.c<N>.csv (perf_analyzer's own), then benchmarks/serve_perf_report.py prints
# the table and writes OUT/perf_analyzer.json.
#
# perf_analyzer is put into PERF_ANALYZER_DIR on the first run (benchmarks/perf_analyzer_install.sh).
set -euo pipefail
out=${1:?usage: serve_perf_analyzer.sh OUT PACKAGE...}; shift
[ $# -ge 1 ] || { echo "give at least one model package" >&2; exit 2; }
concurrency=${CONCURRENCY:-1 4 16 64}
protocols=${PROTOCOLS:-http grpc}
window=${WINDOW_MS:-3000}
serve=${SERVE:-python3 -m cskd serve}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

tools=$(bash "$here/perf_analyzer_install.sh" "${PERF_ANALYZER_DIR:-.cache/perf_analyzer}")
export LD_LIBRARY_PATH="$tools/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
pids=(); labels=(); names=(); http_ports=(); grpc_ports=()
cleanup() { for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

for package in "$@"; do
  label=$(basename "$package")
  http=$(free_port); grpc=$(free_port)
  grpc_flag=(--grpc-port "$grpc")
  [[ " $protocols " == *" grpc "* ]] || grpc_flag=(--grpc-port 0)  # not the default 8001: several servers run at once
  # shellcheck disable=SC2086  # SERVE and SERVE_ARGS are command lines
  $serve "$package" --port "$http" "${grpc_flag[@]}" --log-level warning ${SERVE_ARGS:-} > "$out/$label.server.log" 2>&1 &
  pids+=($!); labels+=("$label"); http_ports+=("$http"); grpc_ports+=("$grpc")
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$http/readyz" > /dev/null && break; sleep 0.5; done
  curl -sf "http://127.0.0.1:$http/readyz" > /dev/null || { cat "$out/$label.server.log"; echo "$label never became ready" >&2; exit 1; }
  names+=("$(curl -sf "http://127.0.0.1:$http/v1/model" | python3 -c 'import json, sys; print(json.load(sys.stdin)["name"])')")
done

run() {  # index protocol concurrency
  local i=$1 protocol=$2 c=$3 url
  url=127.0.0.1:${http_ports[$i]}; [ "$protocol" = grpc ] && url=127.0.0.1:${grpc_ports[$i]}
  "$tools/perf_analyzer" -m "${names[$i]}" -u "$url" -i "$protocol" -b 1 --input-data zero \
    --concurrency-range "$c" --measurement-interval "$window" --stability-percentage 25 --max-trials 10 \
    -f "$out/${labels[$i]}.$protocol.c$c.csv" > "$out/${labels[$i]}.$protocol.c$c.log" 2>&1 \
    || { tail -20 "$out/${labels[$i]}.$protocol.c$c.log"; echo "perf_analyzer failed: ${labels[$i]} $protocol c$c" >&2; exit 1; }
  echo "perf_analyzer ${labels[$i]} $protocol c$c: $(tail -1 "$out/${labels[$i]}.$protocol.c$c.log")"
}
for i in "${!labels[@]}"; do run "$i" http 1 > /dev/null; done  # warm-up
for protocol in $protocols; do
  for c in $concurrency; do
    for i in "${!labels[@]}"; do run "$i" "$protocol" "$c"; done
  done
done
python3 "$here/serve_perf_report.py" "$out" "${labels[@]}"
