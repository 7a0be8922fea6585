"""Prediction for people: a notebook API on numpy images, and `--mode=predict` over files.

    predictor = Predictor.from_workdir("workdirs/shapes")   # or its checkpoints/STEP
    out = predictor(image)          # image: uint8 [h, w, 3] RGB, [h, w], RGBA, or a PIL image
    out.boxes, out.scores, out.classes, out.names, out.masks   # original pixels, [n, h, w] bool

`predict_main` runs the same over an image file, a folder of images, or a dataset split
("split:NAME"), writing WORKDIR/predictions/results.json (COCO results format) and an overlay PNG
per image (`predict_main` says what it removes of an earlier run's).

The weights are the workdir's latest checkpoint, else `config.train.init_checkpoint` (as
`--mode=eval`). What the labels mean (class names, the dataset's category ids for results.json)
comes from WORKDIR/labels.json, which training and `mrcnn_jax.convert` write, else from the
config's dataset when it is on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
import PIL.Image
from absl import logging

from mrcnn_jax import evaluate, image_io, inference, mask_rcnn, runtime, visualize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST_FILE = "manifest.json"  # in WORKDIR/predictions: the overlays the last run wrote


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Detections of one image at its original size, best first.

    boxes: [n, 4] xyxy pixels; scores: [n]; classes: [n] contiguous labels (1..K);
    names: the class names; masks: [n, h, w] bool.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    names: tuple[str, ...]
    masks: np.ndarray


def _to_config_value(value, reference):
    if isinstance(reference, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def load_config(path: str) -> ml_collections.ConfigDict:
    """A workdir's saved `config.json` read back onto the base config (tuples restored)."""
    from configs import base

    config = base.get_config()
    with open(path) as f:
        saved = json.load(f)

    def assign(target, values, prefix=""):
        for key, value in values.items():
            if key not in target:
                raise KeyError(f"{path}: unknown config key {prefix}{key}")
            if isinstance(value, dict):
                assign(target[key], value, f"{prefix}{key}.")
            else:
                with target.ignore_type():
                    target[key] = _to_config_value(value, target[key])

    config.data.unlock()
    assign(config, saved)
    resolved = config.to_dict()
    # Training's own keys (optimizer, schedule, checkpointing) do not change what the weights
    # compute: a config.json from before one of them is read without a word.
    missing = [k for k in _missing_keys(resolved, saved) if not k.startswith("train.")]
    if missing:
        from mrcnn_jax.checkpoint import lookup

        logging.warning(
            "%s predates config keys %s: they take configs/base.py's values (%s). Weights"
            " converted or trained before them may need other values (docs/weights.md: convert"
            " again, or set them with --config.KEY=VALUE)", path, ", ".join(missing),
            ", ".join(f"{k}={lookup(resolved, k)!r}" for k in missing),
        )
    return config


def _missing_keys(reference: dict, saved: dict, prefix: str = "") -> list[str]:
    """The dotted keys of `reference` that `saved` does not have."""
    out = []
    for key, value in reference.items():
        if key not in saved:
            out.append(f"{prefix}{key}")
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            out += _missing_keys(value, saved[key], f"{prefix}{key}.")
    return out


