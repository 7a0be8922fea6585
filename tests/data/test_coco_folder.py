"""A tiny COCO-format folder written here (every annotation form, every image mode, one of each bad
record), prepared by the `coco_folder` builder and read back through the pipeline; the decoded
instances are checked against the source annotations."""

import json
import logging
import os

import numpy as np
import PIL.Image
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import base
from mrcnn_jax import runtime
from mrcnn_jax.data import coco_folder, coco_utils, pipeline
from tests.data import reference

H, W = 40, 56
SPLIT = "tiny"
CATEGORIES = [{"id": 12, "name": "cat_c"}, {"id": 3, "name": "cat_a"}, {"id": 7, "name": "cat_b"}]
LABEL = {3: 1, 7: 2, 12: 3}  # sorted category ids -> 1..K


def _rect(x1, y1, x2, y2):
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def _rle_runs(mask):
    flat = mask.T.reshape(-1).astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0] + runs


def _block(y1, y2, x1, x2, h=H, w=W):
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _images(rng):
    """file name -> (PIL image to write, the RGB pixels expected after conversion)."""
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    palette = PIL.Image.fromarray(rgb).quantize(colors=12)
    smooth = np.repeat(np.repeat(rgb[::8, ::8], 8, 0), 8, 1)[:H, :W]  # JPEG-friendly blocks
    out = {
        "rgb.png": (PIL.Image.fromarray(rgb), rgb),
        "photo.jpg": (PIL.Image.fromarray(smooth), None),  # expected: whatever PIL decodes
        "gray.png": (PIL.Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1)),
        "rgba.png": (PIL.Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"), rgb),
        "palette.png": (palette, np.asarray(palette.convert("RGB"))),
        "gray16.png": (
            PIL.Image.fromarray(g16),
            np.repeat(np.round(g16 / 257).astype(np.uint8)[..., None], 3, -1),
        ),
        "empty.png": (PIL.Image.fromarray(rgb[::-1].copy()), rgb[::-1]),
        "crowd_only.png": (PIL.Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1)),
        "nosize.png": (PIL.Image.fromarray(rgb[:, ::-1].copy()), rgb[:, ::-1]),
        "wrongsize.png": (PIL.Image.fromarray(rgb[:30, :30].copy()), None),
    }
    return out


