"""Mask R-CNN training losses as one pure function of (params, model state, batch, keys).

`make_loss_fn(model, model_cfg, image_size, axis_name=None)` returns

    loss_fn(params, model_state, batch, example_keys) -> (total, (metrics, new_model_state))

with the targets computed in the graph (fixed shapes, one compile). The normalisers follow
detectron2: RPN losses / `rpn.batch_size_per_image` sampled anchors (256) and box losses / the
sampled RoIs, per image (the
same count for every image of a full batch), averaged over the batch; the mask loss is one mean
over the positive RoIs of the whole batch and their 28 x 28 pixels, as torchvision's
`maskrcnn_loss` and detectron2's `mask_rcnn_loss` take it, so an image with one positive RoI
weighs as one RoI, not as much as an image with 128. A batch split over devices gives the values
of one device with the whole batch: under `jit` over a mesh the loss sees the global batch; under
`pmap` pass `axis_name`, over which the mask loss's RoI count is summed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from mrcnn_jax import targets as tgt
from mrcnn_jax.inference import (
    anchors_for,
    batch_proposals,
    mask_head_on_valid,
    padded_sizes,
    pool_many,
)
from mrcnn_jax.mask_rcnn import MaskRCNN
from mrcnn_jax.ops.anchors import image_anchors, inside_padded_image
from mrcnn_jax.ops.matching import MatchLabel, leading_rows


def smooth_l1(x: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Elementwise smooth-L1 (Huber / beta); beta = 0 is plain L1, detectron2's default."""
    ax = jnp.abs(x)
    if beta < 1e-5:
        return ax
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def rpn_losses(logits, deltas, targets: tgt.RPNTargets, *, batch_size_per_image, beta):
    """One image: logits [A], deltas [A, 4] -> (objectness BCE, box loss), each divided by
    batch_size_per_image (the anchors sampled per image, 256 in detectron2)."""
    sampled = targets.labels != MatchLabel.IGNORE
    pos = targets.labels == MatchLabel.POSITIVE
    bce = optax.sigmoid_binary_cross_entropy(logits, pos.astype(logits.dtype))
    cls = jnp.sum(jnp.where(sampled, bce, 0.0)) / batch_size_per_image
    box = jnp.sum(jnp.where(pos[:, None], smooth_l1(deltas - targets.deltas, beta), 0.0))
    return cls, box / batch_size_per_image


def box_losses(class_logits, class_deltas, samples: tgt.RoISamples, *, beta):
    """One image: logits [K, C+1], deltas [K, C+1, 4] -> (CE, class-specific box loss).

    Both are normalised by the number of sampled RoIs, as detectron2's FastRCNNOutputs.
    """
    n = jnp.maximum(jnp.sum(samples.valid), 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, samples.classes)
    cls = jnp.sum(jnp.where(samples.valid, ce, 0.0)) / n
    chosen = jnp.take_along_axis(class_deltas, samples.classes[:, None, None], axis=1)[:, 0]
    reg = smooth_l1(chosen - samples.deltas, beta)
    box = jnp.sum(jnp.where(samples.is_positive[:, None], reg, 0.0)) / n
    return cls, box


def mask_loss(class_logits, mask_targets, valid):
    """One image: the gt class's mask logits [Km, S, S] (`MaskRCNN.mask_logits` with the classes)
    -> (sum over the valid RoIs of their mean pixel BCE, number of valid RoIs); `batch_mean` of
    these over the batch is the loss."""
    bce = optax.sigmoid_binary_cross_entropy(class_logits, mask_targets)
    per_roi = jnp.mean(bce, axis=(1, 2))
    return jnp.sum(jnp.where(valid, per_roi, 0.0)), jnp.sum(valid)


def batch_mean(total, count, axis_name: str | None = None):
    """sum(total) / sum(count) over the batch (0 when count is 0). Under `pmap` (axis_name) each
    device holds a shard: the count is summed over the devices and the device's share scaled by
    their number, so that the mean over devices that the train step takes of the loss and of the
    gradients is the whole batch's."""
    total, count = jnp.sum(total), jnp.sum(count)
    if axis_name is None:
        return total / jnp.maximum(count, 1)
    devices = jax.lax.psum(1, axis_name)
    return total * devices / jnp.maximum(jax.lax.psum(count, axis_name), 1)


LOSS_TERMS = ("rpn_cls", "rpn_box", "cls", "box", "mask")  # config.model.loss_weights


def weighted(losses: dict, model_cfg) -> dict:
    """{"loss_T": value} -> each times `model_cfg.loss_weights.T` (1 where the config has none:
    a config.json from before the key)."""
    weights = model_cfg.get("loss_weights") or {}
    return {k: v * weights.get(k[len("loss_"):], 1.0) for k, v in losses.items()}


