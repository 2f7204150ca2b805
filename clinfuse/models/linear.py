"""A linear head over fixed, data-independent features: the DP-efficient model for small sites.

Under DP-SGD every trainable parameter receives noise, and at small n a deep network's features
cost more noise than they earn; a linear model over good fixed features trains far better
(Tramèr & Boneh 2021, "Differentially private learning needs better features"). Each modality's
input is mapped by a parameter-free :class:`FixedFeatures` map, computed from the input alone
(nothing is fitted on any site's data, so nothing private leaves a site through it), then by
one ``nn.Linear(features, n_classes, bias=False)``:

* ``tabular`` — the declared encoding itself (scaled values and missing flags);
* ``text`` — hashed n-gram counts over ``hash_buckets``, sublinear ``1 + log(count)`` and unit
  L2 norm per note (no idf: an idf would be fitted on site data);
* ``image`` / ``volume`` — the normalised pixels average-pooled to a fixed low resolution
  (8 x 8; 4 x 8 x 8 for volumes), divided by the square root of the feature count;
* ``signal`` — each channel average-pooled to 16 values, likewise scaled.

``LinearHeadModel.forward(batch)`` follows :class:`clinfuse.models.fusion.FusionModel`'s contract:
``{"logits": [B, C], "aux": {name: [B, C]}}``. A modality's contribution is multiplied by its
exact 0/1 mask (an absent one sends an exactly-zero per-sample gradient into its weights); its
learned "missing" logits (``missing.<name>``) are added instead. ``aux[name]`` is the modality's
contribution plus the shared bias: what the modality says alone (reported per modality; not
trained on: ``trains_aux_heads`` is false, so the trainer uses no auxiliary losses). Several inputs per patient
(``max_count`` > 1) are averaged over the filled slots.

Parameter names, groups as in the fusion model: ``encoders.<name>.weight`` (the modality's
group), ``missing.<name>.weight`` and ``head.weight`` (the bias, as ``Linear(1, C)`` on a column
of ones: Opacus has per-sample rules for ``nn.Linear`` in every mode, none for a bare
``nn.Parameter``) in "fusion".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Pooled resolution of each kind's fixed reduction.
IMAGE_GRID = (8, 8)
VOLUME_GRID = (4, 8, 8)
SIGNAL_POINTS = 16


class FixedFeatures(nn.Module):
    """The parameter-free feature map of one modality: its batch input in, ``[B, out_dim]`` out."""

    def __init__(self, kind: str, *, in_dim: int = 0, buckets: int = 0, channels: int = 1):
        super().__init__()
        self.kind = kind
        if kind == "tabular":
            self.out_dim = in_dim
        elif kind == "text":
            self.out_dim = buckets
        elif kind == "image":
            self.out_dim = math.prod(IMAGE_GRID)
        elif kind == "volume":
            self.out_dim = math.prod(VOLUME_GRID)
        elif kind == "signal":
            self.out_dim = channels * SIGNAL_POINTS
        else:
            raise ValueError(f"no fixed features for modality kind {kind!r}")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.kind == "tabular":
            return x.float()
        if self.kind == "text":
            ids = x.long()
            counts = torch.zeros(b, self.out_dim, dtype=torch.float32, device=x.device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
            counts[:, 0] = 0.0  # padding
            tf = torch.where(counts > 0, 1.0 + torch.log(counts.clamp(min=1.0)), counts)
            return tf / tf.norm(dim=1, keepdim=True).clamp(min=1e-12)
        if b == 0:
            return x.new_zeros(0, self.out_dim)
        if self.kind == "image":
            pooled = F.adaptive_avg_pool2d(x.float(), IMAGE_GRID)
        elif self.kind == "volume":
            pooled = F.adaptive_avg_pool3d(x.float(), VOLUME_GRID)
        else:
            pooled = F.adaptive_avg_pool1d(x.float(), SIGNAL_POINTS)
        return pooled.reshape(b, -1) / math.sqrt(self.out_dim)


def fixed_features_for(spec) -> FixedFeatures:
    """The :class:`FixedFeatures` of one modality spec (a :data:`clinfuse.config.Modality`)."""
    if spec.kind == "tabular":
        from clinfuse.data.tabular import tabular_dim

        return FixedFeatures("tabular", in_dim=tabular_dim(spec.columns))
    if spec.kind == "text":
        return FixedFeatures("text", buckets=spec.hash_buckets)
    if spec.kind == "signal":
        return FixedFeatures("signal", channels=spec.channels)
    return FixedFeatures(spec.kind)


class LinearHeadModel(nn.Module):
    """Softmax regression over each modality's :class:`FixedFeatures` (see the module docstring)."""

    #: The aux logits are parts of the fused logits, not separate heads: training each part to
    #: predict alone would make their sum overconfident, so the trainer drops the aux losses.
    trains_aux_heads = False

    def __init__(self, features: Mapping[str, FixedFeatures], *, n_classes: int,
                 max_counts: Mapping[str, int] | None = None, kinds: Mapping[str, str] | None = None):
        super().__init__()
        if not features:
            raise ValueError("a model needs at least one modality")
        self.modality_names = tuple(features)
        self.kinds = {m: (kinds or {}).get(m, features[m].kind) for m in self.modality_names}
        self.max_counts = {m: int((max_counts or {}).get(m, 1)) for m in self.modality_names}
        self.n_classes = n_classes
        self.dim = None
        self.features = nn.ModuleDict(features)
        self.encoders = nn.ModuleDict({m: nn.Linear(f.out_dim, n_classes, bias=False) for m, f in features.items()})
        for layer in self.encoders.values():
            nn.init.zeros_(layer.weight)  # a convex problem: start from the uninformed model
        self.missing = nn.ModuleDict({m: nn.Linear(1, n_classes, bias=False) for m in self.modality_names})
        for layer in self.missing.values():
            nn.init.zeros_(layer.weight)
        self.head = nn.Linear(1, n_classes, bias=False)
        nn.init.zeros_(self.head.weight)
        self.register_module("loss_weights", None)

    def attach_loss_weights(self, weights: nn.Module) -> None:
        """As :meth:`clinfuse.models.fusion.FusionModel.attach_loss_weights`."""
        self.loss_weights = weights

    def features_of(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """``{modality: [B, features]}``: the fixed features (several inputs per patient averaged)."""
        out = {}
        for m in self.modality_names:
            x, phi = batch[m], self.features[m]
            if self.max_counts[m] == 1:
                out[m] = phi(x)
                continue
            filled = (batch["instances"][m] > 0.5).float()  # [B, K]
            slots = torch.stack([phi(x[:, k]) for k in range(x.shape[1])], dim=1)
            out[m] = (slots * filled.unsqueeze(-1)).sum(1) / filled.sum(1, keepdim=True).clamp(min=1.0)
        return out

    def forward(self, batch: Mapping) -> dict:
        mask = batch["mask"]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != len(self.modality_names):
            raise ValueError(f"batch['mask'] must be [B, {len(self.modality_names)}] (modalities "
                             f"{list(self.modality_names)})")
        b = mask.shape[0]
        weight = (mask > 0.5).float()
        ones = weight.new_ones(b, 1)
        bias = self.head(ones)
        logits, aux = bias, {}
        for i, (m, x) in enumerate(self.features_of(batch).items()):
            w = weight[:, i:i + 1]
            part = w * self.encoders[m](x)  # exact 0/1: absent gives an exactly-zero gradient
            aux[m] = part + bias
            logits = logits + part + (1.0 - w) * self.missing[m](ones)
        out = {"logits": logits, "aux": aux}
        if self.loss_weights is not None and getattr(self.loss_weights, "learned", False):
            out["log_vars"] = self.loss_weights.log_vars(ones)
        return out


def build_linear_model(modalities: Sequence, *, n_classes: int) -> LinearHeadModel:
    """The :class:`LinearHeadModel` of a study's declared modality specs."""
    from clinfuse.errors import InputError

    if n_classes < 2:
        raise InputError(f"need at least 2 classes, got {n_classes}", key="data.labels")
    return LinearHeadModel({s.name: fixed_features_for(s) for s in modalities}, n_classes=n_classes,
                           max_counts={s.name: s.max_count for s in modalities},
                           kinds={s.name: s.kind for s in modalities})
