"""Training machinery against numpy references, with a tiny conv net + BatchNorm that really learns.

The helpers at the top (TinyNet, make_loss_fn, make_batch, tiny_state) are shared by
test_checkpoint.py and test_parallel.py.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrcnn_jax import checkpoint as ckpt_lib
from mrcnn_jax import train

IMAGE = 8  # tiny images: 8x8x3


class TinyNet(nn.Module):
    """conv 3x3 (4 ch) -> BatchNorm -> relu -> global mean -> dense 1: regresses a scalar."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, axis_name=self.axis_name, name="bn1"
        )(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(1, name="head")(x)[:, 0]


def make_loss_fn(model: TinyNet, noise: float = 0.1):
    """The train.py contract; the per-example keys jitter each input so sharding must keep them."""

    def loss_fn(params, model_state, batch, example_keys):
        jitter = jax.vmap(lambda k: noise * jax.random.normal(k, batch["images"].shape[1:]))(
            example_keys
        )
        pred, new_state = model.apply(
            {"params": params, **model_state},
            batch["images"] + jitter,
            train=True,
            mutable=list(model_state),
        )
        err = pred - batch["targets"]
        metrics = {"loss_mse": jnp.mean(err**2), "loss_abs": 0.1 * jnp.mean(jnp.abs(err))}
        total = metrics["loss_mse"] + metrics["loss_abs"]
        return total, (metrics, new_state)

    return loss_fn


def make_batch(step: int, batch_size: int = 4) -> dict[str, np.ndarray]:
    """The batch of `step`: a deterministic function of the step, like the real pipeline."""
    rng = np.random.default_rng(1000 + step)
    brightness = rng.uniform(
        0.0, 2.0, size=(batch_size, 1, 1, 1)
    )  # spreads the targets over [-2, 2]
    images = (brightness * rng.uniform(size=(batch_size, IMAGE, IMAGE, 3))).astype(np.float32)
    targets = (4.0 * images[..., 0].mean(axis=(1, 2)) - 2.0).astype(np.float32)
    return {"images": images, "targets": targets}


def batch_iter(batch_size: int = 4):
    """batches(start) for train_loop: the batches of steps start, start + 1, ..."""

    def batches(start):
        step = start
        while True:
            yield make_batch(step, batch_size)
            step += 1

    return batches


def tiny_state(
    lr=0.1, momentum=0.9, axis_name=None, trainable=None, warmup=0, clip=0.0, ema_decay=0.0
):
    """(model, state, schedule) for TinyNet with the detectron2 SGD recipe."""
    model = TinyNet(axis_name=axis_name)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False)
    schedule = train.learning_rate_schedule(
        lr, warmup_steps=warmup, warmup_factor=0.1, decay_steps=(1000,), decay_factor=0.1
    )
    tx = train.make_optimizer(
        variables["params"],
        learning_rate_fn=schedule,
        momentum=momentum,
        weight_decay=1e-4,
        weight_decay_norm=0.0,
        grad_clip_norm=clip,
        trainable=trainable,
    )
    state = train.create_train_state(variables, tx, jax.random.PRNGKey(42), ema_decay=ema_decay)
    return model, state, schedule


def jit_step(model, schedule, trainable=None):
    return jax.jit(
        functools.partial(
            train.train_step,
            loss_fn=make_loss_fn(model),
            learning_rate_fn=schedule,
            trainable=trainable,
        )
    )


# ----------------------------------------------------------------------------- schedule


def reference_lr(step, base_lr, warmup_steps, warmup_factor, decay_steps, decay_factor):
    """detectron2 WarmupMultiStepLR, written out."""
    factor = 1.0
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor = warmup_factor * (1 - alpha) + alpha
    for d in decay_steps:
        if step >= d:
            factor *= decay_factor
    return base_lr * factor


@settings(max_examples=40, deadline=None)
@given(
    step=st.integers(0, 3000),
    warmup=st.integers(0, 1000),
    decays=st.lists(st.integers(1, 3000), max_size=3),
    warmup_factor=st.floats(0.0, 1.0),
)
def test_schedule_matches_detectron2(step, warmup, decays, warmup_factor):
    fn = train.learning_rate_schedule(
        0.02, warmup_steps=warmup, warmup_factor=warmup_factor, decay_steps=decays, decay_factor=0.1
    )
    want = reference_lr(step, 0.02, warmup, warmup_factor, decays, 0.1)
    np.testing.assert_allclose(float(fn(step)), want, rtol=1e-5, atol=1e-9)


def reference_cosine_lr(step, base_lr, warmup_steps, warmup_factor, num_steps, end_factor):
    """detectron2 WarmupCosineLR as its schedulers compose it: fvcore's CosineParamScheduler(1,
    end) over where = step / max_iter, after a warmup that is a LinearParamScheduler from
    warmup_factor * cos(0) to cos(warmup length), rescaled to the warmup's interval."""

    def cosine(where):
        return end_factor + 0.5 * (1 - end_factor) * (1 + math.cos(math.pi * where))

    length = min(warmup_steps / num_steps, 1.0)
    where = step / num_steps
    if where < length:
        t = where / length
        factor = cosine(length) * t + warmup_factor * cosine(0.0) * (1 - t)
    else:
        factor = cosine(min(where, 1.0))
    return base_lr * factor


