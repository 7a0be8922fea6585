"""`coco_folder`: COCO-format instance annotations from a folder, in COCO 2017's own layout:

    ROOT/annotations/instances_{split}.json      (e.g. instances_train2017.json)
    ROOT/{split}/{file_name}                     (e.g. train2017/000000000009.jpg)

so COCO 2017 itself works from a user's disk (TFDS's `coco/2017` has no instance masks). One builder
config per (root, split, annotation file content): a changed annotation file is prepared afresh, and
an evaluation-only folder needs no train split. Images are read by a thread pool (PIL releases the
GIL while decoding) and stored sorted by image id; instances are repaired or dropped as
`coco_utils` describes, with a summary in the log and in the dataset's metadata (`repairs`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mrcnn_jax import image_io, runtime
from mrcnn_jax.data import coco_utils

logger = logging.getLogger(__name__)

# Images handed to the reader pool at a time: bounds the decoded bytes held in memory.
_READ_CHUNK = 256


@dataclasses.dataclass
class CocoFolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    split: str = ""


def resolve_root(root: str) -> str:
    """`config.data.root` as one absolute path ("~" expanded: shells leave it in
    `--config.data.root=~/coco`), so every use of it names the same folder."""
    return os.path.abspath(os.path.expanduser(root)) if root else root


def annotation_path(root: str, split: str) -> str:
    return os.path.join(resolve_root(root), "annotations", f"instances_{split}.json")


def tfds_split_name(split: str) -> str:
    """TFDS split names are word characters only."""
    return re.sub(r"\W", "_", split)


def _file_digest(path: str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def coco_folder_config(root: str, split: str, variant: str = "") -> CocoFolderConfig:
    """The builder config of `split` under `root`, named after the annotation file's content
    (and `variant`: a preparation after missing images appeared, `pipeline._load_split`).

    Raises FileNotFoundError naming the annotation file when it does not exist.
    """
    root = resolve_root(root)
    path = annotation_path(root, split)
    if not os.path.isfile(path):
        raise runtime.MissingInputError(f"COCO annotation file not found: {path}")
    key = hashlib.sha1(
        f"{root}\0{split}\0{_file_digest(path)}{f'{chr(0)}{variant}' if variant else ''}".encode(),
        usedforsecurity=False,
    )
    return CocoFolderConfig(
        name=f"{tfds_split_name(split)}_{key.hexdigest()[:16]}",
        description=f"{path} with images in {os.path.join(root, split)}",
        root=root,
        split=split,
    )


def _declared_size(meta: dict) -> tuple[int, int] | None:
    h, w = meta.get("height"), meta.get("width")
    ok = coco_utils.is_int(h) and coco_utils.is_int(w) and h > 0 and w > 0
    return (h, w) if ok else None


def _load(image_dir: str, meta: dict):
    """-> (bytes, height, width, EXIF repair kind or None), or the repair kind explaining why the
    image is dropped."""
    try:
        return image_io.read_image(
            os.path.join(image_dir, meta["file_name"]), _declared_size(meta)
        )
    except FileNotFoundError:
        return "image_file_missing"
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...) for bad files
        return "image_file_unreadable"


def _read_images(metas: list[dict], image_dir: str):
    """Yields (meta, `_load` result) in the order of `metas`, decoding on a thread pool."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(metas), _READ_CHUNK):
            chunk = metas[start : start + _READ_CHUNK]
            yield from zip(chunk, pool.map(lambda m: _load(image_dir, m), chunk), strict=True)


def _stack_objects(objects: list[dict]) -> dict:
    keys = ("id", "label", "category_id", "is_crowd", "area", "rle")
    out = {k: [o[k] for o in objects] for k in keys}
    out["bbox"] = np.array([o["bbox"] for o in objects], np.float32).reshape(-1, 4)
    return out


