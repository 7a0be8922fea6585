"""Speed and memory of Mask R-CNN in JAX, optionally side by side with torchvision, as JSON.

    python scripts/benchmark.py --config configs/base.py --image-size 800 1216 --batch 2 \
        --compare-torchvision --output bench.json

Each measured thing runs in a fresh subprocess, so one peak resident set size (ru_maxrss) never
mixes with another and torch and JAX never share a process:

    jax.predict          batch 1: trace and XLA compile time of the jitted predict step, median
                         latency, host-side mask pasting of its detections (evaluate.image_detections)
    jax.predict_batch    batch B (only when B > 1): median latency, images/s
    jax.train            batch B: trace and compile time of the real `train.train_step` (optimizer
                         and placement from the config), median step time, images/s
    jax.export           (only when asked: --measure export) batch 1 through the serialized
                         program of `mrcnn_jax.export` (CPU, CUDA and TPU, any batch size): export
                         and deserialize time, program and weights sizes, compile time, latency
    torchvision.*        the same for torchvision's Mask R-CNN R50-FPN in eager mode (no compile)
    ratios               jax / torchvision for each of them and for the training peak memory

Times are medians of --runs calls after --warmup calls, each ended by block_until_ready (JAX) or
by the host values it returns (torch); the CPU seconds of the process (all threads) are reported
too, they are steadier than wall time on a shared machine. Both sides see the same random batch,
the same image size, the same number of CPU threads (process affinity + torch.set_num_threads), the
same RPN / RoI / test hyper-parameters from the config and, for an R50-FPN config, the same random
weights (torchvision's initialisation, converted by `mrcnn_jax.convert`): the weights decide how
many (RoI, class) pairs pass the score threshold and so the work of the final NMS, the mask head and
the pasting. torchvision's output includes its pasted full-image masks, so the JAX latency compared
with it adds the host pasting of `evaluate.image_detections` (`end_to_end_s`).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

RESULT_MARKER = "BENCHMARK_RESULT "
MEASURES = ("predict", "predict_batch", "train", "export")
DEFAULT_MEASURES = ("predict", "predict_batch", "train")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The targets, defined for R50-FPN, one 800x1216 image / a batch of 2, float32, 2-core CPU.
TARGETS = {
    "predict_latency_ratio_max": 0.5,
    "train_step_ratio_max": 0.6,
    "train_compile_s_max": 60.0,
    "predict_compile_s_max": 30.0,
    "train_peak_rss_ratio_max": 1.0,
}


# ----------------------------------------------------------------------------- config and data


def load_config(path: str, image_size=None, batch: int | None = None, overrides=()):
    """configs/NAME.py (a path, or a bare NAME) -> ConfigDict with image size, batch, `a.b=v` set."""
    if not path.endswith(".py"):
        path = os.path.join(ROOT, "configs", f"{path}.py")
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if image_size is not None:
        config.data.image_size = tuple(int(v) for v in image_size)
    if batch is not None:
        config.train.global_batch_size = int(batch)
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as bfloat16
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def synthetic_examples(image_size, batch: int, num_instances: int, num_classes: int, seed: int = 0):
    """Random images and instances, the same for JAX and torch.

    -> images [B, H, W, 3] float32 N(0, 1) (already "normalised"), boxes [B, n, 4] xyxy pixels with
    sides of 32 px to half the shorter image side, classes [B, n] int32 in 1..num_classes. The
    masks are the ellipses inscribed in the boxes (`ellipse_crop`, `full_image_masks`).
    """
    rng = np.random.default_rng(seed)
    h, w = image_size
    side = rng.uniform(32.0, max(33.0, min(h, w) / 2), size=(batch, num_instances, 2))
    x1 = rng.uniform(0.0, 1.0, size=(batch, num_instances)) * (w - side[..., 0])
    y1 = rng.uniform(0.0, 1.0, size=(batch, num_instances)) * (h - side[..., 1])
    boxes = np.stack([x1, y1, x1 + side[..., 0], y1 + side[..., 1]], axis=-1).astype(np.float32)
    classes = rng.integers(1, num_classes + 1, size=(batch, num_instances)).astype(np.int32)
    images = rng.standard_normal((batch, h, w, 3), dtype=np.float32)
    return {"images": images, "boxes": boxes, "classes": classes}


def ellipse_crop(size: int) -> np.ndarray:
    """[size, size] uint8: the ellipse inscribed in a box, in the box frame (pixel centres)."""
    u = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    return (u[:, None] ** 2 + u[None, :] ** 2 <= 1.0).astype(np.uint8)


def full_image_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """boxes [n, 4] -> [n, height, width] uint8 ellipses inscribed in the boxes."""
    px = np.arange(width, dtype=np.float32) + 0.5
    py = np.arange(height, dtype=np.float32) + 0.5
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    dx = ((px[None, :] - cx[:, None]) / rx[:, None]) ** 2  # [n, W]
    dy = ((py[None, :] - cy[:, None]) / ry[:, None]) ** 2  # [n, H]
    return (dy[:, :, None] + dx[:, None, :] <= 1.0).astype(np.uint8)


def jax_batch(examples: dict, max_instances: int, crop_size: int) -> dict:
    """The examples in the batch layout of `mrcnn_jax.structures` (numpy)."""
    images, boxes, classes = examples["images"], examples["boxes"], examples["classes"]
    b, h, w, _ = images.shape
    n = boxes.shape[1]
    if n > max_instances:
        raise ValueError(f"{n} instances do not fit config.data.max_instances={max_instances}")
    pad = ((0, 0), (0, max_instances - n))
    valid = np.zeros((b, max_instances), bool)
    valid[:, :n] = True
    masks = np.zeros((b, max_instances, crop_size, crop_size), np.uint8)
    masks[:, :n] = ellipse_crop(crop_size)
    return {
        "images": images,
        "image_sizes": np.tile(np.array([h, w], np.int32), (b, 1)),
        "gt_boxes": np.pad(boxes, pad + ((0, 0),)),
        "gt_classes": np.pad(classes, pad, constant_values=-1),
        "gt_valid": valid,
        "gt_is_crowd": np.zeros((b, max_instances), bool),
        "gt_masks": masks,
        "image_ids": np.arange(1, b + 1, dtype=np.int64),
        "orig_sizes": np.tile(np.array([h, w], np.int32), (b, 1)),
        "scales": np.ones((b, 2), np.float32),
        "example_valid": np.ones((b,), bool),
    }


# ----------------------------------------------------------------------------- measuring


def limit_threads(threads: int) -> None:
    """Pins this process to `threads` CPUs before jax / torch start their thread pools (XLA:CPU
    sizes its pool from the affinity mask; torch is told explicitly as well)."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise ValueError(f"--threads {threads} > the {len(cpus)} CPUs this process may use")
    os.sched_setaffinity(0, cpus[:threads])


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(fn: Callable[[], object], warmup: int, runs: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds of this process, all threads) of `runs` calls of fn() after
    `warmup` untimed ones; fn must block until done. On a shared machine the CPU time is the
    steadier of the two: other processes lengthen the wall time more than the work done."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def summary(timed: tuple[list[float], list[float]], batch: int) -> dict:
    """Median and spread of the per-call times (`time_calls`) of a batch of `batch` images."""
    walls, cpus = timed
    med = statistics.median(walls)
    return {
        "batch": batch,
        "median_s": med,
        "min_s": min(walls),
        "max_s": max(walls),
        "runs_s": walls,
        "cpu_median_s": statistics.median(cpus),
        "per_image_s": med / batch,
        "images_per_s": batch / med,
    }


