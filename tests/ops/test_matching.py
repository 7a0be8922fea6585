"""Matcher vs a numpy loop reference; sampling properties (hypothesis); one compile per shape."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.matching import (
    TIE_RTOL,
    MatchLabel,
    leading_rows,
    match,
    match_boxes,
    row_buckets,
    sample_indices,
    subsample,
)

POS, NEG, IGN = int(MatchLabel.POSITIVE), int(MatchLabel.NEGATIVE), int(MatchLabel.IGNORE)


def _match_reference(iou, gt_valid, fg, bg, low_quality):
    """detectron2 Matcher by loops, padded gt skipped, low-quality only where the best IoU > 0."""
    g, n = iou.shape
    matched = np.zeros(n, np.int64)
    labels = np.full(n, NEG, np.int64)
    if not gt_valid.any():
        return matched, labels
    for j in range(n):
        best, arg = -1.0, 0
        for i in range(g):
            if gt_valid[i] and iou[i, j] > best:  # strict: the first gt wins ties
                best, arg = iou[i, j], i
        matched[j] = arg
        labels[j] = POS if best >= fg else (IGN if best >= bg else NEG)
    if low_quality:
        for i in range(g):
            if not gt_valid[i]:
                continue
            top = max(iou[i])
            for j in range(n):
                if top > 0 and iou[i, j] >= top - top * np.float32(TIE_RTOL):  # ties
                    labels[j] = POS
    return matched, labels


_match_jit = jax.jit(match, static_argnums=(2, 3, 4))


def _check_match(iou, gt_valid, fg, bg, low_quality):
    m, lab = _match_jit(jnp.asarray(iou, jnp.float32), jnp.asarray(gt_valid), fg, bg, low_quality)
    rm, rl = _match_reference(iou.astype(np.float32), gt_valid, np.float32(fg), np.float32(bg),
                              low_quality)
    np.testing.assert_array_equal(np.asarray(lab), rl)
    np.testing.assert_array_equal(np.asarray(m), rm)
    assert m.dtype == jnp.int32 and lab.dtype == jnp.int32


def _random_boxes(rng, n, size):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(2, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@given(seed=st.integers(0, 2**31 - 1), low_quality=st.booleans())
@settings(max_examples=30, deadline=None)
def test_match_random_boxes(seed, low_quality):
    rng = np.random.default_rng(seed)
    gt = _random_boxes(rng, 6, 64)
    preds = _random_boxes(rng, 40, 64)
    preds[:3] = gt[:3]  # a few exact matches
    gt_valid = rng.random(6) < 0.7
    gt[~gt_valid] = 0.0  # padded rows are zeros, as in the batch contract
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt), jnp.asarray(preds)))
    _check_match(iou, gt_valid, 0.7, 0.3, low_quality)
    _check_match(iou, gt_valid, 0.5, 0.5, low_quality)


@given(
    seed=st.integers(0, 2**31 - 1),
    low_quality=st.booleans(),
    chunk=st.sampled_from([1, 3, 7, 16, 64]),
)
@settings(max_examples=40, deadline=None)
def test_match_boxes_in_chunks_equals_the_full_matrix(seed, low_quality, chunk):
    """Boxes repeated across chunks (ties for a gt's highest IoU in several chunks), a gt that
    overlaps nothing, padded gt: the chunked matcher agrees with the loop reference exactly."""
    rng = np.random.default_rng(seed)
    gt = _random_boxes(rng, 6, 64)
    gt[5] = [500, 500, 510, 510]  # overlaps no prediction
    base = _random_boxes(rng, 15, 64)
    base[:3] = gt[:3]
    preds = np.concatenate([base, base[rng.permutation(15)], _random_boxes(rng, 11, 64)])
    gt_valid = rng.random(6) < 0.8
    gt[~gt_valid] = 0.0
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt), jnp.asarray(preds)))
    fn = jax.jit(match_boxes, static_argnums=(3, 4, 5, 6))
    m, lab = fn(jnp.asarray(gt), jnp.asarray(preds), jnp.asarray(gt_valid), 0.7, 0.3, low_quality,
                chunk)
    rm, rl = _match_reference(iou, gt_valid, np.float32(0.7), np.float32(0.3), low_quality)
    np.testing.assert_array_equal(np.asarray(lab), rl)
    np.testing.assert_array_equal(np.asarray(m), rm)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _match_valid_only(gt, preds, gt_valid, box_valid, low_quality, chunk, use_rows):
    rows = leading_rows(gt_valid) if use_rows else None
    return match_boxes(
        gt, preds, gt_valid, 0.7, 0.3, low_quality, chunk, rows=rows, box_valid=box_valid
    )


@given(
    seed=st.integers(0, 2**31 - 1),
    low_quality=st.booleans(),
    chunk=st.sampled_from([0, 7, 64]),
    use_rows=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_invalid_predictions_do_not_exist_for_the_matcher(seed, low_quality, chunk, use_rows):
    """With box_valid, the valid predictions get exactly the matches they would get if the
    invalid ones were not there (loop reference on the valid columns only: an invalid box that
    is some gt's best match no longer makes that gt's best valid box lose its low-quality
    positive), and the invalid ones are IGNORE with matched_gt 0."""
    rng = np.random.default_rng(seed)
    gt = _random_boxes(rng, 10, 64)
    preds = _random_boxes(rng, 45, 64)
    box_valid = rng.random(45) < 0.6
    invalid = np.flatnonzero(~box_valid)
    if len(invalid):  # an invalid box equal to a gt: that gt's best IoU would be 1 with it
        preds[invalid[0]] = gt[0]
    gt_valid = rng.random(10) < 0.8
    gt[~gt_valid] = 0.0
    m, lab = _match_valid_only(
        jnp.asarray(gt), jnp.asarray(preds), jnp.asarray(gt_valid), jnp.asarray(box_valid),
        low_quality, chunk, use_rows,
    )
    m, lab = np.asarray(m), np.asarray(lab)
    assert (lab[~box_valid] == IGN).all() and (m[~box_valid] == 0).all()
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt), jnp.asarray(preds[box_valid])))
    rm, rl = _match_reference(iou, gt_valid, np.float32(0.7), np.float32(0.3), low_quality)
    np.testing.assert_array_equal(lab[box_valid], rl)
    np.testing.assert_array_equal(m[box_valid], rm)
    full_m, full_l = match(jnp.asarray(iou), jnp.asarray(gt_valid), 0.7, 0.3, low_quality)
    np.testing.assert_array_equal(lab[box_valid], np.asarray(full_l))
    np.testing.assert_array_equal(m[box_valid], np.asarray(full_m))


def test_leading_rows_and_row_buckets():
    valid = np.zeros((2, 10), bool)
    assert int(leading_rows(jnp.asarray(valid))) == 0
    valid[0, [1, 3]] = True  # a gap (a crowd or padded row) below the last valid one
    valid[1, 6] = True
    assert int(leading_rows(jnp.asarray(valid))) == 7
    assert int(leading_rows(jnp.asarray(valid[0]))) == 4
    assert row_buckets(100) == (8, 16, 32, 64, 100)
    assert row_buckets(16) == (8, 16) and row_buckets(8) == (8,) and row_buckets(3) == (3,)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _match_on_leading_rows(gt, valid, preds, low_quality, chunk):
    """As `losses` does: the batch's row count closed over (unbatched) by the vmapped matcher."""
    rows = leading_rows(valid)
    return jax.vmap(
        lambda g, v: match_boxes(g, preds, v, 0.7, 0.3, low_quality, chunk, rows=rows)
    )(gt, valid)


@given(
    seed=st.integers(0, 2**31 - 1),
    low_quality=st.booleans(),
    num_gt=st.sampled_from([9, 40]),
    chunk=st.sampled_from([0, 7]),
)
@settings(max_examples=30, deadline=None)
def test_match_boxes_on_leading_rows_equals_all_rows(seed, low_quality, num_gt, chunk):
    """A batch of two images whose valid gt (with gaps) end at random rows: matching on the
    leading rows' bucket, the rows unbatched under vmap, agrees with the loop reference on all
    rows exactly, ties for a gt's highest IoU included."""
    rng = np.random.default_rng(seed)
    gts, valids, preds = [], [], _random_boxes(rng, 50, 64)
    for _ in range(2):
        gt = _random_boxes(rng, num_gt, 64)
        last = int(rng.integers(0, num_gt + 1))
        valid = (np.arange(num_gt) < last) & (rng.random(num_gt) < 0.8)
        gt[~valid] = 0.0
        preds[rng.integers(0, 50, 3)] = gt[rng.integers(0, num_gt, 3)]  # exact matches
        gts.append(gt)
        valids.append(valid)
    gt, valid = np.stack(gts), np.stack(valids)
    m, lab = _match_on_leading_rows(jnp.asarray(gt), jnp.asarray(valid), jnp.asarray(preds),
                                    low_quality, chunk)
    for i in range(2):
        iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt[i]), jnp.asarray(preds)))
        rm, rl = _match_reference(iou, valid[i], np.float32(0.7), np.float32(0.3), low_quality)
        np.testing.assert_array_equal(np.asarray(lab[i]), rl)
        np.testing.assert_array_equal(np.asarray(m[i]), rm)


