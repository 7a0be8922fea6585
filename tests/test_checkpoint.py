"""Checkpoints: round trip, resume == uninterrupted (bit for bit), SIGTERM, crashes, weights."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import serialization

from mrcnn_jax import checkpoint as ckpt_lib
from tests.test_train import make_batch, run_loop, tiny_state


def assert_same_bits(a, b):
    """Same structure and bytes; the static optimizer of a TrainState is not compared."""
    leaves_a, tree_a = jax.tree.flatten(jax.device_get(serialization.to_state_dict(a)))
    leaves_b, tree_b = jax.tree.flatten(jax.device_get(serialization.to_state_dict(b)))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_keeps_last_k_and_metadata(tmp_path):
    _, state, _ = tiny_state()
    with ckpt_lib.CheckpointManager(str(tmp_path), keep=2) as checkpoints:
        assert checkpoints.latest_step() is None
        assert checkpoints.restore_latest(state) is state
        for step in (1, 2, 3):
            checkpoints.save(step, state.replace(step=state.step + step))
        checkpoints.save(3, state)  # an existing step is kept as it is, not overwritten
        checkpoints.wait()
        assert checkpoints.all_steps() == [2, 3]
        assert checkpoints.metadata(3) == {"step": 3, "data_position": 3, "process_count": 1}
    with ckpt_lib.CheckpointManager(str(tmp_path), keep=2) as checkpoints:
        _, fresh, _ = tiny_state(lr=0.5)  # another optimizer: the static tx comes from the target
        restored = checkpoints.restore(fresh)
    assert int(restored.step) == 3
    assert restored.tx is fresh.tx
    assert_same_bits(restored.replace(step=state.step), state)


def test_resume_is_bit_identical(tmp_path):
    straight = run_loop(str(tmp_path / "a"), 6, checkpoint_every=2)
    first = run_loop(str(tmp_path / "b"), 3, checkpoint_every=2)
    assert int(first.step) == 3
    resumed = run_loop(str(tmp_path / "b"), 6, checkpoint_every=2)
    assert int(resumed.step) == 6
    assert_same_bits(resumed, straight)
    with ckpt_lib.CheckpointManager(str(tmp_path / "b" / "checkpoints")) as checkpoints:
        assert checkpoints.all_steps() == [2, 3, 4, 6]


def test_sigterm_saves_and_stops_then_resumes(tmp_path, caplog):
    def batches(start):
        for step in range(start, 100):
            if step == 2 and start == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # preempted while step 3 is prepared
            yield make_batch(step)

    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING):
        stopped = run_loop(str(tmp_path), 8, checkpoint_every=5, batches=batches)
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is restored
    assert int(stopped.step) == 3
    assert "SIGTERM" in caplog.text and "step 3" in caplog.text
    with ckpt_lib.CheckpointManager(str(tmp_path / "checkpoints")) as checkpoints:
        assert checkpoints.all_steps() == [3]
    resumed = run_loop(str(tmp_path), 8, checkpoint_every=5, batches=batches)
    assert_same_bits(resumed, run_loop(str(tmp_path / "straight"), 8))


_CRASHING_SAVE = """
import os, sys
import numpy as np
from orbax.checkpoint._src.path import atomicity
from mrcnn_jax import checkpoint as ckpt_lib

def crash(self, *args, **kwargs):  # the process dies after the files are written, before commit
    os._exit(3)

