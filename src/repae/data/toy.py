"""The toy world's dataset: 10 classes of coloured shapes on varied backgrounds, 32x32 RGB.

Image i is a pure function of (seed, i): class = i mod 10 (so any contiguous range is
class-balanced), and colour, size, position, rotation and background come from a
generator seeded by (seed, i). Each shape's mask is rasterised at 4x and averaged down to
its coverage of each pixel, so edges are anti-aliased (toy world v6; v5 and earlier blended whole
4x images, which differs by at most 1/255 on 0.2% of the pixels and took twice as long). No two
classes are rotations of each other, so rotation is a nuisance variable, not a class cue.

Shapes are tilted by at most MAX_TILT_DEG and fill 60-84% of the image width. Measured (v2 -> v3
of the toy world, the default `repae train`, 1200 steps on an H100): with any rotation and 48-80%
of the width, the toy evaluator recognised 47% of the samples, and only the rotation-invariant
classes (circle, ring) looked right; with the tilt limited to 20 degrees 70%, and with larger
shapes as well 80%, every class recognisable by eye. Larger shapes alone did not help (47%).
"""

from __future__ import annotations

import colorsys
from typing import NamedTuple, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES = ("circle", "square", "triangle", "plus", "ring", "star", "semicircle", "crescent", "L-shape", "bar")
_SUPER = 4  # supersampling factor for anti-aliasing
MAX_TILT_DEG = 20.0
RADIUS_RANGE = (0.30, 0.42)  # of the image width: the shape's circumradius
DISTRACTOR_RADIUS_RANGE = (0.14, 0.20)  # the unlabelled shapes': about half the labelled one's


def _mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of class `kind` in its own frame (unit size, centred). u, v: [H,W]."""
    r = np.hypot(u, v)
    if kind == 0:
        return r <= 1.0
    if kind == 1:
        return np.maximum(abs(u), abs(v)) <= 0.8
    if kind == 2:  # equilateral triangle with circumradius 1
        return (v >= -0.5) & (np.sqrt(3) * u + v <= 1.0) & (-np.sqrt(3) * u + v <= 1.0)
    if kind == 3:
        return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
    if kind == 4:
        return (r <= 1.0) & (r >= 0.55)
    if kind == 5:  # five-pointed star: radius oscillates between 0.45 and 1
        theta = np.arctan2(v, u)
        frac = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at a point, 0 between points
        return r <= 0.45 + 0.55 * frac**2
    if kind == 6:
        return (r <= 1.0) & (v >= 0)
    if kind == 7:
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    if kind == 8:
        return ((abs(u + 0.55) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v - 0.7) <= 0.3) & (u >= -0.85) & (u <= 0.8))
    if kind == 9:
        return (abs(u) <= 1.05) & (abs(v) <= 0.35)
    raise ValueError(f"no toy class {kind}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def render(index: int, seed: int = 0, size: int = 32, distractors: int = 0) -> Tuple[np.ndarray, int]:
    """Image `index` of the toy world: (uint8 [size,size,3], label)."""
    image, label, _ = render_with_coverage(index, seed, size, distractors)
    return image, label


def _shape_coverage(kind: int, cx: float, cy: float, radius: float, rot: float, size: int) -> np.ndarray:
    """Fraction of each pixel [size,size,1] that shape `kind` (centre cx, cy and circumradius in [0,1] image units,
    tilted by `rot` radians) covers, from a _SUPER x supersampled mask."""
    n = size * _SUPER
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / n  # [0,1) coordinates of the supersamples
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u = np.cos(rot) * dx + np.sin(rot) * dy
    v = -np.sin(rot) * dx + np.cos(rot) * dy
    return _mask(kind, u, -v).reshape(size, _SUPER, size, _SUPER).mean(axis=(1, 3), dtype=np.float32)[..., None]


class Scene(NamedTuple):
    """The random draws of one image that precede its distractors and noise (its "generative factors")."""

    bg_hue: float
    c0: np.ndarray  # float32 [3] RGB in [0,1]: the background gradient's two end colours
    c1: np.ndarray
    angle: float  # the gradient's direction, radians
    fg_val: float
    fg: np.ndarray  # float32 [3]: the labelled shape's colour
    radius: float  # its circumradius, in image widths
    cx: float
    cy: float
    rot: float  # its tilt, radians


def _draw_scene(rng: np.random.Generator) -> Scene:
    """The background and the labelled shape, drawn in the order every toy world since v1 draws them (changing
    the order changes every image)."""
    # background: a linear gradient between two colours in a random direction, plus faint noise (added later).
    # A linear ramp's mean over a pixel's supersamples is its value at their centre, so it is computed
    # per pixel; only the shape's mask is supersampled (its coverage anti-aliases the edges)
    bg_hue = rng.random()
    bg_val = rng.uniform(0.1, 0.45) if rng.random() < 0.5 else rng.uniform(0.65, 0.95)
    c0 = _hsv(bg_hue, rng.uniform(0.0, 0.6), bg_val)
    c1 = _hsv(bg_hue + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.6), np.clip(bg_val + rng.uniform(-0.15, 0.15), 0, 1))
    angle = rng.uniform(0, 2 * np.pi)
    # shape: its own hue, value far from the background's so it always stands out
    fg_val = rng.uniform(0.75, 1.0) if bg_val < 0.5 else rng.uniform(0.05, 0.35)
    fg = _hsv(bg_hue + rng.uniform(0.25, 0.75), rng.uniform(0.55, 1.0), fg_val)
    radius = rng.uniform(*RADIUS_RANGE)
    cx, cy = rng.uniform(radius, 1 - radius, size=2)
    rot = np.deg2rad(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
    return Scene(bg_hue, c0, c1, angle, fg_val, fg, radius, cx, cy, rot)


# What `scene_factors` returns, column by column: what an image is made of beyond its class, and unchanged by the
# flips and quarter turns the toy evaluator trains with (the shape's position and tilt, and the gradient's
# direction, are not: the evaluator reads the position from the pixels' coverage instead)
SCENE_FACTORS = ("shape R", "shape G", "shape B", "background mean R", "background mean G", "background mean B",
                 "background contrast R", "background contrast G", "background contrast B", "shape radius")


def scene_factors(length: int, seed: int = 0, offset: int = 0) -> np.ndarray:
    """float32 [length, len(SCENE_FACTORS)]: the generative factors of images offset..offset+length-1 (only the
    random draws, no rendering: about 30 us an image)."""
    rows = []
    for i in range(offset, offset + length):
        s = _draw_scene(np.random.default_rng([seed, i]))
        rows.append(np.concatenate([s.fg, (s.c0 + s.c1) / 2, np.abs(s.c1 - s.c0), [s.radius]]))
    return np.asarray(rows, dtype=np.float32).reshape(length, len(SCENE_FACTORS))


def render_with_coverage(index: int, seed: int = 0, size: int = 32,
                         distractors: int = 0) -> Tuple[np.ndarray, int, np.ndarray]:
    """Image `index` of the toy world, its label, and the fraction of each pixel a shape covers
    (float32 [size,size] in [0,1]): the objects' layout, which the toy teacher learns to see.

    distractors: smaller shapes of other classes drawn behind the labelled one, as ImageNet photographs
    hold more than the object they are labelled by (the label stays the large shape's). 0 renders the
    single-shape world exactly as before (no random draw is added)."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, index])
    scene = _draw_scene(rng)
    n = size * _SUPER
    ys, xs = (np.mgrid[0:size, 0:size].astype(np.float32) * _SUPER + (_SUPER - 1) / 2) / n  # supersample centres
    ramp = (np.cos(scene.angle) * (xs - 0.5) + np.sin(scene.angle) * (ys - 0.5) + 0.71) / 1.42
    background = scene.c0 * (1 - ramp[..., None]) + scene.c1 * ramp[..., None]
    bg_hue, fg_val, fg = scene.bg_hue, scene.fg_val, scene.fg
    radius, cx, cy, rot = scene.radius, scene.cx, scene.cy, scene.rot
    image, coverage = background, np.zeros((size, size, 1), np.float32)
    placed = [(cx, cy, radius)]
    for _ in range(distractors):  # behind the labelled shape, which stays whole
        kind = (label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)  # never the labelled class
        r = rng.uniform(*DISTRACTOR_RADIUS_RANGE)
        for _ in range(20):  # the first of a few draws that keeps clear of the shapes placed, else the last
            x, y = rng.uniform(r, 1 - r, size=2)
            if all(np.hypot(x - px, y - py) >= 0.8 * (r + pr) for px, py, pr in placed):
                break
        placed.append((x, y, r))
        colour = _hsv(bg_hue + rng.uniform(0.25, 0.75), rng.uniform(0.55, 1.0), fg_val)
        cov = _shape_coverage(kind, x, y, r, np.deg2rad(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG)), size)
        image = image * (1 - cov) + colour * cov
        coverage = np.maximum(coverage, cov)
    main = _shape_coverage(label, cx, cy, radius, rot, size)
    image = image * (1 - main) + fg * main
    coverage = np.maximum(coverage, main)
    image = image + rng.normal(0, 0.015, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), label, coverage[..., 0]


