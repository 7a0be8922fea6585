"""Padded, tiled NMS against a plain numpy greedy reference (hypothesis), class-aware NMS, scale."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrcnn_jax.ops import nms as nms_ops
from mrcnn_jax.ops.nms import batched_nms, nms


def _iou_one_to_many(box, boxes):
    """float32 IoU of box [4] with boxes [K, 4], same formula as ops.boxes.pairwise_iou."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    wh = np.maximum(rb - lt, np.float32(0))
    inter = wh[:, 0] * wh[:, 1]
    area = lambda b: np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), np.float32(0))


def _greedy_reference(boxes, scores, thr, max_output, score_threshold=-np.inf, classes=None):
    """Plain greedy NMS: stable descending score order, suppress IoU > thr (same class)."""
    boxes = boxes.astype(np.float32)
    classes = np.zeros(len(boxes), int) if classes is None else classes
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        if not (np.isfinite(scores[i]) and scores[i] > score_threshold):
            continue
        if keep:
            k = np.asarray(keep)
            over = _iou_one_to_many(boxes[i], boxes[k]) > np.float32(thr)
            if (over & (classes[k] == classes[i])).any():
                continue
        keep.append(int(i))
        if len(keep) == max_output:
            break
    return keep


def _random_case(rng, n, integer_grid=True):
    """Boxes on a 0.25 px grid (IoU exact up to the final division), with duplicates, zero-size
    boxes, quantised scores (ties) and non-finite scores (padding)."""
    xy = rng.integers(0, 64 * 4, (n, 2)) / 4.0
    wh = rng.integers(0, 32 * 4, (n, 2)) / 4.0
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    dup = rng.random(n) < 0.15
    boxes[dup] = boxes[rng.integers(0, n, dup.sum())]
    if rng.random() < 0.5:
        scores = (rng.integers(0, 6, n) / 6.0).astype(np.float32)  # many ties
    else:
        scores = rng.random(n).astype(np.float32)
    scores[rng.random(n) < 0.1] = -np.inf
    scores[rng.random(n) < 0.02] = np.nan
    return boxes, scores


@functools.cache
def _compiled(fn, max_output):
    """One compile per (fn, max_output, input shape): the thresholds are traced arguments."""
    return jax.jit(lambda *args, thr, score_thr: fn(*args, thr, max_output, score_thr))


def _jitted(fn, thr, max_output, score_threshold):
    compiled = _compiled(fn, max_output)
    thr, score_threshold = np.float32(thr), np.float32(score_threshold)
    return lambda *args: compiled(*args, thr=thr, score_thr=score_threshold)


