"""Normalisation layers for the backbone and heads, chosen by a `NormKind`.

| kind        | where the numbers live                        | statistics                         |
|-------------|-----------------------------------------------|------------------------------------|
| FROZEN_BN   | `batch_stats`: scale, bias, mean, var         | fixed (pretrained backbones)       |
| BATCH_NORM  | `params`: scale, bias; `batch_stats`: mean, var | the batch one step sees        |
| SYNC_BN     | as BATCH_NORM                                 | whole global batch (`axis_name`)   |
| GROUP_NORM  | `params`: scale, bias                         | 32 groups per example              |

"The batch one step sees" is each device's under `pmap` and the global batch under `jit` over a
mesh (GSPMD computes the statistics over the sharded batch), so with `train.parallelism="mesh"`
BATCH_NORM and SYNC_BN are the same; `mask_rcnn.build_model` builds SYNC_BN without a device axis
as BATCH_NORM. Frozen stages (`freeze_at`) keep their running statistics in training
(`ResNet.frozen_stages`).

Epsilon is 1e-5 by default, as torch.nn.BatchNorm2d / GroupNorm, torchvision's FrozenBatchNorm2d and
detectron2's FrozenBatchNorm2d, so imported weights give the same outputs; `make_norm(epsilon=)`
(config `model.norm_eps`) changes it: torchvision runs its COCO_V1 Mask R-CNN weights with
FrozenBatchNorm2d eps 0 (`overwrite_eps(model, 0.0)` when they are loaded).
"""

from __future__ import annotations

import enum
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.BatchNorm2d / GroupNorm, torchvision.ops.FrozenBatchNorm2d, detectron2 FrozenBatchNorm2d.
EPSILON = 1e-5
# Flax keeps `momentum` of the old value: 0.9 here == PyTorch's momentum=0.1.
BN_MOMENTUM = 0.9
# detectron2 `GN` / torchvision's GroupNorm variants use 32 groups (Wu & He, 2018).
GN_GROUPS = 32


class NormKind(enum.Enum):
    """Which normalisation follows each convolution; values are the config strings."""

    FROZEN_BN = "frozen_bn"
    GROUP_NORM = "group_norm"
    BATCH_NORM = "batch_norm"
    SYNC_BN = "sync_bn"


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine terms: x [..., C] -> [..., C].

    y = (x - mean) * scale * rsqrt(var + eps) + bias, eps = 1e-5 by default. All four vectors [C] live in the
    non-trainable `"batch_stats"` collection, so they are never in `params` and never get gradients;
    they start as the identity (scale 1, bias 0, mean 0, var 1) and are meant to be overwritten by
    pretrained weights (torch `weight, bias, running_mean, running_var`).
    """

    epsilon: float = EPSILON
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask=None) -> jnp.ndarray:
        del mask  # fixed statistics: nothing to restrict (the signature of nn.GroupNorm's)
        c = x.shape[-1]
        scale = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), jnp.float32))
        bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32))
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        # Fold into one multiply-add in float32 (as torchvision does), then compute in `dtype`.
        mult = scale.value * jax.lax.rsqrt(var.value + self.epsilon)
        shift = bias.value - mean.value * mult
        return x.astype(self.dtype) * mult.astype(self.dtype) + shift.astype(self.dtype)


def make_norm(
    kind: NormKind | str,
    *,
    train: bool,
    axis_name: str | None,
    dtype: Any,
    name: str,
    epsilon: float = EPSILON,
) -> nn.Module:
    """Builds the normalisation module `name` of the given kind (a NormKind or its string value).

    train:     BATCH_NORM / SYNC_BN use batch statistics and update the running ones when True.
    axis_name: SYNC_BN only: the pmap / shard_map axis to average statistics over (required).
    """
    kind = NormKind(kind)
    if kind is NormKind.FROZEN_BN:
        return FrozenBatchNorm(epsilon=epsilon, dtype=dtype, name=name)
    if kind is NormKind.GROUP_NORM:
        return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=epsilon, dtype=dtype, name=name)
    if kind is NormKind.SYNC_BN and axis_name is None:
        raise ValueError("NormKind.SYNC_BN needs the axis_name of the device axis (pmap/shard_map)")
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=epsilon,
        axis_name=axis_name if kind is NormKind.SYNC_BN else None,
        dtype=dtype,
        name=name,
    )
