"""Host side of evaluation: images/s of `evaluate.run_evaluation` turning padded detections into
COCO results (full-resolution mask pasting + RLE), in-process and with paste worker processes.

    python scripts/benchmark_eval_host.py --image-size 800 1216 --detections 100 --images 64 \
        --batch 16 --workers 0 2 8 [--device-masks]

The detections are synthetic (random boxes of 20-400 px, random 28 x 28 mask probabilities) and
come from a predict function that returns them at once, so the figure is the host's rate alone:
what an accelerator that predicts faster than that waits for. The ground truth has the images and
no annotations, which keeps COCOeval's own share small; its call inside the run is timed and taken
out of the figure. With --device-masks, more runs paste the masks and write their RLE strings
on the default JAX device (`eval.device_masks`); the host then only slices the strings out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def blobs(rng, shape) -> np.ndarray:
    """[*shape, 28, 28] float32 mask probabilities: one round blob each (an object's mask has a
    few runs per image column; uniform noise would have hundreds)."""
    yy, xx = np.mgrid[:28, :28]
    cy, cx, r = (rng.uniform(8, 20, (*shape, 1, 1)) for _ in range(3))
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)).astype(np.float32)


def differences(reference: list[dict], results: list[dict]) -> dict:
    """How results differ from the first run's: masks and pixels (the device's float32 paste can
    round a probability at the threshold the other way), and any other field."""
    from pycocotools import mask as mask_utils

    masks = pixels = other = 0
    for a, b in zip(reference, results, strict=True):
        other += any(a[k] != b[k] for k in a if k != "segmentation")
        if a.get("segmentation") != b.get("segmentation"):
            masks += 1
            pa, pb = (mask_utils.decode(r["segmentation"]) for r in (a, b))
            pixels += int(np.sum(pa != pb))
    return {"masks_differing": masks, "pixels_differing": pixels, "other_fields_differing": other}


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
            "masks": blobs(rng, (batch, detections)),
        }
        host = {
            "image_ids": np.arange(start, start + batch),
            "scales": np.ones((batch, 2), np.float32),
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
    p.add_argument("--device-masks", action="store_true",
                   help="also time evaluate.make_device_mask_rles (pasting + RLE strings on the "
                   "default JAX device, canvas = image size)")
    p.add_argument("--max-runs", type=int, default=4096)
    p.add_argument("--device-workers", type=int, nargs="+", default=[0],
                   help="paste workers of the --device-masks runs (they then only slice strings)")
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
    modes = [("host", w) for w in args.workers]
    if args.device_masks:
        import jax

        mask_rles = evaluate.make_device_mask_rles(args.image_size, 0.5, args.max_runs)
        start = time.perf_counter()
        h0, d0 = pairs[0]
        jax.block_until_ready(mask_rles(d0["boxes"], d0["masks"], h0["scales"], h0["orig_sizes"]))
        result["setup"]["device"] = str(jax.devices()[0])
        result["setup"]["device_compile_s"] = time.perf_counter() - start
        modes += [("device", w) for w in args.device_workers]
    reference = None
    coco_times = []  # COCOeval's share, timed inside each run and taken out of its figure
    real_coco_evaluate = evaluate.coco_evaluate

    def timed_coco_evaluate(*a, **kw):
        start = time.perf_counter()
        try:
            return real_coco_evaluate(*a, **kw)
        finally:
            coco_times.append(time.perf_counter() - start)

    for mode, workers in modes:
        fn = predict if mode == "host" else evaluate._with_mask_rles(predict, mask_rles)
        coco_times.clear()
        evaluate.coco_evaluate = timed_coco_evaluate
        try:
            start = time.perf_counter()
            _, results = evaluate.run_evaluation(
                fn, (h for h, _ in pairs), gt, labels, paste_workers=workers
            )
            total = time.perf_counter() - start
        finally:
            evaluate.coco_evaluate = real_coco_evaluate
        reference = results if reference is None else reference
        coco_s = sum(coco_times)
        run = {"masks": mode, "workers": workers, "convert_s": total - coco_s,
               **differences(reference, results),
               "images_per_s": args.images / (total - coco_s), "results": len(results),
               "cocoeval_s": coco_s}
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
