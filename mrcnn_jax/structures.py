"""The data contracts between the input pipeline, the model, training and evaluation.

A *batch* is a dict of numpy / jax arrays with these keys (leading `B` = examples; under pmap the
arrays carry one more leading axis, `[devices, B, ...]`). Every shape is fixed by the config.

| key              | shape / dtype            | meaning                                                   |
|------------------|--------------------------|-----------------------------------------------------------|
| `images`         | [B, H, W, 3] float32     | normalised, resized, padded bottom / right to (H, W)      |
| `image_sizes`    | [B, 2] int32             | (h, w) of the resized image inside the padding            |
| `gt_boxes`       | [B, M, 4] float32        | xyxy in resized-image pixels; padding rows are 0          |
| `gt_classes`     | [B, M] int32             | contiguous labels 1..num_classes (0 = background); pad -1 |
| `gt_valid`       | [B, M] bool              | True for real instances (crowd ones included)             |
| `gt_is_crowd`    | [B, M] bool              | COCO `iscrowd`: never a training positive                 |
| `gt_masks`       | [B, M, S, S] uint8/float | each instance mask cropped to its gt box, resized to S    |
| `image_ids`      | [B] int64                | the dataset's original image id (COCO id)                 |
| `orig_sizes`     | [B, 2] int32             | (h, w) of the original image, before resize               |
| `scales`         | [B, 2] float32           | (rh / h, rw / w): resized / original, per axis            |
| `example_valid`  | [B] bool                 | False for the dummy examples that pad the last eval batch |

M = `config.data.max_instances` (default 100), S = `config.data.mask_crop_size` (default 112).
Class labels are contiguous with 0 = background (torchvision's convention); the dataset keeps the
mapping back to the original category ids.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

BATCH_KEYS = (
    "images",
    "image_sizes",
    "gt_boxes",
    "gt_classes",
    "gt_valid",
    "gt_is_crowd",
    "gt_masks",
    "image_ids",
    "orig_sizes",
    "scales",
    "example_valid",
)


@struct.dataclass
class Detections:
    """Fixed-size, padded detections; leading `[B]` when batched.

    boxes:   [B, D, 4] float32 xyxy in resized-image pixels (divide x by `scales[..., 1]`, y by
             `scales[..., 0]` for the original)
    scores:  [B, D] float32
    classes: [B, D] int32 contiguous labels 1..num_classes
    valid:   [B, D] bool, True for real detections (sorted first, by descending score)
    masks:   [B, D, 28, 28] float32 mask probabilities in the box frame (None when not computed)
    """

    boxes: jnp.ndarray
    scores: jnp.ndarray
    classes: jnp.ndarray
    valid: jnp.ndarray
    masks: jnp.ndarray | None = None