@settings(max_examples=40, deadline=None)
@given(
    step=st.integers(0, 4000),
    warmup=st.integers(0, 1000),
    num_steps=st.integers(1000, 3000),
    warmup_factor=st.floats(0.0, 1.0),
    end_factor=st.floats(0.0, 1.0),
)
def test_cosine_schedule_matches_detectron2(step, warmup, num_steps, warmup_factor, end_factor):
    fn = train.learning_rate_schedule(
        0.02, warmup_steps=warmup, warmup_factor=warmup_factor, kind="cosine",
        num_steps=num_steps, end_factor=end_factor,
    )
    want = reference_cosine_lr(step, 0.02, warmup, warmup_factor, num_steps, end_factor)
    np.testing.assert_allclose(float(fn(step)), want, rtol=1e-5, atol=1e-8)


def test_cosine_schedule_reference_points_and_errors():
    fn = train.learning_rate_schedule(
        0.02, warmup_steps=0, warmup_factor=0.001, kind="cosine", num_steps=1000, end_factor=0.1
    )
    got = [float(fn(s)) for s in (0, 500, 1000, 5000)]
    np.testing.assert_allclose(got, [0.02, 0.02 * 0.55, 0.002, 0.002], rtol=1e-5)
    with pytest.raises(ValueError, match="expected one of"):
        train.learning_rate_schedule(0.02, warmup_steps=0, warmup_factor=0.0, kind="step")
    with pytest.raises(ValueError, match="num_steps > 0"):
        train.learning_rate_schedule(0.02, warmup_steps=0, warmup_factor=0.0, kind="cosine")


def test_config_picks_the_schedule():
    from configs import base

    tc = base.get_config().train
    tc.lr_schedule, tc.lr_end_factor, tc.num_steps, tc.warmup_steps = "cosine", 0.05, 100, 0
    tc.global_batch_size = 8  # lr 0.01
    _, schedule = train.optimizer_from_config(tc, {"w": jnp.zeros(3)}, None)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, 50, 100)], [0.01, 0.01 * 0.525, 0.0005], rtol=1e-5
    )
    tc.lr_schedule, tc.decay_steps = "multistep", (50,)
    _, schedule = train.optimizer_from_config(tc, {"w": jnp.zeros(3)}, None)
    np.testing.assert_allclose([float(schedule(s)) for s in (49, 50)], [0.01, 0.001], rtol=1e-5)


def test_schedule_reference_points():
    # 1x schedule at batch 16: 0.02 / 1000 at step 0, 0.02 after warmup, x0.1 at 60k, x0.01 at 80k.
    fn = train.learning_rate_schedule(
        0.02, warmup_steps=1000, warmup_factor=0.001, decay_steps=(60_000, 80_000), decay_factor=0.1
    )
    got = [float(fn(s)) for s in (0, 500, 1000, 59_999, 60_000, 80_000)]
    want = [2e-5, 0.02 * (0.001 * 0.5 + 0.5), 0.02, 0.02, 0.002, 0.0002]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert train.scaled_learning_rate(0.02, 8, 16) == pytest.approx(0.01)
    assert train.scaled_learning_rate(0.02, 64, 16) == pytest.approx(0.08)


# ----------------------------------------------------------------------------- optimizer


