"""FPN anchors as one fixed numpy array, computed once on the host and passed into jit.

Anchor ORDER (what every consumer relies on): level-major (P2 first), then feature row y, then
feature column x, then aspect ratio. That is exactly an RPN head output of shape `[H, W, A]` per
level, flattened and concatenated over levels; it is also the order of torchvision's
`AnchorGenerator` and detectron2's `DefaultAnchorGenerator` (location-major, anchor-minor).

Boxes are xyxy in absolute pixels of the padded input image (see `ops/boxes.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def feature_shapes(image_size: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """(ceil(H / s), ceil(W / s)) for each stride s.

    A chain of stride-2 convs / pools (padding "SAME") on an input padded to a multiple of 32 gives
    exactly H / s for s <= 32; P6 = max-pool (k=1, s=2) of P5 gives ceil(n / 2), which is the
    ceil for s = 64 too.
    """
    h, w = image_size
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def num_anchors_per_level(
    image_size: tuple[int, int], strides: Sequence[int], num_ratios: int
) -> list[int]:
    """Static anchor count of each level: H_l * W_l * num_ratios, in anchor order."""
    return [fh * fw * num_ratios for fh, fw in feature_shapes(image_size, strides)]


def base_anchors(size: float, aspect_ratios: Sequence[float], round_base: bool) -> np.ndarray:
    """Cell anchors centred at 0 for one size: [R, 4] float32 xyxy, one row per aspect ratio.

    Aspect ratio = h / w and area = size**2.
    round_base=False (detectron2 `generate_cell_anchors`, float64 then float32):
        w = sqrt(size**2 / ratio), h = ratio * w, box = [-w/2, -h/2, w/2, h/2].
    round_base=True (torchvision `AnchorGenerator.generate_anchors`, in float32):
        hr = sqrt(ratio), wr = 1 / hr, ws = wr * size, hs = hr * size,
        box = round([-ws, -hs, ws, hs] / 2)  (round half to even, as torch.round).
    """
    if round_base:
        ratios = np.asarray(aspect_ratios, np.float32)
        h_ratios = np.sqrt(ratios)
        w_ratios = np.float32(1.0) / h_ratios
        ws = w_ratios * np.float32(size)
        hs = h_ratios * np.float32(size)
        box = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
        return np.round(box).astype(np.float32)
    rows = []
    for ratio in aspect_ratios:
        w = math.sqrt(size**2.0 / ratio)
        h = ratio * w
        rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(rows, np.float64).astype(np.float32)


def generate_anchors(
    image_size: tuple[int, int],
    strides: Sequence[int] = (4, 8, 16, 32, 64),
    sizes: Sequence[float] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    round_base: bool = False,
) -> np.ndarray:
    """All anchors of the padded image: [A_total, 4] float32 xyxy, absolute pixels.

    One size per level (len(sizes) == len(strides)). The anchor of feature cell (y, x) at stride s
    is centred at (x * s, y * s): offset 0, the default of detectron2 and torchvision. Order:
    level, y, x, ratio (see the module docstring); A_total = sum(num_anchors_per_level(...)).
    """
    if len(sizes) != len(strides):
        raise ValueError(f"one anchor size per level: {len(sizes)} sizes, {len(strides)} strides")
    levels = []
    shapes = feature_shapes(image_size, strides)
    for (fh, fw), stride, size in zip(shapes, strides, sizes, strict=True):
        cell = base_anchors(size, aspect_ratios, round_base)  # [R, 4]
        xs = np.arange(fw, dtype=np.float32) * np.float32(stride)
        ys = np.arange(fh, dtype=np.float32) * np.float32(stride)
        sy, sx = np.meshgrid(ys, xs, indexing="ij")  # [fh, fw], y-major
        shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)  # [fh * fw, 1, 4]
        levels.append((shifts + cell[None]).reshape(-1, 4))
    return np.concatenate(levels, axis=0).astype(np.float32)


def padded_image_size(image_size, size_divisibility: int):
    """[..., 2] (h, w) resized image sizes -> int32 [..., 2]: each side rounded up to a multiple of
    size_divisibility (> 0), the batch size detectron2's ImageList / torchvision's
    GeneralizedRCNNTransform would pad a lone image to."""
    d = jnp.int32(size_divisibility)
    return (jnp.asarray(image_size).astype(jnp.int32) + d - 1) // d * d


def zero_beyond(x, padded_size, stride: int):
    """x [B, H, W, C], a map of `stride` canvas pixels per cell; padded_size [B, 2] (h, w) of each
    image padded to a multiple of 32 (`padded_image_size`), or None -> x. The cells outside that
    image, y * stride >= h or x * stride >= w, are set to 0, which is what a convolution on the
    padded image alone reads there (its zero padding)."""
    if padded_size is None:
        return x
    return jnp.where(cells_inside(x, padded_size, stride), x, jnp.zeros((), x.dtype))


def cells_inside(x, padded_size, stride: int):
    """[B, H, W, 1] bool: the cells of x ([B, H, W, C] at `stride`) inside each padded image
    (`zero_beyond`); also the mask of the statistics of a batch / group norm on x."""
    rows = jnp.arange(x.shape[1], dtype=jnp.int32) * stride < padded_size[:, :1]  # [B, H]
    cols = jnp.arange(x.shape[2], dtype=jnp.int32) * stride < padded_size[:, 1:]  # [B, W]
    return rows[:, :, None, None] & cols[:, None, :, None]


def inside_padded_image(anchors, image_size, size_divisibility: int):
    """anchors [A, 4] of the canvas, image_size [2] (h, w) of one resized image -> [A] bool: the
    anchors that exist when the image is padded only to a multiple of `size_divisibility`, as
    detectron2's ImageList and torchvision's GeneralizedRCNNTransform pad it (32 for FPN);
    0 = all of them.

    Every image here is padded to one canvas so that one graph serves all; the anchors centred in
    the extra padding see only zeros and are neither training samples nor proposals (otherwise
    they are half or more of the RPN's sampled negatives at COCO sizes on a 1344 x 1344 canvas).
    The anchor of feature cell (y, x) at stride s exists iff x * s < W_pad and y * s < H_pad
    (the ceil(W_pad / s) cells of each level). Centres are multiples of the stride (offset 0) and
    the padded sides multiples of 32, so the half-pixel margin only absorbs float rounding.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    if size_divisibility <= 0:
        return jnp.ones(anchors.shape[:1], bool)
    h_pad, w_pad = padded_image_size(image_size, size_divisibility).astype(jnp.float32)
    cx = (anchors[:, 0] + anchors[:, 2]) * 0.5
    cy = (anchors[:, 1] + anchors[:, 3]) * 0.5
    return (cx < w_pad - 0.5) & (cy < h_pad - 0.5)


ANCHOR_GRIDS = ("detectron2", "torchvision")


def image_anchors(
    anchors,
    image_size,
    *,
    level_counts: Sequence[int],
    strides: Sequence[int],
    size_divisibility: int,
    grid: str = "detectron2",
):
    """The canvas anchors [A, 4] as one image's RPN sees them -> [A, 4] (the same order).

    grid="detectron2": unchanged, cell (y, x) of the level of stride s centred at (x s, y s).
    grid="torchvision": its AnchorGenerator takes each level's stride from the padded image,
    (H_pad // grid_h, W_pad // grid_w) with grid = ceil(padded / s): s itself on P2-P5 when the
    image is padded to a multiple of 32, but on P6 an odd multiple of 32 gives less than 64 (an
    800-pixel side: 13 cells, stride 61), and torchvision's COCO weights learned those centres.
    The padded size is the image's (`inside_padded_image`), so size_divisibility must be > 0.
    """
    if grid not in ANCHOR_GRIDS:
        raise ValueError(f"config.model.anchor_grid must be one of {ANCHOR_GRIDS}, got {grid!r}")
    if grid == "detectron2":
        return anchors
    if size_divisibility <= 0:
        raise ValueError(
            "config.model.anchor_grid='torchvision' takes its strides from the image padded to"
            " config.model.rpn.size_divisibility, which must be > 0"
        )
    d = size_divisibility
    padded = padded_image_size(image_size, d)  # [2] (h, w)
    parts, start = [], 0
    for count, s in zip(level_counts, strides, strict=True):
        a = anchors[start : start + count]
        start += count
        if d % s == 0:  # the padded sides are multiples of s: the stride is s exactly
            parts.append(a)
            continue
        cells = (padded + s - 1) // s
        step = padded // cells  # [2] torchvision's (stride_h, stride_w)
        centre = (a[:, :2] + a[:, 2:]) * 0.5  # (x, y) = (ix s, iy s)
        index = jnp.round(centre / s)
        shift = index * (step[::-1] - s).astype(jnp.float32)  # (dx, dy)
        parts.append(a + jnp.concatenate([shift, shift], axis=1))
    return jnp.concatenate(parts, axis=0)
