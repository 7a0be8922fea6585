"""Convolution with its weight gradient computed as dense matmuls.

XLA:CPU's convolution weight gradients run at 2-15 GFLOP/s on the 2-core machine, against
100-150 GFLOP/s for forward convolutions (docs/performance.md: the RPN head's 3x3 weight gradient
on P2 alone took 9.4 s of a 24 s R50-FPN train step). The same gradient is a sum over the kh*kw
kernel taps of `x_tap^T @ dy`, one [C, N*OH*OW] x [N*OH*OW, O] matmul each:

    dW[a, b] = xpad[:, a::s, b::s, :][:, :OH, :OW].reshape(-1, C).T @ dy.reshape(-1, O)

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's `nn.Conv(...,
conv_general_dilated=...)` hook): NHWC / HWIO convolutions with explicit padding, no dilation and
no groups keep XLA's forward pass, take the matmul weight gradient and an input gradient written
as plain stride-1 convolutions (`_input_grad`; at stride > 1 one per phase of the input grid,
`_strided_input_grad`), and evaluate an unpadded 1x1 convolution as a matmul when it is not being
differentiated or has at most NARROW_OUTPUTS outputs (`_pointwise`), its gradients as two matmuls
from the input pixels it read when it is (`_pointwise_bwd`); anything else goes to
`lax.conv_general_dilated` unchanged. Parameters and outputs are the same, gradients
agree to float round-off (tests/ops/test_conv.py).

Which weight gradient is used is decided when a function is traced, from the environment variable
`MRCNN_JAX_CONV_WEIGHT_GRAD`: `auto` (the default: the matmul form on the CPU backend only, where
it wins; GPUs and TPUs keep their native convolution kernels), `matmul` or `xla` (force one).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# 1x1 convolutions with at most this many outputs are matmuls in training too (`conv_nhwc`).
NARROW_OUTPUTS = 64
ENV_VAR = "MRCNN_JAX_CONV_WEIGHT_GRAD"


def matmul_weight_grad_enabled() -> bool:
    """Whether functions traced now take the matmul weight gradient (see the module docstring)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    if mode == "auto":
        return jax.default_backend() == "cpu"
    if mode in ("matmul", "xla"):
        return mode == "matmul"
    raise ValueError(f"{ENV_VAR}={mode!r}: expected auto, matmul or xla")


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _read_pixels(x, strides):
    """The input pixels an unpadded 1x1 convolution reads: x[:, ::sh, ::sw, :]."""
    sh, sw = strides
    return x[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else x


def _pointwise(x, w, strides):
    """A 1x1 convolution without padding as one [N*OH*OW, C] x [C, O] matmul: XLA:CPU runs it
    2-3x faster than its own 1x1 convolution on the P2 / C2 maps (docs/performance.md)."""
    x = _read_pixels(x, strides)
    n, h, w_, c = x.shape
    y = jnp.dot(x.reshape(n * h * w_, c), w.reshape(c, -1), preferred_element_type=x.dtype)
    return y.reshape(n, h, w_, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x: jnp.ndarray, w: jnp.ndarray, strides, padding) -> jnp.ndarray:
    """x: [N, H, W, C], w: [kh, kw, C, O], strides (sh, sw), padding ((lo, hi), (lo, hi)).

    Evaluated without differentiation (inference), an unpadded 1x1 convolution is a matmul
    (`_pointwise`); under differentiation `_fwd` keeps XLA's convolution unless the output is
    narrow: with the matmul in the whole training step, the R50-FPN step's temporaries grew by
    550-640 MiB for at most 3% of speed on the 2-core CPU (docs/performance.md, change 9 and
    "Tried in the fourth round"), while the RPN's objectness (A) and deltas (4A) convolutions,
    whose input is kept for their weight gradient anyway, ran at 4-6 GFLOP/s as convolutions
    (0.34 s of the step on P2) and take no extra memory as matmuls."""
    if _is_pointwise(x, w, padding):
        return _pointwise(x, w, strides)
    return _conv(x, w, strides, padding)


def _is_pointwise(x, w, padding) -> bool:
    return w.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding) and x.dtype == w.dtype


