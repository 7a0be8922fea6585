"""Mask crops, in-graph mask targets and mask pasting against plain-loop numpy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.masks import (
    coco_rle_strings,
    crop_and_resize,
    mask_run_starts,
    mask_targets_from_crops,
    paste_masks,
    paste_masks_torchvision,
)
from mrcnn_jax.ops.roi_align import roi_align

F32 = np.float32


# ------------------------------------------------------------------ references
def _bilinear_inside(img, y, x):
    """Centre coordinates (pixel k at k); edge-clamped within half a pixel, 0 beyond."""
    h, w = img.shape
    if not (-0.5 <= y <= h - 0.5 and -0.5 <= x <= w - 0.5):
        return 0.0
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[y0, x0] + (1 - ly) * lx * img[y0, x1]
            + ly * (1 - lx) * img[y1, x0] + ly * lx * img[y1, x1])


def crop_and_resize_ref(img, boxes, out):
    res = np.zeros((len(boxes), out, out))
    for r, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        for i in range(out):
            for j in range(out):
                y = y1 + (i + 0.5) * (y2 - y1) / out - 0.5
                x = x1 + (j + 0.5) * (x2 - x1) / out - 0.5
                res[r, i, j] = _bilinear_inside(img, y, x)
    return res


def mask_targets_ref(crops, gt_boxes, rois, matched, out):
    s = crops.shape[-1]
    res = np.zeros((len(rois), out, out))
    for r, (x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        gx1, gy1, gx2, gy2 = gt_boxes[matched[r]].astype(np.float64)
        if gx2 <= gx1 or gy2 <= gy1:
            continue
        for i in range(out):
            for j in range(out):
                x = x1 + (j + 0.5) * (x2 - x1) / out
                y = y1 + (i + 0.5) * (y2 - y1) / out
                u = (x - gx1) / (gx2 - gx1) * s - 0.5
                v = (y - gy1) / (gy2 - gy1) * s - 0.5
                res[r, i, j] = _bilinear_inside(crops[matched[r]], v, u)
    return res


def paste_d2_ref(masks, boxes, h, w):
    """detectron2: grid_sample(align_corners=False, zeros padding) at every pixel centre."""
    n, m, _ = masks.shape
    res = np.zeros((n, h, w))
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        if x2 <= x1 or y2 <= y1:
            continue
        for py in range(h):
            v = (py + 0.5 - y1) / (y2 - y1) * m - 0.5
            for px in range(w):
                u = (px + 0.5 - x1) / (x2 - x1) * m - 0.5
                u0, v0 = math.floor(u), math.floor(v)
                for yy, wy in ((v0, 1 - (v - v0)), (v0 + 1, v - v0)):
                    for xx, wx in ((u0, 1 - (u - u0)), (u0 + 1, u - u0)):
                        if 0 <= yy < m and 0 <= xx < m:
                            res[k, py, px] += wy * wx * masks[k, yy, xx]
    return res


def _resize_bilinear_ref(img, out_h, out_w):
    """F.interpolate(mode="bilinear", align_corners=False) in float32, PyTorch's index rules."""
    in_h, in_w = img.shape

    def taps(out_size, in_size):
        scale = F32(in_size) / F32(out_size)
        res = []
        for d in range(out_size):
            src = max(scale * F32(d + 0.5) - F32(0.5), F32(0))
            i0 = min(int(np.floor(src)), in_size - 1)
            lam = min(max(src - F32(i0), F32(0)), F32(1))
            res.append((i0, i0 + 1 if i0 < in_size - 1 else i0, lam))
        return res

    res = np.zeros((out_h, out_w), np.float64)
    for y, (ya, yb, ly) in enumerate(taps(out_h, in_h)):
        for x, (xa, xb, lx) in enumerate(taps(out_w, in_w)):
            res[y, x] = ((1 - ly) * ((1 - lx) * img[ya, xa] + lx * img[ya, xb])
                         + ly * ((1 - lx) * img[yb, xa] + lx * img[yb, xb]))
    return res