def test_param_labels_norm_frozen_decay():
    leaf = np.zeros(2, np.float32)
    params = {
        "bn1": {"scale": leaf, "bias": leaf},
        "conv1_bn": {"scale": leaf},
        "norm": {"scale": leaf},
        "gn2": {"bias": leaf},
        "BatchNorm_0": {"scale": leaf},
        "GroupNorm_3": {"bias": leaf},
        "conv1": {"kernel": leaf, "bias": leaf, "norm": {"scale": leaf}},
        "Dense_0": {"kernel": leaf},
        "stem": {"conv": {"kernel": leaf}, "bn": {"scale": leaf}},
        "abnormal": {"kernel": leaf},
    }
    trainable = {k: True for k in params}
    trainable["stem"] = False  # a prefix mask: the whole stem is frozen
    labels = train.param_labels(params, trainable)
    flat = {train.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    norm = {
        "bn1/scale", "bn1/bias", "conv1_bn/scale", "norm/scale", "gn2/bias", "BatchNorm_0/scale",
        "GroupNorm_3/bias", "conv1/norm/scale",
    }  # fmt: skip
    frozen = {"stem/conv/kernel", "stem/bn/scale"}
    for name, label in flat.items():
        want = train.NORM if name in norm else train.FROZEN if name in frozen else train.DECAY
        assert label == want, name


def reference_sgd(params, grads_seq, labels, lrs, momentum, wd, wd_norm, clip):
    """torch.optim.SGD (dampening 0, no nesterov) with clip_grad_norm_ over the trainable ones."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        live = [k for k in p if labels[k] != train.FROZEN]
        total = math.sqrt(sum(float(np.sum(grads[k].astype(np.float64) ** 2)) for k in live))
        scale = min(1.0, clip / total) if clip > 0 and total > 0 else 1.0
        for k in live:
            decay = wd_norm if labels[k] == train.NORM else wd
            d = grads[k].astype(np.float64) * scale + decay * p[k]
            buf[k] = momentum * buf[k] + d
            p[k] = p[k] - lr * buf[k]
    return p


def reference_adamw(params, grads_seq, labels, lrs, betas, eps, wd, wd_norm, clip):
    """torch.optim.AdamW (amsgrad off) with clip_grad_norm_ over the trainable ones."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    b1, b2 = betas
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        live = [k for k in p if labels[k] != train.FROZEN]
        total = math.sqrt(sum(float(np.sum(grads[k].astype(np.float64) ** 2)) for k in live))
        scale = min(1.0, clip / total) if clip > 0 and total > 0 else 1.0
        for k in live:
            g = grads[k].astype(np.float64) * scale
            decay = wd_norm if labels[k] == train.NORM else wd
            p[k] = p[k] * (1 - lr * decay)  # torch: decoupled decay first, on the old value
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            denom = np.sqrt(v[k]) / math.sqrt(1 - b2**t) + eps
            p[k] = p[k] - lr / (1 - b1**t) * m[k] / denom
    return p


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optimizer_matches_torch(clip, optimizer):
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3)).astype(np.float32)},
        "bn": {"scale": rng.normal(size=(3,)).astype(np.float32)},
        "frozen": {"kernel": np.array([-0.0, 1.5, -2.25], np.float32)},
    }
    trainable = {"conv": True, "bn": True, "frozen": False}
    schedule = train.learning_rate_schedule(
        0.1, warmup_steps=2, warmup_factor=0.1, decay_steps=(3,), decay_factor=0.5
    )
    tx = train.make_optimizer(
        params,
        learning_rate_fn=schedule,
        momentum=0.9,
        weight_decay=0.01,
        weight_decay_norm=0.001,
        grad_clip_norm=clip,
        trainable=trainable,
        optimizer=optimizer,
        betas=(0.8, 0.99),
        eps=1e-6,
    )
    opt_state = tx.init(params)
    cur = jax.tree.map(jnp.asarray, params)
    grads_seq = []
    for _ in range(5):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        grads_seq.append(
            {train.path_name(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
        )
        updates, opt_state = tx.update(grads, opt_state, cur)
        cur = optax.apply_updates(cur, updates)
    flat = lambda t: {
        train.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(t)[0]
    }
    labels = flat(train.param_labels(params, trainable))
    lrs = [float(schedule(s)) for s in range(5)]
    if optimizer == "sgd":
        want = reference_sgd(flat(params), grads_seq, labels, lrs, 0.9, 0.01, 0.001, clip)
    else:
        want = reference_adamw(
            flat(params), grads_seq, labels, lrs, (0.8, 0.99), 1e-6, 0.01, 0.001, clip
        )
    got = flat(cur)
    for name in ("conv/kernel", "bn/scale"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # set_to_zero: no momentum and no decay for frozen parameters.
    np.testing.assert_array_equal(got["frozen/kernel"], params["frozen"]["kernel"])
    try:  # and the numpy reference is torch's optimizer (torch is optional)
        import torch
    except ImportError:
        return
    live = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for k, v in flat(params).items() if labels[k] != train.FROZEN}
    groups = [
        {"params": [live["conv/kernel"]], "weight_decay": 0.01},
        {"params": [live["bn/scale"]], "weight_decay": 0.001},
    ]
    opt = (
        torch.optim.SGD(groups, lr=1.0, momentum=0.9) if optimizer == "sgd"
        else torch.optim.AdamW(groups, lr=1.0, betas=(0.8, 0.99), eps=1e-6)
    )
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k, t in live.items():
            t.grad = torch.tensor(grads[k], dtype=torch.float64)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(list(live.values()), clip)
        for group in opt.param_groups:
            group["lr"] = float(lr)
        opt.step()
    for name, t in live.items():  # (torch's clip_grad_norm_ divides by the norm + 1e-6)
        rtol = 1e-5 if clip > 0 else 1e-9
        np.testing.assert_allclose(want[name], t.detach().numpy(), rtol=rtol, err_msg=name)


# ----------------------------------------------------------------------------- train step


def test_train_step_metrics_keys_and_frozen_bits():
    trainable = {"conv1": False, "bn1": True, "head": True}
    model, state, schedule = tiny_state(trainable=trainable, warmup=10)
    # A negative zero survives only if frozen parameters are passed through without arithmetic.
    kernel = state.params["conv1"]["kernel"].at[0, 0, 0, 0].set(-0.0)
    state = state.replace(
        params={**state.params, "conv1": {**state.params["conv1"], "kernel": kernel}}
    )
    before = jax.device_get(state.params["conv1"])
    batch = make_batch(0)

    loss_fn = make_loss_fn(model)
    keys = jax.random.split(jax.random.fold_in(state.rng, 0), 4)
    (want_loss, (want_metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch, keys
    )
    trainable_grads = [grads["bn1"], grads["head"]]
    want_norm = math.sqrt(
        sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(trainable_grads))
    )

    step = jit_step(model, schedule, trainable)
    new, metrics = step(state, batch)
    assert set(metrics) == {"loss", "loss_mse", "loss_abs", "grad_norm", "learning_rate"}
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_mse"], want_metrics["loss_mse"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], want_norm, rtol=1e-5)
    np.testing.assert_allclose(metrics["learning_rate"], 0.1 * 0.1, rtol=1e-6)  # warmup_factor
    assert int(new.step) == 1

    for _ in range(3):
        new, _ = step(new, make_batch(int(new.step)))
    after = jax.device_get(new.params["conv1"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert a.tobytes() == b.tobytes()
    assert not np.array_equal(new.params["head"]["kernel"], state.params["head"]["kernel"])
    # BatchNorm statistics moved: the model state is carried through the step.
    assert not np.allclose(new.model_state["batch_stats"]["bn1"]["mean"], 0.0)


def test_example_keys_follow_the_global_index():
    rng = jax.random.PRNGKey(3)
    keys = train.example_keys(rng, jnp.int32(5), 6)
    want = jax.random.split(jax.random.fold_in(rng, 5), 6)
    np.testing.assert_array_equal(keys, want)
    # Under pmap, device i of 3 takes rows [2 i, 2 i + 2) of the 6 global keys.
    per_device = jax.vmap(lambda _: train.example_keys(rng, jnp.int32(5), 2, "i"), axis_name="i")(
        jnp.arange(3)
    )
    np.testing.assert_array_equal(per_device.reshape(want.shape), want)


def test_gradient_accumulation_averages_strided_micro_batches():
    """accum_steps=2: the gradient of micro-batches [0, 2] and [1, 3] (with those examples' keys),
    each from the same state, averaged into one update; metrics and BatchNorm statistics are the
    micro-batches' means."""
    model, state, schedule = tiny_state(warmup=0)
    batch = make_batch(0)
    loss_fn = make_loss_fn(model)
    keys = train.example_keys(state.rng, state.step, 4)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    parts = [
        grad_fn(state.params, state.model_state, {k: v[j::2] for k, v in batch.items()}, keys[j::2])
        for j in (0, 1)
    ]
    grads = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    want_params = optax.apply_updates(state.params, updates)
    want_stats = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][0][1][1], parts[1][0][1][1])

    step = jax.jit(functools.partial(
        train.train_step, loss_fn=loss_fn, learning_rate_fn=schedule, accum_steps=2
    ))
    new, metrics = step(state, batch)
    np.testing.assert_allclose(
        metrics["loss"], (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-5)
    # (the conv bias before BatchNorm has a zero gradient up to round-off: atol)
    for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(new.model_state), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert int(new.step) == 1

    with pytest.raises(ValueError, match=r"a batch of 4 examples .* does not split into 3 micro"):
        jax.jit(functools.partial(
            train.train_step, loss_fn=loss_fn, learning_rate_fn=schedule, accum_steps=3
        ))(state, batch)


def test_gradient_accumulation_of_a_per_example_loss_is_the_whole_batch_step():
    """Without batch statistics (BatchNorm on its running averages) the loss is a mean over
    examples, and two micro-batches give the one-batch update."""
    model, state, schedule = tiny_state(warmup=0)

    def loss_fn(params, model_state, batch, example_keys):
        pred = model.apply({"params": params, **model_state}, batch["images"], train=False)
        loss = jnp.mean((pred - batch["targets"]) ** 2)
        return loss, ({"loss_mse": loss}, model_state)

    def run(accum):
        step = jax.jit(functools.partial(
            train.train_step, loss_fn=loss_fn, learning_rate_fn=schedule, accum_steps=accum
        ))
        s = state
        for i in range(3):
            s, metrics = step(s, make_batch(i, 8))
        return s, metrics

    (one, m1), (four, m4) = run(1), run(4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_tiny_net_learns():
    model, state, schedule = tiny_state(lr=0.02)
    step = jit_step(model, schedule)
    losses = []
    for s in range(80):
        state, metrics = step(state, make_batch(s, 8))
        losses.append(float(metrics["loss_mse"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.2 * first, (first, last)


# ----------------------------------------------------------------------------- loop & logging


def run_loop(workdir, num_steps, *, checkpoint_every=0, loss_fn=None, stream=None, batches=None):
    """train_loop on TinyNet (single device mesh) writing into `workdir`; returns the host state."""
    model, state, schedule = tiny_state()
    placement = train.make_placement("mesh", devices=jax.devices()[:1])
    step_fn = train.compile_train_step(
        placement, loss_fn=loss_fn or make_loss_fn(model), learning_rate_fn=schedule
    )
    writer = train.MetricWriter(
        workdir, log_every=2, num_steps=num_steps, images_per_step=4, stream=stream or io.StringIO()
    )
    with ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), keep=10) as checkpoints:
        state = checkpoints.restore_latest(state)
        try:
            return train.train_loop(
                state,
                step_fn,
                batches or batch_iter(),
                placement=placement,
                num_steps=num_steps,
                writer=writer,
                checkpoints=checkpoints,
                checkpoint_every=checkpoint_every,
            )
        finally:
            writer.close()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    model = TinyNet()
    good = make_loss_fn(model)

    def loss_fn(params, model_state, batch, keys):
        total, (metrics, new_state) = good(params, model_state, batch, keys)
        poison = jnp.where(batch["poison"][0], jnp.nan, 0.0)  # the data turns bad at step 5
        metrics = {**metrics, "loss_mse": metrics["loss_mse"] + poison}
        return total + poison, (metrics, new_state)

    def batches(start):
        for s in range(start, 100):
            yield {**make_batch(s), "poison": np.full((4,), s == 5)}

    with pytest.raises(FloatingPointError, match=r"step 6.*loss_mse=nan"):
        run_loop(str(tmp_path), 10, checkpoint_every=2, loss_fn=loss_fn, batches=batches)
    with ckpt_lib.CheckpointManager(str(tmp_path / "checkpoints")) as checkpoints:
        assert checkpoints.all_steps() == [2, 4]
        _, target, _ = tiny_state()
        restored = checkpoints.restore(target)
    assert int(restored.step) == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))


def test_metrics_files_and_plain_log_lines(tmp_path):
    run_loop(str(tmp_path), 4)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    for line in lines:
        assert line["split"] == "train"
        assert {"loss", "loss_mse", "loss_abs", "grad_norm", "learning_rate"} <= set(line)
        assert line["images_per_sec"] > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_on_a_terminal(tmp_path):
    stream = _Terminal()
    run_loop(str(tmp_path), 3, stream=stream)
    text = stream.getvalue()
    assert text.count("\r") == 3  # one refresh per step
    assert "step 3/3" in text and "images/s" in text and "loss" in text


def test_the_first_step_includes_compilation_and_is_not_timed(tmp_path, monkeypatch, caplog):
    now = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])
    writer = train.MetricWriter(str(tmp_path), log_every=1, num_steps=4, images_per_step=2)
    for step, at in [(1, 60.0), (2, 61.0), (3, 61.5)]:  # compiled in 60 s, then 1 and 0.5 s
        now[0] = at
        with caplog.at_level("INFO", logger="absl"):
            writer.train(step, {"loss": 1.0})
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["images_per_sec"] for x in lines] == [None, 2.0, 4.0]
    assert "step 1/4 first step 60.0 s (compilation included)" in caplog.text
    assert "step 2/4 2.0 images/s" in caplog.text


