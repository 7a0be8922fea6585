"""Training: the train state, the SGD recipe of detectron2, the pure train step, and the loop.

Layers, bottom up:
  * `TrainState`, `make_optimizer`, `learning_rate_schedule`: pytrees and optax, no devices.
  * `train_step(state, batch, *, loss_fn, ...)`: one pure update for a batch `[B_local, ...]`;
    `axis_name` set when it runs under `jax.pmap` (gradients, metrics and batch stats averaged).
  * `Placement`: where state and batches live ("pmap": replicated state `[devices, ...]`, batches
    `[devices, per_device, ...]`; "mesh": global `jax.Array`s on a 1-D mesh, batch sharded on
    axis 0).
  * `train_loop`: a linear host loop (checkpoints, SIGTERM, evaluation, logging) around any loss.
  * `train_and_evaluate(config, workdir)`: builds the Mask R-CNN pieces and runs the loop.

The loss contract (`losses.make_loss_fn` and the tests' own models follow it):

    loss_fn(params, model_state, batch, example_keys) -> (total_loss, (metrics, new_model_state))
      model_state: every non-'params' collection; example_keys: [B_local] PRNG keys, one each;
      total_loss: scalar; metrics: dict of scalars. Under pmap the step averages both (and the
      gradients) over the devices, so each device's value must be its share such that that mean
      is the whole batch's: a mean over its examples with equal shards, or `losses.batch_mean`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct, traverse_util
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mrcnn_jax import checkpoint as ckpt_lib
from mrcnn_jax import runtime

PMAP_AXIS = "batch"  # axis name of the pmapped train step (sync BN modules use it too)
MESH_AXIS = "data"  # the 1-D device mesh axis the batch is sharded over
Batch = dict[str, Any]
LossFn = Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


# ----------------------------------------------------------------------------- state & optimizer


@struct.dataclass
class TrainState:
    """Everything a step changes. A pytree; `tx` is static (not saved, rebuilt from the config).

    step:        [] int32, updates done so far = index of the next batch (the data position)
    params:      the 'params' collection, float32
    model_state: every other collection, e.g. {'batch_stats': ...}; {} when there is none
    opt_state:   the optax state of `tx`
    rng:         [2] uint32 PRNG key; the keys of step s derive from fold_in(rng, s)
    ema_params:  None, or the exponential moving average of `params` (`ema_decay` > 0)
    ema_decay:   static; the EMA's decay d: after update s, ema <- d_s * ema + (1 - d_s) * params
                 with d_s = min(d, (1 + s) / (10 + s)) (TF Model Garden's dynamic decay)
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    ema_params: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)


def create_train_state(
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    ema_decay: float = 0.0,
) -> TrainState:
    """variables: {'params': ..., other collections...} (e.g. from `model.init`); rng: [2] key;
    ema_decay > 0 keeps an exponential moving average of the parameters (`TrainState`). The
    state holds the arrays of `variables` themselves, not copies (`compile_train_step`'s step
    donates its state: place it with `placement.put_state`, which copies)."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay: expected in [0, 1), got {ema_decay}")
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # jax.random.key(): its uint32 data, the
        rng = jax.random.key_data(rng)  # form checkpoints store and restore
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=rng,
        tx=tx,
        ema_params=jax.tree.map(jnp.array, params) if ema_decay > 0 else None,
        ema_decay=float(ema_decay),
    )


def ema_decay_at(decay: float, step) -> jax.Array:
    """The EMA decay of update `step` (0-based): min(decay, (1 + step) / (10 + step)), so the
    average is not held near the initial weights for the first ~1 / (1 - decay) steps."""
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + s) / (10.0 + s))


def model_variables(state: TrainState, ema: bool = False) -> dict[str, Any]:
    """The Flax variables {'params': ..., 'batch_stats': ...} held by a (host) state; with `ema`,
    the parameters' moving average when the state keeps one."""
    params = state.ema_params if ema and state.ema_params is not None else state.params
    return {"params": params, **state.model_state}


def scaled_learning_rate(base_lr: float, global_batch_size: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): base_lr is the rate at `reference_batch`."""
    return base_lr * global_batch_size / reference_batch


# The `config.train` step counts that `scale_schedule` scales with the batch size.
SCHEDULE_KEYS = ("num_steps", "warmup_steps", "decay_steps", "checkpoint_every", "eval_every")


def scale_schedule(train_cfg):
    """`config.train` with its step counts for `global_batch_size` when `scale_schedule` is on.

    A recipe is written for `lr_reference_batch` images per step (detectron2's 1x: 90k steps of
    16). The learning rate always scales linearly with the batch (`scaled_learning_rate`); with
    `scale_schedule` the steps (`SCHEDULE_KEYS`) are divided by the same factor, so a batch of 64
    trains the 1x recipe's 1.44M images in 22.5k steps at 4x the rate, as detectron2's
    `DefaultTrainer.auto_scale_workers`. Rounded to the nearest step, at least 1 (0 stays 0).
    Returns a copy; train_cfg is not changed.
    """
    out = train_cfg.copy_and_resolve_references()
    if not train_cfg.get("scale_schedule", False):
        return out
    factor = train_cfg.lr_reference_batch / train_cfg.global_batch_size

    def scale(n: int) -> int:
        return max(1, int(round(n * factor))) if n > 0 else int(n)

    for key in SCHEDULE_KEYS:
        value = train_cfg[key]
        out[key] = tuple(map(scale, value)) if isinstance(value, tuple | list) else scale(value)
    return out


LR_SCHEDULES = ("multistep", "cosine")


def learning_rate_schedule(
    base_lr: float,
    *,
    warmup_steps: int,
    warmup_factor: float,
    decay_steps: Iterable[int] = (),
    decay_factor: float = 0.1,
    kind: str = "multistep",
    num_steps: int = 0,
    end_factor: float = 0.0,
) -> optax.Schedule:
    """detectron2's learning rate with linear warmup, as a function of the update index s.

    kind="multistep" (WarmupMultiStepLR):
        lr(s) = base_lr * w(s) * decay_factor ** #{d in decay_steps : s >= d}
        w(s)  = warmup_factor * (1 - s / warmup_steps) + s / warmup_steps  if s < warmup_steps else 1
    kind="cosine" (WarmupCosineLR; end_factor = SOLVER.BASE_LR_END / BASE_LR), with T = num_steps:
        c(s)  = end_factor + (1 - end_factor) * (1 + cos(pi * min(s, T) / T)) / 2
        lr(s) = base_lr * c(s)                                                       if s >= warmup
        lr(s) = base_lr * (warmup_factor * (1 - a) + c(warmup_steps) * a), a = s / warmup_steps
    (the warmup ramps up to the cosine's value where it ends, as detectron2's
    WarmupParamScheduler does; decay_steps / decay_factor are not used).
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"learning rate schedule: expected one of {LR_SCHEDULES}, got {kind!r}")
    if kind == "cosine" and num_steps <= 0:
        raise ValueError(f"the cosine learning rate schedule needs num_steps > 0, got {num_steps}")
    boundaries = np.asarray(sorted(decay_steps), np.int32)

    def cosine(s):
        where = jnp.minimum(s, num_steps).astype(jnp.float32) / num_steps
        return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(jnp.pi * where))

    def schedule(step):
        s = jnp.asarray(step, jnp.int32)
        alpha = s.astype(jnp.float32) / max(warmup_steps, 1)
        if kind == "multistep":
            warm = jnp.where(s < warmup_steps, warmup_factor * (1.0 - alpha) + alpha, 1.0)
            factor = warm * decay_factor ** jnp.sum(s >= jnp.asarray(boundaries))
        else:
            ramp = warmup_factor * (1.0 - alpha) + cosine(jnp.int32(warmup_steps)) * alpha
            factor = jnp.where(s < warmup_steps, ramp, cosine(s))
        return (base_lr * factor).astype(jnp.float32)

    return schedule