class Predictor:
    """A model and its weights behind one call on a numpy image (one compile per padded size)."""

    def __init__(
        self, config: ml_collections.ConfigDict, variables: dict, class_names=None,
        predict_fn=None,
    ):
        """predict_fn(variables, images, image_sizes) -> `structures.Detections`: the model's
        jitted predict step unless given (`export.load` gives the exported program's, whose
        `variables` are its weights argument, and no Flax `model`)."""
        self.config = config
        self.variables = variables
        self.model = None
        if predict_fn is None:
            self.model = mask_rcnn.build_model(config.model)
            predict_fn = inference.make_predict_fn(
                self.model, config.model, config.data.image_size
            )
        self._predict = predict_fn
        if class_names is None:
            class_names = generic_class_names(config.model.num_classes)
        self.class_names = tuple(class_names)

    @classmethod
    def from_workdir(cls, workdir: str, config=None, class_names=None) -> Predictor:
        """Loads WORKDIR/config.json (unless `config` is given) and the latest checkpoint of
        `workdir`, else `config.train.init_checkpoint`; the weights must fit the config's model
        (`checkpoint.WeightsMismatchError` names every name that does not, and the source).

        workdir: a workdir, or its `checkpoints` directory (latest step) or one step directory
        (that step), as `checkpoint.load_weights` takes them; config.json is the workdir's.
        Raises FileNotFoundError when there is no config.json (pass `config=`), and ValueError
        for the ImageNet backbone weights of a `mrcnn_jax.convert` (no detector heads yet)."""

        from mrcnn_jax import checkpoint

        path, workdir = workdir, checkpoint.workdir_of(workdir)
        if config is None:
            file = os.path.join(workdir, checkpoint.CONFIG_FILE)
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{path} is not a workdir: no {checkpoint.CONFIG_FILE} in {workdir} (what"
                    " training and mrcnn_jax.convert write). Pass the model's config:"
                    f" Predictor.from_workdir({path!r}, config=...)"
                )
            config = load_config(file)
        # A checkpoints directory or step directory names the weights; a workdir, its latest.
        given = os.path.normpath(path if "://" in path else os.path.abspath(path))
        source = path if given != os.path.normpath(workdir) else weights_source(workdir, config)
        refuse_backbone_only(source)
        checkpoint.check_input_convention(config, source)
        if class_names is None:
            class_names = labels(workdir, config, source)[0]
        model = mask_rcnn.build_model(config.model)
        fresh = mask_rcnn.zero_variables(model, config.data.image_size)
        variables = checkpoint.merge_weights(
            fresh, checkpoint.load_weights(source), source=source
        )
        return cls(config, variables, class_names)

    def __call__(self, image: np.ndarray | PIL.Image.Image) -> Prediction:
        """Detections of one image (`as_rgb8` says which images it takes and how)."""
        from mrcnn_jax.data.transforms import preprocess_for_eval

        image = as_rgb8(image)
        padded, size, scale = preprocess_for_eval(image, self.config.data)
        batch = {
            "images": padded[None],
            "image_sizes": np.array([size], np.int32),
            "orig_sizes": np.array([image.shape[:2]], np.int32),
            "scales": np.array([scale], np.float32),
            "image_ids": np.zeros((1,), np.int64),
            "example_valid": np.ones((1,), bool),
        }
        dets = self._predict(self.variables, batch["images"], batch["image_sizes"])
        test = self.config.model.test
        d = evaluate.image_detections(
            _numpy(dets), batch, 0, test.mask_threshold, test.mask_paste
        )
        return Prediction(
            boxes=d["boxes"],
            scores=d["scores"],
            classes=d["classes"],
            names=tuple(self.class_names[c] for c in d["classes"]),
            masks=d["masks"],
        )


