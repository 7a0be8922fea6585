"""The command line: `python -m mrcnn_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]`.

    --mode=train    train (resuming from DIR/checkpoints when it holds one), evaluate at the end
    --mode=eval     evaluate the latest checkpoint of DIR (or config.train.init_checkpoint;
                    --checkpoint=STEP|best|PATH another)
    --mode=continuous_eval  evaluate DIR's checkpoints as training writes them (a job of its
                    own; train with --config.train.eval_every=-1)
    --mode=predict  run the model on --input: an image file, a folder of images or "split:NAME"
    --mode=export   write the predict step as a serialized StableHLO program with its weights
                    (mrcnn_jax.export) to --export_dir, default DIR/export

Several hosts: `--config.train.distributed=True` (clusters jax.distributed detects), or
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on each host.

Config fields are overridden with `--config.train.base_lr=0.01`. The loaded config is checked
against `configs.base.get_config()` before anything is compiled: every key must exist there with a
compatible type. The console script `mrcnn-jax` calls `run()`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mrcnn_jax import runtime
from mrcnn_jax.runtime import ConfigError  # noqa: F401 - main.ConfigError, where it is raised

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and outputs go here.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "continuous_eval", "predict", "export"], "What to do."
)
_INPUT = flags.DEFINE_string(
    "input", None, 'predict: an image file, a folder of images, or "split:NAME" of the dataset.'
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None,
    "eval / predict / export: the weights, a step of WORKDIR's checkpoints (e.g. 60000), 'best'"
    " (WORKDIR/best, kept by train.best_metric) or a path (WORKDIR, its checkpoints folder, one"
    " step folder; for predict and export also another workdir or a mrcnn_jax.convert output);"
    " default: WORKDIR's latest checkpoint, else config.train.init_checkpoint.",
)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export: the folder (default WORKDIR/export).")
_EXPORT_PLATFORMS = flags.DEFINE_list(
    "export_platforms", ["cpu", "cuda", "tpu"],
    "export: the platforms the program is lowered for (cpu, cuda, rocm, tpu).",
)
_EXPORT_BATCH = flags.DEFINE_integer(
    "export_batch", 0, "export: images per call; 0 (default) for a program that takes any number."
)
# Where the cluster is not one jax.distributed detects by itself (Cloud TPU, SLURM, Open MPI,
# Kubernetes), each host is told its place, as detectron2's launcher is (--dist-url,
# --num-machines, --machine-rank). These describe the launch, not the experiment, so they are
# flags, not config keys: config.json stays the same on every host and for every restart.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator, the same on every host (JAX_COORDINATOR_ADDRESS)."
    " Any of these three flags starts jax.distributed, as config.train.distributed=True does.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. n - 1.")


# A run stopped by SIGTERM (preemption) after saving its checkpoint exits with the status of a
# process killed by SIGTERM (128 + 15): not finished, to be restarted.
PREEMPTED_EXIT_STATUS = 143


def _compatible(value: Any, reference: Any) -> bool:
    """Type check of one leaf: bool only for bool, int for int, int or float for float,
    str for str, a list / tuple whose items fit the reference's items for a tuple."""
    if reference is None:
        return True
    if isinstance(reference, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(reference, bool)
    if isinstance(reference, float):
        return isinstance(value, int | float)
    if isinstance(reference, int):
        return isinstance(value, int)
    if isinstance(reference, tuple | list):
        if not isinstance(value, tuple | list):
            return False
        return not reference or all(_compatible(v, reference[0]) for v in value)
    return isinstance(value, type(reference))


def config_errors(config: Mapping[str, Any], reference: Mapping[str, Any], prefix="") -> list[str]:
    """Every offending dotted key of `config` against `reference` (plain nested dicts)."""
    errors = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            errors.append(f"{name}: unknown key")
        elif isinstance(reference[key], Mapping):
            if isinstance(value, Mapping):
                errors += config_errors(value, reference[key], prefix=f"{name}.")
            else:
                errors.append(f"{name}: expected a group of fields, got {value!r}")
        elif not _compatible(value, reference[key]):
            expected = type(reference[key]).__name__
            errors.append(f"{name}: expected {expected} like {reference[key]!r}, got {value!r}")
    return errors


def validate_config(config: ml_collections.ConfigDict, reference=None) -> None:
    """Raises ConfigError listing all the keys of `config` that do not fit the base config."""
    if reference is None:
        from configs import base

        reference = base.get_config()
    errors = config_errors(config.to_dict(), reference.to_dict())
    if not errors:  # the keys fit: check the values the type check cannot
        from mrcnn_jax import evaluate

        errors = evaluate.eval_config_errors(config.eval) + _value_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _choice(errors: list[str], name: str, value, choices) -> None:
    if value not in choices:
        errors.append(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _length(errors: list[str], name: str, value, n: int, what: str) -> None:
    if len(value) != n:
        errors.append(f"{name}: expected {what} ({n} values), got {tuple(value)}")


def _value_errors(config) -> list[str]:
    """Model / data / training values outside their choices, found now rather than when jit,
    tf.data or the first evaluation meets them (after hours of dataset preparation or training).

    Tuples overridden on the command line are replaced, but a --flagfile plus a later flag of the
    same tuple are concatenated by ml_collections: the lengths are checked for that reason too."""
    from mrcnn_jax.data.pipeline import DATASETS, GROUND_TRUTHS
    from mrcnn_jax.data.transforms import CHANNEL_ORDERS, RESIZE_ROUNDINGS
    from mrcnn_jax.evaluate import MASK_PASTES, METRIC_NAMES
    from mrcnn_jax.inference import FEATURE_PADDINGS, LEVEL_MAPPERS
    from mrcnn_jax.losses import LOSS_TERMS
    from mrcnn_jax.mask_rcnn import FROZEN_STAGES_MODES
    from mrcnn_jax.modeling.norm import NormKind
    from mrcnn_jax.modeling.resnet import STAGE_BLOCKS
    from mrcnn_jax.ops.anchors import ANCHOR_GRIDS
    from mrcnn_jax.train import LR_SCHEDULES, OPTIMIZERS, PARALLELISMS

    m, d, t = config.model, config.data, config.train
    errors = []
    _choice(errors, "model.anchor_grid", m.anchor_grid, ANCHOR_GRIDS)
    if m.anchor_grid == "torchvision" and m.rpn.size_divisibility <= 0:
        errors.append("model.anchor_grid='torchvision' needs model.rpn.size_divisibility > 0")
    _choice(errors, "model.feature_padding", m.feature_padding, FEATURE_PADDINGS)
    _choice(errors, "model.norm", m.norm, [k.value for k in NormKind])
    _choice(errors, "model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
    _choice(errors, "model.depth", m.depth, sorted(STAGE_BLOCKS))
    _choice(errors, "model.frozen_stages_per_image", m.get("frozen_stages_per_image", "auto"),
            FROZEN_STAGES_MODES)
    _choice(errors, "model.roi.level_mapper", m.roi.level_mapper, sorted(LEVEL_MAPPERS))
    _choice(errors, "model.test.mask_paste", m.test.mask_paste, MASK_PASTES)
    if not 0 <= m.freeze_at <= 5:
        errors.append(f"model.freeze_at: expected 0 (none) to 5 (every stage), got {m.freeze_at}")
    if m.rpn.size_divisibility < 0:
        errors.append(f"model.rpn.size_divisibility: expected >= 0, got {m.rpn.size_divisibility}")
    if m.norm_eps < 0:
        errors.append(f"model.norm_eps: expected >= 0, got {m.norm_eps}")
    if m.roi.sampling_ratio < 0:
        errors.append(
            f"model.roi.sampling_ratio: expected >= 1 (fixed) or 0 (adaptive), "
            f"got {m.roi.sampling_ratio}"
        )
    if m.roi.max_sampling_ratio < 1:
        errors.append(f"model.roi.max_sampling_ratio: expected >= 1, got {m.roi.max_sampling_ratio}")
    weights = m.get("loss_weights") or {}
    for term in weights:
        if term not in LOSS_TERMS:
            errors.append(f"model.loss_weights.{term}: not a loss term ({', '.join(LOSS_TERMS)})")
        elif not weights[term] >= 0:
            errors.append(f"model.loss_weights.{term}: expected >= 0, got {weights[term]}")
    _length(errors, "model.anchor_strides", m.anchor_strides, len(m.anchor_sizes),
            "one stride per anchor size (model.anchor_sizes)")
    _length(errors, "model.rpn.box_weights", m.rpn.box_weights, 4, "(wx, wy, ww, wh)")
    _length(errors, "model.roi.box_weights", m.roi.box_weights, 4, "(wx, wy, ww, wh)")

    _choice(errors, "data.dataset", d.dataset, DATASETS)
    _choice(errors, "data.channel_order", d.channel_order, CHANNEL_ORDERS)
    _choice(errors, "data.resize_rounding", d.resize_rounding, RESIZE_ROUNDINGS)
    _length(errors, "data.image_size", d.image_size, 2, "(height, width)")
    _length(errors, "data.pixel_mean", d.pixel_mean, 3, "one per channel")
    _length(errors, "data.pixel_std", d.pixel_std, 3, "one per channel")
    if not d.train_min_sizes:
        errors.append("data.train_min_sizes: expected at least one shortest-side size")
    jitter = tuple(d.get("train_scale_jitter", ()))
    if jitter and not (len(jitter) == 2 and 0 < jitter[0] <= jitter[1]):
        errors.append(
            f"data.train_scale_jitter: expected () or (min, max) with 0 < min <= max, got {jitter}"
        )

    _choice(errors, "eval.ground_truth", config.eval.get("ground_truth", "file"), GROUND_TRUTHS)
    _choice(errors, "train.parallelism", t.parallelism, PARALLELISMS)
    _choice(errors, "train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _choice(errors, "train.optimizer", t.get("optimizer", "sgd"), OPTIMIZERS)
    betas = tuple(t.get("adam_betas", (0.9, 0.999)))
    if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        errors.append(f"train.adam_betas: expected (b1, b2), each in [0, 1), got {betas}")
    if t.get("adam_eps", 1e-8) <= 0:
        errors.append(f"train.adam_eps: expected > 0, got {t.adam_eps}")
    if not 0.0 <= t.lr_end_factor <= 1.0:
        errors.append(f"train.lr_end_factor: expected in [0, 1], got {t.lr_end_factor}")
    if t.lr_schedule == "cosine" and t.num_steps <= 0:
        errors.append(f"train.num_steps: the cosine schedule needs > 0, got {t.num_steps}")
    if not 0.0 <= t.ema_decay < 1.0:
        errors.append(f"train.ema_decay: expected in [0, 1) (0 = off), got {t.ema_decay}")
    if t.global_batch_size <= 0:
        errors.append(f"train.global_batch_size: expected > 0, got {t.global_batch_size}")
    best = t.get("best_metric", "")
    names = "|".join(METRIC_NAMES)
    if best and not re.fullmatch(rf"(bbox|segm)/({names}|AP-.+)", best):
        errors.append(
            f"train.best_metric: expected \"\" (off) or an evaluation metric, 'bbox/' or 'segm/'"
            f" and one of {', '.join(METRIC_NAMES)} or AP-CATEGORY (e.g. 'segm/AP'), got {best!r}"
        )
    accum = t.get("grad_accum_steps", 1)
    if accum < 1:
        errors.append(f"train.grad_accum_steps: expected >= 1 (1 = off), got {accum}")
    elif t.global_batch_size > 0 and t.global_batch_size % accum:
        errors.append(
            f"train.grad_accum_steps: {accum} does not divide train.global_batch_size"
            f" {t.global_batch_size}"
        )
    if config.eval.batch_size <= 0:
        errors.append(f"eval.batch_size: expected > 0, got {config.eval.batch_size}")
    if t.eval_every < -1:
        errors.append(
            f"train.eval_every: expected >= 0, or -1 (never: --mode=continuous_eval), got"
            f" {t.eval_every}"
        )
    if config.eval.get("continuous_poll_s", 1.0) <= 0:
        errors.append(f"eval.continuous_poll_s: expected > 0, got {config.eval.continuous_poll_s}")
    if config.eval.get("continuous_timeout_s", 1.0) < 0:
        errors.append(
            f"eval.continuous_timeout_s: expected >= 0, got {config.eval.continuous_timeout_s}"
        )
    if config.eval.max_examples < 0:
        errors.append(f"eval.max_examples: expected >= 0 (0: all), got {config.eval.max_examples}")
    return errors


def distributed_kwargs(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> dict[str, Any]:
    """The launch flags given, as `jax.distributed.initialize` keywords; those not given are
    left to its cluster detection. Raises app.UsageError for values that cannot work."""
    if num_processes is not None and num_processes < 1:
        raise app.UsageError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        raise app.UsageError(f"--process_id={process_id} is not in [0, --num_processes)")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise app.UsageError(f"--coordinator_address needs host:port, got {coordinator_address!r}")
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    return {k: v for k, v in given.items() if v is not None}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.set_default_xla_flags()  # before JAX creates its backends
    runtime.quiet_library_logs(flags.FLAGS.verbosity)
    runtime.progress_bars_for(sys.stderr)
    config, workdir, mode = runtime.config_flag_value(_CONFIG), _WORKDIR.value, _MODE.value
    validate_config(config)  # before any device work or compilation
    if mode == "predict" and not _INPUT.value:
        raise app.UsageError("--mode=predict needs --input")
    if mode in ("train", "continuous_eval") and _CHECKPOINT.value:
        raise app.UsageError(
            "--checkpoint is for --mode=eval, predict and export; training resumes from"
            " WORKDIR/checkpoints, or starts from --config.train.init_checkpoint=PATH, and"
            " continuous_eval takes the checkpoints of WORKDIR as they come"
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise runtime.InvalidInputError(f"--workdir={workdir} is a file, not a folder")
    launch = distributed_kwargs(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if config.train.distributed or launch:
        jax.distributed.initialize(**launch)
    logging.info(
        "process %d of %d; devices %s", jax.process_index(), jax.process_count(), jax.devices()
    )

    from mrcnn_jax import train

    if mode == "train":  # writes WORKDIR/config.json once its checkpoints are known to fit
        state = train.train_and_evaluate(config, workdir)
        num_steps = train.scale_schedule(config.train).num_steps
        if int(state.step) < num_steps:  # stopped by SIGTERM, its checkpoint saved
            logging.warning(
                "stopped at step %d of %d: exit status %d, so that a scheduler restarts the job;"
                " the same command resumes it", int(state.step), num_steps, PREEMPTED_EXIT_STATUS,
            )
            sys.exit(PREEMPTED_EXIT_STATUS)
    elif mode == "eval":
        train.evaluate_checkpoint(config, workdir, _CHECKPOINT.value)
    elif mode == "continuous_eval":
        train.evaluate_continuously(config, workdir)
    elif mode == "export":
        from mrcnn_jax import export

        if _EXPORT_BATCH.value < 0:
            raise runtime.InvalidInputError(
                f"--export_batch={_EXPORT_BATCH.value}: expected 0 (any batch size) or >= 1"
            )
        export.export_main(
            config, workdir, _EXPORT_DIR.value, tuple(_EXPORT_PLATFORMS.value),
            _EXPORT_BATCH.value or None, _CHECKPOINT.value,
        )
    else:
        from mrcnn_jax import predict

        predict.predict_main(config, workdir, _INPUT.value, checkpoint=_CHECKPOINT.value)


def run() -> None:
    """Entry point of the `mrcnn-jax` console script."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(runtime.reporting_user_errors(main), flags_parser=runtime.parse_flags)


if __name__ == "__main__":
    run()
