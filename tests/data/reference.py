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
