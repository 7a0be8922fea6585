"""RoI heads on already-pooled RoI features (NHWC): the box head and the mask head.

Class layout follows torchvision: num_classes + 1 outputs, index 0 = background.

Weight names (torch conv OIHW -> ours HWIO `w.transpose(2, 3, 1, 0)`; torch Linear [out, in] -> ours
[in, out] `w.T`, except fc6, see `fc6_kernel_from_chw`; the deconv, see `deconv_kernel_from_torch`):

    BoxHead   fc6, fc7
        torchvision: roi_heads.box_head.fc6, fc7     detectron2: roi_heads.box_head.fc1, fc2
    BoxHead   cls_score [K+1], bbox_pred [(K+1) * 4, class-major]
        torchvision: roi_heads.box_predictor.cls_score, bbox_pred (same layout, background first)
        detectron2:  roi_heads.box_predictor.cls_score has K+1 logits with background LAST (move its
                     row to index 0); bbox_pred has K * 4 deltas, no background (insert 4 zero rows
                     at the front)
    MaskHead  mask_fcn{1..4}
        torchvision: roi_heads.mask_head.{0..3}.0 (older releases: mask_head.mask_fcn{1..4})
        detectron2:  roi_heads.mask_head.mask_fcn{1..4}
    MaskHead  deconv, predictor [K+1 channels]
        torchvision: roi_heads.mask_predictor.conv5_mask, mask_fcn_logits (K+1 channels, as ours)
        detectron2:  roi_heads.mask_head.deconv, predictor (K channels: insert a zero channel 0)

Flatten order: we flatten the pooled [7, 7, C] features as (H, W, C); torchvision and detectron2
flatten NCHW features as (C, H, W). fc6's input rows must be permuted when importing weights:
`fc6_kernel_from_chw`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops import conv as conv_ops

# detectron2 FastRCNNConvFCHead: c2_xavier_fill = kaiming_uniform(a=1) = U(+-sqrt(3 / fan_in)).
xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# detectron2 c2_msra_fill: kaiming_normal(fan_out, relu), std = sqrt(2 / fan_out).
msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch computes a ConvTranspose2d weight [C_in, C_out, 2, 2]'s "fan_out" from dim 0, i.e. 4 * C_in;
# in our [2, 2, C_in, C_out] layout that is axis -2, so the roles of the axes are swapped.
deconv_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal", -1, -2)


def fc6_kernel_from_chw(weight_out_in: np.ndarray, channels: int, pool: int) -> np.ndarray:
    """torch Linear weight [out, C * P * P] over (C, H, W)-flattened input -> our Dense kernel
    [P * P * C, out] over (H, W, C)-flattened input, giving the same outputs."""
    out = weight_out_in.shape[0]
    if weight_out_in.shape[1] != channels * pool * pool:
        raise ValueError(f"fc6 weight {weight_out_in.shape} does not match C={channels}, P={pool}")
    w = np.asarray(weight_out_in).reshape(out, channels, pool, pool)
    return w.transpose(2, 3, 1, 0).reshape(pool * pool * channels, out)


def deconv_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d(k=2, s=2) weight [C_in, C_out, 2, 2] -> our kernel [2, 2, C_in, C_out].

    K[a, b, c, o] = W[c, o, a, b]: with stride == kernel the output taps never overlap, so there is
    no spatial flip (a plain transpose, no [::-1]).
    """
    return np.asarray(weight).transpose(2, 3, 0, 1)


class BoxHead(nn.Module):
    """pooled [..., P, P, C] -> (cls_score [..., K+1], bbox_pred [..., K+1, 4]), K = num_classes.

    flatten (H, W, C) -> fc6 -> relu -> fc7 -> relu -> class logits (0 = background) and
    class-specific deltas (dx, dy, dw, dh), to be decoded with the RoI box weights (10, 10, 5, 5).
    """

    num_classes: int
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        dense = lambda n, init, name: nn.Dense(
            n, kernel_init=init, bias_init=nn.initializers.zeros, dtype=self.dtype, name=name
        )
        k1 = self.num_classes + 1
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(dense(self.fc_dim, xavier_fill, "fc6")(x))
        x = nn.relu(dense(self.fc_dim, xavier_fill, "fc7")(x))
        # detectron2 FastRCNNOutputLayers: cls normal(0.01), bbox normal(0.001).
        scores = dense(k1, nn.initializers.normal(0.01), "cls_score")(x)
        deltas = dense(4 * k1, nn.initializers.normal(0.001), "bbox_pred")(x)
        return scores, deltas.reshape(x.shape[:-1] + (k1, 4))


