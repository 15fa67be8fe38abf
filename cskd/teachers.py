"""The teacher a student run distils from: run online on every batch, or read from a cache.

Both give ``(dense [N,K,H,W], global [N,K])`` logits for a batch of augmented images. The cached
teacher never runs: each image's stored map (the teacher on the whole image, squashed to a square,
so that map and crop box share the whole image's coordinates) follows the image's augmentation
instead:

* random-resized crop, horizontal flip and an invariance recipe's rotation, scaling and translation
  (:mod:`cskd.data.invariance`): one affine sampling map (:mod:`cskd.data.geometry`), sampled the
  way ``torchvision.ops.roi_align`` samples a box (aligned, adaptive: an identity box reproduces the
  map exactly, a 2:1 box averages cells, a box reproduces roi_align's output);
* mixup: the maps are mixed with the same weight; CutMix: the box's cells are pasted, a partly
  covered cell blended by the share of it the box covers;
* global logits: the mean of the aligned map (exact for pool + linear heads: G_T = mean_cells D_T).

The approximation: augmentations that move pixels without recording it (RandAugment's rotations,
shears and translations, random erasing) are not followed; the target is the teacher's view of the
un-rotated, un-erased crop; with them on, a cached run trades that mismatch for never running the
teacher (see the README). Tone changes (an invariance recipe's) leave the target the clean image's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from cskd.checkpoint import ModelSpec, read_spec, read_state_dict, resolve_checkpoint
from cskd.config import Config
from cskd.data import geometry
from cskd.data.datasets import DatasetInfo, build_dataset, fingerprint
from cskd.data.mixing import MixRecord
from cskd.data.transfer import left_out_line, training_images
from cskd.data.transforms import normalize, whole_image_transform
from cskd.data.validation import TeacherAccuracy, validation_identity, validation_set
from cskd.distributed import DistEnv, barrier, init_distributed, shard, shutdown
from cskd.engine import Normalization, evaluate
from cskd.errors import CSKDError
from cskd.files import file_sha256
from cskd.models import DenseTeacher, create_teacher
from cskd.progress import progress
from cskd.run import resolve_cache_reference, resolve_teacher_reference
from cskd.tasks import Trained, get_task, load_trained
from cskd.teacher_cache import CacheManifest, TeacherCache, mismatches, missing_shards, storage_topk, write_cache

TeacherOutputs = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class LoadedTeacher:
    """The frozen teacher of a config, with what identifies it."""

    name: str  # timm model name
    model: DenseTeacher
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    checkpoint: Path
    kwargs: Dict[str, Any]

    def __call__(self, images: torch.Tensor) -> TeacherOutputs:
        """``images`` in [0, 1]: normalised the teacher's own way, then ``(dense, global)``."""
        with torch.no_grad():
            dense, global_logits = self.model(normalize(images, self.mean, self.std))
        return dense.float(), global_logits.float()

    def identity(self) -> Dict[str, Any]:
        return {"model": self.name, "checkpoint": str(self.checkpoint.resolve()), "sha256": file_sha256(self.checkpoint),
                "kwargs": self.kwargs, "mean": list(self.mean), "std": list(self.std)}


def teacher_kwargs(cfg: Config, info: DatasetInfo) -> Tuple[Path, Optional[ModelSpec], Dict[str, Any]]:
    """The teacher checkpoint of ``cfg``, its spec (None for a plain state dict) and its timm options."""
    path = resolve_checkpoint(resolve_teacher_reference(cfg.teacher.checkpoint))
    spec = read_spec(path)
    if spec is not None:
        _check_compatible(spec, info, path)
    return path, spec, {**(spec.kwargs if spec else {}), **cfg.teacher.kwargs}


def teacher_network(cfg: Config, info: DatasetInfo) -> torch.nn.Module:
    """The teacher's deployable CNN with random weights: what its cost is measured on."""
    _, _, kwargs = teacher_kwargs(cfg, info)
    return create_teacher(cfg.teacher.model, info.num_classes, info.channels, **kwargs).model


def load_teacher(cfg: Config, info: DatasetInfo, device: torch.device) -> LoadedTeacher:
    """The teacher ``cfg`` names, its timm options and normalisation taken from its checkpoint."""
    path, spec, kwargs = teacher_kwargs(cfg, info)
    mean, std = teacher_normalization(cfg, spec, info)
    model = create_teacher(cfg.teacher.model, info.num_classes, info.channels, checkpoint=path, **kwargs)
    return LoadedTeacher(cfg.teacher.model, model.to(device), mean, std, path, kwargs)


