"""The predict step as a serialized StableHLO program (`jax.export`): serving without this library.

    python -m mrcnn_jax.main --config=CONFIG --workdir=W --mode=export [--export_dir=DIR]

writes DIR (default W/export), from the weights `--mode=predict` would use:

    predict.jax_exported  `jax.export.Exported.serialize()` of
                              serve(weights, images, image_sizes) -> {"boxes", "scores",
                                                                      "classes", "valid", "masks"}
                          lowered for CPU, CUDA and TPU (`--export_platforms`), for any batch size
    weights.msgpack       `flax.serialization.msgpack_serialize` of the weights argument:
                          {"variables": the model's variables, "anchors": [A, 4] float32}
    export.json           the inputs' preprocessing, what the outputs mean, the class names and
                          dataset category ids, the jax version, where the weights came from
    config.json           the model's config (what `predict.load_config` reads)

Serving takes jax and flax (or any StableHLO runtime), not this library:

    exported = jax.export.deserialize(open("DIR/predict.jax_exported", "rb").read())
    weights = flax.serialization.msgpack_restore(open("DIR/weights.msgpack", "rb").read())
    out = jax.jit(exported.call)(weights, images, image_sizes)

`images` [b, H, W, 3] float32 is the canvas `data.image_size` holding each image resized and
normalised at its top-left, zeros elsewhere, and `image_sizes` [b, 2] int32 the resized (h, w), as
`data.transforms.preprocess_for_eval` makes them and export.json's "preprocessing" describes. The
outputs are the padded `structures.Detections`: boxes in the resized image's pixels, 28 x 28 mask
probabilities in the box frame. `load(DIR)` wraps this in a `predict.Predictor` (a numpy image in,
detections and full-size masks at the original size out), which is also how the tests check that
the program gives exactly what the model gives.

The weights are an argument, not constants in the program: the program stays small (the tiny
config's is ~0.2 MB), compiles without constant-folding the weights, and serves other weights of
the same shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import serialization

from mrcnn_jax import inference, mask_rcnn, runtime
from mrcnn_jax.structures import Detections

PROGRAM_FILE = "predict.jax_exported"
WEIGHTS_FILE = "weights.msgpack"
INFO_FILE = "export.json"
FORMAT = "mrcnn_jax.export/1"
# The platforms jax.export lowers for; an artifact made on a CPU machine serves on all three.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")

OUTPUTS = {
    "boxes": "[b, D, 4] float32 xyxy in the resized image's pixels (divide x by scale_x = rw / w"
    " and y by scale_y = rh / h for the original image's)",
    "scores": "[b, D] float32, descending among the valid detections",
    "classes": "[b, D] int32 contiguous labels 1..K (class_names[label]; label_to_category_id for"
    " the dataset's category ids)",
    "valid": "[b, D] bool, True for real detections (first), False for padding",
    "masks": "[b, D, M, M] float32 mask probabilities in the box frame, to be pasted into the box"
    " at the original size and thresholded (postprocessing)",
}


def serve_fn(model_cfg: ml_collections.ConfigDict, image_size):
    """(serve(weights, images, image_sizes) -> dict of the padded detections, the anchors): the
    predict step of `inference.predict_step`, its anchors taken from `weights` (an argument, so
    that XLA does not fold work on a large literal)."""
    step, anchors = inference.predict_step(mask_rcnn.build_model(model_cfg), model_cfg, image_size)

    def mrcnn_jax_predict(weights, images, image_sizes):
        dets = step(weights["variables"], images, image_sizes, weights["anchors"])
        return {f.name: getattr(dets, f.name) for f in dataclasses.fields(dets)}

    return mrcnn_jax_predict, anchors


def _check_platforms(platforms: Sequence[str], what: str) -> None:
    if not platforms or any(p not in PLATFORMS for p in platforms):
        raise runtime.InvalidInputError(
            f"{what}: expected one or more of {', '.join(PLATFORMS)}, comma-separated"
        )


def _plain(tree):
    """Nested plain dicts of numpy arrays (what `msgpack_restore` gives back, so that the restored
    weights have the exported program's argument structure)."""
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return np.asarray(tree)


def export_predict(
    config: ml_collections.ConfigDict,
    variables: Mapping,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    batch_size: int | None = None,
) -> tuple[jax.export.Exported, dict]:
    """-> (the exported predict step, its weights argument {"variables", "anchors"}).

    batch_size: None exports one program for any batch size (a symbolic dimension), N for N
    images per call only."""
    _check_platforms(platforms, f"export platforms {list(platforms)}")
    platforms = tuple(dict.fromkeys(platforms))  # each once, in the order given
    size = tuple(int(s) for s in config.data.image_size)
    serve, anchors = serve_fn(config.model, size)
    weights = {"variables": _plain(variables), "anchors": np.asarray(anchors, np.float32)}
    if batch_size is None:
        (b,) = jax.export.symbolic_shape("b")
    elif batch_size >= 1:
        b = int(batch_size)
    else:
        raise ValueError(f"export batch size: expected None (any) or >= 1, got {batch_size}")
    specs = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), weights),
        jax.ShapeDtypeStruct((b, *size, 3), jnp.float32),
        jax.ShapeDtypeStruct((b, 2), jnp.int32),
    )
    exported = jax.export.export(jax.jit(serve), platforms=platforms)(*specs)
    return exported, weights