def log(message: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- JAX workers


def _compile(jitted, *args) -> tuple[Callable, float, float]:
    """(compiled, trace+lower seconds, XLA compile seconds) of a jitted / pmapped function."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    return compiled, traced - start, time.perf_counter() - traced


def jax_variables(model, config, key, weights_npz: str | None):
    """Fresh variables, or the torchvision model's weights when `weights_npz` (shared weights)."""
    import jax
    from flax import traverse_util

    from mrcnn_jax import checkpoint, mask_rcnn

    variables = mask_rcnn.init_variables(model, key, tuple(config.data.image_size))
    if not weights_npz:
        return variables
    with np.load(weights_npz) as f:
        loaded = traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")
    return checkpoint.merge_weights(jax.device_get(variables), loaded)


def xla_memory_mb(compiled) -> dict:
    """XLA's own accounting of a compiled program (MiB): temporaries, arguments, outputs, code;
    empty when the backend does not report it (None)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f.replace("_size_in_bytes", "_mb"): getattr(stats, f) / 2**20 for f in fields}


def xla_gflops(compiled) -> float | None:
    """XLA's count of the floating-point operations of one call of a compiled program, in GFLOP
    (a multiply-add is 2), or None when the backend does not report it. XLA:GPU leaves cuDNN
    convolutions out of the count, so it is only meaningful on the CPU."""
    cost = compiled.cost_analysis() or {}
    if "flops" not in cost:
        return None
    return float(cost["flops"]) / 1e9


def jax_predict_setup(config, batch_np: dict, weights_npz: str | None = None):
    """(jitted predict, its arguments) exactly as `inference.make_predict_fn` builds them, with the
    jit exposed so lower() and compile() can be timed apart."""
    import jax
    import jax.numpy as jnp

    from mrcnn_jax import inference, mask_rcnn

    image_size = tuple(config.data.image_size)
    model = mask_rcnn.build_model(config.model)
    variables = jax_variables(model, config, jax.random.PRNGKey(config.seed), weights_npz)
    anchors, counts = inference.anchors_for(config.model, image_size)
    jitted = jax.jit(
        functools.partial(inference.predict, model=model, model_cfg=config.model, level_counts=counts)
    )
    call_args = (
        variables,
        jnp.asarray(batch_np["images"]),
        jnp.asarray(batch_np["image_sizes"]),
        jnp.asarray(anchors),
    )
    return jitted, call_args


def jax_predict(config, args, batch: int) -> dict:
    """Compile + latency of `inference.predict` at `batch`, plus host mask pasting."""
    import jax

    from mrcnn_jax import evaluate

    batch_np = jax_batch(
        examples_for(config, args, batch), config.data.max_instances, config.data.mask_crop_size
    )
    jitted, call_args = jax_predict_setup(config, batch_np, args.weights_npz)
    compiled, lower_s, compile_s = _compile(jitted, *call_args)
    log(f"jax predict batch {batch}: lower {lower_s:.1f} s, compile {compile_s:.1f} s")
    run = lambda: jax.block_until_ready(compiled(*call_args))
    out = summary(time_calls(run, args.warmup, args.runs), batch)
    dets = jax.device_get(run())
    paste = lambda: [
        evaluate.image_detections(dets, batch_np, i, config.model.test.mask_threshold)
        for i in range(batch)
    ]
    paste_walls, paste_cpus = time_calls(paste, args.warmup, args.runs)
    out.update(
        lower_s=lower_s,
        compile_s=compile_s,
        xla_memory=xla_memory_mb(compiled),
        xla_gflop=xla_gflops(compiled),
        paste_s=statistics.median(paste_walls),
        end_to_end_s=out["median_s"] + statistics.median(paste_walls),
        end_to_end_cpu_s=out["cpu_median_s"] + statistics.median(paste_cpus),
        num_detections=int(np.sum(dets.valid[0])),
    )
    return out


def jax_export(config, args, batch: int) -> dict:
    """`mrcnn_jax.export` of the predict step, deserialized and run at `batch` as a server would."""
    import jax
    from flax import serialization

    from mrcnn_jax import export

    batch_np = jax_batch(
        examples_for(config, args, batch), config.data.max_instances, config.data.mask_crop_size
    )
    _, call_args = jax_predict_setup(config, batch_np, args.weights_npz)
    start = time.perf_counter()
    program, weights = export.export_predict(config, jax.device_get(call_args[0]))
    data = program.serialize()
    export_s = time.perf_counter() - start
    weights_mb = len(serialization.msgpack_serialize(weights)) / 2**20
    start = time.perf_counter()
    program = jax.export.deserialize(data)
    deserialize_s = time.perf_counter() - start
    inputs = (weights, *call_args[1:3])
    compiled, lower_s, compile_s = _compile(jax.jit(program.call), *inputs)
    log(f"jax export: {export_s:.1f} s, {len(data) / 2**20:.1f} MiB; compile {compile_s:.1f} s")
    out = summary(time_calls(lambda: jax.block_until_ready(compiled(*inputs)), args.warmup,
                             args.runs), batch)
    out.update(
        export_s=export_s, deserialize_s=deserialize_s, program_mb=len(data) / 2**20,
        weights_mb=weights_mb, platforms=list(program.platforms), lower_s=lower_s,
        compile_s=compile_s,
    )
    return out


def jax_train_setup(config, batch_np: dict, weights_npz: str | None = None, wrap_tx=None):
    """(jitted train step, placed state, placed batch, placement) as `train_and_evaluate` builds
    them: the config's parallelism, optimizer and schedule, `train.compile_train_step`.
    wrap_tx: optional function applied to the optax transformation (profiling scopes)."""
    import jax

    from mrcnn_jax import losses, mask_rcnn, train

    image_size = tuple(config.data.image_size)
    placement = train.make_placement(config.train.parallelism)
    axis = train.PMAP_AXIS if placement.kind == "pmap" else None
    model = mask_rcnn.build_model(
        config.model,
        axis_name=axis,
        sharded_batch=placement.sharded_batch,
    )
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = jax_variables(model, config, init_key, weights_npz)
    trainable = mask_rcnn.trainable_mask(variables["params"], config.model)
    tx, schedule = train.optimizer_from_config(config.train, variables["params"], trainable)
    tx = wrap_tx(tx) if wrap_tx else tx
    state = placement.put_state(train.create_train_state(variables, tx, train_key), copy=False)
    step_fn = train.compile_train_step(
        placement,
        loss_fn=losses.make_loss_fn(model, config.model, image_size, axis),
        learning_rate_fn=schedule,
        trainable=trainable,
        accum_steps=config.train.get("grad_accum_steps", 1),
    )
    return step_fn, state, placement.put_batch(batch_np), placement


def jax_train(config, args, batch: int) -> dict:
    """Compile + step time of the real train step."""
    import jax

    batch_np = jax_batch(
        examples_for(config, args, batch), config.data.max_instances, config.data.mask_crop_size
    )
    from mrcnn_jax import runtime

    step_fn, state, placed, placement = jax_train_setup(config, batch_np, args.weights_npz)
    compiled, lower_s, compile_s = _compile(step_fn, state, placed)
    runtime.release_host_memory()  # as train_loop does once its step is compiled
    log(f"jax train batch {batch}: lower {lower_s:.1f} s, compile {compile_s:.1f} s")
    holder = {"state": state, "metrics": None}

    def run():  # the state is donated: thread it through as a training loop does
        holder["state"], holder["metrics"] = compiled(holder["state"], placed)
        jax.block_until_ready(holder)

    out = summary(time_calls(run, args.warmup, args.runs), batch)
    metrics = placement.get_metrics(holder["metrics"])
    out.update(
        lower_s=lower_s,
        compile_s=compile_s,
        xla_memory=xla_memory_mb(compiled),
        xla_gflop=xla_gflops(compiled),
        loss=metrics["loss"],
    )
    return out


def examples_for(config, args, batch: int) -> dict:
    n = min(args.instances, config.data.max_instances)
    return synthetic_examples(tuple(config.data.image_size), batch, n, config.model.num_classes)


# ----------------------------------------------------------------------------- torchvision workers


def torchvision_model(config):
    """torchvision's Mask R-CNN R50-FPN as `maskrcnn_resnet50_fpn` builds it with a pretrained
    backbone (frozen BN, layers 2-4 trainable = our freeze_at=2; with weights_backbone=None it
    would switch to plain BatchNorm with every layer trainable), random weights, no resizing, and
    the config's RPN / RoI / test hyper-parameters (torchvision's own post-NMS train top-k is 2000,
    ours 1000 as detectron2)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    m = config.model
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    h, w = config.data.image_size
    return MaskRCNN(
        backbone,
        num_classes=m.num_classes + 1,
        min_size=min(h, w),  # the transform's scale min(min_size / short, max_size / long) = 1
        max_size=max(h, w),
        # The batch is already normalised (as our input pipeline delivers it): an identity
        # normalisation gives both models the same pixels (torchvision still runs the arithmetic).
        image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0),
        rpn_pre_nms_top_n_train=m.rpn.pre_nms_topk_train,
        rpn_pre_nms_top_n_test=m.rpn.pre_nms_topk_test,
        rpn_post_nms_top_n_train=m.rpn.post_nms_topk_train,
        rpn_post_nms_top_n_test=m.rpn.post_nms_topk_test,
        rpn_nms_thresh=m.rpn.nms_iou,
        rpn_fg_iou_thresh=m.rpn.fg_iou,
        rpn_bg_iou_thresh=m.rpn.bg_iou,
        rpn_batch_size_per_image=m.rpn.batch_size_per_image,
        rpn_positive_fraction=m.rpn.positive_fraction,
        box_score_thresh=m.test.score_threshold,
        box_nms_thresh=m.test.nms_iou,
        box_detections_per_img=m.test.detections_per_image,
        box_fg_iou_thresh=m.roi.fg_iou,
        box_bg_iou_thresh=m.roi.fg_iou,
        box_batch_size_per_image=m.roi.batch_size_per_image,
        box_positive_fraction=m.roi.positive_fraction,
    )


