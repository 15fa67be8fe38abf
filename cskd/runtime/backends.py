"""Inference backends behind one protocol, chosen by name from a registry.

A backend takes the engine's input as a numpy array and returns float32 logits ``[N, K]``.
``onnxruntime``, ``openvino`` (Intel's CPU runtime, the ``openvino`` extra) and ``tensorrt`` are
built in; other layers may register more (the command line registers ``torch``, which runs the
source checkpoint). A package runs on the backend its parity gate passed on, unless told otherwise. Heavy libraries are imported when a
backend is created, so importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np

from cskd.errors import CSKDError, did_you_mean
from cskd.runtime.package import ModelPackage, read_package
from cskd.runtime.tensorrt import TensorRTBackend


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Engine input ``[N, C, H, W]`` -> logits ``[N, K]`` (float32)."""
        ...


@dataclass
class BackendOptions:
    threads: Optional[int] = None  # CPU threads per inference (onnxruntime intra-op)
    spin: bool = True  # onnxruntime: let idle threads spin (lower latency, steals cores from neighbours)
    providers: Optional[List[str]] = None  # onnxruntime execution providers, in order of preference
    device_id: int = 0  # the CUDA device of GPU providers


BackendFactory = Callable[[Path, ModelPackage, BackendOptions], Backend]
_FACTORIES: Dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: make ``factory(folder, package, options)`` available as backend ``name``."""

    def add(factory: BackendFactory) -> BackendFactory:
        _FACTORIES[name] = factory
        return factory

    return add


def backend_names() -> List[str]:
    return sorted(_FACTORIES)


def default_backend(package: ModelPackage) -> str:
    """The backend the package's parity gate ran on; else its engine's own."""
    return package.backend or ("tensorrt" if package.engine_format == "trt" else "onnxruntime")


def create_backend(model_dir: str | Path, name: Optional[str] = None,
                   options: Optional[BackendOptions] = None) -> Tuple[Backend, ModelPackage]:
    """The backend for a model package: its own engine's by default, or the one named."""
    folder = Path(model_dir)
    package = read_package(folder)
    name = name or default_backend(package)
    if name not in _FACTORIES:
        raise CSKDError(f"unknown backend {name!r}{did_you_mean(name, _FACTORIES)}; choose one of {', '.join(backend_names())}")
    return _FACTORIES[name](folder, package, options or BackendOptions()), package


def run_batched(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``inputs`` in slices of at most ``batch`` rows, concatenated."""
    return np.concatenate([fn(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRuntimeBackend:
    """An onnxruntime session on the providers asked for (default: CUDA when onnxruntime-gpu has it,
    else the CPU), refusing to start when a GPU provider it was to use did not load: onnxruntime
    would otherwise fall back to the CPU silently."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, options: BackendOptions, cache_dir: Optional[Path] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CSKDError("onnxruntime is not installed; pip install 'cskd[serve]' (or 'cskd[gpu]' on CUDA machines)") from None
        available = ort.get_available_providers()
        wanted = options.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise CSKDError(f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)}); "
                            "install onnxruntime-gpu (pip install 'cskd[gpu]') on a CUDA machine, or choose other --providers")
        if any(p in GPU_PROVIDERS for p in wanted) and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, before the session needs them
        session_options = ort.SessionOptions()
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        if not options.spin:
            # Idle worker threads otherwise spin for a while after each run, stealing the cores of
            # whatever runs next: fine for one busy server, unfair when several sessions take turns.
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [(p, provider_options(p, options, cache_dir or model_path.parent)) for p in wanted]
        self.session = ort.InferenceSession(str(model_path), session_options, providers=providers)
        self.providers = self.session.get_providers()
        lost = [p for p in wanted if p in GPU_PROVIDERS and p not in self.providers]
        if lost:
            raise CSKDError(f"onnxruntime could not start {', '.join(lost)} (its CUDA/cuDNN/TensorRT libraries did not load; "
                            f"see the warning above) and would have run on {', '.join(self.providers)}; fix the GPU "
                            "libraries, or pass --providers CPUExecutionProvider to run on the CPU on purpose")
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(["logits"], {self.input_name: batch})[0], dtype=np.float32)


def provider_options(provider: str, options: BackendOptions, cache_dir: Path) -> Dict[str, object]:
    """Per-provider settings: TensorRT EP builds from the (already typed) ONNX and caches its engines."""
    if provider == "TensorrtExecutionProvider":
        return {"device_id": options.device_id, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}
    if provider == "CUDAExecutionProvider":
        return {"device_id": options.device_id, "use_tf32": 0}  # TF32 would move fp32 logits past the parity gate
    return {}


@register_backend("onnxruntime")
def _onnxruntime(folder: Path, package: ModelPackage, options: BackendOptions) -> Backend:
    if package.engine_format == "onnx":
        # fp32 packages carry onnxruntime's optimised graph beside the portable one
        return OnnxRuntimeBackend(folder / package.files.get("optimized", package.engine), options)
    onnx_file = package.files.get("onnx")
    if not onnx_file:
        raise CSKDError(f"{folder} holds a TensorRT engine only; use --backend tensorrt")
    return OnnxRuntimeBackend(folder / onnx_file, options)


class OpenVINOBackend:
    """Intel's OpenVINO runtime on the CPU, from the portable ONNX graph (int8 QDQ graphs run as int8).

    Inference precision is pinned to f32: on CPUs with bf16 units OpenVINO would otherwise run fp32
    models in bf16, which the package's parity figures do not cover.
    """

    name = "openvino"

    def __init__(self, model_path: Path, options: BackendOptions) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise CSKDError("OpenVINO is not installed; pip install 'cskd[openvino]', or use --backend onnxruntime") from None
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = options.threads
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.logits = self.compiled.output("logits")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: batch})[self.logits], dtype=np.float32)


@register_backend("openvino")
def _openvino(folder: Path, package: ModelPackage, options: BackendOptions) -> Backend:
    if package.engine_format != "onnx":
        raise CSKDError(f"{folder} holds a TensorRT engine; OpenVINO runs ONNX packages")
    return OpenVINOBackend(folder / package.engine, options)  # the portable graph, not onnxruntime's optimised one


@register_backend("tensorrt")
def _tensorrt(folder: Path, package: ModelPackage, options: BackendOptions) -> Backend:
    if package.engine_format != "trt":
        raise CSKDError(f"{folder} holds an ONNX model; export with --format trt for the tensorrt backend")
    return TensorRTBackend(folder / package.engine, package, options.device_id)
