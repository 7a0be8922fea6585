"""COCO evaluation on the host: padded detections -> COCO results -> pycocotools metrics.

    for batch in eval batches:                       (fixed shapes, one compile)
        dets = predict_fn(batch)                     Detections, boxes in RESIZED pixels
        for each real example b, each valid detection:
            box = clip(box / (sx_b, sy_b), original image)   drop it if empty (detectron2)
            mask = paste(28x28 probabilities, box, orig H, W) >= threshold     (16 at a time)
                   (eval.device_masks: pasted and RLE-encoded on the device instead,
                    `make_device_mask_rles`; the host slices the strings out)
            result = {image_id, category_id, score, bbox [x, y, w, h], segmentation RLE}
        keep only the results (RLE strings), never the full-size masks -> memory stays flat
    COCOeval(gt, results) for "bbox" (results without segmentation) and "segm" (without bbox)

Metric values are fractions in [0, 1]; a size bucket without ground truth (pycocotools' -1) is
reported as NaN in Python and as `null` in the JSON files. An empty result list scores 0.

Several hosts (jax.process_count() > 1), as the TF Model Garden and detectron2 do: each host
predicts and converts its own shard of the split, the results (compact JSON bytes) are gathered
(`gather_results`), process 0 alone scores the union and writes the files, and the metrics are
broadcast so every host returns the same dict (`broadcast_metrics`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax.ops.masks import (
    coco_rle_strings,
    mask_run_starts,
    paste_masks,
    paste_masks_torchvision,
)

log = logging.getLogger(__name__)

# COCOeval.stats[0:6] in pycocotools' summarize() order (maxDets 100, area "all" unless named).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
# Masks pasted per chunk: 16 x 800 x 1333 float32 is 68 MB, whatever the detection count (100).
_PASTE_CHUNK = 16
_BATCH_KEYS = ("image_ids", "scales", "orig_sizes", "example_valid")
_PICTURE_KEYS = ("images", "image_sizes")  # handed to `on_batch` (pictures) when present


def _field(dets, name: str):
    """Reads `name` from a Detections struct or a mapping; None when absent."""
    if isinstance(dets, Mapping):
        return dets.get(name)
    return getattr(dets, name, None)


def _unpad(dets, batch, index: int) -> dict:
    """The valid detections of example `index`, boxes mapped to its original image.

    -> boxes [n, 4] xyxy original pixels (clipped, non-empty), scores [n], classes [n],
    probs [n, M, M] mask probabilities in the box frame or None.
    """
    valid = np.asarray(_field(dets, "valid")[index], bool)
    boxes = np.asarray(_field(dets, "boxes")[index], np.float32)[valid]
    scale = np.asarray(batch["scales"], np.float32)[index]
    height, width = (int(v) for v in np.asarray(batch["orig_sizes"])[index])
    boxes = _boxes_to_original(boxes, scale, height, width, np)
    # detectron2's detector_postprocess drops boxes left empty by the clip (Boxes.nonempty).
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    masks = _field(dets, "masks")
    chars, lengths = _field(dets, "mask_rle_chars"), _field(dets, "mask_rle_len")
    return {
        "rle_chars": None if chars is None else np.asarray(chars[index])[valid][keep],
        "rle_len": None if lengths is None else np.asarray(lengths[index])[valid][keep],
        "boxes": boxes[keep],
        "scores": np.asarray(_field(dets, "scores")[index], np.float32)[valid][keep],
        "classes": np.asarray(_field(dets, "classes")[index]).astype(np.int64)[valid][keep],
        "probs": None if masks is None else np.asarray(masks[index], np.float32)[valid][keep],
        "height": height,
        "width": width,
    }


def _boxes_to_original(boxes, scale, height, width, xp):
    """[n, 4] xyxy boxes of the resized image -> the original image's pixels, clipped to it; one
    definition for the host (`_unpad`, xp=numpy) and the device (`make_device_mask_rles`).

    scale: (sy, sx) = resized / original per axis (the batch's `scales[b]`, detectron2's
    detector_postprocess); one number for both axes is accepted too."""
    s = xp.broadcast_to(xp.reshape(xp.asarray(scale, np.float32), (-1,)), (2,))
    limits = xp.stack([width, height, width, height]).astype(np.float32)
    return xp.clip(boxes / xp.stack([s[1], s[0], s[1], s[0]]), 0.0, limits)


MASK_PASTES = ("detectron2", "torchvision")  # model.test.mask_paste


def _check_paste_kind(kind: str) -> None:
    if kind not in MASK_PASTES:
        raise ValueError(
            f"config.model.test.mask_paste must be detectron2 or torchvision, got {kind!r}"
        )


def _paste(probs, boxes, height: int, width: int, threshold: float, kind: str, xp=np):
    """[k, M, M] probabilities -> [k, height, width] bool with the `kind` family's paste:
    detectron2 grid-samples and keeps `>= threshold`; torchvision resizes into the (expanded,
    integer) box and its COCO evaluation keeps `> threshold`. xp: numpy (host) or jax.numpy."""
    _check_paste_kind(kind)
    if kind == "detectron2":
        return paste_masks(probs, boxes, height, width, threshold, xp=xp)
    return paste_masks_torchvision(probs, boxes, height, width, threshold=threshold, xp=xp)


def _paste_chunks(probs, boxes, height: int, width: int, threshold: float, kind: str = "detectron2"):
    """Yields [k, height, width] bool masks, `_PASTE_CHUNK` detections at a time."""
    for start in range(0, len(boxes), _PASTE_CHUNK):
        end = start + _PASTE_CHUNK
        yield _paste(probs[start:end], boxes[start:end], height, width, threshold, kind)


def image_detections(
    dets, batch, index: int, mask_threshold: float = 0.5, mask_paste: str = "detectron2"
) -> dict:
    """One example's detections at original resolution, e.g. for `visualize.overlay`.

    -> {"boxes": [n, 4] xyxy original pixels, "scores": [n], "classes": [n] contiguous labels,
    "masks": [n, H, W] bool at the original size (None when `dets` has no masks)}.
    """
    u = _unpad(dets, batch, index)
    masks = None
    if u["probs"] is not None:
        # Filled column-major, as the paste writes it (a plain copy per chunk); returned as the
        # [n, H, W] view of that buffer.
        masks_wh = np.zeros((len(u["boxes"]), u["width"], u["height"]), bool)
        chunks = _paste_chunks(
            u["probs"], u["boxes"], u["height"], u["width"], mask_threshold, mask_paste
        )
        for start, chunk in zip(range(0, len(masks_wh), _PASTE_CHUNK), chunks, strict=True):
            masks_wh[start : start + len(chunk)] = np.transpose(chunk, (0, 2, 1))
        masks = masks_wh.transpose(0, 2, 1)
    return {"boxes": u["boxes"], "scores": u["scores"], "classes": u["classes"], "masks": masks}


def encode_masks(masks: np.ndarray) -> list[dict]:
    """[n, H, W] bool -> n compressed COCO RLEs {"size": [H, W], "counts": str} (JSON-ready)."""
    if len(masks) == 0:
        return []
    # [H, W, n] column-major uint8 for pycocotools; the host paste already stores each mask
    # column-major, so for its bool output this is a view, not a copy.
    hwn = np.transpose(masks, (1, 2, 0))
    hwn = hwn.view(np.uint8) if hwn.dtype == bool else hwn.astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(hwn))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(
    dets,
    batch: Mapping,
    label_to_category_id: Mapping[int, int],
    mask_threshold: float = 0.5,
    mask_paste: str = "detectron2",
) -> list[dict]:
    """Padded detections of one batch -> COCO results, one dict per real detection.

    dets: boxes [B, D, 4] xyxy resized pixels, scores [B, D], classes [B, D] contiguous labels,
    valid [B, D], masks [B, D, M, M] probabilities or None (a Detections struct or a mapping of
    numpy arrays); batch: image_ids [B], scales [B, 2] (y, x), orig_sizes [B, 2] (h, w),
    example_valid [B].
    Dummy examples and invalid detections are skipped; boxes are divided by the scale, clipped to
    the original image and dropped when empty. Each result has image_id, category_id, score,
    bbox [x, y, w, h] original pixels and, with masks, segmentation (compressed RLE, str counts).
    """
    example_valid = np.asarray(batch["example_valid"], bool)
    image_ids = np.asarray(batch["image_ids"])
    results = []
    for b in np.nonzero(example_valid)[0]:
        u = _unpad(dets, batch, int(b))
        image_id = int(image_ids[b])
        image_results = [
            {
                "image_id": image_id,
                "category_id": int(label_to_category_id[int(label)]),
                "score": float(score),
                "bbox": [
                    float(box[0]),
                    float(box[1]),
                    float(box[2] - box[0]),
                    float(box[3] - box[1]),
                ],
            }
            for box, score, label in zip(u["boxes"], u["scores"], u["classes"], strict=True)
        ]
        if u["probs"] is not None:
            rles = _image_rles(u, mask_threshold, mask_paste)
            for result, rle in zip(image_results, rles, strict=True):
                result["segmentation"] = rle
        results.extend(image_results)
    return results


def _image_rles(u: dict, mask_threshold: float, mask_paste: str) -> list[dict]:
    """COCO RLEs of one image's kept detections (`_unpad`): the strings the device wrote
    (`make_device_mask_rles`) where it could, the others pasted and encoded here."""
    def pasted_here(rows):
        chunks = _paste_chunks(
            u["probs"][rows], u["boxes"][rows], u["height"], u["width"], mask_threshold, mask_paste
        )
        return [rle for chunk in chunks for rle in encode_masks(chunk)]

    if u["rle_chars"] is None:
        return pasted_here(slice(None))
    size = [u["height"], u["width"]]
    rles: list = [
        {"size": size, "counts": chars[:length].tobytes().decode("ascii")} if length >= 0 else None
        for chars, length in zip(u["rle_chars"], u["rle_len"].tolist(), strict=True)
    ]
    overflow = np.flatnonzero(u["rle_len"] < 0)  # not codable on the device: paste them here
    if len(overflow):
        for i, rle in zip(overflow, pasted_here(overflow), strict=True):
            rles[i] = rle
    return rles


def make_device_mask_rles(
    canvas: Sequence[int], mask_threshold: float, max_runs: int, mask_paste: str = "detectron2"
) -> Callable:
    """A jitted `fn(boxes, masks, scales, orig_sizes) -> (chars [B, D, C] uint8, length [B, D])`
    that pastes each detection's mask at its original image size on the accelerator and writes
    its compressed COCO RLE string there (`ops.masks.mask_run_starts`, then
    `ops.masks.coco_rle_strings`; R = max_runs runs, C = 4 R characters), so the host only
    slices strings out of a byte array instead of pasting and encoding full-size masks.
    boxes [B, D, 4] resized pixels, masks [B, D, M, M] probabilities, scales [B, 2] (y, x) or
    [B], orig_sizes [B, 2] (h, w), as `detections_to_coco` reads them.

    The masks are pasted on a fixed canvas [Hc, Wc] = `canvas` (one compile), image by image
    (`lax.map`: D x Hc x Wc float32 at a time). An image bigger than the canvas, or a mask with
    more than max_runs runs, more than 16 run starts in one image column or a string longer than
    C, gets length -1 and is pasted on the host instead, so the results do not depend on these
    sizes."""
    import jax.numpy as jnp
    from jax import lax

    hc, wc = (int(v) for v in canvas)
    _check_paste_kind(mask_paste)

    def one(args):
        boxes, probs, scale, size = args
        height, width = size[0], size[1]
        boxes = _boxes_to_original(
            boxes.astype(jnp.float32), scale.astype(jnp.float32), height, width, jnp
        )
        pasted = _paste(probs.astype(jnp.float32), boxes, hc, wc, mask_threshold, mask_paste, jnp)
        starts, num = mask_run_starts(pasted, height, width, max_runs)
        return coco_rle_strings(starts, num, height, width, 4 * max_runs)

    @jax.jit
    def fn(boxes, masks, scales, orig_sizes):
        return lax.map(one, (boxes, masks, scales, orig_sizes.astype(jnp.int32)))

    return fn


@contextlib.contextmanager
def _prints_to_log():
    """pycocotools prints its progress and summary; route those lines into the log instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("pycocotools: %s", line)


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _prints_to_log():
        coco.createIndex()
    return coco


