"""TensorRT engines through TensorRT's own builder API (imported lazily: GPU machines only).

The ONNX graph is parsed, given an optimisation profile over batch 1..max_batch, and built in
fp32, fp16 (normalisation, softmax and the final head pinned to fp32) or int8 (from the QDQ ONNX
model: explicit quantisation). A timing cache beside the engine makes rebuilds fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cskd.errors import CSKDError

INSTALL_HINT = (
    "TensorRT is not installed here; on a CUDA machine run `pip install tensorrt` (or use the GPU "
    "image built from docker/Dockerfile.gpu), or export with --format onnx"
)


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise CSKDError(INSTALL_HINT) from None
    return trt


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
        import torch

        return torch.cuda.is_available()
    except (CSKDError, ImportError):
        return False


_FP32_LAYERS = ("NORMALIZATION", "SOFTMAX", "REDUCE")


def build_engine(onnx_path: Path, engine_path: Path, precision: str, max_batch: int, channels: int, size: int,
                 timing_cache: Optional[Path] = None, workspace_gib: float = 4.0) -> None:
    """Parse ``onnx_path`` and serialise a TensorRT engine to ``engine_path``."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CSKDError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    shape = lambda n: (n, channels, size, size)  # noqa: E731
    profile.set_shape(network.get_input(0).name, shape(1), shape(max(1, max_batch // 2)), shape(max_batch))
    config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        last = network.num_layers - 1
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if any(kind in str(layer.type) for kind in _FP32_LAYERS) or i >= last - 1:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the QDQ nodes of the ONNX model
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CSKDError(f"TensorRT failed to build an engine from {onnx_path}; see the messages above")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
