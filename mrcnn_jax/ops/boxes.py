"""Box math. One convention everywhere: `[..., 4]` boxes as (x1, y1, x2, y2) in absolute pixels,
float32, with width = x2 - x1 (no "+1", as detectron2 and torchvision).

Every function works on arbitrary leading dimensions unless its signature says otherwise, and is
jit / vmap / grad friendly (no data-dependent shapes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

# detectron2 / torchvision clamp the predicted log-size deltas at log(1000 / 16) so exp() stays finite.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def widths_heights(boxes: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """boxes: [..., 4] -> (w [...], h [...])."""
    return boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]


def area(boxes: jnp.ndarray) -> jnp.ndarray:
    """boxes: [..., 4] -> [...]; degenerate (inverted) boxes have area 0."""
    w, h = widths_heights(boxes)
    return jnp.maximum(w, 0.0) * jnp.maximum(h, 0.0)


def pairwise_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """boxes1: [N, 4], boxes2: [M, 4] -> IoU [N, M] in [0, 1]; 0 where the union is empty."""
    lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(boxes1)[:, None] + area(boxes2)[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def clip_boxes(boxes: jnp.ndarray, height, width) -> jnp.ndarray:
    """Clips boxes [..., 4] to the image [0, width] x [0, height]; height / width may be traced."""
    x1 = jnp.clip(boxes[..., 0], 0.0, width)
    y1 = jnp.clip(boxes[..., 1], 0.0, height)
    x2 = jnp.clip(boxes[..., 2], 0.0, width)
    y2 = jnp.clip(boxes[..., 3], 0.0, height)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def valid_boxes(boxes: jnp.ndarray, min_size: float = 0.0) -> jnp.ndarray:
    """boxes: [..., 4] -> bool [...]: both sides strictly larger than `min_size`."""
    w, h = widths_heights(boxes)
    return (w > min_size) & (h > min_size)


def _centers_sizes(boxes):
    w, h = widths_heights(boxes)
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(
    boxes: jnp.ndarray, reference: jnp.ndarray, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> jnp.ndarray:
    """Deltas (dx, dy, dw, dh) [..., 4] that turn `reference` [..., 4] into `boxes` [..., 4].

    dx = wx * (cx - cx_ref) / w_ref, dw = ww * log(w / w_ref) (R-CNN parameterisation, as
    detectron2's Box2BoxTransform). The reference boxes must have positive size; callers mask out
    padded entries.
    """
    wx, wy, ww, wh = weights
    cx, cy, w, h = _centers_sizes(boxes)
    rcx, rcy, rw, rh = _centers_sizes(reference)
    rw = jnp.maximum(rw, 1e-6)
    rh = jnp.maximum(rh, 1e-6)
    dx = wx * (cx - rcx) / rw
    dy = wy * (cy - rcy) / rh
    dw = ww * jnp.log(jnp.maximum(w, 1e-6) / rw)
    dh = wh * jnp.log(jnp.maximum(h, 1e-6) / rh)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(
    deltas: jnp.ndarray,
    reference: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> jnp.ndarray:
    """Applies deltas [..., 4] to reference boxes [..., 4] -> boxes [..., 4] (inverse of encode).

    dw / dh are clamped at `scale_clamp` before exp(), as detectron2 and torchvision do.
    """
    wx, wy, ww, wh = weights
    rcx, rcy, rw, rh = _centers_sizes(reference)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
    cx = dx * rw + rcx
    cy = dy * rh + rcy
    w = jnp.exp(dw) * rw
    h = jnp.exp(dh) * rh
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
