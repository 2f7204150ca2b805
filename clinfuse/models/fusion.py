"""The multimodal model: one encoder per declared modality, missing-modality tokens, a fusion
operator, a head, and one auxiliary head per modality. Only the study's modalities exist.

``FusionModel.forward(batch)`` takes a batch dict (the batch contract of
:mod:`clinfuse.data.dataset`: one tensor per modality name, ``"mask"`` ``[B, M]`` in declared
order, ``"instances"`` ``{name: [B, K]}`` for modalities with several inputs per patient) and
returns ``{"logits": [B, C], "aux": {name: [B, C]}}`` in declared order (plus ``"log_vars": [B, 1 + M]``
when learned loss weights are attached, see :meth:`FusionModel.attach_loss_weights`).

Differential privacy shapes the design:

* Every encoder runs on the whole batch (absent inputs are zero placeholders) and its features are
  masked afterwards. Running an encoder on a sub-batch would break Opacus' per-sample gradients;
  masking by multiplication with an exact 0/1 mask gives a sample with an absent modality an
  exactly-zero per-sample gradient in that modality's encoder (its aux loss is masked too, by
  :func:`clinfuse.training.balance.multimodal_loss`).
* A modality with ``max_count`` K > 1 runs its encoder K times, each time on the whole batch's
  k-th instance slot, so each call's per-sample gradients are per *patient* and add up over the
  slots (Opacus hooks and expanded weights both accumulate a layer used twice); the K features are
  pooled by :class:`AttentionPool`, whose softmax gives an empty slot an exactly-zero weight. One
  patient, one prediction, one clipped gradient.
* Every learned vector that is not the weight of a standard layer (missing tokens, the attention
  query, modality-type embeddings) is an ``nn.Linear(1, dim, bias=False)`` applied to a column of
  ones, or an ``nn.Embedding``: Opacus has per-sample gradient rules for those layers in every
  mode, and none for a bare ``nn.Parameter``.
* Every trainable layer is used in every forward pass, so each one gets a (possibly zero)
  per-sample gradient and the DP optimizer never meets a parameter without one.

Fusion operators (``cfg.fusion.name``), all mapping modality tokens ``[B, M, dim]`` to ``[B, dim]``:

* ``concat`` — concatenation + linear + ReLU (baseline; the default for a one-modality study).
* ``gated`` — gated multimodal unit (Arevalo et al., 2017): ``sum_m sigmoid(gate_m) * tanh(W_m x_m)``
  with gates computed from all tokens.
* ``attention`` — a learned query token attends (``BatchFirstDPMultiheadAttention``) over itself
  and the modality tokens; absent modalities are excluded by a bool key-padding mask, so
  with this operator the missing tokens receive no gradient (the query itself is always a valid
  key, so the softmax is never over an empty set).
* ``lowrank`` — low-rank multimodal fusion (Liu et al., 2018): per modality a linear factor on
  ``[x_m; 1]`` (an ``nn.Linear`` with bias) to ``rank x dim``, elementwise product across
  modalities, then a learned combination of the rank components.

Parameter names (stable; no ``_module.`` prefix): ``encoders.<name>.*``, ``pools.<name>.*`` (several
inputs per patient), ``missing.<name>.weight``, ``fusion.*``, ``head.*``, ``aux_heads.<name>.*``
and, when attached, ``loss_weights.*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from clinfuse.config import ModelConfig
from clinfuse.errors import InputError
from clinfuse.models.encoders import build_encoder
from clinfuse.models.encoders.text import BatchFirstDPMultiheadAttention

FUSION_GROUP = "fusion"
# parameter-name prefixes that belong to a modality's group: <prefix><modality name>.
_MODALITY_PREFIXES = ("encoders.", "pools.", "aux_heads.")


def _vector(dim: int, std: float = 0.02) -> nn.Linear:
    """A learned ``dim``-vector as ``Linear(1, dim)`` (call it on a ``[B, 1]`` column of ones)."""
    layer = nn.Linear(1, dim, bias=False)
    nn.init.normal_(layer.weight, std=std)
    return layer


def _heads(dim: int) -> int:
    return next(h for h in (4, 2, 1) if dim % h == 0)


class ConcatFusion(nn.Module):
    """``ReLU(Linear(concat(tokens)))``."""

    def __init__(self, dim: int, n_modalities: int = 3):
        super().__init__()
        self.proj = nn.Linear(n_modalities * dim, dim)
        self.act = nn.ReLU()
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(tokens.flatten(1)))


class GatedFusion(nn.Module):
    """Gated multimodal unit: per-modality ``tanh`` projections weighted by sigmoid gates."""

    def __init__(self, dim: int, n_modalities: int = 3):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_modalities))
        self.gate = nn.Linear(n_modalities * dim, n_modalities * dim)
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        b, m, d = tokens.shape
        h = torch.stack([torch.tanh(p(tokens[:, i])) for i, p in enumerate(self.proj)], dim=1)
        z = torch.sigmoid(self.gate(tokens.flatten(1))).view(b, m, d)
        return (z * h).sum(dim=1)


class AttentionFusion(nn.Module):
    """A learned query token attending over ``[query, tokens]``; absent modalities are masked."""

    def __init__(self, dim: int, n_modalities: int = 3, dropout: float = 0.0):
        super().__init__()
        self.query = _vector(dim)
        self.kind = nn.Embedding(n_modalities + 1, dim)  # which slot a key is: the query or a modality
        nn.init.normal_(self.kind.weight, std=0.02)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = BatchFirstDPMultiheadAttention(dim, _heads(dim), dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        b, m, _ = tokens.shape
        q = self.query(ones)  # [B, dim]
        slots = torch.arange(m + 1, device=tokens.device).unsqueeze(0).expand(b, m + 1)
        kv = torch.cat([q.unsqueeze(1), tokens], dim=1) + self.kind(slots)
        ignore = torch.cat([torch.zeros_like(present[:, :1]), ~present], dim=1)
        kv = self.norm_kv(kv)
        a, _ = self.attn(self.norm_q(q).unsqueeze(1), kv, kv, key_padding_mask=ignore, need_weights=False)
        x = q + a.squeeze(1)
        x = x + self.mlp(self.norm_mlp(x))
        return self.norm_out(x)


class LowRankFusion(nn.Module):
    """Low-rank multimodal fusion: ``sum_r w_r * prod_m (W_m^r [x_m; 1])``."""

    def __init__(self, dim: int, rank: int, n_modalities: int = 3):
        super().__init__()
        self.rank = rank
        # Linear(dim, rank*dim) with bias is exactly the LMF factor applied to [x; 1].
        self.factors = nn.ModuleList(nn.Linear(dim, rank * dim) for _ in range(n_modalities))
        self.combine = nn.Linear(rank, 1, bias=False)
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        prod = None
        for i, factor in enumerate(self.factors):
            f = factor(tokens[:, i]).view(b, self.rank, d)
            prod = f if prod is None else prod * f
        return self.combine(prod.transpose(1, 2)).squeeze(-1)


class AttentionPool(nn.Module):
    """Masked attention pooling of one modality's K inputs (Ilse et al., 2018, attention MIL).

    ``forward(feats [B, K, dim], filled [B, K] bool) -> [B, dim]``: scores ``w^T tanh(V h_k)``,
    a softmax over the filled slots (an empty slot gets weight exactly 0, so its placeholder sends
    no gradient anywhere), the weighted sum. A patient with no filled slot gets the mean of the
    placeholders, which the model then masks out with the modality. Per sample throughout.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(8, dim // 2)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        scores = self.score(feats).squeeze(-1).masked_fill(~filled, float("-inf"))
        scores = torch.where(filled.any(dim=1, keepdim=True), scores, torch.zeros_like(scores))
        weights = torch.softmax(scores, dim=1)
        return (weights.unsqueeze(-1) * feats).sum(dim=1)


def _build_fusion(cfg: ModelConfig, n_modalities: int) -> nn.Module:
    name, dim = cfg.fusion.name, cfg.dim
    if name == "concat":
        return ConcatFusion(dim, n_modalities)
    if name == "gated":
        return GatedFusion(dim, n_modalities)
    if name == "attention":
        return AttentionFusion(dim, n_modalities, dropout=cfg.dropout)
    if name == "lowrank":
        return LowRankFusion(dim, cfg.fusion.rank, n_modalities)
    raise InputError(f"unknown fusion operator '{name}'", key="model.fusion.name")


class FusionModel(nn.Module):
    """Encoders + missing tokens + fusion operator + head + per-modality auxiliary heads.

    ``forward(batch)`` with the batch dict of :mod:`clinfuse.data.dataset` returns ``{"logits":
    [B, C], "aux": {name: [B, C]}}``. ``batch["mask"] [B, M]`` follows ``modality_names``; entries
    above 0.5 count as present. Where a modality is absent its features are replaced by that
    modality's learned missing token before fusion; its aux logits are still computed (from the
    placeholder) and must be masked by the loss. Any non-empty subset of modalities gives a
    prediction. With ``residual_aux`` the fused logits also add the aux logits of every present
    modality, so the fusion operator learns a correction on top of the combined unimodal evidence
    (under DP, with few steps, this is what makes fusion pay off).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module, *, dim: int, n_classes: int,
                 max_counts: Mapping[str, int] | None = None, kinds: Mapping[str, str] | None = None,
                 dropout: float = 0.0, residual_aux: bool = False):
        super().__init__()
        if not encoders:
            raise ValueError("a fusion model needs at least one modality")
        self.modality_names = tuple(encoders)
        self.kinds = {m: (kinds or {}).get(m, "") for m in self.modality_names}
        self.max_counts = {m: int((max_counts or {}).get(m, 1)) for m in self.modality_names}
        self.residual_aux = residual_aux
        self.dim = dim
        self.n_classes = n_classes
        self.encoders = nn.ModuleDict(encoders)
        self.pools = nn.ModuleDict({m: AttentionPool(dim) for m in self.modality_names if self.max_counts[m] > 1})
        self.missing = nn.ModuleDict({m: _vector(dim) for m in self.modality_names})
        self.fusion = fusion
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(fusion.out_dim, n_classes)
        if residual_aux:
            # Start as a pure product of the unimodal experts: with a zero head no gradient reaches
            # the fusion operator at first, so the clipped DP budget goes to the encoders.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.aux_heads = nn.ModuleDict({m: nn.Linear(dim, n_classes) for m in self.modality_names})
        self.register_module("loss_weights", None)

    def attach_loss_weights(self, weights: nn.Module) -> None:
        """Make learned loss weights (``AuxLossWeights`` in ``uncertainty`` mode) part of the model.

        Their log-variances are then computed inside ``forward`` (output key ``"log_vars"``), so
        Opacus computes their per-sample gradients in every grad-sample mode and the optimizer
        and checkpoints see them. Call before building the optimizer and ``make_private``.
        """
        self.loss_weights = weights

    def encode(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Each encoder on the whole batch: ``{modality: [B, dim]}`` (several inputs pooled)."""
        feats = {}
        for m in self.modality_names:
            x, encoder = batch[m], self.encoders[m]
            if self.max_counts[m] == 1:
                feats[m] = encoder(x)
                continue
            # one call per instance slot, each over the whole batch: per-sample gradients stay per patient
            per_slot = torch.stack([encoder(x[:, k]) for k in range(x.shape[1])], dim=1)
            feats[m] = self.pools[m](per_slot, batch["instances"][m] > 0.5)
        return feats

    def _check(self, batch: Mapping) -> int:
        mask = batch.get("mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != len(self.modality_names):
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"batch['mask'] must be [B, {len(self.modality_names)}] (modalities "
                             f"{list(self.modality_names)}), got {got}")
        b = mask.shape[0]
        for m in self.modality_names:
            x = batch.get(m)
            if not isinstance(x, torch.Tensor) or x.shape[0] != b:
                raise ValueError(f"batch[{m!r}] must be a tensor with {b} rows, got "
                                 f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            if self.max_counts[m] > 1 and (x.dim() < 2 or x.shape[1] != self.max_counts[m]
                                           or m not in batch.get("instances", {})):
                raise ValueError(f"batch[{m!r}] must be [B, {self.max_counts[m]}, ...] with "
                                 f"batch['instances'][{m!r}] [B, {self.max_counts[m]}]")
        return b

    def forward(self, batch: Mapping) -> dict:
        b = self._check(batch)
        feats = self.encode(batch)
        present = batch["mask"] > 0.5
        weight = present.to(feats[self.modality_names[0]].dtype)
        ones = weight.new_ones(b, 1)
        tokens = []
        for i, m in enumerate(self.modality_names):
            w = weight[:, i:i + 1]
            # Exact 0/1 weights: an absent modality passes an exactly-zero gradient to its encoder.
            tokens.append(w * feats[m] + (1.0 - w) * self.missing[m](ones))
        fused = self.fusion(torch.stack(tokens, dim=1), present, ones)
        aux = {m: self.aux_heads[m](self.dropout(feats[m])) for m in self.modality_names}
        logits = self.head(self.dropout(fused))
        if self.residual_aux:
            for i, m in enumerate(self.modality_names):
                # exact 0/1 weight: an absent modality adds nothing and gets no gradient from it
                logits = logits + weight[:, i:i + 1] * aux[m]
        out = {"logits": logits, "aux": aux}
        if self.loss_weights is not None and getattr(self.loss_weights, "learned", False):
            out["log_vars"] = self.loss_weights.log_vars(ones)
        return out


def build_model(modalities: Sequence, cfg: ModelConfig, *, n_classes: int) -> FusionModel:
    """Build the :class:`FusionModel` of a study: ``modalities`` is ``Config.modalities`` (the
    declared specs, in order), ``cfg`` the resolved ``Config.model`` (``dim`` and ``fusion.name``
    set), ``n_classes`` = len(data.labels). Nothing is downloaded; pretrained weights come from the
    local paths in the specs."""
    if n_classes < 2:
        raise InputError(f"need at least 2 classes, got {n_classes}", key="data.labels")
    if not modalities:
        raise InputError("the study declares no modality", key="modalities")
    if cfg.dim is None or cfg.fusion.name is None:
        raise ValueError("build_model needs a resolved ModelConfig (Config.model): dim and fusion.name set")
    encoders = {spec.name: build_encoder(spec, cfg.dim, dropout=cfg.dropout) for spec in modalities}
    return FusionModel(encoders, _build_fusion(cfg, len(encoders)), dim=cfg.dim, n_classes=n_classes,
                       max_counts={s.name: s.max_count for s in modalities},
                       kinds={s.name: s.kind for s in modalities}, dropout=cfg.dropout,
                       residual_aux=cfg.fusion.residual_aux)


def _strip(name: str) -> str:
    while name.startswith("_module."):
        name = name[len("_module."):]
    return name


def group_of(name: str) -> str:
    """Group of one parameter name: its modality's name, or ``"fusion"``.

    An encoder, its attention pool and its auxiliary head belong to their modality; missing tokens,
    the fusion operator, the head and attached loss weights to "fusion". ``_module.`` prefixes
    (Opacus wrappers) are ignored.
    """
    name = _strip(name)
    for prefix in _MODALITY_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):].split(".", 1)[0]
    return FUSION_GROUP


