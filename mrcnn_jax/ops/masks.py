"""Instance-mask resampling: gt crops for the input pipeline, mask targets cut from those crops inside
the graph (TF Model Garden), and pasting predicted masks back into the image (detectron2, torchvision).

Coordinates: image pixel k covers [k, k + 1) ("pixel-index" coordinates, the box convention of
`ops.boxes`); bilinear sampling works in centre coordinates, where the centre of pixel k is at k, so a
continuous image position x samples at x - 0.5.

`crop_and_resize`, `paste_masks` and `paste_masks_torchvision` take an `xp` keyword: with numpy inputs
they run in plain numpy on the host (the input pipeline, and evaluation at each image's original size,
where a jit per COCO image size would recompile hundreds of times); with jax arrays, or under jit, they
run in jax.numpy. One implementation serves both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _array_module(*arrays):
    """jax.numpy if any input is a jax array (or tracer), else numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _matmul(xp):
    # Full float32 matmuls under jax: TPU's default bf16 passes would move pixels across the threshold.
    if xp is jnp:
        return functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    return np.matmul


def _inside_taps(c, size: int, ok, xp):
    """1-D bilinear taps, zero outside the sampled area.

    c: [R, P] centre coordinates on an axis of `size` samples; ok: [R] bool (False -> all weights 0).
    Returns (lo, hi) int32 [R, P] and weights (w_lo, w_hi) [R, P]:
        valid = -0.5 <= c <= size - 0.5        # the area the samples cover
        c = clip(c, 0, size - 1); lo = floor(c); hi = min(lo + 1, size - 1)
    so values are clamped to the edge sample within half a pixel of the border and 0 beyond it.
    """
    valid = (c >= -0.5) & (c <= size - 0.5) & ok[:, None]
    c = xp.clip(c, 0.0, size - 1.0)
    lo = xp.floor(c)
    frac = c - lo
    # Clip after the cast: NaN coordinates (degenerate boxes) give garbage ints but stay in range.
    lo = xp.clip(lo.astype(np.int32), 0, size - 1)
    hi = xp.minimum(lo + 1, size - 1)
    w_lo = xp.where(valid, 1.0 - frac, 0.0).astype(np.float32)
    w_hi = xp.where(valid, frac, 0.0).astype(np.float32)
    return lo, hi, w_lo, w_hi


def _sample(flat, base, width: int, y_taps, x_taps):
    """Separable bilinear sampling of row-major images stacked in `flat` [N].

    base: [R] offset of each sample's image in `flat`; y_taps, x_taps: `_inside_taps` outputs [R, P] /
    [R, Q]. Returns [R, P, Q]: sum over (ty, tx) of w_y[r, p] w_x[r, q] flat[base + y * width + x].
    """
    y_lo, y_hi, wy_lo, wy_hi = y_taps
    x_lo, x_hi, wx_lo, wx_hi = x_taps
    out = 0.0
    for y, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        rows = (base[:, None] + y * width)[:, :, None]
        for x, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            out = out + flat[rows + x[:, None, :]] * (wy[:, :, None] * wx[:, None, :])
    return out


def _sample_centres(lo, hi, output_size: int, xp):
    """lo, hi: [R] interval ends -> [R, out] positions of the out bin centres (pixel-index coords)."""
    t = (xp.arange(output_size, dtype=np.float32) + 0.5) / output_size
    return lo[:, None] + t[None, :] * (hi - lo)[:, None]


def crop_and_resize(image, boxes, output_size: int, *, xp=None):
    """Bilinear crops of one image at boxes, out x out samples at the bin centres.

    image: [H, W] float (e.g. a binary mask); boxes: [R, 4] xyxy pixels. Returns [R, out, out] float32:
    output (i, j) samples centre coordinates (x1 + (j + 0.5) * (x2 - x1) / out - 0.5, likewise y),
    zero outside the image (see `_inside_taps`). For boxes inside the image this is exactly RoIAlign
    with aligned=True and one sample per bin (the detectron2 mask target); the two differ only in the
    half-pixel band around the image, which RoIAlign clamps to the edge pixel.
    """
    xp = xp or _array_module(image, boxes)
    image = xp.asarray(image, dtype=np.float32)
    boxes = xp.asarray(boxes, dtype=np.float32)
    h, w = image.shape
    ok = xp.ones(boxes.shape[:1], dtype=bool)
    ys = _sample_centres(boxes[:, 1], boxes[:, 3], output_size, xp) - 0.5
    xs = _sample_centres(boxes[:, 0], boxes[:, 2], output_size, xp) - 0.5
    base = xp.zeros(boxes.shape[:1], dtype=np.int32)
    return _sample(
        image.reshape(-1), base, w, _inside_taps(ys, h, ok, xp), _inside_taps(xs, w, ok, xp)
    )


