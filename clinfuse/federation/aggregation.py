"""Server-side aggregation of site updates, plain or modality-aware.

Modality-aware averaging: parameters are grouped by modality (one group per modality the study
declares: its encoder, pool and auxiliary head) plus ``fusion`` (everything shared). An encoder group is averaged only over the sites
that trained it, weighted by how many of their training samples had that modality; a site without
notes never pulls the text encoder back towards the weights it was sent. The ``fusion`` group is
averaged over all sites, weighted by their number of samples. A group that no site trained keeps
the previous global weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

FUSION = "fusion"


@dataclass(frozen=True)
class SiteUpdate:
    """What one site sent back: its weights, its sample count and its per-modality sample counts."""
    state: Mapping[str, np.ndarray]
    num_examples: int
    modality_examples: Mapping[str, int] = field(default_factory=dict)


def _weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    total = float(sum(weights))
    out = np.zeros_like(arrays[0], dtype=np.float64)
    for array, weight in zip(arrays, weights):
        out += array.astype(np.float64) * (weight / total)
    return out.astype(arrays[0].dtype)


def group_of(groups: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Map each parameter name to its group; names in no group belong to ``fusion``."""
    return {name: group for group, names in groups.items() for name in names}


def aggregate(updates: Sequence[SiteUpdate], previous: Mapping[str, np.ndarray], *,
              groups: Mapping[str, Sequence[str]] | None = None, modality_aware: bool = True) -> dict[str, np.ndarray]:
    """New global weights from site updates.

    ``previous`` is the global state the sites started from (used where no site trained a group).
    With ``modality_aware=False`` (or no ``groups``) this is plain FedAvg weighted by ``num_examples``.
    """
    updates = [u for u in updates if u.num_examples > 0]
    if not updates:
        return {k: np.array(v, copy=True) for k, v in previous.items()}
    owner = group_of(groups or {}) if modality_aware else {}
    result = {}
    for name, old in previous.items():
        group = owner.get(name, FUSION)
        if group != FUSION:
            chosen = [(u.state[name], u.modality_examples.get(group, 0)) for u in updates
                      if u.modality_examples.get(group, 0) > 0]
        else:
            chosen = [(u.state[name], u.num_examples) for u in updates]
        if not chosen:
            result[name] = np.array(old, copy=True)
            continue
        arrays, weights = zip(*chosen)
        result[name] = _weighted_mean(arrays, weights)
    return result
