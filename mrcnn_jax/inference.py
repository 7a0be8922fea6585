"""Graph pieces shared by training and inference, and the jittable batched predict function.

    images -> features -> RPN -> proposals (per image, fixed P) -> RoIAlign 7x7 -> box head
           -> detections (fixed D, padded) -> RoIAlign 14x14 on the detections -> mask probabilities
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax import postprocess
from mrcnn_jax.mask_rcnn import POOL_LEVELS, MaskRCNN
from mrcnn_jax.ops.anchors import generate_anchors, num_anchors_per_level, padded_image_size
from mrcnn_jax.ops.nms import batched_nms
from mrcnn_jax.ops.roi_align import multilevel_roi_align_many
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


FEATURE_PADDINGS = ("image", "canvas")


def padded_sizes(model_cfg: ml_collections.ConfigDict, image_sizes) -> jnp.ndarray | None:
    """image_sizes [B, 2] -> the `padded_size` the model and RoIAlign take: each image padded to
    model.rpn.size_divisibility when model.feature_padding is "image" (the features and RoIAlign
    borders of that image alone, as detectron2 / torchvision compute them at batch 1), None for
    "canvas" (the whole padded canvas, every image alike) or size_divisibility 0."""
    if model_cfg.feature_padding not in FEATURE_PADDINGS:
        raise ValueError(
            f"config.model.feature_padding must be one of {FEATURE_PADDINGS}, "
            f"got {model_cfg.feature_padding!r}"
        )
    if model_cfg.feature_padding == "canvas" or model_cfg.rpn.size_divisibility <= 0:
        return None
    return padded_image_size(image_sizes, model_cfg.rpn.size_divisibility)


def pool(
    feats: dict, rois: jnp.ndarray, output_size: int, roi_cfg, padded_size=None
) -> jnp.ndarray:
    """Multi-level RoIAlign for a batch: rois [B, R, 4] -> [B, R, out, out, C]."""
    return pool_many(feats, [rois], [output_size], roi_cfg, padded_size)[0]


def pool_many(
    feats: dict,
    rois: Sequence[jnp.ndarray],
    output_sizes: Sequence[int],
    roi_cfg,
    padded_size=None,
):
    """`pool` of several RoI sets [B, R_i, 4] at their own sizes, in one pass over the feature
    table (`multilevel_roi_align_many`: in training, one gradient accumulator for the box and
    the mask head's RoIAlign instead of one each) -> [[B, R_i, out_i, out_i, C]].
    padded_size [B, 2] (`padded_sizes`): each image's maps end there for the bilinear border."""
    levels = [feats[k] for k in POOL_LEVELS]
    if roi_cfg.level_mapper not in LEVEL_MAPPERS:
        raise ValueError(
            f"config.model.roi.level_mapper must be one of {sorted(LEVEL_MAPPERS)}, "
            f"got {roi_cfg.level_mapper!r}"
        )
    eps, eps_inside_log = LEVEL_MAPPERS[roi_cfg.level_mapper]
    fn = functools.partial(
        multilevel_roi_align_many,
        output_sizes=tuple(output_sizes),
        sampling_ratio=roi_cfg.sampling_ratio,
        max_sampling_ratio=roi_cfg.max_sampling_ratio,
        aligned=roi_cfg.aligned,
        min_level=2,
        canonical_size=roi_cfg.canonical_size,
        canonical_level=roi_cfg.canonical_level,
        eps=eps,
        eps_inside_log=eps_inside_log,
    )
    if padded_size is None:
        return jax.vmap(lambda f, r: fn(f, r))(levels, list(rois))
    return jax.vmap(lambda f, r, e: fn(f, r, image_extent=e))(levels, list(rois), padded_size)


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
        size_divisibility=rpn.size_divisibility,
        anchor_grid=model_cfg.anchor_grid,
        strides=tuple(model_cfg.anchor_strides),
    )
    logits, deltas = jax.lax.stop_gradient((logits, deltas))
    return jax.vmap(fn, in_axes=(0, 0, None, 0))(
        logits.astype(jnp.float32), deltas.astype(jnp.float32), anchors, image_sizes
    )


