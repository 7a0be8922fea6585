"""The fixed-shape tf.data input pipeline: prepared TFDS splits -> numpy batches as
`mrcnn_jax.structures` documents them.

Datasets are stored as ArrayRecord (random access) in generation order, so the pipeline works on
example *indices*:

    train:  position g = step * host_batch + k  (k-th example of the step)
            epoch, pos = divmod(g, n)                         n = this host's usable examples
            index = usable[index_shuffle(pos, seed(config.seed, host, epoch))]
            augmentation (flip, shortest-side or large-scale jitter) seeded by
            fold_in(seed(config.seed, host), g)
    eval:   indices [lo, hi) of this host, in order; the last batch padded with dummies

Everything is a function of (config.seed, host, g): a run started at `start_step` s begins at
g = s * host_batch and yields exactly the batches s, s + 1, ... of a run started at 0, without
reading or decoding the skipped examples. Each host reads only its contiguous slice of the split
(`jax.process_index()` of `jax.process_count()` equal slices).

Datasets are prepared on first use (no download): `config.data.dataset` "shapes" (sizes from
`config.data.shapes_*`) or "coco_folder" (`config.data.root`, `train_split`, `eval_split`), written
under `config.data.data_dir` ("" = the TFDS default).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_data_source

from mrcnn_jax import runtime
from mrcnn_jax.data import coco_folder, coco_utils, shapes, transforms

AUTOTUNE = tf.data.AUTOTUNE
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and evaluation need to know about the dataset."""

    class_names: tuple[str, ...]  # index 0 = "background", then contiguous labels 1..K
    label_to_category_id: dict[int, int]  # contiguous label -> the dataset's category id
    num_train: int  # examples training draws from (all hosts; empty images skipped if configured)
    num_eval: int  # examples one evaluation pass visits (config.eval.max_examples applied)


# ------------------------------------------------------------------------------ prepared splits


@dataclasses.dataclass(frozen=True, eq=False)
class _Split:
    builder: tfds.core.DatasetBuilder
    name: str  # the TFDS split name
    categories: tuple[tuple[int, str], ...]  # (category id, name), sorted by id = label order
    num_instances: np.ndarray  # [num_examples] non-crowd instances per example

    @property
    def num_examples(self) -> int:
        return len(self.num_instances)

    @property
    def features(self) -> tfds.features.FeaturesDict:
        return self.builder.info.features


@dataclasses.dataclass(frozen=True)
class _Source:
    """The config fields that select a prepared split (hashable: the cache key of `_load_split`)."""

    dataset: str
    data_dir: str
    split: str
    root: str
    shapes_image_size: int
    shapes_num_train: int
    shapes_num_val: int

    @classmethod
    def of(cls, data_config, split: str) -> _Source:
        d = data_config
        return cls(
            d.dataset,
            d.data_dir,
            split,
            d.root,
            d.shapes_image_size,
            d.shapes_num_train,
            d.shapes_num_val,
        )


DATASETS = ("shapes", "coco_folder")  # config.data.dataset


def _builder(src: _Source, variant: str = "") -> tuple[tfds.core.DatasetBuilder, str]:
    kwargs = {"data_dir": src.data_dir or None, "file_format": "array_record"}
    if src.dataset == "shapes":
        if src.split not in shapes.SPLITS:
            raise runtime.InvalidInputError(
                f"dataset 'shapes' has no split {src.split!r} (its splits:"
                f" {', '.join(shapes.SPLITS)})"
            )
        cfg = shapes.shapes_config(src.shapes_image_size, src.shapes_num_train, src.shapes_num_val)
        return shapes.Shapes(config=cfg, **kwargs), src.split
    if src.dataset == "coco_folder":
        if not src.root:
            raise runtime.InvalidInputError(
                "config.data.root must name the COCO folder for dataset 'coco_folder'"
            )
        cfg = coco_folder.coco_folder_config(src.root, src.split, variant)
        return coco_folder.CocoFolder(config=cfg, **kwargs), coco_folder.tfds_split_name(src.split)
    raise runtime.InvalidInputError(
        f"config.data.dataset must be 'shapes' or 'coco_folder', got {src.dataset!r}"
    )