def _results_for(results: Sequence[dict], iou_type: str) -> list[dict] | None:
    """The results of one iou type (fresh dicts: loadRes writes into them); None if there are none.

    bbox results drop the segmentation and segm results drop the bbox, as detectron2 does, so
    pycocotools measures the size buckets with the box area and the mask area respectively.
    """
    if iou_type == "bbox":
        return [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if iou_type == "segm":
        subset = [
            {k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r
        ]
        return subset if subset or not results else None
    raise ValueError(f"unsupported iou type {iou_type!r}; expected one of {IOU_TYPES}")


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    if results:
        with _prints_to_log():
            return coco_gt.loadRes(results)
    # loadRes fails on [] (it reads anns[0]); no detections is a valid outcome that scores 0.
    dataset = coco_gt.dataset
    return _coco(
        {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
    )


def _per_category_ap(evaluator: COCOeval) -> dict[str, float]:
    """{"AP-NAME": AP of that category} for every category of the ground truth, in id order: the
    mean precision over IoU 0.5:0.95 and the 101 recall points, all areas, 100 detections (what
    the summary's AP averages over the categories; detectron2's per-category AP). NaN for a
    category without ground truth; a name two categories share is followed by the id."""
    # eval["precision"]: [IoU thresholds, recall points, params.catIds, areaRng, maxDets], -1 = none
    area, most = evaluator.params.areaRngLbl.index("all"), len(evaluator.params.maxDets) - 1
    precision = evaluator.eval["precision"][:, :, :, area, most]
    cats = [evaluator.cocoGt.cats[c] for c in evaluator.params.catIds]
    names = [str(cat.get("name", cat["id"])) for cat in cats]
    counts = collections.Counter(names)
    out = {}
    for k, (cat, name) in enumerate(zip(cats, names, strict=True)):
        if counts[name] > 1:
            name = f"{name} (id {cat['id']})"
        p = precision[:, :, k]
        p = p[p > -1]
        out[f"AP-{name}"] = float(p.mean()) if p.size else math.nan
    return out


def coco_evaluate(
    gt: dict,
    results: Sequence[dict],
    iou_types: Sequence[str] = IOU_TYPES,
    per_category: bool = False,
) -> dict[str, float]:
    """COCOeval metrics -> {"bbox/AP", "bbox/AP50", ..AP75, APs, APm, APl, "segm/AP", ...: float}.

    gt: COCO-format dict (images with height / width, annotations with iscrowd, categories);
    results: `detections_to_coco` output. Crowd regions are handled by COCOeval (detections
    matched to them are ignored). Values are fractions in [0, 1], NaN for a size bucket without
    ground truth; empty results give 0. "segm" is skipped (with a warning) when non-empty results
    carry no segmentation. The caller's dicts are not modified. per_category: also
    "bbox/AP-NAME" (and "segm/AP-NAME") for every category of `gt` (`_per_category_ap`).
    """
    # COCOeval replaces gt segmentations by RLEs in place: evaluate a shallow copy.
    coco_gt = _coco({**gt, "annotations": [dict(a) for a in gt.get("annotations", [])]})
    metrics = {}
    for iou_type in iou_types:
        subset = _results_for(results, iou_type)
        if subset is None:
            log.warning(
                "no segmentation in %d results: skipping %s evaluation", len(results), iou_type
            )
            continue
        coco_dt = _load_results(coco_gt, subset)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        with _prints_to_log():
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)], strict=True):
            metrics[f"{iou_type}/{name}"] = float(value) if value >= 0 else math.nan
        if per_category:
            for name, value in _per_category_ap(evaluator).items():
                metrics[f"{iou_type}/{name}"] = value
    return metrics


