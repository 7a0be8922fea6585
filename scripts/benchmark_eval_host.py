"""Host side of evaluation: images/s of `evaluate.run_evaluation` turning padded detections into
COCO results (full-resolution mask pasting + RLE), in-process and with paste worker processes.

    python scripts/benchmark_eval_host.py --image-size 800 1216 --detections 100 --images 64 \
        --batch 16 --workers 0 2 8

The detections are synthetic (random boxes of 20-400 px, random 28 x 28 mask probabilities) and
come from a predict function that returns them at once, so the figure is the host's rate alone:
what an accelerator that predicts faster than that waits for. The ground truth has the images and
no annotations, which keeps COCOeval's own share small; it is timed again on its own and taken
out of the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def synthetic(num_images: int, batch: int, size, detections: int, seed: int = 0):
    """(batches, detections per batch): resized = original size, every example real."""
    rng = np.random.default_rng(seed)
    h, w = size
    pairs = []
    for start in range(0, num_images, batch):
        xy = rng.uniform(0, [w - 20, h - 20], (batch, detections, 2))
        wh = rng.uniform(20, 400, (batch, detections, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], -1).astype(np.float32)
        dets = {
            "boxes": boxes,
            "scores": rng.uniform(0.05, 1, (batch, detections)).astype(np.float32),
            "classes": rng.integers(1, 81, (batch, detections)).astype(np.int32),
            "valid": np.ones((batch, detections), bool),
            "masks": rng.uniform(0, 1, (batch, detections, 28, 28)).astype(np.float32),
        }
        host = {
            "image_ids": np.arange(start, start + batch),
            "scales": np.ones(batch, np.float32),
            "orig_sizes": np.tile([h, w], (batch, 1)),
            "example_valid": np.ones(batch, bool),
        }
        pairs.append((host, dets))
    return pairs


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--output")
    args = p.parse_args(argv)

    from mrcnn_jax import evaluate

    pairs = synthetic(args.images, args.batch, args.image_size, args.detections)
    table = {tuple(h["image_ids"].tolist()): d for h, d in pairs}
    predict = lambda batch: table[tuple(np.asarray(batch["image_ids"]).tolist())]
    gt = {
        "images": [{"id": i, "height": args.image_size[0], "width": args.image_size[1]}
                   for i in range(len(pairs) * args.batch)],
        "annotations": [],
        "categories": [{"id": c, "name": str(c)} for c in range(1, 81)],
    }
    labels = {c: c for c in range(1, 81)}
    result = {"setup": {**vars(args), "cpus": os.cpu_count(), "load_avg": list(os.getloadavg())},
              "runs": []}
    for workers in args.workers:
        start = time.perf_counter()
        _, results = evaluate.run_evaluation(
            predict, (h for h, _ in pairs), gt, labels, paste_workers=workers
        )
        total = time.perf_counter() - start
        start = time.perf_counter()  # COCOeval's share, measured again on the same results
        evaluate.coco_evaluate(gt, results, evaluate.IOU_TYPES)
        coco_s = time.perf_counter() - start
        run = {"workers": workers, "convert_s": total - coco_s,
               "images_per_s": args.images / (total - coco_s), "results": len(results),
               "cocoeval_s": coco_s}
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
