"""The multimodal model: three encoders, missing-modality tokens, a fusion operator, a head,
and one auxiliary head per modality.

``FusionModel.forward(image, text, tabular, mask)`` takes a default-collated batch (see the batch
contract) and returns ``{"logits": [B, C], "aux": {"image": [B, C], "text": [B, C],
"tabular": [B, C]}}`` (plus ``"log_vars": [B, 4]`` when learned loss weights are attached, see
:meth:`FusionModel.attach_loss_weights`).

Differential privacy shapes the design:

* Every encoder runs on the whole batch (absent inputs are zero placeholders) and its features are
  masked afterwards. Running an encoder on a sub-batch would break Opacus' per-sample gradients;
  masking by multiplication with an exact 0/1 mask gives a sample with an absent modality an
  exactly-zero per-sample gradient in that modality's encoder (its aux loss is masked too, by
  :func:`clinfuse.training.balance.multimodal_loss`).
* Every learned vector that is not the weight of a standard layer (missing tokens, the attention
  query, modality-type embeddings) is an ``nn.Linear(1, dim, bias=False)`` applied to a column of
  ones, or an ``nn.Embedding``: Opacus has per-sample gradient rules for those layers in every
  mode, and none for a bare ``nn.Parameter``.
* Every trainable layer is used in every forward pass, so each one gets a (possibly zero)
  per-sample gradient and the DP optimizer never meets a parameter without one.

Fusion operators (``cfg.fusion.name``), all mapping modality tokens ``[B, 3, dim]`` to ``[B, dim]``:

* ``concat`` — concatenation + linear + ReLU (baseline).
* ``gated`` — gated multimodal unit (Arevalo et al., 2017): ``sum_m sigmoid(gate_m) * tanh(W_m x_m)``
  with gates computed from all tokens.
* ``attention`` — a learned query token attends (``BatchFirstDPMultiheadAttention``) over itself
  and the three modality tokens; absent modalities are excluded by a bool key-padding mask, so
  with this operator the missing tokens receive no gradient (the query itself is always a valid
  key, so the softmax is never over an empty set).
* ``lowrank`` — low-rank multimodal fusion (Liu et al., 2018): per modality a linear factor on
  ``[x_m; 1]`` (an ``nn.Linear`` with bias) to ``rank x dim``, elementwise product across
  modalities, then a learned combination of the rank components.

Parameter names (stable; no ``_module.`` prefix): ``image_encoder.*``, ``text_encoder.*``,
``tabular_encoder.*``, ``missing.<modality>.weight``, ``fusion.*``, ``head.*``,
``aux_heads.<modality>.*`` and, when attached, ``loss_weights.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from clinfuse.config import MODALITIES, ModelConfig
from clinfuse.errors import InputError
from clinfuse.models.encoders.image import build_image_encoder
from clinfuse.models.encoders.tabular import build_tabular_encoder
from clinfuse.models.encoders.text import BatchFirstDPMultiheadAttention, build_text_encoder

GROUPS = ("image", "text", "tabular", "fusion")


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
        self.kind = nn.Embedding(n_modalities + 1, dim)  # which slot a key is: query/image/text/tabular
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


def _build_fusion(cfg: ModelConfig) -> nn.Module:
    name, dim = cfg.fusion.name, cfg.dim
    if name == "concat":
        return ConcatFusion(dim)
    if name == "gated":
        return GatedFusion(dim)
    if name == "attention":
        return AttentionFusion(dim, dropout=cfg.dropout)
    if name == "lowrank":
        return LowRankFusion(dim, cfg.fusion.rank)
    raise InputError(f"unknown fusion operator '{name}'", key="model.fusion.name")


class FusionModel(nn.Module):
    """Encoders + missing tokens + fusion operator + head + per-modality auxiliary heads.

    ``forward(image [B,1,H,W] float, text [B,L] int64, tabular [B,D] float, mask [B,3] float)``
    returns ``{"logits": [B, C], "aux": {modality: [B, C]}}``. ``mask`` is (has_image, has_text,
    has_tabular); entries above 0.5 count as present. Where a modality is absent its features
    are replaced by that modality's learned missing token before fusion; its aux logits are
    still computed (from the placeholder) and must be masked by the loss. Any non-empty subset
    of modalities gives a prediction. With ``residual_aux`` the fused logits also add the aux
    logits of every present modality, so the fusion operator learns a correction on top of the
    combined unimodal evidence (under DP, with few steps, this is what makes fusion pay off).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, tabular_encoder: nn.Module,
                 fusion: nn.Module, *, dim: int, n_classes: int, dropout: float = 0.0,
                 residual_aux: bool = False):
        super().__init__()
        self.residual_aux = residual_aux
        self.dim = dim
        self.n_classes = n_classes
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.tabular_encoder = tabular_encoder
        self.missing = nn.ModuleDict({m: _vector(dim) for m in MODALITIES})
        self.fusion = fusion
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(fusion.out_dim, n_classes)
        if residual_aux:
            # Start as a pure product of the unimodal experts: with a zero head no gradient reaches
            # the fusion operator at first, so the clipped DP budget goes to the encoders.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.aux_heads = nn.ModuleDict({m: nn.Linear(dim, n_classes) for m in MODALITIES})
        self.register_module("loss_weights", None)

    def attach_loss_weights(self, weights: nn.Module) -> None:
        """Make learned loss weights (``AuxLossWeights`` in ``uncertainty`` mode) part of the model.

        Their log-variances are then computed inside ``forward`` (output key ``"log_vars"``), so
        Opacus computes their per-sample gradients in every grad-sample mode and the optimizer
        and checkpoints see them. Call before building the optimizer and ``make_private``.
        """
        self.loss_weights = weights

    def encode(self, image: torch.Tensor, text: torch.Tensor, tabular: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each encoder on the whole batch: ``{modality: [B, dim]}``."""
        return {"image": self.image_encoder(image), "text": self.text_encoder(text),
                "tabular": self.tabular_encoder(tabular)}

    def forward(self, image: torch.Tensor, text: torch.Tensor, tabular: torch.Tensor,
                mask: torch.Tensor) -> dict:
        b = image.shape[0]
        if mask.dim() != 2 or mask.shape != (b, len(MODALITIES)) or text.shape[0] != b \
                or tabular.shape[0] != b:
            raise ValueError(f"batch shapes disagree: image {list(image.shape)}, text {list(text.shape)}, "
                             f"tabular {list(tabular.shape)}, mask {list(mask.shape)} (mask must be [B, 3])")
        feats = self.encode(image, text, tabular)
        present = mask > 0.5
        weight = present.to(feats["image"].dtype)
        ones = weight.new_ones(b, 1)
        tokens = []
        for i, m in enumerate(MODALITIES):
            w = weight[:, i:i + 1]
            # Exact 0/1 weights: an absent modality passes an exactly-zero gradient to its encoder.
            tokens.append(w * feats[m] + (1.0 - w) * self.missing[m](ones))
        fused = self.fusion(torch.stack(tokens, dim=1), present, ones)
        aux = {m: self.aux_heads[m](self.dropout(feats[m])) for m in MODALITIES}
        logits = self.head(self.dropout(fused))
        if self.residual_aux:
            for i, m in enumerate(MODALITIES):
                # exact 0/1 weight: an absent modality adds nothing and gets no gradient from it
                logits = logits + weight[:, i:i + 1] * aux[m]
        out = {"logits": logits, "aux": aux}
        if self.loss_weights is not None and getattr(self.loss_weights, "learned", False):
            out["log_vars"] = self.loss_weights.log_vars(ones)
        return out


def build_model(cfg: ModelConfig, *, n_classes: int, tabular_dim: int, text_buckets: int,
                text_len: int, image_size: tuple[int, int]) -> FusionModel:
    """Build the configured :class:`FusionModel`.

    ``n_classes`` = len(cfg.data.labels); ``tabular_dim`` from ``clinfuse.data.tabular.tabular_dim``
    (may be 0); ``text_buckets`` = cfg.data.text.hash_buckets; ``text_len`` =
    cfg.data.text.max_tokens; ``image_size`` = cfg.data.image.size. Nothing is downloaded;
    pretrained weights come from the local paths in ``cfg``.
    """
    if n_classes < 2:
        raise InputError(f"need at least 2 classes, got {n_classes}", key="data.labels")
    if text_buckets < 2 or text_len < 1:
        raise InputError(f"bad text sizes: {text_buckets} buckets, {text_len} tokens", key="data.text")
    image = build_image_encoder(cfg.image_encoder, cfg.dim, tuple(image_size))
    text = build_text_encoder(cfg.text_encoder, cfg.dim, buckets=text_buckets, text_len=text_len,
                              dropout=cfg.dropout)
    tabular = build_tabular_encoder(cfg.tabular_encoder, cfg.dim, tabular_dim=tabular_dim,
                                    dropout=cfg.dropout)
    return FusionModel(image, text, tabular, _build_fusion(cfg), dim=cfg.dim, n_classes=n_classes,
                       dropout=cfg.dropout, residual_aux=cfg.fusion.residual_aux)


def _strip(name: str) -> str:
    while name.startswith("_module."):
        name = name[len("_module."):]
    return name


def group_of(name: str) -> str:
    """Group of one parameter name ("image", "text", "tabular" or "fusion").

    An encoder and its auxiliary head belong to their modality; missing tokens, the fusion
    operator, the head and attached loss weights to "fusion". ``_module.`` prefixes (Opacus
    wrappers) are ignored.
    """
    name = _strip(name)
    for m in MODALITIES:
        if name.startswith((f"{m}_encoder.", f"aux_heads.{m}.")):
            return m
    return "fusion"


def parameter_groups(model: nn.Module, *, trainable_only: bool = False) -> dict[str, list[str]]:
    """Names of ``model.named_parameters()`` per group, in that order.

    Keys: "image", "text", "tabular", "fusion" (always all four; a list may be empty, e.g.
    "tabular" holds only its aux head when no tabular field is declared). Names are exactly as
    ``model`` reports them, so a GradSampleModule-wrapped model gives ``_module.``-prefixed names.
    ``trainable_only`` drops frozen parameters (the pretrained text encoder's).
    """
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        groups[group_of(name)].append(name)
    return groups
