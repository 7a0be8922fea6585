"""The smallest working model, for tests: its training step compiles and runs once in about 25 s
on a 2-core CPU (the first step of `--config=configs/tiny.py`, 26 s on 2026-11-27)."""

from configs import shapes


def get_config():
    c = shapes.get_config()
    d = c.data
    d.image_size = (64, 64)
    d.train_min_sizes = (64,)
    d.train_max_size = 64
    d.test_min_size = 64
    d.test_max_size = 64
    d.shapes_image_size = 64
    d.shapes_num_train = 16
    d.shapes_num_val = 8
    d.mask_crop_size = 28
    d.max_instances = 8

    m = c.model
    m.fpn_channels = 32
    m.anchor_sizes = (8, 16, 32, 64, 128)
    m.rpn.batch_size_per_image = 64
    m.rpn.pre_nms_topk_train = 200
    m.rpn.pre_nms_topk_test = 200
    m.rpn.post_nms_topk_train = 64
    m.rpn.post_nms_topk_test = 32
    m.roi.batch_size_per_image = 32
    m.roi.max_mask_rois = 8
    m.roi.mask_head_chunk = 4
    m.roi.fc_dim = 64
    m.roi.mask_conv_dim = 32
    m.roi.num_mask_convs = 1
    m.test.detections_per_image = 10
    m.test.mask_head_chunk = 5
    m.test.pre_nms_topk = 200

    t = c.train
    t.global_batch_size = 2
    t.lr_reference_batch = 2
    t.num_steps = 4
    t.decay_steps = (3,)
    t.warmup_steps = 1
    t.checkpoint_every = 2
    t.log_every = 1
    c.eval.batch_size = 2
    return c
