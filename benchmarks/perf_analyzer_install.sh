#!/usr/bin/env bash
# Puts NVIDIA's perf_analyzer into DIR (default .cache/perf_analyzer) unless it is there: from the
# tritonclient 2.48.0 wheel (later wheels no longer carry it) with two libraries beside it (libb64
# from Debian, libcudart from PyPI: loaded, unused on a CPU), downloaded through this machine's own
# pip and apt configuration. Prints DIR; run it as LD_LIBRARY_PATH=DIR/lib DIR/perf_analyzer.
set -euo pipefail
tools=$(realpath -m "${1:-.cache/perf_analyzer}")
mkdir -p "$tools"
if [ ! -x "$tools/perf_analyzer" ]; then
  scratch=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 -d "$scratch" tritonclient==2.48.0
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$scratch" "nvidia-cuda-runtime-cu12>=12,<13"
  (cd "$scratch" && apt-get download libb64-0d > /dev/null 2>&1)
  python3 -m zipfile -e "$scratch"/tritonclient-2.48.0-*.whl "$scratch/tc"
  python3 -m zipfile -e "$scratch"/nvidia_cuda_runtime_cu12-*.whl "$scratch/cu"
  dpkg -x "$scratch"/libb64-0d_*.deb "$scratch/b64"
  mkdir -p "$tools/lib"
  cp "$scratch"/tc/tritonclient-2.48.0.data/data/bin/perf_analyzer "$tools/"
  chmod +x "$tools/perf_analyzer"
  cp "$(find "$scratch/cu" -name 'libcudart.so.12' | head -1)" "$(find "$scratch/b64" -name 'libb64.so.0d' | head -1)" "$tools/lib/"
  rm -rf "$scratch"
fi
echo "$tools"
