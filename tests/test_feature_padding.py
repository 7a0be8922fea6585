"""model.feature_padding="image": an image's outputs do not depend on the canvas it is padded to.

detectron2 and torchvision pad a lone image only to a multiple of 32; we pad every image to one
canvas. With the default "image", every spatial convolution reads zeros beyond the image padded to
32 and RoIAlign's border is there, so a bigger canvas, whatever it holds beyond, changes nothing:
the same features inside, the same detections and masks, the same training loss and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mrcnn_jax import inference, losses, mask_rcnn
from mrcnn_jax.data.synthetic import make_batch
from mrcnn_jax.ops.anchors import zero_beyond

SIZE = (50, 60)  # resized image; padded to 32: 64 x 64, the small canvas
BIG = (128, 96)  # a canvas with room beyond the padded image


def _config(feature_padding):
    config = tiny.get_config()
    config.model.feature_padding = feature_padding
    config.model.test.score_threshold = 0.0  # random weights: keep every detection
    return config


@pytest.fixture(scope="module")
def model_and_variables():
    config = _config("image")
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(0), config.data.image_size)
    return model, variables


def _canvases(seed):
    """(image on the 64 x 64 canvas, the same on the big canvas with noise beyond 64 x 64)."""
    rng = np.random.default_rng(seed)
    small = np.zeros((1, 64, 64, 3), np.float32)
    small[0, : SIZE[0], : SIZE[1]] = rng.normal(size=(*SIZE, 3))
    big = rng.normal(size=(1, *BIG, 3)).astype(np.float32) * 3
    big[:, :64, :64] = small
    return jnp.asarray(small), jnp.asarray(big)


@pytest.mark.parametrize("feature_padding", ["image", "canvas"])
def test_detections_do_not_depend_on_the_canvas(model_and_variables, feature_padding):
    model, variables = model_and_variables
    config = _config(feature_padding)
    small, big = _canvases(0)
    sizes = jnp.asarray([SIZE], jnp.int32)
    padded = inference.padded_sizes(config.model, sizes)
    feats = [
        model.apply(variables, x, padded_size=padded, method=mask_rcnn.MaskRCNN.features)
        for x in (small, big)
    ]
    # Every level of the small canvas is the padded image's whole map.
    same_features = all(
        np.allclose(small_f, big_f[:, : small_f.shape[1], : small_f.shape[2]], rtol=1e-5, atol=1e-5)
        for small_f, big_f in ((feats[0][k], feats[1][k]) for k in feats[0])
    )
    if feature_padding == "canvas":
        # The noise beyond the padded image reaches its features and detections.
        assert padded is None and not same_features
        return
    assert padded.tolist() == [[64, 64]] and same_features
    small_d, big_d = (
        inference.make_predict_fn(model, config.model, canvas)(variables, x, sizes)
        for x, canvas in ((small, (64, 64)), (big, BIG))
    )
    assert int(small_d.valid.sum()) == config.model.test.detections_per_image
    np.testing.assert_array_equal(small_d.valid, big_d.valid)
    np.testing.assert_array_equal(small_d.classes, big_d.classes)
    np.testing.assert_allclose(small_d.boxes, big_d.boxes, atol=1e-4)
    np.testing.assert_allclose(small_d.scores, big_d.scores, atol=1e-5)
    np.testing.assert_allclose(small_d.masks, big_d.masks, atol=1e-5)


@pytest.mark.parametrize("feature_padding", ["image", "canvas"])
def test_training_loss_ignores_pixels_beyond_the_padded_image(model_and_variables, feature_padding):
    model, variables = model_and_variables
    config = _config(feature_padding)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    batch = make_batch(config, 2)
    sizes = np.array([[40, 50], [64, 30]], np.int32)  # padded to 32: 64 x 64 and 64 x 32
    batch = {**batch, "image_sizes": jnp.asarray(sizes)}
    noisy = np.asarray(batch["images"]).copy()
    noisy[1, :, 32:] = np.random.default_rng(1).normal(size=noisy[1, :, 32:].shape) * 3
    zeroed = noisy.copy()
    zeroed[1, :, 32:] = 0
    loss_fn = jax.jit(jax.grad(losses.make_loss_fn(model, config.model, (64, 64)), has_aux=True))
    keys = jax.random.split(jax.random.key(3), 2)
    grads = [
        loss_fn(params, state, {**batch, "images": jnp.asarray(x)}, keys)
        for x in (noisy, zeroed)
    ]
    leaves = [jax.tree.leaves(g[0]) for g in grads]
    totals = [float(g[1][0]["loss_rpn_cls"] + g[1][0]["loss_mask"]) for g in grads]
    same = all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*leaves, strict=True))
    if feature_padding == "canvas":
        assert not same
        return
    assert same and np.isclose(totals[0], totals[1], rtol=1e-5)


def test_zero_beyond_keeps_the_padded_image_per_stride():
    x = jnp.ones((2, 8, 6, 1))
    padded = jnp.asarray([[64, 32], [32, 96]])
    out = np.asarray(zero_beyond(x, padded, 8))[..., 0]
    # cell (y, x) of stride 8 is kept iff y * 8 < h and x * 8 < w.
    np.testing.assert_array_equal(out[0], np.outer(np.arange(8) < 8, np.arange(6) < 4))
    np.testing.assert_array_equal(out[1], np.outer(np.arange(8) < 4, np.arange(6) < 6))
    assert zero_beyond(x, None, 8) is x
