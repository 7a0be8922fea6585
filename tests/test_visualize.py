"""Overlay pictures: mask blending, box / label pixels, deterministic colours, PNG and grid."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mrcnn_jax import visualize

NAMES = ("background", "square", "disc")
GREY = 100


def _scene():
    """A 128x160 grey image with one disc-masked detection inside box (40, 50)-(100, 110)."""
    h, w = 128, 160
    image = np.full((h, w, 3), GREY, np.uint8)
    yy, xx = np.mgrid[:h, :w] + 0.5
    disc = (xx - 70) ** 2 + (yy - 80) ** 2 <= 20**2
    boxes = np.array([[40, 50, 100, 110]], np.float32)
    return image, boxes, disc[None], np.array([2]), np.array([0.93], np.float32)


def _box_band(box, shape, width):
    """Pixels within `width` of the box outline (PIL draws the outline inward from x1..x2)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    x1, y1, x2, y2 = box
    outer = (xx >= x1 - 1) & (xx <= x2 + 1) & (yy >= y1 - 1) & (yy <= y2 + 1)
    inner = (xx > x1 + width) & (xx < x2 - width) & (yy > y1 + width) & (yy < y2 - width)
    return outer & ~inner


def test_mask_pixels_blend_and_outside_pixels_stay():
    image, boxes, masks, classes, scores = _scene()
    out = visualize.overlay(image, boxes, masks, classes, scores, NAMES)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.any(out != image, axis=-1)
    band = _box_band(boxes[0], image.shape, visualize.BOX_WIDTH)
    # The label sits above the box (y < 50) starting at x = 40.
    label = np.zeros_like(band)
    label[:50, 40:] = True
    assert not np.any(changed & ~masks[0] & ~band & ~label)
    # Mask pixels away from the outline and the label: exactly the 0.5 blend with colour 0.
    inside = masks[0] & ~band & ~label
    expected = np.round(0.5 * GREY + 0.5 * visualize.PALETTE[0].astype(np.float64))
    np.testing.assert_array_equal(out[inside], np.broadcast_to(expected, out[inside].shape))
    # The box outline is drawn in the same colour; the label background too.
    assert tuple(out[80, 40]) == visualize.colour(0)
    assert np.sum(np.all(out[:50] == visualize.PALETTE[0], axis=-1)) > 20
    # Some label text pixels differ from the fill (text is drawn).
    label_area = out[:50, 40:]
    not_fill = np.any(label_area != visualize.PALETTE[0], axis=-1)
    assert np.any(not_fill & np.any(label_area != GREY, axis=-1))


def test_deterministic_distinct_colours_and_threshold():
    h, w = 96, 96
    image = np.full((h, w, 3), GREY, np.uint8)
    boxes = np.array([[30, 30, 50, 50], [60, 60, 80, 80], [5, 70, 20, 90]], np.float32)
    masks = np.zeros((3, h, w), bool)
    masks[0, 36:45, 36:45] = True
    masks[1, 66:75, 66:75] = True
    masks[2, 75:85, 8:17] = True
    scores = np.array([0.9, 0.8, 0.2], np.float32)  # the third is below the 0.5 threshold
    classes = np.array([1, 2, 1])
    out1 = visualize.overlay(image, boxes, masks, classes, scores, NAMES)
    out2 = visualize.overlay(image, boxes, masks, classes, scores, NAMES)
    np.testing.assert_array_equal(out1, out2)
    c0, c1 = out1[40, 40], out1[70, 70]
    assert not np.array_equal(c0, c1)
    np.testing.assert_array_equal(c0, np.round(0.5 * GREY + 0.5 * visualize.PALETTE[0]))
    np.testing.assert_array_equal(c1, np.round(0.5 * GREY + 0.5 * visualize.PALETTE[1]))
    # Below the threshold: its mask and box are left alone.
    np.testing.assert_array_equal(out1[72:92, 3:22], image[72:92, 3:22])
    # The input image is not modified.
    assert np.all(image == GREY)


def test_no_masks_draws_only_boxes_and_labels():
    image, boxes, _, classes, scores = _scene()
    out = visualize.overlay(image, boxes, None, classes, scores, NAMES)
    np.testing.assert_array_equal(out[70:90, 60:80], image[70:90, 60:80])  # box interior
    assert tuple(out[80, 40]) == visualize.colour(0)


def test_palette_is_distinct():
    p = visualize.PALETTE.astype(int)
    dist = np.abs(p[:, None] - p[None]).sum(-1)
    assert np.all(dist[~np.eye(len(p), dtype=bool)] > 0)
    assert visualize.colour(len(p)) == visualize.colour(0)


def test_png_round_trip(tmp_path):
    image, boxes, masks, classes, scores = _scene()
    out = visualize.overlay(image, boxes, masks, classes, scores, NAMES)
    path = str(tmp_path / "sub" / "overlay.png")
    visualize.save_png(path, out)
    with Image.open(path) as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), out)