def trained_teacher(cfg: Config) -> Trained:
    """The teacher a student run's ``cfg`` distilled from, as a trained network to evaluate or export:
    its cskd checkpoint, or a plain state dict built as the run built it (``teacher.model`` and its
    options, the run's classes and channels, the run's input size, the teacher's normalisation)."""
    _, info = build_dataset(cfg.data.name, "val", cfg.data.path, cfg.data.channels)
    path, spec, kwargs = teacher_kwargs(cfg, info)
    if spec is not None:
        return load_trained(path)
    task = get_task("teacher")
    spec = task.spec(cfg, info)  # with the config's mean and std, else the data's: teacher_normalization's rule
    spec.kwargs = kwargs
    return Trained(task.load(spec, read_state_dict(path), path), spec, {}, task, path)


def teacher_normalization(cfg: Config, spec: Optional[ModelSpec], info: DatasetInfo) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The teacher's input mean and std: the config's, else its checkpoint's, else the data set's."""
    mean = tuple(cfg.teacher.mean or (spec.mean if spec else info.mean))
    std = tuple(cfg.teacher.std or (spec.std if spec else info.std))
    return mean, std


def _check_compatible(spec: ModelSpec, info: DatasetInfo, path: Path) -> None:
    if spec.num_classes != info.num_classes:
        raise CSKDError(f"teacher {path} predicts {spec.num_classes} classes but the data has {info.num_classes}; "
                        "use a teacher trained on this data set")
    if spec.in_chans != info.channels:
        raise CSKDError(f"teacher {path} takes {spec.in_chans}-channel images but the data has {info.channels}; "
                        "set data.channels to match or retrain the teacher")


# ---------------------------------------------------------------------------------------------
# Targets for a batch


@dataclass
class OnlineTeacher:
    """Runs the frozen teacher on each (augmented, mixed) batch."""

    teacher: LoadedTeacher

    def __call__(self, images: torch.Tensor, batch: Dict[str, Any]) -> TeacherOutputs:
        return self.teacher(images)


def crop_maps(maps: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """RoIAlign of normalised boxes ``[N, 4]`` (x0, y0, x1, y1 in [0, 1]) on maps ``[N, K, H, W]``
    that cover whole images, onto ``size`` cells; an identity box returns the map unchanged."""
    return geometry.warp(maps, geometry.box_theta(boxes.to(maps.device)), size, average=True, padding="border")


def follow_geometry(maps: torch.Tensor, batch: Dict[str, Any], size: Tuple[int, int]) -> torch.Tensor:
    """Whole-image maps moved as the batch's images were: crop box, flip and (an invariance recipe's)
    affine warp, composed into one sampling map and sampled once, RoIAlign's way."""
    theta = geometry.box_theta(batch["box"].to(maps.device), batch["flip"])
    if "affine" in batch:
        theta = geometry.compose(theta, batch["affine"].to(theta))
    return geometry.warp(maps, theta, size, average=True, padding="border")


def mix_maps(maps: torch.Tensor, mix: Optional[MixRecord], rows: Optional[int] = None) -> torch.Tensor:
    """Mix maps like timm mixed their images: with the reversed batch, by weight or by CutMix box;
    with ``rows``, only the first ``rows`` (the labelled images; transfer images are not mixed)."""
    if mix is None or mix.lam == 1.0:
        return maps
    if rows is not None and rows < len(maps):
        return torch.cat([mix_maps(maps[:rows], mix), maps[rows:]])
    reverse = maps.flip(0)
    if mix.box is None:
        return mix.lam * maps + (1.0 - mix.lam) * reverse
    share = box_coverage(mix.box, mix.size, maps.shape[-2:]).to(maps)
    return maps * (1.0 - share) + reverse * share