manager = ckpt_lib.CheckpointManager(sys.argv[1], keep=3)
manager.save(1, {"w": np.arange(4, dtype=np.float32)})
manager.wait()
atomicity.AtomicRenameTemporaryPath.finalize = crash
atomicity.CommitFileTemporaryPath.finalize = crash
manager.save(2, {"w": np.full(4, 7.0, np.float32)})
manager.wait()
"""


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    code = textwrap.dedent(_CRASHING_SAVE)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith("2.orbax-checkpoint-tmp")]
    assert leftovers, os.listdir(tmp_path)  # the interrupted save left its temporary directory

    assert ckpt_lib.latest_step(str(tmp_path)) == 1
    with ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        assert checkpoints.all_steps() == [1]
        restored = checkpoints.restore({"w": np.zeros(4, np.float32)})
        np.testing.assert_array_equal(restored["w"], np.arange(4, dtype=np.float32))
        checkpoints.save(2, {"w": np.ones(4, np.float32)})  # the same step again, after the crash
        checkpoints.wait()
        assert checkpoints.all_steps() == [1, 2]
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path))  # cleaned up


def test_leftover_tmp_directory_is_ignored(tmp_path):
    _, state, _ = tiny_state()
    with ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        checkpoints.save(5, state)
    garbage = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    (garbage / "state").mkdir(parents=True)
    (garbage / "state" / "half_written").write_bytes(b"\x00" * 10)
    with ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        assert checkpoints.latest_step() == 5
        assert_same_bits(checkpoints.restore_latest(state), state)


def _truncate_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)


def test_a_resume_on_another_host_count_warns_that_the_data_stream_differs(
    tmp_path, caplog, monkeypatch
):
    _, state, _ = tiny_state()
    with ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        checkpoints.save(1, state)
    with caplog.at_level(logging.WARNING), ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        checkpoints.restore_latest(state)  # the same host count: nothing to say
        assert "processes" not in caplog.text
        written = checkpoints.metadata(1)
        assert written["process_count"] == 1
        # as if a run on 4 hosts had written it (orbax itself cannot be run on a faked count)
        monkeypatch.setattr(checkpoints, "metadata", lambda step: {**written, "process_count": 4})
        assert_same_bits(checkpoints.restore_latest(state), state)
    assert "written by a run on 4 processes, this one has 1" in caplog.text
    assert "resume on 4 processes" in caplog.text


def test_a_resume_with_another_batch_size_warns_and_other_devices_are_logged(tmp_path, caplog):
    """The data stream is counted in steps of the global batch: another batch size skips or
    repeats examples, which is said, naming both sizes; other devices compute the same."""
    _, state, _ = tiny_state()
    written = {"global_batch_size": 16, "devices": 8, "parallelism": "pmap"}
    with ckpt_lib.CheckpointManager(str(tmp_path), run=written) as checkpoints:
        checkpoints.save(5, state)
        checkpoints.wait()
        assert checkpoints.metadata(5) == {
            "step": 5, "data_position": 5, "process_count": 1, **written
        }
    same = ckpt_lib.CheckpointManager(str(tmp_path), run=written)
    with caplog.at_level(logging.INFO), same as checkpoints:
        checkpoints.restore_latest(state)
    assert "global_batch_size" not in caplog.text and "other devices" not in caplog.text
    now = {"global_batch_size": 32, "devices": 4, "parallelism": "mesh"}
    with caplog.at_level(logging.INFO), ckpt_lib.CheckpointManager(
        str(tmp_path), run=now
    ) as checkpoints:
        assert_same_bits(checkpoints.restore_latest(state), state)
    assert ("written by a run with train.global_batch_size=16, this one has 32" in caplog.text)
    assert "from example 5 x 32, not from the 5 x 16" in caplog.text
    assert "--config.train.global_batch_size=16 for the same run" in caplog.text
    assert "other devices (devices 8 -> 4, parallelism pmap -> mesh)" in caplog.text


def test_an_unreadable_latest_checkpoint_falls_back_and_is_set_aside(tmp_path, caplog):
    """Damaged files in the latest step, then a stray empty step directory: each restart resumes
    from the newest step that reads, moves the bad ones out of the way (kept, not deleted), and
    saving those steps again works."""
    _, state, _ = tiny_state()
    directory = tmp_path / "checkpoints"
    with ckpt_lib.CheckpointManager(str(directory)) as checkpoints:
        for step in (1, 2, 3):
            checkpoints.save(step, state.replace(step=state.step + step))
    _truncate_files(directory / "3" / "state")
    with caplog.at_level(logging.WARNING), ckpt_lib.CheckpointManager(str(directory)) as checkpoints:
        restored = checkpoints.restore_latest(state)
        assert int(restored.step) == 2
        assert checkpoints.all_steps() == [1, 2]
        checkpoints.save(3, state.replace(step=state.step + 3))  # saved anew
        checkpoints.wait()
    assert f"cannot restore {directory}/3" in caplog.text
    aside = tmp_path / ckpt_lib.UNREADABLE_DIR
    assert sorted(os.listdir(aside)) == ["3"] and (aside / "3" / "state").is_dir()
    (directory / "7").mkdir()  # a stray step directory
    with ckpt_lib.CheckpointManager(str(directory)) as checkpoints:
        assert checkpoints.latest_step() == 7
        assert int(checkpoints.restore_latest(state).step) == 3
        assert checkpoints.all_steps() == [1, 2, 3]
    assert sorted(os.listdir(aside)) == ["3", "7"]


def test_a_state_of_another_shape_is_refused_and_nothing_is_moved(tmp_path):
    _, state, _ = tiny_state()
    with ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        checkpoints.save(1, state)
        checkpoints.save(2, state)
    wider = jax.tree.map(
        lambda x: np.zeros((*np.shape(x)[:-1], np.shape(x)[-1] + 1), np.asarray(x).dtype)
        if np.ndim(x) else x, state.params,
    )
    with ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        with pytest.raises(ckpt_lib.RestoreError, match=r"steps \[2, 1\]") as error:
            checkpoints.restore_latest(state.replace(params=wider))
        assert checkpoints.all_steps() == [1, 2]
    # Named from the metadata, parameters first, before any array is read.
    message = str(error.value)
    first = message.index("do not fit this state: ") + len("do not fit this state: ")
    assert message[first:].startswith("params/")
    name, shape = next(iter(ckpt_lib._shapes({"params": state.params}).items()))
    assert f"{name}: checkpoint {shape} vs state {(*shape[:-1], shape[-1] + 1)}" in message


# ----------------------------------------------------------------------------- weights only


def test_load_weights_from_workdir_and_step_dir(tmp_path):
    final = run_loop(str(tmp_path), 2)
    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "2"):
        loaded = ckpt_lib.load_weights(str(path))
        assert set(loaded) == {"params", "batch_stats"}
        assert_same_bits(loaded["params"], final.params)
        assert_same_bits(loaded["batch_stats"], final.model_state["batch_stats"])
    with pytest.raises(FileNotFoundError):
        ckpt_lib.load_weights(str(tmp_path / "nothing_here"))


def test_merge_weights_lists_every_mismatch_and_skips():
    fresh = {
        "params": {"a": {"kernel": np.zeros((2, 3), np.float32)}, "cls": {"bias": np.zeros(4)}},
        "batch_stats": {"bn": {"mean": np.zeros(3, np.float32)}},
    }
    loaded = {
        "params": {"a": {"kernel": np.ones((2, 3), np.float64)}, "cls": {"bias": np.ones(9)}},
        "batch_stats": {"bn": {"mean": np.ones(3)}},
    }
    merged = ckpt_lib.merge_weights(fresh, loaded, skip=lambda name: name.startswith("params/cls"))
    np.testing.assert_array_equal(merged["params"]["a"]["kernel"], np.ones((2, 3)))
    assert merged["params"]["a"]["kernel"].dtype == np.float32  # the model's dtype
    np.testing.assert_array_equal(merged["params"]["cls"]["bias"], np.zeros(4))  # re-initialised
    np.testing.assert_array_equal(merged["batch_stats"]["bn"]["mean"], np.ones(3))

    bad = {"params": {"cls": {"bias": np.ones(9)}, "extra": {"w": np.ones(1)}}}
    with pytest.raises(ckpt_lib.WeightsMismatchError) as err:
        ckpt_lib.merge_weights(fresh, bad)
    text = str(err.value)
    assert "missing (2)" in text and "params/a/kernel" in text and "batch_stats/bn/mean" in text
    assert "unexpected (1)" in text and "params/extra/w" in text
    assert "mis-shaped (1)" in text and "params/cls/bias: checkpoint (9,) vs model (4,)" in text


def test_labels_round_trip_and_malformed_files_name_the_file(tmp_path):
    path = ckpt_lib.write_labels(str(tmp_path), ("background", "cat", "dog"), {1: 17, 2: 18})
    assert ckpt_lib.read_labels(str(tmp_path)) == (("background", "cat", "dog"), {1: 17, 2: 18})
    assert ckpt_lib.read_labels(str(tmp_path / "none")) is None
    with open(path, "w") as f:
        f.write('{"class_names": ["background"]}')
    with pytest.raises(ValueError, match="labels.json"):
        ckpt_lib.read_labels(str(tmp_path))


def test_prediction_labels_come_from_the_weights_workdir_before_the_dataset(tmp_path, caplog):
    from configs import coco_folder
    from mrcnn_jax import predict

    config = coco_folder.get_config()
    config.data.root = str(tmp_path / "not_here")
    names, mapping = predict.labels(str(tmp_path), config)  # no labels.json, no dataset
    assert names is None and mapping == {}
    assert "category_id are the model's contiguous labels" in caplog.text
    ckpt_lib.write_labels(str(tmp_path / "init"), ("background", "a"), {1: 9})
    config.train.init_checkpoint = str(tmp_path / "init")
    assert predict.labels(str(tmp_path), config) == (("background", "a"), {1: 9})
    ckpt_lib.write_labels(str(tmp_path), ("background", "b"), {1: 4})
    # No checkpoint in the workdir: the weights, and so the labels, are init_checkpoint's ...
    assert predict.labels(str(tmp_path), config) == (("background", "a"), {1: 9})
    # ... while weights of the workdir's own come with its labels.
    assert predict.labels(str(tmp_path), config, str(tmp_path)) == (("background", "b"), {1: 4})


def test_prediction_labels_follow_the_weights(tmp_path):
    """A workdir with labels.json but no checkpoint (a run stopped before its first save) predicts
    with init_checkpoint's weights: their labels, not the workdir's."""
    from configs import coco_folder
    from mrcnn_jax import predict

    config = coco_folder.get_config()
    config.data.root = str(tmp_path / "not_here")
    ckpt_lib.write_labels(str(tmp_path / "work"), ("background", "new"), {1: 5})
    init = tmp_path / "coco"
    ckpt_lib.write_labels(str(init), ("background", "person"), {1: 1})
    config.train.init_checkpoint = str(init / "checkpoints" / "0")  # a step directory
    source = config.train.init_checkpoint  # as weights_source gives it: no checkpoint in work/
    assert predict.labels(str(tmp_path / "work"), config, source) == (("background", "person"), {1: 1})


def test_weights_made_for_other_inputs_are_refused(tmp_path):
    """detectron2's MSRA family (BGR, std 1, stride in the 1x1) under a torchvision-normalised
    config: every mismatching key is named, with the file and the flags that fix it, whichever
    path of the weights is given; the same family, or weights without a config.json, pass."""
    import json

    from configs import detectron2_r50_fpn_1x, torchvision_r50_fpn
    from mrcnn_jax import train

    work = tmp_path / "converted"
    (work / "checkpoints" / "0").mkdir(parents=True)
    d2 = detectron2_r50_fpn_1x.get_config()
    (work / "config.json").write_text(d2.to_json_best_effort())
    tv = torchvision_r50_fpn.get_config()
    for path in (work, work / "checkpoints", work / "checkpoints" / "0"):
        with pytest.raises(ValueError) as info:
            ckpt_lib.check_input_convention(tv, str(path))
        message = str(info.value)
        for key in ("data.pixel_mean", "data.pixel_std", "data.channel_order",
                    "model.stride_in_1x1"):
            assert key in message
        assert str(work / "config.json") in message
        assert "--config.data.channel_order=BGR" in message
        assert "--config.data.pixel_std=1.0,1.0,1.0" in message
    ckpt_lib.check_input_convention(d2, str(work))  # the same family
    d2.data.pixel_mean = tuple(json.loads((work / "config.json").read_text())["data"]["pixel_mean"])
    ckpt_lib.check_input_convention(d2, str(work / "checkpoints" / "0"))
    ckpt_lib.check_input_convention(tv, str(tmp_path / "elsewhere"))  # no config.json: unchecked
    # Fine-tuning refuses them before any weight is read (there are none here to read).
    tv.train.init_checkpoint = str(work)
    with pytest.raises(ValueError, match="model.stride_in_1x1"):
        train._initial_variables(tv, None, None, resuming=False)


def test_a_config_json_from_before_new_keys_says_which_it_lacks(tmp_path, caplog):
    """A torchvision conversion saved before model.anchor_grid / model.norm_eps existed loads with
    base's values for them; the warning names each key, its value and the file."""
    import json

    from configs import torchvision_r50_fpn
    from mrcnn_jax import predict

    saved = torchvision_r50_fpn.get_config().to_dict()
    del saved["model"]["anchor_grid"], saved["model"]["norm_eps"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved, default=list))
    with caplog.at_level(logging.WARNING):
        config = predict.load_config(str(path))
    assert config.model.anchor_round and config.model.anchor_grid == "detectron2"
    assert "model.anchor_grid, model.norm_eps" in caplog.text and str(path) in caplog.text
    assert "model.anchor_grid='detectron2'" in caplog.text and "model.norm_eps=1e-05" in caplog.text
    caplog.clear()
    path.write_text(json.dumps(torchvision_r50_fpn.get_config().to_dict(), default=list))
    with caplog.at_level(logging.WARNING):
        predict.load_config(str(path))
    assert "predates" not in caplog.text


