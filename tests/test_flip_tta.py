"""Horizontal-flip test-time augmentation (`model.test.flip_tta`, `inference.predict_flip_tta`)."""

import jax
import jax.numpy as jnp
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


def test_a_mirrored_box_samples_the_mirrored_features():
    """The flip convention (x -> w - x) against RoIAlign with half-pixel centres: pooling the
    mirrored box on the mirrored feature map gives the mirror of the original pooling. (w - 1
    would sample a pixel off.)"""
    from mrcnn_jax.ops.roi_align import roi_align

    rng = np.random.default_rng(2)
    stride, w = 4, 64  # the image is 64 px wide: 16 feature columns
    feats = rng.normal(size=(12, w // stride, 3)).astype(np.float32)
    boxes = np.array([[[3.0, 5.0, 40.5, 30.0], [0.0, 0.0, 64.0, 48.0], [50.2, 7.7, 61.0, 9.1]]],
                     np.float32)
    sizes = np.array([[48, w]], np.int32)
    mirrored_boxes = np.asarray(inference.flip_boxes(boxes, sizes))[0]
    for sampling in (2, 0):
        pool = lambda f, b, s=sampling: np.asarray(
            roi_align(jnp.asarray(f), jnp.asarray(b), 7, 1 / stride, s, aligned=True)
        )
        np.testing.assert_allclose(
            pool(feats[:, ::-1], mirrored_boxes)[:, :, ::-1], pool(feats, boxes[0]),
            rtol=1e-5, atol=1e-5,  # float32 rounding of the mirrored sample coordinates
        )
        off = np.asarray(inference.flip_boxes(boxes - [1, 0, 1, 0], sizes))[0]  # "w - 1 - x"
        assert not np.allclose(pool(feats[:, ::-1], off)[:, :, ::-1], pool(feats, boxes[0]))


def test_merging_views_keeps_the_best_of_each_class_and_the_padding_out():
    boxes = np.array([
        [0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10],  # one object, three times
        [0, 0, 10, 10],  # the same place, another class
        [20, 20, 30, 30],  # padding: never kept, whatever its score
        [40, 40, 50, 50],
    ], np.float32)
    scores = np.array([0.6, 0.9, 0.7, 0.5, 1.0, 0.2], np.float32)
    classes = np.array([1, 1, 1, 2, 1, 1], np.int32)
    valid = np.array([True, True, True, True, False, True])
    out = jax.device_get(inference.merge_detections(
        boxes, scores, classes, valid, nms_iou=0.5, max_detections=4
    ))
    got_boxes, got_scores, got_classes, got_valid = out
    np.testing.assert_array_equal(got_valid, [True, True, True, False])
    np.testing.assert_allclose(got_scores, [0.9, 0.5, 0.2, 0.0])
    np.testing.assert_array_equal(got_classes, [1, 2, 1, 0])
    np.testing.assert_array_equal(got_boxes[:3], boxes[[1, 3, 5]])
