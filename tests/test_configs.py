"""Every shipped config loads, passes validation and builds a model of the right size."""

import importlib
import pkgutil

import jax
import pytest

import configs
from mrcnn_jax import mask_rcnn
from mrcnn_jax.main import validate_config

NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


@pytest.mark.parametrize("name", NAMES)
def test_config_is_valid_and_builds(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    validate_config(config)
    assert config.model.num_classes == config.data.num_classes
    h, w = config.data.image_size
    assert h % 64 == 0 and w % 64 == 0, "padded size must be a multiple of the P6 stride"
    assert max(config.data.train_min_sizes) <= min(h, w) or config.data.train_max_size <= max(h, w)
    model = mask_rcnn.build_model(config.model)
    shapes = jax.eval_shape(lambda k: mask_rcnn.init_variables(model, k, (64, 64)), jax.random.key(0))
    assert "backbone" in shapes["params"]


def test_coco_recipes_follow_detectron2():
    c1 = importlib.import_module("configs.coco_r50_fpn_1x").get_config()
    c3 = importlib.import_module("configs.coco_r50_fpn_3x").get_config()
    assert (c1.train.num_steps, tuple(c1.train.decay_steps)) == (90_000, (60_000, 80_000))
    assert (c3.train.num_steps, tuple(c3.train.decay_steps)) == (270_000, (210_000, 250_000))
    assert c1.train.base_lr == 0.02 and c1.train.global_batch_size == 16
    assert c1.model.depth == 50 and c1.model.freeze_at == 2 and c1.model.norm == "frozen_bn"


@pytest.mark.parametrize(
    "name, scaled",
    [
        ("coco_r50_fpn_1x", True),
        ("coco_r50_fpn_3x", True),
        ("detectron2_r50_fpn_1x", True),
        ("detectron2_r50_fpn_3x", True),
        ("torchvision_r50_fpn", True),
        ("coco_folder", True),  # written at its own batch of 8
    ],
)
def test_recipes_keep_their_epochs_at_any_batch(name, scaled):
    """At the batch a recipe is written for, its steps and rate are as written; at twice that
    batch, half the steps at twice the rate: the same epochs."""
    from mrcnn_jax.train import scale_schedule, scaled_learning_rate

    config = importlib.import_module(f"configs.{name}").get_config()
    t = config.train
    assert t.scale_schedule is scaled
    assert t.global_batch_size == t.lr_reference_batch  # shipped at the batch they are written for
    assert scale_schedule(t).num_steps == t.num_steps
    t.global_batch_size = 2 * t.lr_reference_batch
    assert scale_schedule(t).num_steps == round(t.num_steps / 2)
    rate = scaled_learning_rate(t.base_lr, t.global_batch_size, t.lr_reference_batch)
    assert rate == 2 * t.base_lr
