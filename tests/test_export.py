"""cskd.export: fused ONNX against PyTorch, precisions, uint8 input, the parity gate, the package."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cskd.errors import CSKDError
from cskd.export.exporter import ExportOptions, export_model
from cskd.models import DeployModule
from cskd.run import resolve_teacher_reference
from cskd.runtime.package import read_package
from cskd.runtime.preprocess import to_engine_input
from cskd.tasks import load_trained
from tests.conftest import val_images


def export(source, out, **kwargs):
    return export_model(source, ExportOptions(out=out, parity_images=200, calib_images=256, **kwargs), log=lambda _: None)


@pytest.fixture(scope="module")
def fp32_package(trained_run, tmp_path_factory):
    return export(trained_run, tmp_path_factory.mktemp("pkg") / "fp32")


def torch_logits(run, images: np.ndarray, uint8: bool = False) -> np.ndarray:
    trained = load_trained(run)
    spec = trained.spec
    module = DeployModule(trained.deployable(), spec.mean, spec.std, uint8, probabilities=False).eval()
    feed = to_engine_input(images, "uint8" if uint8 else "float32", spec.mean, spec.std)
    with torch.inference_mode():
        return module(torch.from_numpy(feed)).numpy()


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_fused_onnx_equals_pytorch_at_several_batch_sizes(trained_run, fp32_package, batch):
    out, package = fp32_package
    images, _ = val_images(batch)
    feed = to_engine_input(images, "float32", package.input.mean, package.input.std)
    reference = torch_logits(trained_run, images)
    for name in ("model.onnx", "model.optimized.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"input": feed})[0]
        assert logits.shape == (batch, 10)
        assert np.abs(logits - reference).max() < 1e-4


def test_onnx_graph_is_opset_17_checked_and_annotated(fp32_package):
    out, _ = fp32_package
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["cskd.spec"])["model"] == "cskd_deit_nano_distilled_patch4_32"
    assert json.loads(meta["cskd.fused"]) is True
    heads = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(heads) == 1  # one fused head


def test_model_json_round_trip_and_contents(trained_run, fp32_package):
    out, package = fp32_package
    assert read_package(out) == package
    data = json.loads((out / "model.json").read_text())
    assert data["fused"] is True and data["precision"] == "fp32" and data["classes"][9] == "Ankle boot"
    assert data["input"]["size"] == 32 and data["input"]["channels"] == 1 and data["input"]["layout"] == "NCHW"
    assert data["parity"]["agreement"] == 100.0 and data["parity"]["max_abs_diff"] < 1e-4
    assert data["gate"]["passed"] is True
    assert len(data["source"]["sha256"]) == 64 and data["toolkit"]["cskd"]


def test_uint8_input_graph_equals_the_float_graph(trained_run, fp32_package, tmp_path):
    out8, package8 = export(trained_run, tmp_path / "u8", input_kind="uint8")
    assert package8.input.dtype == "uint8"
    images, _ = val_images(9)
    float_out, package = fp32_package
    float_logits = ort.InferenceSession(str(float_out / "model.onnx")).run(
        ["logits"], {"input": to_engine_input(images, "float32", package.input.mean, package.input.std)})[0]
    u8_logits = ort.InferenceSession(str(out8 / "model.onnx")).run(["logits"], {"input": images})[0]
    assert np.abs(u8_logits - float_logits).max() < 1e-4


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_agrees_with_fp32_on_real_images(trained_run, tmp_path, precision):
    out, package = export(trained_run, tmp_path / precision, precision=precision)
    images, labels = val_images(400)
    reference = torch_logits(trained_run, images)
    engine = ort.InferenceSession(str(out / "model.onnx")).run(
        ["logits"], {"input": to_engine_input(images, "float32", package.input.mean, package.input.std)})[0]
    agreement = 100 * (engine.argmax(1) == reference.argmax(1)).mean()
    assert agreement >= 99.0
    drop = 100 * ((reference.argmax(1) == labels).mean() - (engine.argmax(1) == labels).mean())
    assert drop <= 0.5 + 1e-9
    if precision == "int8":
        ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_teacher_exports_in_the_same_package_format(trained_run, tmp_path):
    out, package = export(trained_run, tmp_path / "teacher", teacher=True, probabilities=True)
    assert package.role == "teacher" and package.fused is False and package.outputs == ["logits", "probabilities"]
    assert package.source["sha256"] and package.source["checkpoint"] == str(resolve_teacher_reference("demo").resolve())
    assert package.parity["agreement"] == 100.0
    probs = ort.InferenceSession(str(out / "model.onnx")).run(["probabilities"], {
        "input": to_engine_input(val_images(4)[0], "float32", package.input.mean, package.input.std)})[0]
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def _perturb_head_after_fusion(monkeypatch, scale: float) -> None:
    """Build the engine from weights perturbed after fusion; the PyTorch reference keeps the true ones."""
    from cskd.export import onnx_export

    real_export = onnx_export.export_fp32

    def perturbed(module, path, example, outputs, meta):
        module = copy.deepcopy(module)
        with torch.no_grad():
            module.model.head.weight.add_(scale * torch.randn_like(module.model.head.weight))
        return real_export(module, path, example, outputs, meta)

    monkeypatch.setattr(onnx_export, "export_fp32", perturbed)


@pytest.mark.parametrize("plain", [False, True], ids=["cskd-checkpoint-outside-a-run", "plain-state-dict"])
def test_a_runs_teacher_is_gated_and_calibrated_on_the_runs_own_data(tmp_path, plain):
    """A student run on an image folder (10 training, 10 validation images) whose teacher.checkpoint is
    a file of no run directory: the teacher's package is checked and calibrated on the run's images,
    not on the embedded demo's 2,000 / 10,000 (nor refused, for a plain state dict)."""
    from safetensors.torch import save_file

    from cskd.checkpoint import ModelSpec, save_weights
    from cskd.config import load_config, save_config
    from cskd.models import create_teacher
    from tests.conftest import write_imagefolder

    write_imagefolder(tmp_path / "data", [(32, 32)])
    torch.manual_seed(0)
    weights = create_teacher("cskd_resnet_micro", 10, 1, output_stride=8).model.state_dict()
    spec = ModelSpec("teacher", "cskd_resnet_micro", 10, 1, 32, kwargs={"output_stride": 8}, mean=(0.5,), std=(0.5,),
                     class_names=[f"c{i}" for i in range(10)])
    if plain:
        save_file(weights, tmp_path / "teacher.safetensors")
    else:
        save_weights(tmp_path / "teacher.safetensors", weights, spec)
    run = tmp_path / "student"
    run.mkdir()  # --teacher reads only the run's config
    save_config(load_config(None, ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", "data.channels=1",
                                   "teacher.model=cskd_resnet_micro", f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
                                   "teacher.kwargs={output_stride: 8}", "teacher.cache=null"]), run / "config.yaml")
    said = []
    out, package = export_model(run, ExportOptions(out=tmp_path / "teacher-int8", teacher=True, precision="int8", gate=False,
                                                   parity_images=200, tuning_images=0), log=said.append)
    assert package.classes == [f"c{i}" for i in range(10)] and package.parity["images"] == 10
    assert any("the training split has 10 images" in line for line in said), said


