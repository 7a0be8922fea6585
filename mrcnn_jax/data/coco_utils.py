"""COCO-format records: the stored example layout, annotation parsing and repair, masks as
compressed RLE (images are read by `mrcnn_jax.image_io`).

Runs at dataset preparation time (plain Python, numpy, PIL, pycocotools). Bad input is repaired or
dropped and counted in a `RepairLog` (first few ids per kind, logged as one summary); only an
annotation file that is missing, unparseable or structurally wrong (no `images` / `categories` list,
a category without an integer id, the same category id twice) stops preparation, with an error that
names the file and the entry.

Stored example (`example_features`), one per image, in the order of generation:
    image       encoded 8-bit RGB JPEG or PNG bytes
    image_id    int64, the original (COCO) image id
    height, width, file_name
    objects     per instance: id, bbox [4] float32 xyxy absolute pixels (original resolution),
                label (contiguous 1..K in sorted category-id order), category_id, is_crowd,
                area, rle (COCO compressed RLE counts of the [height, width] mask)
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from pycocotools import mask as mask_utils

from mrcnn_jax import runtime

logger = logging.getLogger(__name__)

# What each kind of bad record is, and what was done about it.
REPAIR_KINDS = {
    "image_record_invalid": "image entry without an integer id or a file_name: dropped",
    "image_duplicate_id": "image id listed twice: later entry dropped",
    "image_duplicate_file": "file_name listed under two image ids: later entry dropped",
    "image_file_missing": "image file missing: image dropped",
    "image_file_unreadable": "image file cannot be decoded: image dropped",
    "image_size_missing": "image height / width missing: taken from the file",
    "image_size_mismatch": "image file size differs from its height / width: image dropped",
    "image_exif_applied": "EXIF orientation applied (as detectron2's read_image): image kept upright",
    "image_exif_ignored": "EXIF rotation not applied: the annotation's height / width are those of"
    " the stored pixels",
    "annotation_invalid": "annotation is not an object, or processing it failed: dropped",
    "annotation_unknown_image": "annotation for an unknown image id: dropped",
    "annotation_unknown_category": "annotation with an undeclared category id: dropped",
    "annotation_of_dropped_image": "annotation of a dropped image: dropped",
    "annotation_id_reassigned": "annotation id missing or duplicated: new id given",
    "polygon_too_short": "polygon of fewer than 3 points: polygon dropped",
    "polygon_malformed": "polygon of odd length, non-finite or absurd values: polygon dropped",
    "segmentation_missing": "no usable segmentation: annotation dropped",
    "rle_invalid": "RLE of the wrong size or with bad counts: annotation dropped",
    "mask_empty": "mask has no pixel inside the image: annotation dropped",
    "bbox_invalid": "bbox missing or malformed: replaced by the mask's box",
    "bbox_nonpositive_size": "bbox of zero or negative size: replaced by the mask's box",
    "bbox_partly_outside": "bbox partly outside the image: clipped",
    "bbox_wholly_outside": "bbox wholly outside the image: replaced by the mask's box",
}
MAX_LOGGED_IDS = 5


@dataclasses.dataclass
class RepairLog:
    """Counts of repaired / dropped records per kind (`REPAIR_KINDS`), first few ids of each."""

    counts: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    first_ids: dict[str, list] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def add(self, kind: str, record_id: Any) -> None:
        if kind not in REPAIR_KINDS:
            raise KeyError(f"unknown repair kind {kind!r}")
        self.counts[kind] += 1
        if len(self.first_ids[kind]) < MAX_LOGGED_IDS:
            self.first_ids[kind].append(record_id)

    def as_dict(self) -> dict[str, dict]:
        """{kind: {"count": n, "first_ids": [...]}} for the kinds that occurred (JSON-friendly)."""
        return {
            k: {"count": n, "first_ids": list(self.first_ids[k])} for k, n in self.counts.items()
        }

    def log_summary(self, source: str) -> None:
        if not self.counts:
            logger.info("%s: no bad records", source)
            return
        lines = [
            f"  {kind}: {n} ({REPAIR_KINDS[kind]}); first ids {self.first_ids[kind]}"
            for kind, n in sorted(self.counts.items())
        ]
        logger.warning("%s: repaired or dropped records\n%s", source, "\n".join(lines))


def example_features() -> tfds.features.FeaturesDict:
    """The TFDS features of one stored example (see the module docstring)."""
    scalar = tfds.features.Scalar
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_id": scalar(dtype=np.int64),
            "height": scalar(dtype=np.int32),
            "width": scalar(dtype=np.int32),
            "file_name": tfds.features.Text(),
            "objects": tfds.features.Sequence(
                {
                    "id": scalar(dtype=np.int64),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "label": scalar(dtype=np.int64),
                    "category_id": scalar(dtype=np.int64),
                    "is_crowd": scalar(dtype=np.bool_),
                    "area": scalar(dtype=np.float32),
                    "rle": tfds.features.Tensor(shape=(), dtype=np.object_),
                }
            ),
        }
    )


# ------------------------------------------------------------------------------ annotation file


class InstancesBuilder(tfds.core.GeneratorBasedBuilder):
    """What the shapes and COCO-folder builders share: the feature spec of `example_features`,
    examples kept in index order (the pipeline shuffles by index), the module docstring as the
    description. Abstract, so TFDS does not register it."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS would look the builder's file up with the `importlib_resources` backport, not a dependency.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=inspect.getmodule(type(self)).__doc__,
            features=example_features(),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )


