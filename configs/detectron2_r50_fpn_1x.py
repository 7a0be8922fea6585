"""detectron2 model zoo `COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x` (38.6 box / 35.2 mask AP)
with its inference as close as a fixed-shape graph allows.

Weights: `python -m mrcnn_jax.convert --source=detectron2 --input=model_final_a54504.pkl
--allow_pickle --workdir=DIR`; for R101-FPN add `--config.model.depth=101` to both the conversion
and the evaluation (docs/weights.md). Values from detectron2's `Base-RCNN-FPN.yaml` and
`config/defaults.py`; the training fields are its 1x schedule (the base config).
"""

from configs import base


def get_config():
    c = base.get_config()
    d = c.data
    # MSRA ImageNet weights (R-50.pkl): BGR pixels 0-255 minus the mean, std 1 (PIXEL_MEAN/STD).
    d.pixel_mean = (103.53, 116.28, 123.675)
    d.pixel_std = (1.0, 1.0, 1.0)
    d.channel_order = "BGR"
    d.test_min_size = 800  # ResizeShortestEdge(800, 1333)
    d.test_max_size = 1333
    d.resize_antialias = True  # ResizeTransform resizes with PIL, which antialiases when shrinking

    m = c.model
    m.stride_in_1x1 = True  # RESNETS.STRIDE_IN_1X1 (MSRA weights)
    m.norm = "frozen_bn"
    m.anchor_round = False

    r = m.rpn
    r.pre_nms_topk_test = 1000  # RPN.PRE_NMS_TOPK_TEST, per level
    r.post_nms_topk_test = 1000  # RPN.POST_NMS_TOPK_TEST, per image
    r.nms_iou = 0.7
    r.min_size = 0.0  # find_top_rpn_proposals keeps non-empty boxes
    r.sigmoid_scores = False  # ranks proposals by the objectness logit

    h = m.roi
    h.aligned = True  # ROIAlignV2
    # POOLER_SAMPLING_RATIO = 0: ceil(roi / bins) points per bin side, exact up to 6 per side (bins
    # of box-head RoIs wider than 6 feature pixels, ~3% of COCO-like boxes, get 3); docs/weights.md.
    h.sampling_ratio = 0
    h.max_sampling_ratio = 6
    h.level_mapper = "detectron2"

    t = m.test
    t.score_threshold = 0.05  # ROI_HEADS.SCORE_THRESH_TEST
    t.nms_iou = 0.5  # ROI_HEADS.NMS_THRESH_TEST
    t.detections_per_image = 100  # TEST.DETECTIONS_PER_IMAGE
    t.min_size = 0.0
    t.mask_paste = "detectron2"  # paste_masks_in_image, threshold 0.5

    # The recipe is written at batch 16 (IMS_PER_BATCH); another global_batch_size keeps its
    # epochs, the learning rate and the steps scaled together (detectron2 auto_scale_workers).
    c.train.scale_schedule = True
    return c
