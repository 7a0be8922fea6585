"""Host-side COCO evaluation: results conversion, pycocotools metrics, streaming, metric files.

The ground truth is a small synthetic COCO dict built here: three images of different sizes with
non-contiguous ids, three non-contiguous category ids, objects in all three size buckets (small
< 32^2, medium < 96^2, large), rectangles as compressed RLE, a disc, a polygon and one crowd region
as uncompressed RLE (as COCO stores crowds).
"""

import json
import math
import os
import struct
import tracemalloc

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax import evaluate
from mrcnn_jax.structures import Detections

LABEL_TO_CAT = {1: 3, 2: 17, 3: 90}
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 17, "name": "disc"}, {"id": 90, "name": "bar"}]
IMAGES = {7: (64, 80), 42: (96, 72), 1001: (160, 140)}  # id -> (height, width)
# (image_id, label, x1, y1, x2, y2) rectangles in original pixels; areas 256, 1600, 2400, 360,
# 12100, 169: small, medium and large objects.
RECTS = [
    (7, 1, 4, 6, 20, 22),
    (7, 2, 30, 10, 70, 50),
    (42, 3, 5, 5, 65, 45),
    (42, 1, 10, 60, 22, 90),
    (1001, 2, 10, 20, 120, 130),
    (1001, 3, 125, 5, 138, 18),
]
CROWD = (1001, 1, 20, 135, 130, 158)  # far from every other object of image 1001


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _rect_mask(image_id, x1, y1, x2, y2):
    mask = np.zeros(IMAGES[image_id], bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _annotation(ann_id, image_id, label, segmentation, mask, crowd=False):
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": LABEL_TO_CAT[label],
        "segmentation": segmentation,
        "area": float(mask.sum()),
        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
        "iscrowd": int(crowd),
    }


def make_gt(shapes: bool = True, crowd: bool = True) -> dict:
    """The synthetic COCO gt dict; `shapes` adds a disc (RLE) and a triangle (polygon)."""
    anns = []
    for image_id, label, *box in RECTS:
        mask = _rect_mask(image_id, *box)
        anns.append(_annotation(len(anns) + 1, image_id, label, _rle(mask), mask))
    if shapes:
        yy, xx = np.mgrid[:96, :72] + 0.5
        disc = (xx - 50) ** 2 + (yy - 75) ** 2 <= 12**2
        anns.append(_annotation(len(anns) + 1, 42, 2, _rle(disc), disc))
        polygon = [[4.0, 30.0, 26.0, 62.0, 4.0, 62.0]]
        tri = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 64, 80))) > 0
        anns.append(_annotation(len(anns) + 1, 7, 3, polygon, tri))
    if crowd:
        image_id, label, *box = CROWD
        mask = _rect_mask(image_id, *box)
        anns.append(
            _annotation(len(anns) + 1, image_id, label, _uncompressed_rle(mask), mask, True)
        )
    images = [
        {"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, (h, w) in IMAGES.items()
    ]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def gt_masks(gt: dict) -> dict[int, np.ndarray]:
    """Annotation id -> its decoded [H, W] bool mask (pycocotools decodes polygons / RLEs)."""
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    return {a["id"]: coco.annToMask(a) > 0 for a in gt["annotations"]}


def perfect_results(gt: dict, score: float = 1.0) -> list[dict]:
    masks = gt_masks(gt)
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "score": score,
            "bbox": list(a["bbox"]),
            "segmentation": _rle(masks[a["id"]]),
        }
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def _iou_xywh(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _keys(kind):
    return [f"{kind}/{n}" for n in evaluate.METRIC_NAMES]


# ------------------------------------------------------------------ coco_evaluate


def test_perfect_results_score_one():
    gt = make_gt()
    metrics = evaluate.coco_evaluate(gt, perfect_results(gt))
    assert sorted(metrics) == sorted(_keys("bbox") + _keys("segm"))
    for key, value in metrics.items():
        assert value == pytest.approx(1.0), key


def test_shifted_boxes_give_the_iou_band_ap():
    """Every box shifted by 23% of its width: IoU = 0.77 / 1.23 = 0.626 for all of them, so the
    detections are true positives at IoU thresholds 0.5, 0.55, 0.6 and false positives at the
    seven higher ones: AP = 3 / 10 exactly, AP50 = 1, AP75 = 0."""
    gt = make_gt()
    results = []
    for r in perfect_results(gt):
        x, y, w, h = r["bbox"]
        shifted = [x + 0.23 * w, y, w, h]
        assert 0.61 < _iou_xywh(shifted, r["bbox"]) < 0.64
        results.append({**r, "bbox": shifted})
    metrics = evaluate.coco_evaluate(gt, results, iou_types=("bbox",))
    assert sorted(metrics) == sorted(_keys("bbox"))
    assert metrics["bbox/AP50"] == pytest.approx(1.0)
    assert metrics["bbox/AP75"] == pytest.approx(0.0)
    for bucket in ("AP", "APs", "APm", "APl"):
        assert metrics[f"bbox/{bucket}"] == pytest.approx(0.3), bucket


def _category_ap_alone(gt: dict, results: list[dict], iou_type: str, category_id: int) -> float:
    """pycocotools' summary AP with the evaluation restricted to one category."""
    coco_gt = COCO()
    coco_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iou_type)
    evaluator.params.catIds = [category_id]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0]) if evaluator.stats[0] >= 0 else math.nan