def _per_image_targets(model_cfg, anchors, level_counts, batch, keys, proposals_and_valid):
    """RPN targets and sampled RoIs for every image of the batch (vmapped, fixed shape)."""
    rpn, roi = model_cfg.rpn, model_cfg.roi
    gt_trainable = batch["gt_valid"] & ~batch["gt_is_crowd"]
    rpn_fn = functools.partial(
        tgt.rpn_targets,
        fg_iou=rpn.fg_iou,
        bg_iou=rpn.bg_iou,
        batch_size_per_image=rpn.batch_size_per_image,
        positive_fraction=rpn.positive_fraction,
        box_weights=tuple(rpn.box_weights),
        anchor_chunk=rpn.match_anchor_chunk,
    )
    roi_fn = functools.partial(
        tgt.sample_rois,
        fg_iou=roi.fg_iou,
        batch_size_per_image=roi.batch_size_per_image,
        positive_fraction=roi.positive_fraction,
        box_weights=tuple(roi.box_weights),
    )
    # The number of leading gt rows holding a trainable gt, over the whole batch: unbatched, so
    # that the matcher's `lax.switch` on it stays a switch under vmap.
    gt_rows = leading_rows(gt_trainable)

    def rpn_one(key, gt, trainable, image_size):
        inside = inside_padded_image(anchors, image_size, rpn.size_divisibility)
        mine = image_anchors(
            anchors, image_size, level_counts=level_counts, strides=tuple(model_cfg.anchor_strides),
            size_divisibility=rpn.size_divisibility, grid=model_cfg.anchor_grid,
        )
        return rpn_fn(key, mine, gt, trainable, gt_rows=gt_rows, anchor_valid=inside)

    rpn_t = jax.vmap(rpn_one)(keys[:, 0], batch["gt_boxes"], gt_trainable, batch["image_sizes"])
    props, props_valid = proposals_and_valid
    samples = jax.vmap(roi_fn)(
        keys[:, 1], props, props_valid, batch["gt_boxes"], batch["gt_classes"], gt_trainable
    )
    return rpn_t, samples


def make_loss_fn(
    model: MaskRCNN,
    model_cfg: ml_collections.ConfigDict,
    image_size,
    axis_name: str | None = None,
):
    """Binds the model and hyper-parameters; see the module docstring for the contract.

    axis_name: the device axis when the loss runs per device under `pmap` (`train.PMAP_AXIS`);
    None on one device or under `jit` over a mesh.
    """
    anchors_np, level_counts = anchors_for(model_cfg, image_size)
    rpn, roi = model_cfg.rpn, model_cfg.roi
    most_positives = int(roi.batch_size_per_image * roi.positive_fraction)
    if roi.max_mask_rois < most_positives:
        logging.warning(
            "config.model.roi.max_mask_rois=%d < %d positives an image can sample"
            " (roi.batch_size_per_image x roi.positive_fraction): positives past the first %d of"
            " an image get no mask loss (detectron2 / torchvision train the mask on all of them)",
            roi.max_mask_rois, most_positives, roi.max_mask_rois,
        )

    def loss_fn(params, model_state, batch, example_keys):
        variables = {"params": params, **model_state}
        padded = padded_sizes(model_cfg, batch["image_sizes"])
        feats, new_state = model.apply(
            variables,
            batch["images"],
            train=True,
            padded_size=padded,
            method=MaskRCNN.features,
            mutable=list(model_state.keys()),
        )
        logits, deltas = model.apply(variables, feats, padded, method=MaskRCNN.rpn)
        # The barrier keeps XLA from constant-folding work on the (large) anchor literal.
        anchors = jax.lax.optimization_barrier(jnp.asarray(anchors_np))
        props, _, props_valid = batch_proposals(
            model_cfg, logits, deltas, anchors, batch["image_sizes"], level_counts, train=True
        )
        keys = jax.vmap(lambda k: jax.random.split(k, 2))(example_keys)
        rpn_t, samples = _per_image_targets(
            model_cfg, anchors, level_counts, batch, keys, (props, props_valid)
        )

        rpn_fn = functools.partial(
            rpn_losses, batch_size_per_image=rpn.batch_size_per_image, beta=rpn.smooth_l1_beta
        )
        rpn_cls, rpn_box = jax.vmap(rpn_fn)(
            logits.astype(jnp.float32), deltas.astype(jnp.float32), rpn_t
        )

        mask_fn = functools.partial(
            tgt.mask_targets, num_mask_rois=roi.max_mask_rois, size=roi.mask_size
        )
        m_rois, m_classes, m_targets, m_valid = jax.vmap(mask_fn)(
            samples, batch["gt_boxes"], batch["gt_masks"]
        )
        # Both heads' RoIAlign in one pass: one gradient accumulator for the feature table.
        pooled, m_pooled = pool_many(
            feats, [samples.boxes, m_rois], [roi.box_pool_size, roi.mask_pool_size], roi, padded
        )
        b, k = samples.boxes.shape[:2]
        cls_logits, cls_deltas = model.apply(
            variables, pooled.reshape(b * k, *pooled.shape[2:]), method=MaskRCNN.box_predictions
        )
        box_cls, box_reg = jax.vmap(functools.partial(box_losses, beta=roi.smooth_l1_beta))(
            cls_logits.reshape(b, k, -1).astype(jnp.float32),
            cls_deltas.reshape(b, k, *cls_deltas.shape[1:]).astype(jnp.float32),
            samples,
        )

        head = functools.partial(model.apply, variables, method=MaskRCNN.mask_logits)
        m_logits = mask_head_on_valid(
            head,
            m_pooled,
            m_valid,
            roi.mask_head_chunk,
            classes=m_classes,
            remat=roi.mask_head_remat,
        ).astype(jnp.float32)
        mask_sums, mask_counts = jax.vmap(mask_loss)(m_logits, m_targets, m_valid)

        losses = weighted({
            "loss_rpn_cls": jnp.mean(rpn_cls) * rpn.loss_weight,
            "loss_rpn_box": jnp.mean(rpn_box) * rpn.loss_weight,
            "loss_cls": jnp.mean(box_cls),
            "loss_box": jnp.mean(box_reg),
            "loss_mask": batch_mean(mask_sums, mask_counts, axis_name),
        }, model_cfg)
        total = sum(losses.values())
        metrics = {
            **losses,
            "loss": total,
            "num_pos_anchors": jnp.mean(jnp.sum(rpn_t.labels == MatchLabel.POSITIVE, axis=1)),
            "num_fg_rois": jnp.mean(jnp.sum(samples.is_positive, axis=1)),
        }
        return total, (metrics, new_state)

    loss_fn.axis_name = axis_name  # checked by train.compile_train_step against the placement
    return loss_fn
