"""RPN head (Ren et al., 2015; shared over FPN levels as in Lin et al., 2017), NHWC.

Per level: t = relu(conv3x3(p)); objectness = conv1x1(t) -> A channels; deltas = conv1x1(t) -> 4A
channels laid out anchor-major, (a, (dx, dy, dw, dh)), as torchvision and detectron2 view them
(`view(N, A, 4, H, W)`). Outputs are flattened in the order (level, y, x, anchor), the order of
ops/anchors' fixed anchor array.

Weight names (torch OIHW -> ours HWIO, `kernel = w.transpose(2, 3, 1, 0)`; biases as they are):

    conv/{kernel,bias}
        torchvision: rpn.head.conv.0.0.{weight,bias} (older releases: rpn.head.conv.*)
        detectron2:  proposal_generator.rpn_head.conv.{weight,bias}
    objectness/{kernel,bias}
        torchvision: rpn.head.cls_logits.*
        detectron2:  proposal_generator.rpn_head.objectness_logits.*
    deltas/{kernel,bias}
        torchvision: rpn.head.bbox_pred.*
        detectron2:  proposal_generator.rpn_head.anchor_deltas.*
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.ops import conv as conv_ops
from mrcnn_jax.ops.anchors import zero_beyond

# torchvision RPNHead and detectron2 StandardRPNHead: normal(std=0.01), bias 0.
rpn_init = nn.initializers.normal(stddev=0.01)


def _levels(feats: Mapping[str, jnp.ndarray] | Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    """A dict {"p2": .., "p6": ..} (taken in sorted key order) or a list, finest level first."""
    if isinstance(feats, Mapping):
        return [feats[k] for k in sorted(feats)]
    return list(feats)


class RPNHead(nn.Module):
    """feats: P2..P6, each [B, H_l, W_l, C] -> (logits [B, N], deltas [B, N, 4]),
    N = sum_l H_l * W_l * num_anchors, ordered (level, y, x, anchor).

    The same three convs are applied to every level. padded_size [B, 2] (optional): the 3x3
    convolution reads zeros beyond each image padded to 32 (`ResNet`); the levels' strides are
    2 ** (min_level + i).
    """

    num_anchors: int = 3
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        feats: Mapping[str, jnp.ndarray] | Sequence[jnp.ndarray],
        padded_size=None,
        min_level: int = 2,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        a = self.num_anchors
        conv_kw = dict(
            kernel_init=rpn_init,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            conv_general_dilated=conv_ops.conv_general_dilated,
        )
        conv = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name="conv", **conv_kw)
        objectness = nn.Conv(a, (1, 1), name="objectness", **conv_kw)
        deltas = nn.Conv(4 * a, (1, 1), name="deltas", **conv_kw)
        all_logits, all_deltas = [], []
        for i, p in enumerate(_levels(feats)):
            b, h, w, _ = p.shape
            t = nn.relu(conv(zero_beyond(p, padded_size, 2 ** (min_level + i))))
            # [B, H, W, A] -> [B, H*W*A]: row-major flatten gives the (y, x, a) order.
            all_logits.append(objectness(t).reshape(b, h * w * a))
            # [B, H, W, 4A] -> [B, H, W, A, 4]: channel a*4 + j is coordinate j of anchor a.
            all_deltas.append(deltas(t).reshape(b, h * w * a, 4))
        return jnp.concatenate(all_logits, axis=1), jnp.concatenate(all_deltas, axis=1)
