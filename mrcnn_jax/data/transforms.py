"""Per-example TF ops of the input pipeline: COCO RLE decoding, gt-mask crops at the gt boxes,
resize, normalise, pad, flip. Each works on one example inside `tf.data.Dataset.map` (or eagerly, as
`preprocess_for_eval` does for single images from users), so evaluation and prediction share one
resize / normalise implementation.

Conventions: boxes [N, 4] xyxy absolute pixels (width = x2 - x1, `ops.boxes`); masks are COCO
compressed RLE strings of the [height, width] mask in column-major order; images uint8 RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

_INT64_MAX = np.iinfo(np.int64).max


def rle_run_ends(rle: tf.Tensor) -> tf.Tensor:
    """COCO compressed RLE strings [N] -> cumulative run ends [N, R + 1] int64, int64-max padded.

    Run r covers the column-major pixel range [ends[r - 1], ends[r]); even runs are 0, odd runs 1,
    so pixel p has value (number of ends <= p) mod 2. Decoding (pycocotools `rleFrString`),
    vectorised over all characters of all strings:
        c = char - 48; 5 data bits each, least significant first; c & 0x20: more chars follow
        last char of a count with c & 0x10: negative, x -= 1 << 5 * nchars
        counts[m] += counts[m - 2] for m > 2     (delta coding: cumsums over odd m / even m >= 2)
    """
    n = tf.shape(rle, out_type=tf.int64)[0]
    chars = tf.strings.unicode_decode(rle, "UTF-8")  # the RLE alphabet is ASCII 48..111
    c = tf.cast(chars.flat_values, tf.int64) - 48
    last = tf.equal(tf.bitwise.bitwise_and(c, 0x20), 0)
    count_id = tf.cumsum(
        tf.cast(last, tf.int64), exclusive=True
    )  # which count each char is part of
    pos = tf.range(tf.size(c, out_type=tf.int64))
    k = pos - tf.gather(tf.math.segment_min(pos, count_id), count_id)  # char index within its count
    x = tf.math.segment_sum(tf.bitwise.left_shift(tf.bitwise.bitwise_and(c, 0x1F), 5 * k), count_id)
    negative = tf.math.segment_max(
        tf.cast(last & (tf.bitwise.bitwise_and(c, 0x10) > 0), tf.int64), count_id
    )
    nchars = tf.math.segment_max(k, count_id) + 1
    x -= negative * tf.bitwise.left_shift(tf.ones_like(nchars), 5 * nchars)
    rows = tf.boolean_mask(chars.value_rowids(), last)
    ragged = tf.RaggedTensor.from_value_rowids(x, rows, nrows=n)
    x = ragged.to_tensor()  # [N, R], zero padded
    m = tf.range(tf.shape(x, out_type=tf.int64)[1])[None, :]
    odd = tf.equal(m % 2, 1)
    even = tf.equal(m % 2, 0) & (m >= 2)
    zero = tf.zeros_like(x)
    runs = tf.where(odd, tf.cumsum(tf.where(odd, x, zero), axis=1), x)
    runs = tf.where(even, tf.cumsum(tf.where(even, x, zero), axis=1), runs)
    ends = tf.where(m < ragged.row_lengths()[:, None], tf.cumsum(runs, axis=1), _INT64_MAX)
    return tf.concat([ends, tf.fill([n, 1], tf.constant(_INT64_MAX, tf.int64))], axis=1)


def _taps(c: tf.Tensor, size: tf.Tensor):
    """1-D bilinear taps of centre coordinates c [N, S] on an axis of `size` pixels (as
    `ops.masks._inside_taps`): clamped to the edge pixel within half a pixel of the border, weight 0
    beyond it. -> (lo, hi) int64 [N, S], (w_lo, w_hi) float32 [N, S]."""
    size_f = tf.cast(size, tf.float32)
    valid = (c >= -0.5) & (c <= size_f - 0.5)
    c = tf.clip_by_value(c, 0.0, size_f - 1.0)
    lo = tf.floor(c)
    frac = c - lo
    lo = tf.cast(lo, tf.int64)
    hi = tf.minimum(lo + 1, tf.cast(size, tf.int64) - 1)
    return lo, hi, tf.where(valid, 1.0 - frac, 0.0), tf.where(valid, frac, 0.0)


def crop_masks(rle: tf.Tensor, boxes: tf.Tensor, height, width, size: int) -> tf.Tensor:
    """Each RLE mask bilinearly sampled at its box: rle [N] strings of [height, width] masks, boxes
    [N, 4] xyxy pixels -> [N, size, size] uint8 in {0, 1} (>= 0.5).

    The definition of `ops.masks.crop_and_resize`: output (i, j) samples centre coordinates
    (x1 + (j + 0.5) * (x2 - x1) / size - 0.5, likewise y). The full masks are never decoded: a
    pixel p (column-major) is 1 when an odd number of run ends are <= p, which is read either for
    each tap by binary search in the run ends, or for the rectangle of pixels that the taps of a
    mask span (`_rectangle_reader`), whichever reads fewer values: the rectangles, unless the
    boxes are so large that theirs exceed the 4 x size^2 taps per mask (the two give the same
    crops bit for bit).
    """
    n = tf.shape(rle)[0]
    boxes = tf.cast(boxes, tf.float32)
    t = (tf.range(size, dtype=tf.float32) + 0.5) / size
    xs = boxes[:, 0:1] + t[None, :] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5
    ys = boxes[:, 1:2] + t[None, :] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5
    y_lo, y_hi, wy_lo, wy_hi = _taps(ys, height)
    x_lo, x_hi, wx_lo, wx_hi = _taps(xs, width)
    ends, h = rle_run_ends(rle), tf.cast(height, tf.int64)

    def crops(bit):  # bit(k, x, y): bool [N, S (y), S (x)], the pixels at x tap k and y
        out = tf.zeros([n, size, size], tf.float32)
        for y, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
            for k, (x, wx) in enumerate(((x_lo, wx_lo), (x_hi, wx_hi))):
                out += tf.where(bit(k, x, y), wy[:, :, None] * wx[:, None, :], 0.0)
        return out

    def searched(k, x, y):
        pixel = tf.reshape(x[:, None, :] * h + y[:, :, None], [n, size * size])
        found = tf.searchsorted(ends, pixel, side="right")
        return tf.reshape(tf.bitwise.bitwise_and(found, 1) > 0, [n, size, size])

    c0, c1 = tf.reduce_min(x_lo, axis=1), tf.reduce_max(x_hi, axis=1)
    r0 = tf.reduce_min(y_lo, axis=1)
    nrows = tf.reduce_max(y_hi, axis=1) - r0 + 1
    area = tf.reduce_sum((c1 - c0 + 1) * nrows)
    out = tf.cond(
        area <= 4 * size * size * tf.cast(n, tf.int64),
        lambda: crops(_rectangle_reader(ends, h, c0, c1, r0, nrows, (x_lo, x_hi))),
        lambda: crops(searched),
    )
    return tf.cast(out >= 0.5, tf.uint8)


def _rectangle_reader(ends, h, c0, c1, r0, nrows, x_taps):
    """The pixels of mask k in columns c0[k]..c1[k], rows r0[k]..r0[k] + nrows[k] - 1, as a
    function bit(k, x, y) for `crop_masks` (x = x_taps[k]).

    Pixel (x, y) is 1 when the parity of the run ends <= its column's first row, plus the run
    ends counted from there to it, is odd: one binary search per column, and a cumulative sum
    over the rectangles (laid out column by column, one mask after the other) of the run ends
    that fall in them. Against a binary search for each of the 4 x 112^2 taps of ~7 masks, the
    crops of a COCO-like example (640 x 480) took 5.4 instead of 8.3 ms on one core."""
    ncols = c1 - c0 + 1
    offset = tf.cumsum(ncols * nrows, exclusive=True)
    col, row = ends // h, ends % h
    inside = (col >= c0[:, None]) & (col <= c1[:, None]) & (row > r0[:, None])
    inside &= row < (r0 + nrows)[:, None]
    at = offset[:, None] + (col - c0[:, None]) * nrows[:, None] + row - r0[:, None]
    at = tf.boolean_mask(at, inside)
    total = tf.reduce_sum(ncols * nrows)[None]
    counted = tf.cumsum(tf.scatter_nd(at[:, None], tf.ones_like(at, tf.int32), total))
    first_rows = (tf.ragged.range(c0, c1 + 1) * h + r0[:, None]).to_tensor()
    # One column more than needed: tf.searchsorted fails on [0, 0] queries (no masks).
    first_rows = tf.pad(first_rows, [[0, 0], [0, 1]])
    parity = tf.cast(tf.searchsorted(ends, first_rows, side="right"), tf.int32)
    starts, bases = [], []
    for x in x_taps:
        column = x - c0[:, None]
        starts.append(offset[:, None] + column * nrows[:, None])  # [N, S]: where column x begins
        bases.append(tf.gather(parity, column, batch_dims=1) - tf.gather(counted, starts[-1]))

    def bit(k, x, y):
        at = starts[k][:, None, :] + (y - r0[:, None])[:, :, None]  # [N, S (y), S (x)]
        return tf.bitwise.bitwise_and(bases[k][:, None, :] + tf.gather(counted, at), 1) > 0

    return bit


RESIZE_ROUNDINGS = ("half_up", "floor")
CHANNEL_ORDERS = ("RGB", "BGR")  # config.data.channel_order


def resize_scale(height, width, short_size, max_size, rounding: str = "half_up"):
    """detectron2's ResizeShortestEdge: scale = min(short / min(h, w), max_size / max(h, w)), sizes
    rounded half up (rounding="floor": torchvision's GeneralizedRCNNTransform, whose
    F.interpolate(recompute_scale_factor=True) floors h * scale in float64: a 480 x 640 image
    becomes 800 x 1066 there, 800 x 1067 in detectron2).
    -> (scale float32, resized height int32, resized width int32)."""
    if rounding not in RESIZE_ROUNDINGS:
        raise ValueError(
            f"config.data.resize_rounding must be one of {RESIZE_ROUNDINGS}, got {rounding!r}"
        )
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    scale = tf.minimum(
        tf.cast(short_size, tf.float64) / tf.minimum(h, w),
        tf.cast(max_size, tf.float64) / tf.maximum(h, w),
    )
    half = 0.5 if rounding == "half_up" else 0.0
    return tf.cast(scale, tf.float32), _side(h * scale, half), _side(w * scale, half)


def _side(length, half: float) -> tf.Tensor:
    """A resized side, float64 `length` rounded (floor(length + half)) to at least one pixel: a
    1 x 500 strip would otherwise round to no rows and stop the pipeline. -> int32."""
    return tf.cast(tf.maximum(tf.floor(length + half), 1.0), tf.int32)


def _resize(image: tf.Tensor, rh, rw, antialias: bool):
    """image [h, w, 3] -> (float32 [rh, rw, 3] bilinear, half-pixel centres; the factors the
    pixels were resized by, float32 [2] (rh / h, rw / w))."""
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    resized = tf.image.resize(
        tf.cast(image, tf.float32), tf.stack([rh, rw]), method="bilinear", antialias=antialias
    )
    scales = tf.cast(tf.cast(tf.stack([rh, rw]), tf.float64) / shape, tf.float32)
    return resized, scales


def normalize(
    image: tf.Tensor, mean: Sequence[float], std: Sequence[float], channel_order: str
) -> tf.Tensor:
    """image [..., 3] float32 RGB 0-255 -> (image in `channel_order` - mean) / std; mean and std are
    given in `channel_order` (detectron2's PIXEL_MEAN convention: BGR numbers for BGR models)."""
    if channel_order == "BGR":
        image = image[..., ::-1]
    elif channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"config.data.channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _resize_normalized(image, rh, rw, antialias, mean, std, channel_order, window=None):
    """`_resize` then `normalize`, with the normalisation on whichever has fewer pixels: the image
    as decoded, or the resized one (or its `window` (oy, ox, ch, cw), which alone is kept).
    Bilinear resizing (with or without antialiasing) is a weighted mean whose weights sum to 1
    along each axis, so it commutes with the per-channel affine normalisation up to float
    round-off (4.8e-7 here; torchvision normalises first). A COCO image enlarged to 800 px has
    2.8 x the pixels of the decoded one: normalising that instead took decoding and resizing a
    640 x 480 JPEG onto the 1344 x 1344 canvas from 20 to 15 ms on one core; a large photo shrunk
    to 1333 px keeps the normalisation after the resize. -> (float32 [rh, rw, 3] or the window;
    scales [2], as `_resize`)."""
    oy, ox, ch, cw = (0, 0, rh, rw) if window is None else window
    shape = tf.shape(image)
    decoded = tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64)

    def normalised_first():
        resized, scales = _resize(
            normalize(tf.cast(image, tf.float32), mean, std, channel_order), rh, rw, antialias
        )
        return resized[oy : oy + ch, ox : ox + cw], scales

    def normalised_after():
        resized, scales = _resize(image, rh, rw, antialias)
        return normalize(resized[oy : oy + ch, ox : ox + cw], mean, std, channel_order), scales

    kept = tf.cast(ch, tf.int64) * tf.cast(cw, tf.int64)
    return tf.cond(decoded <= kept, normalised_first, normalised_after)


