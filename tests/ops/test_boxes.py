"""Box math against numpy references, plus hypothesis properties."""

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mrcnn_jax.ops import boxes as box_ops


def _boxes(min_n=1, max_n=12, lo=-50.0, hi=500.0, min_wh=0.0):
    coord = st.floats(lo, hi, allow_nan=False, width=32)
    size = st.floats(min_wh, 300.0, allow_nan=False, width=32)

    @st.composite
    def build(draw):
        n = draw(st.integers(min_n, max_n))
        xy = draw(arrays(np.float32, (n, 2), elements=coord))
        wh = draw(arrays(np.float32, (n, 2), elements=size))
        return np.concatenate([xy, xy + wh], axis=1)

    return build()


def _iou_ref(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


_pairwise_iou = jax.jit(box_ops.pairwise_iou)


def _iou(a, b, rows=12):
    """pairwise_iou of a and b padded to `rows` boxes each (one compile for every drawn size;
    the padding's rows and columns are cut off)."""
    pa, pb = np.zeros((rows, 4), np.float32), np.zeros((rows, 4), np.float32)
    pa[: len(a)], pb[: len(b)] = a, b
    return np.asarray(_pairwise_iou(pa, pb))[: len(a), : len(b)]


@settings(max_examples=60, deadline=None)
@given(_boxes(), _boxes())
def test_iou_matches_reference_symmetric_and_bounded(a, b):
    iou = _iou(a, b)
    np.testing.assert_allclose(iou, _iou_ref(a, b), atol=1e-5)
    np.testing.assert_allclose(iou, _iou(b, a).T, atol=1e-6)
    assert np.all((iou >= 0) & (iou <= 1 + 1e-6))


@settings(max_examples=60, deadline=None)
@given(_boxes(min_wh=1.0), _boxes(min_wh=1.0), st.sampled_from([(1, 1, 1, 1), (10, 10, 5, 5)]))
def test_decode_inverts_encode(boxes, refs, weights):
    n = min(len(boxes), len(refs))
    boxes, refs = boxes[:n], refs[:n]
    deltas = box_ops.encode(boxes, refs, weights)
    # Large size ratios hit the log(1000/16) clamp by design; only check the unclamped ones.
    ok = np.all(np.abs(np.asarray(deltas)[:, 2:]) / np.array(weights[2:]) < box_ops.DEFAULT_SCALE_CLAMP, 1)
    back = np.asarray(box_ops.decode(deltas, refs, weights))
    np.testing.assert_allclose(back[ok], boxes[ok], rtol=1e-4, atol=1e-2)


def test_encode_reference_values():
    ref = np.array([[0.0, 0.0, 10.0, 20.0]])
    box = np.array([[5.0, 0.0, 25.0, 10.0]])
    d = np.asarray(box_ops.encode(box, ref, (10, 10, 5, 5)))[0]
    # centres (5, 10) -> (15, 5); sizes (10, 20) -> (20, 10)
    np.testing.assert_allclose(d, [10 * 10 / 10, 10 * -5 / 20, 5 * np.log(2), 5 * np.log(0.5)], rtol=1e-6)


def test_decode_clamps_scale():
    ref = np.array([[0.0, 0.0, 16.0, 16.0]], np.float32)
    out = np.asarray(box_ops.decode(np.array([[0.0, 0.0, 100.0, 100.0]], np.float32), ref))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 1000.0, rtol=1e-4)
    assert np.all(np.isfinite(out))


def test_clip_area_validity():
    b = np.array([[-5.0, -5.0, 20.0, 30.0], [5.0, 5.0, 5.0, 9.0], [8.0, 2.0, 3.0, 9.0]], np.float32)
    np.testing.assert_allclose(box_ops.clip_boxes(b, 25, 10)[0], [0, 0, 10, 25])
    np.testing.assert_allclose(box_ops.area(b), [25 * 35, 0, 0])
    np.testing.assert_array_equal(box_ops.valid_boxes(b), [True, False, False])
    np.testing.assert_array_equal(box_ops.valid_boxes(b, min_size=30), [False, False, False])


def test_jit_does_not_recompile_on_new_data():
    traces = []

    def f(a, b):
        traces.append(1)
        return box_ops.pairwise_iou(a, b), box_ops.encode(a, b)

    g = jax.jit(f)
    rng = np.random.default_rng(0)
    for _ in range(3):
        a = rng.uniform(0, 50, (4, 4)).astype(np.float32)
        g(a, a + 1)
    assert len(traces) == 1
