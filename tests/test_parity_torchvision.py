"""Output parity with torchvision's `maskrcnn_resnet50_fpn` after weight conversion, stage by stage.

torchvision's model is built with seeded random weights (nothing is downloaded), made numerically
lively (BatchNorm statistics of the test image, larger head weights, so the RPN and the classifier
produce spread scores and 100 detections), converted with `convert.convert`, and both models see the
same normalised 224 x 320 image (torchvision's transform leaves that size as is). Skipped without
torch / torchvision. The measured differences are in docs/weights.md.
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if "tensorflow" in sys.modules and "triton" not in sys.modules:
    # Importing triton (torchvision.ops pulls it in through torch._dynamo) after tensorflow
    # segfaults with tensorflow-cpu 2.21 / torch 2.14: skip rather than crash the session. Run this
    # file alone, or import torchvision before tensorflow (e.g. in conftest.py).
    pytest.skip("tensorflow was imported before torchvision", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.models.detection.rpn import concat_box_prediction_layers  # noqa: E402

from configs import torchvision_r50_fpn  # noqa: E402
from mrcnn_jax import convert, inference, mask_rcnn  # noqa: E402
from mrcnn_jax.mask_rcnn import MaskRCNN  # noqa: E402
from mrcnn_jax.ops.anchors import image_anchors  # noqa: E402
from mrcnn_jax.ops.masks import paste_masks_torchvision  # noqa: E402
from tests.torchvision_reference import H, W, model_and_image, nhwc  # noqa: E402

pytestmark = pytest.mark.torch


def _torchvision_run():
    """torchvision's model, its normalised input and every stage's outputs (numpy)."""
    tv, image, x = model_and_image()
    r = types.SimpleNamespace(image=image.numpy(), x=nhwc(x))
    with torch.no_grad():
        body = tv.backbone.body(x)
        fpn = tv.backbone.fpn(body)
        r.body = [nhwc(body[k]) for k in ("0", "1", "2", "3")]
        r.fpn = [nhwc(fpn[k]) for k in ("0", "1", "2", "3", "pool")]
        feats = list(fpn.values())
        objectness, deltas = concat_box_prediction_layers(*tv.rpn.head(feats))
        r.objectness, r.deltas = objectness[:, 0].numpy(), deltas.numpy()
        images = ImageList(x, [(H, W)])
        r.anchors = tv.rpn.anchor_generator(images, feats)[0].numpy()
        props, _ = tv.rpn(images, fpn)
        r.proposals = props[0].numpy()
        pooled = tv.roi_heads.box_roi_pool(fpn, props, images.image_sizes)
        cls, box = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
        r.box_pooled, r.cls_logits, r.box_deltas = nhwc(pooled), cls.numpy(), box.numpy()
        dets, _ = tv.roi_heads(fpn, props, images.image_sizes)
        r.boxes, r.scores = dets[0]["boxes"].numpy(), dets[0]["scores"].numpy()
        r.labels, r.mask_probs = dets[0]["labels"].numpy(), dets[0]["masks"][:, 0].numpy()
        mask_pooled = tv.roi_heads.mask_roi_pool(fpn, [dets[0]["boxes"]], images.image_sizes)
        mask_logits = tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(mask_pooled))
        r.mask_pooled, r.mask_logits = nhwc(mask_pooled), nhwc(mask_logits)
        pasted = tv.transform.postprocess(dets, images.image_sizes, [(H, W)])
        r.pasted = pasted[0]["masks"][:, 0].numpy()
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    return r, state


@pytest.fixture(scope="module")
def parity():
    tv, state = _torchvision_run()
    config = torchvision_r50_fpn.get_config()
    config.data.num_classes = 90  # keep torchvision's 91 rows: its COCO label ids 1..90
    config.data.image_size = (H, W)
    converted = convert.convert(state, config.model, layout="torchvision")
    model = mask_rcnn.build_model(config.model)
    variables = jax.tree.map(jnp.asarray, converted.variables)
    return types.SimpleNamespace(tv=tv, config=config, model=model, variables=variables)


@pytest.fixture(scope="module")
def ours(parity):
    """Our backbone / FPN / RPN outputs on torchvision's normalised image."""
    model, variables = parity.model, parity.variables

    def features(v, x):
        def run(m, x):
            body = m.backbone(x, train=False)
            feats = m.fpn(body)
            return body, feats, m.rpn(feats)

        return model.apply(v, x, method=run)

    body, feats, (logits, deltas) = jax.jit(features)(variables, jnp.asarray(parity.tv.x))
    return types.SimpleNamespace(body=body, feats=feats, logits=logits, deltas=deltas)


