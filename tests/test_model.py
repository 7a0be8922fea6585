"""The assembled model: shapes, finite losses, gradient flow, fixed-shape inference, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mrcnn_jax import inference, losses, mask_rcnn
from mrcnn_jax.data.synthetic import make_batch


@pytest.fixture(scope="module")
def setup():
    config = tiny.get_config()
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(0), config.data.image_size)
    return config, model, variables


def _split(variables):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    return params, state


def _keys(n, seed=1):
    return jax.random.split(jax.random.key(seed), n)


def test_eval_shape_of_init_loss_and_predict(setup):
    config, model, _ = setup
    size = config.data.image_size
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *size, 3))), jax.random.key(0))
    assert set(shapes["params"]) == {"backbone", "fpn", "rpn_head", "box_head", "mask_head"}
    params, state = _split(shapes)
    batch = make_batch(config, 2)
    loss_fn = losses.make_loss_fn(model, config.model, size)
    total, (metrics, _) = jax.eval_shape(loss_fn, params, state, batch, _keys(2))
    assert total.shape == () and metrics["loss_mask"].shape == ()
    dets = jax.eval_shape(
        lambda v, i, s: inference.predict(
            v, i, s, jnp.zeros((sum(inference.anchors_for(config.model, size)[1]), 4)),
            model=model, model_cfg=config.model,
            level_counts=inference.anchors_for(config.model, size)[1],
        ),
        shapes, batch["images"], batch["image_sizes"],
    )
    d = config.model.test.detections_per_image
    m = config.model.roi.mask_size
    assert dets.boxes.shape == (2, d, 4) and dets.masks.shape == (2, d, m, m)


def test_losses_finite_positive_and_weighted_by_the_config(setup):
    """Every term is finite and positive; model.loss_weights scales each term of the total (and
    its logged metric), on top of rpn.loss_weight for the RPN's. One compile of the default and
    the weighted loss on the same batch and keys."""
    config, model, variables = setup
    params, state = _split(variables)
    plain = losses.make_loss_fn(model, config.model, config.data.image_size)
    weights = {"rpn_cls": 2.0, "rpn_box": 0.5, "cls": 0.0, "box": 3.0, "mask": 1.5}
    other = config.model.copy_and_resolve_references()  # the loss reads its config when traced
    other.loss_weights.update(weights)
    other.rpn.loss_weight = 2.0  # detectron2's RPN.LOSS_WEIGHT: on both RPN terms
    weighed = losses.make_loss_fn(model, other, config.data.image_size)
    both = jax.jit(lambda *a: (plain(*a), weighed(*a)))
    (total, (m, _)), (total_w, (m_w, _)) = both(params, state, make_batch(config, 2), _keys(2))
    for term, w in weights.items():
        name = f"loss_{term}"
        assert np.isfinite(m[name]) and m[name] > 0, name
        w = w * (2.0 if term.startswith("rpn") else 1.0)
        np.testing.assert_allclose(m_w[name], w * m[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(total, sum(float(m[f"loss_{t}"]) for t in weights), rtol=1e-5)
    np.testing.assert_allclose(total_w, sum(float(m_w[f"loss_{t}"]) for t in weights), rtol=1e-5)
    assert m["num_pos_anchors"] > 0 and m["num_fg_rois"] > 0


def test_gradients_reach_trainable_not_frozen():
    config = tiny.get_config()
    config.model.norm = "frozen_bn"
    config.model.freeze_at = 2
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(0), config.data.image_size)
    params, state = _split(variables)
    loss_fn = losses.make_loss_fn(model, config.model, config.data.image_size)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, state, make_batch(config, 2), _keys(2))[0]))(
        params
    )
    mask = mask_rcnn.trainable_mask(params, config.model)
    flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
    flat_m = jax.tree.leaves(mask)
    assert len(flat_g) == len(flat_m)
    for (path, g), trainable in zip(flat_g, flat_m, strict=True):
        name = jax.tree_util.keystr(path)
        if trainable:
            assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {name}"
    frozen = [jax.tree_util.keystr(p) for (p, _), t in zip(flat_g, flat_m, strict=True) if not t]
    assert any("conv1" in f for f in frozen) and any("layer1" in f for f in frozen)
    assert not any("layer2" in f for f in frozen)
    assert "batch_stats" in state and "batch_stats" not in params


def test_inference_fixed_size_and_no_recompile(setup):
    config, model, variables = setup
    predict_fn = inference.make_predict_fn(model, config.model, config.data.image_size)
    d = config.model.test.detections_per_image
    traces = []
    orig = inference.predict

    def counting(*args, **kwargs):
        traces.append(1)
        return orig(*args, **kwargs)

    inference.predict = counting
    try:
        predict_fn = inference.make_predict_fn(model, config.model, config.data.image_size)
        for seed in range(3):
            batch = make_batch(config, 2, seed=seed)
            dets = predict_fn(variables, batch["images"], batch["image_sizes"])
            assert dets.boxes.shape == (2, d, 4) and dets.valid.shape == (2, d)
            assert dets.masks.shape == (2, d, 28, 28)
            v = np.asarray(dets.valid)
            # valid detections come first, sorted by score
            for b in range(2):
                n = v[b].sum()
                assert v[b, :n].all() and not v[b, n:].any()
                s = np.asarray(dets.scores)[b, :n]
                assert np.all(np.diff(s) <= 0)
    finally:
        inference.predict = orig
    assert len(traces) == 1


def test_loss_does_not_recompile_for_new_instances(setup):
    config, model, variables = setup
    params, state = _split(variables)
    traces = []
    loss_fn = losses.make_loss_fn(model, config.model, config.data.image_size)

    def counted(*args):
        traces.append(1)
        return loss_fn(*args)

    jitted = jax.jit(counted)
    for seed in range(3):  # different counts and positions of instances
        jitted(params, state, make_batch(config, 2, seed=seed, max_shapes=1 + seed), _keys(2))
    assert len(traces) == 1


def test_frozen_stages_per_image_from_the_config():
    config = tiny.get_config()
    config.model.freeze_at = 2
    assert config.model.frozen_stages_per_image == "auto"
    auto = mask_rcnn.build_model(config.model).per_image_stages
    assert auto == (2 if jax.default_backend() == "cpu" else 0)
    # A batch sharded over devices by GSPMD: a loop would run over the global batch.
    assert mask_rcnn.build_model(config.model, sharded_batch=True).per_image_stages == 0
    config.model.frozen_stages_per_image = "on"
    assert mask_rcnn.build_model(config.model).per_image_stages == 2
    config.model.frozen_stages_per_image = "off"
    assert mask_rcnn.build_model(config.model).per_image_stages == 0
    config.model.frozen_stages_per_image = "yes"
    with pytest.raises(ValueError, match="model.frozen_stages_per_image"):
        mask_rcnn.build_model(config.model)


def test_features_and_proposals_of_a_batch(setup):
    """The first half of inference on its own: p2-p6 features and the RPN's proposals, inside
    each image, valid ones first and best first."""
    config, model, variables = setup
    anchors, counts = inference.anchors_for(config.model, config.data.image_size)
    fn = jax.jit(lambda v, i, s: inference.features_and_proposals(
        v, i, s, jnp.asarray(anchors), model=model, model_cfg=config.model, level_counts=counts
    ))
    batch = make_batch(config, 2)
    sizes = np.array([[64, 64], [40, 52]], np.int32)
    feats, props, scores, valid = jax.device_get(fn(variables, batch["images"], sizes))
    assert sorted(feats) == ["p2", "p3", "p4", "p5", "p6"] and feats["p2"].shape[:3] == (2, 16, 16)
    p = config.model.rpn.post_nms_topk_test
    assert props.shape == (2, p, 4) and scores.shape == valid.shape == (2, p)
    for b, (h, w) in enumerate(sizes):
        n = int(valid[b].sum())
        assert n > 0 and valid[b, :n].all() and not valid[b, n:].any()
        assert np.all(np.diff(scores[b, :n]) <= 0)
        box = props[b, :n]
        assert (box[:, 0] >= 0).all() and (box[:, 2] <= w).all() and (box[:, 3] <= h).all()