def test_match_boxes_rows_stay_a_switch_under_vmap():
    """With the rows unbatched, vmap keeps one matcher per bucket behind a `cond` (a batched index
    would run all of them and select)."""
    gt, valid = jnp.zeros((2, 40, 4)), jnp.zeros((2, 40), bool)
    preds = jnp.zeros((30, 4))
    fn = jax.vmap(lambda g, v, r: match_boxes(g, preds, v, 0.7, 0.3, True, 8, rows=r),
                  in_axes=(0, 0, None))
    jaxpr = jax.make_jaxpr(fn)(gt, valid, jnp.int32(5))
    conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1 and len(conds[0].params["branches"]) == len(row_buckets(40)) == 4


@given(
    seed=st.integers(0, 2**31 - 1),
    low_quality=st.booleans(),
    p_valid=st.sampled_from([0.0, 0.5, 1.0]),
)
@settings(max_examples=40, deadline=None)
def test_match_quantised_iou_ties(seed, low_quality, p_valid):
    """IoU from {0, .1, ..., 1}: many ties, exact threshold hits, zero rows, all / no padded gt."""
    rng = np.random.default_rng(seed)
    iou = rng.integers(0, 11, (5, 30)) / 10.0
    iou[rng.random(5) < 0.3] = 0.0
    gt_valid = rng.random(5) < p_valid
    _check_match(iou, gt_valid, 0.7, 0.3, low_quality)
    _check_match(iou, gt_valid, 0.5, 0.5, low_quality)


