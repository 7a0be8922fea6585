"""IoU matching and balanced fixed-size sampling, per image, jittable (detectron2 semantics).

`match` is detectron2's `Matcher(thresholds=[bg, fg], labels=[0, -1, 1])`; `subsample` is its
`subsample_labels`. Both work on padded inputs: invalid ground truth is never matched and every
output has a static shape, so `jax.vmap` over images and `jax.jit` compile once.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops


class MatchLabel(enum.IntEnum):
    """Label of a prediction (anchor / proposal) after matching or sampling."""

    IGNORE = -1
    NEGATIVE = 0
    POSITIVE = 1


# Relative tolerance of "equals the gt's highest IoU" in the low-quality rule (~16 float32 ulps).
TIE_RTOL = 2.0**-20


def match(
    iou: jnp.ndarray,
    gt_valid: jnp.ndarray,
    fg_threshold: float,
    bg_threshold: float,
    allow_low_quality: bool,
    pred_valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """iou: [G, N] gt x prediction; gt_valid: [G] bool -> (matched_gt [N] int32, labels [N] int32).

    Per prediction, best = max IoU over the valid gt (first index on ties, as argmax):
      best <  bg_threshold                 -> NEGATIVE
      bg_threshold <= best < fg_threshold  -> IGNORE   (empty band when bg == fg, RoI heads at 0.5)
      best >= fg_threshold                 -> POSITIVE
    With no valid gt every prediction is NEGATIVE with matched_gt 0.

    allow_low_quality (Faster R-CNN sec. 3.1.2 (i), RPN): for each valid gt, every prediction whose
    IoU equals that gt's highest IoU (ties included, to a relative TIE_RTOL) becomes POSITIVE.
    Like detectron2 the matched_gt of such a prediction stays its argmax gt. Unlike detectron2 it
    needs that highest IoU to be > 0: a valid gt that overlaps no prediction at all (degenerate,
    or outside the anchors' reach) would otherwise turn every prediction with IoU 0 into a
    positive.

    pred_valid: [N] bool or None (all valid). An invalid prediction does not exist for the
    matcher: it is IGNORE (matched_gt 0) and never any gt's highest IoU (the RPN's anchors in the
    padding of a fixed-size canvas, which detectron2 / torchvision never generate).
    """
    num_gt, num_pred = iou.shape
    if num_gt == 0:  # static shape: nothing to match
        zeros = jnp.zeros((num_pred,), jnp.int32)
        labels = jnp.full((num_pred,), int(MatchLabel.NEGATIVE), jnp.int32)
        return zeros, _ignore_invalid(labels, pred_valid)
    masked = _masked(iou, gt_valid, pred_valid)
    highest = jnp.max(masked, axis=1) if allow_low_quality else None
    matched, labels = _match_masked(masked, gt_valid, highest, fg_threshold, bg_threshold)
    return _valid_only(matched, labels, pred_valid)


def _masked(iou: jnp.ndarray, gt_valid: jnp.ndarray, pred_valid=None) -> jnp.ndarray:
    # IoU is in [0, 1], so -1 keeps padded gt (and invalid predictions) out of every max / argmax.
    keep = gt_valid[:, None] if pred_valid is None else gt_valid[:, None] & pred_valid[None, :]
    return jnp.where(keep, iou.astype(jnp.float32), -1.0)


def _ignore_invalid(labels, pred_valid):
    if pred_valid is None:
        return labels
    return jnp.where(pred_valid, labels, int(MatchLabel.IGNORE)).astype(jnp.int32)


def _valid_only(matched, labels, pred_valid):
    if pred_valid is None:
        return matched, labels
    return jnp.where(pred_valid, matched, 0).astype(jnp.int32), _ignore_invalid(labels, pred_valid)


def _match_masked(masked, gt_valid, highest, fg_threshold, bg_threshold):
    """`match` on a masked [G, N] IoU matrix, given each gt's highest IoU over ALL predictions
    ([G]; None: no low-quality matches)."""
    matched = jnp.argmax(masked, axis=0).astype(jnp.int32)
    best = jnp.max(masked, axis=0)
    labels = jnp.where(
        best >= fg_threshold,
        int(MatchLabel.POSITIVE),
        jnp.where(best >= bg_threshold, int(MatchLabel.IGNORE), int(MatchLabel.NEGATIVE)),
    ).astype(jnp.int32)
    if highest is not None:  # [G]; -1 for padded gt
        # Ties within TIE_RTOL: the chunked matcher computes the IoU twice, in loops XLA fuses
        # differently, and the two can differ in the last bits (measured: one ulp).
        top = highest[:, None]
        is_best = (masked >= top - top * TIE_RTOL) & (top > 0.0)
        labels = jnp.where(jnp.any(is_best, axis=0), int(MatchLabel.POSITIVE), labels)
    any_gt = jnp.any(gt_valid)
    matched = jnp.where(any_gt, matched, 0)
    labels = jnp.where(any_gt, labels, int(MatchLabel.NEGATIVE))
    return matched, labels


# The gt row counts `match_boxes(..., rows=...)` compiles a matcher for: powers of two from this.
MIN_GT_ROWS = 8


def leading_rows(valid: jnp.ndarray) -> jnp.ndarray:
    """valid: [..., G] bool -> int32 scalar: how many leading gt rows hold every valid gt of all
    images (1 + the highest valid index; 0 when none is valid)."""
    index = jnp.arange(1, valid.shape[-1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(valid, index, 0), initial=0)


def row_buckets(num_gt: int) -> tuple[int, ...]:
    """The gt row counts a matcher is compiled for: 8, 16, ... below num_gt, then num_gt."""
    sizes, k = [], MIN_GT_ROWS
    while k < num_gt:
        sizes.append(k)
        k *= 2
    return (*sizes, num_gt)


def match_boxes(
    gt_boxes: jnp.ndarray,
    boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    fg_threshold: float,
    bg_threshold: float,
    allow_low_quality: bool,
    chunk: int = 0,
    rows: jnp.ndarray | None = None,
    box_valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`match(pairwise_iou(gt_boxes, boxes), ..., pred_valid=box_valid)` for gt_boxes [G, 4] and
    boxes [N, 4] (box_valid [N] bool or None: all valid), without
    the [G, N] matrix when chunk > 0: the boxes are taken `chunk` at a time, once for each gt's
    highest IoU (the low-quality rule needs it over all of them) and once to match, so memory is
    [G, chunk] and the IoU is computed twice. For the RPN (N ~ 250k anchors at 800 x 1216, G =
    max_instances) the full matrix and its masks are ~0.2 GB per image of the training step's
    temporaries. Same results as the full matrix (tests/ops/test_matching.py).

    rows: an int32 scalar such that every gt from row `rows` on is invalid (`leading_rows`; under
    `jax.vmap` pass it unbatched, computed over the whole batch). The matching then runs on the
    first k rows only, k the smallest of `row_buckets(G)` >= rows, picked by `lax.switch` among
    matchers compiled for each: padded rows never match, so the results are the same, and the
    work scales with the images' gt rather than with max_instances (G = 100 on COCO, ~7 gt per
    image: the R50-FPN step's matcher 222 -> 33 ms at 8 gt, docs/performance.md, change 14)."""
    num_gt, num = gt_boxes.shape[0], boxes.shape[0]
    if rows is not None and num_gt > MIN_GT_ROWS:
        sizes = row_buckets(num_gt)
        branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), rows.astype(jnp.int32))
        run = lambda k: lambda: match_boxes(
            gt_boxes[:k],
            boxes,
            gt_valid[:k],
            fg_threshold,
            bg_threshold,
            allow_low_quality,
            chunk,
            box_valid=box_valid,
        )
        return jax.lax.switch(branch, [run(k) for k in sizes])  # switch clamps the index
    if chunk <= 0 or chunk >= num or num_gt == 0:
        iou = box_ops.pairwise_iou(gt_boxes, boxes)
        return match(iou, gt_valid, fg_threshold, bg_threshold, allow_low_quality, box_valid)
    blocks = -(-num // chunk)
    # Padding boxes are all-zero (IoU 0 with everything): they never raise a gt's highest IoU
    # above 0 and their own matches are cut off below.
    pad = blocks * chunk - num
    padded = jnp.pad(boxes, ((0, pad), (0, 0))).reshape(blocks, chunk, 4)
    valid = jnp.ones((num,), bool) if box_valid is None else box_valid
    valid = jnp.pad(valid, (0, pad)).reshape(blocks, chunk)
    block_masked = lambda b, v: _masked(box_ops.pairwise_iou(gt_boxes, b), gt_valid, v)
    highest = None
    if allow_low_quality:
        highest = jnp.max(
            jax.lax.map(lambda bv: jnp.max(block_masked(*bv), axis=1), (padded, valid)), axis=0
        )
    matched, labels = jax.lax.map(
        lambda bv: _match_masked(block_masked(*bv), gt_valid, highest, fg_threshold, bg_threshold),
        (padded, valid),
    )
    matched, labels = matched.reshape(-1)[:num], labels.reshape(-1)[:num]
    return _valid_only(matched, labels, box_valid)


def _first_k(priority: jnp.ndarray, eligible: jnp.ndarray, k: int, limit: jnp.ndarray):
    """Indices [k] of the `k` eligible entries with the highest priority; entry j is real when
    j < min(#eligible, limit). Uniform priorities make this a uniform random subset."""
    k = min(k, priority.shape[0])
    _, idx = jax.lax.top_k(jnp.where(eligible, priority, -1.0), k)
    count = jnp.minimum(jnp.sum(eligible), limit)
    return idx.astype(jnp.int32), jnp.arange(k) < count, count


def sample_indices(
    key: jax.Array, labels: jnp.ndarray, num_samples: int, positive_fraction: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """labels: [N] MatchLabel -> (indices [K], is_positive [K], valid [K]), K = num_samples.

    detectron2 `subsample_labels`: num_pos = min(#POSITIVE, int(K * positive_fraction)),
    num_neg = min(#NEGATIVE, K - num_pos), each drawn uniformly without replacement; IGNORE is
    never drawn. Output: the num_pos positives, then the num_neg negatives, then padding
    (index 0, valid False; index 0 is safe to gather with).

        u ~ U[0, 1)^N, P = int(K * positive_fraction)
        pos = top_k(where(POSITIVE, u, -1), P); neg = top_k(where(NEGATIVE, u, -1), K)
        out[j] = pos[j] if j < num_pos else neg[j - num_pos] if j - num_pos < num_neg else pad
    """
    max_pos = int(num_samples * positive_fraction)
    priority = jax.random.uniform(key, labels.shape)
    pos_idx, _, num_pos = _first_k(
        priority, labels == int(MatchLabel.POSITIVE), max(max_pos, 1), jnp.int32(max_pos)
    )
    neg_idx, _, num_neg = _first_k(
        priority, labels == int(MatchLabel.NEGATIVE), num_samples, num_samples - num_pos
    )
    j = jnp.arange(num_samples)
    take_pos = j < num_pos
    valid = j < num_pos + num_neg
    from_pos = pos_idx[jnp.clip(j, 0, pos_idx.shape[0] - 1)]
    from_neg = neg_idx[jnp.clip(j - num_pos, 0, neg_idx.shape[0] - 1)]
    indices = jnp.where(take_pos, from_pos, jnp.where(valid, from_neg, 0))
    return indices.astype(jnp.int32), take_pos & valid, valid


def subsample(
    key: jax.Array, labels: jnp.ndarray, num_samples: int, positive_fraction: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """labels: [N] MatchLabel -> (pos_selected [N] bool, neg_selected [N] bool).

    The same draw as `sample_indices` (same key -> same selection), scattered back to a mask.
    """
    indices, is_pos, valid = sample_indices(key, labels, num_samples, positive_fraction)
    n = labels.shape[0]
    # Padding rows scatter to index n, which mode="drop" discards (index 0 may be a real sample).
    pos_at = jnp.where(is_pos, indices, n)
    neg_at = jnp.where(valid & ~is_pos, indices, n)
    empty = jnp.zeros((n,), bool)
    return empty.at[pos_at].set(True, mode="drop"), empty.at[neg_at].set(True, mode="drop")
