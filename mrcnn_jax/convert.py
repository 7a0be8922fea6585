"""Import published PyTorch Mask R-CNN weights (torchvision, detectron2) as an orbax checkpoint.

    python -m mrcnn_jax.convert --source=torchvision --input=maskrcnn_resnet50_fpn_coco.pth --workdir=DIR
    python -m mrcnn_jax.convert --source=detectron2 --input=model_final_a54504.pkl --allow_pickle \\
        --workdir=DIR

| --source    | file (read from disk, nothing is downloaded)                 | what it fills  |
|-------------|--------------------------------------------------------------|----------------|
| torchvision | `maskrcnn_resnet50_fpn` state dict (.pth, torch.load with    | whole detector |
|             | weights_only=True; needs the optional torch extra)           |                |
| torchvision | ImageNet `resnet50` / `resnet101` state dict (.pth)          | backbone only  |
| detectron2  | model-zoo Mask R-CNN R50/R101-FPN (.pkl of numpy arrays)     | whole detector |
| detectron2  | its own training output `model_final.pth` (torch.save of     | whole detector |
|             | {'model': state_dict, ...}; torch.load, weights_only=True)   |                |
| detectron2  | ImageNet backbone `R-50.pkl` / `R-101.pkl` (Caffe2 names)    | backbone only  |

A .pkl is a Python pickle, which can run code when loaded: it is read only with `allow_pickle=True`
(`--allow_pickle`), and then by an unpickler that admits numpy arrays and plain containers only.
Reading a .pkl never imports torch.

The conversion is strict: every source tensor is used exactly once (the few that are deliberately
unused, e.g. ImageNet classifier weights and BatchNorm counters, are listed in
`Converted.dropped`), every variable of the target model is filled with the right shape; anything
else is a ConversionError naming every offending tensor. Layout changes, per tensor:

    conv weight [O, I, kh, kw] -> kernel [kh, kw, I, O];  Linear weight [out, in] -> kernel [in, out]
    fc6: (C, H, W) -> (H, W, C) input order (heads.fc6_kernel_from_chw)
    mask deconv [I, O, 2, 2] -> [2, 2, I, O] (heads.deconv_kernel_from_torch)
    BatchNorm weight, bias, running_mean, running_var -> scale, bias, mean, var
    class rows, ours [K+1] with background first: torchvision as is (or COCO's 91 ids -> 80
    contiguous labels, `COCO_TORCHVISION_ROWS`); detectron2 cls_score moves its last (background)
    row to 0, bbox_pred / mask predictor get zero rows / channel for the background.

The written checkpoint is read by `checkpoint.load_weights(DIR)`; `merge_pretrained` merges it
into a fresh model for evaluation or fine-tuning (other class count: class layers re-initialised).
The config is written beside it (config.json), and `checkpoint.check_input_convention` later holds
runs to its input convention: so `convert_file` refuses a config of another convention than
torchvision's for torchvision weights, and warns for detectron2 weights (`check_family_convention`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from mrcnn_jax import checkpoint as ckpt_lib
from mrcnn_jax import mask_rcnn, runtime
from mrcnn_jax.modeling.heads import deconv_kernel_from_torch, fc6_kernel_from_chw
from mrcnn_jax.modeling.norm import NormKind
from mrcnn_jax.modeling.resnet import STAGE_BLOCKS
from mrcnn_jax.ops.anchors import base_anchors

SOURCES = ("torchvision", "detectron2")
INFO_FILE = "conversion.json"  # written next to the checkpoint: what was converted from where
CONFIG_FILE = ckpt_lib.CONFIG_FILE  # the target config, in the format of `train.save_config`

# The 80 COCO category ids (ten of 1..90 are unused). torchvision's COCO models predict the ids
# themselves (91 rows with background 0); our labels are 1..80 in sorted id order (coco_utils).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
COCO_TORCHVISION_ROWS = (0, *COCO_CATEGORY_IDS)  # our label l <- torchvision row
# Their names, in the same order (COCO 2017 `categories`).
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Variables whose shape depends on the number of classes.
CLASS_DEPENDENT = (
    "params/box_head/cls_score/",
    "params/box_head/bbox_pred/",
    "params/mask_head/predictor/",
)


class ConversionError(ValueError):
    """The weights do not fit the target model; the message names every offending tensor."""


@dataclasses.dataclass(frozen=True)
class Converted:
    """variables: {'params': ..., 'batch_stats': ...} nested numpy float32 (only the backbone for
    kind 'backbone'); dropped: source tensors deliberately left unused, with the reason."""

    variables: dict[str, Any]
    kind: str  # "detector" | "backbone"
    layout: str  # "torchvision" | "detectron2" | "caffe2": the naming of the source
    dropped: tuple[str, ...]


# ----------------------------------------------------------------------------- reading files

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 is a zip file
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # older torch.save: a protocol 2 pickle of a magic long


def sniff(path: str) -> str:
    """What the file is, from its first bytes: "empty", "zip" (a torch file), "torch-legacy" (a
    torch file from before torch 1.6), "pickle" (protocol 2 or later) or "other"."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head == _ZIP_MAGIC:
        return "zip"
    if head == _TORCH_LEGACY_MAGIC:
        return "torch-legacy"
    return "pickle" if head[:1] == b"\x80" else "other"


def _torch_cause(e: BaseException) -> str:
    """The telling part of a torch.load error: its WeightsUnpickler reason, else its first
    sentence."""
    text = str(e).strip()
    reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
    if reason and reason[1]:
        text = reason[1]
    first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
    return " ".join(first.split())


