"""Horizontal-flip test-time augmentation (`model.test.flip_tta`, `inference.predict_flip_tta`)."""

import jax
import numpy as np

from configs import tiny
from mrcnn_jax import inference, mask_rcnn


def test_flip_images_mirrors_each_image_within_its_width():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 6, 2)).astype(np.float32)
    sizes = np.array([[3, 4], [2, 6]], np.int32)
    got = np.asarray(inference.flip_images(images, sizes))
    want = images.copy()
    want[0, :, :4] = images[0, :, 3::-1]  # the padding (columns 4, 5) stays
    want[1] = images[1, :, ::-1]
    np.testing.assert_array_equal(got, want)
    boxes = np.array([[[0.5, 1.0, 2.0, 3.0]], [[1.0, 0.0, 6.0, 2.0]]], np.float32)
    np.testing.assert_array_equal(
        inference.flip_boxes(boxes, sizes), [[[2.0, 1.0, 3.5, 3.0]], [[0.0, 0.0, 5.0, 2.0]]]
    )


def test_flip_tta_gives_mirrored_detections_of_a_mirrored_image():
    """TTA(mirror(image)) is mirror(TTA(image)): both merge the same two views' detections. The
    masks are the two views' mean, so they are mirrored too. (A wrong flip of the image, the
    boxes or the masks, or a merge that kept one view, would break the symmetry.)"""
    config = tiny.get_config()
    config.model.test.score_threshold = 0.0  # random weights: keep low-scoring detections
    config.model.test.flip_tta = True
    size = tuple(config.data.image_size)
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(3), size)
    rng = np.random.default_rng(1)
    h, w = size[0] - 8, size[1] - 12  # smaller than the canvas: flipped within its width
    image = np.zeros((*size, 3), np.float32)
    image[:h, :w] = rng.normal(size=(h, w, 3))
    mirrored = image.copy()
    mirrored[:h, :w] = image[:h, w - 1::-1]
    sizes = np.array([[h, w], [h, w]], np.int32)
    predict_fn = inference.make_predict_fn(model, config.model, size)
    det = jax.device_get(predict_fn(variables, np.stack([image, mirrored]), sizes))
    n = int(det.valid[0].sum())
    assert n == config.model.test.detections_per_image == int(det.valid[1].sum())
    a = np.argsort(-det.scores[0][:n], kind="stable")
    b = np.argsort(-det.scores[1][:n], kind="stable")
    np.testing.assert_allclose(det.scores[1][b], det.scores[0][a], rtol=1e-5)
    np.testing.assert_array_equal(det.classes[1][b], det.classes[0][a])
    back = np.asarray(inference.flip_boxes(det.boxes[1:, :n][:, b], sizes[1:]))[0]
    np.testing.assert_allclose(back, det.boxes[0][a], atol=1e-3)
    np.testing.assert_allclose(det.masks[1][b][..., ::-1], det.masks[0][a], atol=1e-5)
