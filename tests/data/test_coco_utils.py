"""Annotation parsing / repair and image conversion (no TFDS preparation here)."""

import io
import json

import numpy as np
import PIL.Image
import pytest
from pycocotools import mask as mask_utils

from mrcnn_jax import image_io, runtime
from mrcnn_jax.data import coco_utils

H, W = 20, 30


def _decode(counts, h=H, w=W):
    return mask_utils.decode({"size": [h, w], "counts": counts})


def _repair(ann, label_of=None):
    log = coco_utils.RepairLog()
    ann = {"id": 7, "category_id": 3, **ann}
    return coco_utils.repair_annotation(ann, H, W, label_of or {3: 1}, log), log


def _rect_polygon(x1, y1, x2, y2):
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def test_polygons_are_rasterised_and_merged_like_pycocotools():
    polys = [_rect_polygon(2, 3, 10, 8), _rect_polygon(15, 10, 25, 18)]
    inst, log = _repair({"segmentation": polys, "bbox": [2, 3, 23, 15], "area": 123.0})
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, H, W)))
    np.testing.assert_array_equal(_decode(inst["rle"]), expected)
    np.testing.assert_allclose(inst["bbox"], [2, 3, 25, 18])
    assert inst["area"] == 123.0 and inst["label"] == 1 and not inst["is_crowd"]
    assert not log.counts


def test_uncompressed_and_compressed_rle_and_crowd():
    mask = np.zeros((H, W), np.uint8)
    mask[4:9, 6:20] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    uncompressed = {"size": [H, W], "counts": _runs(mask)}
    for seg in (uncompressed, {"size": [H, W], "counts": compressed["counts"].decode()}):
        inst, log = _repair({"segmentation": seg, "bbox": [6, 4, 14, 5], "iscrowd": 1})
        np.testing.assert_array_equal(_decode(inst["rle"]), mask)
        assert inst["is_crowd"] and inst["area"] == mask.sum() and not log.counts


def _runs(mask):
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0] + runs


@pytest.mark.parametrize(
    "bbox, kind, expected",
    [
        ([2, 3, 0, 5], "bbox_nonpositive_size", [2, 3, 10, 8]),
        ([2, 3, 8, -1], "bbox_nonpositive_size", [2, 3, 10, 8]),
        ([-4, 1, 10, 30], "bbox_partly_outside", [0, 1, 6, 20]),
        ([40, 50, 5, 5], "bbox_wholly_outside", [2, 3, 10, 8]),
        (None, "bbox_invalid", [2, 3, 10, 8]),
        ([1, 2, "x", 4], "bbox_invalid", [2, 3, 10, 8]),
    ],
)
def test_bad_boxes_are_repaired(bbox, kind, expected):
    inst, log = _repair({"segmentation": [_rect_polygon(2, 3, 10, 8)], "bbox": bbox})
    np.testing.assert_allclose(inst["bbox"], expected)
    assert dict(log.counts) == {kind: 1} and log.first_ids[kind] == [7]


def test_short_polygons_are_dropped_and_counted():
    inst, log = _repair(
        {"segmentation": [[1, 1, 5, 5], _rect_polygon(2, 3, 10, 8)], "bbox": [2, 3, 8, 5]}
    )
    assert inst is not None and dict(log.counts) == {"polygon_too_short": 1}
    inst, log = _repair({"segmentation": [[1, 1, 5, 5, 6]], "bbox": [2, 3, 8, 5]})
    assert inst is None
    assert dict(log.counts) == {"polygon_malformed": 1, "segmentation_missing": 1}
    far = [1, 1, 5, 5, 1e12, 3]  # would make pycocotools allocate terabytes
    inst, log = _repair({"segmentation": [far, _rect_polygon(2, 3, 10, 8)], "bbox": [2, 3, 8, 5]})
    assert inst is not None and dict(log.counts) == {"polygon_malformed": 1}


@pytest.mark.parametrize(
    "seg, kind",
    [
        ({"size": [H + 1, W], "counts": [H * W + W]}, "rle_invalid"),
        ({"size": [H, W], "counts": [5, 6]}, "rle_invalid"),
        ({"size": [H, W], "counts": "!!"}, "rle_invalid"),
        (None, "segmentation_missing"),
        ([_rect_polygon(40, 40, 50, 50)], "mask_empty"),  # wholly outside the image
    ],
)
def test_unusable_segmentations_drop_the_annotation(seg, kind):
    inst, log = _repair({"segmentation": seg, "bbox": [1, 1, 4, 4]})
    assert inst is None and dict(log.counts) == {kind: 1}


def test_group_annotations_drops_unknown_ids_and_fixes_annotation_ids():
    log = coco_utils.RepairLog()
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3},
        {"id": 1, "image_id": 10, "category_id": 3},  # duplicate id -> new id 6
        {"image_id": 11, "category_id": 4},  # no id -> new id 7
        {"id": 4, "image_id": 99, "category_id": 3},  # unknown image
        {"id": 5, "image_id": 10, "category_id": 8},  # undeclared category
        "not an annotation",
        {"id": 2, "image_id": [10], "category_id": 3},  # unhashable ids: dropped, not a crash
        {"id": 3, "image_id": 10, "category_id": {"id": 3}},
    ]
    out = coco_utils.group_annotations(anns, [10, 11], [3, 4], log)
    assert [a["id"] for a in out[10]] == [1, 6] and [a["id"] for a in out[11]] == [7]
    assert log.as_dict() == {
        "annotation_id_reassigned": {"count": 2, "first_ids": [1, "#2"]},
        "annotation_unknown_image": {"count": 2, "first_ids": [4, 2]},
        "annotation_unknown_category": {"count": 2, "first_ids": [5, 3]},
        "annotation_invalid": {"count": 1, "first_ids": ["#5"]},
    }


