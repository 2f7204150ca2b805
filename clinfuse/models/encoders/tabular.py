"""Tabular encoder: the declared EHR fields ``float32 [B, D]`` in, ``[B, dim]`` out.

The input already carries, per column, the scaled value(s) and a missing flag (see the batch
contract), so an MLP can learn what "missing" means for each field instead of an imputation
fitted on some site's data. With no declared columns (``D == 0``) the encoder has no parameters
and returns zeros: the dataset then marks the modality absent for every sample.
"""

from __future__ import annotations

import torch
from torch import nn

from clinfuse.config import TabularEncoderConfig


class TabularEncoder(nn.Module):
    """``Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, dim)``; zeros when ``D == 0``."""

    def __init__(self, in_dim: int, dim: int, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        if in_dim < 0:
            raise ValueError(f"tabular_dim must be >= 0, got {in_dim}")
        self.in_dim = in_dim
        self.out_dim = dim
        self.net = (nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, dim)) if in_dim else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"tabular input must be [B, {self.in_dim}], got {list(x.shape)}")
        if self.net is None:
            return x.new_zeros(x.shape[0], self.out_dim)
        return self.net(x)


def build_tabular_encoder(cfg: TabularEncoderConfig, dim: int, *, tabular_dim: int,
                          dropout: float = 0.0) -> TabularEncoder:
    """Build the tabular encoder for ``tabular_dim`` input features (hidden width: ``cfg.hidden``,
    by default the model width)."""
    return TabularEncoder(tabular_dim, dim, cfg.hidden or dim, dropout)
