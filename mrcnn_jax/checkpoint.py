"""Checkpoints with orbax: save / resume a train state, and import weights for fine-tuning.

Layout: `DIR/<step>/state` (the state pytree as a dict: params, model_state, opt_state, step, rng,
and ema_params when the run keeps a moving average of its weights)
and `DIR/<step>/meta` (JSON: step, data position, number of processes). Orbax writes each step
into a temporary directory (`<step>.orbax-checkpoint-tmp-*`) and renames it when complete, so a
crash in the middle of a save leaves only a temporary directory behind: it is never listed as a
step, and the next manager on the directory removes it (in the background, finished before its
first save); the previous checkpoint stays usable.

The state is any flax struct / pytree; `flax.serialization.to_state_dict` turns it (optax states
included) into nested dicts, and `from_state_dict(target, ...)` rebuilds it on restore.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization, traverse_util

CHECKPOINT_DIR = "checkpoints"  # under the workdir
BEST_DIR = "best"  # under the workdir: the best evaluation's checkpoint (`BestCheckpoint`)
_STATE, _META = "state", "meta"


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {_STATE: ocp.PyTreeCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}


def _manager(directory, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        epath.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(**options),
        item_handlers=_handlers(),
    )


UNREADABLE_DIR = "checkpoints_unreadable"  # beside CHECKPOINT_DIR: steps restore skipped


class RestoreError(RuntimeError):
    """No checkpoint of a directory can be restored into the given state."""


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def _shape_mismatches(target_dict, metadata) -> list[str]:
    """'name: checkpoint (a, b) vs state (c, d)' for every array both hold with other shapes,
    and the arrays only one of them holds."""
    tree = getattr(metadata, "tree", metadata)
    stored, wanted = _shapes(tree), _shapes(target_dict)
    def order(keys):  # the parameters before their optimizer state
        return sorted(keys, key=lambda k: (not k.startswith("params/"), k))

    out = [
        f"{k}: checkpoint {stored[k]} vs state {wanted[k]}"
        for k in order(stored.keys() & wanted.keys())
        if stored[k] != wanted[k]
    ]
    out += [f"{k}: not in the checkpoint" for k in order(wanted.keys() - stored.keys())]
    out += [f"{k}: only in the checkpoint" for k in order(stored.keys() - wanted.keys())]
    return out


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class CheckpointManager:
    """Saves and restores a train state in `directory`, keeping the last `keep` steps.

    Saves are asynchronous (the arrays are copied to host before `save` returns, the files are
    written in a background thread); `wait()` blocks until the last one is committed.
    """

    def __init__(
        self, directory: str, *, keep: int = 3, async_save: bool = True,
        run: Mapping[str, Any] | None = None,
    ):
        """run: facts of the training run, recorded with each checkpoint and compared with the
        checkpoint's at a resume (`train_and_evaluate`: global_batch_size, devices, parallelism):
        a global batch size other than the checkpoint's is warned about, other changes logged."""
        self.directory = str(directory)
        self.run = dict(run or {})
        self._manager = _manager(
            directory,
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of an interrupted save
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> None:
        """Saves `state` (host pytree) as checkpoint `step`; a step already saved is kept as is.
        meta: more JSON facts for the step's metadata."""
        if step in self._manager.all_steps():
            return
        # Batches are a function of the step, and of the host count: each host shuffles its own
        # slice of the training set (pipeline.train_batches).
        meta = {
            "step": int(step), "data_position": int(step), "process_count": jax.process_count(),
            **self.run, **(meta or {}),
        }
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeSave(serialization.to_state_dict(state)),
                    _META: ocp.args.JsonSave(meta),
                }
            ),
        )

    def restore(self, target: Any, step: int | None = None) -> Any:
        """The state of checkpoint `step` (default latest), with the structure, dtypes and
        devices of `target` (a host state, e.g. a freshly created one). Arrays of other shapes
        than the target's (a run of another config) are a ValueError naming them, found from the
        checkpoint's metadata before anything is read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target_dict = serialization.to_state_dict(target)
        mismatches = _shape_mismatches(target_dict, self._manager.item_metadata(step)[_STATE])
        if mismatches:
            raise ValueError(
                f"{len(mismatches)} arrays of checkpoint {step} do not fit this state:"
                f" {'; '.join(mismatches[:8])}{'; ...' if len(mismatches) > 8 else ''}"
            )
        restore_args = ocp.checkpoint_utils.construct_restore_args(target_dict)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.PyTreeRestore(item=target_dict, restore_args=restore_args)}
            ),
        )
        return serialization.from_state_dict(target, restored[_STATE])

    def restore_latest(self, target: Any) -> Any:
        """Resumes from the latest checkpoint that can be read, else returns `target` (none).

        A step that cannot be restored (damaged files, an empty directory) is skipped with a
        warning for the one before it, and set aside: moved to `UNREADABLE_DIR` beside this
        directory (process 0), so that later saves of that step and orbax's keep-the-last-k
        cleanup do not meet it. When no step can be restored (a state of another shape: the
        workdir holds a run of another config), RestoreError carries the latest step's error and
        nothing is moved."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        failed: list[tuple[int, Exception]] = []
        for step in steps:
            try:
                state = self.restore(target, step)
            except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types
                logging.warning("cannot restore %s/%d: %s", self.directory, step, _first_line(e))
                failed.append((step, e))
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
            logging.info("resuming from %s/%d", self.directory, step)
            self._compare_run(step)
            return state
        if failed:
            step, error = failed[0]
            raise RestoreError(
                f"no checkpoint in {self.directory} can be restored into this run's state"
                f" (steps {[s for s, _ in failed]}); step {step}: {_first_line(error)}"
            ) from error
        return target

    def _compare_run(self, step: int) -> None:
        """What a resume changes against the run that wrote checkpoint `step`: the state resumes
        as saved on any hosts and devices, but not the example stream of another host count or
        batch size (both warned about); other devices or parallelism are logged."""
        saved = self.metadata(step)
        hosts = saved.get("process_count")  # absent in checkpoints before 2026-11-27
        if hosts is not None and hosts != jax.process_count():
            logging.warning(
                "checkpoint %s/%d was written by a run on %d processes, this one has %d: the"
                " model, optimizer and step resume as saved, but each host reads its own slice"
                " of the training set, so the examples from here on are not those the first run"
                " would have seen (resume on %d processes for that)",
                self.directory, step, hosts, jax.process_count(), hosts,
            )
        batch, now = saved.get("global_batch_size"), self.run.get("global_batch_size")
        if batch is not None and now is not None and batch != now:
            logging.warning(
                "checkpoint %s/%d was written by a run with train.global_batch_size=%d, this one"
                " has %d: the model, optimizer and step resume as saved, but the example stream"
                " goes on from example %d x %d, not from the %d x %d the first run had reached"
                " (examples are skipped or repeated), and the learning rate is this config's"
                " (resume with --config.train.global_batch_size=%d for the same run)",
                self.directory, step, batch, now, step, now, step, batch, batch,
            )
        changed = [
            f"{key} {saved[key]} -> {self.run[key]}" for key in ("devices", "parallelism")
            if key in saved and key in self.run and saved[key] != self.run[key]
        ]
        if changed:
            logging.info(
                "resuming a run written with other devices (%s): the same computation",
                ", ".join(changed),
            )

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable step directories out of the managed directory (kept, not deleted:
        the failure may have been the file system's)."""
        aside = os.path.join(os.path.dirname(os.path.abspath(self.directory)), UNREADABLE_DIR)
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target = os.path.join(aside, str(step))
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(aside, f"{step}.{suffix}"), suffix + 1
                os.makedirs(aside, exist_ok=True)
                os.rename(source, target)
                logging.warning("set the unreadable checkpoint %s aside: %s", source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mrcnn_jax: unreadable checkpoints set aside")
        self._manager.reload()

    def metadata(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(restored[_META])

    def delete(self, step: int) -> None:
        self._manager.delete(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BestCheckpoint:
    """WORKDIR/best: the checkpoint of the evaluation that scored highest on `metric` so far
    (`config.train.best_metric`, e.g. "segm/AP": TF Model Garden's best_checkpoint_eval_metric,
    detectron2's BestCheckpointer), kept apart from the rotating checkpoints that `keep` deletes.
    Its metadata records the metric and its value, so a resumed run goes on comparing with it.
    `--checkpoint=best` evaluates, predicts or exports it; `load_weights(WORKDIR/best)` reads it.
    On several hosts every process calls `consider` with the same metrics (the save is
    collective)."""

    def __init__(
        self, workdir: str, metric: str, run: Mapping[str, Any] | None = None,
        resumed_at: int | None = None,
    ):
        """resumed_at: the step the run resumes from. A best step after it was evaluated on a
        course the run no longer follows (its evaluation records are dropped too): it is
        deleted, and the next evaluation is the best so far."""
        self.metric = metric
        self.directory = os.path.join(workdir, BEST_DIR)
        self._manager = CheckpointManager(self.directory, keep=1, async_save=False, run=run)
        self.best: tuple[int, float] | None = None  # (step, value)
        step = self._manager.latest_step()
        if step is None:
            return
        try:
            meta = self._manager.metadata(step)
            kept = (meta.get("best_metric"), float(meta["best_value"]))
        except Exception as e:  # noqa: BLE001 - a damaged best checkpoint must not stop a run
            logging.warning("%s/%d: unreadable metadata (%s): the next evaluation replaces it",
                            self.directory, step, _first_line(e))
            return
        if resumed_at is not None and step > resumed_at:
            logging.warning(
                "%s holds step %d (%s=%s), after the step %d this run resumes from: deleted, an"
                " evaluation of the run as it goes on will take its place", self.directory, step,
                kept[0], kept[1], resumed_at,
            )
            self._manager.delete(step)
        elif kept[0] == metric:
            self.best = (step, kept[1])
            logging.info("the best %s so far: %.4f at step %d (%s)", metric, kept[1], step,
                         self.directory)
        else:
            logging.warning(
                "%s holds step %d, kept for %s=%s; this run keeps the best %s: the next"
                " evaluation replaces it", self.directory, step, kept[0], kept[1], metric,
            )

    def consider(self, step: int, state: Any, metrics: Mapping[str, Any]) -> bool:
        """Saves `state` as the best when metrics[metric] beats the best so far (a tie keeps the
        earlier step); -> whether it did. A metric the evaluation does not have, or that is not a
        finite number, is warned about and nothing is saved: never a reason to stop a run."""
        value = metrics.get(self.metric)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = None
        if value is None or not np.isfinite(value):
            logging.warning(
                "train.best_metric=%r: the evaluation of step %d gave %r (its metrics: %s); no"
                " best checkpoint saved", self.metric, step, metrics.get(self.metric),
                ", ".join(sorted(k for k in metrics if "/AP-" not in k)),
            )
            return False
        if self.best is not None and value <= self.best[1]:
            logging.info(
                "%s %.4f at step %d: the best is still %.4f at step %d", self.metric, value, step,
                self.best[1], self.best[0],
            )
            return False
        for old in self._manager.all_steps():
            if old >= step:  # a resume from before it: keep=1 would keep the later step
                self._manager.delete(old)
        self._manager.save(step, state, meta={"best_metric": self.metric, "best_value": value})
        self._manager.wait()
        logging.info("%s %.4f at step %d, the best so far: saved in %s", self.metric, value,
                     step, self.directory)
        self.best = (step, value)
        return True

    def close(self) -> None:
        self._manager.close()


# ----------------------------------------------------------------------------- weights only


def _isdir(path: str) -> bool:
    """os.path.isdir, also for remote paths (gs://...)."""
    return epath.Path(path).is_dir() if "://" in path else os.path.isdir(path)


def _resolve(path: str) -> tuple[str, int]:
    """A workdir, a checkpoints directory or one step directory -> (checkpoints dir, step)."""
    path = str(path).rstrip("/") if "://" in str(path) else os.path.abspath(path)
    if _isdir(os.path.join(path, _STATE)):
        parent, name = os.path.split(path)
        if name.isdigit():
            return parent, int(name)
    if _isdir(os.path.join(path, CHECKPOINT_DIR)):
        path = os.path.join(path, CHECKPOINT_DIR)
    step = latest_step(path)
    if step is None:
        raise FileNotFoundError(f"no checkpoint found at {path}")
    return path, step


def step_of(path: str) -> int:
    """The step `load_weights(path)` reads; FileNotFoundError when `path` holds no checkpoint."""
    return _resolve(path)[1]


def all_steps(directory: str) -> list[int]:
    """The complete steps of a checkpoints directory, ascending ([] when there is none)."""
    if not _isdir(directory):
        return []
    manager = _manager(directory, create=False)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def latest_step(directory: str) -> int | None:
    """The latest complete step in a checkpoints directory, None when there is none."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def load_weights(path: str, ema: bool = True) -> dict[str, Any]:
    """The model variables {'params': ..., 'batch_stats': ...} (numpy) of a checkpoint.

    path: a workdir, its `checkpoints` directory (latest step) or one step directory. Only the
    weights are read (no optimizer state), whatever devices the checkpoint was written from.
    ema: a run trained with `train.ema_decay` gives its parameters' moving average (what its
    evaluation scored), unless False.
    """
    directory, step = _resolve(path)
    manager = _manager(directory, create=False)
    try:
        tree = manager.item_metadata(step)[_STATE].tree
        key = "ema_params" if ema and tree.get("ema_params") else "params"
        if key == "ema_params":
            logging.info("%s: the moving average of the parameters (train.ema_decay)", path)
        item = {key: tree[key], "model_state": tree.get("model_state", {})}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeRestore(
                        item=item, restore_args=restore_args, partial_restore=True
                    )
                }
            ),
        )[_STATE]
    finally:
        manager.close()
    return {"params": restored[key], **restored.get("model_state", {})}


LABELS_FILE = "labels.json"  # in a workdir: class names and dataset category ids of the labels


def write_labels(workdir: str, class_names, label_to_category_id: Mapping[int, int]) -> str:
    """Writes WORKDIR/labels.json: what the model's contiguous labels mean (`read_labels`), so that
    prediction names the classes and writes the dataset's category ids without the dataset."""
    path = os.path.join(workdir, LABELS_FILE)
    os.makedirs(workdir, exist_ok=True)
    data = {
        "class_names": list(class_names),
        "label_to_category_id": {str(k): int(v) for k, v in label_to_category_id.items()},
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def read_labels(workdir: str) -> tuple[tuple[str, ...], dict[int, int]] | None:
    """(class names with "background" first, {label: category id}) from WORKDIR/labels.json, or
    None when the workdir has none. Raises ValueError naming the file when it is malformed."""
    path = os.path.join(workdir, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        names = tuple(str(n) for n in data["class_names"])
        mapping = {int(k): int(v) for k, v in data["label_to_category_id"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a labels file ({e!r})") from e
    return names, mapping


class WeightsMismatchError(ValueError):
    """Loaded weights do not fit the model; the message lists every offending name."""


def merge_weights(
    fresh: Mapping[str, Any],
    loaded: Mapping[str, Any],
    *,
    skip: Callable[[str], bool] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Copies `loaded` into `fresh` (both {collection: tree}); returns the merged variables.

    Names are 'collection/module/.../leaf' (e.g. 'params/box_head/cls_score/kernel'). A name for
    which `skip(name)` is True keeps its fresh value (re-initialised, e.g. class-dependent layers).
    Every other name must exist in both with the same shape, else WeightsMismatchError lists all
    missing, unexpected and mis-shaped names (and `source`, where the weights came from). Values
    take the fresh dtype.
    """
    skip = skip or (lambda name: False)
    new = traverse_util.flatten_dict(dict(fresh), sep="/")
    old = traverse_util.flatten_dict(dict(loaded), sep="/")
    missing = sorted(k for k in new if k not in old and not skip(k))
    unexpected = sorted(k for k in old if k not in new and not skip(k))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(np.shape(old[k]))} vs model {tuple(np.shape(new[k]))}"
        for k in new
        if k in old and not skip(k) and np.shape(old[k]) != np.shape(new[k])
    )
    if missing or unexpected or misshaped:
        lines = [f"weights{f' of {source}' if source else ''} do not fit the model"]
        for title, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if names:
                lines += [f"  {title} ({len(names)}):"] + [f"    {name}" for name in names]
        raise WeightsMismatchError("\n".join(lines))
    merged = {k: v if skip(k) else np.asarray(old[k], dtype=v.dtype) for k, v in new.items()}
    skipped = sorted(k for k in new if skip(k))
    if skipped:
        logging.info("kept the fresh values of %d skipped weights: %s", len(skipped), skipped)
    return traverse_util.unflatten_dict(merged, sep="/")


CONFIG_FILE = "config.json"  # in a workdir: the run's config (`train.save_config`, `convert`)
# What a backbone's weights assume of their input; weights run under other values are garbage.
INPUT_CONVENTION_KEYS = (
    "data.pixel_mean",
    "data.pixel_std",
    "data.channel_order",
    "model.stride_in_1x1",
    "model.norm_eps",
)


def workdir_of(path: str) -> str:
    """The workdir of a checkpoint path: the path itself (a workdir), or the directory above a
    `checkpoints` or `best` directory or one of their step directories."""
    p = epath.Path(path)  # local or remote (gs://...), as the checkpoints themselves
    if "://" not in str(path):
        p = p.absolute()
    if p.name.isdigit():  # WORKDIR/checkpoints/STEP
        p = p.parent
    if p.name == CHECKPOINT_DIR or (p.name == BEST_DIR and not (p / CONFIG_FILE).exists()):
        p = p.parent
    return str(p)


def lookup(tree: Mapping[str, Any], dotted: str):
    """tree['a']['b'] for 'a.b'; None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _same(a, b) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return bool(np.isclose(a, b, rtol=1e-6, atol=1e-6))
    return a == b


def check_input_convention(config, path: str) -> None:
    """Raises ValueError when the weights at `path` were made (trained or converted) for other
    inputs than `config` gives them: the INPUT_CONVENTION_KEYS of the `config.json` beside them
    against the config's, e.g. detectron2's MSRA weights (BGR, std 1, stride in the 1x1 conv)
    under torchvision's normalisation, which runs silently and learns from garbage features.
    Nothing is checked when the weights have no config.json; an unreadable one is reported."""
    file = epath.Path(workdir_of(path)) / CONFIG_FILE
    try:
        saved = json.loads(file.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        logging.warning("cannot check the input convention of %s: %s unreadable (%r)", path, file, e)
        return
    ours = config.to_dict() if hasattr(config, "to_dict") else config
    wrong = []
    for key in INPUT_CONVENTION_KEYS:
        theirs, mine = lookup(saved, key), lookup(ours, key)
        if theirs is not None and mine is not None and not _same(theirs, mine):
            wrong.append((key, theirs, mine))
    if wrong:
        lines = "\n  ".join(f"{k}: {t!r} there, {m!r} in this config" for k, t, m in wrong)
        fix = " ".join(
            f"--config.{k}={','.join(map(str, t)) if isinstance(t, list) else t}"
            for k, t, _ in wrong
        )
        raise ValueError(
            f"the weights at {path} were made for other inputs than this config gives them"
            f" ({file}):\n  {lines}\nUse a config of their family (docs/weights.md) or set {fix}"
        )
