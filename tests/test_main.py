"""The command line: config validation, flag overrides, mode dispatch, config.json."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
from absl import flags

from configs import base, shapes, tiny
from mrcnn_jax import main, runtime, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_CONFIG = """
import ml_collections
from configs import tiny

def get_config():
    # Written as a plain dict (ConfigDict's own type checks only guard fields it already has).
    c = tiny.get_config().to_dict()
    c["train"]["bogus_rate"] = 0.1         # unknown key
    c["model"]["depth"] = "fifty"          # str where an int is expected
    c["train"]["warmup_steps"] = 10.5      # float where an int is expected
    c["train"]["distributed"] = 1          # int where a bool is expected
    c["data"]["image_size"] = ("a", "b")   # tuple of str where ints are expected
    c["data"]["flip_prob"] = 1             # int where a float is expected: fine
    c["data"]["pixel_mean"] = (120, 110, 100)  # ints for floats: fine
    return ml_collections.ConfigDict(c)
"""


def test_shipped_configs_are_valid():
    for module in (base, shapes, tiny):
        main.validate_config(module.get_config())


def test_all_offending_keys_in_one_error():
    namespace = {}
    exec(textwrap.dedent(BAD_CONFIG), namespace)  # noqa: S102 - the config file of the CLI test
    with pytest.raises(main.ConfigError) as err:
        main.validate_config(namespace["get_config"]())
    lines = str(err.value).splitlines()[1:]
    names = sorted(line.split(":")[0].strip() for line in lines)
    want = ["data.image_size", "model.depth", "train.bogus_rate", "train.distributed"]
    assert names == sorted([*want, "train.warmup_steps"])


def test_group_replaced_by_a_value_is_refused():
    errors = main.config_errors({"train": 3, "seed": 1}, base.get_config().to_dict())
    assert errors == ["train: expected a group of fields, got 3"]


def test_cli_refuses_bad_config_before_any_work(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text(textwrap.dedent(BAD_CONFIG))
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "mrcnn_jax.main", f"--config={config}", f"--workdir={workdir}"],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2  # a message, not a traceback
    assert "ConfigError: invalid config" in proc.stderr and "Traceback" not in proc.stderr
    for name in ("train.bogus_rate", "model.depth", "train.warmup_steps", "data.image_size"):
        assert name in proc.stderr
    assert not workdir.exists()  # refused before config.json, checkpoints or compilation


def test_user_errors_are_one_message_and_status_2_other_errors_propagate(caplog):
    from mrcnn_jax import checkpoint, runtime

    class LocalError(ValueError):  # a script's own error class (a __main__ copy)
        pass

    def failing(error):
        def run(argv):
            raise error

        return run

    for error in (main.ConfigError("bad key"), checkpoint.RestoreError("no step fits"),
                  LocalError("weights of another model")):
        with pytest.raises(SystemExit) as exit_info:
            runtime.reporting_user_errors(failing(error), errors=(LocalError,))([])
        assert exit_info.value.code == runtime.USER_ERROR_EXIT_STATUS
        assert f"{type(error).__name__}: {error}" in caplog.text
    with pytest.raises(KeyError):  # a bug keeps its traceback
        runtime.reporting_user_errors(failing(KeyError("x")))([])


def test_train_mode_saves_config_and_dispatches(tmp_path, monkeypatch, parse_flags):
    calls = []

    def train_and_evaluate(c, w):
        calls.append((c, w))
        return types.SimpleNamespace(step=7)  # ran to the end

    monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
    workdir = str(tmp_path / "work")
    argv = parse_flags(
        f"--config={ROOT}/configs/tiny.py",
        f"--workdir={workdir}",
        "--config.train.num_steps=7",
        "--config.data.image_size=(128, 96)",
    )
    main.main(argv)
    ((config, got_workdir),) = calls
    assert got_workdir == workdir
    assert config.train.num_steps == 7 and tuple(config.data.image_size) == (128, 96)
    # config.json is the training's to write, once the workdir's checkpoints are known to fit.
    assert not (tmp_path / "work" / "config.json").exists()


def test_a_run_stopped_by_sigterm_exits_as_not_finished(tmp_path, monkeypatch, parse_flags):
    """After SIGTERM the loop saves and returns early: the process must not report success, or a
    scheduler with restart-on-failure would take the run as done."""
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: types.SimpleNamespace(step=3))
    argv = parse_flags(f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path}")
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == main.PREEMPTED_EXIT_STATUS == 143


def test_eval_and_predict_modes_dispatch(tmp_path, monkeypatch, parse_flags):
    calls = []
    monkeypatch.setattr(
        train, "evaluate_checkpoint", lambda c, w, checkpoint: calls.append(("eval", w, checkpoint))
    )
    config = f"--config={ROOT}/configs/tiny.py"
    main.main(parse_flags(config, f"--workdir={tmp_path}", "--mode=eval"))
    main.main(parse_flags(config, f"--workdir={tmp_path}", "--mode=eval", "--checkpoint=best"))
    assert calls == [("eval", str(tmp_path), None), ("eval", str(tmp_path), "best")]
    assert not (tmp_path / "config.json").exists()  # only training writes it
    with pytest.raises(Exception, match="--input"):
        main.main(parse_flags(config, f"--workdir={tmp_path}", "--mode=predict"))
    with pytest.raises(main.app.UsageError, match="--checkpoint is for --mode=eval, predict and"):
        main.main(parse_flags(config, f"--workdir={tmp_path}", "--checkpoint=4"))
    monkeypatch.setattr(train, "evaluate_continuously", lambda c, w: calls.append(("follow", w)))
    main.main(parse_flags(config, f"--workdir={tmp_path}", "--mode=continuous_eval"))
    assert calls[-1] == ("follow", str(tmp_path))


def test_inputs_that_are_not_there_are_one_line_with_status_2(tmp_path, parse_flags, caplog):
    """A workdir that is a file, a config file or checkpoint that is not there: one message
    naming it, exit status 2, before any model is built."""
    from mrcnn_jax import mask_rcnn

    a_file = tmp_path / "afile"
    a_file.write_text("")
    config = f"--config={ROOT}/configs/tiny.py"
    cases = [
        ((config, f"--workdir={a_file}"), f"--workdir={a_file} is a file, not a folder"),
        ((f"--config={ROOT}/configs/tny.py", f"--workdir={tmp_path / 'w'}"),
         "configs/tny.py: no such file"),
        ((config, f"--workdir={tmp_path / 'empty'}", "--mode=eval"),
         "no checkpoint in {} and no config.train.init_checkpoint: train into this workdir"
         " first".format(tmp_path / "empty" / "checkpoints")),
    ]
    built = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mask_rcnn, "build_model", lambda *a, **k: built.append(1))
        for args, message in cases:
            caplog.clear()
            with pytest.raises(SystemExit) as exit_info:
                runtime.reporting_user_errors(main.main)(parse_flags(*args))
            assert exit_info.value.code == runtime.USER_ERROR_EXIT_STATUS, args
            assert message in caplog.text, caplog.text
    assert not built


def test_overrides_of_unknown_or_mistyped_keys_are_refused(parse_flags):
    config = f"--config={ROOT}/configs/tiny.py"
    with pytest.raises(AttributeError, match="bogus"):  # config_flags' own check
        parse_flags(config, "--workdir=/tmp/x", "--config.train.bogus=1")
    with pytest.raises(flags.IllegalFlagValueError, match="many"):
        parse_flags(config, "--workdir=/tmp/x", "--config.train.num_steps=many")


def test_eval_device_mask_values_are_checked():
    config = base.get_config()
    config.eval.device_masks = "yes"
    config.eval.device_mask_canvas = (640, 0)
    with pytest.raises(main.ConfigError) as err:
        main.validate_config(config)
    names = sorted(line.split(":")[0].strip() for line in str(err.value).splitlines()[1:])
    assert names == ["eval.device_mask_canvas", "eval.device_masks"]


def test_model_and_data_choices_are_checked_before_anything_runs():
    config = base.get_config()
    config.model.anchor_grid = "caffe2"
    config.model.rpn.size_divisibility = -32
    config.model.norm_eps = -1e-5
    config.model.feature_padding = "zeros"
    config.model.roi.sampling_ratio = -1
    config.model.roi.max_sampling_ratio = 0
    config.data.resize_rounding = "nearest"
    config.train.lr_schedule = "poly"
    config.train.lr_end_factor = 1.5
    config.data.train_scale_jitter = (2.0, 0.1)
    config.eval.ground_truth = "repaired"
    config.model.norm = "layer_norm"
    config.model.dtype = "float64x"
    config.model.depth = 42
    config.model.frozen_stages_per_image = "maybe"
    config.model.roi.level_mapper = "fpn"
    config.model.test.mask_paste = "foo"
    config.model.freeze_at = 7
    config.model.anchor_strides = (4, 8, 16, 32)  # five anchor sizes
    config.model.roi.box_weights = (10.0, 10.0, 5.0)
    config.data.channel_order = "XYZ"
    config.data.image_size = (64, 64, 60, 60)  # a --flagfile's tuple + a flag's: concatenated
    config.data.pixel_std = (1.0, 1.0)
    config.train.parallelism = "dp"
    config.model.loss_weights.mask = -1.0
    config.eval.batch_size = 0
    config.eval.max_examples = -1
    config.train.grad_accum_steps = 0
    config.train.best_metric = "segm/mAP"
    config.train.optimizer = "adam"
    config.train.adam_betas = (0.9, 1.0)
    config.eval.continuous_poll_s = 0.0
    with pytest.raises(main.ConfigError) as err:
        main.validate_config(config)
    names = sorted(line.split(":")[0].strip() for line in str(err.value).splitlines()[1:])
    assert names == sorted([
        "data.resize_rounding", "data.train_scale_jitter", "eval.ground_truth", "model.anchor_grid",
        "model.feature_padding", "model.norm_eps", "model.roi.max_sampling_ratio",
        "model.roi.sampling_ratio", "model.rpn.size_divisibility", "train.lr_end_factor",
        "train.lr_schedule", "model.norm", "model.dtype", "model.depth",
        "model.frozen_stages_per_image", "model.roi.level_mapper", "model.test.mask_paste",
        "model.freeze_at", "model.anchor_strides", "model.roi.box_weights", "data.channel_order",
        "data.image_size", "data.pixel_std", "train.parallelism", "model.loss_weights.mask",
        "eval.batch_size", "eval.max_examples", "train.grad_accum_steps", "train.best_metric",
        "train.optimizer", "train.adam_betas", "eval.continuous_poll_s",
    ])
    assert "expected (height, width) (2 values), got (64, 64, 60, 60)" in str(err.value)
    config = base.get_config()
    config.train.lr_schedule = "cosine"
    config.train.num_steps = 0
    with pytest.raises(main.ConfigError, match="train.num_steps: the cosine schedule"):
        main.validate_config(config)
    config = base.get_config()
    config.model.anchor_grid = "torchvision"
    config.model.rpn.size_divisibility = 0
    with pytest.raises(main.ConfigError, match="needs model.rpn.size_divisibility > 0"):
        main.validate_config(config)
    config = base.get_config()
    config.train.grad_accum_steps = 3
    with pytest.raises(main.ConfigError, match="3 does not divide train.global_batch_size 16"):
        main.validate_config(config)


def test_eval_device_mask_checks_survive_missing_keys_and_booleans():
    from mrcnn_jax import evaluate

    config = base.get_config()
    del config.eval["device_masks"]
    config.eval.device_mask_canvas = (True, 2)
    errors = evaluate.eval_config_errors(config.eval)
    assert [e.split(":")[0] for e in errors] == ["eval.device_masks", "eval.device_mask_canvas"]


def test_launch_flags_start_jax_distributed(tmp_path, monkeypatch, parse_flags):
    """--coordinator_address / --num_processes / --process_id reach jax.distributed (the real
    two-process runs are in test_multihost); without them and without train.distributed it is
    not started."""
    started = []
    monkeypatch.setattr(main.jax.distributed, "initialize", lambda **kw: started.append(kw))
    monkeypatch.setattr(train, "evaluate_checkpoint", lambda c, w, checkpoint: None)
    config = f"--config={ROOT}/configs/tiny.py"
    main.main(parse_flags(config, f"--workdir={tmp_path}", "--mode=eval"))
    main.main(parse_flags(config, f"--workdir={tmp_path}", "--mode=eval",
                          "--config.train.distributed=True"))
    main.main(parse_flags(config, f"--workdir={tmp_path}", "--mode=eval",
                          "--coordinator_address=10.0.0.1:1234", "--num_processes=4",
                          "--process_id=3"))
    assert started == [
        {},  # cluster detection (Cloud TPU, SLURM, ...)
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (("host-without-port", None, None), "host:port"),
        ((None, 0, None), "--num_processes must be >= 1"),
        ((None, 2, 2), r"--process_id=2 is not in \[0, --num_processes\)"),
        ((None, None, -1), "--process_id=-1"),
    ],
)
def test_launch_flags_that_cannot_work_are_refused(args, message):
    with pytest.raises(main.app.UsageError, match=message):
        main.distributed_kwargs(*args)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.base_rl=0.1", "config.train has no field 'base_rl' (did you mean base_lr?)"),
        ("--config.trian.base_lr=0.1", "config has no field 'trian' (did you mean train?)"),
        ("--config.train.bogus=1", "config.train has no field 'bogus' (its fields: adam_betas,"),
        # a path below a value: ml_collections raises KeyError("Attribute <class 'float'>.x ...")
        ("--config.train.base_lr.x=1",
         "config.train.base_lr is a float: it has no field 'x'"
         " (set it with --config.train.base_lr=VALUE)"),
        ("--config.train.init_checkpoint.path=a", "config.train.init_checkpoint is a str"),
        ("--config.data.image_size[1]=96",
         "config.data.image_size is a tuple, set as a whole: --config.data.image_size=A,B,..."),
        ("--config.data.image_size.1=1", "config.data.image_size is a tuple: it has no field '1'"),
        ("--config.train[0]=1", "config.train is a ConfigDict: it has no item [0] (set its"
         " fields: --config.train.FIELD=VALUE; its fields: adam_betas,"),
    ],
)
def test_an_override_of_a_key_that_does_not_exist_is_one_line(override, message, parse_flags):
    raised = (AttributeError, KeyError, TypeError, IndexError, ValueError)  # ml_collections'
    with pytest.raises(raised) as error:
        parse_flags(f"--config={ROOT}/configs/tiny.py", "--workdir=w", override)
    argv = ["mrcnn_jax.main", f"--config={ROOT}/configs/tiny.py", override]
    assert message in runtime.unknown_override_message(argv, error.value)
    assert runtime.unknown_override_message(argv[:2], error.value) is None  # not ours: re-raised


def test_a_missing_config_file_with_an_override_is_one_line(parse_flags, capsys, monkeypatch):
    argv = ["mrcnn_jax.main", f"--config={ROOT}/configs/tny.py", "--workdir=w",
            "--config.train.base_lr=0.1"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    with pytest.raises(SystemExit) as exit_info:
        runtime.parse_flags(argv)
    assert exit_info.value.code == 1
    assert f"--config={ROOT}/configs/tny.py: no such file" in capsys.readouterr().err


def test_cli_reports_an_unknown_override_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mrcnn_jax.main", f"--config={ROOT}/configs/tiny.py",
         f"--workdir={tmp_path / 'work'}", "--config.model.rpn.nms_iuo=0.6"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--config.model.rpn.nms_iuo: config.model.rpn has no field 'nms_iuo'" in proc.stderr
    assert "did you mean nms_iou" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_orbax_info_records_are_left_out_at_the_default_verbosity():
    import logging

    absl_logger = logging.getLogger("absl")
    saved = list(absl_logger.filters)
    # an in-process main.main of another test may have installed it already
    absl_logger.filters[:] = before = [f for f in saved if not isinstance(f, runtime._OrbaxInfo)]
    try:
        runtime.quiet_library_logs(verbosity=1)  # -v 1: everything stays
        assert absl_logger.filters == before
        runtime.quiet_library_logs(verbosity=0)
        runtime.quiet_library_logs(verbosity=0)  # once only
        added = [f for f in absl_logger.filters if f not in before]
        assert len(added) == 1

        def record(level, path):
            return logging.LogRecord("absl", level, path, 1, "m", None, None)

        orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/atomicity.py"
        assert not added[0].filter(record(logging.INFO, orbax))
        assert added[0].filter(record(logging.WARNING, orbax))
        assert added[0].filter(record(logging.INFO, "/work/main/mrcnn_jax/train.py"))
    finally:
        absl_logger.filters[:] = saved


def test_progress_bars_only_on_a_terminal():
    """TFDS's preparation bars go to a terminal, not into a log file or a cluster's log."""
    import io

    from tensorflow_datasets.core.utils import tqdm_utils

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def drawn() -> str:
        out = io.StringIO()
        for _ in tqdm_utils.tqdm(range(3), file=out):
            pass
        return out.getvalue()

    try:
        assert runtime.progress_bars_for(io.StringIO()) is False
        assert drawn() == ""
        assert runtime.progress_bars_for(Terminal()) is True
        assert "3/3" in drawn()
    finally:
        runtime.progress_bars_for(Terminal())  # TFDS's default for the tests that follow
