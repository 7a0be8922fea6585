"""In-graph training targets, per image and fixed shape: RPN anchor labels, RoI sampling, mask targets.

Every function here takes one image's padded ground truth and is `vmap`-ped by `losses.py`.
Ground truth that may become a positive is `gt_valid & ~gt_is_crowd`: crowd regions are dropped
from training as detectron2's dataset mapper does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.masks import mask_targets_from_crops
from mrcnn_jax.ops.matching import MatchLabel, match, match_boxes, sample_indices, subsample


@struct.dataclass
class RPNTargets:
    """labels: [A] int32 MatchLabel after sampling (IGNORE = not sampled); deltas: [A, 4]."""

    labels: jnp.ndarray
    deltas: jnp.ndarray


@struct.dataclass
class RoISamples:
    """A fixed-size set of sampled RoIs for one image (positives first).

    boxes: [K, 4] the RoIs; classes: [K] int32 target class (0 = background);
    deltas: [K, 4] regression targets (valid for positives); matched_gt: [K] int32;
    is_positive, valid: [K] bool (valid False pads when too few candidates exist).
    """

    boxes: jnp.ndarray
    classes: jnp.ndarray
    deltas: jnp.ndarray
    matched_gt: jnp.ndarray
    is_positive: jnp.ndarray
    valid: jnp.ndarray


def rpn_targets(
    key: jax.Array,
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_trainable: jnp.ndarray,
    *,
    fg_iou: float,
    bg_iou: float,
    batch_size_per_image: int,
    positive_fraction: float,
    box_weights,
    anchor_chunk: int = 0,
    gt_rows: jnp.ndarray | None = None,
    anchor_valid: jnp.ndarray | None = None,
) -> RPNTargets:
    """anchors: [A, 4]; gt_boxes: [M, 4]; gt_trainable: [M] bool -> sampled RPN targets.

    Matching 0.7 / 0.3 with low-quality matches (each gt's best anchors are positive), then 256
    anchors sampled at up to 50% positive (detectron2 RPN defaults). anchor_chunk > 0 matches the
    anchors that many at a time (`match_boxes`: same result, no [M, A] IoU matrix); gt_rows (an
    int32 scalar, `matching.leading_rows` of the batch's gt_trainable) matches against only the
    leading gt rows that hold a trainable gt (same result, less work). anchor_valid [A] bool
    (`ops.anchors.inside_padded_image`): the other anchors are IGNORE, never sampled and never a
    gt's best anchor.
    """
    matched, labels = match_boxes(
        gt_boxes, anchors, gt_trainable, fg_iou, bg_iou, allow_low_quality=True, chunk=anchor_chunk,
        rows=gt_rows, box_valid=anchor_valid,
    )
    pos, neg = subsample(key, labels, batch_size_per_image, positive_fraction)
    labels = jnp.where(pos, MatchLabel.POSITIVE, jnp.where(neg, MatchLabel.NEGATIVE, MatchLabel.IGNORE))
    deltas = box_ops.encode(gt_boxes[matched], anchors, box_weights)
    return RPNTargets(labels=labels.astype(jnp.int32), deltas=deltas)


def sample_rois(
    key: jax.Array,
    proposals: jnp.ndarray,
    proposals_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_classes: jnp.ndarray,
    gt_trainable: jnp.ndarray,
    *,
    fg_iou: float,
    batch_size_per_image: int,
    positive_fraction: float,
    box_weights,
) -> RoISamples:
    """Samples `batch_size_per_image` RoIs from proposals [P, 4] plus the gt boxes [M, 4].

    The gt boxes are appended to the proposals (detectron2 / torchvision) so early in training
    every gt has at least one positive. Candidates that are padding (invalid proposals, padded
    or crowd gt) are IGNORE and never sampled. IoU >= fg_iou is foreground, below it background.
    """
    candidates = jnp.concatenate([proposals, gt_boxes], axis=0)
    cand_valid = jnp.concatenate([proposals_valid, gt_trainable], axis=0)
    iou = box_ops.pairwise_iou(gt_boxes, candidates)
    matched, labels = match(iou, gt_trainable, fg_iou, fg_iou, allow_low_quality=False)
    labels = jnp.where(cand_valid, labels, MatchLabel.IGNORE)
    idx, is_pos, valid = sample_indices(key, labels, batch_size_per_image, positive_fraction)
    boxes = candidates[idx]
    matched = matched[idx]
    classes = jnp.where(is_pos & valid, gt_classes[matched], 0).astype(jnp.int32)
    deltas = box_ops.encode(gt_boxes[matched], boxes, box_weights)
    return RoISamples(
        boxes=boxes,
        classes=classes,
        deltas=deltas,
        matched_gt=matched,
        is_positive=is_pos & valid,
        valid=valid,
    )


def mask_targets(
    samples: RoISamples, gt_boxes: jnp.ndarray, gt_masks: jnp.ndarray, num_mask_rois: int, size: int
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Binary mask targets for the first `num_mask_rois` sampled RoIs (the positives come first).

    gt_masks: [M, S, S] the gt masks cropped to their gt boxes (input pipeline).
    Returns (rois [Km, 4], classes [Km], targets [Km, size, size] in {0, 1}, valid [Km]).
    As detectron2, the soft resampled mask is binarised at 0.5.
    """
    rois = samples.boxes[:num_mask_rois]
    matched = samples.matched_gt[:num_mask_rois]
    valid = samples.is_positive[:num_mask_rois]
    soft = mask_targets_from_crops(
        gt_masks.astype(jnp.float32), gt_boxes, rois, matched, output_size=size
    )
    targets = (soft >= 0.5).astype(jnp.float32)
    return rois, samples.classes[:num_mask_rois], targets, valid