def _merge_devices(tree):
    """[devices, B, ...] -> [devices * B, ...] for every array of a pmapped output."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:]), tree)


def _host_batch(batch: Mapping, devices: bool) -> dict:
    keys = _BATCH_KEYS + tuple(k for k in _PICTURE_KEYS if k in batch)
    host = {k: np.asarray(batch[k]) for k in keys}
    if devices:  # scales / image_ids are [devices, B] under pmap
        host = {k: v.reshape(-1, *v.shape[2:]) for k, v in host.items()}
    return host


# Each paste worker is one process on one core: a BLAS library left multi-threaded in every
# worker oversubscribes the cores (2 workers on 2 cores were 3x slower than none).
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _converter_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """`workers` processes for `detections_to_coco`, all started now with single-threaded BLAS
    (the environment is read when a child starts), by 'spawn': a forked child of a process
    running JAX's threads can deadlock."""
    if workers <= 0:
        return None
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)
    saved = {k: os.environ.get(k) for k in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:  # no worker is idle yet, so each submission starts one
        concurrent.futures.wait([pool.submit(os.getpid) for _ in range(workers)])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return pool


# The most one allgather of results brings to each device, all hosts together (each of N hosts
# sends this / N): the results, hundreds of MB on COCO, travel in pieces.
_GATHER_BYTES = 1 << 27
_MIN_GATHER_CHUNK = 1 << 16
_GATHER_HEADER = struct.Struct("<qq?")  # payload bytes, real images, whether masks were predicted
_BROADCAST_HEADER = struct.Struct("<q?")  # metrics' JSON bytes, whether process 0 scored


@dataclasses.dataclass(frozen=True)
class Hosts:
    """The processes taking part in an evaluation, as `run_evaluation` sees them.

    index of count: this process; allgather(x) -> [count, *x.shape] (every host's x, by process
    index) and broadcast(x) -> process 0's x are collectives: every process calls them in the same
    order with uint8 arrays of one shape. `Hosts.from_jax()`, the default, is jax's process index
    and count with `multihost_utils.process_allgather` / `broadcast_one_to_all`; tests hand in
    fakes to simulate several hosts in one process.
    """

    index: int
    count: int
    allgather: Callable[[np.ndarray], np.ndarray]
    broadcast: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"process index {self.index} outside [0, {self.count})")

    @classmethod
    def from_jax(cls) -> Hosts:
        from jax.experimental import multihost_utils

        return cls(
            jax.process_index(),
            jax.process_count(),
            multihost_utils.process_allgather,
            multihost_utils.broadcast_one_to_all,
        )


