"""ONNX export: the fused graph at opset 17, checked, annotated, optimised, and in fp16 or int8.

* fp32: ``torch.onnx.export`` with a dynamic batch axis, ``onnx.checker``, cskd metadata in
  ``metadata_props``; onnxruntime's transformer optimiser (ViT) or its graph optimiser (CNN)
  writes the optimised file that CPU serving loads.
* fp16: onnxruntime's converter with LayerNormalization, Softmax and the final head kept in fp32
  (fp16 LayerNorm and the last matmul are the usual sources of ViT fp16 accuracy collapse).
* int8: see :mod:`cskd.export.quantize`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import onnx
import onnxruntime as ort
import torch

OPSET = 17


def export_fp32(module, path: Path, example, output_names: List[str], metadata: Dict[str, str]) -> None:
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
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})


def set_metadata_file(path: Path, metadata: Dict[str, str]) -> None:
    model = onnx.load(str(path))
    set_metadata(model, metadata)
    onnx.save(model, str(path))


def transformer_dims(module) -> Optional[Tuple[int, int]]:
    """``(num_heads, hidden_size)`` of a ViT inside ``module`` (a DeployModule), or None for a CNN."""
    trunk = getattr(getattr(module, "model", module), "trunk", None)
    blocks = getattr(trunk, "blocks", None)
    if not blocks:
        return None
    return int(blocks[0].attn.num_heads), int(trunk.embed_dim)


def optimize(src: Path, dst: Path, dims: Optional[Tuple[int, int]]) -> None:
    """Write onnxruntime's optimised graph of ``src`` to ``dst`` (portable: no hardware-specific ops):
    the transformer optimiser for a ViT (``dims`` = heads, width), the graph optimiser for a CNN."""
    if dims is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        num_heads, hidden_size = dims

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


FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf"]


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations, with normalisation, softmax and the head kept in fp32.

    The result is a *typed* graph (Cast nodes mark every precision change), which is also what a
    strongly typed TensorRT network builds from.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = [name for name in [last_gemm(model)] if name]
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=keep)
    onnx.save(drop_cast_round_trips(converted), str(dst))


def drop_cast_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Cast(fp32) <- Cast(fp16) <- fp32 value`` by an Identity, and sort the nodes.

    The converter inserts such pairs after fp32 nodes (the head) that feed fp32 graph outputs, which
    rounds the logits through fp16; and it appends its input casts after the nodes that read them,
    which ONNX forbids and TensorRT's parser refuses.
    """
    model = topologically_sorted(model)
    typed = onnx.shape_inference.infer_shapes(model)
    elem_type = {v.name: v.type.tensor_type.elem_type for v in list(typed.graph.value_info) + list(typed.graph.input)
                 + list(typed.graph.output)}
    elem_type.update({t.name: t.data_type for t in model.graph.initializer})
    producer = {out: n for n in model.graph.node for out in n.output}

    def cast_to(node, dtype: int) -> bool:
        return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)

    for index, node in enumerate(list(model.graph.node)):
        first = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if cast_to(node, onnx.TensorProto.FLOAT) and cast_to(first, onnx.TensorProto.FLOAT16) \
                and elem_type.get(first.input[0]) == onnx.TensorProto.FLOAT:
            identity = onnx.helper.make_node("Identity", [first.input[0]], list(node.output), name=node.name + "_fp32")
            model.graph.node.remove(node)
            model.graph.node.insert(index, identity)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in [n for n in model.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]:
        model.graph.node.remove(node)  # the fp16 casts nothing reads any more
    return model


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's nodes in an order where every input is produced before it is read (stable)."""
    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"the graph has a cycle or an undefined input near node {pending[0].name!r}")
        for n in ready:
            available.update(n.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def metadata_for(spec_json: str, extra: Dict[str, object]) -> Dict[str, str]:
    return {"cskd.spec": spec_json, **{f"cskd.{k}": json.dumps(v) for k, v in extra.items()}}