def _fwd(x, w, strides, padding):
    if not _is_pointwise(x, w, padding):
        return _conv(x, w, strides, padding), (x, w)
    y = _pointwise(x, w, strides) if w.shape[3] <= NARROW_OUTPUTS else _conv(x, w, strides, padding)
    # A 1x1 convolution's gradients need only the input pixels it reads: keep x[:, ::s, ::s]
    # (a quarter of x at stride 2) and x's height and width in a zero-byte array. Kept whole,
    # the strided slice in the backward pass let XLA:CPU recompute a fused chain of elementwise
    # producers there (the whole residual chain of a ResNet stage), holding every convolution
    # output of that chain alive until the backward pass (docs/performance.md, change 11).
    return y, (_read_pixels(x, strides), w, jnp.zeros((x.shape[1], x.shape[2], 0), x.dtype))


def _input_grad(x, w, strides, padding, g):
    """dx of the convolution. Stride 1 with 'same'-like padding (0 <= pad <= k - 1): a plain
    NHWC / HWIO convolution of g with the flipped kernel, its in / out channels swapped, and
    padding k - 1 - pad; stride > 1: `_strided_input_grad`. Written out rather than left to
    XLA's transpose rule, whose kernel-layout convolution (b01f_01oi) XLA:CPU does not hand to
    its fast convolution library inside a conditional (the chunked mask head,
    inference.mask_head_on_valid): 37 against ~150 GFLOP/s. Padding beyond k - 1: the
    transpose rule."""
    sizes = w.shape[:2]
    same_like = all(
        0 <= p <= k - 1 for (lo, hi), k in zip(padding, sizes, strict=True) for p in (lo, hi)
    )
    if not same_like:
        return jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)[1](g)[0]
    if tuple(strides) != (1, 1):
        return _strided_input_grad(x.shape, w, strides, padding, g).astype(x.dtype)
    w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
    pads = tuple((k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(padding, sizes, strict=True))
    return _conv(g, w_t, (1, 1), pads).astype(x.dtype)


def _phase(size: int, out_size: int, k: int, s: int, lo: int, r: int):
    """One axis of `_strided_input_grad` for the kernel taps t = r, r + s, ...: (number of taps
    m, the first input position i0 they reach, how many positions n, the (low, high) padding of
    g that makes their dx a 'valid' correlation with the flipped taps)."""
    m = -(-(k - r) // s)
    q0 = -(-(lo - r) // s)  # first q with i = s q + r - lo >= 0
    n = (size - 1 + lo - r) // s - q0 + 1
    low = m - 1 - q0
    return m, s * q0 + r - lo, n, (low, n + m - 1 - out_size - low)


def _strided_input_grad(x_shape, w, strides, padding, g):
    """dx of a strided convolution as s_h * s_w stride-1 convolutions of g, one per phase of the
    input grid (sub-pixel decomposition), interleaved. The forward pass reads
    x[s o + t - lo] w[t]; the input pixels i = s q + r - lo of one phase r get
    sum_m g[q - m] w[r + s m], a plain correlation of g with the taps w[r::s] flipped. Same
    products as XLA's transpose rule (a convolution of g dilated with zeros, which XLA:CPU runs
    outside its fast library: the 3x3 stride-2 input gradient of res3's first block took 0.36 s
    of the R50-FPN train step, 25 GFLOP/s), without the multiplications by the inserted zeros."""
    n, h, w_, c = x_shape
    kh, kw = w.shape[:2]
    (sh, sw), (oh, ow) = strides, g.shape[1:3]
    # grid[iy][ix]: the phase whose first input row / column is iy / ix, which fills rows
    # iy, iy + s, ... (padded to ph x pw for the interleave).
    ph, pw = -(-h // sh), -(-w_ // sw)
    grid = [[None] * sw for _ in range(sh)]
    for ry in range(sh):
        my, iy, ny, py = _phase(h, oh, kh, sh, padding[0][0], ry)
        for rx in range(sw):
            mx, ix, nx, px = _phase(w_, ow, kw, sw, padding[1][0], rx)
            if my <= 0 or mx <= 0 or ny <= 0 or nx <= 0:  # no tap reaches these pixels
                part = jnp.zeros((n, max(ny, 0), max(nx, 0), c), g.dtype)
            else:
                # The phase's taps, flipped, in / out swapped: [my, mx, O, C].
                taps = jnp.swapaxes(jnp.flip(w[ry::sh, rx::sw], (0, 1)), 2, 3)
                gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (*py, 0), (*px, 0), (0, 0, 0)))
                part = _conv(gp, taps, (1, 1), ((0, 0), (0, 0)))
            pad = ((0, 0), (0, ph - part.shape[1]), (0, pw - part.shape[2]), (0, 0))
            grid[iy][ix] = jnp.pad(part, pad)
    dx = jnp.stack([jnp.stack(row, axis=3) for row in grid], axis=2)  # [N, ph, sh, pw, sw, C]
    return dx.reshape(n, ph * sh, pw * sw, c)[:, :h, :w_]


def _pointwise_bwd(strides, residuals, g):
    """(dx, dW) of a 1x1 convolution from the pixels it read (`_fwd`): two matmuls, dx spread
    back onto the input grid with zeros in between (interior padding) at stride > 1."""
    x_read, w, size = residuals
    c, o = w.shape[2], w.shape[3]
    n, oh, ow, _ = g.shape
    g2 = g.reshape(-1, o)
    dx = jnp.dot(g2, w.reshape(c, o).T, preferred_element_type=x_read.dtype)
    dx = dx.reshape(n, oh, ow, c)
    (h, w_), (sh, sw) = size.shape[:2], strides
    if (sh, sw) != (1, 1):
        zero = jnp.zeros((), dx.dtype)
        dx = lax.pad(
            dx,
            zero,
            ((0, 0, 0), (0, h - (oh - 1) * sh - 1, sh - 1), (0, w_ - (ow - 1) * sw - 1, sw - 1),
             (0, 0, 0)),
        )
    dw = jnp.einsum("mc,mo->co", x_read.reshape(-1, c), g2, preferred_element_type=jnp.float32)
    return dx, dw.reshape(w.shape).astype(w.dtype)


def _bwd(strides, padding, residuals, g):
    if len(residuals) == 3:
        return _pointwise_bwd(strides, residuals, g)
    x, w = residuals
    dx = _input_grad(x, w, strides, padding, g)
    kh, kw, c, o = w.shape
    n, oh, ow, _ = g.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    g2 = g.reshape(-1, o)

    # One tap at a time (a scan, not kh * kw independent slices), so at most one copy of the
    # input is alive: unrolled, XLA kept all of them and the train step's temporaries doubled.
    if (sh, sw) == (1, 1):
        # Channels first, each tap is a [C, N*OH*OW] x [N*OH*OW, O] matmul that XLA:CPU gives to
        # YNNPACK (~375 GFLOP/s); x^T @ dy with the tap in NHWC contracts the lhs' major dimension
        # and went to Eigen (~230). The transpose rides on the padding copy and each tap's slice
        # is a copy either way (docs/performance.md, change 13).
        xt = jnp.transpose(xp, (3, 0, 1, 2))

        def tap_grad(_, ab):
            window = lax.dynamic_slice(xt, (0, 0, ab[0], ab[1]), (c, n, oh, ow))
            return None, jnp.dot(window.reshape(c, -1), g2, preferred_element_type=jnp.float32)

    else:  # strided windows of a channels-first copy were slower (strided minor-dimension reads)
        span = (n, sh * (oh - 1) + 1, sw * (ow - 1) + 1, c)

        def tap_grad(_, ab):
            window = lax.dynamic_slice(xp, (0, ab[0], ab[1], 0), span)
            tap = window[:, ::sh, ::sw, :].reshape(-1, c)
            return None, jnp.einsum("mc,mo->co", tap, g2, preferred_element_type=jnp.float32)

    if kh * kw == 1:
        dw = tap_grad(None, jnp.zeros((2,), jnp.int32))[1][None]
    else:
        offsets = jnp.array([(a, b) for a in range(kh) for b in range(kw)], jnp.int32)
        dw = lax.scan(tap_grad, None, offsets)[1]
    return dx, dw.reshape(kh, kw, c, o).astype(w.dtype)


conv_nhwc.defvjp(_fwd, _bwd)


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return (
            tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
            and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
            and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2)
        )
    return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    **kwargs,
):
    """`lax.conv_general_dilated` with the matmul weight gradient where it applies (see above)."""
    plain = all(d is None or all(v == 1 for v in d) for d in (lhs_dilation, rhs_dilation))
    if padding == "VALID" or (padding == "SAME" and rhs.shape[0] == rhs.shape[1] == 1):
        padding = ((0, 0), (0, 0))  # flax's default for 1x1 convs
    if (
        matmul_weight_grad_enabled()
        and lhs.ndim == 4
        and plain
        and feature_group_count == 1
        and not isinstance(padding, str)
        and _is_nhwc(dimension_numbers)
    ):
        pads = tuple(tuple(int(v) for v in p) for p in padding)
        return conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), pads)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        **kwargs,
    )