def _torch_load_problem(e: BaseException, kind: str) -> str:
    """Why torch.load(weights_only=True) failed, in the terms of what the user can do about it."""
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if unsafe:
        return (
            f"it holds a {unsafe[1]} object, not only tensors, and torch.load(weights_only=True) "
            "builds nothing else (other objects can run code when loaded). A whole model saved with "
            "torch.save(model)? Save model.state_dict() instead, or a training checkpoint's 'model' "
            "entry alone"
        )
    if kind == "zip":
        return (
            "a truncated or damaged torch file (an interrupted download or copy?), or a zip file "
            f"that is not a torch file: {_torch_cause(e)}"
        )
    if kind == "pickle":
        return (
            "a plain Python pickle, not a torch file: detectron2 / Caffe2 .pkl files are read with "
            f"--source=detectron2 --allow_pickle (torch: {_torch_cause(e)})"
        )
    if isinstance(e, EOFError) or "truncated" in str(e):
        return f"a truncated torch file (an interrupted download or copy?): {_torch_cause(e)}"
    return f"not a torch file: {_torch_cause(e)}"


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch state dict (.pth) -> {name: numpy array}; torch.load with weights_only=True.

    A training checkpoint {'model': state_dict, 'optimizer': ...} (torchvision's reference
    scripts, detectron2's model_final.pth) is accepted too; only its 'model' entry is read.
    A file torch cannot read is a ConversionError naming it, the cause and what to do.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path}: reading a .pth file needs torch: pip install 'mrcnn_jax[torch]'"
        ) from e
    kind = sniff(path)
    if kind == "empty":
        raise ConversionError(f"{path}: the file is empty (0 bytes; an interrupted download or copy?)")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle's protocol, before it fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ConversionError(f"{path}: {_torch_load_problem(e, kind)}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict {{name: tensor}}")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"{path}: not a state dict, non-tensor entries {bad[:10]}")
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


# (module, name) a model-zoo pickle may reference: numpy arrays and dtypes, plain containers, and
# _codecs.encode, which Python 3 pickles of bytes use. Anything else (os.system, ...) is refused.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }
)


class _Refused(Exception):
    """What the arrays-only unpickler will not load; read_pickle turns it into a ConversionError."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise _Refused(
                f"refusing to load {module}.{name}: the pickle may hold numpy arrays and plain "
                "containers only"
            )
        if module.startswith("numpy.core."):  # numpy 1 pickles; numpy 2 moved the module
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _Refused(
            "it references torch storages: a torch file (torch.save), not a pickle of numpy arrays"
        )


_TORCH_FILE_HINT = (
    "this is a torch file (torch.save), not a pickle of numpy arrays: read it with "
    "--source=torchvision, or, for detectron2's own training output (model_final.pth = "
    "torch.save({'model': state_dict, ...})), --source=detectron2, which reads .pth files with "
    "torch.load(weights_only=True) (convert_file; no --allow_pickle needed)"
)


def read_pickle(path: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """A detectron2 / Detectron .pkl -> its top-level dict. Refused unless `allow_pickle`.

    Python 2 pickles (the Caffe2 ImageNet backbones) are read with encoding latin1, as detectron2.
    A file that is not such a pickle (a torch file, truncated, empty, ...) is a ConversionError
    naming it and the cause.
    """
    kind = sniff(path)
    if kind in ("zip", "torch-legacy"):
        raise ConversionError(f"{path}: {_TORCH_FILE_HINT}")
    if not allow_pickle:
        raise ConversionError(
            f"{path} is a pickle, which can execute code when loaded. Only read files you trust; "
            "pass allow_pickle=True (--allow_pickle) to read it (numpy arrays only)."
        )
    if kind == "empty":
        raise ConversionError(f"{path}: the file is empty (0 bytes; an interrupted download or copy?)")
    try:
        with open(path, "rb") as f:
            data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except _Refused as e:
        raise ConversionError(f"{path}: {e}") from None
    except EOFError as e:
        raise ConversionError(f"{path}: the pickle is truncated (an interrupted download or copy?)") from e
    except Exception as e:  # UnpicklingError, ValueError, ...: not a pickle, or a damaged one
        what = "truncated (an interrupted download or copy?)" if "truncated" in str(e) else "unreadable"
        raise ConversionError(f"{path}: not a pickle of numpy arrays, or {what}: {e}") from e
    if not isinstance(data, Mapping):
        raise ConversionError(f"{path}: expected a dict at the top level, got {type(data).__name__}")
    return dict(data)


# Name beginnings that tell each family's ResNet naming apart (detectors and bare backbones).
_NAMING_STARTS = {
    "detectron2": ("backbone.bottom_up.", "stem.conv1.", "res2.0."),
    "caffe2": ("conv1_w", "res_conv1_bn_", "res2_0_branch"),
    "torchvision": ("backbone.body.", "conv1.weight", "layer1.0."),
}


def naming_of(names: Iterable[str]) -> tuple[str, str] | None:
    """(family, an example name) of the ResNet naming `names` use: "detectron2"
    (`backbone.bottom_up.res2.0.conv1.weight`, `res2.0.conv1.weight`), "caffe2"
    (`res2_0_branch2a_w`) or "torchvision" (`backbone.body.layer1.0.conv1.weight`); None if none."""
    names = sorted(names)
    for layout, starts in _NAMING_STARTS.items():
        for name in names:
            if name.startswith(starts):
                return layout, name
    return None


def detectron2_tensors(data: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], str]:
    """A .pkl's top-level dict -> ({name: array}, layout "detectron2" | "caffe2").

    The arrays are data['model'] (detectron2's format; its model zoo adds '__author__', its own
    training output, read from a .pth, does not), or in Caffe2 / Detectron files the top level or
    data['blobs']. The layout is told from the names; where they are neither detectron2's nor
    Caffe2's, a 'model' dict is taken to be detectron2's, anything else Caffe2's (detectron2's
    DetectionCheckpointer goes by '__author__' alone).
    """
    model = data.get("model")
    arrays = model if isinstance(model, Mapping) else data.get("blobs", data)
    naming = naming_of(arrays)
    if naming is not None and naming[0] in ("detectron2", "caffe2"):
        layout = naming[0]
    else:
        layout = "detectron2" if isinstance(model, Mapping) else "caffe2"
    return {k: np.asarray(v) for k, v in arrays.items()}, layout


# ----------------------------------------------------------------------------- bookkeeping


class _Source:
    """The source tensors; `take` hands each out once and remembers what was used or missing."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = dict(tensors)
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.dropped: list[str] = []

    def take(self, *names: str) -> np.ndarray | None:
        """The first present of `names` (alternative spellings of one tensor), marked used."""
        for name in names:
            if name in self.tensors:
                if name in self.used:
                    raise ConversionError(f"source tensor {name} used twice (conversion table bug)")
                self.used.add(name)
                return np.asarray(self.tensors[name])
        self.missing.append(" | ".join(names))
        return None

    def drop(self, predicate: Callable[[str], bool], why: str) -> None:
        for name in sorted(self.tensors):
            if name not in self.used and predicate(name):
                self.used.add(name)
                self.dropped.append(f"{name} ({why})")

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if self.missing or unused:
            lines = ["the source weights do not match the target model"]
            if self.missing:
                lines += [f"  missing in the source ({len(self.missing)}):"]
                lines += [f"    {n}" for n in self.missing]
            if unused:
                lines += [f"  unused source tensors ({len(unused)}):"]
                lines += [f"    {n} {tuple(np.shape(self.tensors[n]))}" for n in unused]
            raise ConversionError("\n".join(lines))


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch conv weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O]."""
    return np.asarray(w).transpose(2, 3, 1, 0)


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
    return np.asarray(w).T


class _Writer:
    """Collects our variables as flat 'collection/module/.../leaf' names."""

    def __init__(self, src: _Source, norm: NormKind):
        self.src, self.norm, self.flat = src, norm, {}

    def put(self, name: str, value: np.ndarray | None) -> None:
        if value is not None:  # None: missing in the source, already recorded there
            self.flat[name] = np.asarray(value, np.float32)

    def conv(self, ours: str, theirs: Sequence[str], bias: bool = True) -> None:
        """A conv (`theirs`: alternative source prefixes) into params/ours/{kernel, bias}."""
        w = self.src.take(*(f"{t}.weight" for t in theirs))
        self.put(f"params/{ours}/kernel", None if w is None else conv_kernel(w))
        if bias:
            self.put(f"params/{ours}/bias", self.src.take(*(f"{t}.bias" for t in theirs)))

    def norm_layer(self, ours: str, scale, bias, mean, var) -> None:
        """BatchNorm vectors into the collections of the target NormKind (see norm.py)."""
        if self.norm is NormKind.FROZEN_BN:
            affine = "batch_stats"
        elif self.norm in (NormKind.BATCH_NORM, NormKind.SYNC_BN):
            affine = "params"
        else:
            raise ConversionError(f"BatchNorm weights cannot fill a {self.norm.value} model")
        self.put(f"{affine}/{ours}/scale", scale)
        self.put(f"{affine}/{ours}/bias", bias)
        self.put(f"batch_stats/{ours}/mean", mean)
        self.put(f"batch_stats/{ours}/var", var)


# ----------------------------------------------------------------------------- backbone names


def _resnet_modules(depth: int) -> list[tuple[str, str, tuple[int, int, str]]]:
    """(our conv, our norm, (stage 1-4 or 0 = stem, block, role)) of every conv + norm pair.

    role: "conv1".."conv3" or "downsample"; ResNet-18/34 blocks have conv1, conv2 only.
    """
    kind, blocks = STAGE_BLOCKS[depth]
    convs = ("conv1", "conv2") if kind == "basic" else ("conv1", "conv2", "conv3")
    out = [("conv1", "bn1", (0, 0, "conv1"))]
    for stage, num in enumerate(blocks, start=1):
        for j in range(num):
            mod = f"layer{stage}_{j}"
            for k, conv in enumerate(convs, start=1):
                out.append((f"{mod}/{conv}", f"{mod}/bn{k}", (stage, j, conv)))
            # Projection shortcut where the shape changes: every stage's first bottleneck, the
            # first basic block of stages 2-4 (resnet.py `_shortcut`).
            if j == 0 and (kind == "bottleneck" or stage > 1):
                out.append((f"{mod}/downsample_conv", f"{mod}/downsample_bn", (stage, j, "downsample")))
    return out


def _torchvision_names(prefix: str, stage: int, j: int, role: str) -> tuple[str, str]:
    """(conv, norm) source prefixes in torchvision's `resnet*` naming."""
    if stage == 0:
        return f"{prefix}conv1", f"{prefix}bn1"
    block = f"{prefix}layer{stage}.{j}"
    if role == "downsample":
        return f"{block}.downsample.0", f"{block}.downsample.1"
    return f"{block}.{role}", f"{block}.bn{role[-1]}"