def _torch_inputs(config, args, batch: int, with_targets: bool):
    import torch

    dev = torch.device(args.torch_device)
    ex = examples_for(config, args, batch)
    images = [
        torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).to(dev) for im in ex["images"]
    ]
    if not with_targets:
        return images, None
    h, w = config.data.image_size
    targets = [
        {
            "boxes": torch.from_numpy(boxes).to(dev),
            "labels": torch.from_numpy(classes.astype(np.int64)).to(dev),
            "masks": torch.from_numpy(full_image_masks(boxes, h, w)).to(dev),
        }
        for boxes, classes in zip(ex["boxes"], ex["classes"], strict=True)
    ]
    return images, targets


def _torch_context(args):
    """Autocast to bfloat16 with --torch-amp (torchvision's mixed precision), else nothing."""
    import contextlib

    import torch

    if not args.torch_amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.torch_device).type, dtype=torch.bfloat16)


def _torch_sync(args) -> None:
    import torch

    if torch.device(args.torch_device).type == "cuda":
        torch.cuda.synchronize()


def _torch_device_memory(args) -> dict:
    import torch

    dev = torch.device(args.torch_device)
    if dev.type != "cuda":
        return {}
    return {
        "device": f"cuda: {torch.cuda.get_device_name(dev)}",
        "device_peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20,
    }


