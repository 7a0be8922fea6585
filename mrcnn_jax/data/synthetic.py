"""A hand-made padded batch, independent of the TFDS input pipeline (tests, notebooks, benchmarks).

Each image holds a few axis-aligned rectangles (class 1) and discs (class 2) of distinct colours
on a dark background, later shapes occluding earlier ones. As in the `shapes` dataset, an
instance is what is left visible of it (fewer than `MIN_VISIBLE_PIXELS` pixels: dropped) and its
box is that mask's tight box; the gt masks are cropped to their boxes with the same definition
the input pipeline uses (`ops.masks.crop_and_resize`).
"""

import numpy as np

from mrcnn_jax.ops.masks import crop_and_resize

MIN_VISIBLE_PIXELS = 16


def _shapes(rng, size, max_instances):
    yy, xx = np.mgrid[:size, :size] + 0.5
    boxes, classes, masks = [], [], []
    for _ in range(rng.integers(1, max_instances + 1)):
        s = rng.uniform(0.25, 0.45) * size
        x1, y1 = rng.uniform(0, size - s, size=2)
        cls = int(rng.integers(1, 3))
        if cls == 1:
            m = (xx >= x1) & (xx <= x1 + s) & (yy >= y1) & (yy <= y1 + s)
        else:
            m = (xx - x1 - s / 2) ** 2 + (yy - y1 - s / 2) ** 2 <= (s / 2) ** 2
        for prev in masks:  # later shapes occlude earlier ones
            prev &= ~m
        masks.append(m)
        classes.append(cls)
    keep = [k for k, m in enumerate(masks) if m.sum() >= MIN_VISIBLE_PIXELS]
    for k in keep:
        ys, xs = np.nonzero(masks[k])
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # tight, COCO's widths
    return (
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array([classes[k] for k in keep], np.int32),
        np.array([masks[k] for k in keep], bool).reshape(-1, size, size),
    )


def make_batch(config, batch_size: int, seed: int = 0, max_shapes: int = 3) -> dict:
    """A batch in the layout of `mrcnn_jax.structures` for `config.data` (square images)."""
    rng = np.random.default_rng(seed)
    h, w = config.data.image_size
    m, s = config.data.max_instances, config.data.mask_crop_size
    colours = {1: np.array([1.0, -0.5, -0.5]), 2: np.array([-0.5, -0.5, 1.0])}
    out = {
        "images": np.zeros((batch_size, h, w, 3), np.float32),
        "image_sizes": np.tile(np.array([h, w], np.int32), (batch_size, 1)),
        "gt_boxes": np.zeros((batch_size, m, 4), np.float32),
        "gt_classes": np.full((batch_size, m), -1, np.int32),
        "gt_valid": np.zeros((batch_size, m), bool),
        "gt_is_crowd": np.zeros((batch_size, m), bool),
        "gt_masks": np.zeros((batch_size, m, s, s), np.uint8),
        "image_ids": np.arange(batch_size, dtype=np.int64) + 1,
        "orig_sizes": np.tile(np.array([h, w], np.int32), (batch_size, 1)),
        "scales": np.ones((batch_size, 2), np.float32),
        "example_valid": np.ones((batch_size,), bool),
    }
    for b in range(batch_size):
        boxes, classes, masks = _shapes(rng, h, min(max_shapes, m))
        img = rng.normal(0, 0.1, size=(h, w, 3))
        for cls, mask in zip(classes, masks, strict=True):
            img[mask] = colours[int(cls)]
        n = len(boxes)
        out["images"][b] = img
        out["gt_boxes"][b, :n] = boxes
        out["gt_classes"][b, :n] = classes
        out["gt_valid"][b, :n] = True
        if n:
            crops = [np.asarray(crop_and_resize(mk.astype(np.float32), bx[None], s))[0]
                     for mk, bx in zip(masks, boxes, strict=True)]
            out["gt_masks"][b, :n] = np.stack(crops) >= 0.5
    return out