# detectron2 `get_default_optimizer_params` exempts parameters of norm layers: our modules named
# bn1, conv1_bn, norm, gn1, ... and flax's default names BatchNorm_0 / GroupNorm_0 / LayerNorm_0.
_NORM_MODULE = re.compile(
    r"^(bn|norm|gn)|_bn$|^(BatchNorm|GroupNorm|LayerNorm)_\d+$", re.IGNORECASE
)

FROZEN, NORM, DECAY = "frozen", "norm", "decay"  # optimizer groups


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path) -> str:
    """A tree path (from `jax.tree_util.tree_map_with_path`) as 'a/b/c'."""
    return "/".join(_key_name(k) for k in path)


def is_norm_parameter(path) -> bool:
    """True when the module that owns the parameter (second-to-last path entry) is a norm layer."""
    return len(path) >= 2 and bool(_NORM_MODULE.search(_key_name(path[-2])))


def full_mask(trainable, params):
    """Expands a bool pytree that is a prefix of `params` (None = all True) to params' structure."""
    if trainable is None:
        return jax.tree.map(lambda _: True, params)
    return jax.tree.map(lambda t, sub: jax.tree.map(lambda _: bool(t), sub), trainable, params)


def param_labels(params, trainable=None):
    """Optimizer group of every parameter: FROZEN (trainable False), NORM or DECAY."""
    mask = full_mask(trainable, params)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: NORM if is_norm_parameter(path) else DECAY, params
    )
    return jax.tree.map(lambda label, t: label if t else FROZEN, labels, mask)


