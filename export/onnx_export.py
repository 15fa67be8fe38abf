"""ONNX export: the fused graph at opset 17, checked, annotated, optimised, and in fp16 or int8.

* fp32: ``torch.onnx.export`` with a dynamic batch axis, ``onnx.checker``, cskd metadata in
  ``metadata_props``; onnxruntime's transformer optimiser (ViT) or its graph optimiser (CNN)
  writes the optimised file that CPU serving loads.
* fp16: onnxruntime's converter with LayerNormalization, Softmax and the final head kept in fp32
  (fp16 LayerNorm and the last matmul are the usual sources of ViT fp16 accuracy collapse).
* int8: onnxruntime static quantisation, QDQ format, per-channel weights, percentile-calibrated
  on training images; weight-bearing MatMul/Gemm/Conv only (LayerNorm, Softmax, attention's
  activation matmuls, the first convolution and the final head stay in float).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

OPSET = 17


def export_fp32(module, path: Path, example, output_names: List[str], metadata: Dict[str, str]) -> None:
    import onnx
    import torch

    axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript tracer's notes on shape-dependent Python code
        torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=output_names,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    set_metadata(model, metadata)
    onnx.save(model, str(path))


def set_metadata(model, metadata: Dict[str, str]) -> None:
    import onnx

    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})


def set_metadata_file(path: Path, metadata: Dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    set_metadata(model, metadata)
    onnx.save(model, str(path))


def optimize(src: Path, dst: Path, role: str, num_heads: int = 0, hidden_size: int = 0) -> None:
    """Write onnxruntime's optimised graph of ``src`` to ``dst`` (portable: no hardware-specific ops)."""
    import onnxruntime as ort

    if role == "student":
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(src), model_type="vit", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=1, use_gpu=False)
        optimized.save_model_to_file(str(dst))
        return
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def last_gemm(model) -> Optional[str]:
    """The name of the graph's final Gemm/MatMul node (the fused head)."""
    names = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return names[-1] if names else None


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = [name for name in [last_gemm(model)] if name]
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf"],
        node_block_list=keep,
    )
    onnx.save(converted, str(dst))


class _Calibration:
    """onnxruntime CalibrationDataReader over batches of real images."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}

    def rewind(self) -> None:  # some onnxruntime versions call it; one pass is all we need
        pass


def activation_matmuls(model) -> List[str]:
    """MatMul nodes whose inputs are both activations (attention's QK^T and AV): no weights."""
    constants = {i.name for i in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def quantize_int8(src: Path, dst: Path, calibration: List[np.ndarray]) -> None:
    """Static QDQ int8 of the weight-bearing layers; the first convolution and the head stay float.

    On the demo student, quantising every MatMul/Gemm/Conv with MinMax calibration agreed with fp32
    on 99.0% of validation images and ran 1.17x faster at batch 8; percentile calibration with the
    patch embedding, the head and attention's activation-by-activation matmuls kept in float agreed
    on 99.9% and ran 1.39x faster (quantising both operands at run time costs more than it saves).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(dst.stem + ".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=False)
    try:
        model = onnx.load(str(prepared))
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        keep_float = convs[:1] + [name for name in [last_gemm(model)] if name] + activation_matmuls(model)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            quantize_static(
                str(prepared), str(dst), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_exclude=keep_float,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"ActivationSymmetric": True, "CalibPercentile": 99.99},
            )
    finally:
        prepared.unlink(missing_ok=True)


def metadata_for(spec_json: str, extra: Dict[str, object]) -> Dict[str, str]:
    return {"cskd.spec": spec_json, **{f"cskd.{k}": json.dumps(v) for k, v in extra.items()}}