def test_writer_averages_the_window_and_logs_eval(tmp_path):
    writer = train.MetricWriter(str(tmp_path), log_every=2, num_steps=4, images_per_step=2)
    writer.train(1, {"loss": 1.0})
    writer.reset_timer()  # e.g. after a checkpoint: restarts the clock, keeps the window
    writer.train(2, {"loss": 3.0})
    writer.eval(2, {"AP": 0.5, "APl": math.nan, "per_class": np.zeros(3)})
    writer.close()

    def strict(constant):  # bare NaN / Infinity are not JSON
        raise ValueError(f"not JSON: {constant}")

    text = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(x, parse_constant=strict) for x in text]
    assert lines[0]["loss"] == 2.0 and lines[0]["split"] == "train"
    assert lines[1] == {"step": 2, "split": "eval", "AP": 0.5, "APl": None}


def test_a_refused_resume_names_the_keys_its_run_was_trained_with(tmp_path):
    from configs import tiny

    trained = tiny.get_config()
    train.save_config(trained, str(tmp_path))
    changed = tiny.get_config()
    changed.model.fpn_channels = 16
    changed.train.num_steps = 99  # not a model key: not listed
    text = train._resume_mismatch(str(tmp_path), changed, RuntimeError("shape (32,) vs (16,)"))
    assert text.startswith(f"cannot resume the run in {tmp_path}: shape (32,) vs (16,).")
    assert "differs in: model.fpn_channels: 32 -> 16." in text and "num_steps" not in text
    assert "another --workdir" in train._resume_mismatch(str(tmp_path / "none"), changed, None)


