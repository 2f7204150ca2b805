"""Signal encoder: a multichannel series ``[B, channels, length]`` in, ``[B, dim]`` out.

``cnn1d`` — one stage per entry of ``channels``: a strided 1-D convolution (``kernel_size``,
stride 2), GroupNorm and ReLU; then global average pooling over time and a linear projection.
DP-valid as built (no BatchNorm, no in-place operation); its convolutions get their per-sample
gradients from :mod:`clinfuse.training.per_sample_grads`.
"""

from __future__ import annotations

import torch
from torch import nn

from clinfuse.config import SignalEncoderConfig
from clinfuse.errors import InputError
from clinfuse.models.encoders.image import _group_count, load_pretrained


class SignalCNN(nn.Module):
    """``[B, C, L] -> [B, dim]``: strided Conv1d + GroupNorm + ReLU stages, mean over time, Linear."""

    def __init__(self, in_channels: int, channels, dim: int, kernel_size: int = 7, key: str = "encoder.channels"):
        super().__init__()
        if not channels or any(c < 1 for c in channels):
            raise InputError(f"needs positive channel counts, got {list(channels)}", key=key)
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [nn.Conv1d(prev, c, kernel_size=kernel_size, stride=2, padding=kernel_size // 2, bias=False),
                       nn.GroupNorm(_group_count(c), c), nn.ReLU(inplace=False)]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.proj = nn.Linear(prev, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.features(x)).flatten(1))


def build_signal_encoder(cfg: SignalEncoderConfig, dim: int, in_channels: int, *, key: str = "encoder") -> nn.Module:
    """Build the configured signal encoder for ``in_channels`` declared channels."""
    net = SignalCNN(in_channels, cfg.channels, dim, cfg.kernel_size, key=f"{key}.channels")
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained, ("proj.",), key=f"{key}.pretrained")
    net.out_dim = dim
    return net