def as_rgb8(image: np.ndarray | PIL.Image.Image) -> np.ndarray:
    """An image as the model takes it, uint8 [h, w, 3] RGB, from the pictures `--mode=predict`
    takes as files:

      * uint8 [h, w, 3] RGB as it is;
      * uint8 [h, w] or [h, w, 1] grayscale, replicated to 3 channels;
      * uint8 [h, w, 4] RGBA, the alpha dropped;
      * a PIL image, converted as image files are (`image_io.to_rgb8`: palettes expanded, 16-bit
        scaled to 8). Its EXIF orientation is not applied: `image_io.read_rgb(path)` reads a file
        upright, as `--mode=predict` does.

    Other dtypes are refused (ValueError) rather than rescaled by a guess: floats in [0, 1] are
    `(image * 255).round().astype(np.uint8)`. So is an image with no pixels.
    """
    if isinstance(image, PIL.Image.Image):
        image = image_io.to_rgb8(image)
    image = np.asarray(image)
    shape = image.shape
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an image [h, w, 3] RGB, [h, w, 4] RGBA, [h, w] or [h, w, 1] grayscale,"
            f" got shape {shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image has no pixels: shape {shape}")
    if image.dtype != np.uint8:
        hint = (
            "for floats in [0, 1] pass (image * 255).round().astype(np.uint8), for floats in"
            " [0, 255] image.round().astype(np.uint8)"
            if np.issubdtype(image.dtype, np.floating)
            else "e.g. image.astype(np.uint8) when its values are 0-255"
        )
        raise ValueError(
            f"expected uint8 pixel values 0-255, got a {image.dtype} image (its scale is not"
            f" guessed): {hint}"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        return np.ascontiguousarray(image[..., :3])
    return image


def refuse_backbone_only(source: str) -> None:
    """Raises InvalidInputError (a ValueError) when the weights at `source` are a
    `mrcnn_jax.convert` of ImageNet backbone weights (its conversion.json says kind "backbone"):
    they have no FPN, RPN or heads to predict with until fine-tuned. Reads that one small file
    only."""
    from mrcnn_jax import checkpoint, convert

    file = os.path.join(checkpoint.workdir_of(source), convert.INFO_FILE)
    try:
        with open(file) as f:
            info = json.load(f)
    except (OSError, ValueError):  # no conversion (a trained workdir), or not one we can read
        return
    if isinstance(info, dict) and info.get("kind") == "backbone":
        raise runtime.InvalidInputError(
            f"the weights at {source} are ImageNet backbone weights ({file}: kind 'backbone'):"
            " the detector's FPN, RPN, box and mask heads have no trained weights, so they cannot"
            " predict yet. Fine-tune them first: train with"
            f" --config.train.init_checkpoint={checkpoint.workdir_of(source)} and a new"
            " --workdir, then predict from that workdir"
        )


def _numpy(dets):
    return {f.name: np.asarray(getattr(dets, f.name)) for f in dataclasses.fields(dets)}


def generic_class_names(num_classes: int) -> tuple[str, ...]:
    return ("background",) + tuple(f"class_{i}" for i in range(1, num_classes + 1))


def weights_to_use(workdir: str, config, chosen: str | None = None) -> tuple[str, int]:
    """(source, step) of the weights `--mode=eval`, `predict` and `export` use: the workdir and
    the step of its latest checkpoint when it holds one, else config.train.init_checkpoint and 0;
    MissingInputError naming both when neither. Looks at the checkpoint folder only (no
    restore), so a wrong workdir fails before a model is built.

    chosen (`--checkpoint`) picks other weights: a step of the workdir's checkpoints ("60000"),
    "best" (WORKDIR/best, what `train.best_metric` keeps), or a path (a workdir, its checkpoints
    folder, one step folder, a `mrcnn_jax.convert` output)."""
    if chosen:
        return _chosen_weights(workdir, str(chosen))
    from mrcnn_jax import checkpoint

    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    step = checkpoint.latest_step(directory)
    if step is not None:
        return workdir, step
    if config.train.init_checkpoint:
        return config.train.init_checkpoint, 0
    raise runtime.MissingInputError(
        f"no checkpoint in {directory} and no config.train.init_checkpoint: train into this"
        " workdir first, or set --config.train.init_checkpoint=DIR"
    )


def _chosen_weights(workdir: str, chosen: str) -> tuple[str, int]:
    """`weights_to_use` for `--checkpoint=chosen`: (path, step), or MissingInputError naming the
    flag and what there is."""
    from mrcnn_jax import checkpoint as ckpt

    flag = f"--checkpoint={chosen}"
    if chosen.isdigit():
        directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
        steps = ckpt.all_steps(directory)
        if int(chosen) not in steps:
            raise runtime.MissingInputError(
                f"{flag}: no checkpoint of step {int(chosen)} in {directory}; its steps:"
                f" {', '.join(map(str, steps)) or 'none'}"
            )
        return os.path.join(directory, str(int(chosen))), int(chosen)
    best = chosen == ckpt.BEST_DIR
    path = os.path.join(workdir, ckpt.BEST_DIR) if best else chosen
    why = (
        " (training keeps it with train.best_metric set, from its first evaluation)" if best
        else " (a workdir, its checkpoints folder, one step folder or a mrcnn_jax.convert output)"
    )
    if "://" not in path and not os.path.isdir(path):
        raise runtime.MissingInputError(f"{flag}: {path} is not a folder{why}")
    try:
        return path, ckpt.step_of(path)
    except FileNotFoundError as e:
        raise runtime.MissingInputError(f"{flag}: no checkpoint in {path}{why}") from e


def weights_source(workdir: str, config, checkpoint: str | None = None) -> str:
    """`weights_to_use`'s source: a path `checkpoint.load_weights` takes."""
    return weights_to_use(workdir, config, checkpoint)[0]


def _label_dirs(path: str) -> list[str]:
    """Where a checkpoint path's labels.json can be: the path (a workdir), or the workdir above a
    checkpoints directory or one step directory."""
    from mrcnn_jax.checkpoint import workdir_of

    return [workdir_of(path)]


def labels(
    workdir: str, config, source: str | None = None
) -> tuple[Sequence[str] | None, dict[int, int]]:
    """(class names or None, {label: dataset category id}) of the model's labels: the labels.json
    of where the weights come from (`source`, default `weights_source`), else of the workdir or
    config.train.init_checkpoint, else the config's dataset when it is on this machine, else
    (None, {}) with a warning: results then carry the contiguous labels."""
    from mrcnn_jax import checkpoint

    if source is None:
        try:
            source = weights_source(workdir, config)
        except FileNotFoundError:
            source = workdir
    candidates = [source, workdir, config.train.init_checkpoint]
    for directory in (d for c in candidates if c for d in _label_dirs(c)):
        if os.path.isdir(directory):
            found = checkpoint.read_labels(directory)
            if found is not None:
                return found
    try:
        from mrcnn_jax.data import pipeline

        info = pipeline.dataset_info(config)
        return info.class_names, dict(info.label_to_category_id)
    except Exception as e:  # noqa: BLE001 - no dataset on this machine: say what that means
        logging.warning(
            "no %s in %s and the config's dataset is not at hand (%s): generic class names, and"
            " results.json's category_id are the model's contiguous labels 1..%d, not the"
            " dataset's category ids", checkpoint.LABELS_FILE, workdir, e,
            config.model.num_classes,
        )
        return None, {}


def _image_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES)
        )
        if not files:
            raise runtime.MissingInputError(
                f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
            )
        return files
    if not os.path.isfile(path):
        raise runtime.MissingInputError(f"--input {path}: no such file or folder")
    return [path]


