"""Signal encoder: a multichannel series ``[B, channels, length]`` in, ``[B, dim]`` out.

``cnn1d`` — one stage per entry of ``channels``: a strided 1-D convolution (``kernel_size``,
stride 2), GroupNorm and ReLU; then global average pooling over time and a linear projection.
DP-valid as built (no BatchNorm, no in-place operation); its convolutions get their per-sample
gradients from :mod:`clinfuse.training.per_sample_grads`.
"""

from __future__ import annotations

from torch import nn

from clinfuse.config import SignalEncoderConfig
from clinfuse.models.encoders.image import SmallCNN, load_pretrained


def build_signal_encoder(cfg: SignalEncoderConfig, dim: int, in_channels: int, *, key: str = "encoder") -> nn.Module:
    """Build the configured signal encoder for ``in_channels`` declared channels."""
    net = SmallCNN(cfg.channels, dim, in_channels, spatial_dims=1, kernel_size=cfg.kernel_size,
                   key=f"{key}.channels")
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained, ("proj.",), key=f"{key}.pretrained")
    net.out_dim = dim
    return net
