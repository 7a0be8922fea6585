"""RPN head, box head and mask head against plain numpy references (PyTorch layer definitions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from mrcnn_jax.modeling.heads import (
    BoxHead,
    Deconv2x2,
    MaskHead,
    deconv2x2_stride2,
    deconv_kernel_from_torch,
    fc6_kernel_from_chw,
)
from mrcnn_jax.modeling.rpn import RPNHead


def np_conv_same(x, w, b):
    """PyTorch Conv2d, stride 1, padding k // 2 (odd k), NHWC / HWIO, with bias."""
    k = w.shape[0]
    p = k // 2
    h, wd = x.shape[1:3]
    x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros(x.shape[:1] + (h, wd, w.shape[3]))
    for a in range(k):
        for c in range(k):
            out += x[:, a : a + h, c : c + wd] @ w[a, c]
    return out + b


def np_conv_transpose2d(x_nchw, w, b, stride):
    """torch.nn.ConvTranspose2d(padding=0) by its definition: every input pixel scatters
    x[n, c, i, j] * W[c, o, a, b] onto out[n, o, i * stride + a, j * stride + b]."""
    n, c_in, h, wd = x_nchw.shape
    _, c_out, kh, kw = w.shape
    out = np.zeros((n, c_out, (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for i in range(h):
        for j in range(wd):
            for a in range(kh):
                for bb in range(kw):
                    out[:, :, i * stride + a, j * stride + bb] += (
                        x_nchw[:, :, i, j] @ w[:, :, a, bb]
                    )
    return out + b[None, :, None, None]


def relu(x):
    return np.maximum(x, 0.0)


def randomize(params, seed, scale=0.3):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda a: (scale * rng.randn(*a.shape)).astype(np.float32), params)


def np_tree(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------------------------------------------ RPN


def test_rpn_flatten_order_matches_reference_loop():
    rng = np.random.RandomState(0)
    a, c, b = 3, 8, 2
    levels = [rng.randn(b, h, w, c).astype(np.float32) for h, w in [(4, 6), (2, 3), (1, 2)]]
    head = RPNHead(num_anchors=a, channels=c)
    params = randomize(head.init(jax.random.key(0), levels)["params"], 1)
    logits, deltas = head.apply({"params": params}, levels)
    n = sum(h * w * a for h, w in [(4, 6), (2, 3), (1, 2)])
    assert logits.shape == (b, n) and deltas.shape == (b, n, 4)

    p = np_tree(params)
    ref_logits, ref_deltas = [], []
    for level in levels:  # (level, y, x, anchor), anchor-major 4A channels
        t = relu(np_conv_same(level.astype(np.float64), p["conv"]["kernel"], p["conv"]["bias"]))
        obj = np_conv_same(t, p["objectness"]["kernel"], p["objectness"]["bias"])
        dlt = np_conv_same(t, p["deltas"]["kernel"], p["deltas"]["bias"])
        for y in range(level.shape[1]):
            for x in range(level.shape[2]):
                for k in range(a):
                    ref_logits.append(obj[:, y, x, k])
                    ref_deltas.append(dlt[:, y, x, 4 * k : 4 * k + 4])
    np.testing.assert_allclose(logits, np.stack(ref_logits, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(deltas, np.stack(ref_deltas, 1), rtol=1e-4, atol=1e-4)

    # A dict of levels is read in key order p2, p3, ...: the same result.
    as_dict = {"p4": levels[2], "p2": levels[0], "p3": levels[1]}
    logits_d, deltas_d = head.apply({"params": params}, as_dict)
    np.testing.assert_array_equal(logits_d, logits)
    np.testing.assert_array_equal(deltas_d, deltas)


def test_rpn_init_and_bfloat16():
    levels = [jnp.ones((1, 4, 4, 64)), jnp.ones((1, 2, 2, 64))]
    head = RPNHead(num_anchors=3, channels=64, dtype=jnp.bfloat16)
    variables = head.init(jax.random.key(0), levels)
    params = variables["params"]
    assert params["objectness"]["kernel"].shape == (1, 1, 64, 3)
    assert params["deltas"]["kernel"].shape == (1, 1, 64, 12)
    np.testing.assert_allclose(np.std(params["conv"]["kernel"]), 0.01, rtol=0.05)
    assert all(not np.any(params[k]["bias"]) for k in params)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    logits, deltas = head.apply(variables, levels)
    assert logits.dtype == deltas.dtype == jnp.bfloat16
    assert logits.shape == (1, 60) and deltas.shape == (1, 60, 4)


# ------------------------------------------------------------------ box head


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(1, 6),
    pool=st.integers(1, 4),
    out=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_fc6_kernel_from_chw_gives_the_same_outputs(channels, pool, out, seed):
    rng = np.random.RandomState(seed)
    w = rng.randn(out, channels * pool * pool)  # torch Linear [out, in] over (C, H, W)
    x = rng.randn(3, pool, pool, channels)  # NHWC pooled features
    torch_out = x.transpose(0, 3, 1, 2).reshape(3, -1) @ w.T
    ours = x.reshape(3, -1) @ fc6_kernel_from_chw(w, channels, pool)
    np.testing.assert_allclose(ours, torch_out, rtol=1e-10, atol=1e-10)


def test_fc6_kernel_from_chw_rejects_wrong_sizes():
    with pytest.raises(ValueError):
        fc6_kernel_from_chw(np.zeros((4, 49)), channels=2, pool=5)


def test_box_head_matches_torch_style_reference():
    rng = np.random.RandomState(0)
    r, pool, c, fc, k = 5, 7, 4, 16, 3
    # torch-layout weights: Linear [out, in], fc6 over (C, H, W)-flattened input.
    w6, b6 = 0.1 * rng.randn(fc, c * pool * pool), 0.1 * rng.randn(fc)
    w7, b7 = 0.3 * rng.randn(fc, fc), 0.1 * rng.randn(fc)
    wc, bc = 0.3 * rng.randn(k + 1, fc), 0.1 * rng.randn(k + 1)
    wb, bb = 0.3 * rng.randn(4 * (k + 1), fc), 0.1 * rng.randn(4 * (k + 1))
    params = {
        "fc6": {"kernel": fc6_kernel_from_chw(w6, c, pool), "bias": b6},
        "fc7": {"kernel": w7.T, "bias": b7},
        "cls_score": {"kernel": wc.T, "bias": bc},
        "bbox_pred": {"kernel": wb.T, "bias": bb},
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = rng.randn(r, pool, pool, c).astype(np.float32)
    head = BoxHead(num_classes=k, fc_dim=fc)
    init_shapes = jax.tree.map(jnp.shape, head.init(jax.random.key(0), x)["params"])
    assert init_shapes == jax.tree.map(jnp.shape, params)
    scores, deltas = head.apply({"params": params}, x)

    h = relu(x.transpose(0, 3, 1, 2).reshape(r, -1) @ w6.T + b6)
    h = relu(h @ w7.T + b7)
    np.testing.assert_allclose(scores, h @ wc.T + bc, rtol=1e-4, atol=1e-4)
    # torchvision's bbox_pred is class-major: output 4 * cls + j is delta j of class cls.
    np.testing.assert_allclose(deltas, (h @ wb.T + bb).reshape(r, k + 1, 4), rtol=1e-4, atol=1e-4)


def test_box_head_init_shapes_and_bfloat16():
    x = jnp.ones((2, 6, 7, 7, 8))  # leading [B, R]
    head = BoxHead(num_classes=5, fc_dim=512)
    params = head.init(jax.random.key(0), x)["params"]
    scores, deltas = head.apply({"params": params}, x)
    assert scores.shape == (2, 6, 6) and deltas.shape == (2, 6, 6, 4)
    # detectron2 init: cls normal(0.01), bbox normal(0.001), fc xavier_fill, biases 0.
    np.testing.assert_allclose(np.std(params["cls_score"]["kernel"]), 0.01, rtol=0.1)
    np.testing.assert_allclose(np.std(params["bbox_pred"]["kernel"]), 0.001, rtol=0.1)
    np.testing.assert_allclose(np.std(params["fc7"]["kernel"]), np.sqrt(1 / 512), rtol=0.05)
    assert all(not np.any(params[k]["bias"]) for k in params)
    scores16, deltas16 = BoxHead(5, 512, dtype=jnp.bfloat16).apply({"params": params}, x)
    assert scores16.dtype == deltas16.dtype == jnp.bfloat16


# ------------------------------------------------------------------ mask head


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_deconv_matches_pytorch_conv_transpose(n, h, w, c_in, c_out, seed):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, h, w, c_in).astype(np.float32)
    weight = rng.randn(c_in, c_out, 2, 2).astype(np.float32)  # torch ConvTranspose2d layout
    bias = rng.randn(c_out).astype(np.float32)
    params = {"kernel": deconv_kernel_from_torch(weight), "bias": bias}
    out = Deconv2x2(c_out).apply({"params": params}, x)
    ref = np_conv_transpose2d(x.transpose(0, 3, 1, 2).astype(np.float64), weight, bias, 2)
    assert out.shape == (n, 2 * h, 2 * w, c_out)
    np.testing.assert_allclose(out, ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_deconv_gradient():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 3, 3, 4))
    kernel = jnp.asarray(rng.randn(2, 2, 4, 5))
    with jax.enable_x64():
        check_grads(
            deconv2x2_stride2,
            (x.astype(jnp.float64), kernel.astype(jnp.float64)),
            order=1,
            modes=["rev"],
        )


def test_mask_head_matches_numpy_reference():
    rng = np.random.RandomState(0)
    r, c, dim, k = 3, 4, 8, 2
    x = rng.randn(r, 14, 14, c).astype(np.float32)
    head = MaskHead(num_classes=k, num_convs=2, conv_dim=dim)
    params = randomize(head.init(jax.random.key(0), x)["params"], 1, scale=0.2)
    out = head.apply({"params": params}, x)
    assert out.shape == (r, 28, 28, k + 1)

    p = np_tree(params)
    y = x.astype(np.float64)
    for i in (1, 2):
        y = relu(np_conv_same(y, p[f"mask_fcn{i}"]["kernel"], p[f"mask_fcn{i}"]["bias"]))
    torch_w = p["deconv"]["kernel"].transpose(2, 3, 0, 1)  # ours -> torch [C_in, C_out, 2, 2]
    y = np_conv_transpose2d(y.transpose(0, 3, 1, 2), torch_w, p["deconv"]["bias"], 2)
    y = relu(y.transpose(0, 2, 3, 1))
    ref = np_conv_same(y, p["predictor"]["kernel"], p["predictor"]["bias"])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_mask_head_class_logits_are_the_class_channel_with_the_same_gradients():
    # With classes the predictor computes only each RoI's class channel (MaskPredictor): the
    # values and every parameter's gradient are those of picking that channel from all of them.
    rng = np.random.RandomState(1)
    k, c = 4, 6
    x = jnp.asarray(rng.randn(2, 3, 14, 14, c), jnp.float32)  # leading [B, R]
    classes = jnp.asarray([[0, 4, 2], [2, 2, 1]], jnp.int32)
    targets = jnp.asarray(rng.rand(2, 3, 28, 28) > 0.5, jnp.float32)
    head = MaskHead(num_classes=k, num_convs=2, conv_dim=8)
    params = randomize(head.init(jax.random.key(0), x)["params"], 2, scale=0.2)
    picked = lambda p: jnp.take_along_axis(
        head.apply({"params": p}, x), classes[..., None, None, None], axis=-1
    )[..., 0]
    selected = lambda p: head.apply({"params": p}, x, classes)
    assert selected(params).shape == (2, 3, 28, 28)
    np.testing.assert_allclose(selected(params), picked(params), rtol=1e-5, atol=1e-6)

    loss = lambda f: lambda p: jnp.sum(jax.nn.sigmoid(f(p)) * targets)
    g_pick, g_sel = jax.grad(loss(picked))(params), jax.grad(loss(selected))(params)
    for a, b in zip(jax.tree.leaves(g_sel), jax.tree.leaves(g_pick), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # Only the classes used get a predictor gradient.
    used = np.zeros(k + 1, bool)
    used[np.asarray(classes).ravel()] = True
    assert np.all(np.asarray(g_sel["predictor"]["bias"])[~used] == 0)
    assert np.all(np.asarray(g_sel["predictor"]["bias"])[used] != 0)
    with pytest.raises(ValueError, match="classes"):
        head.apply({"params": params}, x, classes[:, :2])


def test_mask_head_gradient_runs():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 14, 14, 4), jnp.float32)
    head = MaskHead(num_classes=3, num_convs=1, conv_dim=8)
    params = head.init(jax.random.key(0), x)["params"]
    loss = lambda p, x: jnp.sum(jax.nn.sigmoid(head.apply({"params": p}, x)) ** 2)
    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert jax.tree.map(jnp.shape, g_params) == jax.tree.map(jnp.shape, params)
    assert g_x.shape == x.shape
    for g in jax.tree.leaves((g_params, g_x)):
        assert np.all(np.isfinite(g))
    assert np.any(np.asarray(g_params["deconv"]["kernel"]) != 0)


def test_mask_head_init_and_bfloat16():
    x = jnp.ones((2, 3, 14, 14, 16))  # leading [B, R]
    head = MaskHead(num_classes=4, num_convs=4, conv_dim=64, dtype=jnp.bfloat16)
    variables = head.init(jax.random.key(0), x)
    params = variables["params"]
    assert set(params) == {
        "mask_fcn1",
        "mask_fcn2",
        "mask_fcn3",
        "mask_fcn4",
        "deconv",
        "predictor",
    }
    out = head.apply(variables, x)
    assert out.shape == (2, 3, 28, 28, 5) and out.dtype == jnp.bfloat16
    # The predictor's parameters are those of the 1x1 nn.Conv it replaced (checkpoints, convert).
    assert params["predictor"]["kernel"].shape == (1, 1, 64, 5)
    assert params["predictor"]["bias"].shape == (5,)
    one = head.apply(variables, x, jnp.ones((2, 3), jnp.int32))
    assert one.shape == (2, 3, 28, 28) and one.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    # c2_msra_fill: std sqrt(2 / fan_out); torch's fan_out of a ConvTranspose2d weight
    # [C_in, C_out, 2, 2] is 4 * C_in.
    np.testing.assert_allclose(
        np.std(params["mask_fcn2"]["kernel"]), np.sqrt(2 / (9 * 64)), rtol=0.05
    )
    np.testing.assert_allclose(np.std(params["predictor"]["kernel"]), 0.001, rtol=0.15)
    assert all(not np.any(params[k]["bias"]) for k in params)


def test_deconv_init_uses_torch_fan_out():
    deconv = Deconv2x2(16)
    kernel = deconv.init(jax.random.key(0), jnp.ones((1, 2, 2, 256)))["params"]["kernel"]
    assert kernel.shape == (2, 2, 256, 16)
    # 4 * C_in = 1024 (torch), not 4 * C_out = 64.
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / 1024), rtol=0.05)