def close(ours, theirs, atol, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=atol, rtol=rtol)


def test_backbone_and_fpn_features(parity, ours):
    # ~4e-6 on values up to ~3: float32 round-off after 50+ conv layers.
    for k, level in enumerate(("c2", "c3", "c4", "c5")):
        close(ours.body[level], parity.tv.body[k], atol=2e-5)
    for k in range(5):
        close(ours.feats[f"p{k + 2}"], parity.tv.fpn[k], atol=2e-5)


def test_anchors_rpn_outputs_and_proposals(parity, ours):
    cfg = parity.config.model
    anchors, counts = inference.anchors_for(cfg, (H, W))
    mine = image_anchors(
        anchors, np.array([H, W]), level_counts=counts, strides=cfg.anchor_strides,
        size_divisibility=cfg.rpn.size_divisibility, grid=cfg.anchor_grid,
    )
    np.testing.assert_array_equal(mine, parity.tv.anchors)  # rounded cell anchors: exact
    p6 = slice(sum(counts[:-1]), None)
    assert not np.array_equal(anchors[p6], parity.tv.anchors[p6])  # P6 at a stride of 56
    close(ours.logits[0], parity.tv.objectness, atol=2e-5)
    close(ours.deltas[0], parity.tv.deltas, atol=2e-5)
    fn = jax.jit(lambda lg, d, a, s: inference.batch_proposals(cfg, lg, d, a, s, counts, train=False))
    boxes, scores, valid = fn(ours.logits, ours.deltas, jnp.asarray(anchors), jnp.array([[H, W]]))
    n = int(valid.sum())
    assert n == len(parity.tv.proposals) == 1000
    boxes, scores = np.asarray(boxes[0, :n]), np.asarray(scores[0, :n])
    # The same boxes in the same order, except that proposals whose scores are within the
    # logits' round-off (2e-5, so 5e-6 after the sigmoid) may come in either order.
    group = np.concatenate([[0], np.cumsum(np.diff(scores) < -5e-6)])
    assert len(np.unique(group)) > 0.9 * n  # near-ties are few: the order is checked
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        close(_lexsorted(boxes[rows]), _lexsorted(parity.tv.proposals[rows]), atol=2e-4)


def _lexsorted(boxes):
    return boxes[np.lexsort(np.round(boxes, 2).T[::-1])]


def _pool_and_heads(parity, ours, boxes, size, method):
    """RoIAlign of `boxes` [R, 4] on our FPN features -> (pooled [R, size, size, C], head outputs)."""

    def run(v, feats, b):
        pooled = inference.pool(feats, b[None], size, parity.config.model.roi)[0]
        return pooled, parity.model.apply(v, pooled, method=method)

    return jax.jit(run)(parity.variables, ours.feats, jnp.asarray(boxes))


def test_box_head_on_the_same_boxes(parity, ours):
    """RoIAlign 7x7 (aligned=False, sampling 2, LevelMapper) and the box head on torchvision's
    proposals."""
    pooled, (logits, deltas) = _pool_and_heads(parity, ours, parity.tv.proposals, 7, MaskRCNN.box_predictions)
    close(pooled, parity.tv.box_pooled, atol=2e-5)
    close(logits, parity.tv.cls_logits, atol=2e-5)
    close(deltas.reshape(len(deltas), -1), parity.tv.box_deltas, atol=2e-5)


def test_mask_head_on_the_same_boxes(parity, ours):
    pooled, logits = _pool_and_heads(parity, ours, parity.tv.boxes, 14, MaskRCNN.mask_logits)
    close(pooled, parity.tv.mask_pooled, atol=2e-5)
    close(logits, parity.tv.mask_logits, atol=2e-5)


def test_final_detections_and_masks_are_identical(parity):
    predict = inference.make_predict_fn(parity.model, parity.config.model, (H, W))
    dets = predict(parity.variables, jnp.asarray(parity.tv.x), jnp.array([[H, W]]))
    _assert_torchvisions_detections(parity.tv, jax.device_get(dets))