class ToyShapes(Dataset):
    """`length` toy images starting at `offset`: (uint8 [3,H,W], label). Use a different `seed`
    (or a disjoint offset range) for held-out data."""

    num_classes = len(CLASSES)

    def __init__(self, length: int, seed: int = 0, offset: int = 0, image_size: int = 32):
        self.length, self.seed, self.offset, self.image_size = length, seed, offset, image_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        img, label = render(self.offset + i, self.seed, self.image_size)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), label


def toy_arrays(length: int, seed: int = 0, offset: int = 0, image_size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """A whole range rendered at once in numpy only (safe in a forked worker, where torch's
    OpenMP pool can deadlock): (uint8 [N,3,H,W], int64 [N])."""
    images, labels, _ = toy_arrays_with_coverage(length, seed, offset, image_size)
    return images, labels


def toy_arrays_with_coverage(length: int, seed: int = 0, offset: int = 0, image_size: int = 32,
                             distractors: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`toy_arrays` and the shapes' pixel coverage, quantised to uint8 [N,H,W] (255: fully inside)."""
    items = [render_with_coverage(offset + i, seed, image_size, distractors) for i in range(length)]
    images = np.ascontiguousarray(np.stack([img for img, _, _ in items]).transpose(0, 3, 1, 2))
    coverage = (np.stack([cov for _, _, cov in items]) * 255 + 0.5).astype(np.uint8)
    return images, np.array([label for _, label, _ in items], dtype=np.int64), coverage


def toy_tensor(length: int, seed: int = 0, offset: int = 0, image_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """A whole range rendered at once: (uint8 [N,3,H,W], int64 [N]). For small in-memory sets."""
    images, labels = toy_arrays(length, seed, offset, image_size)
    return torch.from_numpy(images), torch.from_numpy(labels)
