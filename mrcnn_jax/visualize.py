"""Overlay pictures of detections: masks blended in distinct colours, boxes, "name score" labels.

Host-side numpy + PIL only (no fonts are downloaded: PIL's built-in default font). `overlay` takes
ORIGINAL-image pixels, as `mrcnn_jax.evaluate.image_detections` returns them; `example_overlay` /
`save_batch_overlays` rebuild the picture of an evaluation batch example (un-normalise, un-pad,
resize back to the original size) and draw its detections on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mrcnn_jax.evaluate import image_detections

# A fixed palette of 20 well separated, saturated RGB colours; instance i gets PALETTE[i % 20],
# so the same detections always get the same colours.
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (220, 190, 255),
        (170, 110, 40),
        (255, 250, 200),
        (128, 0, 0),
        (170, 255, 195),
        (128, 128, 0),
        (255, 215, 180),
        (0, 0, 128),
        (128, 128, 128),
    ],
    dtype=np.uint8,
)
MASK_ALPHA = 0.5
BOX_WIDTH = 2


def colour(i: int) -> tuple[int, int, int]:
    """The palette colour (r, g, b) of the i-th drawn instance."""
    return tuple(int(c) for c in PALETTE[i % len(PALETTE)])


def _label_text(label: int, score: float, class_names: Sequence[str]) -> str:
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    return f"{name} {score:.2f}"


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    # Rec. 601 luma: black text on light fills, white on dark ones.
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _draw_label(draw: ImageDraw.ImageDraw, font, box: np.ndarray, text: str, fill, size) -> None:
    """A filled rectangle with `text` just above the box's top-left corner (inside if no room)."""
    width, height = size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = int(np.clip(np.floor(box[0]), 0, max(width - tw, 0)))
    y = int(np.floor(box[1])) - th
    if y < 0:  # no room above the box: put the label inside its top edge
        y = int(np.clip(np.floor(box[1]), 0, max(height - th, 0)))
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=fill)
    draw.text((x + 2 - left, y + 2 - top), text, fill=_text_colour(fill), font=font)


def overlay(
    image: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray | None,
    classes: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
) -> np.ndarray:
    """Draws the detections with score >= `score_threshold` on a copy of `image`.

    image: [H, W, 3] uint8 RGB; boxes: [N, 4] xyxy original pixels; masks: [N, H, W] bool or None;
    classes: [N] int contiguous labels (class_names[label], index 0 = "background");
    scores: [N] float. Returns [H, W, 3] uint8. Kept instance i (in input order) gets colour(i):
    its mask blended at alpha 0.5, its box outline and a "name 0.93" label on a filled background.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    classes = np.asarray(classes).reshape(-1)
    keep = np.nonzero(scores >= score_threshold)[0]

    out = image.astype(np.float32)
    if masks is not None:
        masks = np.asarray(masks, bool)
        for i, k in enumerate(keep):
            m = masks[k]
            out[m] = (1.0 - MASK_ALPHA) * out[m] + MASK_ALPHA * PALETTE[i % len(PALETTE)]
    pil = Image.fromarray(np.round(out).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for i, k in enumerate(keep):
        x1, y1, x2, y2 = boxes[k]
        draw.rectangle([x1, y1, x2, y2], outline=colour(i), width=BOX_WIDTH)
    # Labels after every box, so no outline is drawn across a label.
    for i, k in enumerate(keep):
        text = _label_text(int(classes[k]), float(scores[k]), class_names)
        _draw_label(draw, font, boxes[k], text, colour(i), pil.size)
    return np.asarray(pil, dtype=np.uint8)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a [H, W, 3] uint8 image as PNG, creating the parent folder."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")


def grid(
    images: Sequence[np.ndarray], cols: int, pad: int = 4, background: int = 255
) -> np.ndarray:
    """Tiles [H_i, W_i, 3] uint8 images row-major into `cols` columns -> one uint8 image.

    Every cell is (max H, max W); smaller images sit at their cell's top-left; `pad` pixels of
    `background` separate the cells and frame the picture.
    """
    if not images:
        raise ValueError("grid needs at least one image")
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    ch = max(im.shape[0] for im in images)
    cw = max(im.shape[1] for im in images)
    out = np.full(
        (rows * ch + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), background, np.uint8
    )
    for n, im in enumerate(images):
        r, c = divmod(n, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        out[y : y + im.shape[0], x : x + im.shape[1]] = im
    return out


def denormalize(
    image: np.ndarray,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    channel_order: str = "RGB",
) -> np.ndarray:
    """Undoes the input normalisation: [H, W, 3] float -> [H, W, 3] uint8 RGB.

    pixel_mean / pixel_std are in the image's own channel order (as detectron2's PIXEL_MEAN);
    channel_order "BGR" flips the channels back to RGB.
    """
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be RGB or BGR, got {channel_order!r}")
    pixels = np.asarray(image, np.float32) * np.asarray(pixel_std, np.float32)
    pixels = np.clip(np.round(pixels + np.asarray(pixel_mean, np.float32)), 0, 255).astype(np.uint8)
    return pixels[..., ::-1].copy() if channel_order == "BGR" else pixels


def example_overlay(
    dets,
    batch,
    index: int,
    class_names: Sequence[str],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    channel_order: str = "RGB",
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    mask_paste: str = "detectron2",
) -> np.ndarray:
    """The overlay of batch example `index` at its original size -> [orig H, orig W, 3] uint8.

    dets: Detections-like of the batch (numpy); batch: images [B, H, W, 3] normalised and padded,
    image_sizes [B, 2], orig_sizes [B, 2], scales [B, 2]. The resized image is cut out of its padding
    and resized back (bilinear) to the original size, where the detections are drawn.
    """
    h, w = (int(v) for v in np.asarray(batch["image_sizes"])[index])
    oh, ow = (int(v) for v in np.asarray(batch["orig_sizes"])[index])
    resized = np.asarray(batch["images"][index])[:h, :w]
    picture = Image.fromarray(denormalize(resized, pixel_mean, pixel_std, channel_order))
    picture = np.asarray(picture.resize((ow, oh), Image.Resampling.BILINEAR), np.uint8)
    d = image_detections(dets, batch, index, mask_threshold, mask_paste)
    return overlay(
        picture, d["boxes"], d["masks"], d["classes"], d["scores"], class_names, score_threshold
    )


def save_batch_overlays(
    dets, batch, out_dir: str, class_names: Sequence[str], **kwargs
) -> list[str]:
    """Writes OUT_DIR/<image_id>.png for every real example of the batch -> the paths written.

    kwargs go to `example_overlay` (pixel_mean, pixel_std, channel_order, thresholds). Suits
    `run_evaluation(on_batch=...)`; pasting at full size costs time, so limit it to a few batches.
    """
    paths = []
    image_ids = np.asarray(batch["image_ids"])
    for b in np.nonzero(np.asarray(batch["example_valid"], bool))[0]:
        path = os.path.join(out_dir, f"{int(image_ids[b])}.png")
        save_png(path, example_overlay(dets, batch, int(b), class_names, **kwargs))
        paths.append(path)
    return paths
