"""The Quick start: Mask R-CNN trained from scratch on the built-in synthetic `shapes` set.

Small enough to train on a 2-core CPU in minutes: ResNet-18 with GroupNorm (no pretrained weights
exist offline, and GroupNorm is the from-scratch choice of He et al. 2019), 128 px images, slim
FPN and heads, fewer sampled anchors and RoIs.
"""

from configs import base


def get_config():
    c = base.get_config()
    d = c.data
    d.dataset = "shapes"
    d.num_classes = 3  # circle, square, triangle
    d.train_split = "train"
    d.eval_split = "validation"
    d.image_size = (128, 128)
    d.train_min_sizes = (128,)
    d.train_max_size = 128
    d.test_min_size = 128
    d.test_max_size = 128
    d.mask_crop_size = 56
    d.max_instances = 16

    m = c.model
    m.depth = 18
    m.norm = "group_norm"
    m.freeze_at = 0
    m.fpn_channels = 64
    m.anchor_sizes = (16, 32, 64, 128, 256)
    m.rpn.batch_size_per_image = 128
    m.rpn.pre_nms_topk_train = 500
    m.rpn.pre_nms_topk_test = 500
    m.rpn.post_nms_topk_train = 200
    m.rpn.post_nms_topk_test = 100
    m.roi.batch_size_per_image = 64
    m.roi.max_mask_rois = 16
    m.roi.mask_head_chunk = 8
    m.roi.fc_dim = 256
    m.roi.mask_conv_dim = 64
    m.roi.num_mask_convs = 2
    m.test.detections_per_image = 20
    m.test.mask_head_chunk = 5
    m.test.pre_nms_topk = 1000

    t = c.train
    t.global_batch_size = 8
    t.base_lr = 0.02
    t.lr_reference_batch = 8
    t.num_steps = 1500
    t.decay_steps = (1100, 1350)
    t.warmup_steps = 100
    t.grad_clip_norm = 5.0
    t.checkpoint_every = 500
    t.log_every = 50
    t.eval_every = 0
    c.eval.batch_size = 8
    return c
