"""Proposals from the RPN and final detections from the box head: per image, fixed shape."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.anchors import image_anchors, inside_padded_image
from mrcnn_jax.ops.nms import batched_nms

NEG_INF = -jnp.inf


def proposals(
    logits: jnp.ndarray,
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    image_size: jnp.ndarray,
    *,
    level_counts: Sequence[int],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_iou: float,
    min_size: float,
    box_weights,
    sigmoid_scores: bool = False,
    size_divisibility: int = 0,
    anchor_grid: str = "detectron2",
    strides: Sequence[int] = (),
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """RPN outputs for one image -> (boxes [P, 4], scores [P], valid [P]), P = post_nms_topk.

    logits: [A]; deltas: [A, 4]; anchors: [A, 4]; image_size: [2] (h, w) of the unpadded image.
    As detectron2's `find_top_rpn_proposals`: the top `pre_nms_topk` anchors of each level by
    objectness, decoded and clipped to the image, tiny boxes dropped, NMS per level (levels do not
    suppress each other), then the best `post_nms_topk` over all levels. `level_counts` are the
    static anchor counts per level, in anchor order. `sigmoid_scores`: NMS and the final ranking
    use sigmoid(logit), as torchvision's `filter_proposals` (the top-k per level is on the logits in
    both); float32 sigmoid saturates at 1.0 for logits above ~17, so ties are broken differently.
    size_divisibility > 0: only the anchors of the image padded to a multiple of it compete
    (`ops.anchors.inside_padded_image`), as in detectron2 / torchvision, whose batches are padded
    that far and no further. anchor_grid / strides (the levels' strides): `image_anchors`.
    """
    inside = inside_padded_image(anchors, image_size, size_divisibility)
    anchors = image_anchors(
        anchors, image_size, level_counts=level_counts, strides=strides,
        size_divisibility=size_divisibility, grid=anchor_grid,
    )
    logits = jnp.where(inside, logits, NEG_INF)
    boxes, scores, levels = [], [], []
    start = 0
    for level, count in enumerate(level_counts):
        k = min(pre_nms_topk, count)
        lvl_scores, idx = jax.lax.top_k(logits[start : start + count], k)
        idx = idx + start
        boxes.append(box_ops.decode(deltas[idx], anchors[idx], box_weights))
        scores.append(lvl_scores)
        levels.append(jnp.full((k,), level, jnp.int32))
        start += count
    boxes = box_ops.clip_boxes(jnp.concatenate(boxes), image_size[0], image_size[1])
    scores = jnp.concatenate(scores).astype(jnp.float32)
    finite = jnp.isfinite(scores)  # before the sigmoid, which maps a masked -inf to 0
    if sigmoid_scores:
        scores = jax.nn.sigmoid(scores)
    levels = jnp.concatenate(levels)
    keep = box_ops.valid_boxes(boxes, min_size) & finite
    scores = jnp.where(keep, scores, NEG_INF)
    idx, valid = batched_nms(boxes, scores, levels, nms_iou, post_nms_topk)
    return boxes[idx], jnp.where(valid, scores[idx], NEG_INF), valid


def detections(
    class_logits: jnp.ndarray,
    class_deltas: jnp.ndarray,
    rois: jnp.ndarray,
    rois_valid: jnp.ndarray,
    image_size: jnp.ndarray,
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    pre_nms_topk: int,
    box_weights,
    min_size: float = 0.0,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Box-head outputs for one image -> (boxes [D, 4], scores [D], classes [D], valid [D]).

    class_logits: [R, K+1]; class_deltas: [R, K+1, 4]; rois: [R, 4]. As detectron2's
    `fast_rcnn_inference_single_image`: softmax scores, a class-specific box per (RoI, class),
    clipped, scores above `score_threshold`, boxes with both sides > `min_size` (torchvision:
    1e-2), per-class NMS, the best `max_detections`. To keep
    NMS at a fixed, bounded size the `pre_nms_topk` best (RoI, class) pairs enter NMS; with the
    0.05 threshold that cap is rarely reached.
    """
    num_rois, num_cls1 = class_logits.shape
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]
    boxes = box_ops.decode(
        class_deltas[:, 1:].astype(jnp.float32), rois[:, None, :], box_weights
    )
    boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
    ok = (probs > score_threshold) & rois_valid[:, None] & box_ops.valid_boxes(boxes, min_size)
    scores = jnp.where(ok, probs, NEG_INF).reshape(-1)
    boxes = boxes.reshape(-1, 4)
    classes = jnp.tile(jnp.arange(1, num_cls1, dtype=jnp.int32), num_rois)
    k = min(pre_nms_topk, scores.shape[0])
    top_scores, top = jax.lax.top_k(scores, k)
    idx, valid = batched_nms(boxes[top], top_scores, classes[top], nms_iou, max_detections)
    idx = top[idx]
    return (
        jnp.where(valid[:, None], boxes[idx], 0.0),
        jnp.where(valid, scores[idx], 0.0),
        jnp.where(valid, classes[idx], 0),
        valid,
    )
