"""FPN against a plain numpy top-down pathway."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling.fpn import FPN, upsample_nearest_x2


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


def np_fpn(feats, params):
    outs, inner = {}, None
    for level in (5, 4, 3, 2):
        lat = np_conv_same(
            feats[f"c{level}"],
            params[f"lateral{level}"]["kernel"],
            params[f"lateral{level}"]["bias"],
        )
        if inner is not None:
            up = np.zeros(lat.shape[:1] + lat.shape[1:3] + inner.shape[3:])
            for i in range(lat.shape[1]):
                for j in range(lat.shape[2]):
                    up[:, i, j] = inner[:, i // 2, j // 2]  # nearest neighbour x2
            lat = lat + up
        inner = lat
        o = params[f"output{level}"]
        outs[f"p{level}"] = np_conv_same(inner, o["kernel"], o["bias"])
    p5 = outs["p5"]
    h6, w6 = (p5.shape[1] - 1) // 2 + 1, (p5.shape[2] - 1) // 2 + 1  # max_pool2d(1, stride 2)
    outs["p6"] = np.stack(
        [np.stack([p5[:, 2 * i, 2 * j] for j in range(w6)], 1) for i in range(h6)], 1
    )
    return outs


def make_feats(h5, w5, channels=(6, 8, 10, 12), batch=2, seed=0):
    rng = np.random.RandomState(seed)
    return {
        f"c{level}": rng.randn(batch, h5 * 2 ** (5 - level), w5 * 2 ** (5 - level), c).astype(
            np.float32
        )
        for level, c in zip((2, 3, 4, 5), channels, strict=True)
    }


@pytest.mark.parametrize("h5, w5", [(2, 2), (3, 5)])
def test_fpn_matches_numpy(h5, w5):
    feats = make_feats(h5, w5)
    fpn = FPN(channels=8)
    variables = fpn.init(jax.random.key(0), feats)
    # Random biases too, so their wiring is checked.
    rng = np.random.RandomState(1)
    params = jax.tree.map(
        lambda a: a + 0.1 * rng.randn(*a.shape).astype(np.float32), variables["params"]
    )
    out = fpn.apply({"params": params}, feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for level in (2, 3, 4, 5):
        s = 2 ** (5 - level)
        assert out[f"p{level}"].shape == (2, h5 * s, w5 * s, 8)
    assert out["p6"].shape == (2, (h5 + 1) // 2, (w5 + 1) // 2, 8)
    ref = np_fpn(
        {k: v.astype(np.float64) for k, v in feats.items()},
        jax.tree.map(lambda a: np.asarray(a, np.float64), params),
    )
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-4, err_msg=k)
    np.testing.assert_array_equal(out["p6"], out["p5"][:, ::2, ::2])


def test_param_names_and_init():
    feats = make_feats(2, 2, channels=(64, 64, 64, 64), batch=1)
    params = FPN(channels=64).init(jax.random.key(0), feats)["params"]
    assert set(params) == {f"{kind}{lv}" for kind in ("lateral", "output") for lv in (2, 3, 4, 5)}
    assert params["lateral3"]["kernel"].shape == (1, 1, 64, 64)
    assert params["output3"]["kernel"].shape == (3, 3, 64, 64)
    # c2_xavier_fill: U(-b, b), b = sqrt(3 / fan_in) -> std sqrt(1 / fan_in); bias 0.
    k = np.asarray(params["output3"]["kernel"])
    bound = np.sqrt(3.0 / (9 * 64))
    assert np.abs(k).max() <= bound
    np.testing.assert_allclose(k.std(), bound / np.sqrt(3.0), rtol=0.05)
    assert all(not np.any(params[name]["bias"]) for name in params)


def test_mismatched_sizes_raise():
    feats = make_feats(2, 2)
    feats["c4"] = feats["c4"][:, :3]  # 3 rows instead of 4 = 2 x 2
    with pytest.raises(ValueError, match="multiple of 32"):
        jax.eval_shape(lambda: FPN(channels=8).init(jax.random.key(0), feats))


def test_upsample_nearest_x2():
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
    expect = np.array(
        [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    )
    np.testing.assert_array_equal(upsample_nearest_x2(x)[0, ..., 0], expect)


def test_upsample_nearest_x2_gradient_sums_each_block():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.float32)
    g = rng.normal(size=(2, 6, 10, 4)).astype(np.float32)
    _, vjp = jax.vjp(upsample_nearest_x2, x)
    expect = g.reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4))
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], expect, rtol=1e-6, atol=1e-6)
    ref = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # autodiff's own transpose
    np.testing.assert_allclose(jax.vjp(ref, x)[1](jnp.asarray(g))[0], expect, rtol=1e-6, atol=1e-6)
    assert vjp(jnp.asarray(g))[0].dtype == jnp.float32


def test_bfloat16():
    feats = make_feats(2, 2)
    fpn = FPN(channels=8, dtype=jnp.bfloat16)
    variables = fpn.init(jax.random.key(0), feats)
    out = fpn.apply(variables, feats)
    assert all(v.dtype == jnp.bfloat16 for v in out.values())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    ref = FPN(channels=8).apply(variables, feats)
    for k in out:
        np.testing.assert_allclose(np.asarray(out[k], np.float32), ref[k], rtol=0.05, atol=0.05)
