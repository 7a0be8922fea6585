"""Any COCO-format folder (ROOT/annotations/instances_{split}.json, ROOT/{split}/), R50-FPN.

    --config.data.root=/data/mine --config.data.train_split=train --config.data.eval_split=val
    --config.data.num_classes=K [--config.train.init_checkpoint=converted COCO weights]

The schedule is detectron2's 1x scaled down for a smaller set; adjust num_steps / decay_steps
to the dataset's size (about 12 epochs is the 1x budget).
"""

from configs import coco_r50_fpn_1x


def get_config():
    c = coco_r50_fpn_1x.get_config()
    c.data.train_split = "train"
    c.data.eval_split = "val"
    # The schedule below is written for batch 8 at 0.01 (the 1x rate per image), and keeps its
    # epochs at any --config.train.global_batch_size (scale_schedule, from the 1x recipe).
    c.train.global_batch_size = 8
    c.train.lr_reference_batch = 8
    c.train.base_lr = 0.01
    c.train.num_steps = 20_000
    c.train.decay_steps = (14_000, 18_000)
    c.train.checkpoint_every = 2000
    c.train.eval_every = 5000
    return c
