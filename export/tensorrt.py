"""TensorRT engines through TensorRT's own builder API (CUDA machines with the ``gpu`` extra).

One path serves TensorRT 10.x and 11.x: the network is *strongly typed* (11 always is; 10 opts in
with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so the precision lives in the ONNX model
itself, never in builder flags or per-layer precisions (``BuilderFlag.FP16``, ``INT8``,
``OBEY_PRECISION_CONSTRAINTS`` and ``ILayer.precision`` were deprecated in 10.12 and removed in 11):

* fp32: the fp32 graph, with TF32 turned off (TensorRT enables it by default; it moves logits by
  up to ~5e-4, past the fp32 parity gate);
* fp16: the typed fp16 ONNX from :func:`cskd.export.onnx_export.convert_fp16` (LayerNorm, Softmax
  and the head stay fp32 as Cast nodes say);
* int8: the QDQ ONNX from :mod:`cskd.export.quantize` (explicit quantisation, symmetric int8).

A timing cache per TensorRT version and GPU makes rebuilds fast; a cache TensorRT refuses is
replaced by an empty one, and the cache is written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional

from cskd.errors import CSKDError
from cskd.files import atomic_write
from cskd.runtime.tensorrt import device_facts, require_cuda, require_tensorrt, trt


def preflight() -> Dict[str, Any]:
    """Fail in one line before any export work when TensorRT or a CUDA GPU is missing."""
    require_tensorrt()
    require_cuda()
    return device_facts()


def network_flags(version: str) -> int:
    """Strongly typed on every version: an opt-in flag on 10.x, the only mode (flag deprecated) on 11."""
    if int(version.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def timing_cache_path(folder: Path, facts: Dict[str, Any]) -> Path:
    """One cache file per TensorRT version and GPU: a cache from elsewhere is never shared."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "_", facts["gpu"])
    return folder / f"timing-{facts['tensorrt']}-{gpu}-sm{facts['compute_capability']}.cache"


def _attach_timing_cache(config: trt.IBuilderConfig, cache_file: Optional[Path]) -> None:
    blob = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # From another GPU or TensorRT version, or damaged: build cold rather than crash a good build.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(onnx_path: Path, engine_path: Path, precision: str, max_batch: int, channels: int, size: int,
                 cache_dir: Optional[Path] = None, workspace_gib: float = 4.0) -> Dict[str, Any]:
    """Parse ``onnx_path`` and serialise a TensorRT engine to ``engine_path``; returns the build facts
    (TensorRT version, GPU, compute capability) the engine is bound to."""
    facts = preflight()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt.__version__))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CSKDError(f"TensorRT cannot parse {onnx_path}: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if len(inputs) != 1:
        raise CSKDError(f"{onnx_path} has {len(inputs)} inputs; a cskd graph has one")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # exact fp32 maths: the fp32 gate allows 1e-4
    profile = builder.create_optimization_profile()
    shape = lambda n: trt.Dims([n, channels, size, size])  # noqa: E731
    profile.set_shape(inputs[0].name, shape(1), shape(max(1, max_batch // 2)), shape(max_batch))
    config.add_optimization_profile(profile)
    cache_file = timing_cache_path(cache_dir, facts) if cache_dir is not None else None
    _attach_timing_cache(config, cache_file)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CSKDError(f"TensorRT failed to build an engine from {onnx_path}; see the messages above")
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(host_bytes(serialized)))
    if cache_file is not None:
        timing = host_bytes(config.get_timing_cache().serialize())
        atomic_write(cache_file, lambda tmp: Path(tmp).write_bytes(timing))
    return facts


def host_bytes(memory: trt.IHostMemory) -> bytes:
    """The bytes of a TensorRT host buffer (a serialised engine or timing cache)."""
    return bytes(memory)  # type: ignore[call-overload]  # pybind11 exposes the buffer protocol; the stubs do not