def test_a_batch_that_does_not_split_over_the_devices_is_refused_first(monkeypatch, tmp_path):
    from configs import tiny

    config = tiny.get_config()
    config.train.global_batch_size = 6
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"global_batch_size=6 does not split over the 4 devices"):
        train.train_and_evaluate(config, str(tmp_path))
    config.train.global_batch_size = 8
    config.train.grad_accum_steps = 4  # divides 8, not the 2 examples per device
    with pytest.raises(ValueError, match=r"grad_accum_steps=4 does not divide the 2 examples per"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # before the dataset, the labels or config.json


def test_a_resumed_writer_drops_what_was_logged_after_its_checkpoint(tmp_path):
    """A run logged steps 1-6 and stopped; its last checkpoint was step 4. The resumed run logs
    5 and 6 again: the files must not hold them twice."""
    first = train.MetricWriter(str(tmp_path), log_every=1, num_steps=6, images_per_step=1)
    for step in range(1, 7):
        first.train(step, {"loss": float(step)})
    first.eval(6, {"AP": 0.1})
    first.close()
    (tmp_path / "eval_metrics.jsonl").write_text('{"step": 2}\n{"step": 6}\nnot json\n')
    assert train.drop_logged_after(str(tmp_path / "eval_metrics.jsonl"), 4) == 1
    assert (tmp_path / "eval_metrics.jsonl").read_text() == '{"step": 2}\nnot json\n'
    resumed = train.MetricWriter(
        str(tmp_path), log_every=1, num_steps=6, images_per_step=1, resumed_at=4
    )
    for step in (5, 6):
        resumed.train(step, {"loss": 10.0 + step})
    resumed.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["split"]) for x in lines] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "train"), (5, "train"), (6, "train")
    ]
    assert [x["loss"] for x in lines] == [1.0, 2.0, 3.0, 4.0, 15.0, 16.0]


