"""Plain numpy references for the data tests, written straightforwardly (loops where clearer)."""

import math

import numpy as np


def runs_of(mask: np.ndarray) -> list[int]:
    """COCO run lengths of a [H, W] 0/1 mask: column-major, first a (possibly empty) run of 0."""
    flat = mask.astype(np.uint8).T.reshape(-1)
    runs, value, length = [], 0, 0
    for v in flat:
        if v == value:
            length += 1
        else:
            runs.append(length)
            value, length = v, 1
    runs.append(length)
    return runs


def crop(mask: np.ndarray, box, size: int) -> np.ndarray:
    """The gt-mask crop by its definition: output (i, j) is the bilinear sample at centre
    coordinates (x1 + (j + 0.5) * w / size - 0.5, y1 + (i + 0.5) * h / size - 0.5), the edge pixel
    within half a pixel outside the image, 0 beyond; thresholded at 0.5 -> uint8 [size, size]."""
    h, w = mask.shape
    x1, y1, x2, y2 = (np.float32(v) for v in box)
    out = np.zeros((size, size), np.uint8)

    def taps(c, n):
        if c < -0.5 or c > n - 0.5:
            return [(0, np.float32(0.0))]
        c = min(max(c, np.float32(0.0)), np.float32(n - 1))
        lo = int(math.floor(c))
        frac = np.float32(c - lo)
        return [(lo, np.float32(1.0) - frac), (min(lo + 1, n - 1), frac)]

    for i in range(size):
        yc = y1 + (np.float32(i) + np.float32(0.5)) / np.float32(size) * (y2 - y1) - np.float32(0.5)
        for j in range(size):
            xc = (
                x1
                + (np.float32(j) + np.float32(0.5)) / np.float32(size) * (x2 - x1)
                - np.float32(0.5)
            )
            v = np.float32(0.0)
            for yy, wy in taps(yc, h):
                for xx, wx in taps(xc, w):
                    v += np.float32(mask[yy, xx]) * (wy * wx)
            out[i, j] = v >= 0.5
    return out


