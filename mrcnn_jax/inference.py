"""Graph pieces shared by training and inference, and the jittable batched predict function.

    images -> features -> RPN -> proposals (per image, fixed P) -> RoIAlign 7x7 -> box head
           -> detections (fixed D, padded) -> RoIAlign 14x14 on the detections -> mask probabilities
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax import postprocess
from mrcnn_jax.mask_rcnn import POOL_LEVELS, MaskRCNN
from mrcnn_jax.ops.anchors import generate_anchors, num_anchors_per_level
from mrcnn_jax.ops.roi_align import multilevel_roi_align
from mrcnn_jax.structures import Detections


def anchors_for(model_cfg: ml_collections.ConfigDict, image_size) -> tuple[np.ndarray, list[int]]:
    """The padded image's anchors [A, 4] (numpy) and the static anchor count of each level."""
    anchors = generate_anchors(
        tuple(image_size),
        strides=tuple(model_cfg.anchor_strides),
        sizes=tuple(model_cfg.anchor_sizes),
        aspect_ratios=tuple(model_cfg.anchor_ratios),
        round_base=model_cfg.anchor_round,
    )
    counts = num_anchors_per_level(
        tuple(image_size), tuple(model_cfg.anchor_strides), len(model_cfg.anchor_ratios)
    )
    return anchors, list(counts)


# config.model.roi.level_mapper -> (eps, eps inside the log2) of `assign_levels`: detectron2's
# `assign_boxes_to_levels` and torchvision's `LevelMapper`.
LEVEL_MAPPERS = {"detectron2": (1e-8, True), "torchvision": (1e-6, False)}


def pool(feats: dict, rois: jnp.ndarray, output_size: int, roi_cfg) -> jnp.ndarray:
    """Multi-level RoIAlign for a batch: rois [B, R, 4] -> [B, R, out, out, C]."""
    levels = [feats[k] for k in POOL_LEVELS]
    if roi_cfg.level_mapper not in LEVEL_MAPPERS:
        raise ValueError(
            f"config.model.roi.level_mapper must be one of {sorted(LEVEL_MAPPERS)}, "
            f"got {roi_cfg.level_mapper!r}"
        )
    eps, eps_inside_log = LEVEL_MAPPERS[roi_cfg.level_mapper]
    fn = functools.partial(
        multilevel_roi_align,
        output_size=output_size,
        sampling_ratio=roi_cfg.sampling_ratio,
        aligned=roi_cfg.aligned,
        min_level=2,
        canonical_size=roi_cfg.canonical_size,
        canonical_level=roi_cfg.canonical_level,
        eps=eps,
        eps_inside_log=eps_inside_log,
    )
    return jax.vmap(lambda f, r: fn(f, r))(levels, rois)


def batch_proposals(model_cfg, logits, deltas, anchors, image_sizes, level_counts, train: bool):
    """Per-image proposals for the batch: ([B, P, 4], [B, P], [B, P]); no gradient flows back."""
    rpn = model_cfg.rpn
    fn = functools.partial(
        postprocess.proposals,
        level_counts=level_counts,
        pre_nms_topk=rpn.pre_nms_topk_train if train else rpn.pre_nms_topk_test,
        post_nms_topk=rpn.post_nms_topk_train if train else rpn.post_nms_topk_test,
        nms_iou=rpn.nms_iou,
        min_size=rpn.min_size,
        box_weights=tuple(rpn.box_weights),
        sigmoid_scores=rpn.sigmoid_scores,
    )
    logits, deltas = jax.lax.stop_gradient((logits, deltas))
    return jax.vmap(fn, in_axes=(0, 0, None, 0))(
        logits.astype(jnp.float32), deltas.astype(jnp.float32), anchors, image_sizes
    )


def predict(
    variables: dict,
    images: jnp.ndarray,
    image_sizes: jnp.ndarray,
    anchors: jnp.ndarray,
    *,
    model: MaskRCNN,
    model_cfg: ml_collections.ConfigDict,
    level_counts: list[int],
) -> Detections:
    """images [B, H, W, 3], image_sizes [B, 2] -> padded `Detections` with mask probabilities."""
    roi, test = model_cfg.roi, model_cfg.test
    feats = model.apply(variables, images, train=False, method=MaskRCNN.features)
    logits, deltas = model.apply(variables, feats, method=MaskRCNN.rpn)
    props, _, props_valid = batch_proposals(
        model_cfg, logits, deltas, anchors, image_sizes, level_counts, train=False
    )
    pooled = pool(feats, props, roi.box_pool_size, roi)
    b, r = props.shape[:2]
    cls_logits, cls_deltas = model.apply(
        variables, pooled.reshape(b * r, *pooled.shape[2:]), method=MaskRCNN.box_predictions
    )
    det_fn = functools.partial(
        postprocess.detections,
        score_threshold=test.score_threshold,
        nms_iou=test.nms_iou,
        max_detections=test.detections_per_image,
        pre_nms_topk=test.pre_nms_topk,
        box_weights=tuple(roi.box_weights),
        min_size=test.min_size,
    )
    boxes, scores, classes, valid = jax.vmap(det_fn)(
        cls_logits.reshape(b, r, -1),
        cls_deltas.reshape(b, r, *cls_deltas.shape[1:]),
        props,
        props_valid,
        image_sizes,
    )
    mask_in = pool(feats, boxes, roi.mask_pool_size, roi)
    d = boxes.shape[1]
    mask_logits = model.apply(
        variables, mask_in.reshape(b * d, *mask_in.shape[2:]), method=MaskRCNN.mask_logits
    )
    mask_logits = mask_logits.reshape(b, d, *mask_logits.shape[1:])
    # The mask of each detection is read from its predicted class's channel.
    chosen = jnp.take_along_axis(mask_logits, classes[:, :, None, None, None], axis=-1)[..., 0]
    masks = jax.nn.sigmoid(chosen.astype(jnp.float32))
    return Detections(boxes=boxes, scores=scores, classes=classes, valid=valid, masks=masks)


def make_predict_fn(model: MaskRCNN, model_cfg: ml_collections.ConfigDict, image_size):
    """A jitted `predict_fn(variables, images, image_sizes) -> Detections` for one padded size.

    The anchors are passed to the compiled function as an argument rather than closed over, so
    XLA does not constant-fold work on a large literal at compile time.
    """
    anchors_np, counts = anchors_for(model_cfg, image_size)
    anchors = jnp.asarray(anchors_np)
    jitted = jax.jit(
        functools.partial(predict, model=model, model_cfg=model_cfg, level_counts=counts)
    )

    def predict_fn(variables, images, image_sizes) -> Detections:
        return jitted(variables, images, image_sizes, anchors)

    return predict_fn
