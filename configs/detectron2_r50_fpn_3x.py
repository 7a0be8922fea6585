"""detectron2 model zoo `COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x` (41.0 box / 37.2 mask AP).

Inference is the 1x model's (detectron2_r50_fpn_1x.py); only the schedule differs: 270k
iterations, decays at 210k and 250k (detectron2 `mask_rcnn_R_50_FPN_3x.yaml`).
"""

from configs import detectron2_r50_fpn_1x


def get_config():
    c = detectron2_r50_fpn_1x.get_config()
    c.train.num_steps = 270_000
    c.train.decay_steps = (210_000, 250_000)
    return c
