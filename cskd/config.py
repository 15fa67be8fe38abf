"""Run configuration: typed dataclasses, YAML files and dotted ``key=value`` overrides.

Precedence: dataclass defaults < YAML file < command-line overrides. Unknown keys and
out-of-range values raise :class:`~cskd.errors.CSKDError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from cskd.assets import DEMO_REFERENCE, DEMO_TEACHER_CACHE, asset_path
from cskd.configs import packaged_config, packaged_names
from cskd.data.datasets import DATASETS
from cskd.data.invariance import get_recipe
from cskd.data.transforms import RE_MODES
from cskd.engine import AMP_MODES
from cskd.errors import CSKDError, did_you_mean
from cskd.files import atomic_write_text
from cskd.loss import CKF_PROGRESS, DECAYS, KD_TYPES
from cskd.tasks import TASKS
from cskd.teacher_cache import CacheManifest


@dataclass
class DataConfig:
    name: str = "fashion-mnist-demo"  # fashion-mnist-demo | fashion-mnist | imagefolder
    path: Optional[str] = None  # IDX folder (fashion-mnist) or root with train/ and val/ (imagefolder)
    channels: Optional[int] = None  # imagefolder: 1 (grayscale) or 3; IDX data is always 1
    workers: int = 2  # DataLoader worker processes per training process
    max_train: Optional[int] = None  # use a fixed random subset of this many training images
    max_val: Optional[int] = None  # likewise for validation (quick experiments, tests)
    unlabeled: Optional[str] = None  # transfer set: a folder of images or an IDX images file, supervised by the teacher only
    unlabeled_ratio: float = 1.0  # transfer images per labelled image in each batch (a step costs 1 + ratio)
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec (DeiT's); null disables
    # A recipe that distils invariance (cskd.data.invariance): tone and small affine noise on the student's
    # input, the cached target the clean image's (moved with the geometry); null off
    invariance: Optional[str] = None
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5
    color_jitter: float = 0.3  # brightness/contrast/saturation jitter when auto_augment is off (DeiT)
    reprob: float = 0.25  # random erasing probability
    re_mode: str = "const"  # random erasing fill: const (zeros) | rand (per channel) | pixel (per pixel, DeiT's)
    repeated_aug: int = 0  # DeiT's repeated augmentation: each image this many times per epoch (3 in DeiT); 0 off
    eval_crop_pct: float = 1.0  # evaluation: resize to img_size / crop_pct, then centre crop (DeiT: 0.875)
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1  # label smoothing
    interpolation: str = "bicubic"


@dataclass
class StudentConfig:
    model: str = "deit_tiny_distilled_patch16_224"  # any timm deit_*_distilled_* (or cskd_deit_nano_*)
    img_size: int = 224  # input side in pixels, used by teacher and student alike
    patch_size: int = 16
    drop_path: float = 0.1
    init: Optional[str] = None  # start from: timm:TAG, a weights file (.safetensors/.pth/.bin) or a cskd run
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm arguments (embed_dim, depth...)
    mean: Optional[List[float]] = None  # input normalisation; null: the dataset's statistics
    std: Optional[List[float]] = None


@dataclass
class TeacherConfig:
    model: str = "regnety_160"  # any timm CNN with a pool + classifier head
    checkpoint: Optional[str] = None  # cskd run dir/checkpoint, a state dict, or "demo" (packaged)
    cache: Optional[str] = None  # a `cskd cache-teacher` folder: targets read from it, the teacher never runs
    img_size: Optional[int] = None  # only when training the teacher (train.target=teacher)
    init: Optional[str] = None  # training the teacher: start from timm:TAG, a weights file or a cskd run
    drop_path: float = 0.0
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm arguments (output_stride...)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


@dataclass
class TrainConfig:
    target: str = "student"  # student: distil the ViT; teacher: supervised training of the CNN
    epochs: int = 300
    # Stop after this many optimiser steps if that comes first (null: every step of train.epochs); the LR
    # schedule, its warm-up and CKF progress are laid out over them. `cskd plan` gives its proxies equal time so.
    max_steps: Optional[int] = None
    batch_size: int = 128  # per process; the global batch is batch_size x world size
    lr: float = 5e-4  # for a global batch of 512, scaled linearly (DeiT)
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0  # a float default: overrides may give a share of an epoch (cskd plan's proxies do)
    weight_decay: float = 0.05
    opt: str = "adamw"  # any timm optimizer name
    layer_decay: Optional[float] = None  # layer-wise LR decay (timm's): block i of n learns at rate x decay^(n-i); null off
    clip_grad: Optional[float] = None  # max gradient norm; null disables
    ema: bool = False  # keep an EMA of the weights; evaluated and saved instead of the raw weights
    ema_decay: float = 0.99996
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the student
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    threads: Optional[int] = None  # CPU threads per process; null: torch's default


@dataclass
class LossConfig:
    alpha: float = 0.5  # weight of the distillation-token term (class token: 1 - alpha)
    deit_type: str = "hard"  # hard | soft | none
    cskd_type: str = "hard"  # hard | soft | none
    cskd_weight: float = 1.0  # lambda
    decay: str = "linear"  # CKF schedule: linear | x2 | cos | none
    ckf_progress: str = "step"  # progress x for CKF: step (continuous fraction) | epoch (whole epochs, official code)
    tau: float = 1.0  # temperature of the soft variants


@dataclass
class GuardConfig:
    # Distilled student runs: say once when distillation from this teacher pulls the student down (cskd.guard);
    # training itself is never changed.
    margin: float = 1.0  # points the teacher-taught heads may trail the class token: the least that never fired where CSKD
    # paid and fired on every run from a teacher below no KD (docs/benchmarks.md "When does CSKD pay?")
    min_progress: float = 0.25  # judge only after this share of the epochs (early epochs are noisy)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    output: Optional[str] = None  # run directory; null: runs/<target>-<timestamp>

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Allowed values come from the modules that own them.
_CHOICES = {
    "data.name": tuple(DATASETS),
    "train.target": tuple(TASKS),
    "train.amp": AMP_MODES,
    "loss.deit_type": KD_TYPES,
    "loss.cskd_type": KD_TYPES,
    "loss.decay": DECAYS,
    "loss.ckf_progress": CKF_PROGRESS,
    "data.re_mode": RE_MODES,
}
# key: (low, high, low inclusive) -- ranges a run can sensibly take
_RANGES = {
    "train.epochs": (1, 100000, True),
    "train.max_steps": (1, 1 << 40, True),
    "train.batch_size": (1, 1 << 16, True),
    "train.lr": (0, 1, False),
    "train.min_lr": (0, 1, True),
    "train.warmup_epochs": (0, 100000, True),
    "train.weight_decay": (0, 10, True),
    "train.layer_decay": (0, 1, False),
    "train.clip_grad": (0, 1e6, False),
    "train.ema_decay": (0, 1, False),
    "loss.alpha": (0, 1, True),
    "loss.cskd_weight": (0, 1e3, True),
    "loss.tau": (0, 1e3, False),
    "guard.margin": (0, 100, True),
    "guard.min_progress": (0, 1, True),
    "data.workers": (0, 256, True),
    "data.max_train": (1, 1 << 40, True),
    "data.max_val": (1, 1 << 40, True),
    "data.unlabeled_ratio": (0, 64, False),
    "data.hflip": (0, 1, True),
    "data.color_jitter": (0, 10, True),
    "data.reprob": (0, 1, True),
    "data.repeated_aug": (0, 64, True),
    "data.eval_crop_pct": (0, 1, False),
    "data.mixup": (0, 1e3, True),
    "data.cutmix": (0, 1e3, True),
    "data.mixup_prob": (0, 1, True),
    "data.smoothing": (0, 1, False),
    "student.img_size": (8, 4096, True),
    "student.patch_size": (1, 1024, True),
    "student.drop_path": (0, 1, True),
    "teacher.drop_path": (0, 1, True),
}


def _leaf_keys(obj: Any, prefix: str = "") -> Dict[str, Any]:
    keys = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys.update(_leaf_keys(value, f"{name}."))
        else:
            keys[name] = value
    return keys


def _set(cfg: Config, key: str, value: Any) -> None:
    known = _leaf_keys(cfg)
    if key not in known:
        raise CSKDError(f"unknown config key {key!r}{did_you_mean(key, known)}; see `cskd train --help` for the keys")
    *parents, leaf = key.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part)
    default = known[key]
    if isinstance(default, dict) and value is not None and not isinstance(value, dict):
        raise CSKDError(f"{key} takes a mapping, e.g. {key}={{depth: 4}}; got {value!r}")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise CSKDError(f"{key} takes true or false, got {value!r}")
    annotation = str(next(f.type for f in dataclasses.fields(target) if f.name == leaf))
    if isinstance(value, str) and ("float" in annotation or "int" in annotation) and _is_number(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CSKDError(f"{key} takes a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise CSKDError(f"{key} takes a whole number, got {value!r}")
        value = type(default)(value)
    setattr(target, leaf, value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not name.endswith("kwargs"):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; values are parsed as YAML."""
    if "=" not in text:
        raise CSKDError(f"override {text!r} is not key=value; write e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), notes: Optional[List[str]] = None) -> Config:
    """Build a validated :class:`Config` from a YAML file (or the packaged demo) and overrides;
    ``notes`` (when given) receives a line for each setting of the file that this run cannot keep."""
    cfg = Config()
    path = Path(path) if path is not None else packaged_config("demo")
    if not path.is_file() and packaged_config(str(path)).is_file():
        path = packaged_config(str(path))  # a packaged config by name: `--config teacher-demo`
    if not path.is_file():
        raise CSKDError(
            f"config file {path} does not exist; pass a YAML file or a packaged config ({', '.join(packaged_names())})"
        )
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CSKDError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise CSKDError(f"config file {path} must hold a mapping of sections (data:, student:, ...)")
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    given = [parse_override(text) for text in overrides]
    for key, value in given:
        _set(cfg, key, value)
    _packaged_cache_for_its_pairing_only(cfg, "teacher.cache" in dict(given), notes)
    validate(cfg)
    return cfg


def _packaged_cache_for_its_pairing_only(cfg: Config, on_command_line: bool, notes: Optional[List[str]]) -> None:
    """``teacher.cache=demo`` holds the packaged teacher's targets on the embedded training split and
    fits no other teacher or data. A file's (the demo config's) is dropped for a run of another
    teacher or data, whose teacher then runs online; one given on the command line is refused."""
    if cfg.teacher.cache != DEMO_REFERENCE or not TASKS[cfg.train.target].distils(cfg):
        return
    manifest = CacheManifest.read(asset_path(DEMO_TEACHER_CACHE))  # what the packaged cache was made of
    teacher, data = manifest.teacher, manifest.data
    own = {"teacher.checkpoint": cfg.teacher.checkpoint, "teacher.model": cfg.teacher.model,
           "teacher.kwargs": {**teacher["kwargs"], **cfg.teacher.kwargs}, "data.name": cfg.data.name}
    packaged = {"teacher.checkpoint": teacher["checkpoint"], "teacher.model": teacher["model"],
                "teacher.kwargs": teacher["kwargs"], "data.name": data["name"]}
    other = ", ".join(f"{key}={own[key]}" for key in own if own[key] != packaged[key])
    if not other:
        return
    why = (f"the packaged cache holds the demo teacher's targets on the embedded data (teacher.checkpoint=demo, "
           f"data.name={data['name']}), and this run has {other}")
    if on_command_line:
        raise CSKDError(f"teacher.cache=demo does not fit this run: {why}; drop teacher.cache to run the teacher online, "
                        "or cache it once with `cskd cache-teacher` (the same config and overrides) and pass "
                        "teacher.cache=ITS_FOLDER")
    cfg.teacher.cache = None
    if notes is not None:
        notes.append(f"teacher.cache=demo dropped: {why}; the teacher runs online (to run it once instead: `cskd "
                     "cache-teacher` with the same config and overrides, then teacher.cache=ITS_FOLDER)")


def validate(cfg: Config) -> None:
    values = _leaf_keys(cfg)
    for key, allowed in _CHOICES.items():
        if values[key] not in allowed:
            raise CSKDError(f"{key}={values[key]!r} is not one of {', '.join(allowed)}{did_you_mean(str(values[key]), allowed)}")
    for key, (low, high, inclusive) in _RANGES.items():
        value = values[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # an optional key's value is not typed by _set
            raise CSKDError(f"{key} takes a number, got {value!r}")
        ok = (low <= value if inclusive else low < value) and value <= high
        if not ok:
            bracket = "[" if inclusive else "("
            raise CSKDError(f"{key}={value} is out of range {bracket}{low}, {high}]; choose a value inside it")
    for section in ("student", "teacher"):
        for key in getattr(cfg, section).kwargs:
            if not str(key).isidentifier():
                raise CSKDError(
                    f"{section}.kwargs has a key {key!r} that is not an argument name; write YAML mappings with a "
                    "space after each colon, e.g. {depth: 4, embed_dim: 96}"
                )
    if cfg.train.max_steps is not None and not float(cfg.train.max_steps).is_integer():
        raise CSKDError(f"train.max_steps={cfg.train.max_steps} is not a whole number of optimiser steps; write e.g. train.max_steps=500")
    if len(cfg.data.scale) != 2 or not 0 < cfg.data.scale[0] <= cfg.data.scale[1] <= 1:
        raise CSKDError(f"data.scale={cfg.data.scale} must be [low, high] with 0 < low <= high <= 1")
    recipe = get_recipe(cfg.data.invariance)
    if recipe is not None and cfg.data.auto_augment:
        raise CSKDError(f"data.invariance={recipe.name} draws timm's RandAugment tone operations itself, and "
                        f"data.auto_augment={cfg.data.auto_augment} would add rotations and shears its targets do not "
                        "follow; set data.auto_augment=null")
    if cfg.data.name == "imagefolder" and not cfg.data.path:
        raise CSKDError("data.name=imagefolder needs data.path=ROOT (a folder with train/ and val/ class folders)")
    if cfg.student.img_size % cfg.student.patch_size:
        raise CSKDError(
            f"student.img_size={cfg.student.img_size} is not a multiple of student.patch_size={cfg.student.patch_size}"
        )
    for section, target in (("student", "student"), ("teacher", "teacher")):
        own = getattr(cfg, section)
        if own.init and cfg.train.target != target:
            raise CSKDError(f"{section}.init starts the network a run trains, and this run trains the {cfg.train.target}; "
                            f"set {cfg.train.target}.init" + (" (the teacher it distils from is teacher.checkpoint)"
                                                             if section == "teacher" else ""))
        if own.init and "pretrained" in own.kwargs:
            raise CSKDError(f"{section}.init and {section}.kwargs.pretrained both choose the starting weights; keep {section}.init")
    if cfg.data.unlabeled and not (cfg.train.target == "student" and TASKS["student"].distils(cfg)):
        raise CSKDError("data.unlabeled adds images only a teacher supervises, so it needs a distilled student: "
                        "train.target=student with loss.deit_type or loss.cskd_type not none (or drop data.unlabeled)")
    if TASKS[cfg.train.target].distils(cfg):
        if not cfg.teacher.checkpoint:
            raise CSKDError(
                "distillation needs a trained teacher: set teacher.checkpoint=RUN_DIR (train one with "
                "`cskd train train.target=teacher`), or loss.deit_type=none loss.cskd_type=none for no KD"
            )


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
