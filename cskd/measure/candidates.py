"""The students ``cskd plan`` weighs: what a candidate is, how one is written on the command line,
the default family at the data's size, and the ``cskd train`` overrides that train one.

A candidate is a timm distilled DeiT name with its options, ``NAME[:key=value,...]``, e.g.
``cskd_deit_nano_distilled_patch4_32:embed_dim=128,depth=6,num_heads=4,patch_size=8``. ``patch_size``
becomes ``student.patch_size``, every other option ``student.kwargs``; the image size is the data's
(``student.img_size``) for every candidate, as the teacher cache a run trains from is made at one size.
"""

from __future__ import annotations

import enum
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from cskd.errors import CSKDError, did_you_mean

DEMO_STUDENT = "cskd_deit_nano_distilled_patch4_32"
DEIT_TINY = "deit_tiny_distilled_patch16_224"
DEIT_SMALL = "deit_small_distilled_patch16_224"
# Options a candidate may not set, and the config key that sets them for every candidate instead.
RESERVED = {"img_size": "student.img_size (the data's size, one for every candidate)",
            "in_chans": "the data's channels", "num_classes": "the data's classes",
            "drop_path_rate": "student.drop_path", "pretrained": "student.init"}
SPEC_FORMAT = "NAME[:key=value,...], e.g. cskd_deit_nano_distilled_patch4_32:embed_dim=128,depth=6,num_heads=4"
_SHORT = {DEMO_STUDENT: "nano", DEIT_TINY: "deit-ti", DEIT_SMALL: "deit-s", "deit_base_distilled_patch16_224": "deit-b"}


@dataclass(frozen=True)
class Candidate:
    """One student architecture: a timm model, its options and its patch size (None: the config's)."""

    model: str
    kwargs: Dict[str, Any] = field(default_factory=dict)  # timm options (embed_dim, depth, num_heads, mlp_ratio...)
    patch_size: Optional[int] = None

    def overrides(self, img_size: int, patch_size: int) -> List[str]:
        """The ``cskd train`` overrides that train this network at ``img_size`` (``patch_size``: the
        config's, when the candidate has none). ``student.kwargs`` is always written: it replaces the
        config's own options rather than adding to them."""
        return [f"student.model={self.model}", f"student.img_size={img_size}", f"student.patch_size={self.patch_size or patch_size}",
                f"student.kwargs={flow_mapping(self.kwargs)}"]


def flow_mapping(values: Dict[str, Any]) -> str:
    """``{embed_dim: 128, depth: 6}``: a mapping as one YAML flow line, as ``key=value`` overrides take it."""
    return yaml.safe_dump(dict(values), default_flow_style=True, sort_keys=False, width=1 << 16).strip()


def label(candidate: Candidate, width: int, depth: int, heads: int, patch_size: int) -> str:
    """A short name for tables and folders: ``nano-w96-d4-h3-p4`` (model, width, depth, heads, patch)."""
    extra = "".join(f"-{k}{v}" for k, v in sorted(candidate.kwargs.items()) if k not in ("embed_dim", "depth", "num_heads"))
    return f"{_SHORT.get(candidate.model, candidate.model)}-w{width}-d{depth}-h{heads}-p{patch_size}{extra}"


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def parse_candidate(text: str) -> Candidate:
    """``NAME[:key=value,...]`` as a :class:`Candidate`; every malformed part is an error naming it."""
    name, colon, options = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise CSKDError(f"candidate {text!r} has no model name; write {SPEC_FORMAT}")
    if "=" in name:
        raise CSKDError(f"candidate {text!r} looks like a config override (KEY=VALUE), not a model; put config overrides "
                        f"before --candidates, and write candidates as {SPEC_FORMAT}")
    _check_model(name)
    if colon and not options.strip():
        raise CSKDError(f"candidate {text!r} has a ':' but no options after it; drop the ':' or write {SPEC_FORMAT}")
    kwargs: Dict[str, Any] = {}
    for item in options.split(",") if options.strip() else []:
        key, equals, raw = (part.strip() for part in item.partition("="))
        if not equals or not key or not raw:
            raise CSKDError(f"candidate {text!r}: option {item.strip()!r} is not key=value; write {SPEC_FORMAT}")
        if not _KEY.match(key):
            raise CSKDError(f"candidate {text!r}: {key!r} is not an option name (letters, digits and _)")
        if key in kwargs:
            raise CSKDError(f"candidate {text!r} sets {key} twice; keep one")
        if key in RESERVED:
            raise CSKDError(f"candidate {text!r} sets {key}, which is {RESERVED[key]}; remove it from the candidate")
        kwargs[key] = _scalar(text, key, raw)
    patch = kwargs.pop("patch_size", None)
    if patch is not None and (not isinstance(patch, int) or isinstance(patch, bool) or patch < 1):
        raise CSKDError(f"candidate {text!r}: patch_size={patch!r} is not a positive whole number")
    return Candidate(name, kwargs, patch)


