"""int8 chosen by accuracy: a model the recipe cannot quantise is rescued by keeping its most
sensitive node in float, the choice is recorded, and what is hopeless is refused with the figures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cskd.errors import CSKDError
from cskd.export import onnx_export
from cskd.export.quantize import Tuning, quantize_int8
from cskd.models import DeployModule
from cskd.runtime.preprocess import to_engine_input
from cskd.tasks import load_trained
from tests.conftest import val_images

QKV = "/model/blocks/blocks.0/attn/qkv/MatMul"


@pytest.fixture(scope="module")
def outlier_model(trained_run, tmp_path_factory):
    """The trained student with ONE activation channel 1000x larger (LayerNorm gain x1000, the next
    weight row /1000): the same function, but one per-tensor int8 scale cannot cover that channel and
    the others together, so quantising the qkv matmul's input destroys it."""
    trained = load_trained(trained_run)
    spec = trained.spec
    module = DeployModule(trained.deployable(), spec.mean, spec.std, False, False).eval()
    folder = tmp_path_factory.mktemp("quant")
    onnx_export.export_fp32(module, folder / "fp32.onnx", torch.randn(2, 1, 32, 32), ["logits"], {})
    model = onnx.load(str(folder / "fp32.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    qkv = next(n for n in model.graph.node if n.name == QKV)

    def scale(name: str, factor: float, row: int = None) -> None:
        array = numpy_helper.to_array(inits[name]).copy()
        if row is None:
            array[3] *= factor
        else:
            array[row] *= factor
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    scale("model.trunk.blocks.0.norm1.weight", 1000.0)
    scale("model.trunk.blocks.0.norm1.bias", 1000.0)
    scale(qkv.input[1], 1e-3, row=3)
    onnx.save(model, str(folder / "outlier.onnx"))
    images, labels = val_images(1000)  # 800 tuning images: 99.8% agreement leaves room for a flip
    inputs = to_engine_input(images, "float32", spec.mean, spec.std)
    with torch.inference_mode():
        reference = module(torch.from_numpy(inputs)).numpy()
    calibration = [inputs[i : i + 32] for i in range(0, 256, 32)]
    tuning = Tuning(inputs[200:], reference[200:], labels[200:])
    return folder, calibration, tuning


def agreement(model: Path, tuning: Tuning) -> float:
    import onnxruntime as ort

    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["logits"], {"input": tuning.inputs})[0]
    return 100.0 * float((logits.argmax(1) == tuning.reference.argmax(1)).mean())


def test_the_outlier_model_is_the_same_function(outlier_model):
    folder, _, tuning = outlier_model
    assert agreement(folder / "outlier.onnx", tuning) == 100.0


def test_a_model_the_recipe_cannot_quantise_is_rescued_by_the_fallback(outlier_model, tmp_path):
    folder, calibration, tuning = outlier_model
    # The rescue, not the bar, is under test: the 3-epoch fixture's small margins let int8 noise alone flip
    # about 1% of its answers once the outlier is in float (99.1% seen), short of the default 99.8%.
    tuning = replace(tuning, min_agreement=99.0)
    facts = quantize_int8(folder / "outlier.onnx", tmp_path / "int8.onnx", calibration, tuning, log=lambda _: None)
    first = facts["attempts"][0]
    assert not first["passed"] and first["agreement"] < tuning.min_agreement  # the recipe alone fails
    last = facts["attempts"][-1]
    assert last["passed"] and last["kept_float"] >= 1 and QKV in facts["kept_float"]
    assert agreement(tmp_path / "int8.onnx", tuning) == pytest.approx(last["agreement"])
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node)  # still int8


def test_an_unreachable_target_is_refused_with_every_attempts_figures(outlier_model, tmp_path):
    folder, calibration, tuning = outlier_model
    impossible = Tuning(tuning.inputs, tuning.reference, (tuning.labels + 1) % 10, min_agreement=100.1)
    with pytest.raises(CSKDError, match="cannot reach 100.1% agreement .*percentile-99.99 \\+0 float.*export --precision fp16"):
        quantize_int8(folder / "outlier.onnx", tmp_path / "x.onnx", calibration, impossible, log=lambda _: None)
    assert not (tmp_path / "x.onnx").exists()


def test_without_tuning_images_the_recipe_is_used_as_it_is(outlier_model, tmp_path):
    folder, calibration, _ = outlier_model
    facts = quantize_int8(folder / "fp32.onnx", tmp_path / "int8.onnx", calibration, None, log=lambda _: None)
    assert facts["calibration"] == "percentile-99.99" and facts["attempts"] == []
    assert np.isfinite(agreement(tmp_path / "int8.onnx", outlier_model[2]))