def test_detections_on_a_larger_canvas_are_torchvisions(parity):
    """The image on a 320 x 416 canvas with noise beyond it, as our pipeline pads every image to
    one canvas: with model.feature_padding="image" the features, proposals and RoIAlign borders
    are those of the image alone, which is what torchvision computes."""
    canvas = (320, 416)
    x = np.random.default_rng(0).normal(size=(1, *canvas, 3)).astype(np.float32)
    x[:, :H, :W] = parity.tv.x
    predict = inference.make_predict_fn(parity.model, parity.config.model, canvas)
    dets = predict(parity.variables, jnp.asarray(x), jnp.array([[H, W]]))
    _assert_torchvisions_detections(parity.tv, jax.device_get(dets))


def _assert_torchvisions_detections(tv, dets):
    n = int(dets.valid[0].sum())
    assert n == len(tv.boxes) == 100  # the 100-detection cut is exercised
    np.testing.assert_array_equal(dets.classes[0, :n], tv.labels)
    close(dets.scores[0, :n], tv.scores, atol=1e-6)
    close(dets.boxes[0, :n], tv.boxes, atol=2e-4)
    close(dets.masks[0, :n], tv.mask_probs, atol=1e-5)
    pasted = paste_masks_torchvision(dets.masks[0, :n], dets.boxes[0, :n], H, W)
    close(pasted, tv.pasted, atol=1e-5)
    np.testing.assert_array_equal(pasted > 0.5, tv.pasted > 0.5)  # torchvision's COCO threshold


def test_our_normalisation_matches_torchvision_transform(parity):
    """The input pipeline's normalise with the config's mean / std on 0-255 RGB pixels."""
    pytest.importorskip("tensorflow")
    from mrcnn_jax.data import transforms

    d = parity.config.data
    pixels = parity.tv.image.transpose(1, 2, 0) * 255.0
    ours = transforms.normalize(pixels.astype(np.float32), d.pixel_mean, d.pixel_std, d.channel_order)
    close(np.asarray(ours)[None], parity.tv.x, atol=1e-5)


@pytest.mark.parametrize("size", [(800, 1066), (1066, 800), (800, 1199), (427, 640), (224, 320)])
def test_canvas_anchors_are_torchvisions_for_each_image(size):
    """On the 1344 x 1344 canvas, the anchors that exist for an image (`inside_padded_image`)
    placed on torchvision's grid (`image_anchors`) are exactly what torchvision's AnchorGenerator
    makes for that image padded to 32, in the same order: P6 included, whose stride is 61 on
    an 800-pixel side."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from mrcnn_jax.ops.anchors import inside_padded_image

    cfg = torchvision_r50_fpn.get_config().model
    canvas = (1344, 1344)
    anchors, counts = inference.anchors_for(cfg, canvas)
    image = np.array(size)
    inside = np.asarray(inside_padded_image(anchors, image, 32))
    mine = np.asarray(image_anchors(
        anchors, image, level_counts=counts, strides=cfg.anchor_strides, size_divisibility=32,
        grid="torchvision",
    ))[inside]
    hp, wp = (-(-s // 32) * 32 for s in size)
    generator = AnchorGenerator(
        tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.anchor_ratios),) * len(cfg.anchor_sizes)
    )
    feats = [torch.zeros(1, 1, -(-hp // s), -(-wp // s)) for s in cfg.anchor_strides]
    theirs = generator(ImageList(torch.zeros(1, 3, hp, wp), [size]), feats)[0].numpy()
    np.testing.assert_array_equal(mine, theirs)


def test_floor_rounding_gives_torchvisions_resized_sizes():
    """data.resize_rounding="floor" (configs/torchvision_r50_fpn.py) against torchvision's own
    resize on 300 random image sizes (only the output size is compared)."""
    pytest.importorskip("tensorflow")
    from torchvision.models.detection.transform import _resize_image_and_masks

    from mrcnn_jax.data import transforms

    d = torchvision_r50_fpn.get_config().data
    rng = np.random.default_rng(0)
    for h, w in rng.integers(100, 2500, size=(300, 2)):
        out, _ = _resize_image_and_masks(
            torch.empty(1, int(h), int(w)), float(d.test_min_size), float(d.test_max_size), None
        )
        _, rh, rw = transforms.resize_scale(
            int(h), int(w), d.test_min_size, d.test_max_size, d.resize_rounding
        )
        assert (int(rh), int(rw)) == tuple(out.shape[-2:]), (h, w)