def test_per_category_ap_is_cocoeval_on_that_category_alone():
    gt = make_gt()
    gt["categories"] = [*CATEGORIES, {"id": 50, "name": "traffic light"}]  # no gt, no detection
    rng = np.random.default_rng(0)
    results = []
    for r in perfect_results(gt):  # each category its own AP: boxes moved by category-wise amounts
        x, y, w, h = r["bbox"]
        shift = {3: 0.0, 17: 0.23, 90: 0.12}[r["category_id"]] * w
        results.append({**r, "bbox": [x + shift, y, w, h], "score": float(rng.uniform(0.1, 1))})
        results.append({**r, "bbox": [x, y + 0.4 * h, w, h], "score": float(rng.uniform(0, 0.5))})
    metrics = evaluate.coco_evaluate(gt, results, per_category=True)
    per_category = {k: v for k, v in metrics.items() if "/AP-" in k}
    assert list(per_category) == [f"{t}/AP-{c['name']}" for t in ("bbox", "segm")  # in id order
                                  for c in sorted(gt["categories"], key=lambda c: c["id"])]
    for iou_type in ("bbox", "segm"):
        for cat in CATEGORIES:
            expected = _category_ap_alone(gt, results, iou_type, cat["id"])
            assert metrics[f"{iou_type}/AP-{cat['name']}"] == pytest.approx(expected, abs=1e-12)
        assert math.isnan(metrics[f"{iou_type}/AP-traffic light"])
        values = [metrics[f"{iou_type}/AP-{c['name']}"] for c in CATEGORIES]
        if iou_type == "bbox":  # the masks are not moved
            assert len(set(values)) == 3 and min(values) < 0.9  # the categories are told apart
        # the summary AP averages the categories with ground truth
        assert np.mean(values) == pytest.approx(metrics[f"{iou_type}/AP"], abs=1e-12)
    assert evaluate.coco_evaluate(gt, results, ("bbox",)) == {
        k: v for k, v in metrics.items() if k.startswith("bbox/") and "/AP-" not in k
    }  # per_category=False: the six summary metrics only


def test_per_category_names_shared_by_two_categories_get_the_id():
    gt = make_gt()
    gt["categories"] = [{**c, "name": "thing" if c["id"] != 90 else "bar"} for c in CATEGORIES]
    metrics = evaluate.coco_evaluate(gt, perfect_results(gt), ("bbox",), per_category=True)
    assert [k for k in metrics if "/AP-" in k] == [
        "bbox/AP-thing (id 3)", "bbox/AP-thing (id 17)", "bbox/AP-bar"
    ]
    assert all(metrics[k] == pytest.approx(1.0) for k in metrics if "/AP-" in k)


def test_eroded_masks_lower_segm_ap_only():
    gt = make_gt()
    masks = gt_masks(gt)
    results = perfect_results(gt)
    ious = []
    for r, a in zip(results, [a for a in gt["annotations"] if not a["iscrowd"]], strict=True):
        eroded = _erode(masks[a["id"]])
        ious.append((eroded & masks[a["id"]]).sum() / (eroded | masks[a["id"]]).sum())
        r["segmentation"] = _rle(eroded)
    ious = np.array(ious)
    assert ious.min() >= 0.5 and ious.min() < 0.95
    metrics = evaluate.coco_evaluate(gt, results)
    # Boxes untouched: bbox AP stays perfect; the bbox results carry no segmentation.
    assert metrics["bbox/AP"] == pytest.approx(1.0)
    assert metrics["segm/AP50"] == pytest.approx(1.0)  # every eroded IoU >= 0.5 (checked above)
    assert metrics["segm/AP"] < 0.9
    # The one large object (110 x 110) keeps IoU 108^2 / 110^2 = 0.964 >= 0.95.
    assert ious[4] == pytest.approx(108**2 / 110**2)
    assert metrics["segm/APl"] == pytest.approx(1.0)
    assert metrics["segm/APs"] < metrics["segm/APl"]


def test_segm_size_buckets_use_the_mask_area():
    """A false positive whose mask is a thin L (area ~ 210, small) inside a large box (105 x 105):
    segm results carry no bbox, so pycocotools counts it in the small bucket, not the large one."""
    gt = make_gt()
    results = perfect_results(gt, score=0.9)
    l_mask = np.zeros(IMAGES[1001], bool)
    l_mask[25, 15:120] = True
    l_mask[25:130, 15] = True
    results.append(
        {
            "image_id": 1001,
            "category_id": 3,
            "score": 1.0,
            "bbox": [15.0, 25.0, 105.0, 105.0],
            "segmentation": _rle(l_mask),
        }
    )
    metrics = evaluate.coco_evaluate(gt, results, iou_types=("segm",))
    assert metrics["segm/APl"] == pytest.approx(1.0)
    assert metrics["segm/APs"] < 1.0


