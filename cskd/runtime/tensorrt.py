"""Running serialised TensorRT engines (CUDA machines with TensorRT and torch).

``trt`` is the ``tensorrt`` module, imported on first use, so this module imports anywhere; to a
type checker it is the real module, so every ``trt.`` name and call is checked against TensorRT's
API (``scripts/check_tensorrt.py`` runs mypy against the 10.x and 11.x bindings). torch provides
the CUDA buffers and stream. An engine runs only with the TensorRT version and the GPU architecture
it was built for; the package records both and a mismatch is refused with a clear error.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np

from cskd.errors import CSKDError
from cskd.runtime.package import ModelPackage

INSTALL_HINT = (
    "TensorRT is not installed here; on a CUDA machine run `pip install 'cskd[gpu]'` (or use the GPU "
    "image built from docker/Dockerfile.gpu), or export with --format onnx"
)


class _LazyTensorRT:
    """Imports ``tensorrt`` on the first attribute access; a missing install is a one-line error."""

    def __getattr__(self, name: str) -> Any:
        try:
            module = importlib.import_module("tensorrt")
        except ImportError:
            raise CSKDError(INSTALL_HINT) from None
        return getattr(module, name)


if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = _LazyTensorRT()


def require_tensorrt() -> None:
    """Fail in one line when TensorRT is not installed."""
    trt.__version__


def require_cuda() -> Any:
    """torch with a visible CUDA device (TensorRT builds and runs engines on one)."""
    try:
        import torch
    except ImportError:
        raise CSKDError("TensorRT in cskd needs torch for CUDA buffers; pip install 'cskd[gpu]'") from None
    if not torch.cuda.is_available():
        raise CSKDError("TensorRT needs a CUDA GPU and none is visible here; use --format onnx, or run on a GPU machine")
    return torch


def tensorrt_available() -> bool:
    """TensorRT importable and a CUDA GPU visible (what building or running an engine needs)."""
    try:
        require_tensorrt()
        require_cuda()
    except CSKDError:
        return False
    return True


def device_facts() -> Dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine: what an engine is bound to."""
    torch = require_cuda()
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_engine_compatible(built: Dict[str, Any], here: Dict[str, Any], engine: Path) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture."""
    problems = []
    if built.get("tensorrt") and built["tensorrt"] != here["tensorrt"]:
        problems.append(f"TensorRT {built['tensorrt']} (here {here['tensorrt']})")
    if built.get("compute_capability") and built["compute_capability"] != here["compute_capability"]:
        problems.append(f"compute capability {built['compute_capability']} / {built.get('gpu', '?')} "
                        f"(here {here['compute_capability']} / {here['gpu']})")
    if problems:
        raise CSKDError(f"{engine} was built for {' and '.join(problems)}; an engine runs only where it was built: "
                        "re-export it on this machine with `cskd export RUN --format trt`")


_NUMPY_OF = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32}


class TensorRTBackend:
    """A serialised engine run through TensorRT's runtime on torch's CUDA memory and stream."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, package: Optional[ModelPackage] = None, device_id: int = 0) -> None:
        require_tensorrt()
        self.torch = require_cuda()
        self.device = self.torch.device("cuda", device_id)
        self.torch.cuda.set_device(self.device)  # TensorRT builds its context on the current device
        if package is not None and package.build.get("tensorrt"):
            check_engine_compatible(package.build["tensorrt"], device_facts(), engine_path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise CSKDError(f"TensorRT could not load {engine_path}: built by another TensorRT version or for "
                            "another GPU; re-export it on this machine")
        self.engine: trt.ICudaEngine = engine
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1 or "logits" not in names:
            raise CSKDError(f"{engine_path} has inputs {inputs} and tensors {names}; a cskd engine has one input and "
                            "a 'logits' output: re-export it")
        self.input_name = inputs[0]
        self.outputs = [n for n in names if n != self.input_name]
        self.input_dtype = _numpy_dtype(self.engine.get_tensor_dtype(self.input_name))
        low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range: Tuple[int, int] = (int(low[0]), int(high[0]))
        self.input_shape = tuple(int(d) for d in high[1:])
        self.stream = self.torch.cuda.Stream(device=self.device)

    def _check(self, batch: np.ndarray) -> None:
        low, high = self.batch_range
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise CSKDError(f"input of shape {tuple(batch.shape)} does not fit the engine's [N, {', '.join(map(str, self.input_shape))}]")
        if not low <= batch.shape[0] <= high:
            raise CSKDError(f"batch of {batch.shape[0]} is outside the engine's profile [{low}, {high}]; split it or "
                            f"re-export with --max-batch {batch.shape[0]}")
        if batch.dtype != self.input_dtype:
            raise CSKDError(f"input dtype {batch.dtype} is not the engine's {np.dtype(self.input_dtype).name}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        self._check(batch)
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)}")
            buffers = {self.input_name: x}
            for name in self.outputs:
                shape = dims(self.context.get_tensor_shape(name))
                dtype = getattr(torch, np.dtype(_numpy_dtype(self.engine.get_tensor_dtype(name))).name)
                buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            for name, tensor in buffers.items():
                if not self.context.set_tensor_address(name, tensor.data_ptr()):
                    raise RuntimeError(f"TensorRT refused the address of tensor {name!r}")
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT failed to run the engine (see its log above)")
            logits = buffers["logits"].float().cpu()  # synchronises with the stream
        return logits.numpy()


def dims(shape: trt.Dims) -> Tuple[int, ...]:
    return tuple(shape[i] for i in range(len(shape)))


def _numpy_dtype(trt_dtype: trt.DataType) -> Any:
    name = trt_dtype.name
    if name not in _NUMPY_OF:
        raise CSKDError(f"engine tensor type {name} is not supported; re-export with --input float or uint8")
    return _NUMPY_OF[name]