def torch_predict(config, args, batch: int) -> dict:
    import torch

    torch.manual_seed(config.seed)
    model = torchvision_model(config).eval().to(args.torch_device)
    images, _ = _torch_inputs(config, args, batch, with_targets=False)
    outputs = []

    def run():
        with torch.inference_mode(), _torch_context(args):
            outputs[:] = model(images)
        _torch_sync(args)

    out = summary(time_calls(run, args.warmup, args.runs), batch)
    out["num_detections"] = int(len(outputs[0]["boxes"]))
    out.update(_torch_device_memory(args))
    return out


def torch_train(config, args, batch: int) -> dict:
    """Train mode with targets: forward, backward and an SGD step with the config's recipe."""
    import torch

    torch.manual_seed(config.seed)
    model = torchvision_model(config).train().to(args.torch_device)
    images, targets = _torch_inputs(config, args, batch, with_targets=True)
    tc = config.train
    lr = tc.base_lr * batch / tc.lr_reference_batch * tc.warmup_factor  # our schedule at step 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    last = {}

    def run():
        with _torch_context(args):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last["loss"] = float(loss.detach())  # waits for the device

    out = summary(time_calls(run, args.warmup, args.runs), batch)
    out["loss"] = last["loss"]
    out.update(_torch_device_memory(args))
    return out