def paste_tv_ref(masks, boxes, h, w, padding=1):
    """torchvision's paste_masks_in_image, written out with numpy slices."""
    n, m, _ = masks.shape
    scale = F32((m + 2 * padding) / m)
    res = np.zeros((n, h, w))
    for k in range(n):
        x1, y1, x2, y2 = boxes[k].astype(F32)
        w_half, h_half = (x2 - x1) * F32(0.5) * scale, (y2 - y1) * F32(0.5) * scale
        xc, yc = (x2 + x1) * F32(0.5), (y2 + y1) * F32(0.5)
        b = [int(v) for v in (xc - w_half, yc - h_half, xc + w_half, yc + h_half)]  # trunc, as .to(int64)
        bw, bh = max(b[2] - b[0] + 1, 1), max(b[3] - b[1] + 1, 1)
        resized = _resize_bilinear_ref(np.pad(masks[k], padding), bh, bw)
        x_0, x_1 = max(b[0], 0), min(b[2] + 1, w)
        y_0, y_1 = max(b[1], 0), min(b[3] + 1, h)
        if x_1 > x_0 and y_1 > y_0:
            res[k, y_0:y_1, x_0:x_1] = resized[y_0 - b[1] : y_1 - b[1], x_0 - b[0] : x_1 - b[0]]
    return res


# ------------------------------------------------------------------ data
def _boxes(rng, n, h, w, special=True):
    xy = rng.uniform(-0.2, 0.9, size=(n, 2)) * [w, h]
    wh = rng.uniform(0.02, 0.7, size=(n, 2)) * [w, h]
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if special:
        boxes = np.concatenate([boxes, [
            [-6.3, -4.1, w * 0.4, h * 0.3],  # partly outside
            [w * 0.7, h * 0.6, w + 7.7, h + 5.2],  # partly outside
            [w + 3, 1, w + 20, 9],  # wholly outside
            [3.2, 4.7, 3.9, 5.1],  # tiny
            [5, 3, 5, 8],  # zero width
            [9, 8, 4, 2],  # inverted
            [0, 0, w, h],  # the image
        ]])
    return boxes.astype(F32)


def _blobs(rng, n, h, w):
    """n binary masks (ellipses, some with holes) and their tight boxes."""
    yy, xx = np.mgrid[:h, :w] + 0.5
    masks, boxes = [], []
    for k in range(n):
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        a, b = rng.uniform(0.06, 0.2, size=2) * min(h, w)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        mk = (u / a) ** 2 + (v / b) ** 2 <= 1
        if k % 2:
            mk &= (xx - cx) ** 2 + (yy - cy) ** 2 >= (min(a, b) / 2) ** 2
        ys, xs = np.nonzero(mk)
        masks.append(mk.astype(F32))
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.stack(masks), np.array(boxes, F32)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# ------------------------------------------------------------------ crop_and_resize
def test_crop_and_resize_matches_reference_numpy_and_jax():
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(23, 31)).astype(F32)
    boxes = _boxes(rng, 8, 23, 31)
    ref = crop_and_resize_ref(img, boxes, 9)
    out_np = crop_and_resize(img, boxes, 9)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == F32 and out_np.shape == (len(boxes), 9, 9)
    np.testing.assert_allclose(out_np, ref, atol=1e-5)
    np.testing.assert_allclose(crop_and_resize(jnp.asarray(img), jnp.asarray(boxes), 9), ref, atol=1e-5)
    # numpy input under jit (the input pipeline's use)
    jitted = jax.jit(crop_and_resize, static_argnums=2)
    np.testing.assert_allclose(jitted(img, boxes, 9), ref, atol=1e-5)


def test_crop_and_resize_is_roi_align_aligned_one_sample_inside_the_image():
    rng = np.random.default_rng(1)
    img = (rng.uniform(size=(30, 40)) > 0.5).astype(F32)
    boxes = _boxes(rng, 12, 30, 40, special=False)
    boxes = np.clip(boxes, 0, [40, 30, 40, 30]).astype(F32)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    pooled = roi_align(jnp.asarray(img)[..., None], jnp.asarray(boxes), 14, 1.0, 1, True)[..., 0]
    np.testing.assert_allclose(crop_and_resize(img, boxes, 14), pooled, atol=1e-5)


# ------------------------------------------------------------------ mask targets
def test_mask_targets_from_crops_matches_reference():
    rng = np.random.default_rng(2)
    crops = rng.uniform(size=(4, 16, 16)).astype(F32)
    gt_boxes = np.array([[10, 12, 50, 40], [5.5, 6.2, 20.1, 60.7], [30, 30, 31, 33], [7, 7, 7, 20]], F32)
    rois = _boxes(rng, 10, 64, 64)
    matched = rng.integers(0, 4, size=len(rois)).astype(np.int32)
    out = mask_targets_from_crops(jnp.asarray(crops), jnp.asarray(gt_boxes), jnp.asarray(rois),
                                  jnp.asarray(matched), output_size=7)
    assert out.shape == (len(rois), 7, 7) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, mask_targets_ref(crops, gt_boxes, rois, matched, 7), atol=1e-5)


