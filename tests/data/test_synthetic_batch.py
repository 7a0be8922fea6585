"""`data.synthetic.make_batch`: every valid instance is visible and boxed by what is visible."""

import numpy as np

from configs import tiny
from mrcnn_jax.data import synthetic


def test_instances_are_their_visible_pixels():
    rng = np.random.default_rng(0)
    for _ in range(200):
        boxes, classes, masks = synthetic._shapes(rng, 64, 6)
        assert len(boxes) == len(classes) == len(masks)
        for box, mask in zip(boxes, masks, strict=True):
            assert mask.sum() >= synthetic.MIN_VISIBLE_PIXELS
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert not np.any(np.sum(masks, axis=0) > 1)  # occlusion leaves each pixel to one shape


def test_every_valid_gt_has_a_mask():
    config = tiny.get_config()
    batch = synthetic.make_batch(config, 16, seed=3, max_shapes=6)
    valid = batch["gt_valid"]
    assert valid.any()
    assert np.all(batch["gt_masks"][valid].reshape(valid.sum(), -1).any(axis=1))
    assert np.all(batch["gt_classes"][valid] >= 1) and np.all(batch["gt_classes"][~valid] == -1)
