"""The matmul weight-gradient convolution equals lax's convolution and its gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from mrcnn_jax.ops import conv as conv_ops

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def _matmul_path(monkeypatch):
    """The matmul weight gradient on any backend, so these tests check it also off the CPU."""
    monkeypatch.setenv(conv_ops.ENV_VAR, "matmul")


def _uses_custom_vjp(fn, *args) -> bool:
    # A fresh function each time: traces are cached per function, and the choice is made when tracing.
    return "custom_vjp" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


@pytest.mark.parametrize(
    "k, stride, pad, hw",
    [(3, 1, 1, 9), (3, 2, 1, 9), (1, 1, 0, 7), (1, 2, 0, 8), (7, 2, 3, 16), (3, 2, 1, 10),
     # 1x1: gradients from the strided input pixels, odd and even sizes (`_pointwise_bwd`)
     (1, 2, 0, 7), (1, 3, 0, 10),
     # stride 1, asymmetric / partial padding (the written-out input gradient), and a padding
     # beyond k - 1 (the transpose rule)
     (3, 1, (0, 2), 9), (5, 1, (1, 3), 11), (3, 1, (3, 0), 8),
     # a padded 1x1 is not pointwise: the general weight gradient with a single tap
     (1, 1, (1, 0), 7)],
)
def test_forward_and_gradients_match_lax(k, stride, pad, hw):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, hw, hw + 1, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
    lo, hi = (pad, pad) if isinstance(pad, int) else pad
    padding = ((lo, hi), (hi, lo))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN)

    def ours(x, w):
        return conv_ops.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN)

    assert _uses_custom_vjp(ours, x, w)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.normal(size=ref(x, w).shape), jnp.float32)
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(x, w)
    g_ours = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * cot), argnums=(0, 1)))(x, w)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_stride_one_weight_gradient_taps_are_channels_first_matmuls():
    # Each tap's dW is [C, M] x [M, O] (the lhs contracted on its minor dimension), the form
    # XLA:CPU hands to YNNPACK; x^T @ dy on an NHWC tap contracts dimension 0 of both.
    x = jnp.ones((2, 6, 7, 5), jnp.float32)
    w = jnp.ones((3, 3, 5, 4), jnp.float32)

    def loss(w):
        return jnp.sum(conv_ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN))

    dots = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append((eqn.params["dimension_numbers"], [v.aval.shape for v in eqn.invars]))
            for param in eqn.params.values():
                if hasattr(param, "jaxpr"):  # a closed jaxpr: the scan body
                    walk(param.jaxpr)

    walk(jax.make_jaxpr(jax.grad(loss))(w).jaxpr)
    taps = [shapes for dims, shapes in dots if dims == (((1,), (0,)), ((), ()))]
    assert taps == [[(5, 2 * 6 * 7), (2 * 6 * 7, 4)]]


@pytest.mark.parametrize(
    "kw", [dict(kernel_size=(3, 3), padding=((1, 1), (1, 1))), dict(kernel_size=(1, 1))]
)
def test_flax_conv_hook_same_params_and_gradients(kw):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
    plain = nn.Conv(3, **kw)
    fast = nn.Conv(3, conv_general_dilated=conv_ops.conv_general_dilated, **kw)
    params = plain.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, params
    )

    def loss(module, p):
        return jnp.sum(jnp.sin(module.apply(p, x)))

    g1 = jax.grad(lambda p: loss(plain, p))(params)
    g2 = jax.grad(lambda p: loss(fast, p))(params)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unsupported_forms_fall_back_to_lax():
    x = jnp.ones((1, 6, 6, 4))
    w = jnp.ones((3, 3, 2, 4))  # grouped
    out = conv_ops.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, feature_group_count=2
    )
    ref = lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, feature_group_count=2
    )
    np.testing.assert_allclose(out, ref)


def test_environment_selects_the_weight_gradient(monkeypatch):
    x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 4, 2))

    def ours(x, w):
        return conv_ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)

    assert _uses_custom_vjp(ours, x, w)
    monkeypatch.setenv(conv_ops.ENV_VAR, "xla")
    assert not _uses_custom_vjp(ours, x, w)
    monkeypatch.setenv(conv_ops.ENV_VAR, "auto")
    assert _uses_custom_vjp(ours, x, w) == (jax.default_backend() == "cpu")
    monkeypatch.setenv(conv_ops.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=conv_ops.ENV_VAR):
        ours(x, w)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_forward_is_a_matmul_and_training_keeps_the_convolution(stride):
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.normal(size=(2, 8, 10, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 1, 5, 7)), jnp.float32)

    def ours(x, w):
        return conv_ops.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=DN)

    ref = lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=DN)
    np.testing.assert_allclose(jax.jit(ours)(x, w), ref, rtol=1e-5, atol=1e-5)
    # Inference: a dot, no convolution. Under differentiation: XLA's convolution forward, except
    # for narrow outputs (the RPN's objectness and deltas), which stay a dot.
    primal = str(jax.make_jaxpr(ours)(x, w))
    assert "dot_general" in primal and "conv_general_dilated" not in primal
    trained = lambda w: str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(ours(x, w))))(w))
    assert "conv_general_dilated" not in trained(w)
    wide = jnp.asarray(rng.normal(size=(1, 1, 5, conv_ops.NARROW_OUTPUTS + 1)), jnp.float32)
    assert "conv_general_dilated" in trained(wide)
    np.testing.assert_allclose(
        jax.grad(lambda w: jnp.sum(jnp.sin(ours(x, w))))(w),
        jax.grad(lambda w: jnp.sum(jnp.sin(lax.conv_general_dilated(
            x, w, (stride, stride), "VALID", dimension_numbers=DN))))(w),
        rtol=1e-4, atol=1e-4,
    )
    # 3x3 convolutions are never turned into matmuls.
    w3 = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
    assert "conv_general_dilated" in str(jax.make_jaxpr(ours)(x, w3))


def test_pointwise_matmul_only_for_matching_dtypes():
    x = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
    w = jnp.ones((1, 1, 3, 2), jnp.float32)
    # Mixed dtypes are refused by lax's convolution; the matmul path must not accept them either,
    # so inference and training see the same function.
    with pytest.raises(TypeError):
        conv_ops.conv_nhwc(x, w, (1, 1), ((0, 0), (0, 0)))


def test_strided_pointwise_keeps_only_the_pixels_it_reads_for_the_gradient():
    # The backward pass of a 1x1 stride-2 convolution needs x[:, ::2, ::2] (and x's size), not
    # x: keeping x let XLA recompute its producers there (docs/performance.md, change 11).
    x = jnp.ones((2, 8, 10, 5), jnp.float32)
    w = jnp.ones((1, 1, 5, 7), jnp.float32)
    _, vjp = jax.vjp(lambda x, w: conv_ops.conv_nhwc(x, w, (2, 2), ((0, 0), (0, 0))), x, w)
    kept = [leaf.shape for leaf in jax.tree.leaves(vjp)]
    assert (2, 4, 5, 5) in kept and x.shape not in kept
    assert sum(int(np.prod(s)) for s in kept) == 2 * 4 * 5 * 5 + 5 * 7


def _input_grad_ref(x_shape, w, stride, padding, g):
    """numpy: dx[i] = sum over (output o, tap t) with s o + t - lo = i of g[o] w[t]^T."""
    dx = np.zeros(x_shape, np.float64)
    (sh, sw), ((ly, _), (lx, _)) = stride, padding
    for oy in range(g.shape[1]):
        for ox in range(g.shape[2]):
            for ty in range(w.shape[0]):
                for tx in range(w.shape[1]):
                    iy, ix = sh * oy + ty - ly, sw * ox + tx - lx
                    if 0 <= iy < x_shape[1] and 0 <= ix < x_shape[2]:
                        dx[:, iy, ix] += g[:, oy, ox] @ w[ty, tx].T
    return dx


@settings(max_examples=40, deadline=None)
@given(
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(2, 3), st.integers(1, 3)),
    pads=st.tuples(*(st.integers(0, 4) for _ in range(4))),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
)
def test_strided_input_gradient_is_the_transpose(k, stride, pads, size):
    # Sub-pixel decomposition (`_strided_input_grad`) against the definition, for any kernel,
    # stride, 'same'-like padding (0 <= pad <= k - 1) and odd / even / tiny sizes. (numpy, not
    # lax's transpose rule: XLA:CPU aborts on some of these tiny shapes.)
    padding = tuple(
        (min(pads[2 * d], k[d] - 1), min(pads[2 * d + 1], k[d] - 1)) for d in range(2)
    )
    h, w_ = (max(s, k_ - p[0] - p[1]) for s, k_, p in zip(size, k, padding, strict=True))
    out = [(n + p[0] + p[1] - k_) // s + 1 for n, k_, p, s in zip((h, w_), k, padding, stride, strict=True)]
    rng = np.random.default_rng(sum(k) + sum(stride) + h * 13 + w_)
    w = rng.normal(size=(*k, 3, 4)).astype(np.float32)
    g = rng.normal(size=(2, *out, 4)).astype(np.float32)
    got = conv_ops._strided_input_grad((2, h, w_, 3), jnp.asarray(w), stride, padding, jnp.asarray(g))
    ref = _input_grad_ref((2, h, w_, 3), w, stride, padding, g)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
