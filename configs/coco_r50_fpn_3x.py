"""R50-FPN with detectron2's 3x recipe: 270k iterations, steps at 210k / 250k (41.0 / 37.2 AP)."""

from configs import coco_r50_fpn_1x


def get_config():
    c = coco_r50_fpn_1x.get_config()
    c.train.num_steps = 270_000
    c.train.decay_steps = (210_000, 250_000)
    return c