def mask_targets_from_crops(
    gt_crops: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    rois: jnp.ndarray,
    matched_gt: jnp.ndarray,
    output_size: int = 28,
) -> jnp.ndarray:
    """Soft mask targets of RoIs, cut from gt masks stored only as crops at their gt boxes.

    gt_crops: [M, S, S] each gt mask resampled to its gt box (`crop_and_resize`); gt_boxes: [M, 4];
    rois: [R, 4]; matched_gt: [R] int32 index into M. Returns [R, out, out] float32 in [0, 1]
    (the caller thresholds at 0.5), ~ crop_and_resize(full mask, roi) up to the double resampling.

        x  = roi_x1 + (j + 0.5) * roi_w / out              # output pixel centre, image pixels
        u  = (x - gt_x1) / gt_w * S - 0.5                   # the same point in crop centre coords
        target[i, j] = bilinear(crop, v, u), 0 where the point is outside the gt box
    (the mask is empty outside its box). A gt box with zero width or height gives an empty target.
    """
    num_gt, s = gt_crops.shape[0], gt_crops.shape[-1]
    matched_gt = jnp.clip(matched_gt.astype(jnp.int32), 0, num_gt - 1)  # padded RoIs may carry -1
    g = gt_boxes.astype(jnp.float32)[matched_gt]
    rois = rois.astype(jnp.float32)
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    ok = (gw > 0) & (gh > 0)
    gw, gh = jnp.where(ok, gw, 1.0), jnp.where(ok, gh, 1.0)
    xs = _sample_centres(rois[:, 0], rois[:, 2], output_size, jnp)
    ys = _sample_centres(rois[:, 1], rois[:, 3], output_size, jnp)
    u = (xs - g[:, 0:1]) / gw[:, None] * s - 0.5
    v = (ys - g[:, 1:2]) / gh[:, None] * s - 0.5
    base = matched_gt * (s * s)
    flat = gt_crops.astype(jnp.float32).reshape(-1)
    return _sample(flat, base, s, _inside_taps(v, s, ok, jnp), _inside_taps(u, s, ok, jnp))


def _tent_weights(u, size: int, ok, xp):
    """u: [N, P] mask centre coordinates -> [N, P, size] weights max(0, 1 - |u - k|).

    That is bilinear interpolation with zero padding outside the mask (grid_sample, padding "zeros").
    """
    k = xp.arange(size, dtype=np.float32)
    w = xp.maximum(0.0, 1.0 - xp.abs(u[:, :, None] - k))
    return xp.where(ok[:, None, None], w, 0.0).astype(np.float32)


def paste_masks(masks, boxes, height: int, width: int, threshold: float | None = 0.5, *, xp=None):
    """detectron2's `paste_masks_in_image`: masks in their box frames -> full-image masks.

    masks: [N, M, M] probabilities; boxes: [N, 4] xyxy pixels; height, width: the image (static).
    Returns [N, height, width] bool (prob >= threshold), or the float32 probabilities when threshold
    is None. Pixel centre x + 0.5 maps to mask centre coordinate u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5,
    bilinear with zeros outside the mask (grid_sample, align_corners=False). Boxes with zero or negative
    width / height paste nothing. Separable: prob = Wy [H, M] @ mask @ Wx [M, W] per box.
    """
    xp = xp or _array_module(masks, boxes)
    masks = xp.asarray(masks, dtype=np.float32)
    boxes = xp.asarray(boxes, dtype=np.float32)
    m = masks.shape[-1]
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    ok = (x2 > x1) & (y2 > y1)
    bw, bh = xp.where(ok, x2 - x1, 1.0), xp.where(ok, y2 - y1, 1.0)
    px = xp.arange(width, dtype=np.float32) + 0.5
    py = xp.arange(height, dtype=np.float32) + 0.5
    u = (px[None, :] - x1[:, None]) / bw[:, None] * m - 0.5
    v = (py[None, :] - y1[:, None]) / bh[:, None] * m - 0.5
    wx, wy = _tent_weights(u, m, ok, xp), _tent_weights(v, m, ok, xp)
    return _separable_paste(wy, masks, wx, xp, None if threshold is None else (lambda p: p >= threshold))


