"""`shapes`: a synthetic instance-segmentation dataset, generated procedurally inside the builder
(no download), the default dataset of the Quick start.

Each image holds 0-6 circles, squares and triangles (3 classes) of 12-60 px (at 128 px images; sizes
scale with the image), random colours, overlapping in paint order, on a random colour with a sine
grating texture and Gaussian pixel noise. Masks are the painted pixels minus what later shapes
cover, so occlusion is exact; instances left with fewer than `MIN_VISIBLE_PIXELS` visible pixels
are dropped.
Every image is a function of (seed, split, index) alone. About 5% of the images are empty, so the
pipeline's `skip_empty_train` path is exercised.

Sizes and counts are a `ShapesConfig` (`shapes_config(...)` names it after them), so datasets of
different sizes sit side by side in the TFDS cache.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from mrcnn_jax import image_io
from mrcnn_jax.data import coco_utils

CLASS_NAMES = ("circle", "square", "triangle")
CATEGORIES = [{"id": k + 1, "name": n, "label": k + 1} for k, n in enumerate(CLASS_NAMES)]
SPLITS = ("train", "validation")
MAX_SHAPES = 6
EMPTY_FRACTION = 0.05
MIN_VISIBLE_PIXELS = 10
# Shape extent (diameter / side) in pixels at a 128 px image; scaled linearly with the image size.
SIZE_RANGE_128 = (12.0, 60.0)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 128
    num_train: int = 2000
    num_val: int = 200
    seed: int = 0


def shapes_config(image_size: int, num_train: int, num_val: int, seed: int = 0) -> ShapesConfig:
    return ShapesConfig(
        name=f"{image_size}px_{num_train}_{num_val}_seed{seed}",
        description=f"{num_train} train / {num_val} validation images of {image_size} px",
        image_size=image_size,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
    )


def _background(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """-> (image float32 [S, S, 3], base colour [3]): a colour plus a tinted sine grating."""
    size = xx.shape[0]
    base = rng.uniform(40, 215, size=3)
    fx, fy = rng.uniform(-6, 6, size=2)
    phase = rng.uniform(0, 2 * np.pi)
    grating = np.sin(2 * np.pi * (fx * xx + fy * yy) / size + phase)
    tint = rng.uniform(10, 40, size=3)
    return (base + grating[..., None] * tint).astype(np.float32), base


def _colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A random colour at least 100 (L2, 0-255) from the background's, so shapes stay visible."""
    for _ in range(20):
        c = rng.uniform(0, 255, size=3)
        if np.linalg.norm(c - base) >= 100:
            return c
    return 255.0 - base


def _shape_mask(label: int, rng, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """[S, S] bool: pixel centres inside a random circle (1), square (2) or triangle (3)."""
    size = xx.shape[0]
    extent = rng.uniform(*SIZE_RANGE_128) * size / 128.0
    cx, cy = rng.uniform(extent / 4, size - extent / 4, size=2)  # at most a quarter outside
    if label == 1:
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= (extent / 2) ** 2
    if label == 2:
        return (np.abs(xx - cx) <= extent / 2) & (np.abs(yy - cy) <= extent / 2)
    # Equilateral triangle of side `extent` (circumradius side / sqrt 3), random rotation; a point
    # is inside when it is left of all three counter-clockwise edges.
    r, theta = extent / math.sqrt(3.0), rng.uniform(0, 2 * np.pi)
    angles = theta + np.array([0.0, 2.0, 4.0]) * np.pi / 3
    vx, vy = cx + r * np.cos(angles), cy + r * np.sin(angles)
    inside = np.ones_like(xx, dtype=bool)
    for k in range(3):
        ax, ay, bx, by = vx[k], vy[k], vx[(k + 1) % 3], vy[(k + 1) % 3]
        inside &= (bx - ax) * (yy - ay) - (by - ay) * (xx - ax) >= 0
    return inside


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """One image -> (uint8 [S, S, 3], labels [k] in 1..3, visible masks [k] of bool [S, S])."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    image, base = _background(rng, xx, yy)
    n = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_SHAPES + 1))
    labels, masks = [], []
    for _ in range(n):
        label = int(rng.integers(1, len(CLASS_NAMES) + 1))
        mask = _shape_mask(label, rng, xx, yy)
        image[mask] = _colour(rng, base)
        for m in masks:  # the new shape occludes everything painted before it
            m &= ~mask
        labels.append(label)
        masks.append(mask)
    image += rng.normal(0, rng.uniform(4, 12), size=image.shape).astype(np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    keep = [k for k, m in enumerate(masks) if m.sum() >= MIN_VISIBLE_PIXELS]
    return image, [labels[k] for k in keep], [masks[k] for k in keep]


def make_example(seed: int, split: str, index: int, size: int) -> dict:
    """The stored example (`coco_utils.example_features`) of image `index` of `split`."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image, labels, masks = render(rng, size)
    image_id = index + 1
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[k] = [
            xs.min(),
            ys.min(),
            xs.max() + 1,
            ys.max() + 1,
        ]  # tight, COCO's width convention
    return {
        "image": image_io.encode_png(image),
        "image_id": image_id,
        "height": size,
        "width": size,
        "file_name": f"{split}/{image_id:06d}.png",
        "objects": {
            "id": [image_id * 100 + k for k in range(len(masks))],  # unique: MAX_SHAPES < 100
            "bbox": boxes,
            "label": labels,
            "category_id": labels,  # category ids are the labels 1..3
            "is_crowd": [False] * len(masks),
            "area": [float(m.sum()) for m in masks],
            "rle": [coco_utils.encode_mask(m) for m in masks],
        },
    }


class Shapes(coco_utils.InstancesBuilder):
    """The synthetic `shapes` dataset: `Shapes(config=shapes_config(...), data_dir=...)`."""

    RELEASE_NOTES = {"1.0.0": "Circles, squares and triangles with exact occlusion-aware masks."}

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        self.info.metadata["categories"] = CATEGORIES
        self.info.metadata["num_instances"] = {}
        counts = {"train": cfg.num_train, "validation": cfg.num_val}
        return {split: self._generate_examples(split, counts[split]) for split in SPLITS}

    def _generate_examples(self, split: str, num_examples: int):
        cfg = self.builder_config
        num_instances = self.info.metadata["num_instances"][split] = []
        for i in range(num_examples):
            ex = make_example(cfg.seed, split, i, cfg.image_size)
            num_instances.append(len(ex["objects"]["id"]))
            yield i, ex
