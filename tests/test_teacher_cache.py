"""The teacher cache: manifest and shards, top-k storage, resume after a kill, torchrun shards,
stale caches refused, and training that never runs the teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cskd.teachers
from cskd.assets import DEMO_TEACHER_CACHE, asset_path
from cskd.config import load_config
from cskd.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_dataset, fingerprint
from cskd.data.transfer import training_images
from cskd.data.transforms import eval_transform, normalize
from cskd.data.validation import validation_identity
from cskd.errors import CSKDError
from cskd.models import create_teacher
from cskd.run import RunDir
from cskd.teacher_cache import MISSING_LOGIT_GAP, CacheManifest, TeacherCache, compress, expand, index_dtype, shard_paths, write_cache
from cskd.teachers import build_teacher_targets, cache_teacher
from cskd.train import train
from tests.conftest import quick_overrides, write_imagefolder


@pytest.fixture
def build(micro_teacher):
    """``build(out, shard_size)``: cache the micro teacher over the embedded training split."""
    def run(out, shard_size=4096, **kwargs):
        cfg = load_config(None, ["data.workers=0", *micro_teacher])
        return cache_teacher(cfg, out, shard_size=shard_size, show_progress=False, **kwargs)
    return run


def test_manifest_and_shards_describe_the_teacher_and_data(tmp_path, build):
    manifest = build(tmp_path / "c", shard_size=3000)
    data = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert data["complete"] and data["grid"] == [4, 4] and data["num_classes"] == 10 and data["topk"] is None
    assert data["data"]["count"] == 10000 and len(data["teacher"]["sha256"]) == 64
    shards = [np.load(shard_paths(tmp_path / "c", s)[0]) for s in range(manifest.shards)]
    assert [len(s) for s in shards] == [3000, 3000, 3000, 1000] and shards[0].dtype == np.float16
    assert shards[0].shape[1:] == (10, 4, 4)


def test_the_cache_records_the_teachers_top1_on_the_validation_images(tmp_path, micro_teacher, capsys):
    write_imagefolder(tmp_path / "data", [(40, 30), (30, 48)], seed=1)
    for index in range(3):  # three more validation images per class: 40 in all
        write_imagefolder(tmp_path / "more", [(36, 36)], seed=index + 2)
        for image in (tmp_path / "more" / "val").glob("*/*.png"):
            image.rename(tmp_path / "data" / "val" / image.parent.name / f"{index}.png")
    cfg = load_config(None, ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", "data.channels=1", "data.workers=0",
                             *micro_teacher])
    cache_teacher(cfg, tmp_path / "c", show_progress=False)
    data = json.loads((tmp_path / "c" / "manifest.json").read_text())
    # by hand: the micro teacher over the 40 validation images (eval transform), normalised its own way
    # (its checkpoint's Fashion-MNIST statistics, not the folder's)
    checkpoint = micro_teacher[1].split("=", 1)[1]
    teacher = create_teacher("cskd_resnet_micro", 10, 1, checkpoint=checkpoint, output_stride=8).eval()
    validation, _ = build_dataset("imagefolder", "val", str(tmp_path / "data"), 1, eval_transform(32, 1))
    images, labels = torch.stack([x for x, _ in validation]), torch.tensor([y for _, y in validation])
    with torch.no_grad():
        logits = teacher(normalize(images, FASHION_MNIST_MEAN, FASHION_MNIST_STD))[1]
    top1 = 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)
    top5 = 100.0 * int((logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum()) / len(labels)
    assert data["teacher_val_top1"] == pytest.approx(top1, abs=1e-9) and data["teacher_val_top5"] == pytest.approx(top5, abs=1e-9)
    assert data["teacher_val_split"]["images"] == 40 and data["teacher_val_split"]["data"] == "imagefolder"
    assert f"teacher: cskd_resnet_micro {top1:.2f}% top-1 ({top5:.2f}% top-5) on the 40 validation images" in capsys.readouterr().out


def test_the_packaged_cache_holds_its_teachers_top1_on_the_demo_runs_validation_images():
    accuracy = CacheManifest.read(asset_path(DEMO_TEACHER_CACHE)).accuracy()
    cfg = load_config(None, [])
    # what a demo run validates on, so `cskd train` takes the figure from the cache (test_evaluate checks
    # it against the packaged teacher's weights)
    assert accuracy.holds_for(validation_identity(cfg.data, cfg.student.img_size))
    assert (accuracy.top1, accuracy.images) == (92.0, 2000)
    assert not accuracy.holds_for(validation_identity(load_config(None, ["data.max_val=128"]).data, cfg.student.img_size))


def test_topk_keeps_the_largest_logits_and_their_order():
    maps = torch.randn(6, 40, 3, 3)
    values, indices = compress(maps, topk=5)
    assert values.shape == (6, 5, 3, 3) and indices.dtype == np.int16
    full = expand(torch.from_numpy(values), torch.from_numpy(indices), 40)
    assert torch.equal(full.argmax(1), maps.argmax(1))
    kept = torch.zeros_like(maps, dtype=torch.bool).scatter_(1, torch.from_numpy(indices).long(), True)
    assert torch.allclose(full[kept], maps[kept].half().float())
    fifth = maps.topk(5, dim=1).values[:, -1:].half().float()
    assert torch.allclose(full.masked_fill(kept, float("inf")).amin(1, keepdim=True), fifth - MISSING_LOGIT_GAP)


def test_topk_indices_of_40000_classes_keep_their_classes_through_the_shards(tmp_path):
    """Above 32,768 classes int16 indices would wrap (scatter_ fails, or classes alias above 65,536):
    the cache stores int32 and reads back whichever type it finds."""
    maps = torch.randn(3, 40_000, 2, 2)
    maps[:, 39_999, 0, 0] += 100.0  # the top class of a cell is far above int16's range
    manifest = CacheManifest(teacher={"sha256": "x", "model": "fake"}, data={"count": 3, "fingerprint": "x"},
                             image_size=8, grid=(2, 2), num_classes=40_000, topk=5, shard_size=2)
    rows = [(torch.tensor(i), 0) for i in range(3)]  # each "image" is its row: the fake teacher looks its logits up
    write_cache(tmp_path, manifest, rows, lambda index: maps[index], workers=0, show_progress=False)
    manifest.complete = True
    manifest.write(tmp_path)
    full = TeacherCache(tmp_path).maps(torch.arange(3))
    assert torch.equal(full.argmax(1), maps.argmax(1)) and (full.argmax(1)[:, 0, 0] == 39_999).all()
    kept = torch.zeros_like(maps, dtype=torch.bool).scatter_(1, maps.topk(5, dim=1).indices, True)
    assert torch.allclose(full[kept], maps[kept].half().float())
    assert np.load(shard_paths(tmp_path, 0)[1]).dtype == np.int32


def test_the_index_type_follows_the_class_count():
    assert index_dtype(32_768) == np.int16 and index_dtype(32_769) == np.int32 and index_dtype(70_000) == np.int32
    with pytest.raises(CSKDError, match="at most 2147483648 classes, this teacher has 2147483649"):
        index_dtype(2**31 + 1)


def test_what_cannot_be_stored_is_refused_before_the_teacher_runs(tmp_path, monkeypatch, micro_teacher):
    monkeypatch.setattr(cskd.teachers, "load_teacher", lambda *a, **k: pytest.fail("the teacher ran"))
    cfg = load_config(None, ["data.workers=0", *micro_teacher])
    with pytest.raises(CSKDError, match="--topk 10 must be between 1 and 9"):
        cache_teacher(cfg, tmp_path / "c", topk=10, show_progress=False)


def test_a_random_interpolation_is_refused_before_the_teacher_runs(tmp_path, monkeypatch, micro_teacher):
    monkeypatch.setattr(cskd.teachers, "load_teacher", lambda *a, **k: pytest.fail("the teacher ran"))
    cfg = load_config(None, ["data.workers=0", "data.interpolation=random", *micro_teacher])
    with pytest.raises(CSKDError, match="needs one interpolation"):  # was a KeyError from the resize
        cache_teacher(cfg, tmp_path / "c", show_progress=False)


def test_an_interrupted_cache_resumes_with_the_missing_shards_only(tmp_path, monkeypatch, build):
    out = tmp_path / "c"
    real = cskd.teachers.write_cache
    calls = []

    def killed_after_two_shards(folder, manifest, dataset, teacher_fn, *args, **kwargs):
        def counting(images):
            calls.append(len(images))
            if len(calls) > 2 * (manifest.shard_size // 256):  # batches of 256
                raise KeyboardInterrupt
            return teacher_fn(images)
        return real(folder, manifest, dataset, counting, *args, **kwargs)

    monkeypatch.setattr(cskd.teachers, "write_cache", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        build(out, shard_size=2048)
    monkeypatch.undo()
    assert not CacheManifest.read(out).complete
    with pytest.raises(CSKDError, match="incomplete"):
        TeacherCache(out)
    done = [s for s in range(5) if shard_paths(out, s)[0].is_file()]
    assert done == [0, 1]
    before = shard_paths(out, 0)[0].stat().st_mtime_ns
    build(out, shard_size=2048)
    assert TeacherCache(out).manifest.complete and shard_paths(out, 0)[0].stat().st_mtime_ns == before
    reference = build(tmp_path / "ref", shard_size=2048)
    for s in range(reference.shards):
        assert np.array_equal(np.load(shard_paths(out, s)[0]), np.load(shard_paths(tmp_path / "ref", s)[0]))


def test_a_cache_of_another_teacher_or_data_is_refused(tmp_path, build):
    build(tmp_path / "c")
    cache = TeacherCache(tmp_path / "c")
    with pytest.raises(CSKDError, match=r"teacher_sha256 is .* the run needs 'abc'\); rebuild it with `cskd cache-teacher`"):
        cache.check_matches({"teacher_sha256": "abc"})
    with pytest.raises(CSKDError, match="image_size is 32, the run needs 64"):
        cache.check_matches({"image_size": 64})
    # a run on other data (a subset as its own training split would differ; here another data set)
    with pytest.raises(CSKDError, match="data_fingerprint"):
        cache.check_matches({"data_fingerprint": "0" * 64})


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory, micro_teacher):
    """The micro teacher's cache of a ten-image ImageFolder, and the overrides of the run it was made for."""
    root = tmp_path_factory.mktemp("folder")
    write_imagefolder(root / "data", [(40, 30), (30, 48)])
    overrides = ["data.name=imagefolder", f"data.path={root / 'data'}", "data.channels=1", "data.workers=0",
                 f"teacher.cache={root / 'cache'}", *micro_teacher]
    cache_teacher(load_config(None, overrides), root / "cache", show_progress=False)
    return overrides