def freeze(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """`tx` on the parameters `trainable` marks True (a bool pytree like the parameters, e.g.
    `mask_rcnn.trainable_mask`); a zero update, and no optimizer state, for the others. (Not
    optax.masked: it passes the masked-out leaves' gradients through as their updates.)"""
    labels = jax.tree.map(lambda t: "trainable" if t else FROZEN, trainable)
    return optax.multi_transform({"trainable": tx, FROZEN: optax.set_to_zero()}, labels)


def stop_frozen(params, trainable):
    """`params` with the frozen ones (`trainable` False; None: none) as constants of the
    gradient: no gradient is computed for them, nor for the stages made of them only."""
    if trainable is None:
        return params
    return jax.tree.map(lambda p, t: p if t else lax.stop_gradient(p), params, trainable)


OPTIMIZERS = ("sgd", "adamw")  # config.train.optimizer


def make_optimizer(
    params,
    *,
    learning_rate_fn: optax.Schedule,
    momentum: float,
    weight_decay: float,
    weight_decay_norm: float,
    grad_clip_norm: float = 0.0,
    trainable=None,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """torch SGD as detectron2 uses it, per trainable parameter p with gradient g:

    g <- 0 for frozen p;  g <- g * min(1, clip / ||g||_global) when clip > 0
    buf <- momentum * buf + (g + wd * p)     (wd = weight_decay_norm for norm layers)
    p <- p - lr(s) * buf                     frozen p: no buffer, zero update

    optimizer="adamw": torch AdamW (detectron2's ViTDet recipes, TF Model Garden's adamw), the
    weight decay decoupled from the gradient's moments, with the same clipping, norm-layer decay
    and frozen parameters (momentum is not used):

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2    (betas = (b1, b2))
    p <- p - lr(s) * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    labels = param_labels(params, trainable)

    def group(decay):
        if optimizer == "adamw":
            return optax.chain(
                optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=eps),
                optax.add_decayed_weights(decay) if decay else optax.identity(),
                optax.scale_by_learning_rate(learning_rate_fn),
            )
        return optax.chain(
            optax.add_decayed_weights(decay) if decay else optax.identity(),
            optax.trace(decay=momentum, nesterov=False),
            optax.scale_by_learning_rate(learning_rate_fn),
        )

    zero_frozen = optax.multi_transform(
        {FROZEN: optax.set_to_zero(), NORM: optax.identity(), DECAY: optax.identity()}, labels
    )
    sgd = optax.multi_transform(
        {FROZEN: optax.set_to_zero(), NORM: group(weight_decay_norm), DECAY: group(weight_decay)},
        labels,
    )
    clip = optax.clip_by_global_norm(grad_clip_norm) if grad_clip_norm > 0 else optax.identity()
    return optax.chain(zero_frozen, clip, sgd)


# ----------------------------------------------------------------------------- the train step


def example_keys(rng: jax.Array, step: jax.Array, local_batch: int, axis_name=None) -> jax.Array:
    """[local_batch] keys = split(fold_in(rng, step), GLOBAL batch)[this device's slice].

    Under pmap the global batch is local_batch * axis size and device i takes rows
    [i * local_batch, (i + 1) * local_batch): every example gets the same key on 1 or N devices.
    """
    num, index = (
        (1, 0) if axis_name is None else (lax.axis_size(axis_name), lax.axis_index(axis_name))
    )
    keys = jax.random.split(jax.random.fold_in(rng, step), local_batch * num)
    return lax.dynamic_slice_in_dim(keys, index * local_batch, local_batch)


def _pmean_floats(tree, axis_name: str):
    """Averages the float leaves (batch statistics) over devices; integer counters stay as is."""
    return jax.tree.map(
        lambda x: lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree
    )


def micro_batches(tree, accum_steps: int):
    """[B, ...] leaves -> [accum_steps, B / accum_steps, ...]; micro-batch j holds the examples
    j, j + k, j + 2k, ... (k = accum_steps). Strided rather than contiguous: with every device's
    shard split so, micro-batch j over all devices is the global batch's examples j mod k, the
    same set on 1 or N devices, so a run keeps its numbers when its device count changes."""

    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"a batch of {x.shape[0]} examples (each device's under pmap, the global one"
                f" under a mesh) does not split into {accum_steps} micro-batches"
                " (config.train.grad_accum_steps)"
            )
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, tree)


def accumulated_gradients(grad_fn, params, model_state, batch: Batch, keys, accum_steps: int):
    """(mean gradient, mean metrics, model state) over `micro_batches(batch, accum_steps)`.

    `grad_fn(params, model_state, batch, keys)` is the step's value_and_grad of the loss; it runs
    in a `lax.scan`, one micro-batch at a time, each from the same parameters and model state.
    The mean of the micro-batches' gradients is the whole batch's gradient for every loss that
    is a mean over images (the RPN and box losses); the mask loss is then a mean over each
    micro-batch's positive RoIs (under pmap, over those of the micro-batch on every device:
    `losses.batch_mean`), averaged over the micro-batches, as detectron2 averages the per-GPU
    means of its GPUs. Batch statistics (BatchNorm, not frozen) are the micro-batch's, and the
    new running statistics the mean of the micro-batches' updates. Integer leaves of the model
    state come from the last.
    """
    xs = micro_batches((batch, keys), accum_steps)

    def one(grad_sum, micro):
        (loss, (metrics, new_state)), grads = grad_fn(params, model_state, *micro)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return grad_sum, ({**metrics, "loss": loss}, new_state)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (metrics, states) = lax.scan(one, zeros, xs)
    grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    new_state = jax.tree.map(
        lambda x: jnp.mean(x, axis=0).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact)
        else x[-1],
        states,
    )
    return grads, metrics, new_state


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_fn: LossFn,
    learning_rate_fn: optax.Schedule,
    trainable=None,
    axis_name: str | None = None,
    accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on `batch` (arrays [B_local, ...]); pure. Bind the keywords with a partial.

    Returns the new state and metrics: the loss_fn metrics, 'loss' (total), 'grad_norm' (global
    norm of the averaged trainable gradients, before clipping) and 'learning_rate'.
    Frozen parameters (`trainable` False) are passed through untouched, so they stay bit-identical.

    accum_steps = k > 1 (gradient accumulation, `config.train.grad_accum_steps`): the gradients
    of k micro-batches of B_local / k examples, computed one after the other in a `lax.scan`
    (the activations of one micro-batch at a time), are averaged into one update; see
    `accumulated_gradients` for what that equals.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps: expected >= 1, got {accum_steps}")
    local_batch = jax.tree.leaves(batch)[0].shape[0]
    keys = example_keys(state.rng, state.step, local_batch, axis_name)
    mask = full_mask(trainable, state.params)

    def loss_of_trainable(params, *args):
        # Frozen parameters enter as constants: no gradient is traced for them, nor for the
        # frozen stages they make up (detectron2 / torchvision: requires_grad=False).
        return loss_fn(stop_frozen(params, mask), *args)

    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)
    if accum_steps == 1:
        (loss, (metrics, model_state)), grads = grad_fn(
            state.params, state.model_state, batch, keys
        )
        metrics = {**metrics, "loss": loss}
    else:
        grads, metrics, model_state = accumulated_gradients(
            grad_fn, state.params, state.model_state, batch, keys, accum_steps
        )
    if axis_name is not None:
        # Every device holds its share of the batch's loss (a mean over its own examples, equal
        # shards; the mask loss as `losses.batch_mean`): their mean is the global batch's, as one
        # device with the whole batch would compute it.
        grads, metrics = lax.pmean((grads, metrics), axis_name)
        model_state = _pmean_floats(model_state, axis_name)

    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, mask)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(
        lambda p, u, t: (p + u).astype(p.dtype) if t else p, state.params, updates, mask
    )
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = learning_rate_fn(state.step)
    ema = state.ema_params
    if ema is not None:
        d = ema_decay_at(state.ema_decay, state.step)
        ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
        ema_params=ema,
    )
    return new_state, metrics


# ----------------------------------------------------------------------------- devices


def _reshape_for_pmap(batch: Batch, num_devices: int) -> Batch:
    """[host_batch, ...] -> [num_devices, host_batch // num_devices, ...]."""

    def split(x):
        if x.shape[0] % num_devices:
            raise ValueError(f"host batch {x.shape[0]} is not divisible by {num_devices} devices")
        return np.reshape(x, (num_devices, x.shape[0] // num_devices, *x.shape[1:]))

    return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the train state and the batches live, for one parallelism.

    pmap: state replicated on the local devices (leaves [devices, ...]); batches [devices, B, ...].
    mesh: global jax.Arrays on a 1-D mesh (axis MESH_AXIS); state replicated, batch sharded on
    axis 0.
    Host-side state (checkpoints, evaluation) is always the unreplicated pytree.
    """

    kind: str
    mesh: Mesh | None = None
    shard_for_pmap: Callable[[Batch, int], Batch] = _reshape_for_pmap

    @property
    def sharded_batch(self) -> bool:
        """Whether one traced step sees a batch GSPMD splits over several devices (a mesh of more
        than one); under pmap each device's step sees its own examples only."""
        return self.kind == "mesh" and self.mesh.size > 1

    def put_state(self, state: TrainState, copy: bool = True) -> TrainState:
        """The state on the devices. The step donates it; with `copy` (default) the caller's
        own arrays stay usable (a state reused for several runs), as pmap's replicate always
        leaves them; copy=False lets the mesh placement reuse them, one state's memory less."""
        if self.kind == "pmap":
            # Through a pmapped identity, so the state carries the sharding the step's outputs
            # have (jax >= 0.8: a mesh over the pmap axis) rather than `replicate`'s: otherwise
            # the second step sees a new input sharding and compiles the whole step again.
            same = jax.pmap(lambda x: x, axis_name=PMAP_AXIS, donate_argnums=(0,))
            return same(flax.jax_utils.replicate(state))
        if copy:  # device_put's may_alias=False still shares the shard already on its device
            state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def get_state(self, state: TrainState) -> TrainState:
        if self.kind == "pmap":
            # The first local replica's buffer, read as is. `x[0]` would be a computation over
            # the local devices, which on several CPU hosts runs its collective through gloo and
            # can meet another host's barrier collective there: both then wait forever.
            return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0)[0], state))
        return state

    def put_batch(self, batch: Batch) -> Batch:
        if self.kind == "pmap":
            return self.shard_for_pmap(batch, jax.local_device_count())
        sharding = NamedSharding(self.mesh, P(MESH_AXIS))
        local = self.mesh.local_mesh.size
        for key, x in (batch.items() if isinstance(batch, Mapping) else ()):
            if np.shape(x)[0] % local:
                raise ValueError(
                    f"batch[{key!r}] has {np.shape(x)[0]} rows, not divisible by this host's"
                    f" {local} devices of the mesh (config.train.global_batch_size)"
                )
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

    def get_metrics(self, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
        metrics = jax.device_get(metrics)
        if self.kind == "pmap":
            return {k: float(v[0]) for k, v in metrics.items()}
        return {k: float(v) for k, v in metrics.items()}

    def compile(self, step_fn: Callable[..., Any]) -> Callable[[TrainState, Batch], Any]:
        """step_fn: `train_step` with its keywords bound except `axis_name`."""
        if self.kind == "pmap":
            fn = functools.partial(step_fn, axis_name=PMAP_AXIS)
            return jax.pmap(fn, axis_name=PMAP_AXIS, donate_argnums=(0,))
        replicated = NamedSharding(self.mesh, P())
        data = NamedSharding(self.mesh, P(MESH_AXIS))
        return jax.jit(
            step_fn,
            in_shardings=(replicated, data),
            out_shardings=(replicated, replicated),
            donate_argnums=(0,),
        )


PARALLELISMS = ("pmap", "mesh")  # config.train.parallelism


def make_placement(parallelism: str, devices=None) -> Placement:
    """parallelism: "pmap" | "mesh"; devices: the mesh devices (default: all, over every host).
    pmap always runs on every local device."""
    if parallelism == "pmap":
        if devices is not None and list(devices) != jax.local_devices():
            raise ValueError(
                "make_placement('pmap') runs on every local device: a subset of devices= is for"
                " 'mesh'"
            )
        return Placement("pmap")
    if parallelism == "mesh":
        devices = jax.devices() if devices is None else devices
        return Placement("mesh", mesh=Mesh(np.asarray(devices), (MESH_AXIS,)))
    raise ValueError(f"config.train.parallelism must be 'pmap' or 'mesh', got {parallelism!r}")


_UNKNOWN = object()


def compile_train_step(
    placement: Placement,
    *,
    loss_fn: LossFn,
    learning_rate_fn: optax.Schedule,
    trainable=None,
    accum_steps: int = 1,
):
    """The jitted / pmapped `train_step` for `placement`: (placed state, placed batch) -> ...
    accum_steps > 1 accumulates the gradients of that many micro-batches of each device's
    batch into one update (`train_step`).

    The step donates its state argument: the arrays of the state passed in are deleted by the
    call (use the state it returns). `placement.put_state(state)` places a copy, so the variables
    a fresh `create_train_state` shares its arrays with stay usable.

    A loss from `losses.make_loss_fn` says which device axis it was made for: under pmap it must
    be PMAP_AXIS (else the mask loss is averaged per device and sync BN is per-device BN, silently
    other numbers than on one device), under a mesh None (GSPMD sees the global batch). A loss of
    your own that wraps one keeps the check when it carries the attribute: decorate the wrapper
    with `functools.wraps(loss_fn)`. Any other loss function is not checked."""
    made_for = getattr(loss_fn, "axis_name", _UNKNOWN)  # any other loss function: not checked
    wanted = PMAP_AXIS if placement.kind == "pmap" else None
    if made_for is not _UNKNOWN and made_for != wanted:
        raise ValueError(
            f"the loss was made with axis_name={made_for!r} but the {placement.kind!r} placement"
            f" needs {wanted!r}: losses.make_loss_fn(..., axis_name={wanted!r}) (and"
            f" mask_rcnn.build_model(..., axis_name={wanted!r}) for sync_bn)"
        )
    step_fn = functools.partial(
        train_step, loss_fn=loss_fn, learning_rate_fn=learning_rate_fn, trainable=trainable,
        accum_steps=accum_steps,
    )
    return placement.compile(step_fn)


# ----------------------------------------------------------------------------- host side


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN / Inf loss or gradient; the state of that step is never saved."""


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
    """Raises NonFiniteLossError naming the step and every loss component when one is not finite."""
    if all(math.isfinite(v) for v in metrics.values()):
        return
    parts = ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))
    raise NonFiniteLossError(f"non-finite loss or gradient at step {step}: {parts}")


def drop_logged(path: str, which: Callable[[dict], bool], why: str) -> int:
    """Rewrites the JSON-lines log `path` without the entries `which` picks (dicts with an int
    "step"); other lines are kept as they are. -> dropped."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return 0

    def picked(line: str) -> bool:
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        return isinstance(entry, dict) and isinstance(entry.get("step"), int) and which(entry)

    kept = [line for line in lines if not picked(line)]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        logging.info("%s: dropped %d entries (%s)", path, len(lines) - len(kept), why)
    return len(lines) - len(kept)


def drop_logged_after(path: str, step: int) -> int:
    """`drop_logged` of the entries of steps after `step` (what a run resumed from checkpoint
    `step` logs again). -> dropped."""
    return drop_logged(path, lambda e: e["step"] > step, f"after step {step}: resumed there")


class MetricWriter:
    """Train / eval metrics to `workdir/metrics.jsonl`, TensorBoard and the console.

    Train metrics are averaged over `log_every` steps. On a terminal a carriage-return progress line
    is refreshed every step; otherwise a plain log line is written every `log_every` steps.
    Only process 0 writes files. The first step a writer sees (which includes the compilation)
    is not timed: images/s counts the steps after it, and a log line due at that step gives its
    time instead (images_per_sec null in metrics.jsonl).

    resumed_at: the step a resumed run starts from; what the files hold of later steps (logged
    before the run stopped, after its last checkpoint) is dropped, so the logs read as those of
    one uninterrupted run.
    """

    def __init__(
        self, workdir, *, log_every, num_steps, images_per_step, stream=None, resumed_at=None
    ):
        self.log_every, self.num_steps = max(int(log_every), 1), num_steps
        self.images_per_step = images_per_step
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._window: list[Mapping[str, float]] = []  # train metrics since the last log line
        self._tick, self._timed_steps = time.perf_counter(), 0  # the images/s clock
        self._compiled = False  # until the first step is done: it includes the compilation
        self._jsonl = self._tb = None
        if workdir is not None and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if resumed_at is not None:  # steps past the checkpoint are logged again: drop them
                drop_logged_after(path, resumed_at)
            self._jsonl = open(path, "a")  # noqa: SIM115
            purge = None if resumed_at is None else resumed_at + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def reset_timer(self) -> None:
        """Restart the images/s clock (after an evaluation or a checkpoint)."""
        self._tick, self._timed_steps = time.perf_counter(), 0

    def train(self, step: int, metrics: Mapping[str, float]) -> None:
        self._window.append(metrics)
        if self._compiled:
            self._timed_steps += 1
        elapsed = max(time.perf_counter() - self._tick, 1e-9)
        speed = self._timed_steps * self.images_per_step / elapsed if self._timed_steps else math.nan
        if math.isnan(speed):  # only the first step is in: its time is mostly compilation
            rate = f"first step {elapsed:.1f} s (compilation included)"
        else:
            rate = f"{speed:.1f} images/s"
        if not self._compiled:  # the clock starts when the compiled step has run once
            self._compiled = True
            self.reset_timer()
        if self.tty:
            line = f"step {step}/{self.num_steps}  loss {metrics['loss']:.4f}  {rate}"
            self.stream.write("\r" + line.ljust(60))
            self.stream.flush()
        if step % self.log_every and step != self.num_steps:
            return
        mean = {k: float(np.mean([m[k] for m in self._window])) for k in self._window[0]}
        self._write(step, "train", {**mean, "images_per_sec": speed})
        if self.tty:
            self.stream.write("\n")
        else:
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(mean.items()))
            logging.info("step %d/%d %s %s", step, self.num_steps, rate, shown)
        self._window = []
        self.reset_timer()

    def eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        # Per-category APs ("bbox/AP-NAME", 160 of them on COCO) are in the files and tables
        # (evaluate.run_evaluation logs them), not in this line.
        summary = {k: v for k, v in scalars.items() if "/AP-" not in k}
        left = len(scalars) - len(summary)
        more = f" (and {left} per-category APs)" if left else ""
        logging.info("eval at step %d: %s%s", step, json.dumps(summary, sort_keys=True), more)
        self._write(step, "eval", scalars)

    def _write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        # NaN (an AP of an empty size bucket, a diverged loss) is null in the JSON, as in
        # eval_metrics.jsonl (bare NaN is not JSON), and left out of TensorBoard.
        finite = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "split": split, **finite}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            from mrcnn_jax.evaluate import tensorboard_tag

            for k, v in finite.items():
                if v is not None:
                    self._tb.add_scalar(tensorboard_tag(f"{split}/{k}"), v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = self._tb = None


@contextlib.contextmanager
def stop_on_sigterm():
    """Yields an Event set by SIGTERM (preemption); the previous handler comes back on exit."""
    event = threading.Event()
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    except ValueError:  # not the main thread: signals cannot be caught here
        logging.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
        previous = None
    try:
        yield event
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class StopVote:
    """Whether to stop after this step, the same answer on every host: True once any host has
    been sent SIGTERM (`event`).

    One host reads its flag. Several vote: each step queues an all-reduce of the hosts' flags
    behind that step on the devices, and the vote queued at step s is read at step s + 1, once
    s + 1 is dispatched, as the metrics are. Read at once, it made every host wait for step s to
    finish before preparing s + 1, so the batch transfer and the dispatch of every step left the
    devices idle. All hosts read the same vote, so they stop, and save, at the same step: one
    step after the signal at most. `collective` forces the vote on one host (tests)."""

    def __init__(self, event: threading.Event, collective: bool | None = None):
        self.event = event
        self.collective = jax.process_count() > 1 if collective is None else collective
        self._pending = None  # the vote queued at the previous step
        if self.collective:
            mesh = Mesh(np.asarray(jax.devices()), ("hosts",))
            self._sharding = NamedSharding(mesh, P("hosts"))
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def __call__(self) -> bool:
        """Called once per step, on every host, after the step is dispatched."""
        if not self.collective:
            return self.event.is_set()
        previous = self._pending
        flags = np.full((jax.local_device_count(),), self.event.is_set(), np.int32)
        self._pending = self._any(jax.make_array_from_process_local_data(self._sharding, flags))
        return previous is not None and bool(previous.addressable_data(0))


# ----------------------------------------------------------------------------- the loop


def train_loop(
    state: TrainState,
    step_fn: Callable[[TrainState, Batch], tuple[TrainState, Any]],
    batches: Callable[[int], Iterable[Batch]],
    *,
    placement: Placement,
    num_steps: int,
    writer: MetricWriter,
    checkpoints: ckpt_lib.CheckpointManager | None = None,
    checkpoint_every: int = 0,
    evaluate: Callable[[int, TrainState], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    keep_state: bool = True,
) -> TrainState:
    """Trains from `state.step` to `num_steps`; returns the host state.

    keep_state: leave `state`'s arrays usable (`Placement.put_state(copy=True)`); False when the
    caller has no further use for them, which saves a copy of the state on the devices.

    state: host (unreplicated) state; step_fn: from `compile_train_step`; batches(start) yields the
    host-local batches [host_batch, ...] of steps start, start + 1, ... (deterministic by step).
    Saves every `checkpoint_every` steps, before each evaluation, at the end and on SIGTERM (then
    stops); evaluates every `eval_every` steps (0 = only at the end) and at the end. The metrics of
    step s are read while step s + 1 runs; a non-finite one raises before any later save, so the
    last checkpoint is good.
    """
    start = int(state.step)
    placed = placement.put_state(state, copy=keep_state)
    pending = None  # (step, device metrics) not yet read back
    last_eval, stopped = None, False

    def flush():
        nonlocal pending
        if pending is not None:
            step, metrics = pending[0], placement.get_metrics(pending[1])
            pending = None
            check_finite(step, metrics)
            writer.train(step, metrics)

    try:
        with stop_on_sigterm() as sigterm:
            vote = StopVote(sigterm)
            for step, batch in zip(range(start + 1, num_steps + 1), batches(start), strict=False):
                placed, metrics = step_fn(placed, placement.put_batch(batch))
                if step == start + 1:  # the step is compiled (and dispatched) now
                    runtime.release_host_memory()
                flush()
                pending = (step, metrics)
                stopped = vote()
                do_eval = evaluate is not None and (step == num_steps or _every(step, eval_every))
                # A mid-run evaluation (minutes on COCO) is saved first: a preemption during it
                # then costs the evaluation only, not the steps since the last periodic save.
                save = stopped or do_eval or step == num_steps or _every(step, checkpoint_every)
                if save:
                    flush()
                    eval_now = do_eval and not stopped
                    # One host copy for the save and the evaluation (under pmap a device_get of
                    # the whole state).
                    if checkpoints is not None or eval_now:
                        host = placement.get_state(placed)
                    if checkpoints is not None:
                        checkpoints.save(step, host)
                    if eval_now:
                        writer.eval(step, evaluate(step, host))
                        last_eval = step
                    writer.reset_timer()
                if stopped:
                    logging.warning("SIGTERM: saved the checkpoint of step %d, stopping", step)
                    break
            flush()
        final = placement.get_state(placed)
        final_step = int(final.step)
        if checkpoints is not None and final_step > start:  # e.g. the batches ran out early
            checkpoints.save(final_step, final)  # a no-op when this step is already saved
        if evaluate is not None and not stopped and last_eval != final_step:
            writer.eval(final_step, evaluate(final_step, final))
        return final
    finally:
        if checkpoints is not None:
            checkpoints.wait()


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


# ----------------------------------------------------------------------------- Mask R-CNN glue


def optimizer_from_config(
    train_cfg, params, trainable
) -> tuple[optax.GradientTransformation, Any]:
    """(tx, learning-rate schedule) from `config.train`, as the command line trains: detectron2's
    SGD, or AdamW (`train.optimizer`; `make_optimizer`), with the frozen parameters of
    `trainable` kept as they are."""
    schedule = learning_rate_schedule(
        scaled_learning_rate(
            train_cfg.base_lr, train_cfg.global_batch_size, train_cfg.lr_reference_batch
        ),
        warmup_steps=train_cfg.warmup_steps,
        warmup_factor=train_cfg.warmup_factor,
        decay_steps=train_cfg.decay_steps,
        decay_factor=train_cfg.decay_factor,
        kind=train_cfg.lr_schedule,
        num_steps=train_cfg.num_steps,
        end_factor=train_cfg.lr_end_factor,
    )
    tx = make_optimizer(
        params,
        learning_rate_fn=schedule,
        momentum=train_cfg.momentum,
        weight_decay=train_cfg.weight_decay,
        weight_decay_norm=train_cfg.weight_decay_norm,
        grad_clip_norm=train_cfg.grad_clip_norm,
        trainable=trainable,
        optimizer=train_cfg.get("optimizer", "sgd"),
        betas=tuple(train_cfg.get("adam_betas", (0.9, 0.999))),
        eps=train_cfg.get("adam_eps", 1e-8),
    )
    return tx, schedule


def save_config(config, workdir: str) -> str:
    """Writes the resolved config to `workdir/config.json` (process 0); returns the path."""
    path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return path


def _resume_mismatch(workdir: str, config, error: Exception) -> str:
    """The message for checkpoints that do not fit the config: their run's model keys that
    differ (from WORKDIR/config.json), and what to do."""
    text = f"cannot resume the run in {workdir}: {str(error).rstrip('.')}."
    path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
    try:
        with open(path) as f:
            saved = traverse_util.flatten_dict(json.load(f), sep=".")
    except (OSError, ValueError):
        return text + " Start a new run in another --workdir."
    now = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    changed = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k.startswith(("model.", "data.num_classes", "train.ema_decay", "train.optimizer"))
        and saved.get(k) != now.get(k)
    ]
    if changed:
        text += f" {path}, the config its checkpoints were trained with, differs in: " + "; ".join(
            changed
        )
    return text + ". Resume with that config, or start a new run in another --workdir."


def _initial_variables(config, model, key, resuming: bool) -> dict[str, Any]:
    """Fresh variables, overwritten by config.train.init_checkpoint unless a run is resumed."""
    from mrcnn_jax import mask_rcnn

    fine_tune = bool(config.train.init_checkpoint) and not resuming
    if fine_tune:  # before anything is computed: weights of another input convention
        ckpt_lib.check_input_convention(config, config.train.init_checkpoint)
    m = config.model
    frozen = m.freeze_at > 0 or m.norm == "frozen_bn"
    if frozen and not config.train.init_checkpoint and not resuming:
        logging.warning(
            "training from random weights with model.freeze_at=%d and model.norm=%r: frozen layers"
            " keep their random initial values (and frozen BN its identity statistics). These"
            " settings are for ImageNet weights: pass --config.train.init_checkpoint=DIR"
            " (docs/weights.md), or train from scratch with --config.model.freeze_at=0 and a"
            " trainable norm (group_norm, as configs/shapes.py)", m.freeze_at, m.norm,
        )
    variables = mask_rcnn.init_variables(model, key, tuple(config.data.image_size))
    if fine_tune:
        from mrcnn_jax import convert

        # Class-dependent layers of another class count, or everything past an ImageNet
        # backbone, keep their fresh values; anything else must fit exactly.
        loaded = ckpt_lib.load_weights(config.train.init_checkpoint)
        variables = convert.merge_pretrained(variables, loaded)
        logging.info("initialised the weights from %s", config.train.init_checkpoint)
    return variables


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Trains Mask R-CNN per `config` in `workdir`, resuming from its latest checkpoint if any."""
    from mrcnn_jax import evaluate as evaluate_lib
    from mrcnn_jax import losses, mask_rcnn
    from mrcnn_jax.data import pipeline, transforms

    as_given = config
    config = config.copy_and_resolve_references()
    config.train = scale_schedule(config.train)
    tc = config.train
    devices = jax.device_count()
    if tc.global_batch_size % devices:
        raise runtime.ConfigError(
            f"config.train.global_batch_size={tc.global_batch_size} does not split over the"
            f" {devices} devices ({jax.process_count()} processes): use a multiple of {devices}"
        )
    accum = int(tc.get("grad_accum_steps", 1))
    if (tc.global_batch_size // devices) % accum:
        raise runtime.ConfigError(
            f"config.train.grad_accum_steps={accum} does not divide the"
            f" {tc.global_batch_size // devices} examples per device"
            f" (train.global_batch_size={tc.global_batch_size} over {devices} devices)"
        )
    if tc.get("scale_schedule", False):
        logging.info(
            "schedule for a batch of %d (recipe at %d): %s", tc.global_batch_size,
            tc.lr_reference_batch, {k: tc[k] for k in SCHEDULE_KEYS},
        )
    image_size = tuple(config.data.image_size)
    # The evaluation split, its categories and sizes are checked (and prepared) now, not first
    # at step eval_every: a typo in config.data.eval_split must not cost a run its first hours.
    info = pipeline.dataset_info(config)
    transforms.check_resize_fits(config.data, train=False)
    if jax.process_index() == 0:  # what the labels mean, for prediction without the dataset
        ckpt_lib.write_labels(workdir, info.class_names, info.label_to_category_id)
    placement = make_placement(tc.parallelism)
    if placement.kind == "pmap":
        placement = dataclasses.replace(placement, shard_for_pmap=pipeline.shard_for_pmap)
    model = mask_rcnn.build_model(
        config.model,
        axis_name=PMAP_AXIS if placement.kind == "pmap" else None,
        sharded_batch=placement.sharded_batch,
    )
    checkpoints = ckpt_lib.CheckpointManager(
        os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR), keep=tc.keep_checkpoints,
        run={"global_batch_size": int(tc.global_batch_size), "devices": jax.device_count(),
             "parallelism": placement.kind},
    )
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    resuming = checkpoints.latest_step() is not None
    variables = _initial_variables(config, model, init_key, resuming)
    trainable = mask_rcnn.trainable_mask(variables["params"], config.model)
    tx, schedule = optimizer_from_config(tc, variables["params"], trainable)
    try:
        state = checkpoints.restore_latest(
            create_train_state(variables, tx, train_key, ema_decay=tc.get("ema_decay", 0.0))
        )
    except ckpt_lib.RestoreError as e:
        checkpoints.close()
        raise ckpt_lib.RestoreError(_resume_mismatch(workdir, as_given, e)) from e
    # Written once the workdir's checkpoints are known to be this config's (a fresh run, or one
    # resumed): a refused restart must not replace the config its checkpoints were made with.
    save_config(as_given, workdir)
    logging.info(
        "training from step %d to %d: %s over %d devices (%d processes), global batch %d (%d per"
        " device%s), learning rate %g", int(state.step), tc.num_steps, placement.kind,
        jax.device_count(), jax.process_count(), tc.global_batch_size,
        tc.global_batch_size // jax.device_count(),
        f", in {accum} micro-batches of {tc.global_batch_size // devices // accum}"
        if accum > 1 else "",
        scaled_learning_rate(tc.base_lr, tc.global_batch_size, tc.lr_reference_batch),
    )
    step_fn = compile_train_step(
        placement,
        loss_fn=losses.make_loss_fn(
            model, config.model, image_size, PMAP_AXIS if placement.kind == "pmap" else None
        ),
        learning_rate_fn=schedule,
        trainable=trainable,
        accum_steps=accum,
    )

    def batches(start_step):
        return pipeline.train_batches(
            config, start_step, process_index=jax.process_index(), process_count=jax.process_count()
        )

    def evaluate(step, host_state):
        # On the host: under a mesh the state's arrays span every device of every host, and each
        # host evaluates its own shard of the split with its own batches (evaluate_model).
        # With train.ema_decay, the moving average is what is evaluated (TF Model Garden).
        variables = jax.device_get(model_variables(host_state, ema=True))
        metrics = evaluate_lib.evaluate_model(config, model, variables, workdir, step)
        if best is not None:
            best.consider(step, host_state, metrics)
        return metrics

    best = None  # train.best_metric's BestCheckpoint, made in the try below
    resumed_at = int(state.step) if resuming else None
    evaluates = tc.eval_every >= 0  # else a --mode=continuous_eval job owns the evaluation files
    if resumed_at is not None and evaluates and jax.process_index() == 0:
        drop_logged_after(os.path.join(workdir, "eval_metrics.jsonl"), resumed_at)
    writer = MetricWriter(
        workdir,
        log_every=tc.log_every,
        num_steps=tc.num_steps,
        images_per_step=tc.global_batch_size,
        resumed_at=resumed_at,
    )
    try:
        if tc.get("best_metric") and evaluates:
            best = ckpt_lib.BestCheckpoint(
                workdir, tc.best_metric, run=checkpoints.run, resumed_at=resumed_at
            )
        return train_loop(
            state,
            step_fn,
            batches,
            placement=placement,
            num_steps=tc.num_steps,
            writer=writer,
            checkpoints=checkpoints,
            checkpoint_every=tc.checkpoint_every,
            # eval_every < 0: a --mode=continuous_eval job evaluates the checkpoints instead
            evaluate=evaluate if evaluates else None,
            eval_every=max(tc.eval_every, 0),
            keep_state=False,  # the state made here has no other use: no second copy
        )
    finally:
        writer.close()
        checkpoints.close()
        if best is not None:
            best.close()


def _evaluated_steps(workdir: str) -> set[int]:
    """The steps WORKDIR/eval_metrics.jsonl holds a record of."""
    path = os.path.join(workdir, "eval_metrics.jsonl")
    if not os.path.isfile(path):
        return set()
    steps = set()
    with open(path) as f:
        for line in f:
            try:
                steps.add(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: that step is evaluated again
    return steps


def _agreed(value: int) -> int:
    """Process 0's `value` on every process (every host must evaluate the same step)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _everyone(ok: bool) -> bool:
    """Whether `ok` holds on every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


_WAIT, _STOP = -1, -2  # evaluate_continuously's choices besides a step
_FAILURES_IN_A_ROW = 3  # checkpoints the evaluator cannot read before it stops


def _training_evaluates(workdir: str) -> bool:
    """Whether the training run's WORKDIR/config.json has it evaluate itself (eval_every >= 0)."""
    try:
        with open(os.path.join(workdir, ckpt_lib.CONFIG_FILE)) as f:
            return int(json.load(f)["train"]["eval_every"]) >= 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def evaluate_continuously(
    config, workdir: str, *, sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[int]:
    """`--mode=continuous_eval`: evaluates the checkpoints of a training run as they appear
    (TF Model Garden's continuous_eval), in a job of its own beside training (run with
    `train.eval_every=-1`, so that the training job does not evaluate). -> the steps evaluated.

    Each round takes the newest checkpoint after the last step in WORKDIR/eval_metrics.jsonl;
    older ones not evaluated by then are skipped, with a warning (an evaluator slower than the
    checkpoints keeps up with the run). It scores it as `--mode=eval` does (eval_metrics.jsonl,
    eval_step_N.json, results, overlays; TensorBoard under WORKDIR/tensorboard/eval) and, with
    `train.best_metric`, keeps the best in WORKDIR/best (its weights). It stops once the run's
    last step (`train.num_steps`) is evaluated, or when no new checkpoint has come for
    `eval.continuous_timeout_s` after the last evaluation; it looks every `eval.continuous_poll_s`.
    A restarted evaluator goes on after the steps already recorded. A checkpoint that cannot be
    read (deleted by the run's rotation first, damaged) is skipped with a warning; three in a row
    stop it. On several hosts every process runs it, and process 0's choice of step is
    everyone's."""
    from mrcnn_jax import evaluate as evaluate_lib
    from mrcnn_jax import mask_rcnn, predict

    directory = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
    num_steps = scale_schedule(config.train).num_steps
    poll, timeout = config.eval.continuous_poll_s, config.eval.continuous_timeout_s
    predict.refuse_backbone_only(workdir)
    ckpt_lib.check_input_convention(config, workdir)
    if _training_evaluates(workdir):
        logging.warning(
            "the training run of %s evaluates too (its config.json has train.eval_every >= 0):"
            " both write the evaluation files and WORKDIR/best; train with"
            " --config.train.eval_every=-1 beside a continuous evaluation", workdir,
        )
    model = mask_rcnn.build_model(config.model)
    fresh = mask_rcnn.zero_variables(model, config.data.image_size)
    last = max(_evaluated_steps(workdir), default=-1)  # the last step evaluated
    best, summaries = None, None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        summaries = SummaryWriter(os.path.join(workdir, "tensorboard", "eval"))
    evaluated, last_new, failures = [], clock(), 0
    logging.info("evaluating the checkpoints of %s as they come, up to step %d", directory,
                 num_steps)
    try:
        if config.train.get("best_metric"):
            best = ckpt_lib.BestCheckpoint(workdir, config.train.best_metric)
        while True:
            steps = ckpt_lib.all_steps(directory)  # every process: orbax's manager syncs them
            choice = _WAIT
            if jax.process_index() == 0:
                if steps and steps[-1] > last:
                    choice = steps[-1]
                elif last >= num_steps or clock() - last_new > timeout:
                    choice = _STOP
            choice = _agreed(choice)
            if choice == _STOP:
                why = ("the run's last step is evaluated" if last >= num_steps
                       else f"no new checkpoint for {timeout:g} s (eval.continuous_timeout_s)")
                logging.info("continuous evaluation done: %s", why)
                return evaluated
            if choice == _WAIT:
                sleep(poll)
                continue
            step, source = choice, os.path.join(directory, str(choice))
            skipped = [s for s in steps if last < s < step]
            if skipped:
                logging.warning("evaluating step %d, the newest: steps %s are skipped", step,
                                skipped)
            last = step
            try:
                weights, error = ckpt_lib.load_weights(source), None
            except Exception as e:  # noqa: BLE001 - one unreadable checkpoint must not stop it
                weights, error = None, e
            if not _everyone(error is None):
                failures += 1
                logging.warning("checkpoint %s could not be read, skipped (%s; rotated away by the"
                                " run's train.keep_checkpoints?)", source,
                                "another host failed" if error is None else repr(error))
                if failures >= _FAILURES_IN_A_ROW:
                    raise RuntimeError(
                        f"{failures} checkpoints of {directory} in a row could not be read"
                    ) from error
                last_new = clock()
                continue
            failures = 0
            variables = ckpt_lib.merge_weights(fresh, weights, source=source)
            logging.info("evaluating the weights of %s (step %d)", source, step)
            metrics = evaluate_lib.evaluate_model(
                config, model, variables, workdir, step, summary_writer=summaries
            )
            summary = {k: v for k, v in metrics.items() if "/AP-" not in k}
            logging.info("eval at step %d: %s", step, json.dumps(summary, sort_keys=True))
            if best is not None:
                weights_only = {"params": variables["params"],
                                "model_state": {k: v for k, v in variables.items() if k != "params"}}
                best.consider(step, weights_only, metrics)
            evaluated.append(step)
            last_new = clock()  # the wait for the next checkpoint starts after the evaluation
    finally:
        if summaries is not None:
            summaries.close()
        if best is not None:
            best.close()


def evaluate_checkpoint(config, workdir: str, checkpoint: str | None = None) -> dict[str, Any]:
    """Eval-only: the latest checkpoint of `workdir` (else config.train.init_checkpoint), or the
    one of `workdir` that `checkpoint` names (`predict.weights_to_use`: a step, "best" or a
    path); the metrics are recorded in `workdir` at that checkpoint's step. A `checkpoint` of
    another workdir is refused: its step's records here would be another run's numbers."""
    from mrcnn_jax import evaluate as evaluate_lib
    from mrcnn_jax import mask_rcnn, predict

    source, step = predict.weights_to_use(workdir, config, checkpoint)  # before the model
    if checkpoint and ckpt_lib.workdir_of(source) != ckpt_lib.workdir_of(workdir):
        raise runtime.InvalidInputError(
            f"--checkpoint={checkpoint} is not a checkpoint of --workdir={workdir}, whose"
            f" evaluation records it would take the place of at step {step}: evaluate it with"
            f" --workdir={ckpt_lib.workdir_of(source)}, or from a fresh workdir with"
            f" --config.train.init_checkpoint={checkpoint}"
        )
    predict.refuse_backbone_only(source)  # no detector heads: nothing to evaluate
    ckpt_lib.check_input_convention(config, source)
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(
        model, jax.random.PRNGKey(config.seed), tuple(config.data.image_size)
    )
    variables = ckpt_lib.merge_weights(variables, ckpt_lib.load_weights(source), source=source)
    logging.info("evaluating the weights of %s (step %d)", source, step)
    if jax.process_index() == 0:  # an evaluation of this step again replaces its records
        again = f"step {step} evaluated again"
        drop_logged(os.path.join(workdir, "eval_metrics.jsonl"), lambda e: e["step"] == step, again)
        drop_logged(os.path.join(workdir, "metrics.jsonl"),
                    lambda e: e["step"] == step and e.get("split") == "eval", again)
    metrics = evaluate_lib.evaluate_model(config, model, variables, workdir, step)
    writer = MetricWriter(workdir, log_every=1, num_steps=step, images_per_step=0)
    writer.eval(step, metrics)
    writer.close()
    return metrics