def _check(keep_ref, indices, valid, max_output):
    indices, valid = np.asarray(indices), np.asarray(valid)
    assert indices.shape == valid.shape == (max_output,) and indices.dtype == np.int32
    assert valid.sum() == len(keep_ref)
    np.testing.assert_array_equal(valid, np.arange(max_output) < len(keep_ref))  # valid first
    np.testing.assert_array_equal(indices[valid], keep_ref)
    np.testing.assert_array_equal(indices[~valid], 0)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 boxes so that small inputs span several tiles (TILE is read at trace time).

    Function-scoped but constant over hypothesis examples, hence the suppressed health check."""
    monkeypatch.setattr(nms_ops, "TILE", 16)
    _compiled.cache_clear()
    yield
    _compiled.cache_clear()


FIXTURE_OK = [HealthCheck.function_scoped_fixture]
CASE = dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from([1, 5, 16, 37, 100]),
    thr=st.sampled_from([0.0, 0.3, 0.5, 0.7]),
    max_output=st.sampled_from([1, 10, 150]),
    score_threshold=st.sampled_from([-np.inf, 0.4]),
)


@given(**CASE)
@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
def test_nms_matches_greedy_reference(small_tiles, seed, n, thr, max_output, score_threshold):
    boxes, scores = _random_case(np.random.default_rng(seed), n)
    indices, valid = _jitted(nms, thr, max_output, score_threshold)(boxes, scores)
    ref = _greedy_reference(boxes, scores, thr, max_output, score_threshold)
    _check(ref, indices, valid, max_output)
    kept = np.asarray(indices)[np.asarray(valid)]
    for a in range(len(kept)):  # no two kept boxes overlap above the threshold
        assert not (_iou_one_to_many(boxes[kept[a]], boxes[kept[a + 1 :]]) > np.float32(thr)).any()


@given(**CASE)
@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
def test_batched_nms_matches_per_class_reference(
    small_tiles, seed, n, thr, max_output, score_threshold
):
    rng = np.random.default_rng(seed)
    boxes, scores = _random_case(rng, n)
    classes = rng.integers(0, 3, n).astype(np.int32)
    fn = _jitted(batched_nms, thr, max_output, score_threshold)
    indices, valid = fn(boxes, scores, classes)
    # Per class, then merged by (score desc, index asc) and truncated.
    merged = []
    for c in range(3):
        members = np.flatnonzero(classes == c)
        merged += [members[i] for i in _greedy_reference(
            boxes[members], scores[members], thr, max_output, score_threshold)]
    merged = sorted(merged, key=lambda i: (-scores[i], i))[:max_output]
    _check(merged, indices, valid, max_output)
    assert merged == _greedy_reference(boxes, scores, thr, max_output, score_threshold, classes)


def test_default_tile_not_multiple():
    """N = 600 with the default tile (256): three tiles, the last one partly padding."""
    assert nms_ops.TILE == 256
    boxes, scores = _random_case(np.random.default_rng(3), 600)
    for max_output in (50, 700):
        indices, valid = _jitted(nms, 0.5, max_output, -np.inf)(boxes, scores)
        _check(_greedy_reference(boxes, scores, 0.5, max_output), indices, valid, max_output)


def test_special_cases():
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (5, 1))
    scores = np.array([0.5, 0.9, 0.9, 0.1, 0.9], np.float32)
    idx, valid = nms(boxes, scores, 0.5, 4)  # identical boxes: only the first of the top ties
    np.testing.assert_array_equal(idx, [1, 0, 0, 0])
    np.testing.assert_array_equal(valid, [True, False, False, False])
    idx, valid = nms(boxes, scores, 0.5, 3, score_threshold=0.95)  # all below the threshold
    assert not np.asarray(valid).any() and not np.asarray(idx).any()
    idx, valid = nms(boxes, np.full(5, -np.inf, np.float32), 0.5, 3)  # all padding
    assert not np.asarray(valid).any()
    # Different classes never suppress each other; ties stay in index order.
    idx, valid = batched_nms(boxes, scores, np.array([0, 1, 1, 0, 2]), 0.5, 5)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], [1, 4, 0])


def test_vmap_over_images():
    rng = np.random.default_rng(7)
    cases = [_random_case(rng, 40) for _ in range(3)]
    boxes = np.stack([c[0] for c in cases])
    scores = np.stack([c[1] for c in cases])
    idx, valid = jax.jit(jax.vmap(lambda b, s: nms(b, s, 0.5, 30)))(boxes, scores)
    for i in range(3):
        _check(_greedy_reference(boxes[i], scores[i], 0.5, 30), idx[i], valid[i], 30)


def test_one_trace_per_shape():
    traces = []

    @jax.jit
    def f(boxes, scores, classes):
        traces.append(1)
        return batched_nms(boxes, scores, classes, 0.5, 20)

    rng = np.random.default_rng(0)
    for _ in range(3):
        boxes, scores = _random_case(rng, 300)
        f(boxes, scores, jnp.asarray(rng.integers(0, 4, 300), jnp.int32))
    assert len(traces) == 1


def test_rpn_scale_10k():
    """N = 10_000 (RPN: 2000 per level x 5), jitted: no N x N matrix; agrees with the reference."""
    rng = np.random.default_rng(0)
    n = 10_000
    xy = rng.uniform(0, 1300, (n, 2))
    wh = rng.uniform(4, 300, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.normal(size=n).astype(np.float32)
    levels = rng.integers(0, 5, n).astype(np.int32)
    fn = jax.jit(lambda b, s, c: batched_nms(b, s, c, 0.7, 1000))
    idx, valid = fn(boxes, scores, levels)
    assert np.asarray(valid).sum() == 1000
    ref = _greedy_reference(boxes, scores, 0.7, 300, classes=levels)
    np.testing.assert_array_equal(np.asarray(idx)[:300], ref)