def targets_for(overrides):
    cfg = load_config(None, overrides)
    train_set, info = build_dataset(cfg.data.name, "train", cfg.data.path, cfg.data.channels)
    return build_teacher_targets(cfg, info, train_set, torch.device("cpu"))


@pytest.mark.parametrize("override, field", [
    ("teacher.kwargs={output_stride: 16}", "teacher_kwargs"),  # another grid and other features
    ("teacher.mean=[0.5]", "teacher_mean"),
    ("teacher.std=[0.5]", "teacher_std"),
    ("data.interpolation=bilinear", "interpolation"),
    ("student.img_size=48", "image_size"),
    ("teacher.model=resnet10t", "teacher_model"),
])
def test_a_cache_of_another_teacher_set_up_is_refused(folder_cache, override, field):
    targets_for(folder_cache)  # the set-up it was made with is accepted
    with pytest.raises(CSKDError, match=rf"does not match this run \({field} is .+, the run needs .+\); "
                                        r"rebuild it with `cskd cache-teacher`"):
        targets_for([*folder_cache, override])


def test_an_imagefolder_image_rewritten_at_the_same_size_changes_the_fingerprint(tmp_path):
    write_imagefolder(tmp_path, [(8, 6)], classes=2, suffix="bmp")  # BMP: the file size depends on the size only
    dataset, _ = build_dataset("imagefolder", "train", str(tmp_path), 1)
    before, path = fingerprint(dataset), tmp_path / "train" / "c0" / "a.bmp"
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.new("L", (8, 6), 255).save(path)  # edited: other pixels, same dimensions
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a second later, whatever the file system's clock resolution
    assert path.stat().st_size == size and fingerprint(dataset) != before


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory, micro_teacher):
    """The micro teacher's cache of the embedded training split, made for quick_overrides' runs: its
    teacher figure is on their 128 validation images."""
    out = tmp_path_factory.mktemp("quick") / "c"
    cache_teacher(load_config(None, ["data.workers=0", "data.max_val=128", *micro_teacher]), out, show_progress=False)
    return out