def resize_normalize_pad(
    image: tf.Tensor,
    short_size,
    max_size: int,
    out_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str,
    rounding: str = "half_up",
    antialias: bool = False,
    pad: bool = True,
):
    """image [h, w, 3] uint8 RGB -> (image [H, W, 3] float32 normalised, padded bottom / right
    with 0 (pad=False: [rh, rw, 3] unpadded, for `tf.data`'s padded_batch, which pads as it
    batches); resized size [2] int32 (rh, rw); scales [2] float32 (rh / h, rw / w)). Bilinear with
    half-pixel centres: without antialiasing (torchvision's F.interpolate and the TF Model Garden),
    or with it (antialias=True: PIL's BILINEAR, hence detectron2's ResizeTransform, which widens
    the filter when it shrinks an image; within a level of PIL's uint8 output, equal to the plain
    filter when enlarging).

    The scales are the factors the pixels were actually resized by, one per axis (the rounding of
    rh and rw makes them differ from `resize_scale`'s by up to half a pixel over the side), which
    is how detectron2's ResizeTransform maps annotations and its detector_postprocess maps
    detections back, and torchvision's resize_boxes / transform.postprocess likewise."""
    shape = tf.shape(image)
    _, rh, rw = resize_scale(shape[0], shape[1], short_size, max_size, rounding)
    resized, scales = _resize_normalized(image, rh, rw, antialias, mean, std, channel_order)
    if pad:
        resized = tf.image.pad_to_bounding_box(resized, 0, 0, out_size[0], out_size[1])
    return resized, tf.stack([rh, rw]), scales


