"""In-graph targets: RPN labels, RoI sampling and mask targets against their definitions."""

import jax
import numpy as np

from configs import tiny
from mrcnn_jax import inference, targets
from mrcnn_jax.data.synthetic import make_batch
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.masks import crop_and_resize
from mrcnn_jax.ops.matching import MatchLabel

CFG = tiny.get_config()
RPN, ROI = CFG.model.rpn, CFG.model.roi


def _gt(seed=0):
    b = make_batch(CFG, 1, seed=seed, max_shapes=3)
    return {k: v[0] for k, v in b.items()}


def test_rpn_targets_sample_and_encode():
    anchors, _ = inference.anchors_for(CFG.model, CFG.data.image_size)
    gt = _gt()
    t = targets.rpn_targets(
        jax.random.key(0), anchors, gt["gt_boxes"], gt["gt_valid"],
        fg_iou=RPN.fg_iou, bg_iou=RPN.bg_iou, batch_size_per_image=RPN.batch_size_per_image,
        positive_fraction=RPN.positive_fraction, box_weights=RPN.box_weights,
    )
    labels = np.asarray(t.labels)
    pos = labels == MatchLabel.POSITIVE
    assert (labels != MatchLabel.IGNORE).sum() == RPN.batch_size_per_image
    assert 0 < pos.sum() <= RPN.batch_size_per_image * RPN.positive_fraction
    # every positive's deltas decode to the gt box it overlaps most
    decoded = np.asarray(box_ops.decode(t.deltas, anchors, RPN.box_weights))[pos]
    iou = np.asarray(box_ops.pairwise_iou(decoded, gt["gt_boxes"][gt["gt_valid"]]))
    np.testing.assert_allclose(iou.max(axis=1), 1.0, atol=1e-4)


def test_sample_rois_never_uses_crowd_or_padding():
    gt = _gt(seed=1)
    n = int(gt["gt_valid"].sum())
    crowd = np.zeros_like(gt["gt_valid"])
    crowd[0] = True  # the first instance becomes a crowd region
    trainable = gt["gt_valid"] & ~crowd
    proposals = np.concatenate([gt["gt_boxes"][:n] + 1.0, np.zeros((20, 4), np.float32)])
    valid = np.arange(len(proposals)) < n
    s = targets.sample_rois(
        jax.random.key(0), proposals, valid, gt["gt_boxes"], gt["gt_classes"], trainable,
        fg_iou=ROI.fg_iou, batch_size_per_image=ROI.batch_size_per_image,
        positive_fraction=ROI.positive_fraction, box_weights=ROI.box_weights,
    )
    pos = np.asarray(s.is_positive)
    matched = np.asarray(s.matched_gt)
    assert pos.any() and not np.isin(matched[pos], [0]).any()  # gt 0 is crowd
    assert np.all(matched[pos] < n)
    np.testing.assert_array_equal(np.asarray(s.classes)[pos], gt["gt_classes"][matched[pos]])
    assert np.all(np.asarray(s.classes)[~pos] == 0)
    # positives come first, padding last; only valid candidates were sampled
    v = np.asarray(s.valid)
    k = v.sum()
    assert v[:k].all() and not v[k:].any() and pos[: pos.sum()].all()
    sampled = np.asarray(s.boxes)[v]
    assert np.all(box_ops.area(sampled) > 0)
    dec = np.asarray(box_ops.decode(s.deltas, s.boxes, ROI.box_weights))[pos]
    np.testing.assert_allclose(dec, gt["gt_boxes"][matched[pos]], atol=1e-3)


def test_mask_targets_at_gt_box_reproduce_the_gt_crop():
    gt = _gt(seed=2)
    n = int(gt["gt_valid"].sum())
    s = targets.sample_rois(
        jax.random.key(0), gt["gt_boxes"][:n], np.ones(n, bool), gt["gt_boxes"],
        gt["gt_classes"], gt["gt_valid"], fg_iou=0.5, batch_size_per_image=8,
        positive_fraction=1.0, box_weights=ROI.box_weights,
    )
    rois, classes, tmask, valid = targets.mask_targets(s, gt["gt_boxes"], gt["gt_masks"], 8, 28)
    rois, tmask, valid = np.asarray(rois), np.asarray(tmask), np.asarray(valid)
    matched = np.asarray(s.matched_gt)
    for i in np.flatnonzero(valid):
        g = matched[i]
        if not np.allclose(rois[i], gt["gt_boxes"][g]):
            continue
        s_ = gt["gt_masks"].shape[-1]
        ref = np.asarray(crop_and_resize(
            gt["gt_masks"][g].astype(np.float32), np.array([[0, 0, s_, s_]], np.float32), 28
        ))[0] >= 0.5
        assert (ref == (tmask[i] > 0.5)).mean() > 0.97


def test_rpn_targets_never_sample_anchors_in_the_padding():
    """An image in the top-left corner of the canvas: with anchor_valid, every sampled anchor
    (positive or negative) is an anchor of the image padded to 32, and the labels of those
    anchors are the ones the matcher gives on the padded image's anchors alone."""
    from mrcnn_jax.ops import anchors as anchor_ops
    from mrcnn_jax.ops.matching import match_boxes

    anchors, _ = inference.anchors_for(CFG.model, CFG.data.image_size)
    gt = _gt(seed=2)
    image = np.array([20, 28], np.int32)  # padded to 32 x 32 of the 64 x 64 canvas
    boxes = (gt["gt_boxes"] * 0.3).astype(np.float32)
    inside = np.asarray(anchor_ops.inside_padded_image(anchors, image, 32))
    assert 0 < inside.sum() < len(anchors) // 2
    kw = dict(
        fg_iou=RPN.fg_iou, bg_iou=RPN.bg_iou, batch_size_per_image=RPN.batch_size_per_image,
        positive_fraction=RPN.positive_fraction, box_weights=RPN.box_weights,
    )
    t = targets.rpn_targets(
        jax.random.key(0), anchors, boxes, gt["gt_valid"], anchor_valid=inside, **kw
    )
    labels = np.asarray(t.labels)
    assert (labels[~inside] == MatchLabel.IGNORE).all()
    assert (labels[inside] == MatchLabel.POSITIVE).any()
    assert (labels != MatchLabel.IGNORE).sum() == RPN.batch_size_per_image
    _, alone = match_boxes(boxes, anchors[inside], gt["gt_valid"], RPN.fg_iou, RPN.bg_iou, True)
    sampled = labels[inside] != MatchLabel.IGNORE
    np.testing.assert_array_equal(labels[inside][sampled], np.asarray(alone)[sampled])
    free = targets.rpn_targets(jax.random.key(0), anchors, boxes, gt["gt_valid"], **kw)
    assert (np.asarray(free.labels)[~inside] == MatchLabel.NEGATIVE).any()  # the old behaviour
