"""Image files -> upright 8-bit RGB: EXIF orientation, modes, and the same pixels for prepared
datasets and for `--mode=predict`."""

import io

import numpy as np
import PIL.Image
import pytest

from mrcnn_jax import image_io, predict
from mrcnn_jax.data import coco_folder

# EXIF orientation -> how the stored array is shown (numpy, independent of PIL's transpose).
SHOWN = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _png_with_orientation(path, array, orientation):
    image = PIL.Image.fromarray(array)
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    image.save(path, format="PNG", exif=exif.tobytes())
    return str(path)


def _decode(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("orientation", sorted(SHOWN))
def test_exif_orientation_is_applied_as_displayed(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    path = _png_with_orientation(tmp_path / "a.png", stored, orientation)
    expected = SHOWN[orientation](stored)
    data, h, w, note = image_io.read_image(path, expected.shape[:2])
    np.testing.assert_array_equal(_decode(data), expected)
    assert (h, w) == expected.shape[:2]
    assert note == (None if orientation == 1 else "image_exif_applied")
    # --mode=predict reads the same pixels as the prepared dataset stores.
    np.testing.assert_array_equal(predict.read_rgb(path), expected)


def test_exif_rotation_ignored_when_the_annotation_sized_the_stored_pixels(tmp_path):
    stored = np.random.default_rng(0).integers(0, 256, (5, 8, 3), dtype=np.uint8)
    path = _png_with_orientation(tmp_path / "a.png", stored, 6)
    data, h, w, note = image_io.read_image(path, (5, 8))  # the stored size, not the upright 8 x 5
    np.testing.assert_array_equal(_decode(data), stored)
    assert (h, w, note) == (5, 8, "image_exif_ignored")
    # Without a declared size (or the upright one) the rotation is applied.
    assert image_io.read_image(path)[1:] == (8, 5, "image_exif_applied")
    assert image_io.read_image(path, (8, 5))[1:] == (8, 5, "image_exif_applied")


def test_rotated_rgb_jpeg_is_reencoded_upright(tmp_path):
    stored = np.zeros((6, 10, 3), np.uint8)
    stored[:2, :3] = 255  # a white block in the stored top-left corner
    exif = PIL.Image.Exif()
    exif[0x0112] = 3
    path = tmp_path / "a.jpg"
    PIL.Image.fromarray(stored).save(path, format="JPEG", quality=100, exif=exif.tobytes())
    data, h, w, note = image_io.read_image(str(path), (6, 10))
    shown = _decode(data)
    assert (h, w, note) == (6, 10, "image_exif_applied") and data[:4] == b"\x89PNG"
    assert shown[-2:, -3:].min() > 200 and shown[:2, :3].max() < 50  # block now bottom-right


def test_coco_folder_logs_the_exif_repair(tmp_path):
    stored = np.random.default_rng(1).integers(0, 256, (5, 8, 3), dtype=np.uint8)
    _png_with_orientation(tmp_path / "a.png", stored, 8)
    meta = {"id": 7, "file_name": "a.png", "height": 8, "width": 5}
    loaded = coco_folder._load(str(tmp_path), meta)
    log = coco_folder.coco_utils.RepairLog()
    ex = coco_folder.build_example(meta, [], loaded, {}, log)
    assert (ex["height"], ex["width"]) == (8, 5)
    assert log.as_dict() == {"image_exif_applied": {"count": 1, "first_ids": [7]}}


def test_sixteen_bit_images_are_scaled_alike_for_datasets_and_predict(tmp_path):
    g16 = np.array([[0, 4000, 65535], [257, 1000, 30000]], np.uint16)
    path = tmp_path / "g.png"
    PIL.Image.fromarray(g16).save(path)
    expected = np.repeat(np.round(g16 / 257.0).astype(np.uint8)[..., None], 3, -1)
    np.testing.assert_array_equal(predict.read_rgb(str(path)), expected)
    np.testing.assert_array_equal(_decode(image_io.read_image(str(path))[0]), expected)