def jitter_resize_crop(
    image: tf.Tensor,
    boxes: tf.Tensor,
    uniforms: tf.Tensor,
    jitter: Sequence[float],
    out_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str,
    antialias: bool = False,
    pad: bool = True,
):
    """Large-scale jitter (TF Model Garden `resize_and_crop_image` with aug_scale_min / max;
    detectron2's ResizeScale + FixedSizeCrop): image [h, w, 3] uint8, boxes [N, 4] xyxy in it,
    uniforms [3] in [0, 1) (the scale, the row and the column offset draws).

    r = jitter[0] + u0 * (jitter[1] - jitter[0]); the image is resized (bilinear, as
    `resize_normalize_pad`) by s = min(r * H / h, r * W / w), to rh x rw = round(h * s) x
    round(w * s), so that it fits an r-times-scaled canvas H x W = out_size; where it is larger
    than the canvas a random H x W window is cut out, at offsets oy = round(u1 * max(rh - H, 0)),
    ox = round(u2 * max(rw - W, 0)), normalised and padded to the canvas.
    -> (image [H, W, 3] float32 (pad=False: its size, unpadded); its size [2] int32,
    min(rh - oy, H) x min(rw - ox, W); scales
    [2] float32 (rh / h, rw / w); offsets [2] float32 (oy, ox); boxes [N, 4] in the output frame,
    clipped to it: a box outside the window comes out empty)."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    u = tf.cast(uniforms, tf.float64)
    r = jitter[0] + u[0] * (jitter[1] - jitter[0])
    s = tf.minimum(r * out_size[0] / h, r * out_size[1] / w)
    rh, rw = _side(h * s, 0.5), _side(w * s, 0.5)

    def offset(draw, extra):
        return tf.cast(tf.floor(draw * tf.cast(tf.maximum(extra, 0), tf.float64) + 0.5), tf.int32)

    oy, ox = offset(u[1], rh - out_size[0]), offset(u[2], rw - out_size[1])
    ch, cw = tf.minimum(rh - oy, out_size[0]), tf.minimum(rw - ox, out_size[1])
    window, scales = _resize_normalized(
        image, rh, rw, antialias, mean, std, channel_order, window=(oy, ox, ch, cw)
    )
    if pad:
        window = tf.image.pad_to_bounding_box(window, 0, 0, out_size[0], out_size[1])
    offsets = tf.cast(tf.stack([oy, ox]), tf.float32)
    sx, sy, fx, fy = scales[1], scales[0], offsets[1], offsets[0]
    fw, fh = tf.cast(cw, tf.float32), tf.cast(ch, tf.float32)
    out_boxes = tf.stack(
        [
            tf.clip_by_value(boxes[:, 0] * sx - fx, 0.0, fw),
            tf.clip_by_value(boxes[:, 1] * sy - fy, 0.0, fh),
            tf.clip_by_value(boxes[:, 2] * sx - fx, 0.0, fw),
            tf.clip_by_value(boxes[:, 3] * sy - fy, 0.0, fh),
        ],
        axis=1,
    )
    return window, tf.stack([ch, cw]), scales, offsets, out_boxes


def mirror_boxes(boxes: tf.Tensor, width) -> tf.Tensor:
    """Boxes [N, 4] xyxy in an image of `width` pixels, mirrored left to right (its own inverse)."""
    w = tf.cast(width, boxes.dtype)
    return tf.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)


def flip_left_right(image: tf.Tensor, boxes: tf.Tensor, crops: tf.Tensor, width):
    """Horizontal flip of image [h, w, 3], boxes [N, 4] in an image of `width` pixels and their mask
    crops [N, S, S]. The crop of the flipped mask at the flipped box is the mirrored crop: sample
    (j) of the flipped box lands on sample (S - 1 - j) of the original."""
    return image[:, ::-1], mirror_boxes(boxes, width), crops[:, :, ::-1]


def check_resize_fits(data_config, train: bool) -> None:
    """Resized sides are <= the max size; so both sides of `data.image_size` must be >= it.
    (Training with `data.train_scale_jitter` crops to the canvas instead: nothing to check.)"""
    if train and data_config.get("train_scale_jitter", ()):
        return
    key = "train_max_size" if train else "test_max_size"
    max_size = data_config[key]
    h, w = data_config.image_size
    if max_size > min(h, w):
        raise ValueError(
            f"config.data.{key}={max_size} does not fit"
            f" config.data.image_size={tuple(data_config.image_size)}:"
            f" a resized image's long side reaches {key} in either orientation, so both sides of"
            " image_size must be >= it"
        )


def preprocess_for_eval(
    image: np.ndarray, data_config
) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """One user image [h, w, 3] uint8 RGB -> (float32 [H, W, 3] normalised and padded to
    data_config.image_size, resized (rh, rw), scales float32 [2] (rh / h, rw / w)), exactly as the
    evaluation pipeline does it."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [h, w, 3] RGB image, got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image has no pixels: shape {image.shape}")
    check_resize_fits(data_config, train=False)
    out, size, scale = resize_normalize_pad(
        tf.convert_to_tensor(image),
        data_config.test_min_size,
        data_config.test_max_size,
        tuple(data_config.image_size),
        tuple(data_config.pixel_mean),
        tuple(data_config.pixel_std),
        data_config.channel_order,
        data_config.get("resize_rounding", "half_up"),
        bool(data_config.get("resize_antialias", False)),
    )
    return out.numpy(), (int(size[0]), int(size[1])), scale.numpy()