def _detectron2_names(prefix: str, stage: int, j: int, role: str) -> tuple[str, str]:
    """(conv, norm) source prefixes in detectron2's ResNet naming (res2..res5 = our layer1..4)."""
    if stage == 0:
        return f"{prefix}stem.conv1", f"{prefix}stem.conv1.norm"
    conv = f"{prefix}res{stage + 1}.{j}.{'shortcut' if role == 'downsample' else role}"
    return conv, f"{conv}.norm"


_C2_BRANCH = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "downsample": "branch1"}


def _caffe2_names(stage: int, j: int, role: str) -> tuple[str, str]:
    """(conv, norm) blob prefixes of the Caffe2 ImageNet ResNets (R-50.pkl): `res2_0_branch2a_w`,
    `res2_0_branch2a_bn_s` ...; the stem is `conv1_w`, `res_conv1_bn_s`."""
    if stage == 0:
        return "conv1", "res_conv1_bn"
    conv = f"res{stage + 1}_{j}_{_C2_BRANCH[role]}"
    return conv, f"{conv}_bn"


def _fill_resnet(out: _Writer, depth: int, layout: str, prefix: str) -> None:
    """All backbone variables; layout "torchvision" | "detectron2" | "caffe2"."""
    src = out.src
    for our_conv, our_norm, (stage, j, role) in _resnet_modules(depth):
        if layout == "caffe2":
            conv, norm = _caffe2_names(stage, j, role)
            w = src.take(f"{conv}_w")
            out.put(f"params/backbone/{our_conv}/kernel", None if w is None else conv_kernel(w))
            scale, bias = src.take(f"{norm}_s"), src.take(f"{norm}_b")
            # Caffe2 folded the statistics into scale / bias; detectron2's FrozenBatchNorm2d then
            # uses mean 0 and var 1 (and still adds eps = 1e-5), as we do.
            c = None if scale is None else scale.shape
            mean = None if c is None else np.zeros(c, np.float32)
            var = None if c is None else np.ones(c, np.float32)
            out.norm_layer(f"backbone/{our_norm}", scale, bias, mean, var)
            continue
        names = _torchvision_names if layout == "torchvision" else _detectron2_names
        conv, norm = names(prefix, stage, j, role)
        out.conv(f"backbone/{our_conv}", (conv,), bias=False)
        vectors = [src.take(f"{norm}.{leaf}") for leaf in ("weight", "bias", "running_mean", "running_var")]
        out.norm_layer(f"backbone/{our_norm}", *vectors)


