"""TF per-example ops against numpy / pycocotools references."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from mrcnn_jax.data import coco_utils, transforms
from tests.data import reference

INT64_MAX = np.iinfo(np.int64).max


def _encode(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


@st.composite
def _masks(draw, max_side=24):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["random", "rect", "empty", "full"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if kind == "random":
        return rng.random((h, w)) < draw(st.floats(0.05, 0.95))
    if kind == "rect":
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0 : rng.integers(y0, h) + 1, x0 : rng.integers(x0, w) + 1] = True
        return m
    return np.full((h, w), kind == "full")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_masks(), min_size=1, max_size=4))
def test_rle_run_ends_match_the_mask_runs(masks):
    ends = transforms.rle_run_ends(tf.constant([_encode(m) for m in masks])).numpy()
    for m, row in zip(masks, ends, strict=True):
        expected = np.cumsum(reference.runs_of(m))
        np.testing.assert_array_equal(row[: len(expected)], expected)
        assert (row[len(expected) :] == INT64_MAX).all()


@settings(max_examples=40, deadline=None)
@given(_masks(max_side=40))
def test_python_rle_decoder_matches_the_mask_runs(mask):
    assert coco_utils.rle_counts_from_string(_encode(mask)) == reference.runs_of(mask)


def test_rle_decoder_handles_long_and_negative_deltas():
    # A 300 x 300 mask with long runs gives multi-character counts and negative deltas.
    m = np.zeros((300, 300), bool)
    m[10:290, 5:6] = True
    m[:, 100:250] = True
    m[7, 260] = True
    ends = transforms.rle_run_ends(tf.constant([_encode(m)])).numpy()[0]
    expected = np.cumsum(reference.runs_of(m))
    np.testing.assert_array_equal(ends[: len(expected)], expected)


def test_rle_run_ends_of_no_instances():
    assert transforms.rle_run_ends(tf.constant([], tf.string)).shape == (0, 1)
    crops = transforms.crop_masks(tf.constant([], tf.string), tf.zeros([0, 4]), 5, 7, 4)
    assert crops.shape == (0, 4, 4) and crops.dtype == tf.uint8


@st.composite
def _masks_and_boxes(draw):
    mask = draw(_masks(max_side=30))
    h, w = mask.shape
    boxes = []
    for _ in range(draw(st.integers(1, 3))):
        # Mostly inside the image (as the pipeline's repaired boxes), sometimes a little beyond it.
        x1 = draw(st.floats(-2, w - 0.25))
        y1 = draw(st.floats(-2, h - 0.25))
        x2 = draw(st.floats(x1 + 0.25, w + 2))
        y2 = draw(st.floats(y1 + 0.25, h + 2))
        boxes.append([x1, y1, x2, y2])
    return mask, np.array(boxes, np.float32), draw(st.sampled_from([1, 5, 8, 14]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_masks_and_boxes())
def test_crop_masks_match_the_bilinear_definition(args):
    mask, boxes, size = args
    h, w = mask.shape
    rle = tf.constant([_encode(mask)] * len(boxes))
    got = transforms.crop_masks(rle, tf.constant(boxes), h, w, size).numpy()
    for k, box in enumerate(boxes):
        np.testing.assert_array_equal(got[k], reference.crop(mask, box, size))


def test_crop_masks_at_run_ends_on_column_and_row_edges():
    """crop_masks reads each column's parity at the first row its taps read, then counts the run
    ends below it: masks whose runs end exactly at a column's start or at that first row, that
    start with 1 (an empty first run) or are all 1, under boxes that start on, between and
    beyond those rows and columns."""
    h, w = 6, 5
    masks = [np.ones((h, w), bool), np.zeros((h, w), bool)]
    column = np.zeros((h, w), bool)
    column[:, 1] = True  # runs end at column starts (column-major)
    masks.append(column)
    rows = np.zeros((h, w), bool)
    rows[2:4] = True  # runs end at rows 2 and 4 of every column
    masks.append(rows)
    masks.append(~rows)  # starts with 1: an empty first run
    rng = np.random.default_rng(3)
    masks += [rng.random((h, w)) < 0.5 for _ in range(4)]
    boxes = np.array(
        [[0, 0, 5, 6], [1, 2, 3, 4], [0.5, 1.5, 4.5, 5.5], [2, 2, 2.5, 2.5], [-1, -1, 6, 7],
         [1, 3, 5, 6], [3.2, 0, 5, 2.1]],
        np.float32,
    )
    for mask in masks:
        for size in (1, 3, 8):
            rle = tf.constant([_encode(mask)] * len(boxes))
            got = transforms.crop_masks(rle, tf.constant(boxes), h, w, size).numpy()
            for k, box in enumerate(boxes):
                np.testing.assert_array_equal(got[k], reference.crop(mask, box, size))


def test_crop_masks_threshold_is_inclusive():
    # One sample exactly between a 0 and a 1 pixel: bilinear value 0.5, kept (>= 0.5).
    mask = np.array([[0, 1]], bool)
    got = transforms.crop_masks(
        tf.constant([_encode(mask)]), tf.constant([[0.0, 0.0, 2.0, 1.0]]), 1, 2, 1
    )
    assert got.numpy().tolist() == [[[1]]]
    assert reference.crop(mask, [0.0, 0.0, 2.0, 1.0], 1).tolist() == [[1]]


def test_crop_masks_agree_with_ops_masks_crop_and_resize():
    from mrcnn_jax.ops.masks import crop_and_resize

    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.4
    boxes = np.array([[3.2, 4.7, 40.1, 30.2], [0, 0, 53, 37], [10, 10, 12, 11]], np.float32)
    got = transforms.crop_masks(tf.constant([_encode(mask)] * 3), tf.constant(boxes), 37, 53, 28)
    ref = crop_and_resize(mask.astype(np.float32), boxes, 28, xp=np) >= 0.5
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.uint8))


def test_flipped_crop_is_the_crop_of_the_flipped_mask():
    rng = np.random.default_rng(1)
    mask = rng.random((20, 31)) < 0.5
    box = np.array([[2.5, 1.25, 27.0, 18.5]], np.float32)
    image = tf.zeros([20, 31, 3], tf.uint8)
    crop = transforms.crop_masks(tf.constant([_encode(mask)]), tf.constant(box), 20, 31, 9)
    _, fbox, fcrop = transforms.flip_left_right(image, tf.constant(box), crop, 31)
    np.testing.assert_allclose(fbox.numpy(), [[31 - 27.0, 1.25, 31 - 2.5, 18.5]])
    np.testing.assert_array_equal(
        fcrop.numpy()[0], reference.crop(mask[:, ::-1], fbox.numpy()[0], 9)
    )


@pytest.mark.parametrize(
    "h, w, short, max_size",
    [
        (480, 640, 800, 1333),
        (640, 480, 800, 1000),
        (100, 1000, 800, 1333),
        (64, 64, 48, 64),
        (37, 53, 37, 53),
    ],
)
def test_resize_scale_is_resize_shortest_edge(h, w, short, max_size):
    scale, rh, rw = transforms.resize_scale(h, w, short, max_size)
    ref_scale, ref_h, ref_w = reference.resize_scale(h, w, short, max_size)
    assert (int(rh), int(rw)) == (ref_h, ref_w)
    assert float(scale) == pytest.approx(ref_scale, rel=1e-6)
    assert max(ref_h, ref_w) <= max_size


def test_resize_rounding_floor_is_torchvisions():
    """torchvision floors h * scale (480 x 640 -> 800 x 1066; detectron2: 800 x 1067), and the
    per-axis scales follow the floored sizes."""
    for (h, w), half_up, floor in [
        ((480, 640), (800, 1067), (800, 1066)),
        ((300, 2000), (200, 1333), (199, 1333)),
        ((427, 640), (800, 1199), (800, 1199)),
    ]:
        _, rh, rw = transforms.resize_scale(h, w, 800, 1333)
        assert (int(rh), int(rw)) == half_up
        _, rh, rw = transforms.resize_scale(h, w, 800, 1333, "floor")
        assert (int(rh), int(rw)) == floor
    image = np.zeros((480, 640, 3), np.uint8)
    _, size, scales = transforms.resize_normalize_pad(
        image, 800, 1333, (1344, 1344), (0, 0, 0), (1, 1, 1), "RGB", "floor"
    )
    assert tuple(size.numpy()) == (800, 1066)
    np.testing.assert_allclose(scales.numpy(), [800 / 480, 1066 / 640], rtol=1e-6)
    with pytest.raises(ValueError, match="resize_rounding"):
        transforms.resize_scale(h, w, 800, 1333, "nearest")


def test_resize_normalize_pad_against_numpy():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    out, size, scale = transforms.resize_normalize_pad(image, 20, 100, (40, 48), mean, std, "RGB")
    rh, rw = int(size[0]), int(size[1])
    assert (rh, rw) == (20, 30)
    np.testing.assert_allclose(scale.numpy(), [20 / 30, 30 / 45], rtol=1e-6)
    expected = (reference.resize_bilinear(image, rh, rw) - mean) / std
    out = out.numpy()
    np.testing.assert_allclose(out[:rh, :rw], expected, atol=1e-3)
    assert not out[rh:].any() and not out[:, rw:].any()  # padded with 0 after normalisation

    bgr, _, _ = transforms.resize_normalize_pad(image, 30, 100, (32, 48), mean, std, "BGR")
    np.testing.assert_allclose(
        bgr.numpy()[:30, :45], (image[..., ::-1] - np.array(mean)) / std, atol=1e-5
    )


@pytest.mark.parametrize("short", [97, 150, 240, 400])  # shrunk by 3.1x to enlarged by 1.3x
def test_antialiased_resize_is_pils_bilinear(short):
    """data.resize_antialias: detectron2 resizes with PIL's BILINEAR, which widens its filter
    when shrinking. Ours agrees to within one level of PIL's uint8 rounding at every scale; the
    plain filter (torchvision's) does not when shrinking."""
    import PIL.Image
    from PIL import ImageFilter

    rng = np.random.default_rng(4)
    noise = PIL.Image.fromarray(rng.integers(0, 256, size=(300, 417, 3), dtype=np.uint8))
    image = np.asarray(noise.filter(ImageFilter.GaussianBlur(1)))
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    out, size, _ = transforms.resize_normalize_pad(
        image, short, 1000, (560, 560), zero, one, "RGB", antialias=True
    )
    rh, rw = int(size[0]), int(size[1])
    pil = np.asarray(PIL.Image.fromarray(image).resize((rw, rh), PIL.Image.BILINEAR), np.float32)
    assert np.abs(out.numpy()[:rh, :rw] - pil).max() <= 1.0 + 1e-3  # float32 round-off
    plain, _, _ = transforms.resize_normalize_pad(image, short, 1000, (560, 560), zero, one, "RGB")
    if short < 300:
        assert np.abs(plain.numpy()[:rh, :rw] - pil).max() > 5.0


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("short", [97, 400])  # shrunk 3.1x, enlarged 1.3x
def test_normalising_before_the_resize_is_normalising_after(antialias, short):
    """resize_normalize_pad normalises whichever of the decoded and the resized image has fewer
    pixels (here the resized one when shrunk, the decoded one when enlarged): bilinear weights
    sum to 1, so either is the normalised resize up to float round-off, with or without
    antialiasing, in either channel order. pad=False returns the same pixels unpadded (the
    pipeline pads them as it batches)."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(300, 417, 3), dtype=np.uint8)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    for order in ("RGB", "BGR"):
        out, size, _ = transforms.resize_normalize_pad(
            image, short, 1000, (560, 560), mean, std, order, antialias=antialias
        )
        rh, rw = int(size[0]), int(size[1])
        resized, _ = transforms._resize(tf.constant(image), rh, rw, antialias)
        after = transforms.normalize(resized, mean, std, order).numpy()
        np.testing.assert_allclose(out.numpy()[:rh, :rw], after, atol=2e-6)
        unpadded, _, _ = transforms.resize_normalize_pad(
            image, short, 1000, (560, 560), mean, std, order, antialias=antialias, pad=False
        )
        np.testing.assert_array_equal(unpadded.numpy(), out.numpy()[:rh, :rw])


def test_normalize_rejects_unknown_channel_order():
    with pytest.raises(ValueError, match="channel_order"):
        transforms.normalize(tf.zeros([2, 2, 3]), (0, 0, 0), (1, 1, 1), "RBG")


def _data_config(**overrides):
    d = ml_collections.ConfigDict(
        {
            "image_size": (64, 64),
            "test_min_size": 48,
            "test_max_size": 64,
            "train_max_size": 64,
            "pixel_mean": (1.0, 2.0, 3.0),
            "pixel_std": (2.0, 2.0, 2.0),
            "channel_order": "RGB",
        }
    )
    d.update(overrides)
    return d


def test_preprocess_for_eval():
    image = np.random.default_rng(3).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    out, size, scale = transforms.preprocess_for_eval(image, _data_config())
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert size == (38, 64)  # long side capped at 64: the resize factor is 1.6
    # The factors the pixels were resized by, per axis (38.4 rounds to 38): detectron2's
    # ResizeTransform maps boxes with these, not with the 1.6 that chose the size.
    assert scale.dtype == np.float32
    np.testing.assert_allclose(scale, [38 / 24, 64 / 40], rtol=1e-6)
    expected = (reference.resize_bilinear(image, 38, 64) - [1.0, 2.0, 3.0]) / 2.0
    np.testing.assert_allclose(out[:38, :64], expected, atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        transforms.preprocess_for_eval(image[..., 0], _data_config())
    with pytest.raises(ValueError, match="no pixels"):
        transforms.preprocess_for_eval(image[:0], _data_config())


def test_a_strip_resizes_to_at_least_one_pixel():
    # 1 x 500 at test size 48 / 64: 500 * 64 / 500 = 64 columns, 0.128 rows -> 1 row, not 0.
    strip = np.full((1, 500, 3), 7, np.uint8)
    for rounding in transforms.RESIZE_ROUNDINGS:
        out, size, scale = transforms.preprocess_for_eval(
            strip, _data_config(resize_rounding=rounding)
        )
        assert size == (1, 64)
        np.testing.assert_allclose(out[:1, :64], np.broadcast_to([3.0, 2.5, 2.0], (1, 64, 3)))
        np.testing.assert_allclose(scale, [1.0, 64 / 500], rtol=1e-6)


def test_check_resize_fits_names_the_config_keys():
    transforms.check_resize_fits(_data_config(), train=True)
    with pytest.raises(ValueError, match="config.data.test_max_size=80.*config.data.image_size"):
        transforms.check_resize_fits(_data_config(test_max_size=80), train=False)
    with pytest.raises(ValueError, match="train_max_size"):
        transforms.check_resize_fits(_data_config(image_size=(64, 48)), train=True)


def test_importing_the_data_package_hides_gpus_from_tf():
    assert tf.config.get_visible_devices("GPU") == []
