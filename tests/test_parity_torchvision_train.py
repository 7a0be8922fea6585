"""Training parity with torchvision's `maskrcnn_resnet50_fpn`: after weight conversion, the same
image and ground truth give torchvision's five losses and its gradients for every parameter.

The inference parity (`test_parity_torchvision.py`) covers the forward pass up to the detections;
this covers what a training run adds: anchor matching with its low-quality rule, the RoI matcher
with the gt boxes appended to the proposals, the box encodings, the loss definitions and their
normalisers, the mask head on the positives, and the backward pass through all of it (RoIAlign's
scatter, the RPN's proposals held constant, the convolutions' custom gradients, the frozen stages'
image-by-image loop).

Sampling is random on both sides, with different generators. So both take every candidate: the
samplers' batch sizes are above the candidate counts (torchvision's sampler then keeps all
positives and negatives, ours fills its slots with them), and each loss is a sum over the same
set on both sides. torchvision divides the RPN losses by the anchors it sampled, detectron2 and we
by `rpn.batch_size_per_image`: ours are rescaled by the ratio of the two.

Mask targets differ by construction (docs/weights.md): torchvision's are its RoIAlign
(aligned=False) of the full-size gt masks, kept soft; ours are detectron2's 0.5-binarised
resampling, from the gt masks cropped to 112 x 112 by the input pipeline. For the exact checks
torchvision is given ours (`roi_heads.project_masks_on_boxes` patched); a second torchvision pass
with its own targets bounds the difference they make to the loss.

Skipped without torch / torchvision (CI does not install them).
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if "tensorflow" in sys.modules and "triton" not in sys.modules:
    # As in test_parity_torchvision.py: triton imported after tensorflow segfaults.
    pytest.skip("tensorflow was imported before torchvision", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from torchvision.models.detection import roi_heads  # noqa: E402

from configs import torchvision_r50_fpn  # noqa: E402
from mrcnn_jax import convert, losses, mask_rcnn  # noqa: E402
from mrcnn_jax.ops.masks import crop_and_resize, mask_targets_from_crops  # noqa: E402
from tests.torchvision_reference import H, W, model_and_image, nhwc  # noqa: E402

pytestmark = pytest.mark.torch

# Four instances on the 224 x 320 image (ellipses inscribed in their boxes), COCO label ids.
BOXES = np.array(
    [[20, 30, 120, 150], [150, 40, 300, 200], [60, 100, 200, 210], [240, 150, 310, 220]], np.float32
)
LABELS = np.array([3, 17, 1, 44], np.int64)
MAX_INSTANCES = 16
# Above any candidate count: the RPN's ~17.9k anchors on this image; the RoI heads' 2000
# proposals + 4 gt boxes. Our RoI slots are padded to the proposals + gt at most.
TAKE_ALL = 10**6
RPN_SLOTS = 65536
ROI_SLOTS = 2000 + MAX_INSTANCES
MASK_SLOTS = 256  # positives that get a mask; the test checks the image has fewer
LOSSES = {  # ours -> torchvision's
    "loss_rpn_cls": "loss_objectness",
    "loss_rpn_box": "loss_rpn_box_reg",
    "loss_cls": "loss_classifier",
    "loss_box": "loss_box_reg",
    "loss_mask": "loss_mask",
}


def _ellipses():
    yy, xx = np.mgrid[:H, :W] + 0.5
    out = []
    for x1, y1, x2, y2 in BOXES:
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        out.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0)
    return np.stack(out).astype(np.uint8)


def _crops(masks, size):
    """The gt masks cropped to their boxes as the input pipeline stores them."""
    crops = [
        crop_and_resize(m.astype(np.float32), b[None], size)[0]
        for m, b in zip(masks, BOXES, strict=True)
    ]
    return (np.stack(crops) >= 0.5).astype(np.uint8)


class _Counting:
    """torchvision's sampler with the number of positives and negatives it drew recorded."""

    def __init__(self, sampler):
        self.sampler, self.counts = sampler, []

    def __call__(self, labels):
        pos, neg = self.sampler(labels)
        self.counts = [(int(p.sum()), int(n.sum())) for p, n in zip(pos, neg, strict=True)]
        return pos, neg


