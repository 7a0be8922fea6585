"""The loss normalisers against plain numpy definitions (torchvision's `maskrcnn_loss`: one BCE
mean over every positive RoI of the batch and its pixels)."""

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax import losses


def _bce(logits, targets):
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def _batch(rng, positives, slots=6, size=4):
    logits = rng.normal(size=(len(positives), slots, size, size)).astype(np.float32)
    targets = (rng.random((len(positives), slots, size, size)) > 0.5).astype(np.float32)
    valid = np.arange(slots)[None, :] < np.asarray(positives)[:, None]
    return logits, targets, valid


def _reference(logits, targets, valid):
    """Mean over all valid RoIs of the batch of each RoI's mean pixel BCE (0 without any)."""
    per_roi = _bce(logits, targets).mean(axis=(2, 3))
    return per_roi[valid].mean() if valid.any() else 0.0


def test_mask_loss_is_one_mean_over_the_batch_positives():
    rng = np.random.default_rng(0)
    for positives in ([1, 6], [0, 3], [2, 2, 5], [0, 0]):
        logits, targets, valid = _batch(rng, positives)
        sums, counts = jax.vmap(losses.mask_loss)(logits, targets, valid)
        got = losses.batch_mean(sums, counts)
        np.testing.assert_allclose(got, _reference(logits, targets, valid), rtol=1e-6, atol=1e-7)


def test_batch_mean_under_pmap_is_the_whole_batch_mean():
    """Per-device values averaged the way the train step averages them (a mean over devices)
    equal the whole batch's mean, whatever each device's count."""
    n = jax.local_device_count()
    rng = np.random.default_rng(1)
    totals = rng.random((n, 3)).astype(np.float32)
    counts = rng.integers(0, 4, (n, 3)).astype(np.int32)
    per_device = jax.pmap(lambda t, c: losses.batch_mean(t, c, "d"), axis_name="d")(totals, counts)
    expected = totals.sum() / max(counts.sum(), 1)
    np.testing.assert_allclose(np.mean(per_device), expected, rtol=1e-6)
    # The gradients, averaged over devices as the step averages them: 1 / the total count.
    grads = jax.pmap(jax.grad(lambda t, c: losses.batch_mean(t, c, "d")), axis_name="d")(
        totals, counts
    )
    np.testing.assert_allclose(grads / n, np.full_like(totals, 1 / max(counts.sum(), 1)), rtol=1e-6)


def test_mask_loss_ignores_padded_slots():
    rng = np.random.default_rng(2)
    logits, targets, valid = _batch(rng, [2])
    sums, counts = losses.mask_loss(jnp.asarray(logits[0]), targets[0], valid[0])
    logits[0, 2:] = 1e6  # padded slots: any value
    sums2, counts2 = losses.mask_loss(jnp.asarray(logits[0]), targets[0], valid[0])
    assert int(counts) == int(counts2) == 2 and float(sums) == float(sums2)


def test_too_few_mask_slots_are_reported(caplog):
    """max_mask_rois below the positives an image can sample drops mask loss silently otherwise."""
    import logging

    from configs import tiny
    from mrcnn_jax import mask_rcnn

    config = tiny.get_config()
    model = mask_rcnn.build_model(config.model)
    roi = config.model.roi
    most = int(roi.batch_size_per_image * roi.positive_fraction)
    with caplog.at_level(logging.WARNING):
        roi.max_mask_rois = most
        losses.make_loss_fn(model, config.model, config.data.image_size)
        assert "max_mask_rois" not in caplog.text
        roi.max_mask_rois = most - 1
        losses.make_loss_fn(model, config.model, config.data.image_size)
    assert f"max_mask_rois={most - 1} < {most} positives" in caplog.text

