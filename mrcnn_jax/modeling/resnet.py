"""ResNet-18/34/50/101 trunk (He et al., 2016) returning the C2..C5 feature maps, NHWC.

Layout as torchvision's `resnet*` (v1.5: stride in the 3x3 conv of a bottleneck) by default;
`stride_in_1x1=True` puts the stride in the first 1x1 conv, as the original MSRA / detectron2
`R-50.pkl` weights. Every conv has no bias and is followed by a norm (see norm.py). Padding is
explicit and symmetric, as PyTorch's, so the same weights give the same outputs (flax "SAME"
pads stride-2 convs asymmetrically).

Weight names, one-to-one. torch conv weights are OIHW, ours HWIO:
`kernel = w.transpose(2, 3, 1, 0)`.
Norms: FROZEN_BN takes `weight, bias, running_mean, running_var` into `batch_stats` as
`scale, bias, mean, var`; BATCH_NORM / SYNC_BN take `weight, bias` into `params` as `scale, bias`
and the running statistics into `batch_stats` as `mean, var`.

    ours                        torchvision `resnet50()`          detectron2 `backbone.bottom_up.`
    conv1/kernel                conv1.weight                      stem.conv1.weight
    bn1/*                       bn1.*                             stem.conv1.norm.*
    layer1_0/conv1/kernel       layer1.0.conv1.weight             res2.0.conv1.weight
    layer1_0/bn1/*              layer1.0.bn1.*                    res2.0.conv1.norm.*
    layer{i}_{j}/conv{k}        layer{i}.{j}.conv{k}              res{i+1}.{j}.conv{k}
    layer{i}_{j}/bn{k}          layer{i}.{j}.bn{k}                res{i+1}.{j}.conv{k}.norm
    layer{i}_0/downsample_conv  layer{i}.0.downsample.0           res{i+1}.0.shortcut
    layer{i}_0/downsample_bn    layer{i}.0.downsample.1           res{i+1}.0.shortcut.norm

Freezing (detectron2 FREEZE_AT) is done in the train step with `backbone_trainable_mask`: frozen
parameters enter the loss as constants, and stop in the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.norm import EPSILON, NormKind, make_norm
from mrcnn_jax.ops import conv as conv_ops
from mrcnn_jax.ops.anchors import cells_inside, zero_beyond

# (block type, blocks per stage) for torchvision / detectron2 depths.
STAGE_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
# Output channels of a bottleneck are 4x its inner width (256 at res2 for width 64).
BOTTLENECK_EXPANSION = 4

# torchvision resnet / detectron2 c2_msra_fill: kaiming normal, fan_out, relu gain.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric padding k // 2 for an odd k x k kernel."""
    return ((k // 2, k // 2), (k // 2, k // 2))


def _conv(features: int, k: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=_pad(k),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        conv_general_dilated=conv_ops.conv_general_dilated,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). x [B, H, W, Cin] -> [B, H/s, W/s, features].

    y = relu(bn2(conv2(relu(bn1(conv1_s(x))))) + shortcut(x)), shortcut = bn(conv1x1_s(x)) when the
    shape changes, else x.
    """

    features: int
    strides: int
    norm: NormKind
    axis_name: str | None = None
    dtype: Any = jnp.float32
    norm_eps: float = EPSILON
    input_stride: int = 4  # canvas pixels per cell of x, for `padded_size`

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, padded_size=None) -> jnp.ndarray:
        norm = _block_norm(self, train, padded_size)
        out = self.input_stride * self.strides
        y = zero_beyond(x, padded_size, self.input_stride)
        y = nn.relu(norm("bn1")(_conv(self.features, 3, self.strides, self.dtype, "conv1")(y), out))
        y = zero_beyond(y, padded_size, out)
        y = norm("bn2")(_conv(self.features, 3, 1, self.dtype, "conv2")(y), out)
        return nn.relu(y + _shortcut(self, x, self.features, norm))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet-50/101). x [B, H, W, Cin] -> [B, H/s, W/s, out_features].

    y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)); conv1 / conv2 have
    `features` (inner width) channels. The stride sits in the 3x3 conv (v1.5,
    torchvision) or, with `stride_in_1x1`, in the first 1x1 conv (MSRA / detectron2 weights).
    """

    features: int
    out_features: int
    strides: int
    norm: NormKind
    stride_in_1x1: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32
    norm_eps: float = EPSILON
    input_stride: int = 4  # canvas pixels per cell of x, for `padded_size`

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, padded_size=None) -> jnp.ndarray:
        norm = _block_norm(self, train, padded_size)
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        mid, out = self.input_stride * s1, self.input_stride * self.strides
        y = nn.relu(norm("bn1")(_conv(self.features, 1, s1, self.dtype, "conv1")(x), mid))
        y = zero_beyond(y, padded_size, mid)  # the 3x3 reads no padding
        y = nn.relu(norm("bn2")(_conv(self.features, 3, s3, self.dtype, "conv2")(y), out))
        y = norm("bn3")(_conv(self.out_features, 1, 1, self.dtype, "conv3")(y), out)
        return nn.relu(y + _shortcut(self, x, self.out_features, norm))


def _block_norm(block: nn.Module, train: bool, padded_size=None):
    """name -> the block's norm of that name (its kind, axis, dtype and epsilon) as a function
    (x, stride) -> normalised x; with padded_size, batch / group statistics are taken over the
    cells inside each padded image only (`ResNet`)."""

    def norm(name):
        module = make_norm(
            block.norm,
            train=train,
            axis_name=block.axis_name,
            dtype=block.dtype,
            name=name,
            epsilon=block.norm_eps,
        )
        return lambda x, stride: _normalise(module, x, padded_size, stride)

    return norm


def _normalise(module: nn.Module, x: jnp.ndarray, padded_size, stride: int) -> jnp.ndarray:
    if padded_size is None:
        return module(x)
    # flax's GroupNorm reshapes the mask with x into groups: it must have x's shape.
    return module(x, mask=jnp.broadcast_to(cells_inside(x, padded_size, stride), x.shape))


def _shortcut(block: nn.Module, x: jnp.ndarray, out_features: int, norm) -> jnp.ndarray:
    """Identity, or a strided 1x1 projection + norm when stride or channels change."""
    if block.strides == 1 and x.shape[-1] == out_features:
        return x.astype(block.dtype)
    proj = _conv(out_features, 1, block.strides, block.dtype, "downsample_conv")
    # Called inside the block's compact __call__, so the submodules are named under the block.
    return norm("downsample_bn")(proj(x), block.input_stride * block.strides)


class ResNet(nn.Module):
    """ResNet trunk. x [B, H, W, 3] (H, W multiples of 32) -> {"c2": [B, H/4, W/4, C2], "c3": H/8,
    "c4": H/16, "c5": H/32}; C2..C5 = 64..512 (18/34) or 256..2048 (50/101).

    depth:           18, 34, 50 or 101.
    norm:            NormKind (or its string) after every conv.
    stride_in_1x1:   bottlenecks only: stride in the first 1x1 conv (MSRA weights), not the 3x3.
    width_per_group: bottleneck inner width at res2 (64 = standard; doubles each stage).
    axis_name:       device axis for NormKind.SYNC_BN.
    dtype:           compute dtype (params stay float32).
    remat:           rematerialise each residual block in the backward pass (`nn.remat`): only the
                     block inputs are kept for the gradient, the rest is recomputed; less memory
                     for one more forward pass of the backbone. Parameters are unchanged.
    per_image_stages: in training, run stages 1..N (1 = stem, 2 = res2, ... as `freeze_at`)
                     image by image (`lax.map`) rather than on the batch; same outputs. Meant for
                     the frozen stages, which take no gradient: the loop boundary keeps XLA from
                     holding their activations (or recomputing their outputs from them) for the
                     backward pass (R50-FPN, 800 x 1216, batch 2 on the CPU: 267 MiB fewer
                     temporaries, docs/performance.md change 11). FROZEN_BN / GROUP_NORM only:
                     batch-statistics norms always run on the batch.
    frozen_stages:   stages 1..N (as `freeze_at`) are frozen: their norms run as in inference
                     even in training, so BATCH_NORM / SYNC_BN there normalise with, and keep, their
                     running statistics, as detectron2's freeze() turns them into FrozenBatchNorm.
                     (Their parameters are frozen by the train step, `backbone_trainable_mask`.)
    norm_eps:        the norms' epsilon (1e-5; torchvision's COCO_V1 detector weights use 0).

    padded_size (call argument): [B, 2] (h, w) of each image padded to a multiple of 32, or None.
    Given, every input of a spatial convolution (and of the max-pool) is zeroed beyond it
    (`ops.anchors.zero_beyond`), so each image's features inside it are those of the padded image
    alone, whatever the canvas: the references' features at batch 1. 1x1 and elementwise
    layers never read across cells, so the values beyond it do not reach the inside.

    The stem output (after the max-pool) is sown as intermediates["stem"], except in training
    with per_image_stages, where the stem runs image by image inside a loop.
    """

    depth: int
    norm: NormKind
    stride_in_1x1: bool = False
    width_per_group: int = 64
    axis_name: str | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    per_image_stages: int = 0
    frozen_stages: int = 0
    norm_eps: float = EPSILON

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool, padded_size=None, _stages: tuple[int, int] = (1, 5)
    ):
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be in {sorted(STAGE_BLOCKS)}, got {self.depth}")
        kind, blocks = STAGE_BLOCKS[self.depth]
        if kind == "basic" and self.width_per_group != 64:
            raise ValueError("BasicBlock (ResNet-18/34) only supports width_per_group=64")
        if not 0 <= self.per_image_stages <= 5:
            raise ValueError(f"per_image_stages must be in [0, 5], got {self.per_image_stages}")
        norm_kind = NormKind(self.norm)
        # _stages (internal): run stages first..last only; with last < 5 return (x, feats).
        first, last = _stages
        feats = {}
        if first == 1 and self._per_image(train, norm_kind):
            x, feats = self._per_image_prefix(x, padded_size)
            first = self.per_image_stages + 1
        if first <= 1 <= last:
            stem_norm = make_norm(
                norm_kind,
                train=train and self.frozen_stages < 1,
                axis_name=self.axis_name,
                dtype=self.dtype,
                name="bn1",
                epsilon=self.norm_eps,
            )
            x = _conv(64, 7, 2, self.dtype, "conv1")(zero_beyond(x, padded_size, 1))
            x = _normalise(stem_norm, x, padded_size, 2)
            # torchvision MaxPool2d(3, 2, padding=1): flax pads with -inf (reduce_window init);
            # zeros beyond padded_size read as -inf would: the inputs are >= 0 after the relu.
            x = zero_beyond(nn.relu(x), padded_size, 2)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            self.sow("intermediates", "stem", x)
        for stage, num_blocks in enumerate(blocks):
            if not first <= stage + 2 <= last:
                continue
            planes = 64 * 2**stage
            for j in range(num_blocks):
                strides = 2 if (j == 0 and stage > 0) else 1
                name = f"layer{stage + 1}_{j}"
                frozen = stage + 2 <= self.frozen_stages
                block = self._block(kind, planes, strides, norm_kind, name, 2 ** (stage + 2 - (strides > 1)))
                x = block(x, train and not frozen, padded_size)
            feats[f"c{stage + 2}"] = x
        return (x, feats) if last < 5 else feats

    def _per_image(self, train: bool, norm: NormKind) -> bool:
        # Batch-statistics norms would see one image instead of the batch: batched path for them.
        return (
            train
            and self.per_image_stages >= 1
            and norm in (NormKind.FROZEN_BN, NormKind.GROUP_NORM)
            and not self.is_initializing()
        )

    def _per_image_prefix(self, x: jnp.ndarray, padded_size=None):
        """Stages 1..per_image_stages of each image in turn (`lax.map`) -> (last output, feats),
        with this module's own variables: the same function as the batched path."""
        last = self.per_image_stages
        variables = {
            col: {k: v for k, v in tree.items() if _stage_of(k) <= last}
            for col, tree in self.variables.items()
            if col in ("params", "batch_stats")
        }
        prefix = self.clone(parent=None, per_image_stages=0)

        def one(args):
            image, size = args
            size = None if size is None else size[None]
            x, feats = prefix.apply(
                variables, image[None], train=True, padded_size=size, _stages=(1, last)
            )
            # x is feats[c{last}] from res2 on: one loop output, not two buffers of it.
            return feats if last >= 2 else x

        out = jax.tree.map(lambda a: a[:, 0], jax.lax.map(one, (x, padded_size)))
        return (out[f"c{last}"], out) if last >= 2 else (out, {})

    def _block(
        self, kind: str, planes: int, strides: int, norm: NormKind, name: str, input_stride: int
    ) -> nn.Module:
        common = dict(
            strides=strides,
            input_stride=input_stride,
            norm=norm,
            axis_name=self.axis_name,
            dtype=self.dtype,
            norm_eps=self.norm_eps,
        )
        wrap = (lambda cls: nn.remat(cls, static_argnums=(2,))) if self.remat else (lambda cls: cls)
        if kind == "basic":
            return wrap(BasicBlock)(features=planes, name=name, **common)
        return wrap(Bottleneck)(
            features=planes * self.width_per_group // 64,
            out_features=planes * BOTTLENECK_EXPANSION,
            stride_in_1x1=self.stride_in_1x1,
            name=name,
            **common,
        )


def _stage_of(key: str) -> int:
    """Top-level ResNet param name -> detectron2 stage index (stem 1, layer1 = res2 -> 2, ...)."""
    if key in ("conv1", "bn1"):
        return 1
    if key.startswith("layer") and "_" in key:
        return int(key[len("layer") : key.index("_")]) + 1
    raise ValueError(f"not a ResNet parameter name: {key!r}")


def backbone_trainable_mask(params: Mapping[str, Any], freeze_at: int) -> dict[str, Any]:
    """ResNet `params` pytree -> same-structure pytree of bools, True = trainable.

    detectron2 FREEZE_AT: 0 nothing frozen, 1 the stem, 2 stem + layer1 (res2), ..., 5 everything.
    Use it (through `mask_rcnn.trainable_mask`) with `train.freeze`: optax.multi_transform with
    set_to_zero for the False leaves. Not optax.masked, which passes their gradients through as
    updates. Frozen-BN vectors are batch_stats, not params, so they never appear here.
    """
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"freeze_at must be in [0, 5], got {freeze_at}")
    mask = {}
    for key, sub in params.items():
        trainable = _stage_of(key) > freeze_at
        mask[key] = jax.tree.map(lambda _, t=trainable: t, sub)
    return mask
