"""How close our RoIAlign's sampling is to detectron2's adaptive grid (POOLER_SAMPLING_RATIO 0).

Pools FPN features of the random-weight R50-FPN (detectron2 config) with our multi-level RoIAlign,
at a fixed ratio and at the adaptive grid with a cap, and compares each with
`torchvision.ops.roi_align(sampling_ratio=0, aligned=True)` on the box's level (what detectron2's
ROIAlign calls). Boxes: sides log-uniform in 12-500 px, aspect ratios 1/3-3, clipped to the image.
Needs torch + torchvision. Prints, per head size, the share of boxes per adaptive point count and
mean abs diff / mean abs value:

    python scripts/roi_align_sampling.py --image-size 512 768 --boxes 2000
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision.ops as tvops

from configs import detectron2_r50_fpn_1x
from mrcnn_jax import mask_rcnn
from mrcnn_jax.ops.roi_align import assign_levels, multilevel_roi_align


def random_boxes(rng, n: int, h: int, w: int) -> np.ndarray:
    size = np.exp(rng.uniform(np.log(12), np.log(500), n))
    ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))
    bw, bh = size * np.sqrt(ratio), size / np.sqrt(ratio)
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    return boxes.clip(0, [w, h, w, h]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, nargs=2, default=(512, 768), metavar=("H", "W"))
    parser.add_argument("--boxes", type=int, default=2000)
    parser.add_argument("--caps", type=int, nargs="+", default=(6,))
    args = parser.parse_args()
    h, w = args.image_size

    config = detectron2_r50_fpn_1x.get_config()
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(0), (h, w))
    image = jax.random.normal(jax.random.key(1), (1, h, w, 3))
    feats = model.apply(variables, image, method=mask_rcnn.MaskRCNN.features)
    levels = [np.array(feats[k][0]) for k in mask_rcnn.POOL_LEVELS]  # writable, for torch
    boxes = random_boxes(np.random.default_rng(0), args.boxes, h, w)
    lvl = np.asarray(assign_levels(jnp.asarray(boxes), 2, 5))

    for out in (config.model.roi.box_pool_size, config.model.roi.mask_pool_size):
        ref = np.zeros((len(boxes), out, out, levels[0].shape[-1]), np.float32)
        points = np.zeros(len(boxes))
        for k, fmap in enumerate(levels):
            on = lvl == k + 2
            t = torch.from_numpy(fmap).permute(2, 0, 1)[None]
            r = tvops.roi_align(t, [torch.from_numpy(boxes[on])], out, 2.0 ** -(k + 2), 0, True)
            ref[on] = r.permute(0, 2, 3, 1).numpy()
            b = boxes[on] * 2.0 ** -(k + 2) - 0.5
            points[on] = np.maximum(np.ceil((b[:, 2] - b[:, 0]) / out), np.ceil((b[:, 3] - b[:, 1]) / out))
        scale = np.abs(ref).mean()
        share = {int(p): f"{(points == p).mean():.1%}" for p in np.unique(points)}
        print(f"{out}x{out}: mean abs value {scale:.3g}, max {np.abs(ref).max():.3g}; "
              f"adaptive points per side (larger axis): {share}")
        fs = [jnp.asarray(f) for f in levels]
        for ratio, cap in [(2, 6)] + [(0, c) for c in args.caps]:
            got = np.asarray(
                multilevel_roi_align(fs, jnp.asarray(boxes), out, ratio, True, max_sampling_ratio=cap)
            )
            diff = np.abs(got - ref)
            name = f"fixed {ratio}" if ratio else f"adaptive, cap {cap}"
            line = f"  {name}: "
            line += f"mean abs diff / mean abs value {diff.mean() / scale:.3%}"
            if ratio == 0:
                within = points <= cap
                line += f"; within the cap: max abs diff {diff[within].max():.2g}"
                if (~within).any():
                    line += (f"; beyond it ({(~within).mean():.1%} of boxes): "
                             f"{diff[~within].mean() / scale:.3%}")
            print(line)


if __name__ == "__main__":
    main()