def test_ema_of_the_parameters_follows_its_definition(tmp_path):
    """train.ema_decay: after update s, ema <- d_s * ema + (1 - d_s) * params, d_s = min(d,
    (1 + s) / (10 + s)), from the initial parameters; the training itself is unchanged; the
    checkpoint keeps the average, and the weights read back for evaluation / prediction are it."""
    model, state, schedule = tiny_state(ema_decay=0.5)
    _, plain, _ = tiny_state()
    step = jit_step(model, schedule)
    want = jax.tree.map(np.asarray, state.params)
    for s in range(12):
        state, _ = step(state, make_batch(s))
        plain, _ = step(plain, make_batch(s))
        d = min(0.5, (1 + s) / (10 + s))  # 0.1, 0.18, ... then 0.5 from s = 8
        want = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), want, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.ema_params, want)
    jax.tree.map(np.testing.assert_array_equal, state.params, plain.params)  # training unchanged
    assert not np.allclose(state.ema_params["head"]["kernel"], state.params["head"]["kernel"])
    assert train.model_variables(state, ema=True)["params"] is state.ema_params
    assert train.model_variables(plain, ema=True)["params"] is plain.params  # none kept
    with ckpt_lib.CheckpointManager(str(tmp_path / "checkpoints")) as checkpoints:
        checkpoints.save(12, state)
        checkpoints.wait()
        restored = checkpoints.restore(tiny_state(ema_decay=0.5)[1])
    jax.tree.map(np.testing.assert_array_equal, restored.ema_params, state.ema_params)
    weights = ckpt_lib.load_weights(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, weights["params"], state.ema_params)
    raw = ckpt_lib.load_weights(str(tmp_path), ema=False)
    jax.tree.map(np.testing.assert_array_equal, raw["params"], state.params)
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_state(ema_decay=1.0)


def test_a_new_style_key_is_stored_as_its_data_and_resumes(tmp_path):
    _, old, _ = tiny_state()
    model = TinyNet()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False)
    new = train.create_train_state(variables, old.tx, jax.random.key(42))
    np.testing.assert_array_equal(new.rng, old.rng)  # jax.random.key(42) -> PRNGKey(42)'s data
    with ckpt_lib.CheckpointManager(str(tmp_path)) as checkpoints:
        checkpoints.save(1, new)
        checkpoints.wait()
        fresh = train.create_train_state(variables, old.tx, jax.random.key(0))
        restored = checkpoints.restore_latest(fresh)
    np.testing.assert_array_equal(restored.rng, old.rng)


def test_a_loss_made_for_another_placement_is_refused():
    """Under pmap a loss made without the axis name averages the mask loss per device and makes
    sync BN per-device BN: other numbers than on one device, silently."""

    def loss_fn(params, model_state, batch, keys):
        return 0.0, ({}, model_state)

    loss_fn.axis_name = None  # as losses.make_loss_fn records it
    pmap = train.make_placement("pmap")
    with pytest.raises(ValueError, match="axis_name=None but the 'pmap' placement needs 'batch'"):
        train.compile_train_step(pmap, loss_fn=loss_fn, learning_rate_fn=lambda s: 0.1)
    loss_fn.axis_name = train.PMAP_AXIS
    train.compile_train_step(pmap, loss_fn=loss_fn, learning_rate_fn=lambda s: 0.1)
    with pytest.raises(ValueError, match="needs None"):
        train.compile_train_step(
            train.make_placement("mesh"), loss_fn=loss_fn, learning_rate_fn=lambda s: 0.1
        )
    train.make_placement("pmap", devices=jax.local_devices())  # all of them: fine
    with pytest.raises(ValueError, match="a subset of devices= is for 'mesh'"):
        train.make_placement("pmap", devices=[])


def test_check_finite_names_every_component():
    train.check_finite(3, {"loss": 1.0, "grad_norm": 2.0})
    with pytest.raises(train.NonFiniteLossError, match=r"step 7: grad_norm=inf, loss=1"):
        train.check_finite(7, {"loss": 1.0, "grad_norm": math.inf})


# ----------------------------------------------------------------------------- Mask R-CNN glue


@pytest.fixture
def stand_ins(monkeypatch):
    """train_and_evaluate's collaborators replaced by TinyNet pieces with the same signatures."""
    import sys
    import types

    import mrcnn_jax.data
    from mrcnn_jax import evaluate, losses, mask_rcnn

    calls = {"batches": [], "eval": [], "info": 0}

    def train_batches(config, start_step, process_index=0, process_count=1):
        calls["batches"].append(start_step)
        return batch_iter(config.train.global_batch_size // process_count)(start_step)

    def evaluate_model(config, model, variables, workdir, step):
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))  # host copies
        calls["eval"].append((step, jax.device_get(variables)))
        return {"AP": 0.5 + step}

    pipeline = types.ModuleType("mrcnn_jax.data.pipeline")
    pipeline.train_batches = train_batches
    def dataset_info(config):
        calls["info"] += 1
        return types.SimpleNamespace(class_names=("background", "a"), label_to_category_id={1: 7})

    pipeline.dataset_info = dataset_info
    pipeline.shard_for_pmap = train._reshape_for_pmap
    monkeypatch.setitem(sys.modules, "mrcnn_jax.data.pipeline", pipeline)
    monkeypatch.setattr(mrcnn_jax.data, "pipeline", pipeline, raising=False)
    monkeypatch.setattr(
        mask_rcnn, "build_model", lambda cfg, axis_name=None, sharded_batch=False: TinyNet(axis_name)
    )
    monkeypatch.setattr(
        mask_rcnn,
        "init_variables",
        lambda model, key, size: model.init(key, jnp.zeros((1, IMAGE, IMAGE, 3)), train=False),
    )
    monkeypatch.setattr(
        mask_rcnn, "trainable_mask", lambda params, cfg: {"conv1": False, "bn1": True, "head": True}
    )
    monkeypatch.setattr(
        losses, "make_loss_fn", lambda model, cfg, size, axis_name=None: make_loss_fn(model)
    )
    monkeypatch.setattr(evaluate, "evaluate_model", evaluate_model, raising=False)
    return calls