def test_mask_targets_from_crops_approximate_full_mask_targets():
    """Targets cut from 112 x 112 crops vs the detectron2 target (crop_and_resize of the full mask).

    Double resampling tolerance: per RoI, IoU of the 0.5-thresholded targets > 0.95 and mean abs
    error < 0.02 (measured: IoU >= 0.98, error <= 0.01), for RoIs shifted by up to 30% of the gt size
    and scaled by 0.7x-1.8x, so many are larger than and partly outside their gt box.
    """
    rng = np.random.default_rng(3)
    masks, gt_boxes = _blobs(rng, 6, 160, 200)
    crops = np.stack([crop_and_resize(mk, bx[None], 112)[0] for mk, bx in zip(masks, gt_boxes, strict=True)])
    num = 48
    matched = rng.integers(0, len(masks), size=num).astype(np.int32)
    g = gt_boxes[matched]
    size = g[:, 2:] - g[:, :2]
    centre = (g[:, :2] + g[:, 2:]) / 2 + rng.uniform(-0.3, 0.3, size=(num, 2)) * size
    wh = size * np.exp(rng.uniform(-0.35, 0.6, size=(num, 2)))
    rois = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1).astype(F32)
    assert ((rois[:, :2] < g[:, :2]) | (rois[:, 2:] > g[:, 2:])).any(axis=1).mean() > 0.5
    got = np.asarray(mask_targets_from_crops(jnp.asarray(crops), jnp.asarray(gt_boxes), jnp.asarray(rois),
                                             jnp.asarray(matched), output_size=28))
    want = np.stack([crop_and_resize(masks[matched[i]], rois[i : i + 1], 28)[0] for i in range(num)])
    for i in range(num):
        assert np.abs(got[i] - want[i]).mean() < 0.02
        assert _iou(got[i] >= 0.5, want[i] >= 0.5) > 0.95
    # A RoI wholly outside its gt box gets an empty target.
    far = np.array([[0, 0, 10, 10]], F32) + gt_boxes[0, 2:4].max() + 5
    empty = mask_targets_from_crops(jnp.asarray(crops), jnp.asarray(gt_boxes), jnp.asarray(far),
                                    jnp.zeros((1,), jnp.int32))
    np.testing.assert_array_equal(empty, 0.0)


# ------------------------------------------------------------------ paste
def test_paste_masks_matches_detectron2_reference_both_paths():
    rng = np.random.default_rng(4)
    h, w, m = 21, 26, 6
    boxes = _boxes(rng, 6, h, w)
    masks = rng.uniform(size=(len(boxes), m, m)).astype(F32)
    ref = paste_d2_ref(masks, boxes, h, w)
    probs_np = paste_masks(masks, boxes, h, w, threshold=None)
    assert isinstance(probs_np, np.ndarray) and probs_np.shape == (len(boxes), h, w)
    np.testing.assert_allclose(probs_np, ref, atol=1e-5)
    jitted = jax.jit(paste_masks, static_argnums=(2, 3, 4))
    probs_jit = np.asarray(jitted(jnp.asarray(masks), jnp.asarray(boxes), h, w, None))
    np.testing.assert_allclose(probs_jit, probs_np, atol=1e-6)
    # Thresholding is `prob >= threshold`, on both paths; thresholds taken from actual values.
    for t in (0.5, 0.25, float(probs_np[0][probs_np[0] > 0][0])):
        bool_np = paste_masks(masks, boxes, h, w, threshold=t)
        assert bool_np.dtype == bool
        np.testing.assert_array_equal(bool_np, probs_np >= t)
        away = np.abs(ref - t) > 1e-4
        np.testing.assert_array_equal(bool_np[away], (ref >= t)[away])
        bool_jit = np.asarray(jitted(jnp.asarray(masks), jnp.asarray(boxes), h, w, t))
        np.testing.assert_array_equal(bool_jit[away], bool_np[away])


