"""The real Mask R-CNN train step: it learns on the tiny shapes set, and one step on 2 devices
(pmap, jit over a mesh, and pmap with gradient accumulation) equals one step on 1 device with the
same global batch.

The multi-device check needs emulated CPU devices, fixed when JAX initialises, so it runs in a
subprocess (`python -m tests.test_train_mask_rcnn`). Two devices, two examples each: with 8
emulated devices on a 2-core machine the real model's all-reduce threads starve past XLA's 40 s
rendezvous timeout (the 8-device case is covered on a small net by tests/test_parallel.py).
"""

from __future__ import annotations

import jax
import numpy as np

from configs import tiny
from mrcnn_jax import losses, mask_rcnn, train
from tests.multidevice import run_on_devices

DEVICES = 2
GLOBAL_BATCH = 4


def _setup(config, axis_name=None):
    model = mask_rcnn.build_model(config.model, axis_name=axis_name)  # used by sync_bn only
    variables = mask_rcnn.init_variables(model, jax.random.key(0), config.data.image_size)
    trainable = mask_rcnn.trainable_mask(variables["params"], config.model)
    tx, schedule = train.optimizer_from_config(config.train, variables["params"], trainable)
    state = train.create_train_state(variables, tx, jax.random.key(1))
    loss_fn = losses.make_loss_fn(model, config.model, config.data.image_size, axis_name)
    return state, loss_fn, schedule, trainable


def test_loss_goes_down_on_tiny_shapes(tmp_path):
    """The real step with the config's SGD recipe on a batch of the tiny shapes set: a few dozen
    steps on that batch drive its loss well down (fresh batches at batch 2 are too noisy to show
    it in so few steps)."""
    from mrcnn_jax.data import pipeline

    config = tiny.get_config()
    config.data.data_dir = str(tmp_path)
    config.train.warmup_steps = 5
    config.train.decay_steps = (1000,)
    state, loss_fn, schedule, trainable = _setup(config)
    placement = train.make_placement("mesh", devices=jax.devices()[:1])
    step = train.compile_train_step(
        placement, loss_fn=loss_fn, learning_rate_fn=schedule, trainable=trainable
    )
    state = placement.put_state(state)
    batch = placement.put_batch(next(pipeline.train_batches(config)))
    history = []
    for _ in range(40):
        state, metrics = step(state, batch)
        history.append(placement.get_metrics(metrics)["loss"])
    assert np.all(np.isfinite(history))
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.6 * first, np.round(history, 3)


def test_pmap_and_mesh_match_one_device():
    out = run_on_devices("tests.test_train_mask_rcnn", DEVICES)
    assert "mask r-cnn parallel equivalence: ok" in out


def _one_step(kind: str, batch, accum_steps: int = 1):
    config = tiny.get_config()
    # Frozen stem + res2: their parameters enter as constants and, on the CPU, they run image by
    # image (`model.frozen_stages_per_image`), on each device's examples or over the sharded batch.
    config.model.freeze_at = 2
    devices = jax.devices() if kind != "single" else jax.devices()[:1]
    placement = train.make_placement("pmap" if kind == "pmap" else "mesh", devices=devices)
    state, loss_fn, schedule, trainable = _setup(
        config, axis_name=train.PMAP_AXIS if kind == "pmap" else None
    )
    step = train.compile_train_step(
        placement, loss_fn=loss_fn, learning_rate_fn=schedule, trainable=trainable,
        accum_steps=accum_steps,
    )
    state, metrics = step(placement.put_state(state), placement.put_batch(batch))
    return placement.get_state(state).params, placement.get_metrics(metrics)


def _main():
    from mrcnn_jax.data.synthetic import make_batch

    assert jax.device_count() == DEVICES, jax.devices()
    batch = make_batch(tiny.get_config(), GLOBAL_BATCH, seed=5)
    # The first device's first image has no instances: the devices hold different numbers of
    # positive RoIs, which the batch-wide mask loss must normalise as one device would.
    batch["gt_valid"][0] = False
    # Gradient accumulation under pmap: micro-batch j is examples j mod 2 of the global batch
    # on 1 or 2 devices ({0, 2} and {1, 3}: 0 and 2 positive images), its mask loss normalised
    # over that micro-batch's positives on all devices. (The mesh's accumulation is checked on
    # a small net in tests/test_parallel.py.)
    refs = {accum: _one_step("single", batch, accum) for accum in (1, 2)}
    for kind, accum in (("pmap", 1), ("mesh", 1), ("pmap", 2)):
        params, metrics = _one_step(kind, batch, accum)
        ref_params, ref_metrics = refs[accum]
        for name in ("loss", "loss_cls", "loss_mask", "loss_rpn_cls", "grad_norm"):
            np.testing.assert_allclose(
                metrics[name], ref_metrics[name], rtol=2e-4, err_msg=f"{kind}: {name}"
            )
        flat = jax.tree_util.tree_leaves_with_path(params)
        for (path, a), b in zip(flat, jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                err_msg=f"{kind}: {jax.tree_util.keystr(path)}",
            )
    # The losses that are means over images are those of the whole batch when accumulated.
    for name in ("loss_cls", "loss_rpn_cls", "loss_box", "loss_rpn_box"):
        np.testing.assert_allclose(refs[2][1][name], refs[1][1][name], rtol=1e-4, err_msg=name)
    print("mask r-cnn parallel equivalence: ok")


if __name__ == "__main__":
    _main()
