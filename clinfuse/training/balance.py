"""Modality balancing: keep one strong modality from drowning out the others.

* :class:`ModalityDropout` — per-sample, train-time masking of present modalities, so the model
  learns to predict from every subset (never empties a sample).
* :class:`AuxLossWeights` + :func:`multimodal_loss` — the main cross-entropy plus one masked
  cross-entropy per modality's auxiliary head, weighted by mode ``none``, ``fixed``, ``gblend``
  (Wang et al., 2020, "What makes training multi-modal classification networks hard?") or
  ``uncertainty`` (Kendall et al., 2018, learned log-variances).
* :func:`clip_group_norms` — per-parameter clipping thresholds for Opacus ``clipping="per_layer"``
  that give each parameter group (one per modality, plus fusion) its share of the clipping budget.
* :func:`modality_contributions` — share of the gradient norm per group, for logs.

All per-sample quantities stay per sample (no statistic over the batch), which DP-SGD needs: the
loss of sample *i* must depend on sample *i* only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clinfuse.config import AuxWeightsConfig
from clinfuse.models.fusion import FUSION_GROUP, group_of, modality_names_of

MAIN = "main"
LOG_VAR_LIMIT = 4.0  # learned log-variances are clamped to [-4, 4] (weights e^-4 .. e^4)


class ModalityDropout:
    """Drop present modalities per sample with their configured rates (training batches only).

    ``rates`` maps modality names to rates (names not given are never dropped); ``modalities`` is
    the study's order. ``dropout(mask [B, M]) -> new mask [B, M]`` (same dtype/device). Each present modality of each
    sample is dropped independently with its rate; if that would leave a sample with no
    modality, one of its present modalities, chosen uniformly, is kept. A sample's outcome depends
    only on its own mask and fresh randomness, never on the rest of the batch. Samples with no
    present modality are returned unchanged.
    """

    def __init__(self, rates: Mapping[str, float], modalities: tuple[str, ...]):
        unknown = sorted(set(rates) - set(modalities))
        if unknown:
            raise ValueError(f"modality dropout rates for unknown modalities {unknown}")
        self.modalities = tuple(modalities)
        self.rates = tuple(float(rates.get(m, 0.0)) for m in self.modalities)

    @property
    def enabled(self) -> bool:
        return any(r > 0 for r in self.rates)

    def __call__(self, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if mask.dim() != 2 or mask.shape[1] != len(self.modalities):
            raise ValueError(f"mask must be [B, {len(self.modalities)}], got {list(mask.shape)}")
        present = mask > 0.5
        if not self.enabled:
            return present.to(mask.dtype)
        rates = torch.tensor(self.rates, device=mask.device)
        drop = torch.rand(mask.shape, generator=generator, device=mask.device) < rates
        kept = present & ~drop
        emptied = present.any(dim=1) & ~kept.any(dim=1)
        # Scores on present entries only; argmax picks one present modality uniformly at random.
        scores = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~present, -1.0)
        rescue = F.one_hot(scores.argmax(dim=1), len(self.modalities)).bool() & emptied.unsqueeze(1)
        return (kept | rescue).to(mask.dtype)


class AuxLossWeights(nn.Module):
    """Weights of the main loss and of each modality's auxiliary loss.

    Modes (``cfg.mode``):

    * ``none`` — main 1, aux 0.
    * ``fixed`` — main 1, every aux ``cfg.weight``.
    * ``gblend`` — starts at 1 for every head; :meth:`update_from_losses` re-estimates them from
      train/validation losses at two checkpoints (G-Blending). The estimate uses the validation
      split, which DP-SGD does not protect: under DP, estimate on data the site may disclose.
    * ``uncertainty`` — learned: loss = sum_k present_k * (exp(-s_k) L_k + s_k / 2) with one
      log-variance ``s_k`` per head. ``s`` lives in ``self.log_vars``, an ``nn.Linear(1, 1 + M,
      bias=False)`` applied to a ones column, so Opacus computes its per-sample gradients like any
      linear layer. Attach the module to the model (``FusionModel.attach_loss_weights``) before
      building the optimizer: the model's forward then returns ``"log_vars"`` ``[B, 1 + M]``.

    Heads are ``("main", *modalities)`` (``self.heads``).
    """

    def __init__(self, cfg: AuxWeightsConfig | None = None, modalities: tuple[str, ...] = ()):
        super().__init__()
        cfg = cfg if cfg is not None else AuxWeightsConfig()
        if not modalities:
            raise ValueError("AuxLossWeights needs the study's modality names")
        self.heads = (MAIN, *modalities)
        self.mode = cfg.mode
        self.learned = cfg.mode == "uncertainty"
        if cfg.mode == "none":
            static = [1.0] + [0.0] * len(modalities)
        elif cfg.mode == "fixed":
            static = [1.0] + [float(cfg.weight)] * len(modalities)
        else:
            static = [1.0] * len(self.heads)
        # A plain list, not a buffer: the weights are local training state and must not be
        # averaged across sites with the model's state_dict.
        self._static = static
        if self.learned:
            self.log_vars = nn.Linear(1, len(self.heads), bias=False)
            nn.init.zeros_(self.log_vars.weight)

    def current(self) -> dict[str, float]:
        """The weight of each head now (learned weights: ``exp(-s)``, ``s`` clamped as in the loss)."""
        if self.learned:
            s = self.log_vars.weight.detach().view(-1).clamp(-LOG_VAR_LIMIT, LOG_VAR_LIMIT)
            return {h: float(torch.exp(-v)) for h, v in zip(self.heads, s)}
        return dict(zip(self.heads, self._static))

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Restore static weights (e.g. G-Blend weights persisted by the trainer)."""
        if self.learned:
            raise ValueError("uncertainty weights are parameters; restore them with the model state")
        self._static = [float(weights[h]) for h in self.heads]

    def update_from_losses(self, train_before: Mapping[str, float], val_before: Mapping[str, float],
                           train_after: Mapping[str, float], val_after: Mapping[str, float], *,
                           eps: float = 1e-4, floor: float = 0.05) -> dict[str, float]:
        """G-Blend re-estimate from mean losses per head at two checkpoints (before, after).

        Per head k: generalisation gain ``G = val_before - val_after``, overfitting
        ``O = val - train`` at each checkpoint, ``dO = O_after - O_before``; weight
        ``max(G, 0) / (dO^2 + eps)``. Weights are normalised to sum 1, raised to ``floor`` (so no
        head, in particular the main one, stops training entirely), and rescaled to mean 1 so the
        loss keeps the scale of the ``fixed`` mode. Heads with a missing or NaN loss (a modality
        absent from a split) get weight 0. If no head gained, the weights are left unchanged.
        Returns the new weights.
        """
        if self.mode != "gblend":
            raise ValueError(f"update_from_losses needs mode 'gblend', not '{self.mode}'")
        raw, defined = {}, {}
        heads = self.heads
        for h in heads:
            vals = [d.get(h, math.nan) for d in (train_before, val_before, train_after, val_after)]
            defined[h] = all(math.isfinite(float(v)) for v in vals)
            if not defined[h]:
                raw[h] = 0.0
                continue
            tb, vb, ta, va = map(float, vals)
            gain = vb - va
            d_over = (va - ta) - (vb - tb)
            raw[h] = max(gain, 0.0) / (d_over * d_over + eps)
        total = sum(raw.values())
        if total <= 0:
            return self.current()
        w = {h: (max(raw[h] / total, floor) if defined[h] else 0.0) for h in heads}
        norm = sum(w.values())
        self._static = [w[h] * len(heads) / norm for h in heads]
        return self.current()

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def multimodal_loss(output: Mapping, label: torch.Tensor, mask: torch.Tensor,
                    weights: AuxLossWeights | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample loss ``[B]`` (the caller takes the mean) and its unweighted parts.

    ``output`` is ``FusionModel.forward``'s dict, ``label`` int64 ``[B]``, ``mask`` ``[B, M]`` (the
    mask the model was given, i.e. after modality dropout), in the order of ``output["aux"]``. The aux loss of a modality is zero
    for samples where it is absent (masked with ``torch.where``, so such a sample sends an
    exactly-zero gradient into that modality's head and encoder). Aux terms stay in the graph
    even with weight 0, so every head gets a per-sample gradient (Opacus needs one per trainable
    parameter). ``weights=None`` means mode ``none``.

    ``parts``: detached per-sample cross-entropies ``{"main": [B], modality: [B]}``, an aux part
    being 0 where the modality is absent; average an aux part over the samples where the
    modality is present (:class:`HeadLossMeter` does that).
    """
    logits = output["logits"]
    modalities = tuple(output["aux"])
    if label.dim() != 1 or label.shape[0] != logits.shape[0]:
        raise ValueError(f"label must be [B] = [{logits.shape[0]}], got {list(label.shape)}")
    present = mask > 0.5
    main = F.cross_entropy(logits, label, reduction="none")
    aux = {m: torch.where(present[:, i], F.cross_entropy(output["aux"][m], label, reduction="none"),
                          torch.zeros_like(main)) for i, m in enumerate(modalities)}
    if weights is not None and weights.learned:
        if "log_vars" not in output:
            raise ValueError("uncertainty weights: attach them to the model first "
                             "(FusionModel.attach_loss_weights) so its forward returns 'log_vars'")
        s = output["log_vars"].clamp(-LOG_VAR_LIMIT, LOG_VAR_LIMIT)
        loss = torch.exp(-s[:, 0]) * main + 0.5 * s[:, 0]
        for i, m in enumerate(modalities):
            k = i + 1
            term = torch.exp(-s[:, k]) * aux[m] + 0.5 * s[:, k]
            loss = loss + torch.where(present[:, i], term, torch.zeros_like(term))
    else:
        w = weights.current() if weights is not None else {MAIN: 1.0}
        loss = w[MAIN] * main
        for m in modalities:
            loss = loss + w.get(m, 0.0) * aux[m]
    parts = {MAIN: main.detach(), **{m: aux[m].detach() for m in modalities}}
    return loss, parts


class HeadLossMeter:
    """Mean loss per head over many batches; aux heads only over samples with that modality.

    ``update(parts, mask)`` with :func:`multimodal_loss`'s parts; ``means()`` gives
    ``{head: mean}`` (NaN for a head with no samples): the input of
    :meth:`AuxLossWeights.update_from_losses`.
    """

    def __init__(self, modalities: tuple[str, ...]):
        self.modalities = tuple(modalities)
        self.heads = (MAIN, *self.modalities)
        self.sums = dict.fromkeys(self.heads, 0.0)
        self.counts = dict.fromkeys(self.heads, 0)

    def update(self, parts: Mapping[str, torch.Tensor], mask: torch.Tensor) -> None:
        present = (mask > 0.5).cpu()
        self.sums[MAIN] += float(parts[MAIN].sum())
        self.counts[MAIN] += int(parts[MAIN].numel())
        for i, m in enumerate(self.modalities):
            self.sums[m] += float(parts[m].cpu()[present[:, i]].sum())
            self.counts[m] += int(present[:, i].sum())

    def means(self) -> dict[str, float]:
        return {h: (self.sums[h] / self.counts[h] if self.counts[h] else math.nan) for h in self.heads}


def clip_group_norms(model: nn.Module, total_norm: float, shares: Mapping[str, float]) -> list[float]:
    """Per-parameter clipping thresholds for Opacus ``clipping="per_layer"``.

    One threshold per trainable parameter, in ``model.parameters()`` order (build the optimizer
    from ``[p for p in model.parameters() if p.requires_grad]`` so the orders agree). Group g
    (see :func:`clinfuse.models.fusion.group_of`) gets the norm ``total_norm * sqrt(share_g)``,
    shares renormalised over the groups that have trainable parameters, split evenly over its
    k parameters as ``/ sqrt(k)``. So the squares sum to ``total_norm ** 2``: the bound on a
    sample's whole gradient, which the privacy accounting uses, is still ``total_norm``.
    ``shares`` maps every group (modality names and ``fusion``) to its share, e.g.
    ``ClipGroupsConfig.shares(cfg.modalities)``; whether to clip per group is the caller's decision.
    """
    if not total_norm > 0:
        raise ValueError(f"total_norm must be positive, got {total_norm}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameters")
    all_groups = (*modality_names_of(model), FUSION_GROUP)
    missing = [g for g in all_groups if g not in shares]
    if missing:
        raise ValueError(f"no clipping share for group(s) {missing}")
    share_of = {g: float(shares[g]) for g in all_groups}
    if any(not (s > 0) for s in share_of.values()):
        raise ValueError(f"group shares must be positive, got {share_of}")
    groups = [group_of(n) for n in names]
    counts = {g: groups.count(g) for g in all_groups}
    active = sum(share_of[g] for g in all_groups if counts[g])
    per_param = {g: total_norm * math.sqrt(share_of[g] / active) / math.sqrt(counts[g])
                 for g in all_groups if counts[g]}
    return [per_param[g] for g in groups]


def _squared_norms(p: torch.Tensor) -> torch.Tensor | None:
    """Squared per-sample gradient norms ``[B]`` from ``grad_sample``, else the grad's ``[1]``."""
    gs = getattr(p, "grad_sample", None)
    if isinstance(gs, list):
        gs = torch.cat(gs, dim=0) if gs else None
    if isinstance(gs, torch.Tensor):
        return gs.detach().flatten(1).pow(2).sum(dim=1)
    if p.grad is not None:
        return p.grad.detach().pow(2).sum().view(1)
    return None


def modality_contributions(model: nn.Module) -> dict[str, float]:
    """Share of the squared gradient norm per group, ``{group: share}``, shares summing to 1.

    Call after ``backward()`` and before the optimizer step. With Opacus per-sample gradients
    present (``p.grad_sample``) the figure is the mean over samples of each group's squared
    per-sample norm before clipping — what per-sample clipping sees; otherwise it uses ``p.grad``
    (the batch gradient). Squared norms add across groups, hence shares of the squared norm.
    All zeros when there is no gradient. A log figure computed from private gradients: keep it
    local (it is not privatised).
    """
    sq = dict.fromkeys((*modality_names_of(model), FUSION_GROUP), 0.0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        norms = _squared_norms(p)
        if norms is not None:
            sq[group_of(name)] += float(norms.mean())
    total = sum(sq.values())
    return {g: (sq[g] / total if total > 0 else 0.0) for g in sq}