def test_paste_masks_torchvision_matches_reference_both_paths():
    rng = np.random.default_rng(5)
    h, w, m = 24, 29, 7
    boxes = _boxes(rng, 8, h, w)
    masks = rng.uniform(size=(len(boxes), m, m)).astype(F32)
    ref = paste_tv_ref(masks, boxes, h, w)
    out_np = paste_masks_torchvision(masks, boxes, h, w)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == F32
    np.testing.assert_allclose(out_np, ref, atol=1e-5)
    jitted = jax.jit(paste_masks_torchvision, static_argnums=(2, 3))
    np.testing.assert_allclose(jitted(jnp.asarray(masks), jnp.asarray(boxes), h, w), out_np, atol=1e-6)


def test_host_paste_on_box_footprint_equals_full_image_product():
    """The numpy path computes only the rows / columns a box's weights reach; the rest must be 0
    exactly as the full-image product (the jit path) gives, for boxes inside, across the border,
    wholly outside, degenerate and sub-pixel."""
    rng = np.random.default_rng(11)
    h, w, m = 40, 53, 7
    boxes = np.concatenate(
        [
            _boxes(rng, 6, h, w),
            np.array(
                [[-10, -5, 12, 9], [45, 30, 70, 60], [60, 50, 80, 70], [5, 5, 5, 20], [10, 10, 9, 12],
                 [3.2, 4.1, 3.7, 4.3], [0, 0, w, h]],
                F32,
            ),
        ]
    )
    masks = rng.uniform(size=(len(boxes), m, m)).astype(F32)
    for paste in (functools.partial(paste_masks, threshold=None), paste_masks_torchvision):
        host = paste(masks, boxes, h, w)
        full = np.asarray(jax.jit(paste, static_argnums=(2, 3))(jnp.asarray(masks), jnp.asarray(boxes), h, w))
        np.testing.assert_allclose(host, full, atol=1e-6)
        np.testing.assert_array_equal(host == 0, np.abs(full) < 1e-12)
    # Thresholded host pastes write bool masks directly: the same as thresholding the probabilities.
    probs_d2 = paste_masks(masks, boxes, h, w, threshold=None)
    probs_tv = paste_masks_torchvision(masks, boxes, h, w)
    for t in (0.5, 0.2, 0.0):
        np.testing.assert_array_equal(paste_masks(masks, boxes, h, w, threshold=t), probs_d2 >= t)
        np.testing.assert_array_equal(paste_masks_torchvision(masks, boxes, h, w, threshold=t), probs_tv > t)


@pytest.mark.parametrize("shape", ["rect", "frac_rect", "disc"])
def test_crop_then_paste_round_trips(shape):
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w] + 0.5
    box = {"rect": [20, 30, 70, 60], "frac_rect": [20.3, 30.6, 90.2, 61.9], "disc": [30, 20, 80, 70]}[shape]
    box = np.array([box], F32)
    x1, y1, x2, y2 = box[0]
    if shape == "disc":
        mask = (xx - 55) ** 2 + (yy - 45) ** 2 <= 25**2
    else:
        mask = (xx >= x1) & (xx <= x2) & (yy >= y1) & (yy <= y2)
    crop = crop_and_resize(mask.astype(F32), box, 28)
    pasted = paste_masks(crop, box, h, w)[0]
    assert _iou(pasted, mask) > 0.95
    tv = paste_masks_torchvision(crop, box, h, w)[0] > 0.5
    assert _iou(tv, mask) > 0.9


