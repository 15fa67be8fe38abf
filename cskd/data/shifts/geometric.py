"""The shifts ImageNet-C lacks and traffic brings: the object moved, turned, or nearer or farther.

Each moves every image of ``[N, C, H, W]`` by its own random direction at the severity's size
(bilinear, the border repeating the nearest edge pixel, as a crop of a larger photo would).
Severities 1-5 at 32 px: translation by 1-5 px (3-15% of the side), rotation by 5-25 degrees,
scale by 5-25% in or out."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TRANSLATE = (0.03, 0.06, 0.09, 0.12, 0.15)  # of the side
ROTATE = (5, 10, 15, 20, 25)  # degrees
SCALE = (0.05, 0.10, 0.15, 0.20, 0.25)  # zoom in or out by this share


def warp(x: np.ndarray, matrices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Output pixel ``p`` (as ``(y, x)`` about the centre) of image ``i`` reads input ``matrices[i] @ p + offsets[i]``."""
    n, c, h, w = x.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    points = np.stack([yy - cy, xx - cx])  # [2, H, W]
    source = np.einsum("nij,jhw->nihw", matrices, points) + offsets[:, :, None, None] + np.array([cy, cx])[None, :, None, None]
    coords = np.empty((4, n, c, h, w))
    coords[0] = np.arange(n)[:, None, None, None]
    coords[1] = np.arange(c)[None, :, None, None]
    coords[2] = source[:, None, 0]
    coords[3] = source[:, None, 1]
    return ndimage.map_coordinates(x, coords, order=1, mode="nearest").astype(np.float32)


def translate(x, rng, severity):
    n, _, h, w = x.shape
    angle = rng.uniform(0, 2 * np.pi, n)
    distance = TRANSLATE[severity - 1] * min(h, w)
    offsets = -distance * np.stack([np.sin(angle), np.cos(angle)], axis=1)  # content moves by +d: read from -d
    return warp(x, np.broadcast_to(np.eye(2), (n, 2, 2)), offsets)


def rotate(x, rng, severity):
    n = len(x)
    theta = np.radians(ROTATE[severity - 1]) * rng.choice([-1.0, 1.0], n)
    cos, sin = np.cos(theta), np.sin(theta)
    return warp(x, np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1), np.zeros((n, 2)))


def scale(x, rng, severity):
    n = len(x)
    factor = 1 + SCALE[severity - 1] * rng.choice([-1.0, 1.0], n)  # the content grows by factor: read at p / factor
    return warp(x, np.eye(2)[None] / factor[:, None, None], np.zeros((n, 2)))