def test_detections_on_crowd_regions_are_ignored():
    gt = make_gt()
    crowd_mask = _rect_mask(CROWD[0], *CROWD[2:])
    on_crowd = {
        "image_id": CROWD[0],
        "category_id": LABEL_TO_CAT[CROWD[1]],
        "score": 1.0,  # above every true positive (0.9): as a false positive it would cost AP
        "bbox": [40.0, 137.0, 50.0, 20.0],  # inside the crowd region
        "segmentation": _rle(_rect_mask(CROWD[0], 40, 137, 90, 157) & crowd_mask),
    }
    results = perfect_results(gt, score=0.9) + [on_crowd]
    metrics = evaluate.coco_evaluate(gt, results)
    assert metrics["bbox/AP"] == pytest.approx(1.0)
    assert metrics["segm/AP"] == pytest.approx(1.0)
    # Control: without the crowd annotation the same detection is a false positive.
    no_crowd = make_gt(crowd=False)
    metrics = evaluate.coco_evaluate(no_crowd, perfect_results(no_crowd, 0.9) + [on_crowd])
    assert metrics["bbox/AP"] < 0.99 and metrics["segm/AP"] < 0.99


def test_empty_results_give_zero_and_nan_for_empty_buckets():
    gt = make_gt()
    metrics = evaluate.coco_evaluate(gt, [])
    assert sorted(metrics) == sorted(_keys("bbox") + _keys("segm"))
    assert all(v == 0.0 for v in metrics.values())
    # Only medium objects in the gt: the small and large buckets have no gt -> NaN.
    medium = {**gt, "annotations": [a for a in gt["annotations"] if 32**2 <= a["area"] < 96**2]}
    metrics = evaluate.coco_evaluate(medium, [], iou_types=("bbox",))
    assert metrics["bbox/AP"] == 0.0 and metrics["bbox/APm"] == 0.0
    assert math.isnan(metrics["bbox/APs"]) and math.isnan(metrics["bbox/APl"])


def test_inputs_are_not_modified_and_prints_are_silenced(capsys):
    gt = make_gt()
    results = perfect_results(gt)
    gt_before, results_before = json.dumps(gt), json.dumps(results)
    capsys.readouterr()  # drop the test helpers' own pycocotools prints
    evaluate.coco_evaluate(gt, results)
    assert json.dumps(gt) == gt_before and json.dumps(results) == results_before
    assert capsys.readouterr().out == ""


def test_segm_skipped_when_results_have_no_masks():
    gt = make_gt()
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in perfect_results(gt)]
    metrics = evaluate.coco_evaluate(gt, boxes_only)
    assert sorted(metrics) == sorted(_keys("bbox"))
    assert metrics["bbox/AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------ detections_to_coco


def _batch(image_ids, scales, orig_sizes, example_valid):
    return {
        "image_ids": np.array(image_ids, np.int64),
        "scales": np.array(scales, np.float32),
        "orig_sizes": np.array(orig_sizes, np.int32),
        "example_valid": np.array(example_valid, bool),
    }


def test_boxes_mapped_to_the_original_image_by_hand():
    batch = _batch(
        [7, 42, 0], [1.25, 0.5, 1.0], [[60, 80], [96, 72], [10, 10]], [True, True, False]
    )
    boxes = np.zeros((3, 4, 4), np.float32)
    boxes[0, 0] = [10, 20, 50, 75]  # / 1.25 = [8, 16, 40, 60]: y2 at the image bottom (60)
    boxes[0, 1] = [90, -5, 120, 30]  # / 1.25 = [72, -4, 96, 24] -> clipped to [72, 0, 80, 24]
    boxes[0, 2] = [110, 10, 130, 20]  # / 1.25 = [88, 8, 104, 16]: empty after the clip -> dropped
    boxes[0, 3] = [1, 1, 5, 5]  # invalid
    boxes[1, 0] = [3, 4, 10, 30]  # / 0.5 = [6, 8, 20, 60]
    boxes[2, 0] = [1, 1, 5, 5]  # the dummy example
    dets = {
        "boxes": boxes,
        "scores": np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0, 0, 0], [0.99, 0, 0, 0]], np.float32),
        "classes": np.array([[1, 2, 3, 1], [3, 0, 0, 0], [1, 0, 0, 0]], np.int32),
        "valid": np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool),
        "masks": None,
    }
    results = evaluate.detections_to_coco(dets, batch, LABEL_TO_CAT)
    expected = [
        (7, 3, 0.9, [8.0, 16.0, 32.0, 44.0]),
        (7, 17, 0.8, [72.0, 0.0, 8.0, 24.0]),
        (42, 90, 0.5, [6.0, 8.0, 14.0, 52.0]),
    ]
    assert len(results) == len(expected)
    for r, (image_id, cat, score, bbox) in zip(results, expected, strict=True):
        assert set(r) == {"image_id", "category_id", "score", "bbox"}
        assert r["image_id"] == image_id and r["category_id"] == cat
        assert type(r["image_id"]) is int and type(r["category_id"]) is int
        assert r["score"] == pytest.approx(score)
        np.testing.assert_allclose(r["bbox"], bbox, atol=1e-5)
    json.dumps(results)  # plain Python types only