@pytest.mark.torch
def test_paste_matches_torch_implementations():
    torch = pytest.importorskip("torch")
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    rng = np.random.default_rng(6)
    h, w, m = 40, 52, 28
    boxes = _boxes(rng, 10, h, w, special=False)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(F32)  # torchvision pastes clipped detections
    masks = rng.uniform(size=(len(boxes), m, m)).astype(F32)
    tm, tb = torch.from_numpy(masks)[:, None], torch.from_numpy(boxes)
    tv = roi_heads.paste_masks_in_image(tm, tb, (h, w))[:, 0].numpy()
    np.testing.assert_allclose(paste_masks_torchvision(masks, boxes, h, w), tv, atol=1e-5)
    # detectron2's definition is grid_sample at the pixel centres (align_corners=False, zero padding).
    gx = (torch.arange(w) + 0.5 - tb[:, 0:1]) / (tb[:, 2:3] - tb[:, 0:1]) * 2 - 1
    gy = (torch.arange(h) + 0.5 - tb[:, 1:2]) / (tb[:, 3:4] - tb[:, 1:2]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], dim=3)
    d2 = torch.nn.functional.grid_sample(tm, grid, align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(paste_masks(masks, boxes, h, w, threshold=None), d2, atol=1e-5)


@pytest.mark.parametrize("height, width", [(1, 1), (5, 7), (13, 4), (16, 9)])
def test_mask_run_starts_give_coco_rles(height, width):
    from mrcnn_jax import evaluate

    rng = np.random.default_rng(height * 100 + width)
    masks = rng.uniform(size=(6, height, width)) < rng.uniform(0.2, 0.8, (6, 1, 1))
    masks[0], masks[1] = True, False
    masks[2] = np.arange(width)[None, :] % 2 == 0  # a run per column
    # Canvas bigger than the image, with garbage outside it that must not be read.
    canvas = rng.uniform(size=(6, 16, 9)) < 0.5
    canvas[:, :height, :width] = masks
    starts, num = jax.jit(mask_run_starts, static_argnums=3)(canvas, height, width, 160)
    starts, num = np.asarray(starts), np.asarray(num)
    assert starts.shape == (6, 160) and num.max() <= height * width
    assert num[1] == 0 and num[0] == 1 and starts[0, 0] == 0
    for i in range(6):
        assert np.all(np.diff(starts[i, : num[i]]) > 0) and np.all(starts[i, num[i] :] == height * width)
    # pycocotools' own strings, from the run starts through `coco_rle_strings`.
    expected = [rle["counts"] for rle in evaluate.encode_masks(masks)]
    chars, length = coco_rle_strings(starts, num, height, width, 7 * 161)
    got = [bytes(np.asarray(chars[i, : int(length[i])])).decode() for i in range(6)]
    assert got == expected
    counts = [np.diff(starts[i, : num[i]], prepend=0, append=height * width) for i in range(6)]
    assert [c.sum() for c in counts] == [height * width] * 6 and all(c[1:].min(initial=1) > 0 for c in counts)
    # A string longer than max_chars is refused (-1), as is a mask with too many runs.
    short = coco_rle_strings(starts, num, height, width, 2)[1]
    np.testing.assert_array_equal(short, np.where(np.asarray(length) > 2, -1, length))

    # Traced sizes (one compile for every image) give the same. A mask that does not fit says so
    # with num = max_runs + 1: too many starts in all, or in one column.
    traced = jax.jit(lambda c, h, w: mask_run_starts(c, h, w, 3))(canvas, height, width)
    np.testing.assert_array_equal(traced[1], np.where(num > 3, 4, num))
    np.testing.assert_array_equal(traced[0], starts[:, :3])
    column_cap = jax.jit(lambda c: mask_run_starts(c, height, width, 160, max_per_column=2))(canvas)
    col_major = masks.transpose(0, 2, 1).reshape(6, -1).astype(int)  # COCO's pixel order
    flags = np.diff(col_major, axis=1, prepend=0) != 0
    too_many = (flags.reshape(6, width, height).sum(axis=2) > 2).any(axis=1)
    assert too_many.any() == (height > 2)
    np.testing.assert_array_equal(column_cap[1], np.where(too_many, 161, num))


def test_mask_run_starts_refuse_an_image_bigger_than_the_canvas():
    canvas = np.ones((1, 4, 4), bool)
    _, num = mask_run_starts(jnp.asarray(canvas), 4, 6, 32)
    assert int(num[0]) == 33  # max_runs + 1: not codable here
    _, num = mask_run_starts(jnp.asarray(canvas), 4, 4, 32)
    assert int(num[0]) == 1


@pytest.mark.parametrize("height, width", [(300, 200), (1, 70000)])
def test_coco_rle_strings_of_long_and_negative_deltas(height, width):
    """Run lengths of several characters, and differences to the run two before that are negative
    (pycocotools writes those with a sign-extended last character)."""
    from mrcnn_jax import evaluate

    rng = np.random.default_rng(width)
    col_major = np.zeros(height * width, bool)
    cuts = np.sort(rng.choice(np.arange(1, height * width), 40, replace=False))
    for a, b in zip(cuts[::2], cuts[1::2], strict=True):
        col_major[a:b] = True
    masks = col_major.reshape(1, width, height).transpose(0, 2, 1)
    starts, num = mask_run_starts(jnp.asarray(masks), height, width, 64, max_per_column=64)
    chars, length = coco_rle_strings(starts, num, height, width, 512)
    got = bytes(np.asarray(chars[0, : int(length[0])])).decode()
    assert got == evaluate.encode_masks(masks)[0]["counts"]