def resize_scale(h: int, w: int, short: int, max_size: int) -> tuple[float, int, int]:
    """detectron2 ResizeShortestEdge: (scale, new h, new w)."""
    scale = min(short / min(h, w), max_size / max(h, w))
    return scale, int(math.floor(h * scale + 0.5)), int(math.floor(w * scale + 0.5))


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and edge clamping, no antialiasing (float64)."""

    def axis(n_in, n_out):
        scale = n_in / n_out
        src = (np.arange(n_out) + 0.5) * scale - 0.5
        lo = np.floor(src)
        frac = src - lo
        lo_i = np.clip(lo.astype(int), 0, n_in - 1)
        hi_i = np.clip(np.ceil(src).astype(int), 0, n_in - 1)
        return lo_i, hi_i, frac

    image = image.astype(np.float64)
    y0, y1, fy = axis(image.shape[0], out_h)
    x0, x1, fx = axis(image.shape[1], out_w)
    top = image[y0][:, x0] * (1 - fx)[None, :, None] + image[y0][:, x1] * fx[None, :, None]
    bottom = image[y1][:, x0] * (1 - fx)[None, :, None] + image[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def decode_image(data: bytes) -> np.ndarray:
    import io

    import PIL.Image

    with PIL.Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def expected_element(ex: dict, d, flip: bool, short: int, max_size: int) -> dict:
    """What the pipeline must produce for stored example `ex` (numpy, as TFDS decodes it) under
    data config `d`, a given flip and shortest side: straight from the definitions."""
    from pycocotools import mask as mask_utils

    h, w = int(ex["height"]), int(ex["width"])
    image = decode_image(ex["image"])
    obj = ex["objects"]
    order = [k for k in range(len(obj["id"])) if not obj["is_crowd"][k]]
    order += [k for k in range(len(obj["id"])) if obj["is_crowd"][k]]
    order = order[: d.max_instances]
    boxes = np.array([obj["bbox"][k] for k in order], np.float32).reshape(-1, 4)
    masks = [mask_utils.decode({"size": [h, w], "counts": obj["rle"][k]}) for k in order]
    if flip:
        image = image[:, ::-1]
        masks = [m[:, ::-1] for m in masks]
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    _, rh, rw = resize_scale(h, w, short, max_size)
    scale = np.array([rh / h, rw / w])  # the factors the pixels are resized by, per axis
    resized = resize_bilinear(image, rh, rw)
    if d.channel_order == "BGR":
        resized = resized[..., ::-1]
    m, s = d.max_instances, d.mask_crop_size
    out = {
        "image": (resized - np.array(d.pixel_mean)) / np.array(d.pixel_std),
        "image_sizes": (rh, rw),
        "scale": scale,
        "boxes": np.minimum(boxes * scale[[1, 0, 1, 0]], [rw, rh, rw, rh]),
        "classes": np.full(m, -1),
        "crowd": np.zeros(m, bool),
        "masks": np.zeros((m, s, s), np.uint8),
        "num": len(order),
        "orig_size": (h, w),
    }
    for i, k in enumerate(order):
        out["classes"][i] = obj["label"][k]
        out["crowd"][i] = obj["is_crowd"][k]
        out["masks"][i] = crop(masks[i], boxes[i], s)
    return out


def check_element(batch: dict, i: int, ex: dict, d, variants, atol=1e-3):
    """Asserts element i of `batch` is the reference of `ex` under one of `variants`
    [(flip, short, max_size)]; returns the variant that matched (decided by scale and image)."""
    for flip, short, max_size in variants:
        exp = expected_element(ex, d, flip, short, max_size)
        rh, rw = exp["image_sizes"]
        if not np.allclose(batch["scales"][i], exp["scale"], rtol=1e-6, atol=0):
            continue
        if not np.allclose(batch["images"][i][:rh, :rw], exp["image"], atol=atol):
            continue
        assert not batch["images"][i][rh:].any() and not batch["images"][i][:, rw:].any()
        assert tuple(batch["image_sizes"][i]) == (rh, rw)
        assert tuple(batch["orig_sizes"][i]) == exp["orig_size"]
        assert batch["image_ids"][i] == ex["image_id"] and batch["example_valid"][i]
        n = exp["num"]
        np.testing.assert_allclose(batch["gt_boxes"][i][:n], exp["boxes"], atol=1e-3)
        assert not batch["gt_boxes"][i][n:].any()
        np.testing.assert_array_equal(batch["gt_classes"][i], exp["classes"])
        np.testing.assert_array_equal(batch["gt_valid"][i], np.arange(d.max_instances) < n)
        np.testing.assert_array_equal(batch["gt_is_crowd"][i], exp["crowd"])
        np.testing.assert_array_equal(batch["gt_masks"][i], exp["masks"])
        return flip, short
    raise AssertionError(
        f"element {i} (image {batch['image_ids'][i]}) matches no variant {variants}"
    )


def expected_jittered_element(
    ex: dict, d, flip: bool, rh: int, rw: int, oy: int, ox: int
) -> dict:
    """The large-scale-jitter element of `ex` for a given flip, resized size and window offset,
    from the definitions: the (mirrored) image resized to rh x rw, the canvas-sized window at
    (oy, ox) cut out; boxes scaled, shifted and clipped to the window, empty ones dropped, then
    non-crowd first and cut to max_instances; each mask cropped at its output box mapped back to
    the original image."""
    from pycocotools import mask as mask_utils

    h, w = int(ex["height"]), int(ex["width"])
    H, W = d.image_size
    image = decode_image(ex["image"])
    obj = ex["objects"]
    n_all = len(obj["id"])
    boxes = np.array(obj["bbox"], np.float32).reshape(-1, 4)
    masks = [mask_utils.decode({"size": [h, w], "counts": obj["rle"][k]}) for k in range(n_all)]
    if flip:
        image = image[:, ::-1]
        masks = [m[:, ::-1] for m in masks]
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    ch, cw = min(rh - oy, H), min(rw - ox, W)
    resized = resize_bilinear(image, rh, rw)[oy : oy + ch, ox : ox + cw]
    if d.channel_order == "BGR":
        resized = resized[..., ::-1]
    sy, sx = np.float32(rh / h), np.float32(rw / w)
    out_boxes = np.stack(
        [
            np.clip(boxes[:, 0] * sx - ox, 0, cw),
            np.clip(boxes[:, 1] * sy - oy, 0, ch),
            np.clip(boxes[:, 2] * sx - ox, 0, cw),
            np.clip(boxes[:, 3] * sy - oy, 0, ch),
        ],
        axis=1,
    )
    nonempty = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
    kept = [k for k in range(n_all) if nonempty[k]]
    order = [k for k in kept if not obj["is_crowd"][k]] + [k for k in kept if obj["is_crowd"][k]]
    order = order[: d.max_instances]
    m, s = d.max_instances, d.mask_crop_size
    out = {
        "image": (resized - np.array(d.pixel_mean)) / np.array(d.pixel_std),
        "image_sizes": (ch, cw),
        "boxes": out_boxes[order].reshape(-1, 4),
        "classes": np.full(m, -1),
        "crowd": np.zeros(m, bool),
        "masks": np.zeros((m, s, s), np.uint8),
        "num": len(order),
        "dropped": n_all - len(kept),
    }
    for i, k in enumerate(order):
        x1, y1, x2, y2 = out_boxes[k]
        back = ((x1 + ox) / sx, (y1 + oy) / sy, (x2 + ox) / sx, (y2 + oy) / sy)
        out["classes"][i] = obj["label"][k]
        out["crowd"][i] = obj["is_crowd"][k]
        out["masks"][i] = crop(masks[k], back, s)
    return out
