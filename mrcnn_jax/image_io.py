"""Image files -> 8-bit RGB, upright as displayed: what the prepared datasets store and what
`--mode=predict` feeds the model, so both see the same pixels for the same file.

numpy and PIL only (no TensorFlow), so the prediction path can import it cheaply.
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import PIL.ImageOps


def to_rgb8(image: PIL.Image.Image) -> np.ndarray:
    """Any PIL image -> [H, W, 3] uint8 RGB: alpha dropped, palettes expanded, grayscale
    replicated (PIL's convert("RGB")); 16-bit ("I;16*", or "I" / "F" holding values above 255)
    scaled by 255 / 65535, where convert("RGB") would clip everything above 255 to white."""
    if image.mode.startswith("I") or image.mode == "F":
        a = np.asarray(image).astype(np.float64)
        # "I;16*" are 16-bit; plain "I" / "F" hold 16-bit data when anything exceeds 8 bits.
        if image.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a * (255.0 / 65535.0)
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_EXIF_ORIENTATION = 0x0112  # 1 = upright; 2-8 = mirrored and / or rotated; 5-8 swap the axes


def upright(
    image: PIL.Image.Image, expected_size: tuple[int, int] | None = None
) -> tuple[PIL.Image.Image, str | None]:
    """The image as it is displayed: its EXIF orientation applied, as detectron2's `read_image`
    and annotation tools that show photos upright do. -> (image, repair kind or None).

    expected_size: the (height, width) an annotation file declares. When the orientation swaps
    the axes and the stored pixels have that size but the upright image does not, the annotations
    were drawn on the stored pixels: the image is returned as stored ("image_exif_ignored").
    """
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the image
        orientation = 1
    if not 2 <= orientation <= 8:
        return image, None
    stored = (image.height, image.width)
    if orientation >= 5 and expected_size == stored and stored[0] != stored[1]:
        return image, "image_exif_ignored"
    return PIL.ImageOps.exif_transpose(image), "image_exif_applied"


def read_rgb(path: str) -> np.ndarray:
    """Any image file -> [H, W, 3] uint8 RGB as displayed (`upright`, `to_rgb8`): how the
    prepared datasets store it, so `--mode=predict` sees the pixels training and evaluation see."""
    with PIL.Image.open(path) as image:
        return to_rgb8(upright(image)[0])


def read_image(
    path: str, expected_size: tuple[int, int] | None = None
) -> tuple[bytes, int, int, str | None]:
    """Reads and fully decodes an image file -> (8-bit RGB JPEG / PNG bytes, height, width,
    repair kind of its EXIF orientation or None; see `upright`).

    RGB JPEGs without an EXIF rotation (all but a few hundred COCO images) are kept byte for byte;
    anything else is converted (`to_rgb8`), turned upright, and re-encoded as PNG. Raises
    FileNotFoundError, or another exception when the file cannot be decoded (truncated, not an
    image).
    """
    with open(path, "rb") as f:
        data = f.read()
    with PIL.Image.open(io.BytesIO(data)) as image:
        image.load()  # decode everything now: truncated files fail here, not mid-training
        shown, note = upright(image, expected_size)
        if shown is image and image.format == "JPEG" and image.mode == "RGB":
            return data, image.height, image.width, note
        rgb = to_rgb8(shown)
    return encode_png(rgb), rgb.shape[0], rgb.shape[1], note