def _torchvision_training():
    """torchvision in training mode on the image: losses, sample counts, and the gradients of the
    four box losses and of the mask loss, each {parameter name: array}."""
    tv, image, x = model_and_image()
    for s in (tv.rpn.fg_bg_sampler, tv.roi_heads.fg_bg_sampler):
        s.batch_size_per_image = TAKE_ALL
    tv.rpn.fg_bg_sampler = _Counting(tv.rpn.fg_bg_sampler)
    tv.roi_heads.fg_bg_sampler = _Counting(tv.roi_heads.fg_bg_sampler)
    tv.train()
    for m in tv.modules():  # frozen norms, as our frozen_bn: the statistics stay the image's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    state = {k: v.detach().numpy().copy() for k, v in tv.state_dict().items()}
    masks = _ellipses()
    target = {
        "boxes": torch.from_numpy(BOXES),
        "labels": torch.from_numpy(LABELS),
        "masks": torch.from_numpy(masks),
    }
    crops = _crops(masks, torchvision_r50_fpn.get_config().data.mask_crop_size)
    r = types.SimpleNamespace(state=state, x=nhwc(x), crops=crops)
    with torch.no_grad():  # torchvision's own (soft) mask targets
        r.own_losses = {k: float(v) for k, v in tv([image], [target]).items()}


    def our_targets(gt_masks, boxes, matched_idxs, size):
        rois, matched = boxes.detach().numpy(), matched_idxs.numpy()
        soft = mask_targets_from_crops(
            jnp.asarray(crops, jnp.float32), jnp.asarray(BOXES), jnp.asarray(rois),
            jnp.asarray(matched), output_size=size,
        )
        return torch.from_numpy(np.asarray(soft >= 0.5, np.float32))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(roi_heads, "project_masks_on_boxes", our_targets)
        out = tv([image], [target])
    r.losses = {k: float(v.detach()) for k, v in out.items()}
    r.rpn_counts = tv.rpn.fg_bg_sampler.counts[0]
    r.roi_counts = tv.roi_heads.fg_bg_sampler.counts[0]
    named = [(k, p) for k, p in tv.named_parameters() if p.requires_grad]
    box_total = sum(v for k, v in out.items() if k != "loss_mask")
    r.grads = {}
    for part, loss in (("box", box_total), ("mask", out["loss_mask"])):
        grads = torch.autograd.grad(
            loss, [p for _, p in named], retain_graph=True, allow_unused=True
        )
        r.grads[part] = {
            k: np.zeros(p.shape, np.float32) if g is None else g.numpy()
            for (k, p), g in zip(named, grads, strict=True)
        }
    return r


def _config(freeze_at):
    config = torchvision_r50_fpn.get_config()
    config.data.num_classes = 90  # torchvision's 91 rows: its COCO label ids 1..90
    config.data.image_size = (H, W)
    config.data.max_instances = MAX_INSTANCES
    m = config.model
    # 0: every layer trains, as torchvision without pretrained weights. 2: the COCO recipes'
    # setting, whose frozen stem and res2 run image by image in training (`frozen_stages_per_image`,
    # forced here as on the CPU backend). The loss function differentiates them either way (the
    # train step drops those gradients), so both compare every parameter.
    m.freeze_at = freeze_at
    m.frozen_stages_per_image = "on"
    m.rpn.batch_size_per_image = RPN_SLOTS
    m.rpn.smooth_l1_beta = m.roi.smooth_l1_beta = 1 / 9  # torchvision's, fixed in its code
    m.roi.batch_size_per_image = ROI_SLOTS
    m.roi.positive_fraction = 0.5
    m.roi.max_mask_rois = MASK_SLOTS
    m.roi.mask_head_chunk = 32
    return config


@pytest.fixture(scope="module")
def torchvision_run():
    return _torchvision_training()