def _prepare(src: _Source, variant: str = "") -> tuple[tfds.core.DatasetBuilder, str]:
    builder, name = _builder(src, variant)
    skip_stats = tfds.download.ComputeStatsMode.SKIP  # statistics over COCO take minutes; unused
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=skip_stats)
        )
    except FileExistsError:
        # TFDS prepares into a temporary folder and renames it at the end; the rename fails when
        # another process preparing the same split into the same data_dir (another host of this
        # run, on a shared filesystem) finished first. Preparation is deterministic: use theirs.
        builder, name = _builder(src, variant)
        if not builder.is_prepared():
            raise
        logger.info("%s was prepared by another process meanwhile: using it", builder.data_dir)
    return builder, name


def _stale_missing_files(builder: tfds.core.DatasetBuilder, src: _Source) -> list[str]:
    """Images that were missing when this coco_folder split was prepared: (logged) the ones
    still missing, or -> those present now, which call for preparing it again."""
    missing = list(builder.info.metadata.get("missing_files", []))
    if not missing:
        return []
    image_dir = os.path.join(coco_folder.resolve_root(src.root), src.split)
    present = [f for f in missing if os.path.isfile(os.path.join(image_dir, f))]
    if not present:
        logger.warning(
            "%s: %d images of %s were missing from %s when it was prepared and are left out"
            " (first: %s)", builder.data_dir, len(missing),
            builder.info.metadata.get("annotation_file"), image_dir, missing[:3],
        )
    return present


@functools.lru_cache(maxsize=32)
def _load_split(src: _Source) -> _Split:
    """The prepared split, prepared now when it is not yet (no download). A coco_folder split
    prepared while some of its images were missing (a copy or mount that had not finished) is
    replaced, once any of them exists, by one prepared with them, instead of training and
    evaluating on a subset. The new one is a builder config of its own, named after the files
    that appeared: nothing is deleted under a process still reading the old one, and processes
    that notice at the same time prepare the same config."""
    builder, name = _prepare(src)
    present = _stale_missing_files(builder, src)
    if present:
        variant = hashlib.sha1("\0".join(sorted(present)).encode(), usedforsecurity=False)
        old = builder.data_dir
        builder, name = _prepare(src, variant.hexdigest()[:16])
        logger.warning(
            "%d images missing when %s was prepared exist now (first: %s): using %s, prepared with"
            " them (the old one can be deleted)", len(present), old, present[:3], builder.data_dir,
        )
    meta = builder.info.metadata
    num_instances = np.asarray(meta["num_instances"][name], np.int64)
    if len(num_instances) != builder.info.splits[name].num_examples:
        raise runtime.InvalidInputError(
            f"{builder.data_dir}: metadata does not match the stored examples; delete it"
        )
    categories = tuple((int(c["id"]), str(c["name"])) for c in meta["categories"])
    return _Split(builder, name, categories, num_instances)


def _split(data_config, split: str) -> _Split:
    return _load_split(_Source.of(data_config, split))


def _config_split(data_config, key: str) -> _Split:
    """`_split` of the split `config.data.<key>` names, its errors about the user's input
    (`runtime.InputError`) naming the key; any other error keeps its traceback."""
    try:
        return _split(data_config, data_config[key])
    except runtime.InputError as e:
        raise runtime.named_input_error(e, f"config.data.{key}={data_config[key]!r}") from e


class _RecordReader:
    """Random access to a split's serialized examples, as a TF op: index int64 [] -> string []."""

    def __init__(self, split: _Split):
        instructions = split.builder.info.splits[split.name].file_instructions
        self._source = array_record_data_source.ArrayRecordDataSource(instructions)

    def _read(self, index: np.ndarray) -> bytes:
        return self._source[int(index)]

    def __call__(self, index: tf.Tensor) -> tf.Tensor:
        record = tf.numpy_function(self._read, [index], tf.string, stateful=False)
        record.set_shape([])
        return record


