"""Mask R-CNN R50-FPN on COCO 2017 with detectron2's 1x recipe (90k iterations at batch 16).

For a GPU server or a TPU pod. COCO lives on the user's disk in its usual layout:
    --config.data.root=/data/coco   (annotations/instances_train2017.json, train2017/, val2017/)
Start from ImageNet weights converted with `python -m mrcnn_jax.convert` (docs/weights.md) and
pass them as --config.train.init_checkpoint=DIR. Published: 38.6 box / 35.2 mask AP (detectron2),
with MSRA `R-50.pkl` weights (BGR input, stride in the 1x1 convolution) and adaptive RoIAlign
sampling. This config keeps the base's torchvision-ImageNet input convention and a fixed 2 points
per bin; for detectron2's exact recipe train `configs/detectron2_r50_fpn_1x.py` from `R-50.pkl`
(docs/weights.md). The published figures are that recipe's; this one is unmeasured here.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.dataset = "coco_folder"
    c.data.train_split = "train2017"
    c.data.eval_split = "val2017"
    c.data.num_classes = 80
    c.train.parallelism = "mesh"
    # The 1x recipe's epochs at any --config.train.global_batch_size (90k steps at 16, 22.5k at 64).
    c.train.scale_schedule = True
    c.eval.paste_workers = 8  # host mask pasting in parallel, when it is done on the host (CPU)
    return c
