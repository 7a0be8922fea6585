"""The mask head on blocks of positive RoIs (`inference.mask_head_on_valid`) computes what one
pass over every slot computes, skips the blocks with no positive, and keeps shapes fixed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mrcnn_jax import inference, losses, mask_rcnn
from mrcnn_jax.data.synthetic import make_batch


def _head_and_inputs(b=2, km=8, positives=(5, 2), seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    pooled = jnp.asarray(rng.normal(size=(b, km, 2, 2, 3)), jnp.float32)
    valid = jnp.asarray(np.arange(km)[None, :] < np.asarray(positives)[:, None])
    head = lambda w, x: jnp.tanh(x @ w)  # [N, 2, 2, 3] -> [N, 2, 2, 4]
    return w, pooled, valid, head


@pytest.mark.parametrize("chunk,remat", [(2, False), (4, True), (8, False)])
def test_matches_one_pass_on_positives_with_same_gradients(chunk, remat):
    w, pooled, valid, head = _head_and_inputs()

    def loss(w, chunk):
        out = inference.mask_head_on_valid(
            lambda x: head(w, x), pooled, valid, chunk, remat=remat
        )
        return jnp.sum(jnp.where(valid[:, :, None, None, None], out**2, 0.0)), out

    (l0, out0), g0 = jax.value_and_grad(loss, has_aux=True)(w, 0)
    (l1, out1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(w, chunk)
    assert out1.shape == out0.shape == (2, 8, 2, 2, 4)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out1)[v], np.asarray(out0)[v], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)
    # A block where no image has a positive is skipped: zeros there.
    blocks_used = -(-int(v.sum(axis=1).max()) // chunk)
    assert not np.any(np.asarray(out1)[:, blocks_used * chunk :])


@pytest.mark.parametrize("chunk", [0, 3, 8])
def test_class_selected_heads_get_their_rois_classes_in_every_block(chunk):
    w, pooled, valid, head = _head_and_inputs(positives=(7, 3))
    classes = jnp.asarray(np.random.default_rng(1).integers(0, 4, size=valid.shape), jnp.int32)
    pick = lambda x, c: jnp.take_along_axis(head(w, x), c[:, None, None, None], axis=-1)[..., 0]
    out = inference.mask_head_on_valid(pick, pooled, valid, chunk, classes=classes)
    full = inference.mask_head_on_valid(lambda x: head(w, x), pooled, valid, 0)
    ref = np.take_along_axis(np.asarray(full), np.asarray(classes)[..., None, None, None], -1)
    v = np.asarray(valid)
    assert out.shape == (2, 8, 2, 2)
    np.testing.assert_allclose(np.asarray(out)[v], ref[..., 0][v], rtol=1e-6)


def test_skipped_blocks_do_not_run_the_head():
    w, pooled, valid, head = _head_and_inputs(positives=(3, 1))
    calls = []

    def counting_head(x):
        jax.debug.callback(lambda: calls.append(1))
        return head(w, x)

    out = jax.jit(
        lambda p, v: inference.mask_head_on_valid(counting_head, p, v, 2)
    )(pooled, valid)
    jax.block_until_ready(out)
    assert len(calls) == 2  # slots 0-1 and 2-3 hold positives; 4-5 and 6-7 none
    calls.clear()
    jax.block_until_ready(jax.jit(
        lambda p, v: inference.mask_head_on_valid(counting_head, p, v, 2)
    )(pooled, jnp.zeros_like(valid)))
    assert not calls


def test_a_chunk_that_does_not_divide_the_slots_pads_the_last_block():
    w, pooled, valid, head = _head_and_inputs(positives=(8, 3))
    one_pass = inference.mask_head_on_valid(lambda x: head(w, x), pooled, valid, 0)
    for chunk in (3, 5, 100):  # 3 blocks of 3 (one padding slot), 2 of 5, one of 8
        out = inference.mask_head_on_valid(lambda x: head(w, x), pooled, valid, chunk)
        assert out.shape == one_pass.shape
        v = np.asarray(valid)
        np.testing.assert_allclose(np.asarray(out)[v], np.asarray(one_pass)[v], rtol=1e-6)


def test_loss_and_gradients_of_the_model_do_not_depend_on_the_chunking():
    config = tiny.get_config()
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(0), config.data.image_size)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    batch = make_batch(config, 2)
    keys = jax.random.split(jax.random.key(1), 2)

    def run(chunk, remat):
        cfg = tiny.get_config()
        cfg.model.roi.mask_head_chunk = chunk
        cfg.model.roi.mask_head_remat = remat
        loss_fn = losses.make_loss_fn(model, cfg.model, cfg.data.image_size)
        fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, state, batch, keys), has_aux=True))
        (total, (metrics, _)), grads = fn(params)
        return total, metrics, grads

    total0, metrics0, grads0 = run(0, False)
    assert config.model.roi.mask_head_chunk < config.model.roi.max_mask_rois
    # The training default, blocks under remat (blocks without it: the unit test above).
    for remat in (True,):
        total, metrics, grads = run(config.model.roi.mask_head_chunk, remat)
        np.testing.assert_allclose(metrics["loss_mask"], metrics0["loss_mask"], rtol=1e-5)
        np.testing.assert_allclose(total, total0, rtol=1e-5)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
            np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6)


def test_predicted_masks_do_not_depend_on_the_chunking():
    config = tiny.get_config()
    config.model.test.score_threshold = 0.0  # random weights: let detections through
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(0), config.data.image_size)
    batch = make_batch(config, 2)
    results = {}
    for chunk in (0, 3):  # 3 does not divide the 10 detections (the config's 5 does)
        cfg = tiny.get_config()
        cfg.model.test.score_threshold = 0.0
        cfg.model.test.mask_head_chunk = chunk
        predict_fn = inference.make_predict_fn(model, cfg.model, cfg.data.image_size)
        results[chunk] = jax.device_get(
            predict_fn(variables, batch["images"], batch["image_sizes"])
        )
    ref = results[0]
    v = np.asarray(ref.valid)
    assert v.any()
    for chunk in (3,):
        out = results[chunk]
        np.testing.assert_array_equal(out.valid, ref.valid)
        np.testing.assert_allclose(out.masks[v], ref.masks[v], rtol=1e-5, atol=1e-6)