def deconv2x2_stride2(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Transposed conv, kernel 2, stride 2, no padding, as a matmul plus depth-to-space.

    x [N, H, W, C], kernel [2, 2, C, O] -> y [N, 2H, 2W, O]:
        y[n, 2i + a, 2j + b, o] = sum_c x[n, i, j, c] * kernel[a, b, c, o]
    lax.conv_transpose gives the same values but its gradient is ~100x slower on XLA:CPU (18.5 s vs
    0.14 s for [128, 14, 14, 256], DESIGN.md).
    """
    n, h, w, _ = x.shape
    o = kernel.shape[-1]
    # (i, a) and (j, b) adjacent: the reshape puts tap (a, b) of pixel (i, j) at (2i + a, 2j + b).
    y = jnp.einsum("nijc,abco->niajbo", x, kernel)
    return y.reshape(n, 2 * h, 2 * w, o)


class Deconv2x2(nn.Module):
    """ConvTranspose 2x2 stride 2 with bias: x [N, H, W, C] -> [N, 2H, 2W, features].

    Params `kernel` [2, 2, C, features] (flax ConvTranspose HWIO layout) and `bias` [features].
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", deconv_msra_fill, (2, 2, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = deconv2x2_stride2(x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class MaskPredictor(nn.Module):
    """The mask head's 1x1 predictor: x [N, S, S, C] -> logits [N, S, S, features], or with
    `classes` [N] only the logits of each RoI's class, [N, S, S].

    Params `kernel` [1, 1, C, features] and `bias` [features], as the `nn.Conv` it replaces (same
    names, shapes and initialisation, so checkpoints and converted weights are unchanged). Only
    one channel of each RoI's logits is ever used (the gt class in the loss, the predicted class at
    inference): with `classes` the head computes that channel alone, a dot of each pixel with the
    class's kernel column, instead of all K + 1 and then picking one (81 x less arithmetic in the
    predictor, and a [N, S, S] rather than [N, S, S, K + 1] output and gradient).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, classes: jnp.ndarray | None = None) -> jnp.ndarray:
        # detectron2 MaskRCNNConvUpsampleHead: predictor normal(std=0.001), bias 0.
        kernel = self.param(
            "kernel", nn.initializers.normal(0.001), (1, 1, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        if classes is None:  # as nn.Conv with the library's hook computed it
            y = conv_ops.conv_general_dilated(
                x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            return y + bias
        if classes.shape != x.shape[:1]:
            raise ValueError(f"classes {classes.shape} must be one per RoI of x {x.shape}")
        # Out-of-range classes are clipped (padding RoIs carry class 0, the background).
        w = jnp.take(kernel[0, 0], classes, axis=1, mode="clip")  # [C, N]
        b = jnp.take(bias, classes, mode="clip")
        return jnp.einsum("nhwc,cn->nhw", x, w) + b[:, None, None]


class MaskHead(nn.Module):
    """pooled [..., 14, 14, C] -> mask logits [..., 28, 28, num_classes + 1] (channel 0 is the
    background, unused by the loss); with `classes` [...] (ints), the logits of each RoI's class
    only, [..., 28, 28] (`MaskPredictor`).

    num_convs x (conv3x3 -> relu) -> deconv 2x2/2 -> relu -> 1x1 predictor.
    """

    num_classes: int
    num_convs: int = 4
    conv_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, classes: jnp.ndarray | None = None) -> jnp.ndarray:
        lead = x.shape[:-3]
        if classes is not None:
            if classes.shape != lead:
                raise ValueError(f"classes {classes.shape} must match the RoIs of x {x.shape}")
            classes = classes.reshape(-1)
        x = x.reshape((-1,) + x.shape[-3:])
        for i in range(1, self.num_convs + 1):
            conv = nn.Conv(
                self.conv_dim,
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=msra_fill,
                bias_init=nn.initializers.zeros,
                dtype=self.dtype,
                conv_general_dilated=conv_ops.conv_general_dilated,
                name=f"mask_fcn{i}",
            )
            x = nn.relu(conv(x))
        x = nn.relu(Deconv2x2(self.conv_dim, dtype=self.dtype, name="deconv")(x))
        x = MaskPredictor(self.num_classes + 1, dtype=self.dtype, name="predictor")(x, classes)
        return x.reshape(lead + x.shape[1:])