def test_grid_places_images():
    a = np.full((10, 20, 3), 1, np.uint8)
    b = np.full((15, 12, 3), 2, np.uint8)
    c = np.full((5, 5, 3), 3, np.uint8)
    out = visualize.grid([a, b, c], cols=2, pad=2, background=255)
    # Cells are 15 x 20; 2 rows x 2 columns with 2-pixel padding.
    assert out.shape == (2 * 15 + 3 * 2, 2 * 20 + 3 * 2, 3)
    np.testing.assert_array_equal(out[2:12, 2:22], a)
    np.testing.assert_array_equal(out[2:17, 24:36], b)
    np.testing.assert_array_equal(out[19:24, 2:7], c)
    assert np.all(out[12:17, 2:22] == 255) and np.all(out[19:, 24:] == 255)
    with pytest.raises(ValueError):
        visualize.grid([], cols=2)


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 60),
    st.integers(0, 60),
    st.integers(4, 40),
    st.integers(4, 40),
    st.floats(0.0, 1.0),
)
def test_overlay_changes_only_mask_box_and_label(x1, y1, bw, bh, score):
    """Anywhere far from the box (and its label above it) the image is untouched."""
    h, w = 80, 100
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    box = np.array([[x1, y1, x1 + bw, y1 + bh]], np.float32)
    mask = np.zeros((1, h, w), bool)
    mask[0, y1 : y1 + bh, x1 : x1 + bw] = True
    out = visualize.overlay(image, box, mask, np.array([1]), np.array([score]), NAMES)
    changed = np.any(out != image, axis=-1)
    if score < 0.5:
        assert not changed.any()
        return
    yy, xx = np.mgrid[:h, :w]
    # Labels are at most ~20 px tall and lie within [x1 - label width, ...]; allow 40 px above.
    # With no room above, the label sits inside the box top and may reach past a short box.
    bottom = max(y1 + bh + 1, y1 + 20) if y1 < 20 else y1 + bh + 1
    near = (yy >= y1 - 40) & (yy <= bottom) & (xx >= 0) & (xx <= w)
    below_or_right = (yy > bottom) | ((xx > x1 + bw + 1) & (yy > y1 + 20))
    assert not np.any(changed & ~near)
    assert not np.any(changed & below_or_right)
    # Mask pixels clear of the outline and of a label inside the box top: the exact blend.
    band = _box_band(box[0], (h, w), visualize.BOX_WIDTH)
    interior = mask[0] & ~band & (yy > y1 + 20)
    expected = np.round(0.5 * image[interior] + 0.5 * visualize.PALETTE[0].astype(np.float64))
    np.testing.assert_array_equal(out[interior], expected)


MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
LEFT, RIGHT = np.array([30, 60, 90]), np.array([200, 150, 100])


def _eval_batch(channel_order):
    """One real example (id 5): a 40 x 60 original of two colour blocks at scale 0.5, padded to
    32 x 32, with one detection at resized [2, 8, 14, 18] (original [4, 16, 28, 36]); a dummy."""
    resized = np.zeros((20, 30, 3), np.float32)
    resized[:, :15], resized[:, 15:] = LEFT, RIGHT
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    if channel_order == "BGR":
        resized, mean, std = resized[..., ::-1], mean[::-1], std[::-1]
    images = np.zeros((2, 32, 32, 3), np.float32)
    images[0, :20, :30] = (resized - mean) / std
    batch = {
        "images": images,
        "image_sizes": np.array([[20, 30], [32, 32]], np.int32),
        "orig_sizes": np.array([[40, 60], [8, 8]], np.int32),
        "scales": np.array([[0.5, 0.5], [1.0, 1.0]], np.float32),
        "image_ids": np.array([5, 0], np.int64),
        "example_valid": np.array([True, False]),
    }
    dets = {
        "boxes": np.array([[[2, 8, 14, 18]], [[0, 0, 4, 4]]], np.float32),
        "scores": np.array([[0.9], [0.9]], np.float32),
        "classes": np.array([[1], [2]], np.int32),
        "valid": np.array([[True], [True]]),
        "masks": np.ones((2, 1, 28, 28), np.float32),
    }
    return dets, batch, tuple(mean.tolist()), tuple(std.tolist())


@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_example_overlay_at_the_original_size(channel_order):
    dets, batch, mean, std = _eval_batch(channel_order)
    out = visualize.example_overlay(dets, batch, 0, NAMES, mean, std, channel_order)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    # Far from the detection: the un-normalised, resized-back picture.
    np.testing.assert_array_equal(out[30, 40], RIGHT)
    np.testing.assert_array_equal(out[38, 10], LEFT)
    # Inside the pasted mask (original box [4, 16, 28, 36]), clear of the outline and label.
    np.testing.assert_array_equal(out[30, 14], np.round(0.5 * LEFT + 0.5 * visualize.PALETTE[0]))
    assert tuple(out[26, 4]) == visualize.colour(0)  # the left box edge at x = 4


def test_save_batch_overlays_skips_dummies(tmp_path):
    dets, batch, mean, std = _eval_batch("RGB")
    paths = visualize.save_batch_overlays(
        dets, batch, str(tmp_path), NAMES, pixel_mean=mean, pixel_std=std
    )
    assert paths == [str(tmp_path / "5.png")]
    with Image.open(paths[0]) as im:
        saved = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(
        saved, visualize.example_overlay(dets, batch, 0, NAMES, mean, std)
    )


def test_denormalize_rejects_unknown_channel_order():
    with pytest.raises(ValueError):
        visualize.denormalize(np.zeros((2, 2, 3)), MEAN, STD, "GBR")