def write_folder(root, rng):
    """Writes ROOT/annotations/instances_tiny.json and ROOT/tiny/*; returns (expected images by id,
    expected instances by annotation id: (image id, category id, crowd, mask [H, W], box xyxy))."""
    (root / "annotations").mkdir(parents=True)
    (root / SPLIT).mkdir()
    images = _images(rng)
    for name, (im, _) in images.items():
        im.save(root / SPLIT / name)
    (root / SPLIT / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    names = [
        "rgb.png",
        "photo.jpg",
        "gray.png",
        "rgba.png",
        "palette.png",
        "gray16.png",
        "empty.png",
    ]
    names += ["crowd_only.png", "missing.png", "broken.jpg", "nosize.png", "wrongsize.png"]
    entries = [
        {"id": 101 + k, "file_name": n, "height": H, "width": W} for k, n in enumerate(names)
    ]
    entries[10] = {"id": 111, "file_name": "nosize.png"}  # size taken from the file
    entries += [{"id": 101, "file_name": "rgb.png"}, {"id": 500}]  # duplicate id; no file_name

    tri = [10.0, 5.0, 30.0, 5.0, 20.0, 25.0]
    two = [_rect(2, 2, 12, 10), _rect(30, 20, 50, 35)]
    m3, m4, m13 = _block(5, 30, 8, 40), _block(0, 12, 20, 56), _block(10, 40, 0, 25)
    crowd_rle = {"size": [H, W], "counts": _rle_runs(m13)}
    comp4 = mask_utils.encode(np.asfortranarray(m4))["counts"].decode()
    anns = [
        (1, 101, 3, {"segmentation": [tri], "bbox": [10, 5, 20, 20]}),
        (2, 101, 7, {"segmentation": two, "bbox": [2, 2, 48, 33]}),
        (
            3,
            102,
            12,
            {"segmentation": {"size": [H, W], "counts": _rle_runs(m3)}, "bbox": [8, 5, 32, 25]},
        ),
        (4, 103, 3, {"segmentation": {"size": [H, W], "counts": comp4}, "bbox": [20, 0, 36, 12]}),
        (5, 104, 7, {"segmentation": [_rect(5, 5, 15, 20)], "bbox": [5, 5, 0, 15]}),  # zero width
        (
            6,
            104,
            12,
            {"segmentation": [_rect(20, 10, 45, 30)], "bbox": [20, 10, 25, -3]},
        ),  # negative
        (
            7,
            105,
            3,
            {"segmentation": [_rect(40, 30, 70, 50)], "bbox": [40, 30, 30, 20]},
        ),  # partly out
        (8, 105, 7, {"segmentation": [_rect(3, 3, 9, 9)], "bbox": [100, 100, 5, 5]}),  # wholly out
        (
            9,
            106,
            12,
            {"segmentation": [[1, 1, 4, 4], _rect(10, 10, 20, 30)], "bbox": [10, 10, 10, 20]},
        ),
        (
            10,
            106,
            3,
            {"segmentation": [[1, 1, 4, 4]], "bbox": [1, 1, 3, 3]},
        ),  # nothing left: dropped
        (11, 101, 99, {"segmentation": [tri], "bbox": [10, 5, 20, 20]}),  # undeclared category
        (12, 999, 3, {"segmentation": [tri], "bbox": [10, 5, 20, 20]}),  # unknown image
        (13, 108, 3, {"segmentation": crowd_rle, "bbox": [0, 10, 25, 30], "iscrowd": 1}),
        (14, 109, 3, {"segmentation": [tri], "bbox": [10, 5, 20, 20]}),  # image file missing
        (15, 111, 7, {"segmentation": [_rect(1, 1, 50, 39)], "bbox": [1, 1, 49, 38]}),
        (16, 112, 7, {"segmentation": [tri], "bbox": [10, 5, 20, 20]}),  # image size mismatch
        (17, 103, 12, {"segmentation": [_rect(60, 50, 80, 70)], "bbox": [60, 50, 20, 20]}),  # empty
    ]
    data = {
        "images": entries,
        "categories": CATEGORIES,
        "annotations": [
            {"id": a, "image_id": i, "category_id": c, "iscrowd": 0, "area": 50.0 + a, **extra}
            for a, i, c, extra in anns
        ],
    }
    (root / "annotations" / f"instances_{SPLIT}.json").write_text(json.dumps(data))

    def poly_mask(polys):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, H, W)))

    def box_of(m):
        ys, xs = np.nonzero(m)
        return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

    expected = {
        1: (101, 3, False, poly_mask([tri]), [10, 5, 30, 25]),
        2: (101, 7, False, poly_mask(two), [2, 2, 50, 35]),
        3: (102, 12, False, m3, [8, 5, 40, 30]),
        4: (103, 3, False, m4, [20, 0, 56, 12]),
        5: (104, 7, False, poly_mask([_rect(5, 5, 15, 20)]), None),  # box from the mask
        6: (104, 12, False, poly_mask([_rect(20, 10, 45, 30)]), None),
        7: (105, 3, False, poly_mask([_rect(40, 30, 70, 50)]), [40, 30, 56, 40]),  # clipped
        8: (105, 7, False, poly_mask([_rect(3, 3, 9, 9)]), None),
        9: (106, 12, False, poly_mask([_rect(10, 10, 20, 30)]), [10, 10, 20, 30]),
        13: (108, 3, True, m13, [0, 10, 25, 40]),
        15: (111, 7, False, poly_mask([_rect(1, 1, 50, 39)]), [1, 1, 50, 39]),
    }
    expected = {
        a: (i, c, crowd, m, box if box is not None else box_of(m))
        for a, (i, c, crowd, m, box) in expected.items()
    }
    by_id = {101 + k: images[n][1] for k, n in enumerate(names) if n in images}
    with PIL.Image.open(root / SPLIT / "photo.jpg") as jpg:
        by_id[102] = np.asarray(jpg.convert("RGB"))
    return by_id, expected