@pytest.mark.slow
def test_training_from_the_cache_never_runs_the_teacher(tmp_path, monkeypatch, quick_cache, micro_teacher, capsys):
    monkeypatch.setattr(cskd.teachers, "load_teacher", lambda *a, **k: pytest.fail("the teacher ran"))
    cfg = load_config(None, [*quick_overrides(tmp_path, **{"teacher.cache": str(quick_cache)}), *micro_teacher])
    result = train(cfg, show_progress=False)
    assert result.final["loss_cskd"] > 0 and result.final["loss_deit"] > 0
    assert RunDir(tmp_path / "run").teacher_val_top1 == CacheManifest.read(quick_cache).teacher_val_top1
    assert "on the 128 validation images (from the teacher cache)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_validating_on_other_images_than_its_cache_measures_the_teacher_once(tmp_path, monkeypatch, quick_cache,
                                                                                   micro_teacher, capsys):
    loads = []
    real = cskd.teachers.load_teacher
    monkeypatch.setattr(cskd.teachers, "load_teacher", lambda *a, **k: loads.append(1) or real(*a, **k))
    overrides = quick_overrides(tmp_path, **{"teacher.cache": str(quick_cache), "data.max_val": 64})  # the cache's are 128
    train(load_config(None, [*overrides, *micro_teacher]), show_progress=False)
    assert len(loads) == 1  # one validation pass, never a training step
    accuracy = RunDir(tmp_path / "run").teacher_accuracy
    assert accuracy.images == 64 and accuracy.split != CacheManifest.read(quick_cache).teacher_val_split
    assert f"{accuracy.top1:.2f}% top-1 ({accuracy.top5:.2f}% top-5) on the 64 validation images (measured now)" in capsys.readouterr().out


