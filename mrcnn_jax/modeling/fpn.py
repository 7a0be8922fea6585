"""Feature Pyramid Network (Lin et al., 2017): C2..C5 -> P2..P6, all with `channels` channels, NHWC.

    inner5 = lateral5(c5)
    inner_k = lateral_k(c_k) + nearest_upsample_x2(inner_{k+1})     k = 4, 3, 2
    p_k = output_k(inner_k)                                           3x3, padding 1
    p6 = max_pool(p5, kernel 1, stride 2) = p5[:, ::2, ::2]           (LastLevelMaxPool)

Weight names (torch OIHW -> ours HWIO, `kernel = w.transpose(2, 3, 1, 0)`; biases as they are):

    lateral{k}/{kernel,bias}, k = 2..5
        torchvision: backbone.fpn.inner_blocks.{k-2}.0.{weight,bias}
                     (older releases: backbone.fpn.inner_blocks.{k-2}.{weight,bias})
        detectron2:  backbone.fpn_lateral{k}.{weight,bias}
    output{k}/{kernel,bias}, k = 2..5
        torchvision: backbone.fpn.layer_blocks.{k-2}.0.{weight,bias}
                     (older releases: backbone.fpn.layer_blocks.{k-2}.{weight,bias})
        detectron2:  backbone.fpn_output{k}.{weight,bias}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.ops import conv as conv_ops
from mrcnn_jax.ops.anchors import zero_beyond

# detectron2 c2_xavier_fill == kaiming_uniform(a=1): U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), bias 0
# (torchvision's FPN uses the same kaiming_uniform_(a=1)).
xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

LEVELS = (2, 3, 4, 5)


@jax.custom_vjp
def upsample_nearest_x2(x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2 (F.interpolate 'nearest', x2).

    Its gradient, the sum of each 2x2 block, is written as the sum of the four phases
    g[:, i::2, j::2]: XLA:CPU ran the reduction over the two strided block axes that autodiff
    gives (`jnp.repeat`'s transpose) at under 1 GB/s, 0.2 s of the R50-FPN train step on P2."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _upsample_fwd(x):
    return upsample_nearest_x2(x), None


def _upsample_bwd(_, g):
    b, h2, w2, c = g.shape
    g = g.reshape(b, h2 // 2, 2, w2 // 2, 2, c)
    return ((g[:, :, 0, :, 0] + g[:, :, 0, :, 1]) + (g[:, :, 1, :, 0] + g[:, :, 1, :, 1]),)


upsample_nearest_x2.defvjp(_upsample_fwd, _upsample_bwd)


class FPN(nn.Module):
    """feats {"c2": [B, H/4, W/4, C2], ..., "c5": [B, H/32, W/32, C5]} -> {"p2": [B, H/4, W/4,
    channels], ..., "p5": [B, H/32, ...], "p6": [B, H/64, ...]} (H/64 rounded up).

    Each level must be exactly twice the next coarser one (images padded to a multiple of 32); this
    is checked on the static shapes. padded_size [B, 2] (optional): the 3x3 output convolutions
    read zeros beyond each image padded to 32 (`ResNet`'s argument of the same name).
    """

    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, feats: Mapping[str, jnp.ndarray], padded_size=None
    ) -> dict[str, jnp.ndarray]:
        conv = lambda k, name: nn.Conv(
            self.channels,
            (k, k),
            padding=((k // 2, k // 2), (k // 2, k // 2)),
            kernel_init=xavier_fill,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            conv_general_dilated=conv_ops.conv_general_dilated,
            name=name,
        )
        inner = None
        outs = {}
        for level in reversed(LEVELS):
            lateral = conv(1, f"lateral{level}")(feats[f"c{level}"])
            if inner is not None:
                if lateral.shape[1:3] != (2 * inner.shape[1], 2 * inner.shape[2]):
                    raise ValueError(
                        f"FPN needs c{level} exactly 2x c{level + 1}: got {lateral.shape[1:3]} vs "
                        f"{inner.shape[1:3]}; pad images to a multiple of 32"
                    )
                lateral = lateral + upsample_nearest_x2(inner)
            inner = lateral
            outs[f"p{level}"] = conv(3, f"output{level}")(zero_beyond(inner, padded_size, 2**level))
        result = {f"p{level}": outs[f"p{level}"] for level in LEVELS}
        # max_pool2d(kernel 1, stride 2) is a strided slice.
        result["p6"] = result["p5"][:, ::2, ::2]
        return result