EXPECTED_REPAIRS = {
    "image_duplicate_id": {"count": 1, "first_ids": [101]},
    "image_record_invalid": {"count": 1, "first_ids": ["#13"]},
    "image_file_missing": {"count": 1, "first_ids": [109]},
    "image_file_unreadable": {"count": 1, "first_ids": [110]},
    "image_size_missing": {"count": 1, "first_ids": [111]},
    "image_size_mismatch": {"count": 1, "first_ids": [112]},
    "annotation_unknown_category": {"count": 1, "first_ids": [11]},
    "annotation_unknown_image": {"count": 1, "first_ids": [12]},
    "annotation_of_dropped_image": {"count": 2, "first_ids": [14, 16]},
    "bbox_nonpositive_size": {"count": 2, "first_ids": [5, 6]},
    "bbox_partly_outside": {"count": 1, "first_ids": [7]},
    "bbox_wholly_outside": {"count": 1, "first_ids": [8]},
    "polygon_too_short": {"count": 2, "first_ids": [9, 10]},
    "segmentation_missing": {"count": 1, "first_ids": [10]},
    "mask_empty": {"count": 1, "first_ids": [17]},
}
STORED_IDS = [101, 102, 103, 104, 105, 106, 107, 108, 111]


def _config(root, data_dir):
    c = base.get_config()
    d = c.data
    d.dataset, d.root, d.data_dir, d.num_classes = "coco_folder", str(root), str(data_dir), 3
    d.train_split = d.eval_split = SPLIT
    d.image_size = (64, 64)
    d.train_min_sizes, d.train_max_size = (20,), 64  # scale 0.5
    d.test_min_size, d.test_max_size = H, 64  # scale 1: pixels compare exactly
    d.pixel_mean, d.pixel_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    d.max_instances, d.mask_crop_size = 4, 12
    c.train.global_batch_size = 3
    c.eval.batch_size = 4
    return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images, instances = write_folder(root, np.random.default_rng(0))
    config = _config(root, tmp_path_factory.mktemp("tfds"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(f"mrcnn_jax.data.{m}") for m in ("coco_utils", "coco_folder")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        split = pipeline._split(config.data, SPLIT)  # prepares the dataset
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return config, split, images, instances, "\n".join(r.getMessage() for r in records)


def test_bad_records_are_counted_and_logged(prepared):
    _, split, _, _, log_text = prepared
    assert split.builder.info.metadata["repairs"] == EXPECTED_REPAIRS
    for kind, v in EXPECTED_REPAIRS.items():
        assert f"{kind}: {v['count']}" in log_text and str(v["first_ids"]) in log_text
    assert "instances_tiny.json" in log_text
    # Dropped images are named by file too, with what was wrong.
    assert "image 109, missing.png: image file missing" in log_text
    assert "image 110, broken.jpg: image file cannot be decoded" in log_text
    assert f"image 112, wrongsize.png: {coco_utils.REPAIR_KINDS['image_size_mismatch']}" in log_text
    assert f"(declared {H} x {W}, the file is 30 x 30)" in log_text


def test_ground_truth_matches_the_source_annotations(prepared):
    config, _, _, instances, _ = prepared
    config = config.copy_and_resolve_references()
    config.eval.ground_truth = "prepared"
    gt = pipeline.coco_ground_truth(config)
    assert [im["id"] for im in gt["images"]] == STORED_IDS
    assert all((im["height"], im["width"]) == (H, W) for im in gt["images"])
    assert sorted(c["id"] for c in gt["categories"]) == [3, 7, 12]
    anns = {a["id"]: a for a in gt["annotations"]}
    assert sorted(anns) == sorted(instances)
    for aid, (iid, cat, crowd, mask, box) in instances.items():
        a = anns[aid]
        assert (a["image_id"], a["category_id"], a["iscrowd"]) == (iid, cat, int(crowd))
        np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]), mask)  # pixel for pixel
        x1, y1, x2, y2 = box
        assert a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert a["area"] == 50.0 + aid  # the file's area is kept (COCOeval buckets by it)
    # The ground truth feeds COCOeval: scoring it against itself gives AP 1.
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    dets = [{**a, "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]
    ev = COCOeval(coco, coco.loadRes(dets), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_ground_truth_from_the_file_is_what_pycocotools_scores(prepared, caplog):
    """eval.ground_truth="file" (the default): the file's own annotations of the evaluated images,
    unrepaired, as detectron2 / torchvision score against COCO(json); only those pycocotools
    cannot read are left out, by name, and COCOeval runs on the rest."""
    config, _, _, _, _ = prepared
    assert config.eval.ground_truth == "file"
    with caplog.at_level(logging.WARNING, logger="mrcnn_jax.data.coco_utils"):
        gt = pipeline.coco_ground_truth(config)
    assert [im["id"] for im in gt["images"]] == STORED_IDS
    path = os.path.join(config.data.root, "annotations", f"instances_{SPLIT}.json")
    with open(path) as f:
        source = {a["id"]: a for a in json.load(f)["annotations"]}
    # Of the stored images' annotations: 11 has an undeclared category (COCOeval would ignore
    # it); 9 and 10 hold a 4-number polygon, which pycocotools' frPyObjects refuses.
    want = [1, 2, 3, 4, 5, 6, 7, 8, 13, 15, 17]
    assert sorted(a["id"] for a in gt["annotations"]) == want
    for a in gt["annotations"]:
        assert a == source[a["id"]]  # untouched: boxes not clipped, empty masks kept
    assert "2 annotations of the evaluated images left out" in caplog.text
    assert "[9, 10]" in caplog.text and "instances_tiny.json" in caplog.text
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "segmentation": coco.annToRLE(a), "score": 1.0}
        for a in gt["annotations"] if not a["iscrowd"]
    ]
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), iou_type)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert ev.stats[0] > 0.5


