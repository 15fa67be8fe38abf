"""cskd plan's candidates: the NAME[:key=value,...] parser (good specs and every bad part named), the
default family at the data's size, and the `cskd train` overrides that train a candidate."""

from __future__ import annotations

import pytest

from cskd.config import load_config
from cskd.data.datasets import build_dataset
from cskd.errors import CSKDError
from cskd.measure.candidates import (
    DEIT_SMALL,
    DEIT_TINY,
    DEMO_STUDENT,
    Candidate,
    default_family,
    flow_mapping,
    parse_candidate,
    train_command,
    unique,
)
from cskd.pairing import count_params
from cskd.tasks import get_task


@pytest.mark.parametrize("text, expected", [
    (DEMO_STUDENT, Candidate(DEMO_STUDENT, {}, None)),
    (f"{DEMO_STUDENT}:embed_dim=128,depth=6,num_heads=4", Candidate(DEMO_STUDENT, {"embed_dim": 128, "depth": 6, "num_heads": 4})),
    (f"{DEIT_TINY}:patch_size=8", Candidate(DEIT_TINY, {}, 8)),
    (f" {DEIT_TINY} : mlp_ratio = 2.5 , qkv_bias=false ", Candidate(DEIT_TINY, {"mlp_ratio": 2.5, "qkv_bias": False})),
])
def test_a_good_spec_parses_to_its_model_options_and_patch_size(text, expected):
    assert parse_candidate(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "has no model name"),
    (":depth=2", "has no model name"),
    ("train.epochs=3", "looks like a config override"),
    ("deit_tiny_distiled_patch16_224", "is not a timm model"),
    (f"{DEMO_STUDENT}:", "no options after it"),
    (f"{DEMO_STUDENT}:depth", "option 'depth' is not key=value"),
    (f"{DEMO_STUDENT}:depth=", "option 'depth=' is not key=value"),
    (f"{DEMO_STUDENT}:depth=2,,num_heads=2", "option '' is not key=value"),
    (f"{DEMO_STUDENT}:2x=3", "'2x' is not an option name"),
    (f"{DEMO_STUDENT}:depth=2,depth=3", "sets depth twice"),
    (f"{DEMO_STUDENT}:img_size=64", "student.img_size"),
    (f"{DEMO_STUDENT}:drop_path_rate=0.1", "student.drop_path"),
    (f"{DEMO_STUDENT}:patch_size=0", "patch_size=0 is not a positive whole number"),
    (f"{DEMO_STUDENT}:patch_size=4.5", "patch_size=4.5 is not a positive whole number"),
    (f"{DEMO_STUDENT}:depth={{a: 1}}", "is not a single value"),
])
def test_a_bad_spec_is_refused_naming_the_bad_part(text, fragment):
    with pytest.raises(CSKDError) as error:
        parse_candidate(text)
    assert fragment in str(error.value) and repr(text) in str(error.value)  # the whole spec, and what is wrong in it


def test_the_default_family_spans_smaller_to_larger_than_the_demo_student_with_timms_deits():
    family = default_family(DEMO_STUDENT, {}, 32, 4)
    assert 8 <= len(family) <= 10
    assert family[0] == Candidate(DEMO_STUDENT, {}, 4)  # the config's own student, first
    assert {DEIT_TINY, DEIT_SMALL} <= {c.model for c in family}
    built = [architecture(c, 32, 4) for c in family]
    assert len(set(built)) == len(family)  # each network once, told apart by what timm builds
    params = [student_params(c, 32, 4) for c in family]
    assert min(params) < params[0] < max(params)


def test_a_config_student_that_spells_out_a_default_is_not_planned_twice():
    spelled = default_family(DEMO_STUDENT, {"embed_dim": 96, "depth": 4}, 32, 4)  # the demo student's own defaults
    assert len(spelled) == len(default_family(DEMO_STUDENT, {}, 32, 4))
    assert spelled[0] == Candidate(DEMO_STUDENT, {"embed_dim": 96, "depth": 4}, 4)  # the config's spelling, first
    assert Candidate(DEMO_STUDENT, {}, 4) not in spelled  # the family's own spelling of that network: left out