def mask_head_on_valid(head, pooled, valid, chunk: int, *, classes=None, remat: bool = False):
    """Mask logits [B, K, S, S, C'] of pooled RoIs [B, K, s, s, C] of which only the `valid`
    [B, K] ones matter (the sampled positives in training, the detections at inference). With
    `classes` [B, K], `head` is called as head(x, classes) on each block (the class-selected
    logits, [B, K, S, S]).

    chunk = 0 runs `head` on all B x K RoIs. chunk > 0 scans over the K slots in blocks of
    `chunk` (K padded to a multiple of it; chunk >= K is one block), every image's j-th block at
    once so that a batch sharded over devices stays sharded, and runs the head on a block only
    when one of its RoIs is valid; a skipped block gives zero logits. The valid rows are the same
    as with one pass, so a loss that ignores the others has the same value and gradients; the
    work follows the number of valid RoIs (the positives come first in training: torchvision and
    detectron2 run their mask head on the positives only) while every shape stays fixed. remat
    recomputes a block's activations in the backward pass instead of keeping them (K x 28 x 28 x
    256 floats per image fewer).
    """
    b, k = valid.shape
    # The head's per-RoI inputs: the pooled features, and the classes when given.
    inputs = (pooled,) if classes is None else (pooled, classes)
    flat = lambda a, n: a.reshape(b * n, *a.shape[2:])
    if chunk <= 0:
        out = head(*(flat(a, k) for a in inputs))
        return out.reshape(b, k, *out.shape[1:])
    chunk = min(chunk, k)
    blocks = -(-k // chunk)
    if blocks * chunk != k:  # padding slots: never valid, so never computed
        extra = blocks * chunk - k
        pad = lambda a: jnp.pad(a, ((0, 0), (0, extra)) + ((0, 0),) * (a.ndim - 2))
        inputs, valid = tuple(pad(a) for a in inputs), pad(valid)
    run = jax.checkpoint(head) if remat else head
    out_spec = jax.eval_shape(head, *(flat(a[:, :chunk], chunk) for a in inputs))

    def body(_, block):
        xs, v = block  # ([B, chunk, s, s, C], [B, chunk] classes), [B, chunk]
        xs = tuple(flat(a, chunk) for a in xs)
        skip = lambda *xs: jnp.zeros(out_spec.shape, out_spec.dtype)
        return None, jax.lax.cond(jnp.any(v), run, skip, *xs)

    to_blocks = lambda a: jnp.swapaxes(a.reshape(b, blocks, chunk, *a.shape[2:]), 0, 1)
    _, out = jax.lax.scan(body, None, (tuple(map(to_blocks, inputs)), to_blocks(valid)))
    out = out.reshape(blocks, b, chunk, *out.shape[2:])  # [blocks, B, chunk, S, S, C']
    return jnp.swapaxes(out, 0, 1).reshape(b, blocks * chunk, *out.shape[3:])[:, :k]


def features_and_proposals(
    variables: dict,
    images: jnp.ndarray,
    image_sizes: jnp.ndarray,
    anchors: jnp.ndarray,
    *,
    model: MaskRCNN,
    model_cfg: ml_collections.ConfigDict,
    level_counts: list[int],
):
    """The first half of `predict`: (FPN features {"p2": [B, h, w, C], ..}, proposals [B, P, 4]
    xyxy in resized-image pixels, their scores [B, P], valid [B, P]) with the test-time RPN
    settings; `anchors, level_counts = anchors_for(model_cfg, images.shape[1:3])`."""
    padded = padded_sizes(model_cfg, image_sizes)
    feats = model.apply(
        variables, images, train=False, padded_size=padded, method=MaskRCNN.features
    )
    logits, deltas = model.apply(variables, feats, padded, method=MaskRCNN.rpn)
    props, scores, valid = batch_proposals(
        model_cfg, logits, deltas, anchors, image_sizes, level_counts, train=False
    )
    return feats, props, scores, valid


def box_detections(variables, feats, props, props_valid, image_sizes, *, model, model_cfg):
    """The box head on the proposals and its postprocessing (`postprocess.detections`): padded
    (boxes [B, D, 4] in resized-image pixels, scores [B, D], classes [B, D], valid [B, D])."""
    roi, test = model_cfg.roi, model_cfg.test
    pooled = pool(feats, props, roi.box_pool_size, roi, padded_sizes(model_cfg, image_sizes))
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
    return jax.vmap(det_fn)(
        cls_logits.reshape(b, r, -1),
        cls_deltas.reshape(b, r, *cls_deltas.shape[1:]),
        props,
        props_valid,
        image_sizes,
    )


def mask_probabilities(variables, feats, boxes, classes, valid, image_sizes, *, model, model_cfg):
    """The mask head on detections: [B, D, S, S] probabilities of each one's class."""
    roi, test = model_cfg.roi, model_cfg.test
    mask_in = pool(feats, boxes, roi.mask_pool_size, roi, padded_sizes(model_cfg, image_sizes))
    # The mask of each detection is its predicted class's channel, the only one computed.
    chosen = mask_head_on_valid(
        functools.partial(model.apply, variables, method=MaskRCNN.mask_logits),
        mask_in,
        valid,
        test.mask_head_chunk,
        classes=classes,
    )
    return jax.nn.sigmoid(chosen.astype(jnp.float32))


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
    """images [B, H, W, 3], image_sizes [B, 2] -> padded `Detections` with mask probabilities.
    With `model_cfg.test.flip_tta`, `predict_flip_tta`."""
    if model_cfg.test.get("flip_tta", False):
        return predict_flip_tta(
            variables, images, image_sizes, anchors,
            model=model, model_cfg=model_cfg, level_counts=level_counts,
        )
    heads = dict(model=model, model_cfg=model_cfg)
    feats, props, _, props_valid = features_and_proposals(
        variables, images, image_sizes, anchors, level_counts=level_counts, **heads
    )
    boxes, scores, classes, valid = box_detections(
        variables, feats, props, props_valid, image_sizes, **heads
    )
    masks = mask_probabilities(variables, feats, boxes, classes, valid, image_sizes, **heads)
    return Detections(boxes=boxes, scores=scores, classes=classes, valid=valid, masks=masks)


def flip_images(images: jnp.ndarray, image_sizes: jnp.ndarray) -> jnp.ndarray:
    """Each image mirrored left-right within its own width (`image_sizes[:, 1]`); the padding on
    the right stays where it is. [B, H, W, C]."""
    x = jnp.arange(images.shape[2])
    w = image_sizes[:, 1:2]
    source = jnp.where(x[None] < w, w - 1 - x[None], x[None])  # [B, W]
    return jnp.take_along_axis(images, source[:, None, :, None], axis=2)


def flip_boxes(boxes: jnp.ndarray, image_sizes: jnp.ndarray) -> jnp.ndarray:
    """xyxy boxes [B, N, 4] in an image of width w mirrored: (w - x2, y1, w - x1, y2)."""
    w = image_sizes[:, 1].astype(boxes.dtype)[:, None]
    return jnp.stack(
        [w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0], boxes[..., 3]], axis=-1
    )