def _instances_of(instances, image_id):
    return [(aid, v) for aid, v in sorted(instances.items()) if v[0] == image_id]


def test_eval_batches_decode_images_and_instances(prepared):
    config, _, images, instances, _ = prepared
    d = config.data
    batches = list(pipeline.eval_batches(config, process_index=0, process_count=1))
    assert len(batches) == 3 and sum(b["example_valid"].sum() for b in batches) == len(STORED_IDS)
    seen = []
    for b in batches:
        for i in np.flatnonzero(b["example_valid"]):
            iid = int(b["image_ids"][i])
            seen.append(iid)
            assert (b["scales"][i] == 1).all() and tuple(b["image_sizes"][i]) == (H, W)
            # The JPEG (102) too: decoded as PIL decodes it (pipeline.decode_rgb).
            np.testing.assert_array_equal(b["images"][i][:H, :W], images[iid], err_msg=str(iid))
            inst = _instances_of(instances, iid)
            inst = [x for x in inst if not x[1][2]] + [x for x in inst if x[1][2]]  # crowd last
            assert b["gt_valid"][i].sum() == len(inst)
            for k, (_, (_, cat, crowd, mask, box)) in enumerate(inst):
                assert b["gt_classes"][i][k] == LABEL[cat] and b["gt_is_crowd"][i][k] == crowd
                np.testing.assert_allclose(b["gt_boxes"][i][k], box, atol=1e-4)
                np.testing.assert_array_equal(
                    b["gt_masks"][i][k], reference.crop(mask, box, d.mask_crop_size)
                )
    assert seen == STORED_IDS


def test_train_batches_resize_and_flip_boxes_and_skip_empty_images(prepared):
    config, split, _, instances, _ = prepared
    d = config.data
    source = split.builder.as_data_source(split=split.name)
    stored = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
    it = pipeline.train_batches(config, process_index=0, process_count=1)
    flips, ids = set(), []
    for _ in range(7):  # 21 examples: three epochs of the 7 usable images
        b = next(it)
        for i in range(3):
            iid = int(b["image_ids"][i])
            ids.append(iid)
            flip, _ = reference.check_element(
                b, i, stored[iid], d, [(f, 20, 64) for f in (False, True)], atol=3.0
            )
            flips.add(flip)
            for k, (_, (_, _, _, _, box)) in enumerate(_instances_of(instances, iid)):
                x1, y1, x2, y2 = box
                if flip:
                    x1, x2 = W - x2, W - x1
                np.testing.assert_allclose(
                    b["gt_boxes"][i][k], np.array([x1, y1, x2, y2]) * 0.5, atol=1e-4
                )
    assert flips == {False, True}
    assert sorted(set(ids)) == [
        101,
        102,
        103,
        104,
        105,
        106,
        111,
    ]  # no 107 (empty), 108 (crowd only)
    keep_all = config.copy_and_resolve_references()
    keep_all.data.skip_empty_train = False
    it = pipeline.train_batches(keep_all, process_index=0, process_count=1)
    assert set(np.concatenate([next(it)["image_ids"] for _ in range(3)])) == set(STORED_IDS)


def test_dataset_info_maps_labels_to_category_ids(prepared):
    info = pipeline.dataset_info(prepared[0])
    assert info.class_names == ("background", "cat_a", "cat_b", "cat_c")
    assert info.label_to_category_id == {1: 3, 2: 7, 3: 12}
    assert (info.num_train, info.num_eval) == (7, 9)


