"""One affine sampling map for crop, flip and a recipe's similarity: checked against torchvision's
roi_align, torch.rot90 and whole-pixel moves, which it must reproduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_align

from cskd.data import geometry

torch.manual_seed(0)
MAPS = torch.randn(6, 3, 4, 4)


def _no_motion(count: int) -> tuple:
    return torch.zeros(count), torch.ones(count), torch.zeros(count, 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.5), st.floats(0, 0.5), st.floats(0.2, 0.5), st.floats(0.2, 0.5)), min_size=1, max_size=6))
def test_a_box_samples_as_roi_align_does(boxes):
    """Aligned RoIAlign with adaptive sampling, torchvision's, is the reference for a crop box."""
    rows = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
    maps = MAPS[: len(rows)]
    rois = torch.cat([torch.arange(len(rows), dtype=torch.float32)[:, None], rows * 4], dim=1)
    expected = roi_align(maps, rois, output_size=(4, 4), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    got = geometry.warp(maps, geometry.box_theta(rows), (4, 4), average=True, padding="border")
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_flip_mirrors_and_a_coarser_grid_averages_cells():
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(6, 4)
    flips = torch.tensor([True, False] * 3)
    got = geometry.warp(MAPS, geometry.box_theta(whole, flips), (4, 4), average=True)
    assert torch.allclose(got[0], MAPS[0].flip(-1), atol=1e-6) and torch.allclose(got[1], MAPS[1], atol=1e-6)
    fine = torch.randn(2, 3, 8, 8)
    assert geometry.samples_per_cell(geometry.identity(2), (8, 8), (4, 4)) == (2, 2)
    assert torch.allclose(geometry.warp(fine, geometry.identity(2), (4, 4), average=True), F.avg_pool2d(fine, 2), atol=1e-6)


def test_a_quarter_turn_is_rot90_counter_clockwise():
    angle, scale, shift = _no_motion(6)
    theta = geometry.similarity(angle + 90, scale, shift)
    assert torch.allclose(geometry.warp(MAPS, theta, (4, 4), average=True), torch.rot90(MAPS, 1, dims=(-2, -1)), atol=1e-5)


def test_a_whole_pixel_shift_moves_every_pixel_and_fills_black():
    images = torch.rand(2, 1, 32, 32)
    angle, scale, _ = _no_motion(2)
    moved = geometry.warp(images, geometry.similarity(angle, scale, torch.tensor([[3 / 32, -2 / 32]] * 2)), (32, 32))
    assert torch.allclose(moved[..., :30, 3:], images[..., 2:, :29], atol=1e-5)  # right 3, up 2
    assert moved[..., :, :3].abs().max() == 0 and moved[..., 30:, :].abs().max() == 0


def test_magnifying_twice_shows_the_central_half():
    images = torch.rand(1, 1, 8, 8)
    angle, _, shift = _no_motion(1)
    zoomed = geometry.warp(images, geometry.similarity(angle, torch.tensor([2.0]), shift), (4, 4), average=True)
    assert torch.allclose(zoomed, images[..., 2:6, 2:6], atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.floats(-30, 30), st.floats(0.8, 1.25), st.floats(-0.2, 0.2), st.floats(-0.2, 0.2), st.booleans())
def test_composing_maps_equals_applying_them_one_after_the_other(angle, scale, dx, dy, flip):
    """Sampling through ``compose(outer, inner)`` is sampling through ``inner``'s points mapped by ``outer``."""
    outer = geometry.box_theta(torch.tensor([[0.1, 0.2, 0.8, 0.9]]), torch.tensor([flip]))
    inner = geometry.similarity(torch.tensor([angle]), torch.tensor([scale]), torch.tensor([[dx, dy]]))
    points = F.affine_grid(inner, [1, 1, 5, 5], align_corners=False)  # [1, 5, 5, 2]: inner's sample points
    through_outer = points @ outer[0, :, :2].T + outer[0, :, 2]
    assert torch.allclose(F.affine_grid(geometry.compose(outer, inner), [1, 1, 5, 5], align_corners=False), through_outer, atol=1e-5)