def torch_export_weights(config, args, batch: int) -> dict:
    """Writes the torchvision model's initial weights, converted to our variables, to
    --weights-npz, so both sides start from the same weights: random weights decide how many
    (RoI, class) pairs pass the score threshold, hence the work of NMS, the mask head and the
    pasting (torchvision's default init passes dozens at 0.05, detectron2's init of ours none)."""
    import torch
    from flax import traverse_util

    from mrcnn_jax import convert

    torch.manual_seed(config.seed)
    model = torchvision_model(config)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    try:
        converted = convert.convert(tensors, config.model, layout="torchvision")
    except convert.ConversionError as e:  # e.g. a config that is not R50-FPN
        return {"shared": False, "reason": str(e).splitlines()[0]}
    flat = traverse_util.flatten_dict(converted.variables, sep="/")
    np.savez(args.weights_npz, **flat)
    return {"shared": True, "num_arrays": len(flat)}


WORKERS = {
    "torchvision.weights": (torch_export_weights, "one"),
    "jax.predict": (jax_predict, "one"),
    "jax.predict_batch": (jax_predict, "batch"),
    "jax.train": (jax_train, "batch"),
    "jax.export": (jax_export, "one"),
    "torchvision.predict": (torch_predict, "one"),
    "torchvision.predict_batch": (torch_predict, "batch"),
    "torchvision.train": (torch_train, "batch"),
}