def merge_detections(boxes, scores, classes, valid, *, nms_iou: float, max_detections: int):
    """One image's detections of several views, [N, 4] / [N] each (`valid` False: padding),
    merged as detectron2's TTA merges them: per-class NMS at `nms_iou` over all of them, the
    best `max_detections` kept. -> (boxes, scores, classes, valid), padded to max_detections."""
    idx, keep = batched_nms(
        boxes, jnp.where(valid, scores, -jnp.inf), classes, nms_iou, max_detections
    )
    return (
        jnp.where(keep[:, None], boxes[idx], 0.0),
        jnp.where(keep, scores[idx], 0.0),
        jnp.where(keep, classes[idx], 0),
        keep,
    )


def predict_flip_tta(
    variables: dict,
    images: jnp.ndarray,
    image_sizes: jnp.ndarray,
    anchors: jnp.ndarray,
    *,
    model: MaskRCNN,
    model_cfg: ml_collections.ConfigDict,
    level_counts: list[int],
) -> Detections:
    """`predict` with horizontal-flip test-time augmentation (`model.test.flip_tta`), as
    detectron2's GeneralizedRCNNWithTTA does it for one scale: the detections of the image and
    of its mirror image (mapped back) are merged by per-class NMS (`test.nms_iou`) into the best
    `test.detections_per_image`; each merged box's mask is the mean of the mask head's
    probabilities on both (the mirror's mask mirrored back). About twice predict's work.

    A box (x1, y1, x2, y2) of an image of width w is (w - x2, y1, w - x1, y2) in the mirror,
    which RoIAlign with `roi.aligned` (half-pixel centres) samples at the mirrored points exactly
    when w is a multiple of the pooled levels' strides; with `aligned=False` (torchvision's)
    the mirror's samples sit one feature cell off, and the two views' masks are averaged
    slightly out of register."""
    test = model_cfg.test
    heads = dict(model=model, model_cfg=model_cfg)
    views = []
    for view in (images, flip_images(images, image_sizes)):
        feats, props, _, props_valid = features_and_proposals(
            variables, view, image_sizes, anchors, level_counts=level_counts, **heads
        )
        views.append((feats, box_detections(
            variables, feats, props, props_valid, image_sizes, **heads
        )))
    (feats, (b0, s0, c0, v0)), (feats_flipped, (b1, s1, c1, v1)) = views
    boxes = jnp.concatenate([b0, flip_boxes(b1, image_sizes)], axis=1)
    scores = jnp.concatenate([s0, s1], axis=1)
    classes = jnp.concatenate([c0, c1], axis=1)
    valid = jnp.concatenate([v0, v1], axis=1)

    merge = functools.partial(
        merge_detections, nms_iou=test.nms_iou, max_detections=test.detections_per_image
    )
    boxes, scores, classes, valid = jax.vmap(merge)(boxes, scores, classes, valid)
    masks = mask_probabilities(variables, feats, boxes, classes, valid, image_sizes, **heads)
    mirrored = mask_probabilities(
        variables, feats_flipped, flip_boxes(boxes, image_sizes), classes, valid, image_sizes,
        **heads,
    )
    masks = 0.5 * (masks + mirrored[..., ::-1])
    return Detections(boxes=boxes, scores=scores, classes=classes, valid=valid, masks=masks)


def predict_step(model: MaskRCNN, model_cfg: ml_collections.ConfigDict, image_size):
    """(`step(variables, images, image_sizes, anchors) -> Detections`, not jitted, for images
    padded to `image_size`; its anchors, numpy [A, 4]): what `make_predict_fn` compiles and
    `export` serializes."""
    anchors, counts = anchors_for(model_cfg, image_size)
    step = functools.partial(predict, model=model, model_cfg=model_cfg, level_counts=counts)
    return step, anchors


def make_predict_fn(model: MaskRCNN, model_cfg: ml_collections.ConfigDict, image_size):
    """A jitted `predict_fn(variables, images, image_sizes) -> Detections` for one padded size.

    The anchors are passed to the compiled function as an argument rather than closed over, so
    XLA does not constant-fold work on a large literal at compile time.
    """
    step, anchors_np = predict_step(model, model_cfg, image_size)
    anchors = jnp.asarray(anchors_np)
    jitted = jax.jit(step)

    def predict_fn(variables, images, image_sizes) -> Detections:
        return jitted(variables, images, image_sizes, anchors)

    return predict_fn