def infer_depth(names: Iterable[str], layout: str, prefix: str = "") -> int:
    """ResNet depth from the blocks of the third stage (6 -> 50, 23 -> 101, ...) and the block kind."""
    names = set(names)
    if layout == "caffe2":
        block = lambda j, c: f"res4_{j}_branch2{'abc'[int(c[-1]) - 1]}_w"
    elif layout == "torchvision":
        block = lambda j, c: f"{prefix}layer3.{j}.{c}.weight"
    else:
        block = lambda j, c: f"{prefix}res4.{j}.{c}.weight"
    num = 0
    while block(num, "conv1") in names:
        num += 1
    kind = "bottleneck" if block(0, "conv3") in names else "basic"
    for depth, (k, blocks) in STAGE_BLOCKS.items():
        if k == kind and blocks[2] == num:
            return depth
    raise ConversionError(
        f"no ResNet with {num} {kind} blocks in its third stage ({layout} names)"
        + _naming_hint(names, layout)
    )


_SOURCE_OF = {
    "torchvision": "--source=torchvision",
    "detectron2": "--source=detectron2",
    "caffe2": "--source=detectron2 --allow_pickle (a Caffe2 ImageNet backbone .pkl)",
}


def _naming_hint(names: set[str], layout: str) -> str:
    """What the names are, for an error on names of another `layout` than expected."""
    if not names:
        return ": there are no tensors"
    naming = naming_of(names)
    if naming is not None and naming[0] != layout:
        family, example = naming
        source = _SOURCE_OF[family]
        return f"; the names are {family}'s (e.g. {example}): {source} (layout={family!r})"
    return f"; the names begin {sorted(names)[:3]}"


# ----------------------------------------------------------------------------- heads


def _fill_fpn_rpn(out: _Writer, layout: str) -> None:
    """FPN lateral / output convs and the RPN head (fpn.py, rpn.py give the names)."""
    for k in range(2, 6):
        if layout == "torchvision":  # torchvision < 0.13 had no `.0` (Conv2dNormActivation)
            lateral = (f"backbone.fpn.inner_blocks.{k - 2}.0", f"backbone.fpn.inner_blocks.{k - 2}")
            output = (f"backbone.fpn.layer_blocks.{k - 2}.0", f"backbone.fpn.layer_blocks.{k - 2}")
        else:
            lateral, output = (f"backbone.fpn_lateral{k}",), (f"backbone.fpn_output{k}",)
        out.conv(f"fpn/lateral{k}", lateral)
        out.conv(f"fpn/output{k}", output)
    if layout == "torchvision":
        names = {"conv": ("rpn.head.conv.0.0", "rpn.head.conv"), "objectness": ("rpn.head.cls_logits",)}
        names["deltas"] = ("rpn.head.bbox_pred",)
    else:
        head = "proposal_generator.rpn_head"
        names = {"conv": (f"{head}.conv",), "objectness": (f"{head}.objectness_logits",)}
        names["deltas"] = (f"{head}.anchor_deltas",)
    for ours, theirs in names.items():
        out.conv(f"rpn_head/{ours}", theirs)