# How `resize_rounding` turns h * scale into a side (`transforms.resize_scale`), and how the 28 x 28
# masks are pasted (`ops.masks`), for export.json's readers.
_ROUNDINGS = {
    "half_up": "floor(h * scale + 0.5) in float64, at least 1 (not Python's round(), which"
    " rounds halves to even)",
    "floor": "floor(h * scale) in float64, at least 1 (torchvision's F.interpolate)",
}
_PASTES = {
    "detectron2": "detectron2's paste_masks_in_image: each full-image pixel centre (x + 0.5, y +"
    " 0.5) samples the mask bilinearly (align_corners=False, zeros outside) at u = (x + 0.5 - x1) /"
    " (x2 - x1) * M - 0.5, likewise v; a pixel is in the mask when the probability >="
    " mask_threshold",
    "torchvision": "torchvision's paste_masks_in_image: the mask padded with one zero pixel, the"
    " box scaled about its centre by (M + 2) / M and truncated to integers, the padded mask"
    " resized bilinearly to the box's (x2 - x1 + 1) x (y2 - y1 + 1) pixels and pasted at (x1, y1);"
    " a pixel is in the mask when the probability > mask_threshold",
}


def export_info(config, exported, class_names, label_to_category_id, source) -> dict:
    """export.json: what a server must feed the program and what it gets back."""
    d, test = config.data, config.model.test
    size = [int(s) for s in d.image_size]
    batch = exported.in_avals[-1].shape[0]
    batch = batch if isinstance(batch, int) else "any"  # b >= 1 images per call
    rounding = str(d.get("resize_rounding", "half_up"))
    order = str(d.channel_order)
    return {
        "format": FORMAT,
        "program": PROGRAM_FILE,
        "weights": WEIGHTS_FILE,
        "platforms": list(exported.platforms),
        "batch_size": batch,
        "call": "jax.export.deserialize(program).call(weights, images, image_sizes)",
        "inputs": {
            "weights": f"flax.serialization.msgpack_restore of {WEIGHTS_FILE}",
            "images": {
                "shape": ["b", *size, 3], "dtype": "float32",
                "about": "b >= 1 images (b = batch_size when that is a number), each as"
                " preprocessing says, at the top-left of the canvas, zeros elsewhere",
            },
            "image_sizes": {
                "shape": ["b", 2], "dtype": "int32", "about": "the resized (rh, rw) of each image",
            },
        },
        "preprocessing": {
            "resize": "scale = min(test_min_size / min(h, w), test_max_size / max(h, w)) in"
            f" float64; rh, rw = {_ROUNDINGS[rounding]}; the uint8 RGB image resized to rh x rw"
            " bilinearly with half-pixel centres"
            + (" and antialiasing when shrinking (the filter widened by 1 / scale, as PIL's"
               " BILINEAR)" if d.get("resize_antialias", False) else ", no antialiasing"),
            "normalise": (
                "the channels reversed to BGR first (pixel_mean and pixel_std are in BGR"
                " order), then " if order == "BGR" else "RGB as read, "
            ) + "(pixel - pixel_mean) / pixel_std per channel, pixels in 0-255",
            "test_min_size": int(d.test_min_size),
            "test_max_size": int(d.test_max_size),
            "canvas": size,
            "pixel_mean": [float(v) for v in d.pixel_mean],
            "pixel_std": [float(v) for v in d.pixel_std],
            "channel_order": order,
            "resize_rounding": rounding,
            "resize_antialias": bool(d.get("resize_antialias", False)),
        },
        "outputs": OUTPUTS,
        # model.test.flip_tta: the program already merges the image's and its mirror's
        # detections (inference.predict_flip_tta); nothing more to do for the server.
        "flip_tta": bool(test.get("flip_tta", False)),
        "postprocessing": {
            "boxes": "of the valid detections: x divided by rw / w and y by rh / h, clipped to"
            " [0, w] x [0, h] of the original image; a box the clip leaves empty (x2 <= x1 or y2"
            " <= y1) is dropped, as detectron2's detector_postprocess",
            "masks": _PASTES[str(test.mask_paste)],
            "mask_threshold": float(test.mask_threshold),
            "mask_paste": str(test.mask_paste),
        },
        "class_names": list(class_names),
        "label_to_category_id": {str(k): int(v) for k, v in label_to_category_id.items()},
        "source": str(source),
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }


