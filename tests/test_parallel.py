"""pmap and mesh on 8 emulated CPU devices give the single-device step, to float tolerance.

JAX fixes its device count when it initialises, so the check runs in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (`python -m tests.test_parallel`).
"""

from __future__ import annotations

import numpy as np

from tests.multidevice import run_on_devices

DEVICES = 8
GLOBAL_BATCH = 16  # 2 examples per device
STEPS = 3


def test_pmap_and_mesh_match_one_device():
    assert "parallel equivalence: ok" in run_on_devices("tests.test_parallel", DEVICES, 300)


# ----------------------------------------------------------------------------- the subprocess


def _loop(model_axis, placement, workdir=None):
    """STEPS steps of TinyNet through train_loop on `placement`; returns the host state."""
    from mrcnn_jax import checkpoint as ckpt_lib
    from mrcnn_jax import train
    from tests.test_train import batch_iter, make_loss_fn, tiny_state

    model, state, schedule = tiny_state(axis_name=model_axis)
    step_fn = train.compile_train_step(
        placement, loss_fn=make_loss_fn(model), learning_rate_fn=schedule
    )
    writer = train.MetricWriter(None, log_every=1, num_steps=STEPS, images_per_step=GLOBAL_BATCH)
    checkpoints = None if workdir is None else ckpt_lib.CheckpointManager(workdir)
    final = train.train_loop(
        state,
        step_fn,
        batch_iter(GLOBAL_BATCH),
        placement=placement,
        num_steps=STEPS,
        writer=writer,
        checkpoints=checkpoints,
    )
    if checkpoints is not None:
        checkpoints.close()
    return final


def _assert_close(a, b, what):
    import jax
    from flax import serialization

    flat_a = jax.tree_util.tree_flatten_with_path(serialization.to_state_dict(a))[0]
    flat_b = jax.tree.leaves(serialization.to_state_dict(b))
    assert len(flat_a) == len(flat_b), what
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6, err_msg=f"{what}: {path}"
        )


def _first_step(placement, model_axis, accum_steps=1):
    from mrcnn_jax import train
    from tests.test_train import make_batch, make_loss_fn, tiny_state

    model, state, schedule = tiny_state(axis_name=model_axis)
    step_fn = train.compile_train_step(
        placement, loss_fn=make_loss_fn(model), learning_rate_fn=schedule,
        accum_steps=accum_steps,
    )
    batch = placement.put_batch(make_batch(0, GLOBAL_BATCH))
    new, metrics = step_fn(placement.put_state(state), batch)
    return placement.get_metrics(metrics), placement.get_state(new)


def _main():
    import tempfile

    import jax

    from mrcnn_jax import checkpoint as ckpt_lib
    from mrcnn_jax import train
    from tests.test_train import make_batch

    assert jax.device_count() == DEVICES, jax.devices()
    single = train.make_placement("mesh", devices=jax.devices()[:1])
    pmap = train.make_placement("pmap")
    mesh = train.make_placement("mesh")

    want = _loop(None, single)
    # Sync BN under pmap (axis "batch"); under the mesh BatchNorm already sees the global batch.
    _assert_close(_loop(train.PMAP_AXIS, pmap), want, "pmap")
    with tempfile.TemporaryDirectory() as tmp:
        got = _loop(None, mesh, workdir=tmp)
        _assert_close(got, want, "mesh")
        # The replicated global arrays of the mesh checkpoint load back on one device.
        loaded = ckpt_lib.load_weights(tmp)
        _assert_close(loaded["params"], got.params, "mesh checkpoint")

    # accum 2: micro-batch j is the global batch's examples j mod 2 on any number of devices,
    # with sync BN over it, so the accumulated step does not depend on the device count either.
    for accum in (1, 2):
        want_metrics, want_state = _first_step(single, None, accum)
        for name, placement, axis in (("pmap", pmap, train.PMAP_AXIS), ("mesh", mesh, None)):
            got_metrics, got_state = _first_step(placement, axis, accum)
            assert set(got_metrics) == set(want_metrics), name
            for k, v in want_metrics.items():
                np.testing.assert_allclose(
                    got_metrics[k], v, rtol=2e-5, err_msg=f"{name} accum {accum} {k}"
                )
            _assert_close(got_state.params, want_state.params, f"{name} accum {accum}")
            _assert_close(got_state.model_state, want_state.model_state, f"{name} accum {accum}")

    # Per-device BatchNorm under pmap: the statistics are averaged, so every device holds the
    # same copy, and the running mean is the global one (a mean of equal-sized shard means).
    from tests.test_train import make_loss_fn, tiny_state

    model, state, schedule = tiny_state(axis_name=None)
    step_fn = train.compile_train_step(pmap, loss_fn=make_loss_fn(model), learning_rate_fn=schedule)
    new, _ = step_fn(pmap.put_state(state), pmap.put_batch(make_batch(0, GLOBAL_BATCH)))
    stats = jax.device_get(new.model_state["batch_stats"]["bn1"])
    for x in jax.tree.leaves(stats):
        assert all(np.array_equal(x[0], x[i]) for i in range(DEVICES))
    ref_model, ref_state, ref_schedule = tiny_state(axis_name=None)
    ref_step = train.compile_train_step(
        single, loss_fn=make_loss_fn(ref_model), learning_rate_fn=ref_schedule
    )
    ref, _ = ref_step(single.put_state(ref_state), single.put_batch(make_batch(0, GLOBAL_BATCH)))
    np.testing.assert_allclose(
        stats["mean"][0], ref.model_state["batch_stats"]["bn1"]["mean"], rtol=1e-5, atol=1e-6
    )
    # A batch that does not split over the mesh is refused by name; the caller's state survives
    # the step's donation of its placed copy (as under pmap).
    import pytest

    with pytest.raises(ValueError, match=r"batch\['images'\] has 12 rows, not divisible"):
        mesh.put_batch(make_batch(0, 12))
    model, state, schedule = tiny_state(axis_name=None)
    step_fn = train.compile_train_step(mesh, loss_fn=make_loss_fn(model), learning_rate_fn=schedule)
    step_fn(mesh.put_state(state), mesh.put_batch(make_batch(0, GLOBAL_BATCH)))
    assert np.isfinite(np.asarray(state.params["head"]["kernel"])).all()
    _check_evaluation_over_local_devices()
    print("parallel equivalence: ok")


def _check_evaluation_over_local_devices():
    """Evaluation's predict over the host's 8 devices (a batch of 3, padded to 8) gives the
    one-device detections of the tiny Mask R-CNN."""
    import jax

    from configs import tiny
    from mrcnn_jax import evaluate, inference, mask_rcnn
    from mrcnn_jax.data.synthetic import make_batch as model_batch

    config = tiny.get_config()
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(0), config.data.image_size)
    predict_fn = inference.make_predict_fn(model, config.model, config.data.image_size)
    batch = model_batch(config, 3)
    batch["image_sizes"] = np.array([[64, 64], [40, 52], [64, 30]], np.int32)
    want = jax.device_get(evaluate.over_local_devices(predict_fn, variables, jax.devices()[:1])(batch))
    spread = evaluate.over_local_devices(predict_fn, variables)
    got = spread(batch)
    assert len(got.boxes.sharding.device_set) == DEVICES
    got = jax.device_get(got)
    assert int(np.sum(want.valid)) > 0
    for name in ("boxes", "scores", "classes", "valid", "masks"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"local devices {name}")


if __name__ == "__main__":
    _main()