def _classes(x: np.ndarray | None, per_class: int, rows: Sequence[int] | None, bg: str):
    """Class-major rows [K_src * per_class, ...] -> ours [(K + 1) * per_class, ...], background first.

    bg: "first" (torchvision: as is), "last" (detectron2 cls_score: move it to 0) or "none"
    (detectron2 bbox_pred / mask predictor: zero rows for the background, never used).
    rows: after that, keep these classes in this order (e.g. COCO_TORCHVISION_ROWS); None = all.
    """
    if x is None:
        return None
    x = np.asarray(x, np.float32)
    if x.shape[0] % per_class:
        raise ConversionError(f"class axis {x.shape[0]} is not a multiple of {per_class}")
    x = x.reshape(x.shape[0] // per_class, per_class, *x.shape[1:])
    if bg == "last":
        x = np.concatenate([x[-1:], x[:-1]])
    elif bg == "none":
        x = np.concatenate([np.zeros_like(x[:1]), x])
    if rows is not None:
        if max(rows) >= x.shape[0]:
            raise ConversionError(f"class map needs row {max(rows)}, the source has {x.shape[0]}")
        x = x[np.asarray(rows)]
    return x.reshape(-1, *x.shape[2:])


def _fill_box_head(out: _Writer, layout: str, channels: int, pool: int, rows) -> None:
    src, tv = out.src, layout == "torchvision"
    fc6, fc7 = ("fc6", "fc7") if tv else ("fc1", "fc2")
    w = src.take(f"roi_heads.box_head.{fc6}.weight")
    out.put("params/box_head/fc6/kernel", None if w is None else fc6_kernel_from_chw(w, channels, pool))
    out.put("params/box_head/fc6/bias", src.take(f"roi_heads.box_head.{fc6}.bias"))
    w = src.take(f"roi_heads.box_head.{fc7}.weight")
    out.put("params/box_head/fc7/kernel", None if w is None else dense_kernel(w))
    out.put("params/box_head/fc7/bias", src.take(f"roi_heads.box_head.{fc7}.bias"))
    for ours, theirs, per_class, bg in (
        ("cls_score", "cls_score", 1, "first" if tv else "last"),
        ("bbox_pred", "bbox_pred", 4, "first" if tv else "none"),
    ):
        w = _classes(src.take(f"roi_heads.box_predictor.{theirs}.weight"), per_class, rows, bg)
        b = _classes(src.take(f"roi_heads.box_predictor.{theirs}.bias"), per_class, rows, bg)
        out.put(f"params/box_head/{ours}/kernel", None if w is None else dense_kernel(w))
        out.put(f"params/box_head/{ours}/bias", b)


def _fill_mask_head(out: _Writer, layout: str, num_convs: int, rows) -> None:
    src, tv = out.src, layout == "torchvision"
    for i in range(1, num_convs + 1):
        # torchvision >= 0.13 names the convs mask_head.{i-1}.0, older releases mask_fcn{i}.
        names = (f"roi_heads.mask_head.{i - 1}.0",) if tv else ()
        out.conv(f"mask_head/mask_fcn{i}", (*names, f"roi_heads.mask_head.mask_fcn{i}"))
    deconv = "roi_heads.mask_predictor.conv5_mask" if tv else "roi_heads.mask_head.deconv"
    w = src.take(f"{deconv}.weight")
    out.put("params/mask_head/deconv/kernel", None if w is None else deconv_kernel_from_torch(w))
    out.put("params/mask_head/deconv/bias", src.take(f"{deconv}.bias"))
    pred = "roi_heads.mask_predictor.mask_fcn_logits" if tv else "roi_heads.mask_head.predictor"
    bg = "first" if tv else "none"
    w = _classes(src.take(f"{pred}.weight"), 1, rows, bg)
    out.put("params/mask_head/predictor/kernel", None if w is None else conv_kernel(w))
    out.put("params/mask_head/predictor/bias", _classes(src.take(f"{pred}.bias"), 1, rows, bg))


# ----------------------------------------------------------------------------- non-weights


def _check_detectron2_buffers(src: _Source, model_cfg, pixel_mean, pixel_std) -> None:
    """Buffers of older detectron2 checkpoints that are not weights: the anchor generator's cell
    anchors [A, 4] per level and the input normalisation [3, 1, 1]. Each must equal what the
    config does (else the weights would see other inputs / anchors than they were trained with),
    then it is dropped."""
    for i, size in enumerate(model_cfg.anchor_sizes):
        name = f"proposal_generator.anchor_generator.cell_anchors.{i}"
        if name in src.tensors:
            ours = base_anchors(size, tuple(model_cfg.anchor_ratios), model_cfg.anchor_round)
            theirs = src.take(name)
            if theirs.shape != ours.shape or not np.allclose(theirs, ours, atol=1e-3):
                raise ConversionError(f"{name} = {theirs.tolist()} differs from our anchors {ours.tolist()}")
            src.dropped.append(f"{name} (cell anchors, equal to the config's)")
    for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        if name in src.tensors:
            theirs = src.take(name).reshape(-1)
            if value is not None and not np.allclose(theirs, value, atol=1e-3):
                raise ConversionError(
                    f"the file's {name} {theirs.tolist()} differs from config.data.{name} {list(value)}"
                )
            src.dropped.append(f"{name} (input normalisation, equal to the config's)")


def _drop_non_weights(src: _Source, layout: str, model_cfg, pixel_mean, pixel_std) -> None:
    """Source tensors that are deliberately not used, with the reason (Converted.dropped)."""
    src.drop(lambda n: n.endswith(".num_batches_tracked"), "BatchNorm update counter")
    if layout == "torchvision":
        src.drop(lambda n: n in ("fc.weight", "fc.bias"), "ImageNet classifier")
    elif layout == "caffe2":
        src.drop(lambda n: n in ("fc1000_w", "fc1000_b"), "ImageNet classifier")
        src.drop(lambda n: n.endswith("_momentum"), "SGD momentum")
    else:
        _check_detectron2_buffers(src, model_cfg, pixel_mean, pixel_std)


# ----------------------------------------------------------------------------- conversion

LAYOUTS = ("torchvision", "detectron2", "caffe2")
_DETECTOR_PREFIX = {"torchvision": "backbone.body.", "detectron2": "backbone.bottom_up."}


def _kind_and_prefix(names: Iterable[str], layout: str) -> tuple[str, str]:
    """("detector" | "backbone", the prefix of the ResNet names)."""
    names = set(names)
    if layout == "torchvision" and "roi_heads.box_head.0.0.weight" in names:
        raise ConversionError("maskrcnn_resnet50_fpn_v2 (conv box head, GroupNorm) is not supported")
    prefix = _DETECTOR_PREFIX.get(layout)
    if prefix and any(n.startswith(prefix) for n in names):
        return "detector", prefix
    return "backbone", ""


def target_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """{'collection/module/.../leaf': shape} of every variable of `build_model(model_cfg)`."""
    model = mask_rcnn.build_model(model_cfg)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)  # shapes do not depend on the size
    shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), images)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def _check_against_model(
    flat: Mapping[str, np.ndarray], model_cfg, backbone_only: bool, config_args: Sequence[str]
) -> None:
    expected = target_shapes(model_cfg)
    if backbone_only:
        expected = {k: v for k, v in expected.items() if k.split("/")[1] == "backbone"}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    misshaped = [
        f"{k}: converted {flat[k].shape} vs model {expected[k]}"
        for k in sorted(set(flat) & set(expected))
        if flat[k].shape != expected[k]
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = ["the converted weights do not fit the model of the config"]
    for title, names in (("not filled", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            lines += [f"  {title} ({len(names)}):"] + [f"    {n}" for n in names]
    bias = flat.get("params/box_head/cls_score/bias")
    if bias is not None and bias.shape[0] - 1 != model_cfg.num_classes:
        theirs = bias.shape[0] - 1
        lines.append(
            f"  the weights have {theirs} classes: convert with "
            f"{with_override(config_args, 'data.num_classes', theirs)}, then fine-tune to "
            f"{model_cfg.num_classes} classes with --config.train.init_checkpoint=DIR (the "
            "converted workdir; python -m mrcnn_jax.main, the class layers start afresh)"
        )
    raise ConversionError("\n".join(lines))


def convert(
    tensors: Mapping[str, np.ndarray],
    model_cfg,
    *,
    layout: str,
    class_rows: Sequence[int] | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    config_args: Sequence[str] | None = None,
) -> Converted:
    """Source tensors {name: array} -> our variables for `build_model(model_cfg)`.

    layout: "torchvision" (maskrcnn_resnet50_fpn or an ImageNet resnet), "detectron2" (model zoo,
    or a backbone in detectron2 names) or "caffe2" (R-50.pkl / R-101.pkl ImageNet backbones).
    Detector or backbone is told from the names; the ResNet depth must equal model_cfg.depth.
    class_rows: our class l <- the source's class class_rows[l] (after moving detectron2's
    background first), e.g. COCO_TORCHVISION_ROWS; None keeps them all.
    pixel_mean / pixel_std: the config's, checked against the buffers some detectron2 files carry.
    config_args: the --config flags that made the config, for the hints in errors (default: the
    family's config file, `family_config_file`).
    Raises ConversionError listing every unused / missing source tensor and unfilled variable.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src = _Source(tensors)
    kind, prefix = _kind_and_prefix(src.tensors, layout)
    depth = infer_depth(src.tensors, layout, prefix)
    config_args = config_args or (f"--config={family_config_file(_family(layout))}",)
    if depth != model_cfg.depth:
        raise ConversionError(
            f"the weights are a ResNet-{depth}, config.model.depth is {model_cfg.depth}: convert "
            f"with {with_override(config_args, 'model.depth', depth)}, and give the same "
            f"--config.model.depth={depth} when evaluating or fine-tuning"
        )
    out = _Writer(src, NormKind(model_cfg.norm))
    _fill_resnet(out, depth, layout, prefix)
    if kind == "detector":
        _fill_fpn_rpn(out, layout)
        _fill_box_head(out, layout, model_cfg.fpn_channels, model_cfg.roi.box_pool_size, class_rows)
        _fill_mask_head(out, layout, model_cfg.roi.num_mask_convs, class_rows)
    _drop_non_weights(src, layout, model_cfg, pixel_mean, pixel_std)
    src.check_all_used()
    _check_against_model(out.flat, model_cfg, kind == "backbone", config_args)
    variables = traverse_util.unflatten_dict(out.flat, sep="/")
    return Converted(variables=variables, kind=kind, layout=layout, dropped=tuple(src.dropped))


# ----------------------------------------------------------------------------- checkpoints


def save_converted(converted: Converted, workdir: str, info: Mapping[str, Any] | None = None) -> str:
    """Writes WORKDIR/checkpoints/0 (a state of params, model_state and step 0, the layout
    `checkpoint.load_weights` reads) and WORKDIR/conversion.json; returns the checkpoints directory.
    Refuses a directory that already holds a checkpoint."""
    directory = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
    if ckpt_lib.latest_step(directory) is not None:
        raise FileExistsError(f"{directory} already holds a checkpoint; convert into an empty workdir")
    variables = converted.variables
    state = {
        "step": np.zeros((), np.int32),
        "params": variables.get("params", {}),
        "model_state": {k: v for k, v in variables.items() if k != "params"},
    }
    with ckpt_lib.CheckpointManager(directory, keep=1, async_save=False) as manager:
        manager.save(0, state)
        manager.wait()
    record = {"kind": converted.kind, "layout": converted.layout, "dropped": list(converted.dropped)}
    with open(os.path.join(workdir, INFO_FILE), "w") as f:
        json.dump({**(info or {}), **record}, f, indent=2)
    return directory


def is_class_dependent(name: str) -> bool:
    """True for 'collection/...' variable names whose shape depends on the number of classes."""
    return name.startswith(CLASS_DEPENDENT)


def merge_pretrained(fresh: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
    """Fresh model variables + converted / trained ones (`checkpoint.load_weights`) -> merged.

    For evaluation and fine-tuning: everything is taken from `loaded` and must fit exactly
    (`checkpoint.merge_weights` lists what does not), except that
      * class-dependent layers (CLASS_DEPENDENT) of another class count keep their fresh values
        (fine-tuning on a dataset with other classes re-initialises them);
      * when `loaded` holds only a backbone (an ImageNet conversion), everything outside the
        backbone keeps its fresh value.
    """
    flat_fresh = traverse_util.flatten_dict(dict(fresh), sep="/")
    flat_loaded = traverse_util.flatten_dict(dict(loaded), sep="/")
    backbone_only = all(k.split("/")[1] == "backbone" for k in flat_loaded)

    def skip(name: str) -> bool:
        if backbone_only and name.split("/")[1] != "backbone":
            return True
        return (
            is_class_dependent(name)
            and name in flat_loaded
            and name in flat_fresh
            and np.shape(flat_loaded[name]) != np.shape(flat_fresh[name])
        )

    refreshed = sorted(k for k in flat_fresh if is_class_dependent(k) and skip(k))
    if refreshed:
        score = "params/box_head/cls_score/kernel"
        classes = [np.shape(t[score])[-1] - 1 if score in t else "?" for t in (flat_loaded, flat_fresh)]
        logging.warning(
            "the weights have %s classes and the model %s: their class layers (%s) start from"
            " fresh values, everything else is loaded", *classes,
            ", ".join(sorted({k.rsplit("/", 1)[0].split("/", 1)[1] for k in refreshed})),
        )
    return ckpt_lib.merge_weights(fresh, loaded, skip=skip)


# ----------------------------------------------------------------------------- command line

CLASS_MAPS = ("auto", "none", "coco91to80")


def default_config(source: str):
    """The config that reproduces `source`'s inference: configs/{torchvision_r50_fpn,
    detectron2_r50_fpn_1x}.py."""
    if source == "torchvision":
        from configs import torchvision_r50_fpn

        return torchvision_r50_fpn.get_config()
    if source == "detectron2":
        from configs import detectron2_r50_fpn_1x

        return detectron2_r50_fpn_1x.get_config()
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


# configs/ files of default_config(source).
FAMILY_CONFIG_FILES = {
    "torchvision": "torchvision_r50_fpn.py",
    "detectron2": "detectron2_r50_fpn_1x.py",
}


def family_config_file(source: str) -> str:
    """The file of `default_config(source)`: configs/..., relative to the current directory when
    it lies below it, else absolute."""
    import configs

    directory = os.path.dirname(os.path.abspath(configs.__file__))
    path = os.path.join(directory, FAMILY_CONFIG_FILES[source])
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _family(layout: str) -> str:
    return "torchvision" if layout == "torchvision" else "detectron2"


def with_override(config_args: Sequence[str], key: str, value: Any) -> str:
    """`config_args` (--config=FILE and --config.* overrides) with --config.KEY=VALUE in place of
    any override of KEY, quoted for a shell: the flags an error tells the user to run with."""
    pattern = rf"-{{1,2}}(no)?config\.{re.escape(key)}(=|$)"
    kept = [a for a in config_args if not re.match(pattern, a)]
    return " ".join(shlex.quote(a) for a in [*kept, f"--config.{key}={value}"])


# Of checkpoint.INPUT_CONVENTION_KEYS, those every torchvision weight file shares: ImageNet mean /
# std on RGB pixels, the stride in the 3x3 conv. Not model.norm_eps, which depends on the file: 0
# for its COCO detectors, 1e-5 for its ImageNet ResNets (convert_file records that) and for models
# trained with its reference scripts.
TORCHVISION_CONVENTION_KEYS = tuple(
    k for k in ckpt_lib.INPUT_CONVENTION_KEYS if k != "model.norm_eps"
)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, str | bool) or isinstance(b, str | bool):
        return a == b
    return np.shape(a) == np.shape(b) and bool(np.allclose(a, b, rtol=1e-6, atol=1e-6))


def _flag_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def convention_differences(config, source: str, keys: Iterable[str]) -> list[tuple[str, Any, Any]]:
    """[(key, the config's value, the family's)] of `keys` where `config` differs from
    `default_config(source)`."""
    ours, family = config.to_dict(), default_config(source).to_dict()
    out = []
    for key in keys:
        mine, theirs = ckpt_lib.lookup(ours, key), ckpt_lib.lookup(family, key)
        if mine is not None and theirs is not None and not _same_value(mine, theirs):
            out.append((key, mine, theirs))
    return out


def check_family_convention(
    source: str, config, config_args: Sequence[str], input_path: str
) -> None:
    """The config's input convention against the family's, before the conversion writes it into
    config.json, where `checkpoint.check_input_convention` takes it for the weights' own.

    torchvision: all its weights share one (TORCHVISION_CONVENTION_KEYS), and another is a
    ConversionError naming the keys, the config's values and torchvision's. detectron2: files
    trained from other backbones (e.g. torchvision's) legitimately use others, so differences in
    any of checkpoint.INPUT_CONVENTION_KEYS are a warning naming them.
    """
    if source == "torchvision":
        wrong = convention_differences(config, source, TORCHVISION_CONVENTION_KEYS)
        if not wrong:
            return
        lines = "\n".join(f"  {k}: {m!r} in the config, torchvision's {t!r}" for k, m, t in wrong)
        fix = " ".join(f"--config.{k}={_flag_text(t)}" for k, _, t in wrong)
        raise ConversionError(
            f"the config ({' '.join(config_args)}) gives torchvision's weights other inputs than "
            f"they were trained with:\n{lines}\nconvert with "
            f"--config={family_config_file('torchvision')} (its COCO detectors), a config with "
            "base's convention such as --config=configs/coco_r50_fpn_1x.py (its ImageNet "
            f"backbones), or set {fix}"
        )
    wrong = convention_differences(config, source, ckpt_lib.INPUT_CONVENTION_KEYS)
    if wrong:
        logging.warning(
            "%s: the config's input convention differs from detectron2's (%s): %s. Right only if "
            "these weights were trained so (e.g. from a torchvision backbone): config.json will "
            "record the config's values, and evaluation and fine-tuning will require them.",
            input_path,
            family_config_file("detectron2"),
            "; ".join(f"{k} {m!r} in the config, detectron2's {t!r}" for k, m, t in wrong),
        )


def resolve_class_rows(class_map: str, tensors: Mapping[str, np.ndarray], layout: str, num_classes: int):
    """--class_map -> `convert`'s class_rows. "auto": torchvision's 91-row COCO heads become our 80
    contiguous COCO labels when the config has 80 classes; otherwise all rows are kept."""
    if class_map == "none":
        return None
    if class_map == "coco91to80":
        return COCO_TORCHVISION_ROWS
    if class_map != "auto":
        raise ValueError(f"class_map must be one of {CLASS_MAPS}, got {class_map!r}")
    cls = tensors.get("roi_heads.box_predictor.cls_score.weight")
    coco = layout == "torchvision" and cls is not None and cls.shape[0] == 91 and num_classes == 80
    return COCO_TORCHVISION_ROWS if coco else None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_file(
    source: str,
    input_path: str,
    workdir: str,
    config=None,
    *,
    allow_pickle: bool = False,
    class_map: str = "auto",
    config_args: Sequence[str] | None = None,
) -> Converted:
    """What `python -m mrcnn_jax.convert` does: read `input_path`, convert it for `config`
    (default: `default_config(source)`), write the checkpoint, conversion.json and config.json
    into `workdir`. config_args: the --config flags that made `config`, repeated by the hints in
    errors (default: --config=<the family's config file>)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    config = config if config is not None else default_config(source)
    config_args = config_args or (f"--config={family_config_file(source)}",)
    if os.path.isdir(input_path):
        raise runtime.InvalidInputError(
            f"--input {input_path} is a folder: name the weight file in it (.pth, .pkl)"
        )
    if not os.path.isfile(input_path):
        raise runtime.MissingInputError(f"--input {input_path}: no such file")
    check_family_convention(source, config, config_args, input_path)
    if source == "torchvision":
        tensors, layout = read_torch_state_dict(input_path), "torchvision"
    elif source == "detectron2" and sniff(input_path) in ("zip", "torch-legacy"):
        # detectron2's own training output (model_final.pth): torch.save({'model': ..., ...}),
        # read safely with torch.load(weights_only=True).
        tensors, layout = detectron2_tensors({"model": read_torch_state_dict(input_path)})
    else:
        tensors, layout = detectron2_tensors(read_pickle(input_path, allow_pickle=allow_pickle))
    rows = resolve_class_rows(class_map, tensors, layout, config.model.num_classes)
    converted = convert(
        tensors,
        config.model,
        layout=layout,
        class_rows=rows,
        pixel_mean=tuple(config.data.pixel_mean),
        pixel_std=tuple(config.data.pixel_std),
        config_args=config_args,
    )
    info = {
        "source": source,
        "input": os.path.abspath(input_path),
        "sha256": _sha256(input_path),
        "depth": config.model.depth,
        "num_classes": config.model.num_classes,
        "class_rows": None if rows is None else list(rows),
    }
    coco = converted.kind == "detector" and (
        rows == COCO_TORCHVISION_ROWS
        or (layout != "torchvision" and class_map == "auto" and config.model.num_classes == 80)
    )
    if coco:
        # torchvision's 91 rows mapped to the 80 COCO ids; a detectron2 80-class model is taken
        # to be COCO's (its contiguous classes are the sorted COCO ids).
        info["labels"] = "coco" if rows == COCO_TORCHVISION_ROWS else "coco (assumed: 80 classes)"
    save_converted(converted, workdir, info)
    if coco:
        ckpt_lib.write_labels(
            workdir,
            ("background", *COCO_CLASS_NAMES),
            {label: cid for label, cid in enumerate(COCO_CATEGORY_IDS, start=1)},
        )
    # The config the weights were converted for, as `main` writes it: `predict.Predictor.from_workdir`
    # and `predict.load_config` read it back, `checkpoint.check_input_convention` checks it.
    if source == "torchvision" and converted.kind == "backbone":
        # eps 0 is for torchvision's COCO detectors only; its ImageNet ResNets use 1e-5.
        config = config.copy_and_resolve_references()
        config.model.norm_eps = 1e-5
    elif source == "torchvision" and config.model.norm_eps != 0:
        logging.warning(
            "%s: config.model.norm_eps is %s; torchvision's COCO detectors run with 0 (%s), models "
            "trained with its reference scripts with 1e-5. Pass --config.model.norm_eps=0 unless "
            "this is one of those.",
            input_path,
            config.model.norm_eps,
            family_config_file("torchvision"),
        )
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return converted


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of --NAME in a command line (--NAME=V or --NAME V; the last one counts)."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if match := re.fullmatch(rf"-{{1,2}}{name}=(.*)", arg):
            value = match[1]
        elif arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def config_args_of(argv: Sequence[str], config_file: str) -> tuple[str, ...]:
    """--config=CONFIG_FILE and the --config.* overrides of a command line, as typed."""
    overrides = []
    for i, arg in enumerate(argv[1:], start=1):
        if re.match(r"-{1,2}(no)?config\.", arg):
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                arg = f"{arg}={argv[i + 1]}"  # --config.KEY VALUE
            overrides.append(arg)
    return (f"--config={config_file}", *overrides)


def main(argv: Sequence[str], flag_values=None, command_line: Sequence[str] | None = None) -> None:
    """flag_values: the parsed flags (default absl's FLAGS); command_line: what they were parsed
    from (default sys.argv), for the --config flags that errors repeat."""
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS if flag_values is None else flag_values
    runtime.quiet_library_logs(flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0)
    config_file = family_config_file(f.source)
    if f.config is not None:
        from ml_collections import config_flags

        config_file = config_flags.get_config_filename(f["config"])
    converted = convert_file(
        f.source,
        f.input,
        f.workdir,
        f.config,
        allow_pickle=f.allow_pickle,
        class_map=f.class_map,
        config_args=config_args_of(sys.argv if command_line is None else command_line, config_file),
    )
    logging.info("converted %s (%s %s) into %s", f.input, converted.layout, converted.kind, f.workdir)
    for line in converted.dropped:
        logging.info("not used by design: %s", line)


def _define_flags(flag_values=None, argv: Sequence[str] | None = None) -> None:
    """Flags exist only when run as a script, so importing this module defines none.

    --config defaults to the file of the family --source names (found in `argv`, default
    sys.argv), so that --config.KEY=VALUE overrides work without --config: config_flags parses
    a default file at once, and defines override flags only for a file it has parsed.
    """
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FLAGS if flag_values is None else flag_values
    source = _flag_value(sys.argv if argv is None else argv, "source")
    default = family_config_file(source) if source in SOURCES else None
    kw = {"flag_values": fv}
    flags.DEFINE_enum("source", None, list(SOURCES), "Which family the weights come from.", **kw)
    flags.DEFINE_string(
        "input", None, "The .pth (torchvision, detectron2's own) or .pkl (detectron2) file.", **kw
    )
    flags.DEFINE_string(
        "workdir", None, "Output: WORKDIR/checkpoints/0, conversion.json and config.json.", **kw
    )
    flags.DEFINE_bool("allow_pickle", False, "Allow reading a .pkl (only files you trust).", **kw)
    flags.DEFINE_enum(
        "class_map", "auto", list(CLASS_MAPS), "Class rows: see resolve_class_rows.", **kw
    )
    families = " or ".join(f"configs/{name}" for name in FAMILY_CONFIG_FILES.values())
    config_flags.DEFINE_config_file(
        "config",
        default,
        f"Target config (default: the family's, {families}).",
        sys_argv=None if argv is None else list(argv),
        **kw,
    )
    flags.mark_flags_as_required(["source", "input", "workdir"], flag_values=fv)


if __name__ == "__main__":
    from absl import app

    from mrcnn_jax import runtime

    try:  # a default --config is parsed, with its overrides, as the flags are defined
        _define_flags()
    except runtime.OVERRIDE_ERRORS as e:
        runtime.exit_for_unknown_override(sys.argv, e)
    app.run(
        runtime.reporting_user_errors(main, errors=(ConversionError,)),
        flags_parser=runtime.parse_flags,
    )
