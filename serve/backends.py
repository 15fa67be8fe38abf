"""Inference backends behind one protocol: onnxruntime, TensorRT, and torch (development).

Each takes the engine's input as a numpy array and returns float32 logits ``[N, K]``. Heavy
libraries are imported when a backend is created, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol

import numpy as np
from cskd.export.package import ModelPackage, read_package

from cskd.errors import CSKDError

BACKENDS = ("onnxruntime", "tensorrt", "torch")


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Engine input ``[N, C, H, W]`` -> logits ``[N, K]`` (float32)."""


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: Optional[int] = None, providers: Optional[List[str]] = None,
                 spin: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CSKDError("onnxruntime is not installed; pip install 'cskd[serve]' (or onnxruntime-gpu for CUDA)") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            # Idle worker threads otherwise spin for a while after each run, stealing the cores of
            # whatever runs next: fine for one busy server, unfair when several sessions take turns.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
        self.session = ort.InferenceSession(str(model_path), options, providers=chosen or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(["logits"], {self.input_name: batch})[0], dtype=np.float32)


class TensorRTBackend:
    """A serialised TensorRT engine run through TensorRT's runtime, with torch CUDA buffers."""

    name = "tensorrt"

    def __init__(self, engine_path: Path) -> None:
        from cskd.export.tensorrt import require_tensorrt

        trt = require_tensorrt()
        import torch

        self.torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise CSKDError(f"TensorRT could not load {engine_path}: built by another TensorRT version or GPU; re-export it here")
        self.context = self.engine.create_execution_context()
        self.input_name = self.engine.get_tensor_name(0)
        self.stream = torch.cuda.Stream()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        shape = tuple(self.context.get_tensor_shape("logits"))
        logits = torch.empty(shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address("logits", logits.data_ptr())
        for i in range(self.engine.num_io_tensors):  # optional probabilities output
            name = self.engine.get_tensor_name(i)
            if name not in (self.input_name, "logits"):
                extra = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
                self.context.set_tensor_address(name, extra.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return logits.cpu().numpy()


class TorchBackend:
    """A cskd checkpoint served directly (development): the fused student or the teacher."""

    name = "torch"

    def __init__(self, checkpoint: Path, uint8_input: bool, mean, std) -> None:
        import torch
        from cskd.export.graph import build_deploy_module

        from cskd.checkpoint import load_model

        model, spec, _ = load_model(checkpoint)
        self.torch = torch
        self.module = build_deploy_module(model, spec, uint8_input, probabilities=False)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.module(self.torch.from_numpy(batch)).float().numpy()


def create_backend(model_dir: str | Path, backend: Optional[str] = None, threads: Optional[int] = None,
                   spin: bool = True) -> tuple[Backend, ModelPackage]:
    """The backend for a model package: ``onnxruntime`` for ONNX, ``tensorrt`` for engines, or as asked."""
    folder = Path(model_dir)
    package = read_package(folder)
    kind = backend or ("tensorrt" if package.engine_format == "trt" else "onnxruntime")
    if kind not in BACKENDS:
        raise CSKDError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if kind == "onnxruntime":
        if package.engine_format != "onnx":
            onnx_file = package.files.get("onnx")
            if not onnx_file:
                raise CSKDError(f"{folder} holds a TensorRT engine only; use --backend tensorrt")
            return OnnxRuntimeBackend(folder / onnx_file, threads, spin=spin), package
        return OnnxRuntimeBackend(folder / package.files.get("optimized", package.engine), threads, spin=spin), package
    if kind == "tensorrt":
        if package.engine_format != "trt":
            raise CSKDError(f"{folder} holds an ONNX model; export with --format trt for the tensorrt backend")
        return TensorRTBackend(folder / package.engine), package
    checkpoint = package.source.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise CSKDError(f"the torch backend needs the source checkpoint {checkpoint!r}, which is not on this machine")
    return TorchBackend(Path(checkpoint), package.input.dtype == "uint8", package.input.mean, package.input.std), package


def run_batched(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``inputs`` in slices of at most ``batch`` rows, concatenated."""
    return np.concatenate([fn(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, k: int, classes: List[str]) -> List[List[Dict[str, object]]]:
    """Per row: the k best classes as ``{"label", "index", "score"}`` (softmax probabilities)."""
    probs = softmax(logits.astype(np.float64))
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"label": classes[i], "index": int(i), "score": float(row[i])} for i in idx] for idx, row in zip(order, probs)]