def _repair_or_drop(ann: dict, h: int, w: int, label_of: dict, log: coco_utils.RepairLog):
    try:
        return coco_utils.repair_annotation(ann, h, w, label_of, log)
    except Exception as e:  # noqa: BLE001 - one odd record must not end hours of preparation
        logger.warning("annotation %s dropped: %r", ann.get("id"), e)
        log.add("annotation_invalid", ann.get("id"))
        return None


def build_example(meta: dict, anns: list[dict], loaded, label_of: dict, log: coco_utils.RepairLog):
    """One image entry + its annotations + `_load` result -> stored example, or None (dropped)."""
    iid = meta["id"]
    dropped = loaded if isinstance(loaded, str) else None
    detail = ""
    if dropped is None:
        data, h, w, exif = loaded
        declared = _declared_size(meta)
        if declared is None:
            log.add("image_size_missing", iid)  # repaired: the file's size is used
        elif declared != (h, w):
            dropped = "image_size_mismatch"
            detail = f" (declared {declared[0]} x {declared[1]}, the file is {h} x {w})"
        if exif is not None and dropped is None:
            log.add(exif, iid)
    if dropped is not None:
        log.add(dropped, iid)
        if log.counts[dropped] <= coco_utils.MAX_LOGGED_IDS:  # the ids alone do not say which file
            logger.warning(
                "image %s, %s: %s%s", iid, meta["file_name"], coco_utils.REPAIR_KINDS[dropped],
                detail,
            )
        for a in anns:
            log.add("annotation_of_dropped_image", a["id"])
        return None
    objects = [_repair_or_drop(a, h, w, label_of, log) for a in anns]
    return {
        "image": data,
        "image_id": iid,
        "height": h,
        "width": w,
        "file_name": meta["file_name"],
        "objects": _stack_objects([o for o in objects if o is not None]),
    }


class CocoFolder(coco_utils.InstancesBuilder):
    """COCO-format folder; build it as `CocoFolder(config=coco_folder_config(root, split), ...)`."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Instances with compressed-RLE masks, repaired annotations.",
        "1.1.0": "Images stored upright (EXIF orientation); the files missing at preparation"
        " recorded (`missing_files`).",
    }

    def _split_generators(self, dl_manager):
        del dl_manager  # the data is already on disk
        return {tfds_split_name(self.builder_config.split): self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        path = annotation_path(cfg.root, cfg.split)
        data = coco_utils.load_annotation_file(path)
        categories = coco_utils.parse_categories(data["categories"], path)
        log = coco_utils.RepairLog()
        images = coco_utils.index_images(data["images"], log)
        anns = coco_utils.group_annotations(
            data.get("annotations", []), images, [c["id"] for c in categories], log
        )
        del data
        label_of = {c["id"]: c["label"] for c in categories}
        num_instances = []
        self.info.metadata.update(
            categories=categories, num_instances={tfds_split_name(cfg.split): num_instances}
        )
        metas = [images[i] for i in sorted(images)]
        image_dir = os.path.join(cfg.root, cfg.split)
        key, missing = 0, []
        for meta, loaded in _read_images(metas, image_dir):
            if loaded == "image_file_missing":
                missing.append(meta["file_name"])
            ex = build_example(meta, anns.get(meta["id"], []), loaded, label_of, log)
            if ex is not None:
                num_instances.append(int(sum(not c for c in ex["objects"]["is_crowd"])))
                yield key, ex
                key += 1
        log.log_summary(path)
        if not key:
            raise runtime.InvalidInputError(
                f"{path}: none of its {len(metas)} images could be used from {image_dir}"
                f" (repairs: {log.as_dict()}); is config.data.root the folder that holds"
                f" annotations/ and {cfg.split}/?"
            )
        self.info.metadata["repairs"] = log.as_dict()
        self.info.metadata["annotation_file"] = path
        # Checked when the split is loaded: a file that appears later re-prepares it.
        self.info.metadata["missing_files"] = missing