def load_annotation_file(path: str) -> dict:
    """Reads a COCO annotation json. Missing / unparseable / no `images` or `categories`: error."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise runtime.MissingInputError(f"COCO annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise runtime.InvalidInputError(f"cannot parse COCO annotation file {path}: {e}") from e
    if not isinstance(data, dict):
        raise runtime.InvalidInputError(
            f"COCO annotation file {path}: top level is not a JSON object"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise runtime.InvalidInputError(f"COCO annotation file {path}: no {key!r} list")
    if not isinstance(data.get("annotations", []), list):
        raise runtime.InvalidInputError(f"COCO annotation file {path}: 'annotations' is not a list")
    return data


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_categories(categories: list, path: str) -> list[dict]:
    """-> [{"id", "name", "label"}] sorted by id, label = 1..K (detectron2's contiguous mapping)."""
    seen = {}
    for i, c in enumerate(categories):
        cid = c.get("id") if isinstance(c, dict) else None
        if not is_int(cid):
            raise runtime.InvalidInputError(
                f"COCO annotation file {path}: category #{i} has no integer id: {c!r}"
            )
        if cid in seen:
            raise runtime.InvalidInputError(
                f"COCO annotation file {path}: category id {cid} declared twice"
            )
        seen[cid] = str(c.get("name", cid))
    return [{"id": cid, "name": seen[cid], "label": k + 1} for k, cid in enumerate(sorted(seen))]


def index_images(images: list, log: RepairLog) -> dict[int, dict]:
    """Image entries by id (json order kept); entries without an int id / file_name are dropped,
    and the later of two entries with the same id or the same file (which would be one picture
    twice: in evaluation, its detections false positives against the copy without annotations)."""
    out, files = {}, set()
    for i, im in enumerate(images):
        iid = im.get("id") if isinstance(im, dict) else None
        if not is_int(iid) or not isinstance(im.get("file_name"), str):
            log.add("image_record_invalid", f"#{i}")
        elif iid in out:
            log.add("image_duplicate_id", iid)
        elif im["file_name"] in files:
            log.add("image_duplicate_file", iid)
        else:
            out[iid] = im
            files.add(im["file_name"])
    return out


def _member(value, ids: set) -> bool:
    """`value in ids`, False for unhashable values (a list or dict where an id belongs)."""
    try:
        return value in ids
    except TypeError:
        return False


def group_annotations(
    annotations: list, image_ids: Iterable[int], category_ids: Iterable[int], log: RepairLog
) -> dict[int, list[dict]]:
    """Annotations by image id, dropping unknown images / categories; unique annotation ids."""
    image_ids, category_ids = set(image_ids), set(category_ids)
    ids = [a.get("id") for a in annotations if isinstance(a, dict)]
    next_id = max([i for i in ids if is_int(i)], default=0) + 1
    used, out = set(), collections.defaultdict(list)
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            log.add("annotation_invalid", f"#{i}")
            continue
        aid = ann.get("id")
        if not is_int(aid) or aid in used:
            log.add("annotation_id_reassigned", aid if is_int(aid) else f"#{i}")
            ann, aid, next_id = {**ann, "id": next_id}, next_id, next_id + 1
        used.add(aid)
        if not _member(ann.get("image_id"), image_ids):
            log.add("annotation_unknown_image", aid)
        elif not _member(ann.get("category_id"), category_ids):
            log.add("annotation_unknown_category", aid)
        else:
            out[ann["image_id"]].append(ann)
    return out


# ------------------------------------------------------------------------------ masks


def rle_counts_from_string(s: bytes) -> list[int]:
    """Decodes COCO's compressed RLE string (pycocotools `rleFrString`) into run lengths.

    Each count is 1+ chars c - 48: 5 data bits each (least significant first), 0x20 = more chars
    follow, 0x10 in the last char = negative; counts[m] += counts[m - 2] for m > 2 (delta coding).
    """
    counts, x, k = [], 0, 0
    for ch in s:
        c = ch - 48
        if not 0 <= c < 64:
            raise ValueError(f"invalid RLE character {chr(ch)!r}")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if not c & 0x20:
            if c & 0x10:
                x -= 1 << (5 * k)
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
            x, k = 0, 0
    if k:
        raise ValueError("truncated RLE string")
    return counts


def _valid_counts(counts: Sequence[int], height: int, width: int) -> bool:
    return all(c >= 0 for c in counts) and sum(counts) == height * width


def _as_floats(values) -> list[float] | None:
    if not isinstance(values, list | tuple):
        return None
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _polygons_to_rle(polygons: list, height: int, width: int, aid, log: RepairLog):
    # pycocotools rasterises along the whole outline at 5x resolution: a vertex at 1e12 would
    # allocate terabytes. Real outlines stay near the image; far-off values are corrupt records.
    limit = 10.0 * max(height, width)
    good = []
    for poly in polygons:
        coords = _as_floats(poly)
        if coords is None or len(coords) % 2 or max(map(abs, coords), default=0) > limit:
            log.add("polygon_malformed", aid)
        elif len(coords) < 6:
            log.add("polygon_too_short", aid)
        else:
            good.append(coords)
    if not good:
        return None
    rles = mask_utils.frPyObjects(good, height, width)
    return mask_utils.merge(rles) if len(rles) > 1 else rles[0]


def segmentation_to_rle(segmentation, height: int, width: int, aid, log: RepairLog) -> dict | None:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE dict, or None
    (dropped and counted) when nothing usable is left."""
    if isinstance(segmentation, list):
        rle = _polygons_to_rle(segmentation, height, width, aid, log)
        if rle is None:
            log.add("segmentation_missing", aid)
        return rle
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        log.add("segmentation_missing", aid)
        return None
    counts, size = segmentation["counts"], segmentation.get("size")
    try:
        if list(size) != [height, width]:
            raise ValueError("size")
        if isinstance(counts, list):  # uncompressed RLE
            if not all(is_int(c) for c in counts) or not _valid_counts(counts, height, width):
                raise ValueError("counts")
            return mask_utils.frPyObjects(
                {"size": [height, width], "counts": counts}, height, width
            )
        counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        if not _valid_counts(rle_counts_from_string(counts), height, width):
            raise ValueError("counts")
        return {"size": [height, width], "counts": counts}
    except (TypeError, ValueError, UnicodeEncodeError):
        log.add("rle_invalid", aid)
        return None


def _repair_box(bbox, mask_box: np.ndarray, height: int, width: int, aid, log: RepairLog):
    """COCO [x, y, w, h] -> xyxy float32 inside the image, or the mask's box where unusable."""
    xywh = _as_floats(bbox)
    if xywh is None or len(xywh) != 4:
        log.add("bbox_invalid", aid)
        return mask_box
    x, y, w, h = xywh
    if w <= 0 or h <= 0:
        log.add("bbox_nonpositive_size", aid)
        return mask_box
    box = np.array([x, y, x + w, y + h], np.float64)
    clipped = np.clip(box, 0, [width, height, width, height])
    if np.array_equal(clipped, box):
        return box.astype(np.float32)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        log.add("bbox_wholly_outside", aid)
        return mask_box
    log.add("bbox_partly_outside", aid)
    return clipped.astype(np.float32)


def repair_annotation(
    ann: dict, height: int, width: int, label_of: dict[int, int], log: RepairLog
) -> dict | None:
    """One COCO annotation -> a stored instance (see `example_features`), or None when dropped."""
    aid = ann["id"]
    rle = segmentation_to_rle(ann.get("segmentation"), height, width, aid, log)
    if rle is None:
        return None
    mask_area = float(mask_utils.area(rle))
    if mask_area <= 0:
        log.add("mask_empty", aid)
        return None
    x, y, w, h = mask_utils.toBbox(rle)
    mask_box = np.array([x, y, x + w, y + h], np.float32)
    box = _repair_box(ann.get("bbox"), mask_box, height, width, aid, log)
    area = _as_floats([ann.get("area")])
    return {
        "id": aid,
        "bbox": box,
        "label": label_of[ann["category_id"]],
        "category_id": ann["category_id"],
        "is_crowd": bool(ann.get("iscrowd", 0)),
        # COCOeval buckets by the annotation's `area` (small / medium / large); keep the file's.
        "area": area[0] if area and area[0] > 0 else mask_area,
        "rle": rle["counts"],
    }


def encode_mask(mask: np.ndarray) -> bytes:
    """mask: [H, W] bool / 0-1 -> COCO compressed RLE counts."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


# ------------------------------------------------------------------------------ images


# ------------------------------------------------------------------------------ ground truth


def image_entry(ex: dict) -> dict:
    """A stored example's COCO image entry: {"id", "height", "width", "file_name"}."""
    name = ex["file_name"]
    return {
        "id": int(ex["image_id"]),
        "height": int(ex["height"]),
        "width": int(ex["width"]),
        "file_name": name.decode() if isinstance(name, bytes) else str(name),
    }


def coco_ground_truth_dict(examples: Iterable[dict], categories: list[dict]) -> dict:
    """Stored examples (numpy, as `example_features` decodes them) -> a COCO ground-truth dict at
    the original resolution with the original ids, segmentation as compressed RLE (for COCOeval)."""
    images, annotations = [], []
    for ex in examples:
        images.append(image_entry(ex))
        iid, h, w = (images[-1][k] for k in ("id", "height", "width"))
        obj = ex["objects"]
        for k in range(len(obj["id"])):
            x1, y1, x2, y2 = (float(v) for v in obj["bbox"][k])
            annotations.append(
                {
                    "id": int(obj["id"][k]),
                    "image_id": iid,
                    "category_id": int(obj["category_id"][k]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": {
                        "size": [h, w],
                        "counts": bytes(obj["rle"][k]).decode("ascii"),
                    },
                    "area": float(obj["area"][k]),
                    "iscrowd": int(obj["is_crowd"][k]),
                }
            )
    cats = [{"id": c["id"], "name": c["name"]} for c in categories]
    return {"images": images, "annotations": annotations, "categories": cats}


def _finite_floats(values, n: int) -> bool:
    floats = _as_floats(values)
    return floats is not None and len(floats) == n


def file_ground_truth(data: dict, images: list[dict], categories: list[dict], path: str) -> dict:
    """COCO ground truth for COCOeval from the annotation file itself, as detectron2's and
    torchvision's evaluators score against `COCO(json_file)`: the file's annotations of `images`
    (the evaluated ones, [{"id", "height", "width", "file_name"}] as prepared), unrepaired.

    Left out, with a warning naming them: annotations pycocotools cannot score (not an object,
    no integer id, a bbox that is not 4 finite numbers, a segmentation it cannot convert);
    annotations of undeclared categories are left out silently (COCOeval ignores them). A
    missing or non-finite `area` (COCOeval buckets by it) is the segmentation's area."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    declared = {c["id"] for c in categories}
    annotations, left_out, area_filled = [], [], []
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or not _member(ann.get("image_id"), sizes.keys()):
            continue
        aid = ann.get("id")
        if not is_int(aid):
            left_out.append(f"#{i}")
            continue
        if not _member(ann.get("category_id"), declared):
            continue
        h, w = sizes[ann["image_id"]]
        try:
            if not _finite_floats(ann.get("bbox"), 4):
                raise ValueError("bbox")
            segmentation = ann.get("segmentation")
            if isinstance(segmentation, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
            elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
                rle = mask_utils.frPyObjects(segmentation, h, w)
            elif isinstance(segmentation, dict):
                rle = segmentation
            else:
                raise ValueError("segmentation")
            mask_area = float(mask_utils.area(rle))
        except Exception:  # noqa: BLE001 - whatever pycocotools raises on this record
            left_out.append(aid)
            continue
        ann = dict(ann)
        if not _finite_floats([ann.get("area")], 1):
            ann["area"] = mask_area
            area_filled.append(aid)
        annotations.append(ann)
    if left_out:
        logger.warning(
            "%s: %d annotations of the evaluated images left out of the ground truth (pycocotools"
            " cannot score them); first ids %s", path, len(left_out), left_out[:MAX_LOGGED_IDS],
        )
    if area_filled:
        logger.warning(
            "%s: %d annotations without a finite area scored with their mask's; first ids %s",
            path, len(area_filled), area_filled[:MAX_LOGGED_IDS],
        )
    cats = [{"id": c["id"], "name": c["name"]} for c in categories]
    return {"images": [dict(im) for im in images], "annotations": annotations, "categories": cats}