def _footprint(weights):
    """weights [N, S, M] (numpy) -> per-box [lo, hi) of the rows with a nonzero weight ([0, 0) if none)."""
    nonzero = np.any(weights != 0, axis=2)  # [N, S]
    any_ = nonzero.any(axis=1)
    lo = np.where(any_, np.argmax(nonzero, axis=1), 0)
    hi = np.where(any_, nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
    return lo, hi


def _separable_paste(wy, masks, wx, xp, compare=None):
    """Per box Wy [H, M] @ mask [M, M] @ Wx[W, M]^T -> [N, H, W] float32, or bool `compare(probs)`.

    Under jax: two batched matmuls over the whole image (static shapes). In numpy (host evaluation
    at each image's own size): only on the rows and columns where the box's weights are nonzero,
    the rest of the image is exactly 0 (compare(0) when thresholding), and a bool result is written
    directly, never as a full float32 image; 100 detections at 800 x 1216 paste in ~15 ms instead
    of 0.1-0.3 s spent multiplying zeros (docs/performance.md).
    """
    if xp is not np:
        mm = _matmul(xp)
        probs = mm(mm(wy, masks), xp.swapaxes(wx, 1, 2))
        return probs if compare is None else compare(probs)
    # Stored as [N, W, H] and returned as its [N, H, W] transpose: each mask is then column-major,
    # the layout COCO's RLE encoder reads, so encoding needs no 3-D transposing copy.
    shape = (masks.shape[0], wx.shape[1], wy.shape[1])
    if compare is None:
        out = np.zeros(shape, np.float32)
    else:
        out = np.full(shape, bool(compare(np.float32(0.0))), bool)
    (ylo, yhi), (xlo, xhi) = _footprint(wy), _footprint(wx)
    for i in range(masks.shape[0]):
        if yhi[i] > ylo[i] and xhi[i] > xlo[i]:
            rows = wy[i, ylo[i] : yhi[i]] @ masks[i]
            probs = rows @ wx[i, xlo[i] : xhi[i]].T
            out[i, xlo[i] : xhi[i], ylo[i] : yhi[i]] = (probs if compare is None else compare(probs)).T
    return out.transpose(0, 2, 1)


def _torchvision_axis_weights(lo, hi, size: int, m: int, padding: int, xp):
    """Resize weights of torchvision's paste along one axis: [N, size, m].

    lo, hi: [N] int, the expanded and truncated box ends (inclusive). The padded mask (m + 2 padding
    samples) is resized to n = max(hi - lo + 1, 1) pixels by F.interpolate(bilinear,
    align_corners=False), float32 as PyTorch's kernel:
        src = max(mp / n * (j + 0.5) - 0.5, 0);  i0 = min(floor(src), mp - 1);  lam = src - i0
        i1 = i0 + (i0 < mp - 1);   out[j] = (1 - lam) pad[i0] + lam pad[i1]
    and pixel p of the image takes out[p - lo] for lo <= p <= hi. The zero padding drops out of the
    weights, leaving columns for the m real samples.
    """
    mp = m + 2 * padding
    n = xp.maximum(hi - lo + 1, 1)
    pos = xp.arange(size, dtype=np.int32)[None, :]
    inside = (pos >= lo[:, None]) & (pos <= hi[:, None])
    j = xp.where(inside, pos - lo[:, None], 0).astype(np.float32)
    scale = np.float32(mp) / n.astype(np.float32)
    src = xp.maximum(scale[:, None] * (j + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = xp.minimum(xp.floor(src), mp - 1.0)
    lam = xp.clip(src - i0, 0.0, 1.0)[:, :, None]
    i0 = i0.astype(np.int32)[:, :, None]
    i1 = xp.where(i0 < mp - 1, i0 + 1, i0)
    k = xp.arange(m, dtype=np.int32)[None, None, :] + padding
    w = xp.where(i0 == k, 1.0 - lam, 0.0) + xp.where(i1 == k, lam, 0.0)
    return xp.where(inside[:, :, None], w, 0.0).astype(np.float32)


def paste_masks_torchvision(
    masks, boxes, height: int, width: int, padding: int = 1, threshold: float | None = None, *, xp=None
):
    """torchvision's `paste_masks_in_image` at fixed shape: masks [N, M, M], boxes [N, 4] xyxy pixels
    -> probabilities [N, height, width] float32, or with `threshold` the bool masks prob > threshold
    (torchvision's COCO evaluation keeps prob > 0.5).

    As torchvision: pad the mask with `padding` zeros, scale the box about its centre by
    (M + 2 padding) / M, truncate it to int64 (toward zero), resize the padded mask bilinearly
    (align_corners=False) to the integer box of (x2 - x1 + 1) x (y2 - y1 + 1) pixels, paste it with
    its top-left at (x1, y1), cut to the image. Done as separable per-box weights (see
    `_torchvision_axis_weights`) and two matmuls.
    """
    xp = xp or _array_module(masks, boxes)
    masks = xp.asarray(masks, dtype=np.float32)
    boxes = xp.asarray(boxes, dtype=np.float32)
    m = masks.shape[-1]
    # torchvision multiplies float32 boxes by the Python float (M + 2p) / M, i.e. in float32.
    scale = np.float32((m + 2 * padding) / m)
    w_half = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    y_c = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    x0, x1 = (xp.trunc(v).astype(np.int32) for v in (x_c - w_half, x_c + w_half))
    y0, y1 = (xp.trunc(v).astype(np.int32) for v in (y_c - h_half, y_c + h_half))
    wx = _torchvision_axis_weights(x0, x1, width, m, padding, xp)
    wy = _torchvision_axis_weights(y0, y1, height, m, padding, xp)
    return _separable_paste(wy, masks, wx, xp, None if threshold is None else (lambda p: p > threshold))


def mask_run_starts(masks, height, width, max_runs: int, max_per_column: int = 16):
    """Where COCO's run-length encoding of each mask starts a new run, computed at fixed shape.

    masks: [K, Hc, Wc] bool on a canvas at least as big as the image; height, width: the image's
    size (ints or int32 scalars, may be traced). Only the top-left height x width region is read,
    in COCO's column-major order, p = x * height + y.
    Returns (starts [K, max_runs] int32, num [K] int32): the positions p where a pixel differs
    from the one before it (before p = 0 counts as 0, so a mask whose first pixel is set starts
    with p = 0), ascending, padded with height * width; num is how many there are. The
    uncompressed RLE is then counts = diff([0, *starts[:num], height * width]), which
    `coco_rle_strings` compresses. A mask that does not fit (an image bigger than the canvas,
    more than max_runs starts, or more than max_per_column in one image column) gets
    num = max_runs + 1 and only partial starts: the caller encodes it some other way.

    No scatter and no scan over the pixels (an accelerator does both slowly): the first
    max_per_column starts of every column are found by max_per_column first-True reductions
    along the column, and output slot j reads its column from the running start counts.
    """
    import jax
    import jax.numpy as jnp

    k, hc, wc = masks.shape
    height = jnp.asarray(height, jnp.int32)
    width = jnp.asarray(width, jnp.int32)
    v = jnp.swapaxes(masks, 1, 2)  # [K, Wc, Hc]: one image column per row, as COCO reads it
    ys, xs = jnp.arange(hc, dtype=jnp.int32), jnp.arange(wc, dtype=jnp.int32)
    inside = (xs[:, None] < width) & (ys[None, :] < height)
    v = v & inside
    above = jnp.pad(v[:, :, :-1], ((0, 0), (0, 0), (1, 0)))  # pixel y - 1 of the same column
    col_end = jax.lax.dynamic_index_in_dim(v, height - 1, axis=2, keepdims=False)  # [K, Wc]
    prev_col_end = jnp.pad(col_end[:, :-1], ((0, 0), (1, 0)))  # last pixel of column x - 1
    prev = jnp.where(ys[None, None, :] == 0, prev_col_end[:, :, None], above)
    change = (v != prev) & inside  # [K, Wc, Hc]
    per_column = change.sum(axis=2, dtype=jnp.int32)  # [K, Wc]
    num = per_column.sum(axis=1)

    def next_start(after, _):  # the first start below row `after` of every column (hc: none)
        later = change & (ys > after[..., None])
        row = jnp.where(later.any(axis=2), jnp.argmax(later, axis=2).astype(jnp.int32), hc)
        return row, row

    first = jnp.full((k, wc), -1, jnp.int32)
    rows = jnp.moveaxis(jax.lax.scan(next_start, first, None, length=max_per_column)[1], 0, 2)

    ends = jnp.cumsum(per_column, axis=1)  # [K, Wc] starts up to and including column x
    slots = jnp.arange(max_runs, dtype=jnp.int32)
    col = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)
    col = jnp.minimum(col, wc - 1).astype(jnp.int32)  # [K, max_runs]
    rank = slots - (jnp.take_along_axis(ends, col, 1) - jnp.take_along_axis(per_column, col, 1))
    rank = jnp.clip(rank, 0, max_per_column - 1)
    row = jnp.take_along_axis(rows.reshape(k, wc * max_per_column), col * max_per_column + rank, 1)
    starts = jnp.where(slots < num[:, None], col * height + row, height * width).astype(jnp.int32)
    fits = (num <= max_runs) & jnp.all(per_column <= max_per_column, axis=1)
    fits &= (height <= hc) & (width <= wc)  # else part of the image is not on the canvas
    return starts, jnp.where(fits, num, max_runs + 1).astype(jnp.int32)


def coco_rle_strings(starts, num, height, width, max_chars: int):
    """COCO's compressed RLE strings (pycocotools' `rleToString`) of masks given by their run
    starts (`mask_run_starts`), at fixed shape.

    starts [K, R] int32, num [K] int32 (<= R; larger: not codable), height, width: the image.
    Returns (chars [K, max_chars] uint8, length [K] int32): the string of mask k is
    chars[k, :length[k]] as ASCII; length is -1 where it does not fit in max_chars or num > R.

    The run lengths are c_i = diff([0, *starts, height * width]); from the fourth on, each is
    written as its difference to the one two before (d_i = c_i - c_{i-2}), 5 bits per character
    from the lowest, bit 0x20 set while more characters follow (until what is left is 0, or -1
    for a negative number whose last character has 0x10 set), plus 48.
    """
    import jax
    import jax.numpy as jnp

    k, r = starts.shape
    size = jnp.asarray(height, jnp.int32) * jnp.asarray(width, jnp.int32)
    counts = jnp.diff(
        starts.astype(jnp.int32), axis=1, prepend=jnp.zeros((k, 1), jnp.int32),
        append=jnp.broadcast_to(size, (k, 1)),
    )  # [K, R + 1]: run lengths, then zeros past the last run
    index = jnp.arange(r + 1)
    before = jnp.pad(counts, ((0, 0), (2, 0)))[:, : r + 1]
    value = jnp.where(index > 2, counts - before, counts)
    chunk = jnp.arange(7, dtype=jnp.int32)  # an int32 takes at most 7 characters of 5 bits
    bits = (value[..., None] >> (5 * chunk)) & 0x1F
    rest = value[..., None] >> jnp.minimum(5 * (chunk + 1), 31)
    more = jnp.where((bits & 0x10) != 0, rest != -1, rest != 0)
    chars_of = (bits | jnp.where(more, 0x20, 0)) + 48  # [K, R + 1, 7]
    used = 1 + jnp.sum(jnp.cumprod(more, axis=-1), axis=-1)  # characters of each run length
    used = jnp.where(index < (num + 1)[:, None], used, 0)
    ends = jnp.cumsum(used, axis=1)  # [K, R + 1]
    length = ends[:, -1]
    pos = jnp.arange(max_chars, dtype=jnp.int32)
    run = jax.vmap(lambda e: jnp.searchsorted(e, pos, side="right"))(ends)
    run = jnp.minimum(run, r).astype(jnp.int32)  # [K, max_chars]: the run length pos belongs to
    first = jnp.take_along_axis(ends - used, run, 1)
    within = jnp.clip(pos - first, 0, 6)
    flat = chars_of.reshape(k, (r + 1) * 7)
    chars = jnp.take_along_axis(flat, run * 7 + within, 1)
    chars = jnp.where(pos < length[:, None], chars, 0).astype(jnp.uint8)
    fits = (num <= r) & (length <= max_chars)
    return chars, jnp.where(fits, length, -1).astype(jnp.int32)
