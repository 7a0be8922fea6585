"""Resuming the real Mask R-CNN run is exact: 4 straight steps == 2 steps, stop, 2 more steps.

Model, optimizer, step, RNG and the data position all come back from the orbax checkpoint; the
input pipeline is deterministic by step, so the resumed run sees the same batches.
"""

import jax
import numpy as np

from configs import tiny
from mrcnn_jax import checkpoint, evaluate, train


def _run(config, workdir, num_steps):
    config = config.copy_and_resolve_references()
    config.train.num_steps = num_steps
    return train.train_and_evaluate(config, workdir)


def test_stopped_and_resumed_run_is_bit_identical(tmp_path, monkeypatch):
    # Evaluation is not what is tested here; skipping it saves a predict compile per run.
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *args, **kwargs: {})
    config = tiny.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.train.checkpoint_every = 2
    straight = _run(config, str(tmp_path / "straight"), 4)
    _run(config, str(tmp_path / "resumed"), 2)
    assert checkpoint.latest_step(str(tmp_path / "resumed" / "checkpoints")) == 2
    resumed = _run(config, str(tmp_path / "resumed"), 4)
    assert int(straight.step) == int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and training did move the weights
    fresh = _run(config, str(tmp_path / "zero"), 0)
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(straight.params), strict=True)
    )
