"""RoIAlign against a plain-loop numpy reference of torchvision's kernel (and torchvision itself).

The reference mirrors the kernel's float32 arithmetic; agreement is to 1e-5 absolute (plus 1e-5
relative where huge boxes put sample coordinates far from the origin).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrcnn_jax.ops.roi_align import (
    assign_levels,
    multilevel_roi_align,
    multilevel_roi_align_many,
    roi_align,
)

F32 = np.float32
_roi_align_jit = jax.jit(roi_align, static_argnums=(2, 3, 4, 5, 6))


# ------------------------------------------------------------------ reference (torchvision CPU kernel)
def _bilinear_taps(h, w, y, x):
    """[(row, col, weight)] of one sample point, torchvision's `bilinear_interpolate` border rules."""
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return []
    y, x = max(y, F32(0)), max(x, F32(0))
    y_lo, x_lo = int(y), int(x)
    if y_lo >= h - 1:
        y_hi = y_lo = h - 1
        y = F32(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= w - 1:
        x_hi = x_lo = w - 1
        x = F32(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    hy, hx = 1 - ly, 1 - lx
    return [(y_lo, x_lo, hy * hx), (y_lo, x_hi, hy * lx), (y_hi, x_lo, ly * hx), (y_hi, x_hi, ly * lx)]


def _grid_points(roi_size, out, s, cap):
    """Points per bin side: s, or for s = 0 the kernel's adaptive ceil(roi_size / out) (<= 0: none);
    with a cap, an adaptive count above it becomes (cap + 1) // 2 (our fixed-shape rule)."""
    if s > 0:
        return s
    g = max(int(np.ceil(roi_size / F32(out))), 0)
    return g if cap is None or g <= cap else (cap + 1) // 2


def _roi_taps(h, w, box, out, scale, s, aligned, cap=None):
    """taps[p][q] = [(row, col, weight)] with the 1 / (gy gx) average folded in."""
    off = F32(0.5) if aligned else F32(0)
    x1, y1, x2, y2 = (F32(v) * F32(scale) - off for v in box)
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, F32(1)), max(rh, F32(1))
    bw, bh = rw / F32(out), rh / F32(out)
    gy, gx = _grid_points(rh, out, s, cap), _grid_points(rw, out, s, cap)
    taps = [[[] for _ in range(out)] for _ in range(out)]
    for p in range(out):
        for q in range(out):
            for iy in range(gy):
                y = y1 + F32(p) * bh + F32(iy + 0.5) * bh / F32(gy)
                for ix in range(gx):
                    x = x1 + F32(q) * bw + F32(ix + 0.5) * bw / F32(gx)
                    taps[p][q] += [(r, c, wt / (gy * gx)) for r, c, wt in _bilinear_taps(h, w, y, x)]
    return taps


def roi_align_ref(fmap, boxes, out, scale, s, aligned, cap=None):
    h, w, c = fmap.shape
    res = np.zeros((len(boxes), out, out, c), np.float64)
    for n, box in enumerate(boxes):
        for p, row in enumerate(_roi_taps(h, w, box, out, scale, s, aligned, cap)):
            for q, taps in enumerate(row):
                for r, cc, wt in taps:
                    res[n, p, q] += wt * fmap[r, cc]
    return res


def roi_align_ref_vjp(shape, boxes, out, scale, s, aligned, cot, cap=None):
    """Transpose of the reference: d sum(out * cot) / d features."""
    h, w, _ = shape
    grad = np.zeros(shape, np.float64)
    for n, box in enumerate(boxes):
        for p, row in enumerate(_roi_taps(h, w, box, out, scale, s, aligned, cap)):
            for q, taps in enumerate(row):
                for r, cc, wt in taps:
                    grad[r, cc] += wt * cot[n, p, q]
    return grad


def levels_ref(boxes, lo, hi, eps=1e-8, inside=True):
    out = []
    for x1, y1, x2, y2 in boxes.astype(np.float64):
        a = max(x2 - x1, 0) * max(y2 - y1, 0)
        size = np.sqrt(a) / 224
        with np.errstate(divide="ignore"):
            lvl = 4 + (np.log2(size + eps) if inside else np.log2(size) + eps)
        out.append(int(np.clip(np.floor(lvl), lo, hi)))
    return np.array(out)


# ------------------------------------------------------------------ test data
def _mixed_boxes(rng, img_h, img_w):
    """Random boxes plus the awkward cases: outside, degenerate, inverted, tiny, huge."""
    xy = rng.uniform(-0.2, 0.9, size=(10, 2)) * [img_w, img_h]
    wh = rng.uniform(0.05, 0.6, size=(10, 2)) * [img_w, img_h]
    rand = np.concatenate([xy, xy + wh], axis=1)
    special = [
        [-10, -8, img_w * 0.5, img_h * 0.4],  # partly outside, top-left
        [img_w * 0.6, img_h * 0.5, img_w + 12, img_h + 9],  # partly outside, bottom-right
        [img_w + 5, 2, img_w + 30, 10],  # wholly outside, right
        [-40, -30, -20, -10],  # wholly outside, top-left
        [5, 3, 5, 9],  # zero width
        [4, 6, 11, 6],  # zero height
        [12, 9, 4, 2],  # inverted
        [7.3, 5.1, 7.4, 5.15],  # tiny
        [-5 * img_w, -4 * img_h, 6 * img_w, 5 * img_h],  # huge
        [0, 0, img_w, img_h],  # the whole image
    ]
    return np.concatenate([rand, special]).astype(F32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_roi_align_matches_reference(aligned, s):
    rng = np.random.default_rng(s)
    fmap = rng.normal(size=(11, 14, 3)).astype(F32)
    boxes = _mixed_boxes(rng, 22, 28)  # stride 2
    out = roi_align(jnp.asarray(fmap), jnp.asarray(boxes), 5, 0.5, s, aligned)
    assert out.shape == (len(boxes), 5, 5, 3) and out.dtype == jnp.float32
    # rtol: the huge box puts sample coordinates near 80, where one float32 ulp is 8e-6.
    ref = roi_align_ref(fmap, boxes, 5, 0.5, s, aligned)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_roi_align_outside_boxes_are_zero_and_bf16_kept():
    fmap = np.ones((8, 8, 2), F32)
    boxes = np.array([[40, 40, 60, 60], [-50, -50, -30, -30]], F32)
    out = roi_align(jnp.asarray(fmap, jnp.bfloat16), jnp.asarray(boxes), 3, 0.25, 2, True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, F32), 0.0)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradient_is_transposed_reference(aligned):
    rng = np.random.default_rng(7)
    fmap = rng.normal(size=(9, 10, 2)).astype(F32)
    boxes = _mixed_boxes(rng, 36, 40)  # stride 4
    cot = rng.normal(size=(len(boxes), 3, 3, 2)).astype(F32)
    fn = lambda f: jnp.sum(roi_align(f, jnp.asarray(boxes), 3, 0.25, 2, aligned) * cot)
    grad = jax.grad(fn)(jnp.asarray(fmap))
    ref = roi_align_ref_vjp(fmap.shape, boxes, 3, 0.25, 2, aligned, cot)
    np.testing.assert_allclose(grad, ref, atol=1e-5)
    # The op is linear in the features: a finite difference along a random direction agrees too.
    d = rng.normal(size=fmap.shape).astype(F32)
    fd = (fn(jnp.asarray(fmap + 0.5 * d)) - fn(jnp.asarray(fmap - 0.5 * d)))
    np.testing.assert_allclose(fd, np.sum(ref * d), rtol=1e-4, atol=1e-4)


def _adaptive_points(boxes, out, scale, aligned):
    """The kernel's ceil(roi side / out) per box, the larger of the two axes."""
    off = 0.5 if aligned else 0.0
    b = boxes.astype(F32) * F32(scale) - F32(off)
    sides = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    if not aligned:
        sides = np.maximum(sides, 1)
    return np.ceil(sides / F32(out)).max(axis=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("cap", [1, 2, 3, 6])
def test_adaptive_matches_reference(aligned, cap):
    rng = np.random.default_rng(cap)
    fmap = rng.normal(size=(24, 30, 3)).astype(F32)
    boxes = np.concatenate([_mixed_boxes(rng, 96, 120), _level_spanning_boxes(rng, 10, 96, 120)])
    points = _adaptive_points(boxes, 4, 0.25, aligned)
    assert (points <= cap).any() and (points > cap).any()  # both sides of the cap are exercised
    out = roi_align(jnp.asarray(fmap), jnp.asarray(boxes), 4, 0.25, 0, aligned, cap)
    ref = roi_align_ref(fmap, boxes, 4, 0.25, 0, aligned, cap)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Within the cap it is the uncapped adaptive RoIAlign itself.
    uncapped = roi_align_ref(fmap, boxes, 4, 0.25, 0, aligned)
    within = points <= cap
    np.testing.assert_allclose(np.asarray(out)[within], uncapped[within], rtol=1e-5, atol=1e-5)

    cot = rng.normal(size=out.shape).astype(F32)
    fn = lambda f: jnp.sum(roi_align(f, jnp.asarray(boxes), 4, 0.25, 0, aligned, cap) * cot)
    grad = jax.grad(fn)(jnp.asarray(fmap))
    ref_g = roi_align_ref_vjp(fmap.shape, boxes, 4, 0.25, 0, aligned, cot, cap)
    np.testing.assert_allclose(grad, ref_g, rtol=1e-5, atol=1e-5)


def test_adaptive_multilevel_matches_per_box_reference():
    rng = np.random.default_rng(21)
    img_h, img_w = 128, 192
    feats = _pyramid(rng, img_h, img_w, 2)
    sets = [_level_spanning_boxes(rng, 16, img_h, img_w), _mixed_boxes(rng, img_h, img_w)]
    fs = [jnp.asarray(f) for f in feats]
    outs = multilevel_roi_align_many(fs, [jnp.asarray(b) for b in sets], [3, 5], 0, True,
                                     max_sampling_ratio=4)
    for boxes, size, out in zip(sets, [3, 5], outs, strict=True):
        lv = levels_ref(boxes, 2, 5)
        ref = np.stack([
            roi_align_ref(feats[lv[i] - 2], boxes[i : i + 1], size, 2.0 ** -lv[i], 0, True, 4)[0]
            for i in range(len(boxes))
        ])
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_sampling_ratio must be >= 1"):
        multilevel_roi_align(fs, jnp.asarray(sets[0]), 3, 0, True, max_sampling_ratio=0)
    with pytest.raises(ValueError, match="or 0 \\(adaptive\\)"):
        roi_align(fs[0], jnp.asarray(sets[0]), 3, 0.25, -1, True)


def test_assign_levels_both_conventions():
    # sqrt(area) = 112, 224, 448 sit exactly on level boundaries: eps decides them (3, 4, 5).
    boxes = np.array(
        [[0, 0, 112, 112], [0, 0, 224, 224], [10, 10, 458, 458], [0, 0, 111.9, 112],
         [0, 0, 8, 8], [0, 0, 2000, 1500], [0, 0, 0, 0], [9, 9, 3, 3], [5, 5, 60, 300]], F32
    )
    np.testing.assert_array_equal(assign_levels(jnp.asarray(boxes), 2, 5), [3, 4, 5, 2, 2, 5, 2, 2, 3])
    rng = np.random.default_rng(0)
    rand = np.sort(rng.uniform(-50, 1500, size=(200, 2, 2)), axis=1).transpose(0, 2, 1)
    rand = rand.reshape(200, 4).astype(F32)
    rand = np.concatenate([boxes, rand])
    for eps, inside in [(1e-8, True), (1e-6, False)]:
        got = assign_levels(jnp.asarray(rand), 2, 5, eps=eps, eps_inside_log=inside)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, levels_ref(rand, 2, 5, eps, inside))


def _pyramid(rng, img_h, img_w, c, min_level=2, num=4):
    return [
        rng.normal(size=(img_h // 2**lv, img_w // 2**lv, c)).astype(F32)
        for lv in range(min_level, min_level + num)
    ]


def _level_spanning_boxes(rng, n, img_h, img_w):
    """Boxes whose sqrt(area) spans 20..900 px, so levels 2..5 all occur."""
    size = np.exp(rng.uniform(np.log(20), np.log(900), size=(n, 1)))
    ratio = np.exp(rng.uniform(-0.7, 0.7, size=(n, 1)))
    wh = np.concatenate([size * ratio, size / ratio], axis=1)
    xy = rng.uniform(-0.2, 0.9, size=(n, 2)) * [img_w, img_h]
    return np.concatenate([xy, xy + wh], axis=1).astype(F32)


@pytest.mark.parametrize("aligned", [False, True])
def test_multilevel_matches_per_box_reference(aligned):
    rng = np.random.default_rng(3)
    img_h, img_w = 128, 192
    feats = _pyramid(rng, img_h, img_w, 2)
    boxes = np.concatenate([_level_spanning_boxes(rng, 14, img_h, img_w), _mixed_boxes(rng, img_h, img_w)])
    lv = levels_ref(boxes, 2, 5)
    assert set(lv) == {2, 3, 4, 5}
    out = multilevel_roi_align([jnp.asarray(f) for f in feats], jnp.asarray(boxes), 4, 2, aligned)
    ref = np.stack([
        roi_align_ref(feats[lv[i] - 2], boxes[i : i + 1], 4, 2.0 ** -lv[i], 2, aligned)[0]
        for i in range(len(boxes))
    ])
    np.testing.assert_allclose(out, ref, atol=1e-5)

    cot = rng.normal(size=out.shape).astype(F32)
    fn = lambda fs: jnp.sum(multilevel_roi_align(fs, jnp.asarray(boxes), 4, 2, aligned) * cot)
    grads = jax.grad(fn)([jnp.asarray(f) for f in feats])
    for k, g in enumerate(grads):
        on_level = lv == k + 2
        ref_g = roi_align_ref_vjp(feats[k].shape, boxes[on_level], 4, 2.0 ** -(k + 2), 2, aligned,
                                  cot[on_level])
        np.testing.assert_allclose(g, ref_g, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
def test_many_sets_match_one_call_per_set_and_the_reference(aligned):
    rng = np.random.default_rng(11)
    img_h, img_w = 128, 192
    feats = _pyramid(rng, img_h, img_w, 3)
    sets = [_level_spanning_boxes(rng, 9, img_h, img_w), _mixed_boxes(rng, img_h, img_w)]
    sizes = [3, 5]
    fs = [jnp.asarray(f) for f in feats]
    outs = multilevel_roi_align_many(fs, [jnp.asarray(b) for b in sets], sizes, 2, aligned)
    for boxes, size, out in zip(sets, sizes, outs, strict=True):
        assert out.shape == (len(boxes), size, size, 3)
        # The same sums in the same order as a call of its own (XLA may contract them differently).
        alone = multilevel_roi_align(fs, jnp.asarray(boxes), size, 2, aligned)
        np.testing.assert_allclose(out, alone, rtol=1e-6, atol=1e-7)
        lv = levels_ref(boxes, 2, 5)
        ref = np.stack([
            roi_align_ref(feats[lv[i] - 2], boxes[i : i + 1], size, 2.0 ** -lv[i], 2, aligned)[0]
            for i in range(len(boxes))
        ])
        np.testing.assert_allclose(out, ref, atol=1e-5)

    # The gradient of the features is the sum of each set's transposed reference.
    cots = [rng.normal(size=o.shape).astype(F32) for o in outs]
    def fn(fs):
        outs = multilevel_roi_align_many(fs, [jnp.asarray(b) for b in sets], sizes, 2, aligned)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cots, strict=True))

    grads = jax.grad(fn)(fs)
    for k, g in enumerate(grads):
        ref_g = 0
        for boxes, size, cot in zip(sets, sizes, cots, strict=True):
            on_level = levels_ref(boxes, 2, 5) == k + 2
            ref_g = ref_g + roi_align_ref_vjp(feats[k].shape, boxes[on_level], size, 2.0 ** -(k + 2), 2,
                                              aligned, cot[on_level])
        np.testing.assert_allclose(g, ref_g, atol=1e-5)


def test_many_sets_share_one_loop_forward_and_backward():
    rng = np.random.default_rng(12)
    fs = [jnp.asarray(f) for f in _pyramid(rng, 64, 64, 2)]
    sets = [jnp.asarray(_level_spanning_boxes(rng, n, 64, 64)) for n in (4, 6)]

    def loops(fn):
        jaxpr = jax.make_jaxpr(jax.grad(fn))(fs)
        return sum(1 for e in jaxpr.eqns if e.primitive.name in ("scan", "while"))

    together = lambda fs: sum(jnp.sum(o) for o in multilevel_roi_align_many(fs, sets, [3, 5], 2, True))
    apart = lambda fs: sum(
        jnp.sum(multilevel_roi_align(fs, b, n, 2, True)) for b, n in zip(sets, [3, 5], strict=True)
    )
    # One gather loop and its transpose (one cotangent accumulator), against two of each.
    assert loops(together) == 2
    assert loops(apart) == 4
    with pytest.raises(ValueError, match="2 box sets but 1 output sizes"):
        multilevel_roi_align_many(fs, sets, [3], 2, True)


@settings(max_examples=25, deadline=None)
@given(
    value=st.floats(-100, 100, allow_nan=False, width=32),
    corners=st.lists(st.floats(0, 1, width=32), min_size=4, max_size=4),
    aligned=st.booleans(),
    s=st.integers(0, 3),  # 0: adaptive, capped at 2 points per side
)
def test_constant_map_gives_the_constant(value, corners, aligned, s):
    # Boxes inside [0, (W - 1) * stride]: every sample lands on the map, even after the 1-px floor.
    h, w, stride = 6, 9, 4
    xs = sorted(np.array(corners[:2]) * (w - 1) * stride)
    ys = sorted(np.array(corners[2:]) * (h - 1) * stride)
    box = np.array([[xs[0], ys[0], xs[1], ys[1]]], F32)
    fmap = np.full((h, w, 2), value, F32)
    out = _roi_align_jit(jnp.asarray(fmap), jnp.asarray(box), 3, 1 / stride, s, aligned, 2)
    # The extent the kernel sees, in float32 after the scale and the half-pixel shift: a side of
    # 2e-8 px starting at 0 is 0 there (-0.5 either end), as in torchvision's kernel.
    sides = np.diff(box.reshape(2, 2) * F32(1 / stride) - F32(0.5), axis=0)
    if s == 0 and aligned and sides.min() == 0:
        # An empty aligned box has no adaptive points (ceil(0) = 0): the kernel gives 0.
        np.testing.assert_array_equal(out, 0.0)
    else:
        np.testing.assert_allclose(out, value, rtol=1e-5, atol=1e-5)


def test_jit_vmap_batched_without_recompiling():
    rng = np.random.default_rng(5)
    traces = []

    def pool(feats, boxes):
        traces.append(1)
        return multilevel_roi_align(feats, boxes, 3, 2, True)

    fn = jax.jit(jax.vmap(pool))
    feats = [np.stack(f) for f in zip(*[_pyramid(rng, 64, 64, 2) for _ in range(2)], strict=True)]
    for seed in range(3):
        boxes = np.stack([_level_spanning_boxes(np.random.default_rng(seed * 2 + b), 6, 64, 64)
                          for b in range(2)])
        out = fn(feats, boxes)
        for b in range(2):
            single = multilevel_roi_align([f[b] for f in feats], jnp.asarray(boxes[b]), 3, 2, True)
            np.testing.assert_allclose(out[b], single, atol=1e-6)
    assert len(traces) == 1


def _torchvision_roi_align(fmap, boxes, out, scale, s, aligned):
    """torchvision.ops.roi_align of one [H, W, C] map -> [R, out, out, C] numpy."""
    torch = pytest.importorskip("torch")
    tvops = pytest.importorskip("torchvision.ops")
    t_in = torch.from_numpy(fmap).permute(2, 0, 1)[None]
    ref = tvops.roi_align(t_in, [torch.from_numpy(boxes)], out, scale, s, aligned)
    return ref.permute(0, 2, 3, 1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision(aligned):
    rng = np.random.default_rng(11)
    fmap = rng.normal(size=(13, 17, 4)).astype(F32)
    boxes = _mixed_boxes(rng, 52, 68)
    for s in (1, 2):
        ref = _torchvision_roi_align(fmap, boxes, 7, 0.25, s, aligned)
        out = np.asarray(roi_align(jnp.asarray(fmap), jnp.asarray(boxes), 7, 0.25, s, aligned))
        # The huge box (row 18) samples x = -85 + 3.5 * 187 / 7 = 8.5: cancellation leaves a float32
        # error of ~ulp(85) = 8e-6 in the coordinate, which either kernel may round differently.
        huge = np.arange(len(boxes)) == 18
        np.testing.assert_allclose(out[~huge], ref[~huge], atol=1e-5)
        np.testing.assert_allclose(out[huge], ref[huge], atol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("aligned", [False, True])
def test_adaptive_matches_torchvision_within_the_cap(aligned):
    rng = np.random.default_rng(13)
    fmap = rng.normal(size=(40, 50, 4)).astype(F32)
    boxes = np.concatenate([_mixed_boxes(rng, 160, 200), _level_spanning_boxes(rng, 30, 160, 200)])
    ref = _torchvision_roi_align(fmap, boxes, 7, 0.25, 0, aligned)
    out = np.asarray(roi_align(jnp.asarray(fmap), jnp.asarray(boxes), 7, 0.25, 0, aligned, 6))
    points = _adaptive_points(boxes, 7, 0.25, aligned)
    within = points <= 6
    assert within.sum() >= 30 and set(points[within]) >= {1, 2, 3, 4, 5, 6}
    # atol as in test_matches_torchvision: the huge box's coordinates round differently.
    np.testing.assert_allclose(out[within], ref[within], atol=1e-4)


@pytest.mark.torch
def test_multilevel_matches_torchvision_multiscale_roi_align():
    torch = pytest.importorskip("torch")
    tvops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(12)
    img_h, img_w = 128, 192
    feats = _pyramid(rng, img_h, img_w, 3)
    boxes = _level_spanning_boxes(rng, 24, img_h, img_w)
    names = [f"p{k}" for k in range(4)]
    pooler = tvops.MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    x = {n: torch.from_numpy(f).permute(2, 0, 1)[None] for n, f in zip(names, feats, strict=True)}
    ref = pooler(x, [torch.from_numpy(boxes)], [(img_h, img_w)]).permute(0, 2, 3, 1).numpy()
    # torchvision: aligned=False, LevelMapper eps 1e-6 added outside the log.
    out = multilevel_roi_align([jnp.asarray(f) for f in feats], jnp.asarray(boxes), 7, 2, False,
                               eps=1e-6, eps_inside_log=False)
    np.testing.assert_allclose(out, ref, atol=1e-5)
