"""A site's DP-SGD plan: the mechanism fixed for the whole horizon before any step is taken.

:func:`plan_privacy` turns the study config, the site's patient count and the horizon (epochs,
or rounds x local epochs) into a :class:`PrivacyPlan`: Poisson sample rate, batch size, steps per
epoch, delta and the noise multiplier that keeps the whole horizon (plus what the site already
spent) within the target epsilon. The trainer, the site runtime, ``site check`` and the audit
commands all take their plan from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from clinfuse.config import Config

#: Where DP-SGD's noise comes from, said once per command that trains (SECURITY.md, "Randomness").
NOISE_SOURCE = ("DP noise: PyTorch's generator seeded from OS entropy, not from the config seed "
                "(Opacus' secure mode needs torchcsprng, not available; see SECURITY.md)")


def default_delta(n_patients: int) -> float:
    """delta well below 1/n (the probability of failure must be small for every patient)."""
    return min(1e-5, 0.1 / max(n_patients, 1))


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD mechanism of one site, fixed for the whole horizon before training starts."""
    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    n_patients: int
    batch_size: int
    steps_per_epoch: int
    horizon_steps: int
    target_epsilon: float
    accountant: str

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_patients

    def mechanism(self, steps: int, clipping: str, norms) -> dict:
        """Mechanism parameters as written to the site's ledger."""
        return {
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "n": self.n_patients, "expected_batch_size": self.expected_batch_size, "steps": steps,
            "max_grad_norm": norms, "clipping": clipping, "poisson": True, "delta": self.delta,
            "privacy_unit": "patient", "accountant": self.accountant,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def plan_privacy(cfg: Config, n_patients: int, horizon_epochs: int, history=()) -> PrivacyPlan:
    """Plan the noise multiplier so ``horizon_epochs`` epochs over ``n_patients`` meet the target.

    ``history`` is what the site's accountant already holds; with a non-empty history the plan
    fits the remaining budget. ``privacy.noise_multiplier`` in the config overrides planning.
    """
    from clinfuse.errors import InputError
    from clinfuse.privacy.accountant import plan_noise_multiplier

    if n_patients < 2:
        raise InputError(f"DP training needs at least 2 patients, got {n_patients}")
    batch = min(cfg.train.batch_size, n_patients)
    steps_per_epoch = math.ceil(n_patients / batch)
    sample_rate = 1.0 / steps_per_epoch  # what Opacus's Poisson loader uses for this loader length
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(n_patients)
    if delta >= 1.0 / n_patients:
        raise InputError(f"delta {delta:g} must be below 1/n = {1 / n_patients:g} patients", key="privacy.delta")
    horizon = steps_per_epoch * horizon_epochs
    if cfg.privacy.noise_multiplier is not None:
        sigma = cfg.privacy.noise_multiplier
    else:
        sigma = plan_noise_multiplier(cfg.privacy.target_epsilon, sample_rate, horizon, delta,
                                      mechanism=cfg.privacy.accountant, history=history)
    return PrivacyPlan(noise_multiplier=float(sigma), sample_rate=sample_rate, delta=delta,
                       max_grad_norm=cfg.privacy.max_grad_norm, n_patients=n_patients, batch_size=batch,
                       steps_per_epoch=steps_per_epoch, horizon_steps=horizon,
                       target_epsilon=cfg.privacy.target_epsilon, accountant=cfg.privacy.accountant)