@pytest.fixture(scope="module", params=[0, 2], ids=["freeze_at_0", "freeze_at_2"])
def runs(request, torchvision_run):
    tv = torchvision_run
    config = _config(request.param)
    m = config.model
    model = mask_rcnn.build_model(m)
    assert model.per_image_stages == request.param
    converted = convert.convert(tv.state, m, layout="torchvision")
    variables = jax.tree.map(jnp.asarray, converted.variables)
    params = variables.pop("params")

    def to_ours(grads):  # torchvision's gradients in our parameter tree: the weights' conversion
        return convert.convert({**tv.state, **grads}, m, layout="torchvision").variables["params"]

    n = config.data.max_instances
    gt = slice(0, len(BOXES))
    crops = tv.crops  # config.data.mask_crop_size is the torchvision config's
    batch = {
        "images": jnp.asarray(tv.x),
        "image_sizes": jnp.array([[H, W]], jnp.int32),
        "gt_boxes": jnp.zeros((1, n, 4)).at[0, gt].set(BOXES),
        "gt_classes": jnp.full((1, n), -1, jnp.int32).at[0, gt].set(LABELS),
        "gt_valid": jnp.zeros((1, n), bool).at[0, gt].set(True),
        "gt_is_crowd": jnp.zeros((1, n), bool),
        "gt_masks": jnp.zeros((1, n, *crops.shape[1:]), jnp.uint8).at[0, gt].set(crops),
    }
    loss_fn = losses.make_loss_fn(model, m, (H, W))
    rpn_scale = RPN_SLOTS / sum(tv.rpn_counts)  # our RPN normaliser -> torchvision's

    def parts(p):
        _, (metrics, _) = loss_fn(p, variables, batch, jax.random.split(jax.random.PRNGKey(0), 1))
        box = (metrics["loss_rpn_cls"] + metrics["loss_rpn_box"]) * rpn_scale
        box = box + metrics["loss_cls"] + metrics["loss_box"]
        return jnp.stack([box, metrics["loss_mask"]]), metrics

    @jax.jit
    def run(p):
        _, vjp, metrics = jax.vjp(parts, p, has_aux=True)
        return metrics, vjp(jnp.array([1.0, 0.0]))[0], vjp(jnp.array([0.0, 1.0]))[0]

    metrics, box_grads, mask_grads = jax.device_get(run(params))
    ours = types.SimpleNamespace(metrics=metrics, grads={"box": box_grads, "mask": mask_grads})
    for k in ("loss_rpn_cls", "loss_rpn_box"):
        ours.metrics[k] = metrics[k] * rpn_scale
    theirs = {part: to_ours(g) for part, g in tv.grads.items()}
    return types.SimpleNamespace(tv=tv, ours=ours, theirs_grads=theirs)


def test_every_candidate_is_sampled_on_both_sides(runs):
    pos_anchors, neg_anchors = runs.tv.rpn_counts
    pos_rois, neg_rois = runs.tv.roi_counts
    assert 0 < pos_anchors < neg_anchors and pos_anchors + neg_anchors < RPN_SLOTS
    assert 0 < pos_rois <= MASK_SLOTS and pos_rois + neg_rois <= ROI_SLOTS
    assert int(runs.ours.metrics["num_pos_anchors"]) == pos_anchors
    assert int(runs.ours.metrics["num_fg_rois"]) == pos_rois


def test_losses_are_torchvisions(runs):
    for ours, theirs in LOSSES.items():
        np.testing.assert_allclose(
            runs.ours.metrics[ours], runs.tv.losses[theirs], rtol=2e-5, err_msg=ours
        )


def test_torchvisions_soft_mask_targets_move_the_mask_loss_little(runs):
    """The one difference by construction: torchvision's own targets against ours, 0.08% here."""
    own, ours = runs.tv.own_losses["loss_mask"], runs.ours.metrics["loss_mask"]
    assert abs(ours - own) / own < 2e-3
    for k in LOSSES.values():
        if k != "loss_mask":  # the mask targets change nothing else
            assert runs.tv.own_losses[k] == runs.tv.losses[k]


@pytest.mark.parametrize("part", ["box", "mask"])
def test_gradients_are_torchvisions(runs, part):
    """Every parameter's gradient of the four RPN / box losses, and of the mask loss, within
    float32 round-off of torchvision's, relative to the largest entry of that parameter's
    gradient. Measured: at most 2.6e-3 (res4's first block), median 4e-5 / 1.3e-4; our own
    input perturbed by 1e-6 of its values moves our own gradients by up to 1.1e-3 on this
    measure (ReLU signs and RoIAlign taps that flip)."""
    theirs = dict(jax.tree_util.tree_flatten_with_path(runs.theirs_grads[part])[0])
    leaves = jax.tree_util.tree_flatten_with_path(runs.ours.grads[part])[0]
    assert len(leaves) == len(theirs) > 90
    nonzero = 0
    for path, ours in leaves:
        name, want = jax.tree_util.keystr(path), theirs[path]
        scale = float(np.abs(want).max())
        if scale == 0.0:  # e.g. the mask head under the box losses: exactly none on both sides
            assert not np.any(ours), name
            continue
        nonzero += 1
        np.testing.assert_allclose(ours, want, atol=5e-3 * scale, rtol=0, err_msg=name)
    assert nonzero > 10, nonzero
