"""The DP training recipe: batch, steps, optimiser, learning rate, clipping and averaging.

:func:`plan_privacy <clinfuse.privacy.plan.plan_privacy>` calls :func:`steps_per_epoch_for` (before
the noise is planned) and :func:`choose_recipe` (after), and signs the result into the plan; the
trainer takes its optimiser settings from the plan. Every value the user sets in the config wins
(:attr:`Recipe.sources` says which came from where). The rule is deterministic in its inputs.

The rule, following De et al. 2022 ("Unlocking high-accuracy differentially private image
classification through scale") and Ponomareva et al. 2023 ("How to DP-fy ML"): large expected
batches and few, strong steps, plain SGD, a clip small enough that nearly every per-sample
gradient is clipped, and averaged iterates. The constants were chosen by measurement
(``benchmarks/dp_recipe_sweep.py``: breast-cancer data over 4 unequal sites, the synthetic cohort
at 200 and 1000 patients per site; figures in the README's Benchmarks section):

* expected batch: the whole site up to :data:`TARGET_BATCH` patients, then ``n / k`` with ``k``
  steps per epoch, ``k = ceil(n / TARGET_BATCH)``;
* optimiser: SGD without momentum (a local trainer lives one round: momentum would restart every
  round, and at a few steps per round it measured no better);
* learning rate: the noise decides. With noise multiplier sigma and expected batch B, every
  coordinate of a step's averaged update carries Gaussian noise of standard deviation
  ``r * C`` with ``r = sigma / B`` (the *noise ratio*), against a clipped mean whose norm is at most
  ``C``. Over the horizon's T steps the noise a unit-norm feature vector's logit picks up grows as
  ``lr * r * sqrt(T)``; the recipe keeps that near :data:`LR_NOISE_BUDGET`:
  ``lr = clamp(LR_NOISE_BUDGET / (r * sqrt(T)), LR_MIN, LR_MAX[head])``;
* clipping norm 1 (:data:`DEFAULT_CLIP`; inputs of the linear head are scaled to about unit norm);
* iterate averaging: an exponential moving average of the weights over the steps of one
  training call (decay ``min(EMA_DECAY, (1 + t) / (10 + t))`` at step t, as in De et al.), used
  for evaluation and what is released.

This recipe is the linear head's; the fusion model keeps the earlier defaults under DP
(:data:`FUSION_DP`, not re-measured). The model head (:func:`resolve_head`) is chosen at study level, never from one site's count:
federated sites must build the same model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

DEFAULT_CLIP = 1.0
#: Expected batch the plan aims for (a site below it trains on all its patients at every step).
TARGET_BATCH = 200
#: Target of ``lr * r * sqrt(T)``: the noise a unit-norm input's logit accumulates over the horizon.
LR_NOISE_BUDGET = 0.3
LR_MIN = 0.05
LR_MAX = {"linear": 16.0}
EMA_DECAY = 0.999
#: Noise ratio ``sigma / B`` above which a site is told it is too small for its epsilon.
NOISE_RATIO_WARN = 0.1
#: Declared smallest site (``federation.min_site_patients``) below which ``model.head: auto``
#: picks the linear head.
LINEAR_HEAD_BELOW = 5000
#: Without DP: the trainer's defaults per head.
NON_DP = {"fusion": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "batch_size": 32},
          "linear": {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "batch_size": 32}}


def resolve_head(cfg) -> str:
    """``"linear"`` or ``"fusion"``: ``model.head``, or for ``auto`` the study-level rule.

    ``auto`` is the linear head over fixed features when the study declares its smallest site
    (``federation.min_site_patients``) below :data:`LINEAR_HEAD_BELOW` patients, with or without
    DP (so a non-DP baseline trains the same model); otherwise the fusion model. Only
    study-level inputs: every site builds the same model.
    """
    head = cfg.model.head
    if head != "auto":
        return head
    small = cfg.federation.min_site_patients
    return "linear" if small is not None and small < LINEAR_HEAD_BELOW else "fusion"


#: Under DP, the fusion model keeps the trainer's earlier defaults (Adam, lr 1e-3, batch 32,
#: last iterate): the recipe above was measured on the linear head only.
FUSION_DP = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "batch_size": 32, "ema_decay": 0.0}


def default_batch_size(cfg) -> int:
    """The DP batch size in effect: ``train.batch_size`` when set, else the head's
    (the linear head: :data:`TARGET_BATCH`; the fusion model: its earlier 32)."""
    if cfg.train.batch_size is not None:
        return cfg.train.batch_size
    return TARGET_BATCH if resolve_head(cfg) == "linear" else FUSION_DP["batch_size"]


@dataclass(frozen=True)
class Recipe:
    """The optimiser side of a DP plan. ``sources[name]`` is ``"config"`` or ``"plan"``."""
    head: str
    optimizer: str
    lr: float
    momentum: float
    ema_decay: float
    noise_ratio: float
    sources: dict = field(default_factory=dict)

    def as_plan_fields(self) -> dict:
        return asdict(self)


def choose_recipe(cfg, *, noise_multiplier: float, expected_batch: float, horizon_steps: int) -> Recipe:
    """The recipe for a site whose plan has this noise, expected batch and horizon (see module doc)."""
    head = resolve_head(cfg)
    t = cfg.train
    ratio = noise_multiplier / max(expected_batch, 1e-12)
    sources = {"head": "config" if cfg.model.head != "auto" else "plan"}
    if head == "linear":
        raw = LR_NOISE_BUDGET / max(ratio * math.sqrt(max(horizon_steps, 1)), 1e-12)
        base = {"optimizer": "sgd", "lr": round(float(min(LR_MAX[head], max(LR_MIN, raw))), 6), "momentum": 0.0,
                "ema_decay": EMA_DECAY}
    else:
        base = FUSION_DP
    chosen = {}
    for name in ("optimizer", "lr", "momentum", "ema_decay"):
        value = getattr(t, name)
        chosen[name], sources[name] = (value, "config") if value is not None else (base[name], "plan")
    sources["batch_size"] = "config" if t.batch_size is not None else "plan"
    sources["max_grad_norm"] = "config" if cfg.privacy.max_grad_norm is not None else "plan"
    return Recipe(head=head, optimizer=chosen["optimizer"], lr=float(chosen["lr"]), momentum=float(chosen["momentum"]),
                  ema_decay=float(chosen["ema_decay"]), noise_ratio=ratio, sources=sources)


def non_dp_settings(cfg) -> dict:
    """Optimiser settings without DP: the config's where set, else :data:`NON_DP` for the head."""
    head = resolve_head(cfg)
    t, base = cfg.train, NON_DP[resolve_head(cfg)]
    return {"head": head, "optimizer": t.optimizer or base["optimizer"], "lr": t.lr if t.lr is not None else base["lr"],
            "momentum": t.momentum if t.momentum is not None else base["momentum"],
            "batch_size": t.batch_size or base["batch_size"],
            "ema_decay": t.ema_decay if t.ema_decay is not None else 0.0}