def test_gate_refuses_a_sabotaged_model_and_writes_nothing(trained_run, tmp_path, monkeypatch):
    _perturb_head_after_fusion(monkeypatch, 0.5)
    with pytest.raises(CSKDError, match="parity gate failed"):
        export(trained_run, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []  # neither the package nor its staging folder


def test_no_gate_keeps_a_failing_package_with_a_warning(trained_run, tmp_path, monkeypatch):
    _perturb_head_after_fusion(monkeypatch, 0.5)
    out, package = export(trained_run, tmp_path / "kept", gate=False)
    data = json.loads((out / "model.json").read_text())
    assert data["gate"]["passed"] is False and "--no-gate" in data["gate"]["warning"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "tflite"}, "unknown export format 'tflite'"),
        ({"precision": "int4"}, "--precision int4 is not available for --format onnx"),
        ({"input_kind": "rgb"}, "--input rgb is not one of float, uint8"),
    ],
)
def test_bad_format_or_precision_is_refused(trained_run, tmp_path, kwargs, message):
    with pytest.raises(CSKDError, match=message):
        export(trained_run, tmp_path / "x", **kwargs)


def test_run_without_checkpoint_and_unwritable_output(tmp_path, trained_run):
    with pytest.raises(CSKDError, match="holds no best.safetensors"):
        export(tmp_path, tmp_path / "x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CSKDError, match="choose a writable --out"):
        export(trained_run, blocker / "pkg")


def test_existing_package_needs_force(trained_run, fp32_package):
    out, _ = fp32_package
    with pytest.raises(CSKDError, match="pass --force"):
        export(trained_run, out)


@pytest.mark.parametrize("input_kind, probabilities", [("float", False), ("uint8", True)])
def test_triton_repository_config_matches_the_onnx_graph(trained_run, tmp_path, input_kind, probabilities):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    model_dir, package = export(trained_run, tmp_path / "repo", format="triton", input_kind=input_kind,
                                probabilities=probabilities, max_batch=16)
    assert model_dir.parent == tmp_path / "repo" and model_dir.name == package.name
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())  # Triton's own schema
    assert config.name == model_dir.name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    engine = model_dir / "1" / config.default_model_filename
    graph = onnx.load(str(engine)).graph
    onnx_types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.UINT8: "TYPE_UINT8"}

    def described(value_info):  # name, Triton type, dims without the batch axis
        tensor = value_info.type.tensor_type
        return value_info.name, onnx_types[tensor.elem_type], [d.dim_value for d in tensor.shape.dim][1:]

    assert [described(v) for v in graph.input] == [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.input]
    assert [described(v) for v in graph.output] == [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.output]
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim][0] == "batch"  # dynamic: Triton batches it
    assert config.HasField("dynamic_batching") and config.instance_group[0].count == 1
    assert read_package(model_dir).engine == "1/model.onnx" and package.gate["passed"]


