#!/usr/bin/env bash
# Container stage of CI: validate the compose file, build the CPU image with podman from a locally
# built base image, start the stack with podman-compose, check /predict against `cskd predict`,
# check the container runs as non-root, tear everything down. Prints the timing of each step.
# Needs root, podman, podman-compose, debootstrap, docker-compose (installed by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/cskd-ctr.XXXXXX)
project=cskdci$$
t0=$(date +%s)
stamp() { echo "[container stage] $1: $(( $(date +%s) - t0 )) s"; }
cleanup() {
  podman-compose -p "$project" -f docker/compose.yaml down -t 5 >/dev/null 2>&1 || true
  podman rm -f $(podman ps -aq --filter "label=io.podman.compose.project=$project") >/dev/null 2>&1 || true
  podman network rm -f "${project}_default" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Podman here: runc, cgroupfs, and ulimits this host allows (runc may not set nproc at the host's
# hard limit, so it is capped at 16384).
nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ] && nproc=16384
cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$work/containers.conf"

docker-compose -f docker/compose.yaml config -q
docker-compose -f docker/compose.yaml --profile gpu --profile train --profile monitoring --profile triton config -q
stamp "compose files valid"

base=localhost/cskd-base:bookworm
if ! podman image exists "$base"; then
  # The apt mirror this machine already uses, read from its sources (never written into the repo).
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log"
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  stamp "base image built by debootstrap"
else
  stamp "base image cached"
fi

# pip inside the build needs this machine's CA bundle (TLS-intercepting egress): a build secret only.
podman build -q --format docker --runtime runc -f docker/Dockerfile --build-arg BASE_IMAGE="$base" \
  --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t cskd-serve:ci . > /dev/null
stamp "serving image built ($(podman image inspect cskd-serve:ci --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"

# A real model package: the packaged demo teacher, exported on the host.
cskd export cskd/assets/teacher_fashion_mnist_demo.safetensors --out "$work/model" --parity-images 200 > /dev/null
# its shadow: the same network as another engine (raw pixels in, normalised in the graph): a model may not
# watch itself (the server refuses the same engine), and these two answer alike
cskd export cskd/assets/teacher_fashion_mnist_demo.safetensors --input uint8 --out "$work/shadow" --parity-images 200 > /dev/null
python3 - "$work" <<'PY'
import sys
from cskd.data.datasets import demo_arrays
from PIL import Image
images, _ = demo_arrays("val")
for i in range(3):
    Image.fromarray(images[i * 11], mode="L").save(f"{sys.argv[1]}/img{i}.png")
PY
chmod -R a+rX "$work"
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
port=$(free_port); grpc_port=$(free_port)
# The package watched by its twin engine on every image: the two must agree on all of them.
MODEL_DIR="$work/model" TEACHER_DIR="$work/shadow" SHADOW_RATE=1.0 CSKD_IMAGE=cskd-serve:ci API_PORT=$port GRPC_PORT=$grpc_port \
  podman-compose -p "$project" -f docker/compose.yaml up -d api > "$work/up.log" 2>&1 || { cat "$work/up.log"; exit 1; }
stamp "stack up"
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.5; done
curl -sf "http://127.0.0.1:$port/readyz" > /dev/null || { podman logs "${project}_api_1" || true; echo "api never became ready"; exit 1; }
answer=$(curl -sf -F "files=@$work/img0.png" -F "files=@$work/img1.png" -F "files=@$work/img2.png" \
  "http://127.0.0.1:$port/predict?top_k=1")
stamp "first answer"
expected=$(cskd predict "$work/model" "$work"/img0.png "$work"/img1.png "$work"/img2.png --top-k 1 --json "$work/expected.json" > /dev/null && cat "$work/expected.json")
python3 - "$answer" "$expected" <<'PY'
import json, sys
got = [p["top"][0]["label"] for p in json.loads(sys.argv[1])["predictions"]]
want = [r["top"][0]["label"] for r in json.loads(sys.argv[2])]
assert got == want, f"container answered {got}, cskd predict {want}"
print(f"[container stage] /predict in the container agrees with cskd predict: {got}")
PY
for _ in $(seq 120); do   # the teacher runs on idle cycles (SCHED_IDLE): give it up to a minute
  shadow=$(curl -sf "http://127.0.0.1:$port/v1/shadow")
  python3 -c "import json, sys; s = json.loads(sys.argv[1])['samples']; sys.exit(s['agree'] + s['disagree'] < 3)" "$shadow" && break
  sleep 0.5
done
python3 - "$shadow" <<'PY'
import json, sys
report = json.loads(sys.argv[1])
assert report["samples"] == {"agree": 3, "disagree": 0, "dropped": 0, "failed": 0}, report["samples"]
print(f"[container stage] the shadow teacher in the container judged 3 of 3 images: agreement {report['window']['agreement']}")
PY
model=$(curl -sf "http://127.0.0.1:$port/v1/model")
python3 - "$grpc_port" "$model" <<'PY'
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(f"127.0.0.1:{sys.argv[1]}")
model = json.loads(sys.argv[2])
spec = model["input"]
assert client.is_server_ready() and client.is_model_ready(model["name"]), "gRPC in the container is not ready"
x = np.zeros((2, spec["channels"], spec["size"], spec["size"]), np.float32 if spec["dtype"] == "float32" else np.uint8)
tensor = grpcclient.InferInput(spec["name"], list(x.shape), "FP32" if spec["dtype"] == "float32" else "UINT8")
tensor.set_data_from_numpy(x)
logits = client.infer(model["name"], [tensor]).as_numpy("logits")
assert logits.shape == (2, len(model["classes"])), logits.shape
print(f"[container stage] KServe v2 gRPC in the container answers: logits {logits.shape}")
PY
uid=$(podman exec "${project}_api_1" id -u)
[ "$uid" != "0" ] || { echo "the api container runs as root"; exit 1; }
echo "[container stage] api runs as uid $uid"
podman-compose -p "$project" -f docker/compose.yaml down -t 5 > /dev/null 2>&1
podman network rm "${project}_default" > /dev/null 2>&1 || true  # podman-compose 1.0 leaves its network
left=$(podman ps -aq --filter "label=io.podman.compose.project=$project" | wc -l)
nets=$(podman network ls --format '{{.Name}}' | grep -c "^${project}" || true)
[ "$left" = "0" ] && [ "$nets" = "0" ] || { echo "left behind: $left containers, $nets networks"; exit 1; }
stamp "torn down, nothing left behind"
