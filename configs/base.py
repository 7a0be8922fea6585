"""Base config: Mask R-CNN R50-FPN with detectron2's `Base-RCNN-FPN` hyper-parameters on COCO.

Every default lives here, once. Variants (`shapes.py`, `tiny.py`, `coco_r50_fpn_1x.py`, ...) import
`get_config()` and override a few fields. Modules never read the config: `mrcnn_jax` builders turn
these fields into typed constructor arguments.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    d.dataset = "coco_folder"  # "shapes" | "coco_folder"
    d.root = ""  # coco_folder: ROOT/annotations/instances_{split}.json, ROOT/{split}/*.jpg
    d.data_dir = ""  # where TFDS writes prepared datasets ("" = TFDS default, ~/tensorflow_datasets)
    d.train_split = "train2017"
    d.eval_split = "val2017"
    d.num_classes = 80
    d.image_size = (1344, 1344)  # (H, W) every image is padded to; a multiple of 64 (P6 stride)
    d.train_min_sizes = (640, 672, 704, 736, 768, 800)  # shortest-side jitter (detectron2)
    d.train_max_size = 1333
    d.test_min_size = 800
    d.test_max_size = 1333
    # Large-scale jitter for training, (min, max), e.g. (0.1, 2.0) (TF Model Garden aug_scale_min /
    # max, detectron2's LSJ baselines): each image is resized to fit image_size times a random
    # factor in [min, max] and a random image_size window is cut out; train_min_sizes and
    # train_max_size are then not used. () = off: detectron2's shortest-side resizing.
    d.train_scale_jitter = ()
    d.resize_rounding = "half_up"  # resized sides: detectron2 rounds half up, torchvision "floor"s
    # Antialias when shrinking (True: PIL's BILINEAR, as detectron2 resizes; False: torchvision's
    # F.interpolate and the TF Model Garden). Only images shrunk to fit change (not COCO's).
    d.resize_antialias = False
    d.flip_prob = 0.5
    d.pixel_mean = (123.675, 116.28, 103.53)  # RGB, 0-255 (torchvision ImageNet weights)
    d.pixel_std = (58.395, 57.12, 57.375)
    d.channel_order = "RGB"  # "BGR" for detectron2's MSRA weights
    d.max_instances = 100
    d.mask_crop_size = 112  # gt masks cropped to their boxes at this size (TF Model Garden)
    d.skip_empty_train = True  # drop images without annotations from training
    # `shapes` synthetic dataset only.
    d.shapes_image_size = 128
    d.shapes_num_train = 2000
    d.shapes_num_val = 200

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.num_classes = d.get_ref("num_classes")
    m.depth = 50  # ResNet 18 / 34 / 50 / 101
    m.norm = "frozen_bn"  # "frozen_bn" | "group_norm" | "batch_norm" | "sync_bn"
    m.norm_eps = 1e-5  # the backbone norms' epsilon (torch's default; torchvision's COCO weights: 0)
    m.stride_in_1x1 = False  # True for detectron2's MSRA weights, False for torchvision
    m.freeze_at = 2  # detectron2 FREEZE_AT: 0 none, 1 stem, 2 stem + res2, ...
    m.width_per_group = 64
    m.fpn_channels = 256
    m.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision (params stay float32)
    m.remat_backbone = False  # recompute ResNet blocks in the backward pass: less memory, more compute
    # In training, run the stages frozen by freeze_at image by image (a loop): their activations are
    # then never held for the backward pass. "auto" = on for the CPU backend (measured there) unless
    # train.parallelism = "mesh" splits the batch over several devices.
    m.frozen_stages_per_image = "auto"

    m.anchor_sizes = (32, 64, 128, 256, 512)  # one per level P2..P6
    m.anchor_strides = (4, 8, 16, 32, 64)
    m.anchor_ratios = (0.5, 1.0, 2.0)
    m.anchor_round = False  # torchvision rounds its base anchors; detectron2 does not
    # "torchvision": each level's stride is padded size // cells (61 on P6 of an 800-px side)
    m.anchor_grid = "detectron2"
    # "image": every spatial convolution reads zeros beyond each image padded to
    # rpn.size_divisibility, and RoIAlign's border is there, so the canvas size does not change an
    # image's outputs (detectron2 / torchvision at batch 1). "canvas": the padded canvas as it is.
    m.feature_padding = "image"

    r = m.rpn = ml_collections.ConfigDict()
    r.fg_iou = 0.7
    r.bg_iou = 0.3
    r.batch_size_per_image = 256
    r.positive_fraction = 0.5
    r.pre_nms_topk_train = 2000  # per level
    r.pre_nms_topk_test = 1000  # per level
    r.post_nms_topk_train = 1000  # per image (detectron2 FPN); torchvision: 2000
    r.post_nms_topk_test = 1000
    r.nms_iou = 0.7
    # Anchors matched to the gt this many at a time: bounds the [max_instances, anchors] IoU matrix
    # of the RPN targets (0: all at once).
    r.match_anchor_chunk = 16384
    r.min_size = 0.0  # proposals keep boxes with both sides > min_size
    # Anchors centred beyond the image padded to a multiple of this (as detectron2 / torchvision
    # pad a batch of one image) are neither RPN training samples nor proposals; 0 = every anchor
    # of the data.image_size canvas.
    r.size_divisibility = 32
    r.sigmoid_scores = False  # rank / NMS proposals by sigmoid(logit) (torchvision), not the logit
    r.smooth_l1_beta = 0.0  # 0 = L1
    r.loss_weight = 1.0
    r.box_weights = (1.0, 1.0, 1.0, 1.0)

    # Each loss term's weight in the total (TF Model Garden's rpn_score_weight, rpn_box_weight,
    # frcnn_class_weight, frcnn_box_weight, mask_weight; detectron2's BBOX_REG_LOSS_WEIGHTs), on
    # top of rpn.loss_weight (detectron2's RPN.LOSS_WEIGHT, both RPN terms). The logged loss_*
    # metrics are the weighted terms.
    m.loss_weights = ml_collections.ConfigDict(
        {"rpn_cls": 1.0, "rpn_box": 1.0, "cls": 1.0, "box": 1.0, "mask": 1.0}
    )

    h = m.roi = ml_collections.ConfigDict()
    h.fg_iou = 0.5
    h.batch_size_per_image = 512
    h.positive_fraction = 0.25
    h.box_weights = (10.0, 10.0, 5.0, 5.0)
    h.smooth_l1_beta = 0.0
    h.box_pool_size = 7
    h.mask_pool_size = 14
    h.mask_size = 28
    # Sample points per bin side: a fixed s (torchvision: 2), or 0 for detectron2's adaptive
    # ceil(roi side / bins), exact up to max_sampling_ratio points per side; wider bins are sampled
    # with (max + 1) // 2 points (ops.roi_align). Adaptive costs (max + 1)^2 gathers per bin, 4 s^2 fixed.
    h.sampling_ratio = 2
    h.max_sampling_ratio = 6
    h.aligned = True  # detectron2 half-pixel RoIAlign; False for torchvision
    h.fc_dim = 1024
    h.mask_conv_dim = 256
    h.num_mask_convs = 4
    h.max_mask_rois = 128  # positives per image that get a mask target (512 x 25%)
    # The mask head runs on blocks of this many of the max_mask_rois slots, skipping blocks with no
    # positive (fixed shapes, work that follows the positives; 0: one pass over all slots), and
    # with mask_head_remat recomputes a block's activations in the backward pass
    # (inference.mask_head_on_valid).
    h.mask_head_chunk = 16
    h.mask_head_remat = True
    h.canonical_size = 224
    h.canonical_level = 4
    # FPN level of a RoI: "detectron2" floor(4 + log2(sqrt(area) / 224 + 1e-8)); "torchvision"
    # (LevelMapper) floor(4 + log2(sqrt(area) / 224) + 1e-6).
    h.level_mapper = "detectron2"

    t = m.test = ml_collections.ConfigDict()
    t.score_threshold = 0.05
    t.nms_iou = 0.5
    t.detections_per_image = 100
    t.mask_head_chunk = 25  # the mask head runs on blocks of 25 detections, skipping empty blocks
    t.pre_nms_topk = 5000  # (RoI, class) candidates entering the final NMS; bounds its cost
    t.mask_threshold = 0.5
    t.min_size = 0.0  # detections keep boxes with both sides > min_size (after clipping)
    # How 28x28 masks are pasted into the image: "detectron2" (bilinear on the float box,
    # ops.masks.paste_masks) or "torchvision" (integer box, 1-px zero border, paste_masks_torchvision).
    t.mask_paste = "detectron2"
    # Test-time augmentation by a horizontal flip (detectron2's TEST.AUG.FLIP at one scale): the
    # image's and its mirror's detections merged by NMS, their masks averaged. ~2x predict's work.
    t.flip_tta = False

    # ---------------------------------------------------------------- training
    tr = c.train = ml_collections.ConfigDict()
    tr.global_batch_size = 16
    tr.base_lr = 0.02  # at `lr_reference_batch`; scaled linearly to global_batch_size
    tr.lr_reference_batch = 16
    # Divide num_steps, warmup_steps, decay_steps, checkpoint_every and eval_every by
    # global_batch_size / lr_reference_batch, as the learning rate is multiplied by it (detectron2
    # auto_scale_workers): the recipe's epochs at any batch. Off: the steps are taken as written.
    tr.scale_schedule = False
    tr.num_steps = 90_000
    # "multistep" (detectron2 WarmupMultiStepLR: x decay_factor at each of decay_steps) or
    # "cosine" (WarmupCosineLR: half a cosine from base_lr over num_steps down to
    # base_lr * lr_end_factor, detectron2's BASE_LR_END / BASE_LR); both after the linear warmup.
    tr.lr_schedule = "multistep"
    tr.lr_end_factor = 0.0
    tr.decay_steps = (60_000, 80_000)
    tr.decay_factor = 0.1
    tr.warmup_steps = 1000
    tr.warmup_factor = 0.001
    # "sgd" (detectron2's SGD with momentum) or "adamw" (torch AdamW: detectron2's ViTDet
    # recipes use it at base_lr 1e-4, weight_decay 0.1); momentum is SGD's, adam_* AdamW's.
    tr.optimizer = "sgd"
    tr.momentum = 0.9
    tr.adam_betas = (0.9, 0.999)
    tr.adam_eps = 1e-8
    tr.weight_decay = 1e-4
    tr.weight_decay_norm = 0.0  # detectron2 WEIGHT_DECAY_NORM
    tr.grad_clip_norm = 0.0  # 0 = off
    # Gradient accumulation: each device's share of the batch is run as this many micro-batches,
    # one after the other, and their gradients averaged into one update (the memory of one
    # micro-batch; the step, learning rate and data order stay the global batch's). The mask loss
    # is then a mean over each micro-batch's positives, averaged over the micro-batches.
    tr.grad_accum_steps = 1
    # Exponential moving average of the weights (e.g. 0.9998, TF Model Garden's average_decay,
    # with its dynamic decay min(d, (1 + step) / (10 + step))); evaluation, prediction and
    # fine-tuning from the checkpoints then use the average. 0 = off.
    tr.ema_decay = 0.0
    tr.parallelism = "pmap"  # "pmap" | "mesh"
    tr.distributed = False  # call jax.distributed.initialize() (multi-host)
    tr.init_checkpoint = ""  # weights to start from (fine-tuning); resuming a workdir is separate
    tr.checkpoint_every = 5000
    tr.keep_checkpoints = 3
    # Keep the checkpoint of the evaluation that scores highest on this metric in WORKDIR/best,
    # apart from the rotating ones: "segm/AP", "bbox/AP50", ... (any "bbox/" or "segm/" key of
    # the evaluation, per-category "segm/AP-NAME" included); "" = off. --checkpoint=best picks it.
    tr.best_metric = ""
    tr.log_every = 20
    # 0 = only at the end; -1 = never: a job of its own evaluates the checkpoints as they come
    # (--mode=continuous_eval, with the same config and workdir)
    tr.eval_every = 10_000

    # ---------------------------------------------------------------- evaluation
    e = c.eval = ml_collections.ConfigDict()
    e.batch_size = 8  # per host (process): each host evaluates its own shard of the split
    # Each host's batch split over its own devices (all GPUs / TPU cores of the host); False:
    # its first device alone.
    e.local_devices = True
    e.max_examples = 0  # 0 = the whole split
    # --mode=continuous_eval: look for a new checkpoint every poll_s seconds; stop when none has
    # come for timeout_s (TF Model Garden's continuous_eval_timeout) or the last step is evaluated.
    e.continuous_poll_s = 30.0
    e.continuous_timeout_s = 3600.0
    # What COCOeval scores against: "file" = the annotation file's own annotations of the
    # evaluated images (as detectron2 / torchvision evaluate; comparable with published numbers),
    # "prepared" = the instances as stored after preparation's repairs. Datasets without an
    # annotation file (shapes) always use the stored instances.
    e.ground_truth = "file"
    e.num_overlays = 8  # overlay PNGs of the first eval images written to WORKDIR/overlays_STEP
    # Processes that paste the masks at full resolution and encode them for COCO while the device
    # predicts the next batches (0: in the main process). Worth it when the accelerator outruns one
    # host core: ~0.05 s per image of 100 detections. Not used when the device writes the masks'
    # strings (device_masks below): the host's share is then too small to hand out.
    e.paste_workers = 0
    # Paste the masks and write their COCO RLE strings on the device (evaluate.make_device_mask_rles),
    # so the host only slices strings out: "auto" (on a GPU / TPU, not on the CPU backend, where
    # the host paste is faster), "on" or "off". Original images up to canvas (h, w) are pasted
    # there, bigger ones (and masks of more than max_runs runs, or of more than 16 run starts in
    # one image column) on the host.
    e.device_masks = "auto"
    e.device_mask_canvas = (1024, 1024)
    e.device_mask_max_runs = 4096
    # Also score each category alone (AP at IoU 0.5:0.95, all areas, as detectron2's evaluator
    # reports): "bbox/AP-NAME", "segm/AP-NAME" in the metric files and TensorBoard, and a
    # per-category table in the log.
    e.per_category_ap = True
    return c