def glue_config(num_steps):
    from configs import tiny

    c = tiny.get_config()
    c.train.global_batch_size = 4
    c.train.num_steps = num_steps
    c.train.checkpoint_every = 2
    c.train.eval_every = 2
    c.train.log_every = 2
    return c


def test_train_and_evaluate_resumes_evaluates_and_fine_tunes(tmp_path, stand_ins):
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(glue_config(4), workdir)
    assert int(state.step) == 4 and stand_ins["batches"] == [0] and stand_ins["info"] == 1
    assert [s for s, _ in stand_ins["eval"]] == [2, 4]
    assert ckpt_lib.latest_step(os.path.join(workdir, "checkpoints")) == 4
    records = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [(r["split"], r["step"]) for r in records if r["split"] == "eval"] == [
        ("eval", 2),
        ("eval", 4),
    ]

    resumed = train.train_and_evaluate(glue_config(6), workdir)  # a longer schedule resumes at 4
    assert int(resumed.step) == 6 and stand_ins["batches"] == [0, 4]
    assert [s for s, _ in stand_ins["eval"]] == [2, 4, 6]

    metrics = train.evaluate_checkpoint(glue_config(6), workdir)
    assert metrics == {"AP": 6.5}
    step, variables = stand_ins["eval"][-1]
    assert step == 6
    np.testing.assert_array_equal(
        variables["params"]["head"]["kernel"], resumed.params["head"]["kernel"]
    )

    # Fine-tuning: weights only, from step 0, in a fresh workdir.
    config = glue_config(0)
    config.train.init_checkpoint = workdir
    fresh = train.train_and_evaluate(config, str(tmp_path / "finetune"))
    assert int(fresh.step) == 0
    step, variables = stand_ins["eval"][-1]
    assert step == 0
    np.testing.assert_array_equal(
        variables["params"]["head"]["kernel"], resumed.params["head"]["kernel"]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["bn1"]["var"], resumed.model_state["batch_stats"]["bn1"]["var"]
    )


def test_a_bad_eval_split_stops_training_before_its_first_step(tmp_path):
    from configs import tiny

    config = tiny.get_config()
    config.data.eval_split = "val"  # shapes has "validation"
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="config.data.eval_split"):
        train.train_and_evaluate(config, str(workdir))
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


@pytest.mark.parametrize("parallelism", ["pmap", "mesh"])
def test_the_placed_step_compiles_once(parallelism):
    """Placed state in, state out, and again: the step must not see a new input sharding on its
    second call (under pmap `replicate`'s sharding differed from the step's outputs')."""
    model, state, schedule = tiny_state()
    placement = train.make_placement(parallelism, devices=jax.devices()[:1])
    step = train.compile_train_step(placement, loss_fn=make_loss_fn(model), learning_rate_fn=schedule)
    compiles = []

    def listen(event, duration, **_):
        # A compile served by the test run's persistent cache (conftest) is a retrieval instead.
        if event in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/cache_retrieval_time_sec",
        ):
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        state = placement.put_state(state)
        counts = []
        for s in range(3):
            state, metrics = step(state, placement.put_batch(make_batch(s)))
            jax.block_until_ready(metrics)
            counts.append(len(compiles))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert counts[1] == counts[0] and counts[2] == counts[0], counts


def test_scale_schedule_keeps_the_recipe_epochs_at_any_batch():
    from configs import coco_r50_fpn_1x

    tc = coco_r50_fpn_1x.get_config().train
    tc.global_batch_size = 64
    scaled = train.scale_schedule(tc)
    assert (scaled.num_steps, scaled.decay_steps, scaled.warmup_steps) == (22_500, (15_000, 20_000), 250)
    assert (scaled.checkpoint_every, scaled.eval_every) == (1250, 2500)
    assert tc.num_steps == 90_000  # the input is not changed
    # Images seen and the rate at each image: the 1x recipe's.
    assert scaled.num_steps * 64 == 90_000 * 16
    lr = train.scaled_learning_rate(tc.base_lr, 64, tc.lr_reference_batch)
    assert lr == pytest.approx(0.08)
    tc.scale_schedule = False
    assert train.scale_schedule(tc).num_steps == 90_000
    tc.scale_schedule, tc.global_batch_size, tc.eval_every = True, 16, 0
    same = train.scale_schedule(tc)
    assert (same.num_steps, same.decay_steps, same.eval_every) == (90_000, (60_000, 80_000), 0)


def test_evaluation_gets_host_copies_of_the_weights_under_a_mesh(tmp_path, stand_ins):
    config = glue_config(2)
    config.train.parallelism = "mesh"
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert [s for s, _ in stand_ins["eval"]] == [2]  # evaluate_model asserts numpy leaves


def test_stop_vote_is_read_one_step_after_it_is_cast():
    """Several hosts vote through an all-reduce queued behind each step and read it one step
    later (so no host waits for a step before preparing the next); all read the same vote, so
    all stop at the same step. The two-process run of it is tests/test_multihost.py."""
    event = threading.Event()
    vote = train.StopVote(event, collective=True)
    assert vote() is False
    event.set()  # SIGTERM while the second step runs
    assert vote() is False  # the vote of the first step, cast before the signal
    assert vote() is True
    assert train.StopVote(threading.Event())() is False
    assert train.StopVote(event)() is True  # one host: its own flag, at once


