"""The invariance recipe: tone noise that moves no pixel, affine noise that the cached target
follows (checked against the packaged teacher run live on the moved images), and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cskd.config import load_config
from cskd.data import geometry
from cskd.data.datasets import build_dataset
from cskd.data.invariance import RECIPES, AffineNoise, ToneNoise, get_recipe
from cskd.data.samples import Indexed
from cskd.data.shifts import FAMILIES
from cskd.data.transforms import train_transform
from cskd.errors import CSKDError
from cskd.run import resolve_cache_reference
from cskd.teacher_cache import TeacherCache
from cskd.teachers import CachedTeacher, load_teacher

RECIPE = RECIPES["tone-affine"]


def test_every_recipe_declares_families_of_the_suite_and_leaves_some_unseen():
    for recipe in RECIPES.values():
        assert set(recipe.trained_shifts) <= set(FAMILIES) and set(FAMILIES) - set(recipe.trained_shifts)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tone_noise_is_a_pointwise_map_so_the_target_may_stay(name):
    """Equal pixels stay equal wherever they are: no pixel moved, so the clean image's target still holds."""
    rng = np.random.default_rng(0)
    tone = ToneNoise(RECIPES[name])
    for _ in range(30):
        levels = rng.integers(0, 256, 8)
        pixels = levels[rng.integers(0, 8, (32, 32))].astype(np.uint8)
        out = np.asarray(tone(Image.fromarray(pixels)))
        for level in levels:
            assert len(np.unique(out[pixels == level])) == 1


def test_affine_noise_moves_a_dot_where_its_sampling_map_says():
    torch.manual_seed(0)
    noise = AffineNoise(RECIPE)
    image = torch.zeros(1, 32, 32)
    image[0, 14:18, 9:13] = 1.0  # a dot around pixel (10.5, 15.5)
    dot = torch.tensor([(10.5 + 0.5) / 16 - 1, (15.5 + 0.5) / 16 - 1])  # in normalised coordinates
    moved_any = 0
    for _ in range(20):
        warped, theta = noise(image)
        if torch.equal(theta, geometry.identity()[0]):
            assert torch.equal(warped, image)
            continue
        moved_any += 1
        ys, xs = torch.nonzero(warped[0] > 0.25, as_tuple=True)
        centre = torch.stack([(xs.float().mean() + 0.5) / 16 - 1, (ys.float().mean() + 0.5) / 16 - 1])
        assert torch.allclose(theta[:, :2] @ centre + theta[:, 2], dot, atol=0.05)  # the map takes it back to the dot
    assert 3 <= moved_any <= 17  # affine_prob 0.5 of 20


def test_the_recipe_records_each_images_map_beside_its_crop():
    cfg = load_config(None, ["data.workers=0", "data.invariance=tone-affine"])
    transform = train_transform(32, 1, None, [0.7, 1.0], 0.5, 0.0, cfg.data.interpolation, 0.0, invariance="tone-affine")
    dataset, _ = build_dataset("fashion-mnist-demo", "train", transform=transform)
    _, _, batch = next(iter(DataLoader(Indexed(dataset), batch_size=16)))
    assert set(batch) == {"index", "box", "flip", "affine"} and batch["affine"].shape == (16, 2, 3)


def test_the_cached_target_follows_a_move_as_the_live_teacher_sees_it():
    """The packaged demo cache moved through the map the images moved through, against the packaged
    teacher run on the moved images. The teacher's 4x4 map is only roughly equivariant (each cell sees
    most of a 32 px image), so the check is a move by one whole cell, up, down, left or right: the
    followed target is much closer to the live one than the unmoved target."""
    cfg = load_config(None, ["data.workers=0"])
    transform = train_transform(32, 1, None, [1.0, 1.0], 0.0, 0.0, cfg.data.interpolation, 0.0)
    dataset, info = build_dataset("fashion-mnist-demo", "train", transform=transform)
    images, _, batch = next(iter(DataLoader(Indexed(dataset), batch_size=128)))
    moves = torch.tensor([[0.25, 0.0], [-0.25, 0.0], [0.0, 0.25], [0.0, -0.25]]).repeat(32, 1)
    theta = geometry.similarity(torch.zeros(128), torch.ones(128), moves)
    moved = geometry.warp(images, theta, (32, 32))
    live_dense, _ = load_teacher(cfg, info, torch.device("cpu"))(moved)
    cached = CachedTeacher(TeacherCache(resolve_cache_reference(cfg.teacher.cache)))
    followed, _ = cached(moved, {**batch, "affine": theta})
    unmoved, _ = cached(moved, batch)
    assert (followed - live_dense).pow(2).mean() < 0.8 * (unmoved - live_dense).pow(2).mean()


def test_an_unknown_recipe_and_a_second_randaugment_are_refused():
    with pytest.raises(CSKDError, match="not a recipe; choose one of.*did you mean.*tone"):
        get_recipe("tones")
    with pytest.raises(CSKDError, match="is not a recipe"):
        load_config(None, ["data.invariance=noisy"])
    with pytest.raises(CSKDError, match="set data.auto_augment=null"):
        load_config(None, ["data.invariance=tone-affine", "data.auto_augment=rand-m9-mstd0.5-inc1"])


def test_a_recipe_without_moves_declares_no_geometry_and_never_moves_a_pixel():
    """tone trains on no geometric shift, so the suite judges translation, rotation and scale as unseen."""
    recipe = get_recipe("tone")
    assert "geometric" not in recipe.trained_shifts and recipe.affine_prob == 0
    image = torch.rand(1, 32, 32)
    for _ in range(20):
        warped, theta = AffineNoise(recipe)(image)
        assert torch.equal(theta, geometry.identity()[0]) and torch.equal(warped, image)