class Numbered(torch.utils.data.Dataset):
    """Image i carries i in its two pixels (and as its label), so a sample names its images."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return torch.tensor([[[i % 256, i // 256]]], dtype=torch.float32) / 255, i


def int8_image_indices(monkeypatch, tmp_path, split_size: int, calib: int, tuning: int, log) -> tuple:
    """The training images (by index) the exporter calibrates int8 on and tunes it on, for a split of ``split_size``."""
    from types import SimpleNamespace

    from cskd.checkpoint import ModelSpec
    from cskd.export import exporter

    monkeypatch.setattr("cskd.evaluate.build_dataset",
                        lambda *args, **kwargs: (Numbered(split_size), SimpleNamespace(num_classes=10)))
    trained = SimpleNamespace(path=tmp_path / "student.safetensors", spec=ModelSpec("student", "any", 10, 1, 2), heads=("cls",))
    options = exporter.ExportOptions(precision="int8", calib_images=calib, tuning_images=tuning)
    feed = lambda u8: u8.astype(np.float32)  # noqa: E731
    context = exporter._build_context(tmp_path, lambda x: torch.zeros(len(x), 10), trained, None, options, np.zeros((2, 1, 1, 2)),
                                      feed, tmp_path, log)
    index = lambda batch: (batch[:, 0, 0, 0] + 256 * batch[:, 0, 0, 1]).astype(int).tolist()  # noqa: E731
    calibrated = [i for batch in context.calibration() for i in index(batch)]  # first, as the exporter does
    return calibrated, index(context.tuning().inputs) if tuning else []  # it tunes only when asked to


@pytest.mark.parametrize("split_size", [700, 1_300, 10_000])
def test_int8_tuning_images_are_never_calibration_images(monkeypatch, tmp_path, split_size):
    logged = []
    calibrated, tuned = int8_image_indices(monkeypatch, tmp_path, split_size, 512, 1_000, logged.append)
    assert len(set(calibrated)) == 512 and set(calibrated).isdisjoint(tuned)
    assert len(set(tuned)) == min(1_000, split_size - 512)  # a small split: tuning gets what calibration left...
    assert bool(logged) == (split_size < 1_512)  # ...and says so
    if logged:
        assert f"has {split_size} images; tuning on the {split_size - 512} the calibration left, not 1000" in logged[0]
    assert len({i * 10 // split_size for i in calibrated}) == 10  # spread over the whole split, not its start


@pytest.mark.parametrize("split_size, calibrated_count", [(500, 224), (301, 128), (5_000, 512), (40, 20)])
def test_by_default_a_small_split_is_halved_between_calibration_and_tuning(monkeypatch, tmp_path, split_size, calibrated_count):
    """A fine-tuning set of a few hundred images: without --calib-images, half calibrates (in whole
    batches of 32, what onnxruntime's calibrator can stack) and the rest tunes, as the log says; a
    large split keeps 512 and 1,000."""
    logged = []
    calibrated, tuned = int8_image_indices(monkeypatch, tmp_path, split_size, None, 1_000, logged.append)
    assert len(set(calibrated)) == calibrated_count and set(calibrated).isdisjoint(tuned)
    assert len(set(tuned)) == min(1_000, split_size - calibrated_count)
    if split_size < 1_024:
        rest = split_size - calibrated_count
        assert f"has {split_size} images: calibrating on {calibrated_count}, tuning on {rest} others" in logged[0]


def test_an_explicit_calibration_count_is_cut_to_whole_batches_and_says_so(monkeypatch, tmp_path):
    logged = []
    calibrated, tuned = int8_image_indices(monkeypatch, tmp_path, 10_000, 100, 1_000, logged.append)
    assert len(set(calibrated)) == 96 and set(calibrated).isdisjoint(tuned) and len(tuned) == 1_000
    assert logged == ["int8: calibrating on 96 images, whole batches of 32 (--calib-images 100)"]
    calibrated, _ = int8_image_indices(monkeypatch, tmp_path, 300, 512, 0, print)  # only calibration: the split, cut
    assert len(set(calibrated)) == 288


def test_a_split_calibration_takes_whole_is_refused_with_the_fix(monkeypatch, tmp_path):
    with pytest.raises(CSKDError, match=r"300 images, all taken by calibration \(--calib-images 512\).*--tuning-images 0"):
        int8_image_indices(monkeypatch, tmp_path, 300, 512, 1_000, print)


@pytest.mark.parametrize("flag, kwargs", [
    ("--calib-images 0", {"calib_images": 0}),
    ("--calib-images -5", {"calib_images": -5}),
    ("--parity-images 0", {"parity_images": 0}),
    ("--tuning-images -1", {"tuning_images": -1}),
    ("--max-batch 0", {"max_batch": 0}),
])
def test_an_image_count_below_its_least_is_refused_with_the_fix_before_any_work(tmp_path, flag, kwargs):
    from cskd.export import exporter

    name = flag.split()[0]
    least = 0 if name == "--tuning-images" else 1
    default = getattr(exporter.ExportOptions(), next(iter(kwargs)))
    fix = rf"omit {name} \(the default\)" if default is None else rf"pass {name} {default} \(the default\)"
    with pytest.raises(CSKDError, match=rf"^{flag} is below {least}: .*; {fix}"):
        exporter.export_model(tmp_path / "no-run", exporter.ExportOptions(precision="int8", out=tmp_path / "x", **kwargs))
    assert not (tmp_path / "x").exists()