def test_boxes_mapped_back_per_axis():
    """scales [B, 2] = (rh / h, rw / w): a 427 x 640 image resized to 800 x 1199 has factors
    800 / 427 and 1199 / 640, which differ in the fourth digit; each axis is divided by its own
    (detectron2's detector_postprocess), so a box at the resized border maps to the original's."""
    sy, sx = 800 / 427, 1199 / 640
    batch = _batch([7], [[sy, sx]], [[427, 640]], [True])
    dets = {
        "boxes": np.array([[[0.0, 0.0, 1199.0, 800.0], [119.9, 80.0, 599.5, 400.0]]], np.float32),
        "scores": np.array([[0.9, 0.8]], np.float32),
        "classes": np.array([[1, 2]], np.int32),
        "valid": np.ones((1, 2), bool),
        "masks": None,
    }
    results = evaluate.detections_to_coco(dets, batch, LABEL_TO_CAT)
    np.testing.assert_allclose(results[0]["bbox"], [0, 0, 640, 427], atol=1e-3)
    x1, y1 = 119.9 / sx, 80 / sy
    np.testing.assert_allclose(
        results[1]["bbox"], [x1, y1, 599.5 / sx - x1, 400 / sy - y1], rtol=1e-5
    )
    # One factor for both axes (the older batch layout) still maps both axes by it.
    one = evaluate.detections_to_coco(dets, _batch([7], [sy], [[427, 640]], [True]), LABEL_TO_CAT)
    np.testing.assert_allclose(one[1]["bbox"][:2], [119.9 / sy, 80 / sy], rtol=1e-5)


def test_masks_pasted_at_the_original_size():
    """A box-filling 28x28 mask pastes back to exactly its integer box (detectron2's paste), at
    the original resolution; a mask below the threshold pastes nothing."""
    batch = _batch([42], [2.0], [[96, 72]], [True])
    dets = Detections(
        boxes=np.array([[[20, 10, 130, 90], [0, 0, 40, 40]]], np.float32),  # orig [10, 5, 65, 45]
        scores=np.array([[0.9, 0.8]], np.float32),
        classes=np.array([[3, 1]], np.int32),
        valid=np.array([[True, True]]),
        masks=np.stack([np.ones((28, 28)), np.full((28, 28), 0.4)])[None].astype(np.float32),
    )
    results = evaluate.detections_to_coco(dets, batch, LABEL_TO_CAT, mask_threshold=0.5)
    assert len(results) == 2
    seg = results[0]["segmentation"]
    assert isinstance(seg["counts"], str) and seg["size"] == [96, 72]
    np.testing.assert_array_equal(mask_utils.decode(seg) > 0, _rect_mask(42, 10, 5, 65, 45))
    assert mask_utils.decode(results[1]["segmentation"]).sum() == 0
    lower = evaluate.detections_to_coco(dets, batch, LABEL_TO_CAT, mask_threshold=0.3)
    np.testing.assert_array_equal(
        mask_utils.decode(lower[1]["segmentation"]) > 0, _rect_mask(42, 0, 0, 20, 20)
    )
    # image_detections gives the same masks for pictures.
    one = evaluate.image_detections(dets, batch, 0, mask_threshold=0.5)
    assert one["masks"].shape == (2, 96, 72) and one["masks"].dtype == bool
    np.testing.assert_array_equal(one["masks"][0], _rect_mask(42, 10, 5, 65, 45))
    np.testing.assert_allclose(one["boxes"], [[10, 5, 65, 45], [0, 0, 20, 20]])


def test_encode_masks_reads_any_layout():
    """The host paste stores masks column-major (a transposed view); C-order masks and uint8 masks
    must encode to the same RLEs, which decode back to the masks."""
    from mrcnn_jax.ops.masks import paste_masks

    rng = np.random.default_rng(8)
    probs = rng.uniform(size=(5, 28, 28)).astype(np.float32)
    boxes = np.array([[3, 4, 40, 30], [0, 0, 50, 61], [10, 20, 11, 22], [-5, 40, 20, 70], [30, 2, 49, 9]],
                     np.float32)
    pasted = paste_masks(probs, boxes, 61, 50, 0.5)
    assert pasted.shape == (5, 61, 50) and not pasted.flags.c_contiguous
    c_order = np.ascontiguousarray(pasted)
    rles = evaluate.encode_masks(pasted)
    assert rles == evaluate.encode_masks(c_order) == evaluate.encode_masks(c_order.astype(np.uint8))
    for rle, mask in zip(rles, c_order, strict=True):
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    assert evaluate.encode_masks(np.zeros((0, 61, 50), bool)) == []


def test_results_json_loads_with_loadres(tmp_path):
    gt = make_gt(shapes=False)
    batch, dets = _fake_batches(gt, batch_size=4, num_detections=6)[0]
    results = evaluate.detections_to_coco(dets, batch, LABEL_TO_CAT)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    loaded = coco.loadRes(str(path))
    assert len(loaded.getAnnIds()) == len(results) == 6  # 6 non-crowd objects, none dropped
    by_box = {tuple(a["bbox"]): a["image_id"] for a in gt["annotations"] if not a["iscrowd"]}
    for ann in loaded.loadAnns(loaded.getAnnIds()):
        x, y, w, h = (round(v) for v in ann["bbox"])
        image_id = by_box[(x, y, w, h)]
        expected = _pasted_ones(x, y, x + w, y + h, *IMAGES[image_id])
        np.testing.assert_array_equal(loaded.annToMask(ann) > 0, expected)
        # Differs from the box rectangle at most in its 4 corner pixels (tent weights ~0.6^2).
        rect = _rect_mask(image_id, x, y, x + w, y + h)
        assert (expected ^ rect).sum() <= 4 and not np.any(expected & ~rect)


