"""Proposals and final detections against straightforward numpy references."""

import numpy as np

from mrcnn_jax import postprocess
from mrcnn_jax.ops import boxes as box_ops


def _iou(a, b):
    return np.asarray(box_ops.pairwise_iou(a, b))


def _greedy_nms(boxes, scores, thr):
    order = np.argsort(-scores, kind="stable")
    keep = []
    for i in order:
        if not np.isfinite(scores[i]):
            continue
        if all(_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0] <= thr for j in keep):
            keep.append(i)
    return keep


def _random_boxes(rng, n, size):
    xy = rng.uniform(0, size * 0.8, size=(n, 2))
    wh = rng.uniform(4, size * 0.4, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_proposals_match_reference():
    rng = np.random.default_rng(0)
    counts = [40, 20, 10]
    anchors = _random_boxes(rng, sum(counts), 64)
    logits = rng.normal(size=sum(counts)).astype(np.float32)
    deltas = rng.normal(scale=0.2, size=(sum(counts), 4)).astype(np.float32)
    size = np.array([50, 60], np.int32)
    boxes, scores, valid = postprocess.proposals(
        logits, deltas, anchors, size, level_counts=counts, pre_nms_topk=15,
        post_nms_topk=25, nms_iou=0.5, min_size=1.0, box_weights=(1, 1, 1, 1),
    )
    # reference: per level top-k, decode, clip, drop small, NMS per level, best overall
    ref_boxes, ref_scores = [], []
    start = 0
    for c in counts:
        idx = start + np.argsort(-logits[start : start + c], kind="stable")[:15]
        b = np.asarray(box_ops.clip_boxes(box_ops.decode(deltas[idx], anchors[idx]), 50, 60))
        s = logits[idx].copy()
        s[~np.asarray(box_ops.valid_boxes(b, 1.0))] = -np.inf
        keep = _greedy_nms(b, s, 0.5)
        ref_boxes.append(b[keep])
        ref_scores.append(s[keep])
        start += c
    ref_boxes, ref_scores = np.concatenate(ref_boxes), np.concatenate(ref_scores)
    order = np.argsort(-ref_scores, kind="stable")[:25]
    n = len(order)
    v = np.asarray(valid)
    assert v[:n].all() and not v[n:].any()
    np.testing.assert_allclose(np.asarray(scores)[:n], ref_scores[order], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(boxes)[:n], ref_boxes[order], atol=1e-4)


def test_detections_match_reference():
    rng = np.random.default_rng(1)
    r, k, d = 30, 3, 12
    rois = _random_boxes(rng, r, 64)
    logits = rng.normal(scale=2.0, size=(r, k + 1)).astype(np.float32)
    deltas = rng.normal(scale=0.5, size=(r, k + 1, 4)).astype(np.float32)
    rois_valid = np.arange(r) < 25
    w = (10.0, 10.0, 5.0, 5.0)
    boxes, scores, classes, valid = postprocess.detections(
        logits, deltas, rois, rois_valid, np.array([64, 64]), score_threshold=0.2,
        nms_iou=0.5, max_detections=d, pre_nms_topk=1000, box_weights=w,
    )
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cand = []
    for c in range(1, k + 1):
        b = np.asarray(box_ops.clip_boxes(box_ops.decode(deltas[:, c], rois, w), 64, 64))
        s = np.where((probs[:, c] > 0.2) & rois_valid & np.asarray(box_ops.valid_boxes(b)),
                     probs[:, c], -np.inf)
        for i in _greedy_nms(b, s, 0.5):
            cand.append((s[i], c, b[i]))
    cand.sort(key=lambda t: -t[0])
    cand = cand[:d]
    v = np.asarray(valid)
    assert v.sum() == len(cand) and v[: len(cand)].all()
    np.testing.assert_allclose(np.asarray(scores)[: len(cand)], [c[0] for c in cand], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(classes)[: len(cand)], [c[1] for c in cand])
    np.testing.assert_allclose(np.asarray(boxes)[: len(cand)], [c[2] for c in cand], atol=1e-3)
    assert np.all(np.asarray(scores)[~v] == 0) and np.all(np.asarray(classes)[~v] == 0)


def test_proposals_only_from_the_anchors_of_the_image_padded_to_32():
    """On a 256 x 256 canvas, a 70 x 100 image's proposals are those of the same image padded to
    96 x 128 (detectron2 / torchvision): the anchors centred in the extra padding, whatever their
    scores (here the highest), do not compete. Without size_divisibility they take the top."""
    from mrcnn_jax.ops import anchors as anchor_ops

    rng = np.random.default_rng(5)
    strides, sizes = (8, 16, 32), (16, 32, 64)
    canvas, image, padded = (256, 256), np.array([70, 100], np.int32), (96, 128)
    anchors = anchor_ops.generate_anchors(canvas, strides, sizes)
    counts = anchor_ops.num_anchors_per_level(canvas, strides, 3)
    inside = np.asarray(anchor_ops.inside_padded_image(anchors, image, 32))
    logits = rng.normal(size=len(anchors)).astype(np.float32)
    logits[~inside] += 10.0  # the padding's anchors score highest
    deltas = rng.normal(scale=0.1, size=(len(anchors), 4)).astype(np.float32)
    kw = dict(pre_nms_topk=50, post_nms_topk=40, nms_iou=0.7, min_size=0.0,
              box_weights=(1, 1, 1, 1))
    boxes, scores, valid = postprocess.proposals(
        logits, deltas, anchors, image, level_counts=counts, size_divisibility=32, **kw
    )
    small = anchor_ops.generate_anchors(padded, strides, sizes)
    ref = postprocess.proposals(
        logits[inside], deltas[inside], small, image,
        level_counts=anchor_ops.num_anchors_per_level(padded, strides, 3), **kw,
    )
    for ours, theirs in zip((boxes, scores, valid), ref, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert np.asarray(valid).sum() == 40
    _, all_scores, _ = postprocess.proposals(
        logits, deltas, anchors, image, level_counts=counts, **kw
    )
    assert np.asarray(all_scores)[0] > 5.0  # the padding's anchors win without the mask
    # torchvision ranks by sigmoid: masked anchors must not come back as sigmoid(-inf) = 0
    _, sig_scores, sig_valid = postprocess.proposals(
        logits, deltas, anchors, image, level_counts=counts, size_divisibility=32,
        sigmoid_scores=True, **kw,
    )
    assert np.asarray(sig_valid).sum() == 40 and np.all(np.asarray(sig_scores)[:40] > 0)