def _scalar(text: str, key: str, raw: str) -> Any:
    """A value as YAML reads it (``128`` int, ``4.0`` float, ``true`` bool, else a string); lists and
    mappings are refused, a comma already ends the option."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise CSKDError(f"candidate {text!r}: {key}={raw!r} is not a value; write a number, true/false or a word") from None
    if not isinstance(value, (int, float, str, bool)):
        raise CSKDError(f"candidate {text!r}: {key}={raw!r} is not a single value; write a number, true/false or a word")
    return value


def _check_model(name: str) -> None:
    import timm

    import cskd.models  # noqa: F401  registers cskd's demo architectures with timm

    if not timm.is_model(name):
        raise CSKDError(f"candidate model {name!r} is not a timm model{did_you_mean(name, timm.list_models('*distilled*'))}; "
                        f"use a distilled DeiT ({DEMO_STUDENT}, {DEIT_TINY}, {DEIT_SMALL}, ...)")


def default_family(model: str, kwargs: Dict[str, Any], img_size: int, patch_size: int) -> List[Candidate]:
    """About ten students spanning smaller to larger than the config's own (``model``, ``kwargs`` at
    ``patch_size``, first): the demo student's family narrower, shallower, wider and deeper, on the
    config's patch grid and on one twice as coarse, and timm's DeiT-Ti and DeiT-S at the data's size.
    A patch size that does not divide ``img_size`` is left out."""
    coarse = 2 * patch_size
    family = [
        Candidate(model, dict(kwargs), patch_size),  # the config's student (the demo's: nano, 96 wide, 4 deep)
        Candidate(DEMO_STUDENT, {"embed_dim": 64, "depth": 2, "num_heads": 2}, patch_size),
        Candidate(DEMO_STUDENT, {"depth": 2}, patch_size),
        Candidate(DEMO_STUDENT, {}, patch_size),
        Candidate(DEMO_STUDENT, {}, coarse),
        Candidate(DEMO_STUDENT, {"embed_dim": 128, "depth": 4, "num_heads": 4}, patch_size),
        Candidate(DEMO_STUDENT, {"depth": 8}, patch_size),
        Candidate(DEMO_STUDENT, {"embed_dim": 192, "depth": 6, "num_heads": 3}, patch_size),
        Candidate(DEIT_TINY, {}, coarse),
        Candidate(DEIT_TINY, {}, patch_size),
        Candidate(DEIT_SMALL, {}, coarse),
    ]
    return unique([c for c in family if img_size % c.patch_size == 0], img_size, patch_size)


Network = Tuple[Any, ...]  # what network_key returns: equal for two candidates exactly when they build the same network


def network_key(candidate: Candidate, img_size: int, patch_size: int) -> Network:
    """The network ``candidate`` builds at ``img_size`` (``patch_size``: the config's, when it has none), as
    built: the architecture timm resolves its name to, then every module's type, plain settings (widths,
    heads, norms' eps, dropout rates...) and tensor shapes, defaults applied. Two spellings of one network
    (``embed_dim=96`` where 96 is the default, ``mlp_ratio=4`` against ``4.0``, the config's patch size
    written out) give one key; networks that differ in any setting give two. Built on the meta device:
    shapes without weights, milliseconds instead of the seconds a real initialisation takes."""
    import torch

    from cskd.models import create_student

    with torch.device("meta"):  # the classes and shapes are what is compared; no values are made
        vit = create_student(candidate.model, 10, img_size, candidate.patch_size or patch_size, 1, **candidate.kwargs).vit
    parts: List[Any] = [vit.pretrained_cfg.get("architecture", candidate.model)]
    for name, module in vit.named_modules():
        settings = tuple(sorted((k, _plain(v)) for k, v in vars(module).items() if not k.startswith("_") and _is_plain(v)))
        tensors = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in [*module.named_parameters(recurse=False),
                                                                      *module.named_buffers(recurse=False)])
        parts.append((name, type(module).__qualname__, settings, tensors))
    return tuple(parts)


def _is_plain(value: Any) -> bool:
    """A setting that describes the network (a number, word, flag, enum or a tuple of them), not a tensor,
    module, config mapping or function."""
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, enum.Enum))


def _plain(value: Any) -> Any:
    """``value`` comparable and hashable: lists as tuples (a list and a tuple of one shape are one setting)."""
    return tuple(_plain(v) for v in value) if isinstance(value, (tuple, list)) else value


def unique(candidates: Sequence[Candidate], img_size: int, patch_size: int) -> List[Candidate]:
    """``candidates`` in order, each network once (the first spelling of it kept): two candidates are one
    network when they build one (:func:`network_key`), however their options are written."""
    seen, kept = set(), []
    for candidate in candidates:
        key = network_key(candidate, img_size, patch_size)
        if key not in seen:
            seen.add(key)
            kept.append(candidate)
    return kept


def train_command(config: Optional[str], overrides: Sequence[str]) -> str:
    """The ``cskd train`` command line of ``config`` (None: the packaged demo) and ``overrides``, shell-quoted."""
    return shlex.join(["cskd", "train", *(["--config", str(config)] if config else []), *overrides])