def test_match_cases():
    iou = np.array(
        [
            [0.60, 0.20, 0.00, 0.75, 0.0],
            [0.65, 0.29, 0.30, 0.10, 0.0],
            [0.00, 0.00, 0.00, 0.00, 0.0],  # valid gt overlapping nothing
            [0.90, 0.90, 0.90, 0.90, 0.9],  # padded gt: never matched
        ]
    )
    gt_valid = np.array([True, True, True, False])
    m, lab = match(jnp.asarray(iou), jnp.asarray(gt_valid), 0.7, 0.3, allow_low_quality=False)
    np.testing.assert_array_equal(lab, [IGN, NEG, IGN, POS, NEG])
    np.testing.assert_array_equal(m, [1, 1, 1, 0, 0])
    m, lab = match(jnp.asarray(iou), jnp.asarray(gt_valid), 0.7, 0.3, allow_low_quality=True)
    # gt 1's best is prediction 0 (0.65): positive, but matched to its argmax gt 1.
    # gt 2's best IoU is 0: the guard keeps the IoU-0 predictions 4 negative.
    np.testing.assert_array_equal(lab, [POS, NEG, IGN, POS, NEG])
    np.testing.assert_array_equal(m, [1, 1, 1, 0, 0])


def test_match_no_valid_gt_and_no_gt():
    iou = jnp.full((3, 4), 0.9)
    m, lab = match(iou, jnp.zeros(3, bool), 0.7, 0.3, allow_low_quality=True)
    np.testing.assert_array_equal(lab, [NEG] * 4)
    np.testing.assert_array_equal(m, [0] * 4)
    m, lab = match(jnp.zeros((0, 4)), jnp.zeros(0, bool), 0.7, 0.3, allow_low_quality=True)
    np.testing.assert_array_equal(lab, [NEG] * 4)
    np.testing.assert_array_equal(m, [0] * 4)


def test_match_one_trace_per_shape():
    traces = []

    @functools.partial(jax.jit, static_argnums=(2,))
    def f(iou, valid, low_quality):
        traces.append(1)
        return match(iou, valid, 0.7, 0.3, low_quality)

    rng = np.random.default_rng(0)
    for _ in range(3):
        f(jnp.asarray(rng.random((4, 20)), jnp.float32), jnp.asarray(rng.random(4) < 0.5), True)
    assert len(traces) == 1


