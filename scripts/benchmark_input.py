"""Input-pipeline throughput: images/s of `train_batches` and `eval_batches`, one JSON line each.

    python scripts/benchmark_input.py                          # configs/shapes.py, Quick start
    python scripts/benchmark_input.py --config configs/base.py --coco_synthetic 64
                                      # COCO-scale: 640x480 JPEGs, ~7 polygon instances per image
    ... --set "data.train_scale_jitter=(0.1, 2.0)" --set "data.image_size=(1024, 1024)"
                                      # any config field, as scripts/benchmark.py takes them

`--coco_synthetic N` writes N COCO-like images and annotations to a temporary folder and reads them
as `coco_folder`, so JPEG decoding, RLE decoding and 112x112 mask crops are measured at COCO sizes.
Preparation (dataset generation) is timed separately and excluded from the throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import PIL.Image
from benchmark import load_config  # scripts/benchmark.py, beside this file
from pycocotools import mask as mask_utils

from mrcnn_jax.data import pipeline


def _blob(rng, cx, cy, radius, h, w) -> list[float]:
    """A random star-shaped polygon of 8-20 vertices around (cx, cy)."""
    n = int(rng.integers(8, 21))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.5, 1.0, n)
    xs = np.clip(cx + r * np.cos(angles), 0, w)
    ys = np.clip(cy + r * np.sin(angles), 0, h)
    return np.stack([xs, ys], 1).reshape(-1).round(2).tolist()


def write_coco_like(root: str, split: str, num_images: int, h: int = 480, w: int = 640) -> None:
    """COCO-like folder: smooth-textured JPEGs (~COCO file sizes), 1-14 polygon instances of 80
    categories each, every 10th image with an uncompressed-RLE crowd region."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        low = rng.uniform(0, 255, (h // 16, w // 16, 3))
        big = np.asarray(
            PIL.Image.fromarray(low.astype(np.uint8)).resize((w, h), PIL.Image.BILINEAR)
        )
        pixels = np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)
        name = f"{i + 1:012d}.jpg"
        PIL.Image.fromarray(pixels).save(os.path.join(root, split, name), quality=90)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for _ in range(int(rng.integers(1, 15))):
            radius = rng.uniform(10, 150)
            poly = _blob(rng, rng.uniform(0, w), rng.uniform(0, h), radius, h, w)
            xs, ys = poly[0::2], poly[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            anns.append({"segmentation": [poly], "bbox": bbox, "iscrowd": 0, "image_id": i + 1})
        if i % 10 == 0:
            crowd = np.zeros((h, w), np.uint8)
            crowd[h // 2 :, : w // 3] = 1
            rle = mask_utils.encode(np.asfortranarray(crowd))
            counts = [int(c) for c in _runs(crowd)]
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            seg = {"size": [h, w], "counts": counts}
            anns.append({"segmentation": seg, "bbox": bbox, "iscrowd": 1, "image_id": i + 1})
    for k, a in enumerate(anns):
        a.update(id=k + 1, category_id=int(rng.integers(1, 81)), area=a["bbox"][2] * a["bbox"][3])
    cats = [{"id": c, "name": f"class_{c}"} for c in range(1, 81)]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def _measure(iterator, warmup: int, steps: int) -> tuple[float, int]:
    for _ in range(warmup):
        next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += len(next(iterator)["image_ids"])
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shapes.py")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default: a temporary one)")
    parser.add_argument(
        "--coco_synthetic", type=int, default=0, help="images of a COCO-like folder"
    )
    parser.add_argument("--batch", type=int, default=0, help="override global / eval batch size")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    config = load_config(args.config, overrides=args.set)
    tmp = tempfile.TemporaryDirectory()
    config.data.data_dir = args.data_dir or os.path.join(tmp.name, "tfds")
    if args.coco_synthetic:
        root = os.path.join(tmp.name, "coco")
        write_coco_like(root, "bench", args.coco_synthetic)
        d = config.data
        d.dataset, d.root, d.num_classes = "coco_folder", root, 80
        d.train_split = d.eval_split = "bench"
    if args.batch:
        config.train.global_batch_size = config.eval.batch_size = args.batch

    start = time.perf_counter()
    info = pipeline.dataset_info(config)  # prepares the splits
    common = {"config": args.config, "dataset": config.data.dataset}
    common["image_size"] = list(config.data.image_size)
    prepare = {"event": "prepare", "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps({**common, **prepare, "num_train": info.num_train, "num_eval": info.num_eval}))
    train = pipeline.train_batches(config, process_index=0, process_count=1)
    # As evaluation reads it: without the gt mask crops, which COCO scoring never uses.
    evaluation = pipeline.eval_batches(config, process_index=0, process_count=1, gt_masks=False)
    eval_steps = min(args.steps, -(-info.num_eval // config.eval.batch_size) - args.warmup)
    runs = [("train", train, config.train.global_batch_size, args.steps)]
    runs.append(("eval", evaluation, config.eval.batch_size, eval_steps))  # within one pass
    for name, iterator, batch, steps in runs:
        seconds, images = _measure(iterator, args.warmup, steps)
        result = {"pipeline": name, "batch": batch, "steps": steps, "seconds": round(seconds, 3)}
        result.update(images_per_s=round(images / seconds, 1), cpus=os.cpu_count())
        print(json.dumps({**common, **result}), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
