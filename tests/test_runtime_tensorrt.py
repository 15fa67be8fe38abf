"""TensorRT logic that runs without TensorRT: engine compatibility, strong typing per version,
timing-cache names, input checks of the engine runner, and the one-line install hint."""

from __future__ import annotations

import types

import numpy as np
import pytest

import cskd.export.tensorrt as export_trt
from cskd.errors import CSKDError
from cskd.runtime.tensorrt import TensorRTBackend, check_engine_compatible, tensorrt_available, trt

BUILT = {"tensorrt": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_an_engine_runs_only_where_it_was_built():
    check_engine_compatible(BUILT, dict(BUILT), "model.engine")  # same TensorRT and architecture
    check_engine_compatible(BUILT, {**BUILT, "gpu": "NVIDIA H200"}, "model.engine")  # same sm 9.0
    with pytest.raises(CSKDError, match="built for TensorRT 10.8.0.43 \\(here 11.4.0.106\\).*re-export it on this machine"):
        check_engine_compatible(BUILT, {**BUILT, "tensorrt": "11.4.0.106"}, "model.engine")
    with pytest.raises(CSKDError, match="compute capability 9.0 / NVIDIA H100 80GB HBM3 \\(here 8.0 / NVIDIA A100"):
        check_engine_compatible(BUILT, {"tensorrt": "10.8.0.43", "gpu": "NVIDIA A100", "compute_capability": "8.0"}, "m")


def test_networks_are_strongly_typed_on_10_and_11(monkeypatch):
    fake = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    monkeypatch.setattr(export_trt, "trt", fake)
    assert export_trt.network_flags("10.8.0.43") == 1 << 1  # opt in on 10.x
    assert export_trt.network_flags("11.4.0.106") == 0  # always strongly typed on 11 (the flag is deprecated)


def test_timing_caches_are_per_tensorrt_version_and_gpu(tmp_path):
    a = export_trt.timing_cache_path(tmp_path, BUILT)
    b = export_trt.timing_cache_path(tmp_path, {**BUILT, "gpu": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"})
    c = export_trt.timing_cache_path(tmp_path, {**BUILT, "tensorrt": "11.4.0.106"})
    assert len({a, b, c}) == 3 and all(p.parent == tmp_path and " " not in p.name for p in (a, b, c))


def runner(batch_range=(1, 16), shape=(1, 32, 32), dtype=np.float32) -> TensorRTBackend:
    backend = TensorRTBackend.__new__(TensorRTBackend)  # no engine: only the input checks run
    backend.batch_range, backend.input_shape, backend.input_dtype = batch_range, shape, dtype
    return backend


@pytest.mark.parametrize("batch, message", [
    (np.zeros((17, 1, 32, 32), np.float32), "batch of 17 is outside the engine's profile \\[1, 16\\].*--max-batch 17"),
    (np.zeros((0, 1, 32, 32), np.float32), "batch of 0 is outside"),
    (np.zeros((2, 3, 32, 32), np.float32), "does not fit the engine's \\[N, 1, 32, 32\\]"),
    (np.zeros((2, 1, 32, 32), np.uint8), "dtype uint8 is not the engine's float32"),
])
def test_the_runner_refuses_inputs_the_engine_cannot_take(batch, message):
    with pytest.raises(CSKDError, match=message):
        runner()._check(batch)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_without_tensorrt_every_use_is_one_line_saying_how_to_get_it():
    with pytest.raises(CSKDError, match="TensorRT is not installed here; on a CUDA machine run `pip install 'cskd\\[gpu\\]'`"):
        trt.Builder