def test_a_mid_run_evaluation_is_saved_before_it_runs(tmp_path, stand_ins, monkeypatch):
    """An evaluation at a step that is not a periodic save (eval every 3, save every 4): the
    step's (asynchronous) save starts before the evaluation, so a preemption during it loses
    the evaluation only."""
    from mrcnn_jax import evaluate

    events = []
    fake, save = evaluate.evaluate_model, ckpt_lib.CheckpointManager.save

    def evaluate_model(config, model, variables, workdir, step):
        events.append(("eval", step))
        return fake(config, model, variables, workdir, step)

    def recording_save(self, step, state):
        events.append(("save", step))
        return save(self, step, state)

    monkeypatch.setattr(evaluate, "evaluate_model", evaluate_model)
    monkeypatch.setattr(ckpt_lib.CheckpointManager, "save", recording_save)
    config = glue_config(6)
    config.train.checkpoint_every, config.train.eval_every = 4, 3
    train.train_and_evaluate(config, str(tmp_path / "run"))
    # (the loop's closing save of the last step is a no-op: it is saved already)
    assert events == [("save", 3), ("eval", 3), ("save", 4), ("save", 6), ("eval", 6), ("save", 6)]


def test_freeze_keeps_frozen_parameters_where_optax_masked_would_move_them():
    """For a loop of your own: `train.freeze` gives the frozen leaves a zero update and no
    optimizer state; `train.stop_frozen` spares their gradients. (optax.masked, the obvious
    alternative, passes a masked-out leaf's gradient through as its update.)"""
    params = {"head": jnp.ones(3), "backbone": {"stem": jnp.full(2, 2.0)}}
    trainable = {"head": True, "backbone": {"stem": False}}
    loss = lambda p: jnp.sum(p["head"] ** 2) + jnp.sum(p["backbone"]["stem"] ** 2)
    grads = jax.grad(loss)(params)
    tx = train.freeze(optax.adamw(0.1), trainable)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["backbone"]["stem"], params["backbone"]["stem"])
    assert np.all(np.asarray(new["head"]) < 1.0)
    masked = optax.masked(optax.adamw(0.1), trainable)
    moved = optax.apply_updates(params, masked.update(grads, masked.init(params), params)[0])
    assert not np.array_equal(moved["backbone"]["stem"], params["backbone"]["stem"])
    spared = jax.grad(lambda p: loss(train.stop_frozen(p, trainable)))(params)
    np.testing.assert_array_equal(spared["backbone"]["stem"], 0.0)
    np.testing.assert_array_equal(spared["head"], grads["head"])


def test_continuous_evaluation_follows_the_checkpoints_as_they_come(tmp_path, monkeypatch):
    """A job of its own: each round the newest checkpoint not yet evaluated, the older ones
    skipped; one deleted by the run's rotation before it is read skipped; the timeout counted
    from the end of the last evaluation; the best kept; the end at the run's last step, or
    after the timeout; a restart goes on after the steps already recorded."""
    from configs import tiny
    from mrcnn_jax import evaluate
    from tests.test_predict import _save_weights, _zero_variables

    config = tiny.get_config()
    config.train.num_steps = 10
    config.train.best_metric = "segm/AP"
    config.eval.continuous_poll_s = 30.0
    config.eval.continuous_timeout_s = 100.0
    directory = str(tmp_path / "checkpoints")
    zeros = _zero_variables(config)
    scores = {2: 0.2, 4: 0.5, 6: 0.4, 8: 0.3, 10: 0.1}
    now = [0.0]

    def save(step):  # each checkpoint's values are its step
        _save_weights(directory, jax.tree.map(lambda x: x + step, zeros), step)

    scored = []

    def fake_evaluate(config, model, variables, workdir, step, summary_writer=None):
        assert all(np.all(x == step) for x in jax.tree.leaves(variables["params"]))
        scored.append(step)
        now[0] += 90.0  # an evaluation takes 90 s, close to the 100 s timeout
        metrics = {"segm/AP": scores[step], "bbox/AP": 0.0}
        evaluate.write_metrics(workdir, step, metrics, summary_writer)  # as evaluate_model does
        return metrics

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate)
    arrivals = {1: [4], 2: [6, 8], 3: [10]}  # what the training run writes during each nap
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        now[0] += seconds
        for step in arrivals.get(len(naps), []):
            save(step)

    real_load = ckpt_lib.load_weights

    def rotated_away(path, *args, **kwargs):  # step 8 deleted by rotation as it is read
        if path.endswith("/8"):
            import shutil

            shutil.rmtree(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib, "load_weights", rotated_away)
    save(2)
    got = train.evaluate_continuously(config, str(tmp_path), sleep=sleep, clock=lambda: now[0])
    # 2, 4; then 6 and 8 came together: 6 skipped, 8 went away; then 10, the last step.
    assert got == [2, 4, 10] == scored and naps == [30.0, 30.0, 30.0]
    records = [json.loads(x) for x in open(tmp_path / "eval_metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 10]
    assert os.listdir(tmp_path / "tensorboard" / "eval")
    assert ckpt_lib.all_steps(str(tmp_path / "best")) == [4]  # segm/AP 0.5
    best = ckpt_lib.load_weights(str(tmp_path / "best"))
    assert all(np.all(x == 4) for x in jax.tree.leaves(best["params"]))

    # Restarted: nothing new to evaluate; it waits, and stops after the timeout.
    config.train.num_steps = 12
    naps.clear()
    assert train.evaluate_continuously(
        config, str(tmp_path), sleep=sleep, clock=lambda: now[0]
    ) == []
    assert naps == [30.0] * 4 and scored == [2, 4, 10]
