"""torchvision `maskrcnn_resnet50_fpn` (COCO: 37.9 box / 34.6 mask AP) with its exact inference.

Weights: `python -m mrcnn_jax.convert --source=torchvision --input=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
--workdir=DIR` (docs/weights.md). Every field below is what torchvision does at test time
(torchvision/models/detection/{transform,rpn,roi_heads,anchor_utils}.py, ops/poolers.py); the
training fields stay the base (detectron2) recipe for fine-tuning.
"""

import numpy as np

from configs import base


def _at_least(x: float) -> float:
    """torchvision's remove_small_boxes keeps side >= x; ours keeps side > min_size. The float32
    just below x makes the two the same for float32 sides."""
    return float(np.nextafter(np.float32(x), np.float32(0.0)))


def get_config():
    c = base.get_config()
    d = c.data
    # GeneralizedRCNNTransform: RGB in [0, 1], mean (0.485, 0.456, 0.406), std (0.229, 0.224,
    # 0.225), i.e. these numbers on 0-255 pixels.
    d.pixel_mean = (123.675, 116.28, 103.53)
    d.pixel_std = (58.395, 57.12, 57.375)
    d.channel_order = "RGB"
    d.test_min_size = 800  # min_size=800, max_size=1333
    d.test_max_size = 1333
    d.resize_rounding = "floor"  # F.interpolate(recompute_scale_factor=True): 480 x 640 -> 800 x 1066

    m = c.model
    m.stride_in_1x1 = False  # torchvision ResNet v1.5: stride in the 3x3 conv
    m.norm = "frozen_bn"  # FrozenBatchNorm2d
    # maskrcnn_resnet50_fpn(weights=COCO_V1) calls overwrite_eps(model, 0.0): its published
    # 37.9 / 34.6 are with eps 0 in every FrozenBatchNorm2d (the ImageNet backbone alone: 1e-5).
    m.norm_eps = 0.0
    m.anchor_round = True  # AnchorGenerator rounds its cell anchors
    m.anchor_grid = "torchvision"  # and takes its strides from the padded image (P6: not 64)

    r = m.rpn
    r.pre_nms_topk_test = 1000  # per level
    r.post_nms_topk_test = 1000  # per image
    r.pre_nms_topk_train = 2000
    r.post_nms_topk_train = 2000
    r.nms_iou = 0.7
    r.min_size = _at_least(1e-3)  # RegionProposalNetwork.min_size
    r.sigmoid_scores = True  # filter_proposals: NMS and top-n on sigmoid(objectness)

    h = m.roi
    h.aligned = False  # MultiScaleRoIAlign -> roi_align(aligned=False)
    h.sampling_ratio = 2
    h.level_mapper = "torchvision"  # LevelMapper: eps 1e-6 added after log2

    t = m.test
    t.score_threshold = 0.05  # box_score_thresh, strict >
    t.nms_iou = 0.5
    t.detections_per_image = 100
    t.min_size = _at_least(1e-2)  # postprocess_detections: remove_small_boxes(min_size=1e-2)
    t.mask_paste = "torchvision"  # paste_masks_in_image: integer box, 1-px zero border

    # Fine-tuning keeps the base recipe's epochs at any global_batch_size (steps scaled with the
    # learning rate, as the COCO recipes).
    c.train.scale_schedule = True
    return c