# ------------------------------------------------------------------------------ one example


@dataclasses.dataclass(frozen=True)
class _Params:
    """The per-example transform settings of one pipeline (train or eval)."""

    image_size: tuple[int, int]
    short_sizes: tuple[int, ...]
    max_size: int
    flip_prob: float
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    channel_order: str
    max_instances: int
    mask_size: int
    resize_rounding: str = "half_up"
    resize_antialias: bool = False
    scale_jitter: tuple[float, ...] = ()  # (min, max): large-scale jitter + crop to image_size

    @classmethod
    def of(cls, d, train: bool) -> _Params:
        return cls(
            image_size=tuple(d.image_size),
            short_sizes=tuple(d.train_min_sizes) if train else (d.test_min_size,),
            max_size=d.train_max_size if train else d.test_max_size,
            flip_prob=float(d.flip_prob) if train else 0.0,
            pixel_mean=tuple(d.pixel_mean),
            pixel_std=tuple(d.pixel_std),
            channel_order=d.channel_order,
            max_instances=d.max_instances,
            mask_size=d.mask_crop_size,
            resize_rounding=d.get("resize_rounding", "half_up"),
            resize_antialias=bool(d.get("resize_antialias", False)),
            scale_jitter=tuple(d.get("train_scale_jitter", ())) if train else (),
        )


def _select_instances(objects: dict, max_instances: int) -> dict:
    """The first `max_instances` instances, non-crowd ones first (a stable sort on is_crowd)."""
    order = tf.argsort(tf.cast(objects["is_crowd"], tf.int32), stable=True)[:max_instances]
    return {k: tf.gather(v, order) for k, v in objects.items()}


