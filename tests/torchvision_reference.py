"""torchvision's `maskrcnn_resnet50_fpn` with seeded random weights made numerically lively, and
the test image both parity test files feed it (nothing is downloaded). Import it only after
`pytest.importorskip("torch")` and torchvision."""

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

# Multiples of 32: torchvision pads nothing. 224 = 7 x 32 gives torchvision's P6 4 rows at a
# stride of 224 // 4 = 56, not 64 (config.model.anchor_grid="torchvision").
H, W = 224, 320


def lively(tv, x, gen):
    """Random weights that keep activations O(1) and scores spread: BatchNorm statistics measured
    on `x` then random affine terms (small on each block's last norm, as in trained ResNets),
    random head biases, larger RPN / classifier weights."""
    norms = [m for m in tv.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the statistics of this one batch
    tv.backbone.body.train()
    with torch.no_grad():
        tv.backbone.body(x)
        tv.eval()
        for name, m in tv.backbone.body.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                last = name.endswith(("bn3", "downsample.1"))
                m.weight.uniform_(0.1, 0.3, generator=gen) if last else m.weight.uniform_(
                    0.5, 1.5, generator=gen
                )
                m.bias.normal_(0.0, 0.1 if last else 0.3, generator=gen)
        for name, p in tv.named_parameters():
            if name.startswith(("backbone.fpn", "rpn", "roi_heads")) and name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=gen)
        tv.rpn.head.cls_logits.weight.mul_(15.0)
        tv.rpn.head.bbox_pred.weight.mul_(3.0)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(10.0)


def nhwc(t):
    return t.permute(0, 2, 3, 1).detach().numpy()


def model_and_image():
    """-> (torchvision's model in eval mode, the [3, H, W] image in [0, 1], its normalised [1, 3,
    H, W] batch). Every BatchNorm has eps 0, as torchvision runs its COCO_V1 weights
    (overwrite_eps(model, 0.0)); the configs' `model.norm_eps` is 0 for them too."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=H, max_size=W).eval()
    gen = torch.Generator().manual_seed(1)
    low = torch.rand(1, 3, H // 16, W // 16, generator=gen)
    image = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear")[0]
    image = (image + 0.1 * torch.rand(3, H, W, generator=gen)).clamp(0.0, 1.0)
    images, _ = tv.transform([image])
    assert tuple(images.tensors.shape) == (1, 3, H, W) and images.image_sizes == [(H, W)]
    lively(tv, images.tensors, gen)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 0.0
    return tv, image, images.tensors