def run_worker(name: str, args) -> dict:
    """Body of one subprocess: limit threads, import, measure, add the peak memory."""
    limit_threads(args.threads)
    if name.startswith("torchvision"):
        import torch
        import torchvision  # noqa: F401  (imported before the baseline memory reading)

        torch.set_num_threads(args.threads)
    else:
        from mrcnn_jax import runtime

        runtime.set_default_xla_flags()  # as the command line does, before JAX starts
        import jax  # noqa: F401

        from mrcnn_jax import evaluate, inference, losses, mask_rcnn, train  # noqa: F401
    fn, which = WORKERS[name]
    batch = 1 if which == "one" else args.batch
    config = load_config(args.config, args.image_size, args.batch, args.set)
    if args.score_threshold is not None:
        config.model.test.score_threshold = args.score_threshold
    after_imports = peak_rss_mb()
    out = fn(config, args, batch)
    out.update(peak_rss_mb=peak_rss_mb(), rss_after_imports_mb=after_imports)
    if not name.startswith("torchvision"):
        from mrcnn_jax.ops import conv

        out.update(accelerator_memory(), conv_weight_grad=os.environ.get(conv.ENV_VAR, "auto"))
    return out


def accelerator_memory() -> dict:
    """The JAX device's kind and, where the backend reports it (GPU, TPU), its peak memory in MiB."""
    import jax

    device = jax.devices()[0]
    out = {"device": f"{device.platform}: {device.device_kind}"}
    stats = device.memory_stats() or {}  # None on the CPU
    if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


# ----------------------------------------------------------------------------- parent


def spawn(name: str, argv: list[str]) -> dict:
    """Runs one worker in a fresh interpreter; its progress goes to stderr, its result is returned."""
    log(f"{name} ...")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_MARKER) :])
    if "median_s" in result:
        log(f"{name}: median {result['median_s']:.3f} s, peak {result['peak_rss_mb']:.0f} MiB")
    return result


def machine_info(threads: int) -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "torch", "torchvision"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu": model or platform.processor(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "threads": threads,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "versions": versions,
        "load_avg_start": list(os.getloadavg()),
    }


def ratios(jax_res: dict, tv_res: dict) -> dict:
    """jax / torchvision for what both measured: < 1 means JAX is faster (or leaner). `*_cpu`: the
    same on CPU seconds. predict_latency compares JAX predict + host pasting with torchvision."""
    out = {}
    if "predict" in jax_res:
        jp, tp = jax_res["predict"], tv_res["predict"]
        out["predict_latency"] = jp["end_to_end_s"] / tp["median_s"]
        out["predict_latency_device_only"] = jp["median_s"] / tp["median_s"]
        out["predict_latency_cpu"] = jp["end_to_end_cpu_s"] / tp["cpu_median_s"]
    if "predict_batch" in jax_res:
        out["predict_batch_latency"] = (
            jax_res["predict_batch"]["median_s"] / tv_res["predict_batch"]["median_s"]
        )
    if "train" in jax_res:
        jt, tt = jax_res["train"], tv_res["train"]
        out["train_step"] = jt["median_s"] / tt["median_s"]
        out["train_step_cpu"] = jt["cpu_median_s"] / tt["cpu_median_s"]
        out["train_peak_rss"] = jt["peak_rss_mb"] / tt["peak_rss_mb"]
    return out