def _pad(x: tf.Tensor, size: int, value=0) -> tf.Tensor:
    """Pads the leading axis of x [k, ...] to `size` with `value`."""
    paddings = [[0, size - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
    out = tf.pad(x, paddings, constant_values=tf.cast(value, x.dtype))
    return tf.ensure_shape(out, [size] + x.shape[1:].as_list())


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Stored image bytes (8-bit RGB JPEG or PNG) -> uint8 [H, W, 3]. JPEGs are decoded with
    libjpeg's accurate integer IDCT, PIL's (and so torchvision's and detectron2's) decoder: TF's
    default fast IDCT differs from it by up to 4 levels on most pixels, which moved detections
    between `--mode=eval` and `Predictor` on the same COCO image."""
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(data, channels=3),
    )
    return tf.ensure_shape(image, [None, None, 3])


def _example(ex: dict, p: _Params, aug_seed: tf.Tensor, masks: bool = True) -> dict:
    """A deserialized stored example -> one batch element (`structures` layout, no batch axis).

    Flip and shortest-side choice come from stateless draws on `aug_seed` [2]. Masks are cropped
    from the original-resolution RLE at the original box (so resizing does not touch them) and
    mirrored with the image; masks=False leaves them zero. With `scale_jitter`:
    `_jittered_example`.
    """
    if p.scale_jitter:
        return _jittered_example(ex, p, aug_seed)
    image = decode_rgb(ex["image"])
    # The RLE's frame; equal to the decoded size (checked at preparation).
    h, w = ex["height"], ex["width"]
    obj = _select_instances(ex["objects"], p.max_instances)
    boxes = tf.cast(obj["bbox"], tf.float32)
    if masks:
        crops = transforms.crop_masks(obj["rle"], boxes, h, w, p.mask_size)
    else:
        crops = tf.zeros([tf.shape(boxes)[0], p.mask_size, p.mask_size], tf.uint8)
    u = tf.random.stateless_uniform([2], seed=aug_seed)
    if p.flip_prob > 0:
        image, boxes, crops = tf.cond(
            u[0] < p.flip_prob,
            lambda: transforms.flip_left_right(image, boxes, crops, w),
            lambda: (image, boxes, crops),
        )
    pick = tf.minimum(tf.cast(u[1] * len(p.short_sizes), tf.int32), len(p.short_sizes) - 1)
    short = tf.gather(tf.constant(p.short_sizes, tf.int32), pick)
    image, image_size, scales = transforms.resize_normalize_pad(
        image, short, p.max_size, p.image_size, p.pixel_mean, p.pixel_std, p.channel_order,
        p.resize_rounding, p.resize_antialias, pad=False,
    )
    rh, rw = tf.cast(image_size[0], tf.float32), tf.cast(image_size[1], tf.float32)
    # Per axis, as the pixels were resized; the clip only absorbs float rounding at the border.
    boxes = tf.minimum(
        boxes * tf.stack([scales[1], scales[0], scales[1], scales[0]]), tf.stack([rw, rh, rw, rh])
    )
    return _element(ex, p, image, image_size, scales, obj, boxes, crops)


def _jittered_example(ex: dict, p: _Params, aug_seed: tf.Tensor) -> dict:
    """`_example` with large-scale jitter (`transforms.jitter_resize_crop`): flip, random scale
    in p.scale_jitter, random window of the canvas. Instances whose clipped box is empty are
    dropped (TF Model Garden, detectron2's filter_empty_instances) before the cut to
    max_instances. Each mask is cropped at its clipped box mapped back to the original image, so
    the crop is that of the resized, windowed mask, as without jitter."""
    image = decode_rgb(ex["image"])
    h, w = ex["height"], ex["width"]
    u = tf.random.stateless_uniform([4], seed=aug_seed)  # flip, scale, row and column offsets
    flip = u[0] < p.flip_prob
    boxes = tf.cast(ex["objects"]["bbox"], tf.float32)
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    image, image_size, scales, offsets, boxes = transforms.jitter_resize_crop(
        image, tf.where(flip, transforms.mirror_boxes(boxes, w), boxes), u[1:], p.scale_jitter,
        p.image_size, p.pixel_mean, p.pixel_std, p.channel_order, p.resize_antialias, pad=False,
    )
    inside = tf.where((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[:, 0]
    obj = {k: tf.gather(v, inside) for k, v in ex["objects"].items()}
    obj["window_box"] = tf.gather(boxes, inside)
    obj = _select_instances(obj, p.max_instances)
    boxes = obj.pop("window_box")
    # The output box in the (possibly mirrored) original frame, then unmirrored.
    sy, sx, oy, ox = scales[0], scales[1], offsets[0], offsets[1]
    back = (boxes + tf.stack([ox, oy, ox, oy])) / tf.stack([sx, sy, sx, sy])
    back = tf.where(flip, transforms.mirror_boxes(back, w), back)
    crops = transforms.crop_masks(obj["rle"], back, h, w, p.mask_size)
    crops = tf.cond(flip, lambda: crops[:, :, ::-1], lambda: crops)
    return _element(ex, p, image, image_size, scales, obj, boxes, crops)


def _element(ex, p: _Params, image, image_size, scales, obj, boxes, crops) -> dict:
    """The batch element of a transformed example: ground truth padded to p.max_instances, the
    image not yet padded to p.image_size (`_batched` does that)."""
    m, k = p.max_instances, tf.shape(boxes)[0]
    return {
        "images": tf.ensure_shape(image, [None, None, 3]),
        "image_sizes": image_size,
        "gt_boxes": _pad(boxes, m),
        "gt_classes": _pad(tf.cast(obj["label"], tf.int32), m, -1),
        "gt_valid": tf.range(m) < k,
        "gt_is_crowd": _pad(tf.cast(obj["is_crowd"], tf.bool), m, False),
        "gt_masks": _pad(crops, m),
        "image_ids": tf.cast(ex["image_id"], tf.int64),
        "orig_sizes": tf.cast(tf.stack([ex["height"], ex["width"]]), tf.int32),
        "scales": scales,
        "example_valid": tf.constant(True),
    }


def _batched(ds: tf.data.Dataset, p: _Params, batch: int, drop_remainder: bool) -> tf.data.Dataset:
    """Batches of `_element`s with each image padded to p.image_size as it is copied into the
    batch: one write of the canvas per image, where padding each image first and batching then
    wrote it twice (4.3 -> 1.5 ms per 1344 x 1344 image on one core here)."""
    shapes = {k: spec.shape for k, spec in ds.element_spec.items()}
    shapes["images"] = tf.TensorShape([*p.image_size, 3])
    return ds.padded_batch(batch, padded_shapes=shapes, drop_remainder=drop_remainder)


def _dummy_examples(p: _Params, n: int) -> dict[str, np.ndarray]:
    """n padding examples (example_valid False) for the last eval batch: blank full-size images."""
    (hh, ww), m, s = p.image_size, p.max_instances, p.mask_size
    return {
        "images": np.zeros((n, hh, ww, 3), np.float32),
        "image_sizes": np.tile(np.array([hh, ww], np.int32), (n, 1)),
        "gt_boxes": np.zeros((n, m, 4), np.float32),
        "gt_classes": np.full((n, m), -1, np.int32),
        "gt_valid": np.zeros((n, m), bool),
        "gt_is_crowd": np.zeros((n, m), bool),
        "gt_masks": np.zeros((n, m, s, s), np.uint8),
        "image_ids": np.full((n,), -1, np.int64),
        "orig_sizes": np.tile(np.array([hh, ww], np.int32), (n, 1)),
        "scales": np.ones((n, 2), np.float32),
        "example_valid": np.zeros((n,), bool),
    }


# ------------------------------------------------------------------------------ pipelines


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller did not say: jax.process_* starts the JAX backend

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """This host's contiguous slice [lo, hi) of n examples (sizes differ by at most one)."""
    return process_index * n // process_count, (process_index + 1) * n // process_count


def _check_num_classes(data_config, split: _Split) -> None:
    if data_config.num_classes != len(split.categories):
        raise ValueError(
            f"config.data.num_classes={data_config.num_classes} but the dataset declares"
            f" {len(split.categories)} categories: {[name for _, name in split.categories]}"
        )


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # Parallelism across examples (AUTOTUNE map), one thread per op: no oversubscribed cores.
    options.threading.max_intra_op_parallelism = 1
    return options


def _train_indices(
    split: _Split, skip_empty: bool, process_index: int, process_count: int
) -> np.ndarray:
    lo, hi = _host_range(split.num_examples, process_index, process_count)
    indices = np.arange(lo, hi, dtype=np.int64)
    if skip_empty:
        indices = indices[split.num_instances[lo:hi] > 0]
    if not len(indices):
        raise ValueError(
            f"no training examples for process {process_index} of {process_count} in split"
            f" {split.name!r} (config.data.skip_empty_train={skip_empty})"
        )
    return indices


def _warn_instances_cut(split: _Split, indices: np.ndarray, max_instances: int) -> None:
    """Logs how many instances training leaves out: an image keeps its first `max_instances`
    (non-crowd first, annotation order), the rest would be trained as background."""
    counts = split.num_instances[indices]
    over = counts > max_instances
    if over.any():
        logger.warning(
            "config.data.max_instances=%d: %d of this host's %d training images have more"
            " non-crowd instances (up to %d); %d instances past the first %d of each are left out"
            " of the training targets. Raise config.data.max_instances to keep them.",
            max_instances, int(over.sum()), len(counts), int(counts.max()),
            int(np.sum(counts[over] - max_instances)), max_instances,
        )


def _stream_seeds(seed: int, process_index: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Independent stateless seeds [2] for the epoch shuffles and for augmentation."""
    base = tf.constant([seed, process_index], tf.int64)
    fold = tf.random.experimental.stateless_fold_in
    return fold(base, 0), fold(base, 1)


def train_batches(
    config,
    start_step: int = 0,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of this host's training batches, flat [global_batch // processes, ...].

    Batch k of a run with start_step=s equals batch s + k of a run from 0 (see the module
    docstring); deterministic given config.seed. Crowd instances are kept (gt_is_crowd); images
    with no non-crowd instance are skipped when config.data.skip_empty_train.
    """
    d = config.data
    pi, pc = _processes(process_index, process_count)
    if config.train.global_batch_size % pc:
        raise ValueError(
            f"config.train.global_batch_size={config.train.global_batch_size} not divisible by"
            f" {pc} processes"
        )
    host_batch = config.train.global_batch_size // pc
    transforms.check_resize_fits(d, train=True)
    split = _config_split(d, "train_split")
    _check_num_classes(d, split)
    indices = _train_indices(split, d.skip_empty_train, pi, pc)
    _warn_instances_cut(split, indices, d.max_instances)
    n, table = len(indices), tf.constant(indices)
    shuffle_seed, aug_seed = _stream_seeds(config.seed, pi)
    read, params, features = _RecordReader(split), _Params.of(d, train=True), split.features

    def element(g):
        fold = tf.random.experimental.stateless_fold_in
        shuffled = tf.random.experimental.index_shuffle(g % n, fold(shuffle_seed, g // n), n - 1)
        ex = features.deserialize_example(read(tf.gather(table, shuffled)))
        return _example(ex, params, fold(aug_seed, g))

    ds = tf.data.Dataset.counter(start_step * host_batch)
    ds = ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = _batched(ds, params, host_batch, drop_remainder=True).prefetch(2).with_options(_options())
    return ds.as_numpy_iterator()


def _num_eval(split: _Split, max_examples: int) -> int:
    return split.num_examples if max_examples <= 0 else min(max_examples, split.num_examples)


def eval_batches(
    config,
    split: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    gt_masks: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split (config.data.eval_split by default), in stored order, without
    augmentation, test resize, batches of config.eval.batch_size per host.

    Visits the first config.eval.max_examples (0 = all) examples exactly once across hosts; every
    host yields the same number of batches, the last ones padded with dummy examples
    (example_valid False, image_ids -1, blank images with image_sizes = image_size, scales 1).
    gt_masks=False leaves the ground-truth mask crops zero: COCO evaluation scores against the
    annotations and never reads them, and cropping them is a third of an example's host time
    (a validation loss does need them).
    """
    d = config.data
    pi, pc = _processes(process_index, process_count)
    transforms.check_resize_fits(d, train=False)
    s = _split(d, split) if split else _config_split(d, "eval_split")
    _check_num_classes(d, s)
    total, batch = _num_eval(s, config.eval.max_examples), config.eval.batch_size
    lo, hi = _host_range(total, pi, pc)
    num_batches = math.ceil(math.ceil(total / pc) / batch)
    read, params, features = _RecordReader(s), _Params.of(d, train=False), s.features
    no_aug = tf.zeros([2], tf.int64)

    def element(i):
        return _example(features.deserialize_example(read(i)), params, no_aug, masks=gt_masks)

    ds = tf.data.Dataset.range(lo, hi).map(element, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = _batched(ds, params, batch, drop_remainder=False).prefetch(2).with_options(_options())
    return _padded_batches(ds.as_numpy_iterator(), params, batch, num_batches)


def _padded_batches(batches, params: _Params, batch: int, num_batches: int):
    for _ in range(num_batches):
        b = next(batches, None)
        n = 0 if b is None else len(b["image_ids"])
        if n < batch:
            dummy = _dummy_examples(params, batch - n)
            b = dummy if b is None else {k: np.concatenate([v, dummy[k]]) for k, v in b.items()}
        yield b


def shard_for_pmap(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """[B, ...] -> [num_devices, B // num_devices, ...] for every key."""
    out = {}
    for key, value in batch.items():
        if value.shape[0] % num_devices:
            raise ValueError(
                f"batch[{key!r}] has {value.shape[0]} rows, not divisible by {num_devices} devices"
            )
        out[key] = value.reshape((num_devices, value.shape[0] // num_devices) + value.shape[1:])
    return out


# ------------------------------------------------------------------------------ dataset facts


def _has_split(data_config, split: str) -> bool:
    if data_config.dataset == "coco_folder":
        return os.path.isfile(coco_folder.annotation_path(data_config.root, split))
    return True


def dataset_info(config) -> DatasetInfo:
    """Class names and label mapping (from the eval split), example counts. Prepares the splits.

    A coco_folder without the train annotation file (evaluation only) gives num_train 0.
    """
    d = config.data
    ev = _config_split(d, "eval_split")
    tr = _config_split(d, "train_split") if _has_split(d, d.train_split) else None
    if tr is not None and tr.categories != ev.categories:
        raise ValueError(
            f"splits {d.train_split!r} and {d.eval_split!r} declare different categories:"
            f" {tr.categories} vs {ev.categories}"
        )
    _check_num_classes(d, ev)
    num_train = 0
    if tr is not None:
        num_train = int(np.sum(tr.num_instances > 0)) if d.skip_empty_train else tr.num_examples
    return DatasetInfo(
        class_names=("background",) + tuple(name for _, name in ev.categories),
        label_to_category_id={k + 1: cid for k, (cid, _) in enumerate(ev.categories)},
        num_train=num_train,
        num_eval=_num_eval(ev, config.eval.max_examples),
    )


GROUND_TRUTHS = ("file", "prepared")


def coco_ground_truth(config, split: str | None = None) -> dict:
    """COCO ground truth of the examples `eval_batches` visits, at original resolution with the
    original ids, for pycocotools' COCOeval.

    config.eval.ground_truth "file" (default): for a coco_folder dataset, the annotation file's
    own annotations of those images (`coco_utils.file_ground_truth`), which detectron2's and
    torchvision's evaluators score against, so the metrics are comparable with theirs; "prepared"
    (and any dataset without a file, e.g. shapes): the stored instances, after the repairs
    preparation made (clipped boxes, dropped degenerate polygons), segmentation as RLE.
    """
    d = config.data
    s = _split(d, split) if split else _config_split(d, "eval_split")
    source = s.builder.as_data_source(split=s.name)
    examples = (source[i] for i in range(_num_eval(s, config.eval.max_examples)))
    categories = [{"id": cid, "name": name} for cid, name in s.categories]
    kind = config.eval.get("ground_truth", "file")
    if kind not in GROUND_TRUTHS:
        raise ValueError(f"config.eval.ground_truth: expected one of {GROUND_TRUTHS}, got {kind!r}")
    if kind == "prepared" or d.dataset != "coco_folder":
        return coco_utils.coco_ground_truth_dict(examples, categories)
    images = [coco_utils.image_entry(ex) for ex in examples]
    path = coco_folder.annotation_path(d.root, split or d.eval_split)
    data = coco_utils.load_annotation_file(path)
    return coco_utils.file_ground_truth(data, images, categories, path)


def split_images(config, split: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(original image id, RGB image uint8 [h, w, 3]) of every example of a split (the eval split
    by default), in stored order, decoded as the pipeline decodes them; for prediction. The split
    is found (prepared on first use) when this is called: a split that is not there raises here,
    not at the first image."""
    s = _split(config.data, split) if split else _config_split(config.data, "eval_split")
    source = s.builder.as_data_source(split=s.name)

    def images():
        for i in range(len(source)):
            ex = source[i]
            yield int(ex["image_id"]), decode_rgb(ex["image"]).numpy()

    return images()