def encode_results(results: Sequence[dict]) -> bytes:
    """COCO results -> compact JSON bytes (no spaces), what a host sends in `gather_results`.

    JSON keeps them exact: Python writes each float's shortest round-trip repr, and the RLE counts
    are already ASCII strings. Pickle would be about as big and runs code when loaded.
    """
    return json.dumps(list(results), separators=(",", ":")).encode("ascii")


def decode_results(data: bytes) -> list[dict]:
    """`encode_results` bytes -> the results."""
    return json.loads(data)


def gather_results(
    results: Sequence[dict],
    hosts: Hosts,
    *,
    has_masks: bool,
    num_images: int,
    chunk_bytes: int | None = None,
) -> tuple[list[dict] | None, bool, int]:
    """This host's results -> (every host's results in process order on process 0, else None;
    whether any host predicted masks; the real images of all hosts).

    Every host calls it, with or without images of its own: one allgather of a fixed-size header
    (payload length, images, masks), then the payloads (`encode_results`) zero-padded to the
    longest, in pieces of `chunk_bytes` (default: `_GATHER_BYTES` / count) so the devices that
    carry the collective never hold more than that per host. Hosts read contiguous slices of the
    split in process order (`pipeline.eval_batches`), so the union keeps the single-host order.
    """
    payload = np.frombuffer(encode_results(results), np.uint8)
    header = np.frombuffer(
        _GATHER_HEADER.pack(len(payload), int(num_images), bool(has_masks)), np.uint8
    )
    headers = np.asarray(hosts.allgather(header), np.uint8).reshape(hosts.count, -1)
    fields = [_GATHER_HEADER.unpack(row.tobytes()) for row in headers]
    lengths = [length for length, _, _ in fields]
    total_images = sum(images for _, images, _ in fields)
    any_masks = any(masks for _, _, masks in fields)
    longest = max(lengths)
    chunk = int(chunk_bytes or max(_MIN_GATHER_CHUNK, _GATHER_BYTES // hosts.count))
    padded = np.zeros(longest, np.uint8)
    padded[: len(payload)] = payload
    pieces = []
    for start in range(0, longest, chunk):
        piece = np.asarray(hosts.allgather(padded[start : start + chunk]), np.uint8)
        if hosts.index == 0:  # the others take part in the collective and drop what it brings
            pieces.append(piece.reshape(hosts.count, -1))
    if hosts.index != 0:
        return None, any_masks, total_images
    union: list[dict] = []
    for host, length in enumerate(lengths):
        data = b"".join(piece[host].tobytes() for piece in pieces)[:length]
        union.extend(decode_results(data))
    return union, any_masks, total_images


def broadcast_metrics(metrics: Mapping[str, float] | None, hosts: Hosts) -> dict[str, float]:
    """Process 0's metrics (the others pass None) -> the same dict, in the same order, on every
    host.

    Two broadcasts: a fixed-size header (payload length, whether process 0 scored), then the
    metrics as JSON bytes of that length (the key set varies with the categories when they are
    scored one by one). Bytes, not floats, so jax without x64 cannot round them to float32;
    Python's JSON writes each float's shortest round-trip repr and NaN (a size bucket or a
    category without ground truth) as NaN. Process 0 passes None when its scoring failed (it gets
    {} back and raises its own error): the other hosts then raise instead of waiting for a
    collective that never comes.
    """
    payload = b""
    scored = hosts.index == 0 and metrics is not None
    if scored:
        payload = json.dumps({str(k): float(v) for k, v in metrics.items()}).encode("ascii")
    header = np.frombuffer(_BROADCAST_HEADER.pack(len(payload), scored), np.uint8)
    received = np.asarray(hosts.broadcast(header), np.uint8).reshape(-1)
    length, scored = _BROADCAST_HEADER.unpack(received.tobytes())
    if not scored:
        if hosts.index == 0:
            return {}
        raise RuntimeError("process 0 failed to score the evaluation: see its log")
    padded = np.zeros(length, np.uint8)
    padded[: len(payload)] = np.frombuffer(payload, np.uint8)
    data = np.asarray(hosts.broadcast(padded), np.uint8).reshape(-1).tobytes()
    return {key: float(value) for key, value in json.loads(data).items()}


def _write_results(path: str, results: Sequence[dict]) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f)


def run_evaluation(
    predict_fn: Callable,
    batches: Iterable[Mapping],
    gt: dict,
    label_to_category_id: Mapping[int, int],
    mask_threshold: float = 0.5,
    results_path: str | None = None,
    mask_paste: str = "detectron2",
    on_batch: Callable[[object, dict], None] | None = None,
    paste_workers: int = 0,
    hosts: Hosts | None = None,
    per_category: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Streams `batches` through `predict_fn(batch) -> Detections` and scores them with COCOeval.

    Each batch is converted to COCO results right away (only the RLE strings are kept, never the
    full-size masks, so memory does not grow with the number of images). Outputs with a leading
    device axis ([devices, B, D, ...], pmap) are merged with the batch's [devices, B]. Writes the
    results JSON to `results_path` when given. `on_batch(dets, host_batch)`, when given, sees each
    batch's numpy detections and batch (e.g. `visualize.save_batch_overlays` for pictures).

    paste_workers > 0 converts the batches (mask pasting at full resolution and RLE encoding, the
    host's share of the work: ~0.05 s per image of 100 detections on one core) in that many
    worker processes, while this one feeds the accelerator the next batches; at most 2 batches
    per worker wait in flight, and the results keep the batches' order. 0 converts in this
    process, between predictions.

    hosts (default `Hosts.from_jax()`): with more than one, `batches` is this host's shard; every
    host converts its own, the results are gathered (`gather_results`) and process 0 alone scores
    the union against `gt` (the other hosts may pass gt=None) and writes `results_path`; the
    metrics are then broadcast (`broadcast_metrics`). One host alone takes none of these steps.
    per_category: each category's AP too (`coco_evaluate`), logged as a table.
    -> (metrics as `coco_evaluate`, the same on every host; results: all hosts' on process 0,
    this host's own on the others).
    """
    if hosts is None:
        hosts = Hosts.from_jax()
    results: list[dict] = []
    has_masks = False
    start, num_images = time.time(), 0
    pool = _converter_pool(paste_workers)
    pending: collections.deque = collections.deque()
    try:
        for step, batch in enumerate(batches):
            dets = jax.device_get(predict_fn(batch))
            pmapped = np.ndim(_field(dets, "scores")) == 3
            if pmapped:
                dets = _merge_devices(dets)
            host = _host_batch(batch, pmapped)
            has_masks = has_masks or _field(dets, "masks") is not None
            convert_args = (
                dets,
                {k: host[k] for k in _BATCH_KEYS},
                dict(label_to_category_id),
                mask_threshold,
                mask_paste,
            )
            if pool is None:
                results.extend(detections_to_coco(*convert_args))
            else:
                pending.append(pool.submit(detections_to_coco, *convert_args))
                while len(pending) > 2 * paste_workers:
                    results.extend(pending.popleft().result())
            if on_batch is not None:
                on_batch(dets, host)
            num_images += int(host["example_valid"].sum())
            if (step + 1) % 50 == 0:
                rate = num_images / max(time.time() - start, 1e-9)
                log.info(
                    "evaluated %d images (%.1f images/s), %d results", num_images, rate,
                    len(results),
                )
        while pending:
            results.extend(pending.popleft().result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if hosts.count > 1:  # every host takes part, with or without images of its own
        union, has_masks, num_images = gather_results(
            results, hosts, has_masks=has_masks, num_images=num_images
        )
        if hosts.index == 0:
            results = union
    metrics = None
    if hosts.index == 0:
        try:
            if results_path:
                _write_results(results_path, results)
            iou_types = IOU_TYPES if has_masks else ("bbox",)
            metrics = coco_evaluate(gt, results, iou_types, per_category=per_category)
        except BaseException:
            if hosts.count > 1:  # the other hosts wait in the broadcast: let them stop
                broadcast_metrics(None, hosts)
            raise
    if hosts.count > 1:
        metrics = broadcast_metrics(metrics, hosts)
    log.info("COCO metrics over %d images:\n%s", num_images, format_metrics_table(metrics))
    for iou_type in IOU_TYPES:
        table = format_per_category_table(metrics, iou_type)
        if table:
            log.info("Per-category %s AP:\n%s", iou_type, table)
    return metrics, results


def _json_value(value: float) -> float | None:
    # JSON has no NaN: empty size buckets are written as null.
    return None if isinstance(value, float) and math.isnan(value) else value


def tensorboard_tag(name: str) -> str:
    """`name` with each character TensorBoard does not take in a tag (spaces, parentheses: the
    per-category keys "bbox/AP-traffic light", "AP-thing (id 3)") replaced by "_"; tensorboardX
    would otherwise log a warning for each on every write."""
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)


def write_metrics(
    workdir: str, step: int, metrics: Mapping[str, float], summary_writer=None
) -> None:
    """Appends {"step", **metrics} to WORKDIR/eval_metrics.jsonl; writes WORKDIR/eval_step_N.json.

    With a tensorboardX `SummaryWriter`, also adds one scalar per metric, tagged "eval/<key>".
    Call it from one process only (process 0) in multi-host runs.
    """
    os.makedirs(workdir, exist_ok=True)
    record = {"step": int(step), **{k: _json_value(float(v)) for k, v in metrics.items()}}
    with open(os.path.join(workdir, "eval_metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    with open(os.path.join(workdir, f"eval_step_{int(step)}.json"), "w") as f:
        json.dump(record, f, indent=2)
    if summary_writer is not None:
        for key, value in metrics.items():
            summary_writer.add_scalar(tensorboard_tag(f"eval/{key}"), float(value), int(step))
        summary_writer.flush()


def format_metrics_table(metrics: Mapping[str, float]) -> str:
    """A text table in percent with one decimal (as detectron2 prints), one row per iou type:

    type |   AP  | AP50 | ...
    bbox |  38.6 | 59.4 | ...
    """
    kinds = [t for t in IOU_TYPES if any(k.startswith(f"{t}/") for k in metrics)]
    kinds += sorted({k.split("/")[0] for k in metrics if "/" in k} - set(kinds))
    header = "type | " + " | ".join(f"{n:>5}" for n in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for kind in kinds:
        cells = []
        for name in METRIC_NAMES:
            value = metrics.get(f"{kind}/{name}", math.nan)
            cells.append(f"{100.0 * value:5.1f}" if not math.isnan(value) else f"{'nan':>5}")
        lines.append(f"{kind:<4} | " + " | ".join(cells))
    return "\n".join(lines)


def format_per_category_table(
    metrics: Mapping[str, float], iou_type: str, pairs_per_row: int = 3
) -> str | None:
    """The "IOU_TYPE/AP-NAME" entries of `metrics` as a text table in percent, `pairs_per_row`
    (category, AP) pairs per row, as detectron2 logs them; None when there are none.

    category     |   AP  | category     |   AP  | ...
    person       |  52.1 | bicycle      |  30.2 | ...
    """
    prefix = f"{iou_type}/AP-"
    cells = [(k[len(prefix):], v) for k, v in metrics.items() if k.startswith(prefix)]
    if not cells:
        return None
    width = max(len("category"), *(len(name) for name, _ in cells))

    def cell(name: str, value: str) -> str:
        return f"{name:<{width}} | {value:>5}"

    header = " | ".join([cell("category", "AP")] * min(pairs_per_row, len(cells)))
    lines = [header, "-" * len(header)]
    for start in range(0, len(cells), pairs_per_row):
        row = cells[start : start + pairs_per_row]
        lines.append(" | ".join(
            cell(name, "nan" if math.isnan(v) else f"{100.0 * v:.1f}") for name, v in row
        ))
    return "\n".join(lines)


def eval_config_errors(eval_cfg) -> list[str]:
    """What is wrong with the device-mask keys of `config.eval` (empty when nothing)."""
    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    errors = []
    mode = eval_cfg.get("device_masks")
    if mode not in ("auto", "on", "off"):
        errors.append(f"eval.device_masks: expected auto, on or off, got {mode!r}")
    canvas = eval_cfg.get("device_mask_canvas")
    if not (isinstance(canvas, (tuple, list)) and len(canvas) == 2
            and all(positive_int(v) for v in canvas)):
        errors.append(f"eval.device_mask_canvas: expected (height, width) > 0, got {canvas!r}")
    max_runs = eval_cfg.get("device_mask_max_runs")
    if not positive_int(max_runs):
        errors.append(f"eval.device_mask_max_runs: expected an int > 0, got {max_runs!r}")
    return errors


def device_masks_enabled(eval_cfg, backend: str | None = None) -> bool:
    """Whether evaluation pastes masks on the device (`eval.device_masks`, see configs/base.py)."""
    errors = eval_config_errors(eval_cfg)
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    if eval_cfg.device_masks == "auto":
        return (backend or jax.default_backend()) != "cpu"
    return eval_cfg.device_masks == "on"


def _with_mask_rles(predict: Callable, mask_rles: Callable) -> Callable:
    """predict(batch) -> Detections, plus mask_rle_chars / mask_rle_len (`make_device_mask_rles`)
    as a mapping."""

    def predict_with_mask_rles(batch):
        dets = predict(batch)
        masks = _field(dets, "masks")
        if masks is None:
            return dets
        chars, lengths = mask_rles(
            _field(dets, "boxes"), masks, batch["scales"], batch["orig_sizes"]
        )
        fields = ("boxes", "scores", "classes", "valid", "masks")
        return {**{k: _field(dets, k) for k in fields}, "mask_rle_chars": chars,
                "mask_rle_len": lengths}

    return predict_with_mask_rles


def over_local_devices(predict_fn, variables, devices=None):
    """predict(batch) -> the padded detections of `predict_fn(variables, images, image_sizes)`,
    computed over this host's devices (`devices`, default `jax.local_devices()`): the batch split
    over them (padded with copies of its first image to a multiple of their number, whose
    outputs are dropped), the variables replicated once. On one device, the plain call.

    Evaluation used one device per host; an 8-GPU host now predicts on all eight."""
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) == 1:
        return lambda batch: predict_fn(variables, batch["images"], batch["image_sizes"])
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    placed = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))

    def predict(batch):
        images, sizes = np.asarray(batch["images"]), np.asarray(batch["image_sizes"])
        n = len(images)
        pad = -n % len(devices)
        if pad:
            images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
            sizes = np.concatenate([sizes, np.repeat(sizes[:1], pad, axis=0)])
        dets = predict_fn(placed, jax.device_put(images, rows), jax.device_put(sizes, rows))
        return jax.tree.map(lambda a: a[:n], dets) if pad else dets

    return predict


def evaluate_model(
    config, model, variables, workdir: str, step: int, summary_writer=None,
    hosts: Hosts | None = None,
) -> dict:
    """COCO bbox / segm metrics of `variables` on `config.data.eval_split`, written to `workdir`.

    Streams the eval pipeline through the jitted predict function (one compile for the padded
    size), writes WORKDIR/results_step_STEP.json, the metric files and overlay PNGs of the first
    `config.eval.num_overlays` images under WORKDIR/overlays_STEP/. -> metrics.

    On several hosts (`hosts`, default `Hosts.from_jax()`) every host must call it: each predicts
    its own shard of the split and `run_evaluation` gathers the results. Process 0 alone builds
    the ground truth, scores all images and writes the results JSON, the metric files, the
    summaries and the overlays (of the first images of its shard, which are the split's first
    images, as on one host); the other hosts write nothing and return the same metrics.
    """
    from mrcnn_jax import inference, visualize
    from mrcnn_jax.data import pipeline

    if hosts is None:
        hosts = Hosts.from_jax()
    main = hosts.index == 0
    info = pipeline.dataset_info(config)
    predict_fn = inference.make_predict_fn(model, config.model, config.data.image_size)
    overlay_dir = os.path.join(workdir, f"overlays_{int(step)}")
    remaining = [int(config.eval.num_overlays)]

    def pictures(dets, batch):
        if remaining[0] <= 0:
            return
        keep = np.asarray(batch["example_valid"], bool).copy()
        keep[np.cumsum(keep) > remaining[0]] = False
        remaining[0] -= int(keep.sum())
        visualize.save_batch_overlays(
            dets, {**batch, "example_valid": keep}, overlay_dir, info.class_names,
            pixel_mean=config.data.pixel_mean, pixel_std=config.data.pixel_std,
            channel_order=config.data.channel_order,
            mask_threshold=config.model.test.mask_threshold,
            mask_paste=config.model.test.mask_paste,
        )

    one = not config.eval.get("local_devices", True)
    predict = over_local_devices(predict_fn, variables, jax.local_devices()[:1] if one else None)
    paste_workers = config.eval.paste_workers
    if device_masks_enabled(config.eval):
        mask_rles = make_device_mask_rles(
            config.eval.device_mask_canvas, config.model.test.mask_threshold,
            config.eval.device_mask_max_runs, config.model.test.mask_paste,
        )
        predict = _with_mask_rles(predict, mask_rles)
        # The host only slices strings then: handing the batches to worker processes costs more
        # than it saves (H200: 193 img/s in one process, 97 with 8 workers).
        paste_workers = 0

    # The shard is named only with several hosts, so one host calls the pipeline as it always did.
    shard = {} if hosts.count == 1 else {"process_index": hosts.index, "process_count": hosts.count}
    metrics, _ = run_evaluation(
        predict,
        pipeline.eval_batches(config, gt_masks=False, **shard),  # scored against the annotations
        pipeline.coco_ground_truth(config) if main else None,  # reads every image's annotations
        info.label_to_category_id,
        mask_threshold=config.model.test.mask_threshold,
        mask_paste=config.model.test.mask_paste,
        results_path=os.path.join(workdir, f"results_step_{int(step)}.json"),
        on_batch=pictures if main and remaining[0] > 0 else None,
        paste_workers=paste_workers,
        hosts=hosts,
        per_category=config.eval.per_category_ap,
    )
    if main:
        write_metrics(workdir, step, metrics, summary_writer)
    return metrics
