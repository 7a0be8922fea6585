"""The Mask R-CNN network: parameters only, no targets or losses.

`MaskRCNN` owns the five parameterised parts and exposes each stage as a method, so the pure
training / inference functions (`losses.py`, `postprocess.py`) compose them with the parameter-free
ops (RoIAlign, NMS) in between:

    images --features--> {p2..p6} --rpn--> (objectness [B, A], deltas [B, A, 4])
    pooled [R, 7, 7, C]   --box_predictions--> (class logits [R, K+1], deltas [R, K+1, 4])
    pooled [R, 14, 14, C] --mask_logits-->     [R, 28, 28, K+1]

Parameter tree (top level) and the torchvision / detectron2 modules each part maps onto one to one
(see each module's docstring for the names below this level):

| ours        | torchvision `maskrcnn_resnet50_fpn`      | detectron2 `GeneralizedRCNN`            |
|-------------|------------------------------------------|-----------------------------------------|
| `backbone`  | `backbone.body`                          | `backbone.bottom_up`                    |
| `fpn`       | `backbone.fpn`                           | `backbone.fpn_lateral*`, `fpn_output*`  |
| `rpn_head`  | `rpn.head`                               | `proposal_generator.rpn_head`           |
| `box_head`  | `roi_heads.box_head`, `box_predictor`    | `roi_heads.box_head`, `box_predictor`   |
| `mask_head` | `roi_heads.mask_head`, `mask_predictor`  | `roi_heads.mask_head`                   |
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax.modeling.fpn import FPN
from mrcnn_jax.modeling.heads import BoxHead, MaskHead
from mrcnn_jax.modeling.norm import EPSILON, NormKind
from mrcnn_jax.modeling.resnet import ResNet, backbone_trainable_mask
from mrcnn_jax.modeling.rpn import RPNHead

LEVELS = ("p2", "p3", "p4", "p5", "p6")
POOL_LEVELS = ("p2", "p3", "p4", "p5")  # RoIAlign reads P2-P5; P6 only feeds the RPN (FPN paper)


class MaskRCNN(nn.Module):
    """ResNet-FPN Mask R-CNN. `num_classes` excludes the background (label 0)."""

    num_classes: int
    depth: int = 50
    norm: NormKind = NormKind.FROZEN_BN
    stride_in_1x1: bool = False
    width_per_group: int = 64
    fpn_channels: int = 256
    num_anchors: int = 3
    fc_dim: int = 1024
    mask_conv_dim: int = 256
    num_mask_convs: int = 4
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32
    remat_backbone: bool = False
    per_image_stages: int = 0  # ResNet.per_image_stages: the frozen stages, image by image
    frozen_stages: int = 0  # ResNet.frozen_stages: freeze_at, whose norms keep their statistics
    norm_eps: float = EPSILON  # the backbone norms' epsilon (torchvision's COCO weights: 0)

    def setup(self):
        self.backbone = ResNet(
            depth=self.depth,
            norm=self.norm,
            stride_in_1x1=self.stride_in_1x1,
            width_per_group=self.width_per_group,
            axis_name=self.axis_name,
            dtype=self.dtype,
            remat=self.remat_backbone,
            per_image_stages=self.per_image_stages,
            frozen_stages=self.frozen_stages,
            norm_eps=self.norm_eps,
        )
        self.fpn = FPN(channels=self.fpn_channels, dtype=self.dtype)
        self.rpn_head = RPNHead(
            num_anchors=self.num_anchors, channels=self.fpn_channels, dtype=self.dtype
        )
        self.box_head = BoxHead(num_classes=self.num_classes, fc_dim=self.fc_dim, dtype=self.dtype)
        self.mask_head = MaskHead(
            num_classes=self.num_classes,
            num_convs=self.num_mask_convs,
            conv_dim=self.mask_conv_dim,
            dtype=self.dtype,
        )

    def features(
        self, images: jnp.ndarray, train: bool = False, padded_size=None
    ) -> dict[str, jnp.ndarray]:
        """images: [B, H, W, 3] -> {"p2": [B, H/4, W/4, C], ..., "p6": [B, H/64, W/64, C]}.

        padded_size [B, 2] (h, w), each image's size padded to a multiple of 32 (optional): the
        convolutions read zeros beyond it, so the features inside it do not depend on the
        canvas the image sits in (`ResNet`)."""
        backbone = self.backbone(images.astype(self.dtype), train=train, padded_size=padded_size)
        return self.fpn(backbone, padded_size)

    def rpn(
        self, feats: dict[str, jnp.ndarray], padded_size=None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """FPN features -> (objectness logits [B, A], deltas [B, A, 4]) in anchor order."""
        return self.rpn_head([feats[k] for k in LEVELS], padded_size)

    def box_predictions(self, pooled: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """pooled: [R, 7, 7, C] -> (logits [R, K+1], class-specific deltas [R, K+1, 4])."""
        return self.box_head(pooled)

    def mask_logits(self, pooled: jnp.ndarray, classes: jnp.ndarray | None = None) -> jnp.ndarray:
        """pooled: [R, 14, 14, C] -> mask logits [R, 28, 28, K+1]; with classes [R], each RoI's
        class channel only, [R, 28, 28] (what the loss and inference use)."""
        return self.mask_head(pooled, classes)

    def __call__(self, images: jnp.ndarray, train: bool = False):
        """Touches every part once (for `init`): the heads run on whole-image boxes."""
        feats = self.features(images, train=train)
        logits, deltas = self.rpn(feats)
        p2 = feats["p2"]
        box_in = jax.image.resize(p2[:1], (1, 7, 7, p2.shape[-1]), "linear")
        mask_in = jax.image.resize(p2[:1], (1, 14, 14, p2.shape[-1]), "linear")
        return logits, deltas, self.box_predictions(box_in), self.mask_logits(mask_in)


def build_model(
    model_cfg: ml_collections.ConfigDict,
    axis_name: str | None = None,
    sharded_batch: bool = False,
) -> MaskRCNN:
    """Turns `config.model` into typed constructor arguments (the model never sees a config).

    sharded_batch: the batch axis is split over several devices by GSPMD (jit over a Mesh); an
    image-by-image loop would then run over the global batch, so `frozen_stages_per_image`'s
    auto leaves it off.
    axis_name: the pmap axis, which "sync_bn" averages its statistics over. Without one (one
    device, or jit over a mesh) "sync_bn" is a batch norm over the batch the step sees, which
    under a mesh is the global batch: the same statistics.
    """
    norm = NormKind(model_cfg.norm)
    if norm == NormKind.SYNC_BN and axis_name is None:
        # No device axis: one device, or `jit` over a mesh, where the step sees the global batch
        # and a batch norm's statistics are already the whole batch's, SyncBN's.
        norm = NormKind.BATCH_NORM
    return MaskRCNN(
        num_classes=model_cfg.num_classes,
        depth=model_cfg.depth,
        norm=norm,
        stride_in_1x1=model_cfg.stride_in_1x1,
        width_per_group=model_cfg.width_per_group,
        fpn_channels=model_cfg.fpn_channels,
        num_anchors=len(model_cfg.anchor_ratios),
        fc_dim=model_cfg.roi.fc_dim,
        mask_conv_dim=model_cfg.roi.mask_conv_dim,
        num_mask_convs=model_cfg.roi.num_mask_convs,
        axis_name=axis_name if norm == NormKind.SYNC_BN else None,
        dtype=jnp.dtype(model_cfg.dtype),
        remat_backbone=model_cfg.remat_backbone,
        per_image_stages=model_cfg.freeze_at if _frozen_per_image(model_cfg, sharded_batch) else 0,
        frozen_stages=model_cfg.freeze_at,
        norm_eps=model_cfg.norm_eps,
    )


FROZEN_STAGES_MODES = ("auto", "on", "off")  # model.frozen_stages_per_image


def _frozen_per_image(model_cfg: ml_collections.ConfigDict, sharded_batch: bool) -> bool:
    """`model.frozen_stages_per_image`: auto (on for the CPU backend, where it was measured, unless
    the batch is sharded over devices), on, off. See ResNet.per_image_stages."""
    mode = model_cfg.get("frozen_stages_per_image", "auto")
    if mode not in FROZEN_STAGES_MODES:
        raise ValueError(
            f"model.frozen_stages_per_image must be 'auto', 'on' or 'off', got {mode!r}"
        )
    return mode == "on" or (mode == "auto" and jax.default_backend() == "cpu" and not sharded_batch)


def init_variables(model: MaskRCNN, key: jax.Array, image_size: tuple[int, int]) -> dict:
    """Fresh variables {"params": ..., "batch_stats": ...} for images of `image_size` (H, W)."""
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    return jax.jit(lambda k: model.init(k, images, train=False))(key)


def zero_variables(model: MaskRCNN, image_size: tuple[int, int]) -> dict:
    """`init_variables`' tree as numpy zeros, without running the initialisers (nothing is
    compiled): the target that `checkpoint.merge_weights` fills with loaded weights."""
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), tuple(image_size)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def trainable_mask(params, model_cfg: ml_collections.ConfigDict):
    """Bool pytree like `params`: False for the backbone parts frozen by `freeze_at`. In a loop of
    your own, `train.freeze(tx, mask)` keeps them unchanged and `train.stop_frozen(params, mask)`
    spares their gradients, as `train.train_step` does."""
    mask = jax.tree.map(lambda _: True, params)
    mask = dict(mask)
    mask["backbone"] = backbone_trainable_mask(params["backbone"], model_cfg.freeze_at)
    return mask