def targets_met(result: dict) -> dict:
    """The issue's targets that this run measured -> bool."""
    jax_res, rat, met = result["jax"], result.get("ratios", {}), {}
    if "train" in jax_res:
        train_compile = jax_res["train"]["lower_s"] + jax_res["train"]["compile_s"]
        met["train_compile"] = train_compile < TARGETS["train_compile_s_max"]
    if "predict" in jax_res:
        predict_compile = jax_res["predict"]["lower_s"] + jax_res["predict"]["compile_s"]
        met["predict_compile"] = predict_compile < TARGETS["predict_compile_s_max"]
    if "predict_latency" in rat:
        met["predict_latency"] = rat["predict_latency"] <= TARGETS["predict_latency_ratio_max"]
    if "train_step" in rat:
        met["train_step"] = rat["train_step"] <= TARGETS["train_step_ratio_max"]
        met["train_peak_rss"] = rat["train_peak_rss"] <= TARGETS["train_peak_rss_ratio_max"]
    return met


def run_all(args, argv: list[str], tmpdir: str) -> dict:
    config = load_config(args.config, args.image_size, args.batch, args.set)
    m = config.model
    result = {
        "machine": machine_info(args.threads),
        "setup": {
            "config": args.config,
            "overrides": list(args.set),
            "image_size": list(config.data.image_size),
            "batch": args.batch,
            "dtype": m.dtype,
            "model": f"R{m.depth}-FPN{m.fpn_channels}, norm {m.norm}, freeze_at {m.freeze_at}",
            "parallelism": config.train.parallelism,
            "instances_per_image": min(args.instances, config.data.max_instances),
            "score_threshold": m.test.score_threshold
            if args.score_threshold is None
            else args.score_threshold,
            "warmup": args.warmup,
            "runs": args.runs,
            "torchvision": {"device": args.torch_device, "bfloat16_autocast": args.torch_amp},
        },
        "jax": {},
    }
    names = [n for n in args.measure if n != "predict_batch" or args.batch > 1]
    accum = config.train.get("grad_accum_steps", 1)
    result["setup"]["grad_accum_steps"] = accum
    if args.compare_torchvision:
        if accum > 1 and "train" in names:  # torchvision's step would be the whole batch at once
            raise SystemExit(
                "--compare-torchvision compares whole-batch training steps: leave"
                " train.grad_accum_steps at 1, or train out of --measure"
            )
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
            raise SystemExit("--compare-torchvision needs torch and torchvision installed")
        if args.shared_weights:
            argv = [*argv, "--weights-npz", os.path.join(tmpdir, "torchvision_weights.npz")]
            shared = spawn("torchvision.weights", argv)
            result["setup"]["shared_weights"] = shared
            if not shared["shared"]:
                log(f"each side keeps its own random weights: {shared['reason']}")
                argv = argv[:-2]
    for name in names:
        result["jax"][name] = spawn(f"jax.{name}", argv)
    if "export" in result["jax"] and "predict" in result["jax"]:  # the program against the model
        result["jax"]["export"]["latency_vs_predict"] = (
            result["jax"]["export"]["median_s"] / result["jax"]["predict"]["median_s"]
        )
    if args.compare_torchvision:
        result["torchvision"] = {
            n: spawn(f"torchvision.{n}", argv) for n in names if f"torchvision.{n}" in WORKERS
        }
        result["ratios"] = ratios(result["jax"], result["torchvision"])
    result["targets"] = {"thresholds": TARGETS, "met": targets_met(result)}
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    return result


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/base.py", help="configs/NAME.py path or NAME")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="default: config's")
    p.add_argument("--batch", type=int, default=2, help="batch of the training step and batch predict")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.dtype=bfloat16 (repeatable)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--instances", type=int, default=8, help="gt instances per image")
    p.add_argument("--score-threshold", type=float, help="both sides; default: the config's")
    p.add_argument("--measure", nargs="+", choices=MEASURES, default=list(DEFAULT_MEASURES),
                   help="what to measure (predict_batch only when --batch > 1; export only when"
                   " named)")
    p.add_argument("--compare-torchvision", action="store_true")
    p.add_argument("--torch-device", default="cpu", help="torchvision's device, e.g. cuda")
    p.add_argument("--torch-amp", action="store_true",
                   help="torchvision under bfloat16 autocast (compare with --set model.dtype=bfloat16)")
    p.add_argument("--no-shared-weights", dest="shared_weights", action="store_false",
                   help="with --compare-torchvision: each side keeps its own random init")
    p.add_argument("--weights-npz", help=argparse.SUPPRESS)  # set by the parent for its workers
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARKER + json.dumps(run_worker(args.worker, args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmpdir:
        result = run_all(args, argv, tmpdir)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