def test_fp16_graph_keeps_the_head_and_logits_in_fp32(trained_run, tmp_path):
    out, _ = export(trained_run, tmp_path / "fp16", precision="fp16", probabilities=True)
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)  # topologically sorted, as TensorRT's parser needs
    producer = {o: n for n in model.graph.node for o in n.output}
    head = producer[producer["logits"].input[0]] if producer["logits"].op_type == "Identity" else producer["logits"]
    assert head.op_type == "Gemm"  # logits come straight from the fp32 head, not through an fp16 Cast
    assert not any(n.op_type == "Cast" and n.output[0] in ("logits", "probabilities") for n in model.graph.node)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    images, _ = val_images(8)
    logits = session.run(["logits"], {"input": to_engine_input(images, "float32", [0.286], [0.353])})[0]
    assert (logits.astype(np.float16).astype(np.float32) != logits).any()  # not rounded through fp16


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_every_backend_gives_pytorchs_top1_on_the_gate_images(trained_run, tmp_path, backend):
    pytest.importorskip("openvino") if backend == "openvino" else None
    from cskd.runtime.backends import create_backend

    out, package = export(trained_run, tmp_path / backend, backend=backend)
    assert package.backend == backend and package.parity["backend"] == backend
    assert package.parity["agreement"] == 100.0 and package.parity["max_abs_diff"] < 1e-4  # fp32: the same top-1
    engine, _ = create_backend(out)  # serving and benchmarks take the gated backend by default
    assert engine.name == backend
    images, _ = val_images(16)
    feed = to_engine_input(images, "float32", package.input.mean, package.input.std)
    assert np.array_equal(engine.infer(feed).argmax(1), torch_logits(trained_run, images).argmax(1))


def test_an_unknown_backend_is_refused_before_any_work(trained_run, tmp_path):
    with pytest.raises(CSKDError, match="--backend onnxrt is not one of"):
        export(trained_run, tmp_path / "x", backend="onnxrt")
    assert not (tmp_path / "x").exists()