def _params_of(state, bump: float):
    return state.replace(params=jax.tree.map(lambda p: p + bump, state.params))


def test_best_checkpoint_keeps_the_highest_evaluation_across_a_resume(tmp_path, caplog):
    _, state, _ = tiny_state()
    workdir = str(tmp_path)
    best = ckpt_lib.BestCheckpoint(workdir, "segm/AP")
    assert best.consider(10, _params_of(state, 1.0), {"segm/AP": 0.30, "bbox/AP": 0.1})
    assert not best.consider(20, _params_of(state, 2.0), {"segm/AP": 0.25})
    assert not best.consider(25, _params_of(state, 2.5), {"segm/AP": 0.30})  # a tie: the earlier
    assert best.consider(30, _params_of(state, 3.0), {"segm/AP": 0.40})
    with caplog.at_level(logging.WARNING):  # never a reason to stop a run
        assert not best.consider(40, state, {"bbox/AP": 0.9})
        assert not best.consider(50, state, {"segm/AP": float("nan")})
    assert "train.best_metric='segm/AP': the evaluation of step 40 gave None" in caplog.text
    best.close()
    assert ckpt_lib.all_steps(os.path.join(workdir, "best")) == [30]
    want = jax.device_get(_params_of(state, 3.0).params)
    for a, b in zip(jax.tree.leaves(ckpt_lib.load_weights(os.path.join(workdir, "best"))["params"]),
                    jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)

    # A resumed run compares with the value recorded with the checkpoint; resumed from before
    # the best step (its later checkpoints set aside), a better evaluation replaces it.
    again = ckpt_lib.BestCheckpoint(workdir, "segm/AP")
    assert again.best == (30, 0.40)
    assert not again.consider(40, state, {"segm/AP": 0.35})
    assert again.consider(20, _params_of(state, 4.0), {"segm/AP": 0.45})
    again.close()
    assert ckpt_lib.all_steps(os.path.join(workdir, "best")) == [20]
    # Another metric: the folder's step is replaced at the next evaluation, whatever its value.
    with caplog.at_level(logging.WARNING):
        other = ckpt_lib.BestCheckpoint(workdir, "bbox/AP50")
    assert other.best is None and "kept for segm/AP=0.45" in caplog.text
    assert other.consider(60, state, {"bbox/AP50": 0.01})
    other.close()
    # A run resumed from before the best step: that step is another course's, deleted.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = ckpt_lib.BestCheckpoint(workdir, "bbox/AP50", resumed_at=50)
    assert resumed.best is None and "after the step 50 this run resumes from" in caplog.text
    assert ckpt_lib.all_steps(os.path.join(workdir, "best")) == []
    resumed.close()