def _pasted_ones(x1, y1, x2, y2, height, width, m=28):
    """Reference paste of an all-ones M x M mask (detectron2): per axis, pixel centre x + 0.5 maps
    to u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5 and bilinear weights sum the ones inside [0, M)."""

    def axis(lo, hi, size):
        out = np.zeros(size)
        for p in range(size):
            u = (p + 0.5 - lo) / (hi - lo) * m - 0.5
            out[p] = sum(max(0.0, 1.0 - abs(u - k)) for k in range(m))
        return out

    return axis(y1, y2, height)[:, None] * axis(x1, x2, width)[None, :] >= 0.5


# ------------------------------------------------------------------ run_evaluation


# (y, x) resize factors, exact in float32: box * s / s == box.
SCALES = {7: (1.25, 0.5), 42: (0.5, 2.0), 1001: (2.0, 2.0)}


def _fake_batches(gt, batch_size, num_detections, images=None):
    """(batch, dets) pairs derived from the gt rectangles: boxes in resized pixels, box-filling
    masks, garbage in the padded detections and in the dummy examples of the last batch."""
    rng = np.random.default_rng(0)
    images = images or IMAGES
    scales = {i: SCALES.get(i, (1.0, 1.0)) for i in images}
    by_image = {
        i: [a for a in gt["annotations"] if a["image_id"] == i and not a["iscrowd"]] for i in images
    }
    ids = list(images)
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        n_real = len(chunk)
        chunk = chunk + [0] * (batch_size - n_real)
        d = num_detections
        boxes = rng.uniform(0, 50, (batch_size, d, 4)).astype(np.float32)
        scores = rng.uniform(0, 1, (batch_size, d)).astype(np.float32)
        classes = rng.integers(1, 4, (batch_size, d)).astype(np.int32)
        valid = np.zeros((batch_size, d), bool)
        masks = rng.uniform(0, 1, (batch_size, d, 28, 28)).astype(np.float32)
        for b, image_id in enumerate(chunk[:n_real]):
            for k, a in enumerate(by_image[image_id]):
                x, y, w, h = a["bbox"]
                sy, sx = scales[image_id]
                boxes[b, k] = np.array([x, y, x + w, y + h]) * [sx, sy, sx, sy]
                scores[b, k] = 1.0
                classes[b, k] = {v: c for c, v in LABEL_TO_CAT.items()}[a["category_id"]]
                valid[b, k] = True
                masks[b, k] = 1.0
        valid[n_real:] = rng.uniform(size=(batch_size - n_real, d)) < 0.5  # dummies: ignored
        batch = _batch(
            chunk,
            [scales.get(i, (1.0, 1.0)) for i in chunk],
            [images.get(i, (8, 8)) for i in chunk],
            [True] * n_real + [False] * (batch_size - n_real),
        )
        out.append((batch, Detections(boxes, scores, classes, valid, masks)))
    return out


def _predict_from(pairs):
    """A fake predict_fn: looks the batch's detections up by its image ids."""
    table = {tuple(b["image_ids"].reshape(-1).tolist()): d for b, d in pairs}
    return lambda batch: table[tuple(np.asarray(batch["image_ids"]).reshape(-1).tolist())]


def test_run_evaluation_with_gt_derived_detections_scores_one(tmp_path):
    gt = make_gt(shapes=False)
    pairs = _fake_batches(gt, batch_size=2, num_detections=5)
    assert not pairs[-1][0]["example_valid"][-1]  # the last batch has a dummy example
    path = str(tmp_path / "out" / "results.json")
    metrics, results = evaluate.run_evaluation(
        _predict_from(pairs), (b for b, _ in pairs), gt, LABEL_TO_CAT, results_path=path
    )
    assert sorted(metrics) == sorted(_keys("bbox") + _keys("segm"))
    for key, value in metrics.items():
        assert value == pytest.approx(1.0), key
    assert len(results) == len(RECTS)
    with open(path) as f:
        assert json.load(f) == results


def test_run_evaluation_merges_a_device_axis():
    """pmap outputs [devices, B, ...] with batches [devices, B, ...] give the same results."""
    gt = make_gt(shapes=False)
    (batch, dets), *_ = _fake_batches(gt, batch_size=4, num_detections=6)
    split = lambda x: None if x is None else np.asarray(x).reshape(2, 2, *np.shape(x)[1:])
    batch2 = {k: split(v) for k, v in batch.items()}
    dets2 = Detections(
        *(split(getattr(dets, f)) for f in ("boxes", "scores", "classes", "valid", "masks"))
    )
    flat = evaluate.run_evaluation(lambda b: dets, [batch], gt, LABEL_TO_CAT)
    stacked = evaluate.run_evaluation(lambda b: dets2, [batch2], gt, LABEL_TO_CAT)
    assert flat[1] == stacked[1]