def modality_names_of(model: nn.Module) -> tuple[str, ...]:
    """The modality names of a fusion model, unwrapping Opacus' ``_module``."""
    inner = model
    while hasattr(inner, "_module"):
        inner = inner._module
    return tuple(inner.modality_names)


def parameter_groups(model: nn.Module, *, trainable_only: bool = False) -> dict[str, list[str]]:
    """Names of ``model.named_parameters()`` per group, in that order.

    Keys: one per modality of the model, in declared order, then "fusion" (always all of them; a
    list may be empty). Names are exactly as ``model`` reports them, so a GradSampleModule-wrapped
    model gives ``_module.``-prefixed names. ``trainable_only`` drops frozen parameters (the
    pretrained text encoder's).
    """
    groups: dict[str, list[str]] = {g: [] for g in (*modality_names_of(model), FUSION_GROUP)}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        groups[group_of(name)].append(name)
    return groups


def parameter_counts(model: nn.Module, *, trainable_only: bool = True) -> dict[str, int]:
    """Number of (trainable) parameter entries per group, plus ``"total"``."""
    sizes = dict(model.named_parameters())
    counts = {g: sum(sizes[n].numel() for n in names)
              for g, names in parameter_groups(model, trainable_only=trainable_only).items()}
    counts["total"] = sum(counts.values())
    return counts


def format_parameter_counts(counts: Mapping[str, int]) -> str:
    """One line for logs: ``trainable parameters: image 24,672, text 74,112, fusion 35,106; total 133,890``."""
    parts = ", ".join(f"{g} {n:,}" for g, n in counts.items() if g != "total")
    return f"trainable parameters: {parts}; total {counts.get('total', 0):,}"