def test_checkpoint_flag_picks_a_step_best_or_a_path(tmp_path):
    from configs import tiny
    from mrcnn_jax import predict, runtime

    config = tiny.get_config()
    _, state, _ = tiny_state()
    workdir = tmp_path / "run"
    with ckpt_lib.CheckpointManager(str(workdir / "checkpoints")) as checkpoints:
        for step in (2, 4):
            checkpoints.save(step, state)
    assert predict.weights_to_use(str(workdir), config) == (str(workdir), 4)
    assert predict.weights_to_use(str(workdir), config, "2") == (
        str(workdir / "checkpoints" / "2"), 2
    )
    with pytest.raises(runtime.MissingInputError, match=r"no checkpoint of step 3 in .*steps: 2, 4"):
        predict.weights_to_use(str(workdir), config, "3")
    with pytest.raises(runtime.MissingInputError, match=r"--checkpoint=best: .*best is not a folder"):
        predict.weights_to_use(str(workdir), config, "best")
    ckpt_lib.BestCheckpoint(str(workdir), "segm/AP").consider(4, state, {"segm/AP": 0.5})
    assert predict.weights_to_use(str(workdir), config, "best") == (str(workdir / "best"), 4)
    other = tmp_path / "other"
    assert predict.weights_to_use(str(other), config, str(workdir)) == (str(workdir), 4)
    (other / "empty").mkdir(parents=True)
    with pytest.raises(runtime.MissingInputError, match=r"--checkpoint=.*empty: no checkpoint in"):
        predict.weights_to_use(str(other), config, str(other / "empty"))
    # --mode=eval of another workdir's checkpoint would replace this workdir's records of its
    # step with another run's numbers: refused, before a model is built.
    from mrcnn_jax import train

    with pytest.raises(runtime.InvalidInputError, match=r"is not a checkpoint of --workdir=.*other"
                       r".*evaluate it with --workdir=.*run, or from a fresh workdir"):
        train.evaluate_checkpoint(config, str(other), str(workdir / "checkpoints" / "2"))
    # The best folder's workdir is the run's: its labels.json and config.json are found there.
    assert ckpt_lib.workdir_of(str(workdir / "best")) == str(workdir)
    assert ckpt_lib.workdir_of(str(workdir / "best" / "4")) == str(workdir)
