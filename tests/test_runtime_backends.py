"""Backends: the registry, onnxruntime providers (asked for, available, actually in use)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from cskd.errors import CSKDError
from cskd.runtime.backends import BackendOptions, OnnxRuntimeBackend, backend_names, create_backend, run_batched


def fake_onnxruntime(monkeypatch, available, loads):
    """An onnxruntime whose sessions start only the providers in ``loads`` (as a broken CUDA install does)."""
    module = types.ModuleType("onnxruntime")
    module.get_available_providers = lambda: list(available)
    module.preload_dlls = lambda: None

    class SessionOptions:
        intra_op_num_threads = 0

        def add_session_config_entry(self, key, value):
            pass

    class InferenceSession:
        def __init__(self, path, options, providers):
            self.asked = [p[0] for p in providers]

        def get_providers(self):
            return [p for p in self.asked if p in loads]

        def get_inputs(self):
            return [types.SimpleNamespace(name="input")]

    module.SessionOptions, module.InferenceSession = SessionOptions, InferenceSession
    monkeypatch.setitem(sys.modules, "onnxruntime", module)


def test_a_gpu_provider_that_fails_to_load_is_an_error_not_a_silent_cpu_fallback(monkeypatch, tmp_path):
    fake_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"], loads=["CPUExecutionProvider"])
    with pytest.raises(CSKDError, match="could not start CUDAExecutionProvider .* would have run on CPUExecutionProvider"):
        OnnxRuntimeBackend(tmp_path / "model.onnx", BackendOptions())  # the default asks for CUDA when it is there


def test_providers_in_use_are_reported_and_the_cpu_can_be_chosen_on_purpose(monkeypatch, tmp_path):
    fake_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"], loads=["CPUExecutionProvider"])
    backend = OnnxRuntimeBackend(tmp_path / "model.onnx", BackendOptions(providers=["CPUExecutionProvider"]))
    assert backend.providers == ["CPUExecutionProvider"]
    fake_onnxruntime(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                     loads=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    backend = OnnxRuntimeBackend(tmp_path / "model.onnx", BackendOptions(
        providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert backend.providers[0] == "TensorrtExecutionProvider"


def test_asking_for_a_provider_this_onnxruntime_lacks_says_what_to_install(tmp_path):
    with pytest.raises(CSKDError, match="has no CUDAExecutionProvider .* install onnxruntime-gpu"):
        OnnxRuntimeBackend(tmp_path / "model.onnx", BackendOptions(providers=["CUDAExecutionProvider"]))


def test_unknown_backend_names_the_choices(tmp_path):
    from cskd.runtime.package import InputSpec, ModelPackage, write_package_json

    (tmp_path / "model.onnx").write_bytes(b"")
    write_package_json(tmp_path, ModelPackage("m", "student", "a", "model.onnx", "onnx", "fp32", True,
                                              InputSpec("input", "float32", "NCHW", 1, 8, [0.0], [1.0]), ["logits"], ["x"]))
    with pytest.raises(CSKDError, match="unknown backend 'onnxrt' .*did you mean: onnxruntime"):
        create_backend(tmp_path, "onnxrt")
    assert {"onnxruntime", "tensorrt"} <= set(backend_names())


def test_run_batched_slices_and_concatenates():
    seen = []
    out = run_batched(lambda x: (seen.append(len(x)), x * 2)[1], np.arange(10).reshape(10, 1), 4)
    assert seen == [4, 4, 2] and np.array_equal(out[:, 0], np.arange(10) * 2)