def test_run_evaluation_without_detections_gives_zeros():
    gt = make_gt(shapes=False)
    (batch, dets), *_ = _fake_batches(gt, batch_size=4, num_detections=3)
    none = dets.replace(valid=np.zeros_like(dets.valid), masks=None)
    metrics, results = evaluate.run_evaluation(lambda b: none, [batch], gt, LABEL_TO_CAT)
    assert results == []
    assert sorted(metrics) == sorted(_keys("bbox"))  # no masks predicted: bbox only
    assert all(v == 0.0 for v in metrics.values())


def _many_images(num_images, size=192, per_image=8):
    """num_images images of size x size, each with `per_image` random integer rectangles."""
    rng = np.random.default_rng(1)
    images = {100 + i: (size, size) for i in range(num_images)}
    anns = []
    for image_id in images:
        for _ in range(per_image):
            x1, y1 = rng.integers(0, size - 40, 2)
            w, h = rng.integers(8, 40, 2)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 17,
                    "segmentation": _rle(
                        np.pad(np.ones((h, w), bool), [(y1, size - y1 - h), (x1, size - x1 - w)])
                    ),
                    "area": float(w * h),
                    "bbox": [float(x1), float(y1), float(w), float(h)],
                    "iscrowd": 0,
                }
            )
    imgs = [{"id": i, "height": h, "width": w} for i, (h, w) in images.items()]
    return {"images": imgs, "annotations": anns, "categories": CATEGORIES}, images


def _traced_run(num_images):
    gt, images = _many_images(num_images)
    pairs = _fake_batches(gt, batch_size=4, num_detections=10, images=images)
    predict = _predict_from(pairs)
    tracemalloc.start()
    try:
        metrics, results = evaluate.run_evaluation(predict, (b for b, _ in pairs), gt, LABEL_TO_CAT)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return metrics, results, current, peak


def test_run_evaluation_memory_does_not_grow_with_images():
    """Full-size masks are never retained: what stays allocated (the results included) is far
    below one byte per pasted mask pixel, and the peak barely moves from 8 to 32 images."""
    m8, _, current8, peak8 = _traced_run(8)
    m32, results32, current32, peak32 = _traced_run(32)
    assert m8["segm/AP"] == pytest.approx(1.0) and m32["segm/AP"] == pytest.approx(1.0)
    full_mask_bytes = len(results32) * 192 * 192  # 256 masks: 9.4 MB as bool
    assert current32 < full_mask_bytes / 10
    assert peak32 < 1.5 * peak8 + full_mask_bytes / 10


# ------------------------------------------------------------------ metric files and table