def read_rgb(path: str) -> np.ndarray:
    """Any image file -> uint8 [h, w, 3] RGB, upright as displayed (EXIF orientation), converted
    as the prepared datasets convert it (`image_io.read_rgb`)."""
    return image_io.read_rgb(path)


def _inputs(config, spec: str) -> Iterator[tuple[str, int, np.ndarray, str]]:
    """(name, image id, RGB image, where it comes from) for a file, a folder, or "split:NAME" of
    the config's dataset. What `spec` names is looked up here, when called (MissingInputError,
    InvalidInputError), not when the images are read."""
    if spec.startswith("split:"):
        from mrcnn_jax.data import pipeline

        try:
            images = pipeline.split_images(config, spec[len("split:") :])
        except runtime.InputError as e:
            raise runtime.named_input_error(e, f"--input {spec}") from e
        return (
            (str(image_id), int(image_id), image, f"{spec} image {image_id}")
            for image_id, image in images
        )
    return _files(_image_files(spec))


def _files(files: list[str]) -> Iterator[tuple[str, int, np.ndarray, str]]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in files]
    for i, path in enumerate(files):
        # a.jpg and a.png both in the folder: their outputs are named a.jpg / a.png, not both a.
        name = os.path.basename(path) if stems.count(stems[i]) > 1 else stems[i]
        try:
            image = read_rgb(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many types; one bad file is skipped
            logging.warning("skipped %s: not a readable image (%r)", path, e)
            continue
        yield name, i, image, path


def predict_main(
    config, workdir: str, inputs: str, score_threshold: float = 0.5,
    checkpoint: str | None = None,
) -> list[str]:
    """Runs the latest checkpoint of `workdir` (or the weights `checkpoint` names:
    `weights_to_use`) on `inputs`; -> the overlay PNG paths written.

    Writes WORKDIR/predictions/results.json, NAME.png overlays, and manifest.json: the overlays
    this run wrote. The overlays that the previous run's manifest.json lists and this run does
    not rewrite are removed, so the folder holds this run's results and overlays; nothing else
    there is touched (files of your own, overlays of runs before manifest.json existed).

    An image whose prediction or overlay fails is skipped with a warning naming it and the
    error. results.json holds what was predicted; it is written also when the run stops early
    (an error outside one image, Ctrl-C), and the exception then goes on. A run that predicts
    no image at all leaves the folder as it was: what `inputs` names is looked up before the
    model is loaded (runtime.MissingInputError / InvalidInputError; on several hosts, by
    process 0 after it); when none of its images can be read, InvalidInputError says so, and
    when each image read fails to predict, a RuntimeError from the last failure.

    On several hosts every process must call it (reading the checkpoint is collective); process
    0 looks up `inputs`, predicts and writes, the others return [].
    """
    source = weights_source(workdir, config, checkpoint)
    refuse_backbone_only(source)
    logging.info("predicting with the weights of %s", source)
    # One host: the input is looked up before the model loads. Several: only process 0 reads it
    # (it may be on process 0's disk alone), after the collective checkpoint read.
    alone = jax.process_count() == 1
    images = _inputs(config, inputs) if alone else None
    class_names, label_to_cat = labels(workdir, config, source)
    predictor = Predictor.from_workdir(
        source if checkpoint else workdir, config=config,
        class_names=class_names or generic_class_names(config.model.num_classes),
    )
    if jax.process_index() != 0:  # every host takes part in reading the checkpoint (orbax's
        # collectives); then process 0 alone predicts, the one writer of WORKDIR/predictions
        logging.info("prediction runs on process 0: process %d is done", jax.process_index())
        return []
    if images is None:
        images = _inputs(config, inputs)
    out_dir = os.path.join(workdir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    previous = _read_manifest(out_dir)
    results, paths, skipped = [], [], 0
    failure = None  # the last image's prediction error
    finished = False
    try:
        for name, image_id, image, where in images:
            path = os.path.join(out_dir, f"{name}.png")
            try:
                image_results = _predict_one(
                    predictor, image, name, image_id, label_to_cat, path, score_threshold
                )
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
                logging.warning("skipped %s: prediction failed (%s: %s)", where,
                                type(e).__name__, e)
                skipped += 1
                failure = e
                continue
            results += image_results
            paths.append(path)
        finished = True
    finally:
        if paths:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
            _replace_manifest(out_dir, previous, [os.path.basename(p) for p in paths])
            if not finished:
                logging.warning("stopped early: %s holds the %d images predicted until then",
                                os.path.join(out_dir, "results.json"), len(paths))
        elif not finished:
            logging.warning("stopped before any image was predicted: %s left as it was", out_dir)
    if not paths and failure is not None:  # the model failed, not the input: its traceback
        raise RuntimeError(
            f"--input {inputs}: the prediction of each of its {skipped} readable images failed"
            f" (the warnings above say how); {out_dir} left as it was. The last error follows"
        ) from failure
    if not paths:
        raise runtime.InvalidInputError(
            f"--input {inputs}: none of its images could be read (the warnings"
            f" above say why); {out_dir} left as it was"
        )
    logging.info("wrote %d detections on %d images to %s%s", len(results), len(paths), out_dir,
                 f" ({skipped} skipped)" if skipped else "")
    return paths


def _predict_one(predictor, image, name, image_id, label_to_cat, path, score_threshold):
    """Predicts one image and writes its overlay at `path`; -> its results.json entries."""
    p = predictor(image)
    results = []
    for box, score, cls, rle in zip(
        p.boxes, p.scores, p.classes, evaluate.encode_masks(p.masks), strict=True
    ):
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({
            "image_id": image_id,
            "file_name": name,
            "category_id": int(label_to_cat.get(int(cls), int(cls))),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
            "segmentation": rle,
        })
    visualize.save_png(path, visualize.overlay(
        image, p.boxes, p.masks, p.classes, p.scores, predictor.class_names, score_threshold
    ))
    return results


def _read_manifest(out_dir: str) -> list[str]:
    """The overlay names an earlier `predict_main` wrote in `out_dir`: only plain PNG names in
    that folder, whatever the file says."""
    file = os.path.join(out_dir, MANIFEST_FILE)
    try:
        with open(file) as f:
            names = json.load(f).get("overlays", [])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as e:
        logging.warning("ignoring %s: unreadable (%r); no earlier overlays removed", file, e)
        return []
    return [
        n for n in names
        if isinstance(n, str) and n.lower().endswith(".png") and n == os.path.basename(n)
        and "\\" not in n
    ]


def _replace_manifest(out_dir: str, previous: list[str], written: list[str]) -> None:
    """Removes the earlier run's overlays that this run did not rewrite; records this run's."""
    keep = set(written)
    for name in previous:
        path = os.path.join(out_dir, name)
        if name not in keep and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.remove(path)
            except OSError as e:
                logging.warning("cannot remove the earlier overlay %s (%r)", path, e)
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump({"overlays": written, "about": "the overlays the last --mode=predict wrote;"
                   " the next run removes those it does not rewrite"}, f, indent=1)