# ----------------------------------------------------------------------------- sampling

N_LABELS = 96


@functools.cache
def _sampler(num_samples, fraction):
    return jax.jit(lambda key, labels: sample_indices(key, labels, num_samples, fraction))


@given(
    seed=st.integers(0, 2**31 - 1),
    num_samples=st.sampled_from([1, 7, 32, 200]),
    fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    probs=st.sampled_from([(0.1, 0.3, 0.6), (0.0, 0.05, 0.95), (0.3, 0.6, 0.1), (0.5, 0.0, 0.5)]),
)
@settings(max_examples=60, deadline=None)
def test_sample_indices_properties(seed, num_samples, fraction, probs):
    rng = np.random.default_rng(seed)
    labels = rng.choice([IGN, POS, NEG], size=N_LABELS, p=probs).astype(np.int32)
    key = jax.random.key(seed)
    idx, is_pos, valid = (np.asarray(a) for a in _sampler(num_samples, fraction)(key, labels))
    assert idx.shape == is_pos.shape == valid.shape == (num_samples,)

    want_pos = min(int((labels == POS).sum()), int(num_samples * fraction))
    want_neg = min(int((labels == NEG).sum()), num_samples - want_pos)
    # Layout: positives, then negatives, then padding (index 0).
    np.testing.assert_array_equal(is_pos, np.arange(num_samples) < want_pos)
    np.testing.assert_array_equal(valid, np.arange(num_samples) < want_pos + want_neg)
    np.testing.assert_array_equal(idx[~valid], 0)
    assert (labels[idx[is_pos]] == POS).all()
    assert (labels[idx[valid & ~is_pos]] == NEG).all()  # never IGNORE
    assert len(set(idx[valid].tolist())) == valid.sum()  # without replacement
    assert is_pos.sum() <= num_samples * fraction

    # subsample is the same draw scattered to masks.
    pos_sel, neg_sel = (np.asarray(a) for a in subsample(key, labels, num_samples, fraction))
    np.testing.assert_array_equal(np.flatnonzero(pos_sel), np.sort(idx[is_pos]))
    np.testing.assert_array_equal(np.flatnonzero(neg_sel), np.sort(idx[valid & ~is_pos]))


def test_subsample_index_zero_kept_despite_padding():
    """Padding rows point at index 0; a real selection of index 0 must survive the scatter."""
    labels = jnp.array([POS, IGN, IGN, NEG], jnp.int32)
    pos_sel, neg_sel = subsample(jax.random.key(0), labels, 8, 0.5)
    np.testing.assert_array_equal(pos_sel, [True, False, False, False])
    np.testing.assert_array_equal(neg_sel, [False, False, False, True])


def test_different_keys_differ_and_draw_is_uniform():
    labels = jnp.asarray(np.r_[np.full(20, POS), np.full(200, NEG)].astype(np.int32))
    keys = jax.random.split(jax.random.key(1), 2000)
    pos_sel, neg_sel = jax.vmap(lambda k: subsample(k, labels, 20, 0.5))(keys)
    pos_sel, neg_sel = np.asarray(pos_sel), np.asarray(neg_sel)
    assert (pos_sel.sum(1) == 10).all() and (neg_sel.sum(1) == 10).all()
    assert not np.array_equal(pos_sel[0], pos_sel[1])
    assert not np.array_equal(neg_sel[0], neg_sel[1])
    # Each positive is drawn with probability 10 / 20, each negative 10 / 200 (std ~0.011, 0.005).
    np.testing.assert_allclose(pos_sel[:, :20].mean(0), 0.5, atol=0.06)
    np.testing.assert_allclose(neg_sel[:, 20:].mean(0), 0.05, atol=0.025)
    assert not pos_sel[:, 20:].any() and not neg_sel[:, :20].any()


def test_sampling_one_trace_per_shape():
    traces = []

    @jax.jit
    def f(key, labels):
        traces.append(1)
        return sample_indices(key, labels, 16, 0.25), subsample(key, labels, 16, 0.25)

    rng = np.random.default_rng(0)
    for i in range(3):
        f(jax.random.key(i), jnp.asarray(rng.integers(-1, 2, 50), jnp.int32))
    assert len(traces) == 1