def test_unrecoverable_annotation_files_stop_with_the_file_name(prepared, tmp_path):
    config = prepared[0].copy_and_resolve_references()
    with pytest.raises(FileNotFoundError, match="instances_nope.json"):
        pipeline.eval_batches(config, "nope", process_index=0, process_count=1)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_broken.json").write_text("{oops")
    config.data.root = str(tmp_path)
    with pytest.raises(ValueError, match="instances_broken.json"):
        pipeline.eval_batches(config, "broken", process_index=0, process_count=1)
    config.data.root = ""
    with pytest.raises(ValueError, match="config.data.root"):
        pipeline.eval_batches(config, process_index=0, process_count=1)


def test_changed_annotation_file_is_a_new_builder_config(tmp_path):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_x.json"
    path.write_text(json.dumps({"images": [], "categories": []}))
    first = coco_folder.coco_folder_config(str(tmp_path), "x").name
    path.write_text(json.dumps({"images": [], "categories": [{"id": 1}]}))
    assert coco_folder.coco_folder_config(str(tmp_path), "x").name != first


def test_a_record_that_fails_unexpectedly_is_dropped_not_fatal():
    from mrcnn_jax.data import coco_utils

    log = coco_utils.RepairLog()
    meta = {"id": 1, "file_name": "a.png", "height": 4, "width": 4}
    good = {"id": 1, "category_id": 3, "segmentation": [_rect(0, 0, 3, 3)], "bbox": [0, 0, 3, 3]}
    odd = {**good, "id": 2, "category_id": 5}  # no label: repair_annotation raises KeyError
    ex = coco_folder.build_example(meta, [good, odd], (b"png", 4, 4, None), {3: 1}, log)
    assert ex["objects"]["id"] == [1] and log.as_dict() == {
        "annotation_invalid": {"count": 1, "first_ids": [2]}
    }


def _small_folder(root, files, split="s"):
    """ROOT/annotations/instances_{split}.json with one 8 x 8 image per name (the files in
    `files` written), one box instance each."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    names = ["a.png", "b.png", "c.png"]
    for name in files:
        PIL.Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / split / name)
    data = {
        "images": [{"id": i + 1, "file_name": n, "height": 8, "width": 8}
                   for i, n in enumerate(names)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 4, 4],
             "segmentation": [_rect(1, 1, 5, 5)], "area": 16, "iscrowd": 0}
            for i in range(len(names))
        ],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_images_missing_at_preparation_are_picked_up_once_they_exist(tmp_path):
    root = tmp_path / "coco"
    _small_folder(root, ["a.png"])
    config = _config(root, tmp_path / "tfds")
    config.data.num_classes, config.data.train_split, config.data.eval_split = 1, "s", "s"
    src = pipeline._Source.of(config.data, "s")
    first = pipeline._load_split(src)
    assert first.num_examples == 1  # b, c missing: left out
    pipeline._load_split.cache_clear()
    assert pipeline._load_split(src).num_examples == 1  # still missing: the prepared split is kept
    _small_folder(root, ["b.png", "c.png"])  # the copy finished; same annotation file
    pipeline._load_split.cache_clear()
    split = pipeline._load_split(src)
    assert split.num_examples == 3
    assert split.builder.info.metadata["missing_files"] == []
    # Prepared beside the old one, which a running job may still be reading: nothing deleted.
    assert split.builder.data_dir != first.builder.data_dir
    assert len(first.builder.as_data_source(split=first.name)) == 1
    pipeline._load_split.cache_clear()
    assert pipeline._load_split(src).builder.data_dir == split.builder.data_dir  # and reused


def test_a_folder_without_usable_images_names_it(tmp_path):
    root = tmp_path / "coco"
    _small_folder(root, [])
    config = _config(root, tmp_path / "tfds")
    config.data.num_classes = 1
    with pytest.raises(runtime.InvalidInputError,
                       match=r"none of its 3 images could be used from .*coco/s"):
        pipeline._load_split(pipeline._Source.of(config.data, "s"))


def test_a_root_with_a_tilde_is_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _small_folder(tmp_path / "coco", ["a.png", "b.png", "c.png"])
    config = _config("~/coco", tmp_path / "tfds")
    config.data.num_classes, config.data.train_split, config.data.eval_split = 1, "s", "s"
    info = pipeline.dataset_info(config)
    assert (info.num_train, info.num_eval) == (3, 3)  # the train split was found through "~"