def test_a_patch_size_that_does_not_divide_the_image_is_left_out_of_the_family():
    family = default_family(DEMO_STUDENT, {}, 36, 4)  # 8 px patches do not tile 36 px
    assert family and all(c.patch_size == 4 for c in family)


def architecture(candidate: Candidate, img_size: int, patch_size: int) -> tuple:
    """Model, width, depth, heads, MLP width and patch of the network ``candidate`` builds, read off the network."""
    import torch

    from cskd.models import create_student

    with torch.device("meta"):  # shapes only: the real initialisation of the family takes seconds
        vit = create_student(candidate.model, 10, img_size, candidate.patch_size or patch_size, 1, **candidate.kwargs).vit
    return (candidate.model, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, vit.blocks[0].mlp.fc1.out_features,
            vit.patch_embed.patch_size)


def student_params(candidate: Candidate, img_size: int, patch_size: int) -> int:
    """Parameters of the fused student that ``candidate`` builds directly with timm's options."""
    from cskd.models import create_student, fuse_heads

    student = create_student(candidate.model, 10, img_size, candidate.patch_size or patch_size, 1, **candidate.kwargs)
    return count_params(fuse_heads(student))


@pytest.mark.parametrize("candidate", [Candidate(DEMO_STUDENT, {"embed_dim": 64, "depth": 2, "num_heads": 2}, 8),
                                       Candidate(DEIT_TINY, {"depth": 2}, None), Candidate(DEMO_STUDENT, {}, None)])
def test_the_printed_overrides_train_the_same_architecture(candidate):
    # the user's config already sets other student options: the candidate's replace them, not add to them
    user = ["student.kwargs={depth: 8, mlp_ratio: 2.0}", "student.patch_size=2"]
    cfg = load_config(None, [*user, *candidate.overrides(32, 4)])
    task = get_task("student")
    _, info = build_dataset(cfg.data.name, "val")
    trained = count_params(task.deployable(task.build(task.spec(cfg, info))))
    assert cfg.student.patch_size == (candidate.patch_size or 4) and cfg.student.kwargs == candidate.kwargs
    assert trained == student_params(candidate, 32, 4)


def test_the_train_command_quotes_what_the_shell_would_split():
    command = train_command("my.yaml", ["data.path=/a b", "student.kwargs=" + flow_mapping({"embed_dim": 96, "depth": 4})])
    assert command == "cskd train --config my.yaml 'data.path=/a b' 'student.kwargs={embed_dim: 96, depth: 4}'"
    assert flow_mapping({}) == "{}"


def test_the_same_network_twice_is_planned_once():
    config_patch = parse_candidate(f"{DEMO_STUDENT}:depth=2")
    explicit = parse_candidate(f"{DEMO_STUDENT}:depth=2,patch_size=4")
    assert unique([config_patch, explicit], 32, 4) == [config_patch]  # the config's patch size is 4: one network
    assert unique([config_patch, explicit], 32, 8) == [config_patch, explicit]


def test_spellings_of_one_network_collapse_into_the_first_and_different_networks_stay_apart():
    plain = parse_candidate(DEMO_STUDENT)  # 96 wide, 4 deep, 3 heads, MLP ratio 4.0, 4 px patches at 32 px
    spellings = [f"{DEMO_STUDENT}:embed_dim=96", f"{DEMO_STUDENT}:depth=4,num_heads=3,mlp_ratio=4",
                 f"{DEMO_STUDENT}:mlp_ratio=4.0,qkv_bias=true", f"{DEMO_STUDENT}:patch_size=4"]
    assert unique([plain, *[parse_candidate(t) for t in spellings]], 32, 4) == [plain]
    # one setting off the default each: same parameter count for the heads, other networks all the same
    others = [parse_candidate(f"{DEMO_STUDENT}:{option}") for option in
              ("num_heads=4", "mlp_ratio=2.0", "qkv_bias=false", "drop_rate=0.1", "patch_size=8", "embed_dim=120")]
    assert unique([plain, *others], 32, 4) == [plain, *others]
    assert student_params(plain, 32, 4) == student_params(others[0], 32, 4)  # told apart by what the parameters do not show