def too_small(plan) -> bool:
    """Whether the plan's noise ratio passes :data:`NOISE_RATIO_WARN` (the site is too small)."""
    return plan.noise_multiplier / max(plan.expected_batch_size, 1e-12) > NOISE_RATIO_WARN


def forecast_lines(plan) -> list[str]:
    """The utility forecast of a plan for ``site check`` and ``audit plan``, warning included."""
    ratio = plan.noise_multiplier / max(plan.expected_batch_size, 1e-12)
    lines = [(f"utility forecast: per step, each coordinate of the averaged update carries noise of std "
             f"{ratio:.3g} x C (sigma {plan.noise_multiplier:.3g} / expected batch "
             f"{plan.expected_batch_size:.3g}), against a clipped mean update of norm at most C = "
             f"{plan.max_grad_norm:g}")]
    if too_small(plan):
        lines.append(
            f"WARNING: this site is too small for its epsilon: {plan.n_patients} patients at target epsilon "
            f"{plan.target_epsilon:g} over {plan.horizon_steps} steps give noise {ratio:.2g} x C per coordinate "
            f"(above {NOISE_RATIO_WARN:g}); the model it trains may learn little or nothing. Options: raise "
            f"the cap (privacy.target_epsilon / --max-epsilon, if the privacy officer agrees), fewer rounds "
            f"or epochs (federation.rounds, train.epochs), merge with another site, or take part for evaluation only")
    return lines
