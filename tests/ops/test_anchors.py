"""FPN anchors against a plain loop reference, and torchvision / detectron2 base-anchor values."""

import math

import numpy as np
import pytest

from mrcnn_jax.ops import anchors as anchor_ops

STRIDES = (4, 8, 16, 32, 64)
SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)


def _loop_reference(image_size, strides, sizes, ratios, round_base):
    """Anchors by explicit loops in the documented order: level, y, x, ratio."""
    h, w = image_size
    out = []
    for stride, size in zip(strides, sizes, strict=True):
        fh, fw = -(-h // stride), -(-w // stride)
        for y in range(fh):
            for x in range(fw):
                for ratio in ratios:
                    if round_base:  # torchvision: ws = size / sqrt(r), hs = size * sqrt(r), rounded
                        half_w = round(size / math.sqrt(ratio) / 2)
                        half_h = round(size * math.sqrt(ratio) / 2)
                    else:  # detectron2: w = sqrt(size^2 / r), h = r * w
                        half_w = math.sqrt(size**2 / ratio) / 2
                        half_h = ratio * math.sqrt(size**2 / ratio) / 2
                    cx, cy = x * stride, y * stride
                    out.append([cx - half_w, cy - half_h, cx + half_w, cy + half_h])
    return np.asarray(out)


def test_feature_shapes_ceil():
    want = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert anchor_ops.feature_shapes((64, 96), STRIDES) == want
    assert anchor_ops.feature_shapes((1344, 1344), (32, 64)) == [(42, 42), (21, 21)]
    assert anchor_ops.feature_shapes((100, 30), (8,)) == [(13, 4)]


@pytest.mark.parametrize("round_base", [False, True])
@pytest.mark.parametrize("image_size", [(64, 96), (128, 64), (96, 160)])
def test_matches_loop_reference(image_size, round_base):
    got = anchor_ops.generate_anchors(image_size, STRIDES, SIZES, RATIOS, round_base=round_base)
    want = _loop_reference(image_size, STRIDES, SIZES, RATIOS, round_base)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    counts = anchor_ops.num_anchors_per_level(image_size, STRIDES, len(RATIOS))
    assert sum(counts) == got.shape[0]
    shapes = anchor_ops.feature_shapes(image_size, STRIDES)
    assert counts == [fh * fw * len(RATIOS) for fh, fw in shapes]


def test_order_is_rpn_head_layout():
    """Each level's block reshaped to [H, W, A, 4] has cell (y, x) centred at (x * s, y * s)."""
    image_size = (64, 96)
    got = anchor_ops.generate_anchors(image_size, STRIDES, SIZES, RATIOS)
    counts = anchor_ops.num_anchors_per_level(image_size, STRIDES, len(RATIOS))
    start = 0
    for (fh, fw), stride, count in zip(
        anchor_ops.feature_shapes(image_size, STRIDES), STRIDES, counts, strict=True
    ):
        level = got[start : start + count].reshape(fh, fw, len(RATIOS), 4)
        cx = (level[..., 0] + level[..., 2]) / 2
        cy = (level[..., 1] + level[..., 3]) / 2
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        np.testing.assert_allclose(cx, np.broadcast_to(xs[..., None] * stride, cx.shape), atol=1e-4)
        np.testing.assert_allclose(cy, np.broadcast_to(ys[..., None] * stride, cy.shape), atol=1e-4)
        # Ratio is the minor axis: h / w follows RATIOS within every cell.
        ratio = (level[..., 3] - level[..., 1]) / (level[..., 2] - level[..., 0])
        np.testing.assert_allclose(ratio, np.broadcast_to(RATIOS, ratio.shape), rtol=1e-5)
        start += count


def test_detectron2_areas_and_ratios():
    for size in SIZES:
        cell = anchor_ops.base_anchors(size, RATIOS, round_base=False)
        w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
        np.testing.assert_allclose(w * h, size**2, rtol=1e-5)
        np.testing.assert_allclose(h / w, RATIOS, rtol=1e-5)
        np.testing.assert_allclose(cell[:, :2], -cell[:, 2:], atol=1e-5)  # centred at 0


def test_torchvision_rounded_values():
    # torchvision AnchorGenerator: hr = sqrt(r), ws = size / hr, hs = size * hr,
    # box = round([-ws, -hs, ws, hs] / 2).
    # size 32: ws = 45.25, hs = 22.63 for r = 0.5 -> [-23, -11, 23, 11].
    np.testing.assert_array_equal(
        anchor_ops.base_anchors(32, RATIOS, round_base=True),
        [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]],
    )
    # size 64, r = 0.5: ws / 2 = 45.25 -> 45, hs / 2 = 22.63 -> 23.
    np.testing.assert_array_equal(
        anchor_ops.base_anchors(64, (0.5,), round_base=True), [[-45, -23, 45, 23]]
    )
    got = anchor_ops.generate_anchors((64, 64), STRIDES, SIZES, RATIOS, round_base=True)
    np.testing.assert_array_equal(got[0], [-23, -11, 23, 11])  # P2, y = 0, x = 0, r = 0.5
    # P2, y = 2, x = 1, r = 0.5 sits at index (2 * 16 + 1) * 3, shifted by (4, 8).
    np.testing.assert_array_equal(got[(2 * 16 + 1) * 3], [-19, -3, 27, 19])
    # Areas stay close to size**2 despite the rounding.
    w, h = got[:, 2] - got[:, 0], got[:, 3] - got[:, 1]
    sizes = np.repeat(SIZES, anchor_ops.num_anchors_per_level((64, 64), STRIDES, 3))
    np.testing.assert_allclose(w * h, sizes**2.0, rtol=0.03)


def test_rejects_mismatched_sizes():
    with pytest.raises(ValueError):
        anchor_ops.generate_anchors((64, 64), STRIDES, SIZES[:3])


@pytest.mark.parametrize("size", [(800, 1067), (640, 853), (1344, 1344), (33, 64), (1, 1)])
@pytest.mark.parametrize("round_base", [False, True])
def test_inside_padded_image_is_the_padded_images_anchors(size, round_base):
    """The canvas anchors kept for an image are exactly the anchors detectron2 / torchvision
    generate for that image padded to a multiple of 32, in the same relative order."""
    canvas = (1344, 1344)
    anchors = anchor_ops.generate_anchors(canvas, round_base=round_base)
    inside = np.asarray(anchor_ops.inside_padded_image(anchors, np.array(size), 32))
    padded = tuple(math.ceil(s / 32) * 32 for s in size)
    expected = anchor_ops.generate_anchors(padded, round_base=round_base)
    np.testing.assert_array_equal(anchors[inside], expected)
    assert np.asarray(anchor_ops.inside_padded_image(anchors, np.array(size), 0)).all()