def box_coverage(box: Tuple[int, int, int, int], image_size: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """``[H, W]``: the share of each grid cell's area that a pixel box (y0, y1, x0, x1) covers."""
    y0, y1, x0, x1 = box
    (image_h, image_w), (grid_h, grid_w) = image_size, grid

    def overlap(low: float, high: float, cells: int, pixels: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) * pixels / cells
        return ((torch.minimum(edges[1:], torch.tensor(float(high))) - torch.maximum(edges[:-1], torch.tensor(float(low))))
                .clamp(min=0) / (pixels / cells))

    return overlap(y0, y1, grid_h, image_h)[:, None] * overlap(x0, x1, grid_w, image_w)[None, :]


@dataclass
class CachedTeacher:
    """Teacher targets read from a :class:`~cskd.teacher_cache.TeacherCache`: the teacher never runs."""

    cache: TeacherCache

    def __call__(self, images: torch.Tensor, batch: Dict[str, Any]) -> TeacherOutputs:
        maps = self.cache.maps(batch["index"]).to(images.device)
        dense = follow_geometry(maps, batch, tuple(self.cache.manifest.grid))
        dense = mix_maps(dense, batch.get("mix"), batch.get("labelled"))
        return dense, dense.mean(dim=(2, 3))


def build_teacher_targets(cfg: Config, info: DatasetInfo, train_set: Dataset, device: torch.device):
    """The run's teacher targets: from ``teacher.cache`` when set (checked against this run), else online."""
    _, _, cfg.teacher.kwargs = teacher_kwargs(cfg, info)  # the kwargs are saved with the run's config
    if not cfg.teacher.cache:
        return OnlineTeacher(load_teacher(cfg, info, device))
    cache = TeacherCache(resolve_cache_reference(cfg.teacher.cache))
    rebuild = (f"`cskd cache-teacher data.unlabeled={cfg.data.unlabeled}` (same config: a cache covers the training split "
               "and the transfer set)") if cfg.data.unlabeled else "`cskd cache-teacher` (same config)"
    cache.check_matches(cache_identity(cfg, info, train_set), rebuild)
    return CachedTeacher(cache)


def cache_identity(cfg: Config, info: DatasetInfo, train_set: Dataset) -> Dict[str, Any]:
    """The :meth:`CacheManifest.identity` a cache needs to hold this run's targets: everything that
    changes a map (teacher weights, architecture, timm options such as output_stride, normalisation;
    the data; image size and interpolation; classes), worked out without loading the teacher."""
    path, spec, kwargs = teacher_kwargs(cfg, info)
    mean, std = teacher_normalization(cfg, spec, info)
    return {"teacher_sha256": file_sha256(path), "teacher_model": cfg.teacher.model, "teacher_kwargs": kwargs,
            "teacher_mean": mean, "teacher_std": std, "data_fingerprint": fingerprint(train_set),
            "image_size": cfg.student.img_size, "interpolation": cfg.data.interpolation, "num_classes": info.num_classes}


# ---------------------------------------------------------------------------------------------
# How good the teacher is: its accuracy on the images the student is validated on


def _global_head(model: torch.nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"global": model(images)[1]}


def measure_teacher(teacher: LoadedTeacher, loader: DataLoader, env: DistEnv, split: Dict[str, Any],
                    show_progress: bool = True) -> TeacherAccuracy:
    """One pass of ``teacher`` over a validation ``loader`` (this process's shard; the counts are
    summed over processes); ``split`` identifies the images (:func:`~cskd.data.validation.validation_identity`).
    In float32 whatever the run's autocast: the figure describes the teacher, and a cache's and a
    run's then agree."""
    with progress(len(loader), f"teacher {teacher.name} on validation", "batch", show_progress) as bar:
        result = evaluate(teacher.model, _global_head, loader, Normalization(teacher.mean, teacher.std), env, progress_bar=bar)
    return TeacherAccuracy(result["top1"]["global"], result["top5"]["global"], split)


def run_teacher_accuracy(cfg: Config, info: DatasetInfo, targets: Union[OnlineTeacher, CachedTeacher], val_loader: DataLoader, env: DistEnv,
                         recorded: Optional[TeacherAccuracy] = None, show_progress: bool = True) -> TeacherAccuracy:
    """The teacher's accuracy on a student run's validation images (``val_loader``): ``recorded`` by
    this run before (a resume) or by its teacher cache, when measured on these very images (same
    split, subset and eval transform), else one pass of the teacher (loaded for it when the run's
    targets come from a cache)."""
    split = validation_identity(cfg.data, cfg.student.img_size)
    cached = targets.cache.manifest.accuracy() if isinstance(targets, CachedTeacher) else None
    for known in (recorded, cached):
        if known is not None and known.holds_for(split):
            return known
    teacher = targets.teacher if isinstance(targets, OnlineTeacher) else load_teacher(cfg, info, env.device)
    return measure_teacher(teacher, val_loader, env, split, show_progress)


# ---------------------------------------------------------------------------------------------
# Building a cache (`cskd cache-teacher`)


def cache_teacher(cfg: Config, out: Path, topk: Optional[int] = None, shard_size: int = 4096, batch_size: int = 256,
                  device: str = "auto", show_progress: bool = True) -> CacheManifest:
    """Run ``cfg``'s teacher once over its training split (whole images squashed to ``student.img_size``
    square, see :func:`~cskd.data.transforms.whole_image_transform`) and store the dense maps in
    ``out``; resumes an interrupted cache, parallel under torchrun."""
    env = init_distributed(device)
    try:
        out = Path(out)
        validation, info = build_dataset(cfg.data.name, "val", cfg.data.path, cfg.data.channels)
        topk = storage_topk(info.num_classes, topk)  # before the teacher loads: what cannot be stored is refused now
        if cfg.data.interpolation == "random":  # timm's training crop draws one per image; a cache resizes once
            raise CSKDError("a teacher cache resizes every image once, so it needs one interpolation, not "
                            "data.interpolation=random; cache and train with data.interpolation=bicubic (or bilinear)")
        transform = whole_image_transform(cfg.student.img_size, info.channels, cfg.data.interpolation)
        split, _ = build_dataset(cfg.data.name, "train", cfg.data.path, cfg.data.channels, transform)
        # the split, then any transfer set (less its images equal to labelled or validation ones, as training leaves out)
        dataset = training_images(split, cfg.data.unlabeled, info.channels, transform, validation)
        teacher = load_teacher(cfg, info, env.device)
        manifest = _new_manifest(cfg, info, dataset, teacher, topk, shard_size)
        if env.is_main:
            _start_or_resume(out, manifest)
        barrier(env)
        done = write_cache(out, manifest, dataset, lambda images: teacher(images.to(env.device))[0], env.rank, env.world_size,
                           batch_size, cfg.data.workers, show_progress and env.is_main)
        # The student runs this cache serves validate on these images: they report this figure beside their own.
        val_loader = DataLoader(shard(validation_set(cfg.data, cfg.student.img_size), env), batch_size=batch_size,
                                num_workers=cfg.data.workers)
        accuracy = measure_teacher(teacher, val_loader, env, validation_identity(cfg.data, cfg.student.img_size),
                                   show_progress and env.is_main)
        barrier(env)
        if env.is_main:
            missing = missing_shards(out, manifest)
            if missing:
                raise CSKDError(f"{len(missing)} shards of {out} are missing after the run; run the same command again")
            manifest = replace(manifest, complete=True, **accuracy.record())
            manifest.write(out)
            print(f"teacher cache {out}: {manifest.count} images, grid {manifest.grid[0]}x{manifest.grid[1]}, "
                  f"{'all' if manifest.topk is None else f'top-{manifest.topk} of'} {manifest.num_classes} classes "
                  f"({done} computed now)")
            print(accuracy.line(teacher.name))
            left_out = left_out_line(dataset)
            if left_out:
                print(f"  {left_out}")
        return manifest
    finally:
        shutdown(env)


def _new_manifest(cfg: Config, info: DatasetInfo, dataset: Dataset, teacher: LoadedTeacher, topk: Optional[int],
                  shard_size: int) -> CacheManifest:
    probe = torch.zeros(1, info.channels, cfg.student.img_size, cfg.student.img_size, device=next(teacher.model.parameters()).device)
    grid = tuple(teacher(probe)[0].shape[-2:])
    return CacheManifest(
        teacher=teacher.identity(),
        data={"name": cfg.data.name, "path": cfg.data.path, "split": "train", "unlabeled": cfg.data.unlabeled, "count": len(dataset),
              "fingerprint": fingerprint(dataset)},
        image_size=cfg.student.img_size, grid=grid, num_classes=info.num_classes, topk=topk, shard_size=shard_size,
        interpolation=cfg.data.interpolation,
    )


def _start_or_resume(out: Path, manifest: CacheManifest) -> None:
    if (out / "manifest.json").is_file():
        existing = CacheManifest.read(out)
        wrong = mismatches({**existing.identity(), "shard_size": existing.shard_size},
                           {**manifest.identity(), "shard_size": manifest.shard_size})
        if wrong:
            raise CSKDError(f"{out} holds another cache ({'; '.join(wrong)}); choose another --out or delete it")
        if existing.complete:
            return
    out.mkdir(parents=True, exist_ok=True)
    manifest.write(out)
