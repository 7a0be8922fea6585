"""The synthetic `shapes` dataset: rendering properties and the TFDS builder."""

import io
import os

import numpy as np
import PIL.Image
from pycocotools import mask as mask_utils

from mrcnn_jax.data import shapes


def _renders(n, size=128):
    return [shapes.render(np.random.default_rng([5, i]), size) for i in range(n)]


def test_masks_are_disjoint_visible_and_painted_in_one_colour():
    for image, labels, masks in _renders(60):
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        assert len(labels) == len(masks) <= shapes.MAX_SHAPES
        assert all(1 <= label <= 3 for label in labels)
        if masks:
            assert np.stack(masks).sum(0).max() <= 1  # occluded pixels belong to the top shape only
        for m in masks:
            assert m.sum() >= shapes.MIN_VISIBLE_PIXELS
            # Inside a visible mask only the shape's flat colour plus pixel noise (sigma <= 12):
            # a pixel of another shape or of the background would blow this up.
            assert image[m].astype(np.float64).std(axis=0).max() < 16


def test_sizes_classes_and_empty_images_vary():
    extents, labels, empty = [], set(), 0
    for _, ls, masks in _renders(200):
        labels.update(ls)
        empty += not masks
        for m in masks:
            ys, xs = np.nonzero(m)
            extents.append(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
    assert labels == {1, 2, 3}
    assert min(extents) < 20 and max(extents) > 50
    assert 2 <= empty <= 25  # about 5% of 200


def test_examples_are_deterministic_with_exact_boxes_areas_and_rles():
    a = shapes.make_example(0, "train", 3, 64)
    b = shapes.make_example(0, "train", 3, 64)
    c = shapes.make_example(0, "validation", 3, 64)
    assert a["image"] == b["image"] and a["image"] != c["image"]
    assert a["image_id"] == 4
    image = np.asarray(PIL.Image.open(io.BytesIO(a["image"])))
    _, _, masks = shapes.render(np.random.default_rng([0, 0, 3]), 64)
    assert image.shape == (64, 64, 3)
    obj = a["objects"]
    assert len(obj["rle"]) == len(masks)
    for k, m in enumerate(masks):
        decoded = mask_utils.decode({"size": [64, 64], "counts": obj["rle"][k]})
        np.testing.assert_array_equal(decoded, m)
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(
            obj["bbox"][k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        )
        assert obj["area"][k] == m.sum() and not obj["is_crowd"][k]


def test_builder_prepares_both_splits_in_index_order(tmp_path):
    builder = shapes.Shapes(
        config=shapes.shapes_config(32, 6, 3), data_dir=str(tmp_path), file_format="array_record"
    )
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 6
    assert builder.info.splits["validation"].num_examples == 3
    meta = builder.info.metadata
    assert [c["name"] for c in meta["categories"]] == ["circle", "square", "triangle"]
    source = builder.as_data_source(split="validation")
    for i in range(3):
        expected = shapes.make_example(0, "validation", i, 32)
        assert source[i]["image"] == expected["image"] and source[i]["image_id"] == i + 1
        assert meta["num_instances"]["validation"][i] == len(expected["objects"]["id"])
    # Other sizes are other builder configs: they do not collide in the cache.
    other = shapes.Shapes(config=shapes.shapes_config(32, 4, 2), data_dir=str(tmp_path))
    assert other.data_dir != builder.data_dir and not os.path.exists(other.data_dir)