def _read_tb_scalars(logdir) -> dict:
    """Parses tensorboardX event files (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(logdir.iterdir()):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = v.simple_value
    return scalars


def test_write_metrics_files_and_tensorboard(tmp_path):
    from tensorboardX import SummaryWriter

    metrics = {"bbox/AP": 0.25, "bbox/APs": math.nan, "segm/AP": 0.125}
    writer = SummaryWriter(str(tmp_path / "tb"))
    evaluate.write_metrics(str(tmp_path / "wd"), 100, metrics, writer)
    evaluate.write_metrics(str(tmp_path / "wd"), 200, {"bbox/AP": 0.5}, writer)
    writer.close()
    lines = (tmp_path / "wd" / "eval_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 100, "bbox/AP": 0.25, "bbox/APs": None, "segm/AP": 0.125},
        {"step": 200, "bbox/AP": 0.5},
    ]
    assert json.loads((tmp_path / "wd" / "eval_step_100.json").read_text())["segm/AP"] == 0.125
    assert json.loads((tmp_path / "wd" / "eval_step_200.json").read_text()) == {
        "step": 200,
        "bbox/AP": 0.5,
    }
    scalars = _read_tb_scalars(tmp_path / "tb")
    assert scalars[("eval/bbox/AP", 100)] == 0.25
    assert scalars[("eval/segm/AP", 100)] == 0.125
    assert scalars[("eval/bbox/AP", 200)] == 0.5


def test_format_metrics_table():
    metrics = {
        f"bbox/{n}": v
        for n, v in zip(evaluate.METRIC_NAMES, [0.386, 0.5942, 0.4, 0.2, 0.3, 0.5], strict=True)
    }
    metrics.update({f"segm/{n}": 0.352 for n in evaluate.METRIC_NAMES})
    metrics["segm/APs"] = math.nan
    lines = evaluate.format_metrics_table(metrics).splitlines()
    assert lines[0].split("|")[1:] == [
        f" {n:>5} " for n in ("AP", "AP50", "AP75", "APs", "APm")
    ] + ["   APl"]
    assert [c.strip() for c in lines[2].split("|")] == [
        "bbox",
        "38.6",
        "59.4",
        "40.0",
        "20.0",
        "30.0",
        "50.0",
    ]
    assert [c.strip() for c in lines[3].split("|")] == [
        "segm",
        "35.2",
        "35.2",
        "35.2",
        "nan",
        "35.2",
        "35.2",
    ]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_tensorboard_tags_of_per_category_keys():
    assert evaluate.tensorboard_tag("eval/bbox/AP-traffic light") == "eval/bbox/AP-traffic_light"
    assert evaluate.tensorboard_tag("eval/segm/AP-thing (id 3)") == "eval/segm/AP-thing__id_3_"
    assert evaluate.tensorboard_tag("train/loss_box.x-1") == "train/loss_box.x-1"


def test_format_per_category_table():
    metrics = {"bbox/AP": 0.4, "bbox/AP-person": 0.5214, "bbox/AP-traffic light": math.nan,
               "bbox/AP-car": 0.3, "bbox/AP-dog": 0.25, "segm/AP-person": 0.5}
    lines = evaluate.format_per_category_table(metrics, "bbox", pairs_per_row=3).splitlines()
    cells = [[c.strip() for c in line.split("|")] for line in lines]
    assert cells[0] == ["category", "AP"] * 3
    assert cells[2] == ["person", "52.1", "traffic light", "nan", "car", "30.0"]
    assert cells[3] == ["dog", "25.0"]
    assert len({len(line) for line in lines[:3]}) == 1  # full rows aligned with the header
    assert evaluate.format_per_category_table(metrics, "segm").splitlines()[2].split("|")[1] == (
        "  50.0"
    )
    assert evaluate.format_per_category_table({"bbox/AP": 0.4}, "bbox") is None


def test_run_evaluation_hands_each_batch_to_on_batch():
    gt = make_gt(shapes=False)
    pairs = _fake_batches(gt, batch_size=2, num_detections=5)
    for batch, _ in pairs:
        batch["images"] = np.zeros((2, 8, 8, 3), np.float32)
    seen = []
    evaluate.run_evaluation(
        _predict_from(pairs),
        [b for b, _ in pairs],
        gt,
        LABEL_TO_CAT,
        on_batch=lambda dets, batch: seen.append((dets, batch)),
    )
    assert len(seen) == len(pairs)
    for (dets, batch), (expected_batch, expected_dets) in zip(seen, pairs, strict=True):
        np.testing.assert_array_equal(batch["image_ids"], expected_batch["image_ids"])
        assert batch["images"].shape == (2, 8, 8, 3)
        np.testing.assert_array_equal(dets.boxes, expected_dets.boxes)


def test_mask_paste_kind_selects_the_family_definition():
    from mrcnn_jax.ops.masks import paste_masks, paste_masks_torchvision

    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(1, 2, 28, 28)).astype(np.float32)
    dets = {
        "boxes": np.array([[[4.0, 6.0, 40.0, 30.0], [10.0, 10.0, 20.5, 44.0]]], np.float32),
        "scores": np.array([[0.9, 0.8]], np.float32),
        "classes": np.array([[1, 2]], np.int32),
        "valid": np.array([[True, True]]),
        "masks": probs,
    }
    batch = {"scales": np.array([2.0], np.float32), "orig_sizes": np.array([[30, 25]], np.int32)}
    boxes = dets["boxes"][0] / 2.0
    boxes = np.clip(boxes, 0, [25, 30, 25, 30])
    d2 = evaluate.image_detections(dets, batch, 0, 0.5, "detectron2")["masks"]
    tv = evaluate.image_detections(dets, batch, 0, 0.5, "torchvision")["masks"]
    np.testing.assert_array_equal(d2, paste_masks(probs[0], boxes, 30, 25, 0.5, xp=np))
    np.testing.assert_array_equal(tv, paste_masks_torchvision(probs[0], boxes, 30, 25, xp=np) > 0.5)
    assert not np.array_equal(d2, tv)
    with pytest.raises(ValueError, match="mask_paste"):
        evaluate.image_detections(dets, batch, 0, 0.5, "caffe2")


def test_run_evaluation_in_paste_worker_processes_gives_the_same_results():
    gt, images = _many_images(12)
    pairs = _fake_batches(gt, batch_size=4, num_detections=10, images=images)
    runs = {
        workers: evaluate.run_evaluation(
            _predict_from(pairs), (b for b, _ in pairs), gt, LABEL_TO_CAT, paste_workers=workers
        )
        for workers in (0, 2)
    }
    (m0, r0), (m2, r2) = runs[0], runs[2]
    assert len(r0) == 12 * 8 and r0 == r2  # same results, same order
    assert m0 == m2 and m0["segm/AP"] == pytest.approx(1.0)


def test_paste_workers_run_single_threaded_blas_and_leave_the_parent_env_alone():
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    pool = evaluate._converter_pool(2)
    try:
        pids = {pool.submit(os.getpid).result() for _ in range(8)}
        assert os.getpid() not in pids and len(pids) <= 2
        assert pool.submit(os.getenv, "OPENBLAS_NUM_THREADS").result() == "1"
    finally:
        pool.shutdown()
    assert os.environ.get("OPENBLAS_NUM_THREADS") == before
    assert evaluate._converter_pool(0) is None


def _smooth_detections(rng, batch, d, size):
    """Detections with blob-shaped 28 x 28 masks (so pasted masks have realistic runs)."""
    h, w = size
    xy = rng.uniform(0, [w - 8, h - 8], (batch, d, 2))
    wh = rng.uniform(4, [w / 2, h / 2], (batch, d, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    yy, xx = np.mgrid[:28, :28]
    cy, cx, r = (rng.uniform(8, 20, (batch, d, 1, 1)) for _ in range(3))
    masks = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)).astype(np.float32)
    return Detections(
        boxes,
        rng.uniform(0.1, 1, (batch, d)).astype(np.float32),
        rng.integers(1, 4, (batch, d)).astype(np.int32),
        rng.uniform(size=(batch, d)) < 0.8,
        masks,
    )


@pytest.mark.parametrize("per_axis", [False, True])
@pytest.mark.parametrize("kind", ["detectron2", "torchvision"])
def test_device_mask_rles_give_the_host_results(kind, per_axis):
    rng = np.random.default_rng(3)
    dets = _smooth_detections(rng, 3, 12, (64, 80))
    # Image 0 is scaled down, image 1 is bigger than the canvas (host fallback), image 2 is a
    # dummy; max_runs is small enough that some masks overflow (host fallback too).
    scales = [[2.0, 1.9], [1.0, 1.0], [1.0, 1.0]] if per_axis else [2.0, 1.0, 1.0]
    batch = _batch([1, 2, 0], scales, [(32, 40), (70, 90), (8, 8)], [True, True, False])
    fn = evaluate.make_device_mask_rles((64, 80), 0.5, max_runs=20, mask_paste=kind)
    chars, lengths = fn(dets.boxes, dets.masks, batch["scales"], batch["orig_sizes"])
    lengths = np.asarray(lengths)
    assert chars.shape == (3, 12, 80) and chars.dtype == np.uint8
    assert np.all(lengths[1] == -1)  # too big for the canvas
    assert np.any(lengths[0] == -1) and np.any(lengths[0] > 0)  # some overflow, some coded
    # The probabilities of the masks the device coded are blanked: the results can only come out
    # right if their strings are used (and the others pasted on the host).
    on_device = lengths >= 0
    with_rles = {
        "boxes": dets.boxes, "scores": dets.scores, "classes": dets.classes, "valid": dets.valid,
        "masks": np.where(on_device[..., None, None], 0.0, dets.masks),
        "mask_rle_chars": np.asarray(chars), "mask_rle_len": lengths,
    }
    host = evaluate.detections_to_coco(dets, batch, LABEL_TO_CAT, 0.5, kind)
    device = evaluate.detections_to_coco(with_rles, batch, LABEL_TO_CAT, 0.5, kind)
    assert len(host) == len(device) > 0
    assert device == host


def test_run_evaluation_with_device_mask_rles_scores_as_the_host():
    gt, images = _many_images(8)
    pairs = _fake_batches(gt, batch_size=4, num_detections=10, images=images)
    mask_rles = evaluate.make_device_mask_rles((256, 256), 0.5, max_runs=512)
    predict = evaluate._with_mask_rles(_predict_from(pairs), mask_rles)
    assert "mask_rle_chars" in predict(pairs[0][0])
    m_host, r_host = evaluate.run_evaluation(
        _predict_from(pairs), (b for b, _ in pairs), gt, LABEL_TO_CAT
    )
    m_dev, r_dev = evaluate.run_evaluation(predict, (b for b, _ in pairs), gt, LABEL_TO_CAT)
    assert r_dev == r_host and m_dev == m_host and m_dev["segm/AP"] == pytest.approx(1.0)


def test_device_masks_setting():
    from configs import base

    eval_cfg = base.get_config().eval
    assert eval_cfg.device_masks == "auto"
    assert evaluate.device_masks_enabled(eval_cfg, backend="gpu")
    assert evaluate.device_masks_enabled(eval_cfg, backend="tpu")
    assert not evaluate.device_masks_enabled(eval_cfg, backend="cpu")
    eval_cfg.device_masks = "on"
    assert evaluate.device_masks_enabled(eval_cfg, backend="cpu")
    eval_cfg.device_masks = "off"
    assert not evaluate.device_masks_enabled(eval_cfg, backend="gpu")
    eval_cfg.device_mask_max_runs = 0
    with pytest.raises(ValueError, match="eval.device_mask_max_runs"):
        evaluate.device_masks_enabled(eval_cfg)


@pytest.mark.parametrize("device_masks, workers", [("on", 0), ("off", 3)])
def test_evaluate_model_hands_out_batches_only_for_host_pasting(
    monkeypatch, tmp_path, device_masks, workers
):
    from types import SimpleNamespace

    from configs import tiny
    from mrcnn_jax import inference
    from mrcnn_jax.data import pipeline

    config = tiny.get_config()
    config.eval.device_masks, config.eval.paste_workers, config.eval.num_overlays = device_masks, 3, 0
    seen = {}

    def fake_run_evaluation(predict, batches, gt, labels, **kwargs):
        seen.update(kwargs, predict=predict)
        return {"bbox/AP": 0.0}, []

    monkeypatch.setattr(evaluate, "run_evaluation", fake_run_evaluation)
    monkeypatch.setattr(evaluate, "write_metrics", lambda *a, **k: None)
    monkeypatch.setattr(inference, "make_predict_fn", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "dataset_info", lambda c: SimpleNamespace(
        class_names=["a"], label_to_category_id={1: 1}))
    monkeypatch.setattr(pipeline, "eval_batches", lambda c, **kwargs: iter(()))
    monkeypatch.setattr(pipeline, "coco_ground_truth", lambda c: {})
    evaluate.evaluate_model(config, None, None, str(tmp_path), 0)
    assert seen["paste_workers"] == workers
    wrapped = seen["predict"].__name__ == "predict_with_mask_rles"  # by _with_mask_rles
    assert wrapped == (device_masks == "on")