def check_export_dir(out_dir: str, workdir: str | None = None) -> str:
    """-> `out_dir` as an absolute path, when it can take an export: it is not a file, not the
    workdir or a folder holding it, and not a folder of other files (new, empty, or an earlier
    export, which is replaced). InvalidInputError naming it otherwise."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    flag = f"--export_dir={out_dir}"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise runtime.InvalidInputError(f"{flag} is a file, not a folder")
    if workdir is not None:
        real, work = os.path.realpath(out_dir), os.path.realpath(workdir)
        if real == work or work.startswith(real.rstrip(os.sep) + os.sep):
            raise runtime.InvalidInputError(
                f"{flag} would replace the workdir {workdir}, which it is or holds: name a"
                f" folder of its own (the default is {os.path.join(workdir, 'export')})"
            )
    if os.path.isdir(out_dir) and os.listdir(out_dir) and _format_of(out_dir) != FORMAT:
        others = sorted(os.listdir(out_dir))
        raise runtime.InvalidInputError(
            f"{flag} holds files that are not an export ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): name a new or empty folder, or an earlier"
            " export to replace"
        )
    return out_dir


def _format_of(directory: str):
    try:
        with open(os.path.join(directory, INFO_FILE)) as f:
            return json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def write_export(out_dir: str, config, exported, weights, info: dict) -> str:
    """Writes the four files into `out_dir` at once (`check_export_dir`): into a new folder
    beside it, which then takes its place, so a failed export leaves an earlier one as it was."""
    from mrcnn_jax import train

    out_dir = check_export_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.new-", dir=parent)
    old = None
    try:
        with open(os.path.join(staging, PROGRAM_FILE), "wb") as f:
            f.write(exported.serialize())
        with open(os.path.join(staging, WEIGHTS_FILE), "wb") as f:
            f.write(serialization.msgpack_serialize(weights))
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
        train.save_config(config, staging)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is the owner's alone
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "export"))
        os.rename(staging, out_dir)
    except BaseException:
        if old is not None and not os.path.exists(out_dir):  # the earlier export put back
            os.rename(os.path.join(old, "export"), out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_main(
    config, workdir: str, out_dir: str | None = None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS, batch_size: int | None = None,
    checkpoint: str | None = None,
) -> str | None:
    """`--mode=export`: the weights `--mode=predict` uses (the workdir's latest checkpoint, else
    config.train.init_checkpoint, or those `checkpoint` names: `predict.weights_to_use`),
    exported into `out_dir` (default WORKDIR/export). On several
    hosts every process reads the checkpoint (collectively) and process 0 writes; -> the folder
    written (None on the other processes)."""
    from mrcnn_jax import predict

    _check_platforms(platforms, f"--export_platforms={','.join(platforms)}")
    out_dir = check_export_dir(out_dir or os.path.join(workdir, "export"), workdir)
    source = predict.weights_source(workdir, config, checkpoint)
    predict.refuse_backbone_only(source)
    class_names, label_to_cat = predict.labels(workdir, config, source)
    predictor = predict.Predictor.from_workdir(
        source if checkpoint else workdir, config=config,
        class_names=class_names or predict.generic_class_names(config.model.num_classes),
    )
    if jax.process_index() != 0:
        return None
    exported, weights = export_predict(config, predictor.variables, platforms, batch_size)
    info = export_info(config, exported, predictor.class_names, label_to_cat, source)
    written = write_export(out_dir, config, exported, weights, info)
    logging.info(
        "exported the predict step of %s for %s (batch %s) to %s", source,
        ", ".join(exported.platforms), info["batch_size"], written,
    )
    return written


def load(directory: str):
    """An exported folder as a `predict.Predictor`: numpy image in, `predict.Prediction` at the
    original size out, run by the deserialized program (no Flax model is built). A program for
    a fixed batch of N is called with the image and N - 1 copies of it."""
    from mrcnn_jax import checkpoint, predict

    file = os.path.join(directory, INFO_FILE)  # the one being read, for the error
    try:
        with open(file) as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}, expected {FORMAT!r}")
        class_names = [str(n) for n in info["class_names"]]
        file = os.path.join(directory, info["program"])
        with open(file, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        file = os.path.join(directory, info["weights"])
        with open(file, "rb") as f:
            weights = serialization.msgpack_restore(f.read())
        file = os.path.join(directory, checkpoint.CONFIG_FILE)
        config = predict.load_config(file)
    except FileNotFoundError as e:
        raise runtime.MissingInputError(
            f"{directory} is not a complete export (--mode=export writes it): {e}"
        ) from e
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        # (a damaged program fails in jax's flatbuffer reader with struct.error / AttributeError)
        raise runtime.InvalidInputError(f"{file}: not a readable export ({e!r})") from e
    here = jax.export.default_export_platform()
    if here not in exported.platforms:
        raise runtime.InvalidInputError(
            f"{directory} was exported for {', '.join(exported.platforms)}, not for this"
            f" machine's {here}: export again with --export_platforms={here} (or several)"
        )
    call = jax.jit(exported.call)
    batch = exported.in_avals[-1].shape[0]

    def predict_fn(w, images, sizes):
        if isinstance(batch, int) and batch != len(images):  # a fixed batch: filled with copies
            pick = np.arange(batch) % len(images)
            return Detections(**jax.tree.map(lambda a: a[: len(images)],
                                              call(w, images[pick], sizes[pick])))
        return Detections(**call(w, images, sizes))

    return predict.Predictor(config, weights, class_names, predict_fn=predict_fn)