def test_categories_are_mapped_to_contiguous_labels_in_id_order():
    cats = coco_utils.parse_categories(
        [{"id": 12, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7}], "f"
    )
    assert cats == [
        {"id": 3, "name": "a", "label": 1},
        {"id": 7, "name": "7", "label": 2},
        {"id": 12, "name": "c", "label": 3},
    ]
    with pytest.raises(runtime.InvalidInputError, match="f: category id 3 declared twice"):
        coco_utils.parse_categories([{"id": 3}, {"id": 3}], "f")
    with pytest.raises(runtime.InvalidInputError, match="category #0 has no integer id"):
        coco_utils.parse_categories([{"name": "x"}], "f")


def test_index_images_drops_bad_and_duplicate_entries():
    log = coco_utils.RepairLog()
    images = [
        {"id": 1, "file_name": "a"},
        {"id": 1, "file_name": "b"},
        {"file_name": "c"},
        {"id": 2},
        {"id": 3, "file_name": "a"},  # the same picture under another id
        {"id": 4, "file_name": "b"},
    ]
    assert list(coco_utils.index_images(images, log)) == [1, 4]
    assert dict(log.counts) == {
        "image_duplicate_id": 1, "image_record_invalid": 2, "image_duplicate_file": 1
    }
    assert log.first_ids["image_duplicate_file"] == [3]


def test_annotation_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_utils.load_annotation_file(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse.*bad.json"):
        coco_utils.load_annotation_file(str(bad))
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"categories": []}))
    with pytest.raises(ValueError, match="no_images.json: no 'images' list"):
        coco_utils.load_annotation_file(str(no_images))


def test_repair_log_keeps_the_first_ids_and_logs_a_summary(caplog):
    log = coco_utils.RepairLog()
    for i in range(8):
        log.add("image_file_missing", i)
    assert log.as_dict() == {"image_file_missing": {"count": 8, "first_ids": [0, 1, 2, 3, 4]}}
    with caplog.at_level("WARNING"):
        log.log_summary("ann.json")
    assert "ann.json" in caplog.text and "image_file_missing: 8" in caplog.text
    with pytest.raises(KeyError):
        log.add("no_such_kind", 1)


def _save(image: PIL.Image.Image, path, fmt="PNG"):
    image.save(path, format=fmt)
    return str(path)


def _decoded(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_read_image_converts_every_mode_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (6, 9, 1), dtype=np.uint8)], axis=-1)
    cases = {
        "gray": (PIL.Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1)),
        "rgba": (PIL.Image.fromarray(rgba, "RGBA"), rgb),
        "rgb": (PIL.Image.fromarray(rgb, "RGB"), rgb),
    }
    palette = PIL.Image.fromarray(rgb).quantize(colors=16)
    cases["palette"] = (palette, np.asarray(palette.convert("RGB")))
    g16 = rng.integers(0, 65536, (6, 9), dtype=np.uint16)
    cases["gray16"] = (
        PIL.Image.fromarray(g16),
        np.repeat(np.round(g16 / 257.0).astype(np.uint8)[..., None], 3, -1),
    )
    for name, (image, expected) in cases.items():
        data, h, w, exif = image_io.read_image(_save(image, tmp_path / f"{name}.png"))
        assert exif is None
        assert (h, w) == (6, 9), name
        np.testing.assert_array_equal(_decoded(data), expected, err_msg=name)


def test_read_image_keeps_rgb_jpeg_bytes_and_fails_on_bad_files(tmp_path):
    path = _save(PIL.Image.new("RGB", (8, 5), (10, 200, 30)), tmp_path / "a.jpg", "JPEG")
    data, h, w, exif = image_io.read_image(path)
    assert data == open(path, "rb").read() and (h, w) == (5, 8) and exif is None
    garbage = tmp_path / "bad.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(Exception):  # noqa: B017 - PIL's error type depends on the corruption
        image_io.read_image(str(garbage))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(path, "rb").read()[:-40])
    with pytest.raises(OSError):
        image_io.read_image(str(truncated))
    with pytest.raises(FileNotFoundError):
        image_io.read_image(str(tmp_path / "missing.jpg"))


def test_ground_truth_dict_restores_coco_fields():
    rle = coco_utils.encode_mask(np.eye(4, dtype=bool))
    ex = {
        "image_id": 42,
        "height": 4,
        "width": 4,
        "file_name": b"x.png",
        "objects": {
            "id": [9],
            "bbox": np.array([[0.0, 0.0, 4.0, 4.0]], np.float32),
            "category_id": [12],
            "is_crowd": [True],
            "area": [4.0],
            "rle": [rle],
        },
    }
    gt = coco_utils.coco_ground_truth_dict([ex], [{"id": 12, "name": "c"}])
    assert gt["images"] == [{"id": 42, "height": 4, "width": 4, "file_name": "x.png"}]
    (ann,) = gt["annotations"]
    assert ann["bbox"] == [0.0, 0.0, 4.0, 4.0] and ann["iscrowd"] == 1 and ann["category_id"] == 12
    np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]), np.eye(4))
