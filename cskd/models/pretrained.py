"""Start a network from pretrained weights (``student.init``, ``teacher.init``) with timm's own loading.

A reference is one of

* ``timm:TAG``, a timm pretrained tag (``timm:deit_tiny_distilled_patch16_224.fb_in1k``): timm
  fetches it from the Hugging Face Hub or its cache, so only when the user asks for it;
* a weights file in timm's format: ``.safetensors`` or a weights-only ``.pth``/``.bin`` (the DeiT
  authors' released checkpoints, a Hub ``model.safetensors``, a timm training checkpoint);
* a cskd run directory or checkpoint.

The weights go through timm's ``load_pretrained`` (via ``pretrained_cfg_overlay``): the model's own
checkpoint filter (position embeddings resampled to the new patch grid, patch embedding resampled to
a new patch size), the input convolution adapted to another channel count, the classifiers dropped
for another class count. Before that, a checkpoint without a distillation token (a plain ViT/DeiT)
gets one for a distilled student: the token, its position and the distillation head copied from the
class token's. :class:`InitReport` says what was loaded, adapted, newly initialised and ignored.
Weights of another architecture are refused, naming what differs: a tensor that fits no adaptation
(another width), another depth (numbered blocks: ``blocks.N.``, ``layer1.N.``...) or another head
count (attention weights split into other heads mean something else; known from a cskd run's spec or
a timm tag's model, not from a plain state dict, whose shapes do not show it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from cskd.checkpoint import ModelSpec, read_spec, read_state_dict, resolve_checkpoint
from cskd.errors import CSKDError
from cskd.models.factory import create_timm_model

TIMM_PREFIX = "timm:"
# What timm's loading adapts when shapes differ: position embeddings and patch/input convolutions.
ADAPTABLE = ("pos_embed", "patch_embed.proj.weight")


@dataclass
class PretrainedWeights:
    """A state dict and what it was trained for: what timm adapts from."""

    name: str  # what to call it in messages
    state_dict: Dict[str, torch.Tensor]
    num_classes: Optional[int]  # None: no classifier found
    in_chans: Optional[int]
    class_names: Optional[List[str]] = None  # a cskd run's classes; None: unknown
    other_classes: bool = False  # as many classes as the run's, but others: the heads were dropped
    num_heads: Optional[Dict[str, int]] = None  # attention module -> heads (cskd spec, timm tag); None: unknown


@dataclass
class InitReport:
    source: str
    loaded: List[str] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)  # "key: how"
    new: List[str] = field(default_factory=list)  # "key: why"
    ignored: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        def some(items: List[str], limit: int = 6) -> str:
            return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")

        lines = [f"  init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.adapted)} adapted, "
                 f"{len(self.new)} newly initialised, {len(self.ignored)} ignored"]
        for label, items in (("adapted", self.adapted), ("new", self.new), ("ignored", self.ignored)):
            if items:
                lines.append(f"    {label}: {some(items)}")
        return lines


def read_pretrained(reference: str, role: str, first_conv: Optional[str], classifiers: Tuple[str, ...]) -> PretrainedWeights:
    """The weights ``reference`` names (see the module) and the class and channel counts they were trained for."""
    if reference.startswith(TIMM_PREFIX):
        return _from_timm(reference[len(TIMM_PREFIX):], role)
    path = Path(reference).expanduser()
    if not path.exists():
        raise CSKDError(f"{role}.init={reference} does not exist; pass a weights file (.safetensors, .pth, .bin), "
                        f"a cskd run directory, or timm:TAG for a timm pretrained tag")
    path = resolve_checkpoint(path)
    spec = read_spec(path) if path.suffix == ".safetensors" else None
    state_dict = read_state_dict(path)
    if spec is not None:
        if spec.role != role:
            raise CSKDError(f"{role}.init={reference} holds a cskd {spec.role} ({spec.model}); a {role} starts from a "
                            f"{role}'s weights: pass a {role} run, a weights file or timm:TAG")
        return PretrainedWeights(f"{path} (cskd {spec.role}, {spec.model})", state_dict, spec.num_classes, spec.in_chans,
                                 list(spec.class_names) or None, num_heads=_spec_heads(spec))
    return PretrainedWeights(str(path), state_dict, _classes_of(state_dict, classifiers), _channels_of(state_dict, first_conv))


def _from_timm(tag: str, role: str) -> PretrainedWeights:
    import timm

    name = tag.split(".")[0]
    if not timm.is_model(name) or tag not in timm.list_pretrained(name + "*") + [name]:
        raise CSKDError(f"{role}.init=timm:{tag} is not a timm pretrained tag; list them with: "
                        f"python -c \"import timm; print(timm.list_pretrained('{name[:8]}*'))\"")
    try:
        source = timm.create_model(tag, pretrained=True)
    except Exception as exc:  # offline, no cache, hub errors: all mean "no weights here"
        raise CSKDError(f"cannot fetch timm's {tag} weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                        "on an offline machine download its model.safetensors elsewhere and pass the file") from None
    cfg = source.pretrained_cfg
    return PretrainedWeights(f"timm:{tag}", source.state_dict(), source.num_classes or None, cfg.get("input_size", (3,))[0],
                             num_heads=attention_heads(source))


def attention_heads(model: nn.Module) -> Dict[str, int]:
    """The head count of each attention module (timm's ``num_heads``), by module name."""
    return {name: m.num_heads for name, m in model.named_modules() if isinstance(getattr(m, "num_heads", None), int)}


def _spec_heads(spec: ModelSpec) -> Optional[Dict[str, int]]:
    """The attention heads of the network a cskd spec describes, from a build on the meta device (no
    memory, no init cost); None when timm cannot build it here (its heads stay unchecked)."""
    sizes = {"img_size": spec.img_size, **({"patch_size": spec.patch_size} if spec.patch_size else {})}
    try:
        with torch.device("meta"):
            model = create_timm_model(spec.model, spec.role, num_classes=spec.num_classes, in_chans=spec.in_chans,
                                      **{**sizes, **spec.kwargs})
    except CSKDError:  # an architecture this timm does not have, or options it does not take
        return None
    return attention_heads(model)


def block_counts(keys: Iterable[str]) -> Dict[str, int]:
    """How many numbered children each container in state-dict ``keys`` has: the depth of every
    stack of blocks (``{"blocks": 12}`` for a ViT, ``{"layer1": 2, ...}`` for a ResNet)."""
    indices: Dict[str, set] = {}
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and i > 0:
                indices.setdefault(".".join(parts[:i]), set()).add(int(part))
    return {container: len(found) for container, found in indices.items()}


def architecture_differences(weights: PretrainedWeights, model: nn.Module) -> List[str]:
    """What makes ``weights`` another architecture than ``model`` beyond tensor shapes: the depth of
    a stack of blocks both have, or the head count of an attention module both have."""
    given, own = block_counts(weights.state_dict), block_counts(model.state_dict())
    differences = [f"depth: {name} has {given[name]} blocks in the weights, {own[name]} in the model"
                   for name in own if name in given and given[name] != own[name]]
    given_heads, heads = weights.num_heads or {}, attention_heads(model)
    pairs: Dict[Tuple[int, int], List[str]] = {}  # (weights', model's) -> the attention modules that differ so
    for name in heads:
        if name in given_heads and given_heads[name] != heads[name]:
            pairs.setdefault((given_heads[name], heads[name]), []).append(name)
    differences += [f"num_heads: {given} in the weights, {count} in the model ({names[0]}"
                    + (f" and {len(names) - 1} more attention modules)" if len(names) > 1 else ")")
                    for (given, count), names in pairs.items()]
    return differences


def _classes_of(state_dict: Dict[str, torch.Tensor], classifiers: Tuple[str, ...]) -> Optional[int]:
    for name in classifiers:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and weight.ndim == 2:
            return int(weight.shape[0])
    return None


def _channels_of(state_dict: Dict[str, torch.Tensor], first_conv: Optional[str]) -> Optional[int]:
    weight = state_dict.get(f"{first_conv}.weight") if first_conv else None
    return int(weight.shape[1]) if weight is not None and weight.ndim == 4 else None


def add_distillation_token(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """A plain ViT/DeiT checkpoint -> a distilled one: the distillation token, its position embedding
    and the distillation head copied from the class token's (DeiT's student starts from both alike)."""
    if "dist_token" in state_dict or "cls_token" not in state_dict:
        return state_dict, []
    out = dict(state_dict)
    out["dist_token"] = state_dict["cls_token"].clone()
    derived = ["dist_token: from the class token"]
    pos = state_dict.get("pos_embed")
    if pos is not None:
        out["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        derived.append("pos_embed: the distillation token's position from the class token's")
    for part in ("weight", "bias"):
        if f"head.{part}" in state_dict:
            out[f"head_dist.{part}"] = state_dict[f"head.{part}"].clone()
    if "head.weight" in state_dict:
        derived.append("head_dist: from the class head")
    return out, derived


def timm_kwargs(weights: PretrainedWeights, img_size: Optional[int] = None) -> Dict[str, Any]:
    """What ``timm.create_model`` takes to load ``weights`` through its own ``load_pretrained``."""
    overlay: Dict[str, Any] = {"state_dict": weights.state_dict, "source": "", "file": None, "url": "", "hf_hub_id": None}
    if weights.num_classes is not None:
        overlay["num_classes"] = weights.num_classes
    if weights.in_chans is not None:
        overlay["input_size"] = (weights.in_chans, img_size or 224, img_size or 224)
    return {"pretrained": True, "pretrained_cfg_overlay": overlay, "pretrained_strict": False}


def head_keys(classifiers: Tuple[str, ...]) -> set:
    """The state-dict keys of the classifier layers (timm's ``pretrained_cfg["classifier"]``)."""
    return {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}


def check_fits(weights: PretrainedWeights, model: nn.Module, classifiers: Tuple[str, ...], first_conv: Optional[str],
               role: str) -> None:
    """Refuse weights of another depth or head count, or with a tensor of another shape that no
    adaptation changes (another width)."""
    differences = architecture_differences(weights, model)
    if differences:
        shown = "; ".join(differences[:2]) + (f"; and {len(differences) - 2} more" if len(differences) > 2 else "")
        raise CSKDError(f"{weights.name} is another architecture than this model, {shown}; start from weights of the "
                        f"same depth and heads, or build the model as the weights were trained ({role}.model, "
                        f"{role}.kwargs: depth, num_heads)")
    own = model.state_dict()
    adaptable = {*ADAPTABLE, *([f"{first_conv}.weight"] if first_conv else [])}
    heads = head_keys(classifiers)
    wrong = [f"{k} {list(v.shape)} (the model's {list(own[k].shape)})" for k, v in weights.state_dict.items()
             if k in own and v.shape != own[k].shape and k not in adaptable and k not in heads]
    if wrong:
        raise CSKDError(f"{weights.name} does not fit this model: {len(wrong)} tensors of another shape, e.g. "
                        f"{'; '.join(wrong[:3])}; pass weights of the same architecture (width, depth, heads)")


def report(weights: PretrainedWeights, fresh: Dict[str, torch.Tensor], loaded: Dict[str, torch.Tensor],
           derived: List[str], classifiers: Tuple[str, ...], num_classes: int) -> InitReport:
    """What loading ``weights`` did to each tensor of the model: ``fresh`` is the model built without them
    and ``loaded`` with them, both from the same random state, so a tensor timm's checkpoint filter
    renamed (DeiT III's ``gamma_1``, CLIP's) shows as loaded, not as new."""
    given = weights.state_dict
    heads = head_keys(classifiers)
    how = {d.split(":")[0]: d.split(":", 1)[1].strip() for d in derived}
    result = InitReport(weights.name)
    for key, tensor in loaded.items():
        root = key.split(".")[0]
        if key in heads and weights.other_classes:
            result.new.append(f"{key}: trained for other classes ({', '.join(weights.class_names[:2])}, ...)")
        elif key in heads and key in given and weights.num_classes != num_classes:
            result.new.append(f"{key}: {weights.num_classes} -> {num_classes} classes")
        elif key in given and given[key].shape != tensor.shape:
            result.adapted.append(f"{key}: {list(given[key].shape)} -> {list(tensor.shape)}" + (f", {how[root]}" if root in how else ""))
        elif root in how:
            result.adapted.append(f"{key}: {how[root]}")
        elif key in given or not torch.equal(tensor, fresh[key]):
            result.loaded.append(key)  # by its name, or under another one by timm's checkpoint filter
        else:
            result.new.append(f"{key}: not in the weights")
    result.ignored = [key for key in given if key not in loaded]
    return result


def check_something_loaded(result: InitReport, classifiers: Tuple[str, ...], model_name: str) -> None:
    """Refuse weights that left the whole network as it was built (another architecture, prefixed keys):
    a run would otherwise train from random weights while the user believes it fine-tunes."""
    heads = head_keys(classifiers)
    body = [k for k in result.loaded + [a.split(":")[0] for a in result.adapted] if k not in heads]
    if not body:
        names = ", ".join(result.ignored[:3]) or "none"
        raise CSKDError(f"{result.source} shares no tensor with {model_name} (its tensors are named e.g. {names}); "
                        "pass weights of this architecture")


def drop_heads_of_other_classes(weights: PretrainedWeights, class_names: Sequence[str], classifiers: Tuple[str, ...]) -> None:
    """A cskd run of as many classes as this one but other ones (classes 0-4, now 5-9): its heads map
    features to the wrong classes, so they are dropped and start fresh, as for another class count."""
    if weights.class_names and len(weights.class_names) == len(class_names) and weights.class_names != list(class_names):
        heads = head_keys(classifiers)
        weights.state_dict = {k: v for k, v in weights.state_dict.items() if k not in heads}
        weights.other_classes = True


def build_initialised(build: Callable[[Dict[str, Any]], nn.Module], network: Callable[[nn.Module], nn.Module], reference: str,
                      role: str, num_classes: int, img_size: int, distilled: bool,
                      class_names: Sequence[str] = ()) -> Tuple[nn.Module, InitReport]:
    """``build(timm_kwargs)`` started from ``reference``'s weights; ``network(model)`` is the timm model inside.

    A random-weight build first tells which tensors are the input convolution and the classifiers
    (the model's ``pretrained_cfg``) and lets mismatches be refused before timm loads anything.
    """
    seed = int(torch.randint(2**31 - 1, ()))  # both builds draw the same random weights: see report()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = network(build({}))
    cfg = getattr(fresh, "pretrained_cfg", {}) or {}
    first_conv = cfg.get("first_conv")
    classifiers = tuple([cfg["classifier"]] if isinstance(cfg.get("classifier"), str) else cfg.get("classifier") or ())
    weights = read_pretrained(reference, role, first_conv, classifiers)
    drop_heads_of_other_classes(weights, class_names, classifiers)
    derived: List[str] = []
    if distilled:
        weights.state_dict, derived = add_distillation_token(weights.state_dict)
    check_fits(weights, fresh, classifiers, first_conv, role)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(timm_kwargs(weights, img_size))
    except RuntimeError as exc:  # what timm could not adapt
        raise CSKDError(f"{weights.name} does not fit this model: {str(exc).splitlines()[0][:300]}") from None
    net = network(model)
    net.pretrained_cfg = net.default_cfg = fresh.pretrained_cfg  # timm kept the overlay: the whole state dict
    result = report(weights, fresh.state_dict(), net.state_dict(), derived, classifiers, num_classes)
    check_something_loaded(result, classifiers, type(net).__name__)
    return model, result