@pytest.mark.slow
def test_training_refuses_a_stale_cache(tmp_path, build, micro_teacher):
    build(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["teacher"]["sha256"] = "f" * 64  # as if made by another teacher
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, [*quick_overrides(tmp_path, **{"teacher.cache": str(tmp_path / "c")}), *micro_teacher])
    with pytest.raises(CSKDError, match="does not match this run .*teacher_sha256"):
        train(cfg, show_progress=False)


@pytest.mark.slow
def test_torchrun_ranks_write_their_own_shards_and_match_one_process(tmp_path, build, micro_teacher):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531", "-m", "cskd",
         "cache-teacher", "--out", str(tmp_path / "ddp"), "--shard-size", "2500", "--no-progress", "data.workers=0", *micro_teacher],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = build(tmp_path / "one", shard_size=2500)
    assert TeacherCache(tmp_path / "ddp").manifest.complete
    for s in range(single.shards):
        a, b = np.load(shard_paths(tmp_path / "ddp", s)[0]), np.load(shard_paths(tmp_path / "one", s)[0])
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= 1e-2 * np.abs(b).max()


def test_a_run_with_a_transfer_set_refuses_a_cache_of_its_split_alone(tmp_path, micro_teacher):
    write_imagefolder(tmp_path / "data", [(32, 32)])
    write_imagefolder(tmp_path / "more", [(32, 32)], seed=1)  # its class folders are ignored: images only
    common = ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", "data.channels=1", "data.workers=0", *micro_teacher]
    cache_teacher(load_config(None, common), tmp_path / "split-only", show_progress=False)
    cfg = load_config(None, [*common, f"data.unlabeled={tmp_path / 'more'}", f"teacher.cache={tmp_path / 'split-only'}"])
    split = build_dataset("imagefolder", "train", str(tmp_path / "data"), 1)[0]
    with pytest.raises(CSKDError, match=r"data_fingerprint .*`cskd cache-teacher data.unlabeled=.*more`"):
        build_teacher_targets(cfg, build_dataset("imagefolder", "val", str(tmp_path / "data"), 1)[1],
                              training_images(split, cfg.data.unlabeled, 1), torch.device("cpu"))


def test_the_next_step_cache_teacher_prints_trains_on_the_data_it_cached(tmp_path, micro_teacher, capsys, monkeypatch):
    """It printed `cskd train teacher.cache=OUT --config C`: without the overrides (data.path, the teacher), that
    command trains on the demo's data and the cache no longer matches."""
    import shlex

    from cskd.cli import main, parse_args

    write_imagefolder(tmp_path / "data", [(32, 32)])
    given = ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", "data.channels=1", "data.workers=0", *micro_teacher]
    assert main(["cache-teacher", "--no-progress", "--out", str(tmp_path / "c"), *given]) == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: "))
    args = parse_args(shlex.split(hint.removeprefix("next: cskd ")))
    cfg = load_config(args.config, args.overrides)
    assert args.command == "train" and cfg.teacher.cache == str(tmp_path / "c")
    assert cfg.data.path == str(tmp_path / "data") and cfg.data.name == "imagefolder" and cfg.teacher.checkpoint
