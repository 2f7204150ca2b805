"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The accountant's epsilon is arithmetic about the mechanism the code is *supposed* to run. This
module checks the mechanism that actually runs: it inserts ``m`` canaries, each included
independently with probability 1/2, into a shadow DP-SGD run, guesses from the final model which
canaries were included, and turns the number of correct guesses into an epsilon *lower bound* at
95% confidence. A lower bound above the epsilon the settings claim means the claim is false
(missing noise, broken clipping, wrong sampling); a bound below it is what a correct
implementation gives.

White-box gradient canaries ("Dirac" canaries). Canary ``j`` is a per-sample gradient that is
zero except at one coordinate ``c_j`` of the flat parameter vector, with norm
``canary_scale * max_grad_norm`` so the real clipping applies to it. The shadow run uses Opacus'
own ``DPDataLoader`` (Poisson sampling at the site's sample rate), ``GradSampleModule`` and
``DPOptimizer`` (clipping to ``max_grad_norm``, Gaussian noise ``noise_multiplier *
max_grad_norm``), i.e. the same code path as the site's trainer, on a linear probe whose
per-sample gradient *is* its input row. The site's patients can be present as background rows:
their real per-sample gradients from the site's model, restricted to the canary coordinates
plus one coordinate carrying the norm of all the others — exact for clipping and for the canary
coordinates, so the dynamics along the canaries are those of the full-size run.

Score of canary ``j`` = ``theta_0 - theta_T`` at ``c_j`` minus the expected background drift
there (a fixed function of public quantities, so the analysis stays valid). The auditor guesses
the ``k+`` highest scores "included" and the ``k-`` lowest "excluded" (abstaining on the rest),
for a grid of ``(k+, k-)`` fixed in advance, and applies a Bonferroni correction over the grid.

Statistics (the paper's Theorem for (epsilon, delta)-DP with abstentions): if the mechanism is
(eps, delta)-DP, the number ``W`` of correct guesses among ``r`` satisfies, for every ``v``,
``P[W >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha`` with
``alpha = max_{1<=i<=v} P[v - i <= Binomial(r, e^eps/(1+e^eps)) < v] / i``. The lower bound is
the largest ``eps`` whose p-value is still <= 1 - confidence.

One run can only refute claims up to about ``log(m)``: with 1,000 canaries even a run without
noise shows at most ~5. :func:`run_canary_audit` reports this ceiling (``max_detectable``).
When the site's whole run claims more, :func:`plan_audit` picks a run one audit *can* refute:
fewer steps of the same mechanism, or, when even one step at the site's sample rate claims too
much (small sites sample a large fraction of their patients per step), a lower sample rate with
the site's noise multiplier and clipping norm. Missing noise or broken clipping show up in any
such run; the claim is always the accountant's epsilon for exactly the run that was audited.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import optimize, special, stats

from clinfuse.errors import InputError
from clinfuse.privacy.accountant import DEFAULT_TIMEOUT_S, compute_epsilon, rdp_epsilon_by_steps

# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Upper bound on ``P[>= v correct of r guesses]`` for an (eps, delta)-DP mechanism.

    ``m`` canaries each included with probability 1/2, ``r`` guesses (the rest abstentions).
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    q = float(special.expit(eps))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta <= 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, r, q) - beta  # P[v - i <= Binomial(r, q) < v]
    alpha = float(np.max(window / i))
    return min(beta + 2 * m * delta * alpha, 1.0)


@functools.lru_cache(maxsize=4096)
def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, *, significance: float = 0.05) -> float:
    """Largest eps rejected at ``significance``: the mechanism is not (eps, delta)-DP.

    0 when even eps = 0 cannot be rejected.
    """
    def excess(eps: float) -> float:
        return significance - p_value(m, r, v, eps, delta)

    if r == 0 or excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
        if hi > 1e3:  # cannot happen for finite r; guard against numerical trouble
            return hi
    return float(optimize.brentq(excess, 0.0, hi, xtol=1e-6))


def guess_grid(m: int, extra_k: Iterable[int] = ()) -> list[tuple[int, int]]:
    """The ``(k+, k-)`` guesses tried, fixed before any score is seen.

    Fractions of ``m`` plus ``extra_k`` (which must come from public quantities only, e.g. the
    expected number of included canaries that were sampled at least once).
    """
    ks = {max(1, round(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)}
    ks |= {int(k) for k in extra_k if 1 <= int(k) <= m}
    ks = sorted(ks)
    return [(k, 0) for k in ks] + [(k, k) for k in ks if 2 * k <= m]


def expected_sampled_k(m: int, sample_rate: float, steps: int) -> int:
    """Guesses sized to the included canaries expected to be sampled at least once (80% of them)."""
    return max(1, math.floor(0.8 * (m / 2) * (1 - (1 - sample_rate) ** steps)))


def detection_ceiling(m: int, delta: float, *, extra_k: Iterable[int] = (), confidence: float = 0.95) -> float:
    """The largest lower bound ``m`` canaries can give in one run (every guess right).

    A claimed epsilon above this cannot be refuted by the audit, however leaky the run.
    """
    grid = guess_grid(m, extra_k)
    significance = (1 - confidence) / len(grid)
    return max(epsilon_lower_bound(m, k1 + k2, k1 + k2, delta, significance=significance) for k1, k2 in grid)


def expected_noiseless_bound(m: int, sample_rate: float, steps: int, delta: float, *,
                             confidence: float = 0.95) -> float:
    """The lower bound a run *without noise* would typically give (used to plan the audit).

    Without noise every included canary that was sampled at least once is recognised; the rest
    look excluded. The bound is that of the largest ``k+`` guesses no larger than that number.
    """
    k_star = expected_sampled_k(m, sample_rate, steps)
    grid = guess_grid(m, [k_star])
    significance = (1 - confidence) / len(grid)
    # All-correct bounds grow with the number of guesses: the largest k+ <= k_star is the best.
    k = max((k for k, k2 in grid if k2 == 0 and k <= k_star), default=0)
    return epsilon_lower_bound(m, k, k, delta, significance=significance) if k else 0.0


STEP_CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
GOOD_MARGIN = 1.0  # expected excess (in epsilon) of a noiseless run's bound over the claim


def plan_audit(noise_multiplier: float, sample_rate: float, horizon: int, delta: float, m: int, *,
               mechanism: str = "prv", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[float, int, str | None]:
    """Which run of the site's DP-SGD to audit: ``(sample_rate, steps, note)``.

    The site's own settings and horizon when their claimed epsilon is at most half of what ``m``
    canaries can show. Otherwise one run cannot refute the claim (it can show little more than
    ``log(m)``), so the audit runs the same noise multiplier and clipping norm for fewer steps
    (a prefix of training) and, if even one step at the site's sample rate claims too much, at
    a lower sample rate: the choice where a run *without noise* would beat the claim by the
    widest expected margin, preferring the site's sample rate once the margin reaches
    :data:`GOOD_MARGIN`. ``note`` (``None`` when nothing changed) says what was changed.
    Candidates are scored with RDP (cheap; an upper bound, so margins are if anything
    understated); the audit itself then uses ``mechanism``.
    """
    ceiling = detection_ceiling(m, delta, extra_k=[expected_sampled_k(m, sample_rate, horizon)])
    full = compute_epsilon([(noise_multiplier, sample_rate, horizon)], delta, mechanism=mechanism,
                           timeout_s=timeout_s)[0]
    if full <= ceiling / 2 or noise_multiplier == 0:
        return sample_rate, horizon, None
    best = None  # (margin, q, t)
    for j in range(8):
        q = sample_rate / 2 ** j
        steps = [t for t in STEP_CANDIDATES if t < horizon] if j == 0 else list(STEP_CANDIDATES)
        for t, claim in zip(steps, rdp_epsilon_by_steps(noise_multiplier, q, steps, delta)):
            margin = expected_noiseless_bound(m, q, t, delta) - claim
            if best is None or margin > best[0]:
                best = (margin, q, t)
        if best is not None and best[0] >= GOOD_MARGIN:
            break
    if best is None:
        return sample_rate, horizon, (f"the claimed epsilon {full:.2f} is above what {m} canaries can "
                                      f"refute ({ceiling:.2f}); a run without noise may pass unnoticed")
    margin, q, t = best
    note = (f"the site's full run (sample rate {sample_rate:.4g}, {horizon} steps) claims epsilon {full:.2f}, "
            f"more than {m} canaries can refute ({ceiling:.2f}); auditing {t} step{'s' if t > 1 else ''}")
    note += (" of the same mechanism" if q == sample_rate else
             f" at sample rate {q:.4g} with the site's noise multiplier and clipping norm")
    if margin <= 0:
        note += "; even so a run without noise may pass unnoticed: use more canaries"
    return q, t, note


def lower_bound_from_scores(scores: np.ndarray, included: np.ndarray, delta: float, *,
                            confidence: float = 0.95, extra_k: Iterable[int] = ()) -> dict:
    """Epsilon lower bound from canary scores (higher = more likely included).

    Returns a dict with ``eps_lower_bound``, the best ``k_plus``/``k_minus``, ``guesses``,
    ``correct`` and ``max_detectable`` (the bound if every guess were right).
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    grid = guess_grid(m, extra_k)
    significance = (1 - confidence) / len(grid)  # Bonferroni over the grid
    order = np.argsort(-scores, kind="stable")
    ranked = included[order]
    best = {"eps_lower_bound": 0.0, "k_plus": 0, "k_minus": 0, "guesses": 0, "correct": 0}
    ceiling = 0.0
    for k_plus, k_minus in grid:
        correct = int(ranked[:k_plus].sum()) + (int((~ranked[m - k_minus:]).sum()) if k_minus else 0)
        r = k_plus + k_minus
        ceiling = max(ceiling, epsilon_lower_bound(m, r, r, delta, significance=significance))
        eps = epsilon_lower_bound(m, r, correct, delta, significance=significance)
        if eps > best["eps_lower_bound"] or best["guesses"] == 0:
            best = {"eps_lower_bound": eps, "k_plus": k_plus, "k_minus": k_minus, "guesses": r,
                    "correct": correct}
    best["max_detectable"] = ceiling
    return best


# --------------------------------------------------------------------------------------------
# Background: the site's real per-sample gradients, compressed to the canary coordinates
# --------------------------------------------------------------------------------------------

def _default_loss(output, batch):
    import torch.nn.functional as F

    logits = output["logits"] if isinstance(output, dict) else output
    return F.cross_entropy(logits, batch[-1], reduction="sum")


def background_features(model, batches: Iterable, coords: np.ndarray, *,
                        loss_fn: Callable | None = None, max_samples: int = 1000) -> np.ndarray:
    """Per-sample gradients of ``model`` on ``batches`` at the canary coordinates.

    ``batches`` yield tuples whose last element is the target; ``model(*batch[:-1])`` returns
    logits or a dict with ``"logits"``; ``loss_fn(output, batch)`` must *sum* over the batch
    (default: cross entropy). Returns ``[n, len(coords) + 1]``: the gradient at each coordinate
    of ``coords`` (indices into the concatenated flattened trainable parameters, in
    ``parameters()`` order) and, last, the norm of all the other coordinates, so clipping sees
    each sample's true norm.
    """
    import torch
    from opacus import GradSampleModule

    loss_fn = loss_fn or _default_loss
    params = [p for p in model.parameters() if p.requires_grad]
    coords = np.asarray(coords)
    gsm = GradSampleModule(model)
    # Opacus captures activations only in training mode; switch off dropout by hand instead.
    gsm.train()
    for module in gsm.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()
    rows = []
    seen = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs need grad"
            for batch in batches:
                gsm.zero_grad(set_to_none=True)
                loss_fn(gsm(*batch[:-1]), batch).backward()
                grads = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], dim=1)
                grads = grads.detach().double().numpy()
                picked = grads[:, coords]
                rest = np.sqrt(np.maximum((grads ** 2).sum(axis=1) - (picked ** 2).sum(axis=1), 0.0))
                rows.append(np.concatenate([picked, rest[:, None]], axis=1))
                seen += grads.shape[0]
                if seen >= max_samples:
                    break
    finally:
        gsm._close()
        for p in params:
            p.grad_sample = None
    if not rows:
        return np.zeros((0, len(coords) + 1))
    return np.concatenate(rows, axis=0)[:max_samples]


# --------------------------------------------------------------------------------------------
# The shadow run
# --------------------------------------------------------------------------------------------

def _shadow_dp_sgd(features: np.ndarray, *, noise_multiplier: float, max_grad_norm: float,
                   sample_rate: float, steps: int, seed: int, progress: bool | None) -> np.ndarray:
    """DP-SGD through Opacus on a linear probe whose per-sample gradient is its input row.

    Returns ``theta_0 - theta_T`` (sum reduction, learning rate 1: the sum of the noisy clipped
    gradient sums over all steps).
    """
    import torch
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import TensorDataset

    from clinfuse.progress import Progress

    _n, d = features.shape
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(d, 1, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(probe.weight)
    module = GradSampleModule(probe)
    optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0),
                            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                            expected_batch_size=None, loss_reduction="sum", generator=gen)
    loader = DPDataLoader(TensorDataset(torch.from_numpy(features)), sample_rate=sample_rate,
                          generator=torch.Generator().manual_seed(seed + 1))
    done = 0
    bar = Progress(steps, "shadow DP-SGD", "step", enabled=progress is not False)
    try:
        with warnings.catch_warnings():
            # Opacus' hooks warn that no *input* needs a gradient; only the parameters do here.
            warnings.simplefilter("ignore", UserWarning)
            while done < steps:
                for (xb,) in loader:
                    optimizer.zero_grad(set_to_none=True)
                    module(xb).sum().backward()  # d(sum x.theta)/d theta = x: the row is the gradient
                    optimizer.step()
                    done += 1
                    bar.update(1)
                    if done >= steps:
                        break
    finally:
        bar.close()
        module._close()
    return -probe.weight.detach().numpy()[0].copy()


@dataclass
class AuditResult:
    """Outcome of :func:`run_canary_audit`.

    ``passed`` is False (a *violation*) when the empirical lower bound exceeds
    ``claimed_epsilon`` — the epsilon the settings claim (by default the accountant's epsilon for
    ``noise_multiplier``, ``sample_rate``, ``steps``) — or when that claim is itself infinite
    (noise multiplier 0: the settings give no differential privacy at all).
    """

    eps_lower_bound: float
    accounted_epsilon: float
    claimed_epsilon: float
    passed: bool
    verdict: str
    cost_seconds: float
    max_detectable: float
    n_canaries: int
    n_included: int
    n_background: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    noise_multiplier: float
    applied_noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    confidence: float
    accountant: str
    seed: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        status = "PASS" if self.passed else "VIOLATION"
        lines = [
            f"{status}: {self.verdict}",
            (f"  empirical epsilon lower bound ({self.confidence:.0%} confidence): {self.eps_lower_bound:.3f}"
            f"  (the most this audit can show: {self.max_detectable:.3f})"),
            (f"  claimed epsilon: {_fmt(self.claimed_epsilon)}  accounted ({self.accountant}): "
            f"{_fmt(self.accounted_epsilon)}  at delta {self.delta:g}"),
            (f"  shadow DP-SGD: noise multiplier {self.applied_noise_multiplier:g} applied "
            f"({self.noise_multiplier:g} claimed), clip {self.max_grad_norm:g}, sample rate "
            f"{self.sample_rate:.4g}, {self.steps} steps"),
            (f"  canaries: {self.n_canaries} ({self.n_included} included), background samples "
            f"{self.n_background}; guesses {self.guesses} (k+={self.k_plus}, k-={self.k_minus}), "
            f"correct {self.correct}"),
            f"  cost: {self.cost_seconds:.1f} s",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}"


def run_canary_audit(dim_or_model, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float,
                     steps: int, n_canaries: int = 1000, seed: int = 0, delta: float = 1e-5,
                     applied_noise_multiplier: float | None = None, claimed_epsilon: float | None = None,
                     data: Iterable | None = None, loss_fn: Callable | None = None,
                     max_background: int = 1000, canary_scale: float = 10.0, accountant: str = "prv",
                     confidence: float = 0.95, timeout_s: float = DEFAULT_TIMEOUT_S,
                     progress: bool | None = None) -> AuditResult:
    """One-run canary audit of DP-SGD with the given settings.

    Parameters
    ----------
    dim_or_model:
        Number of model parameters (canary coordinates are drawn from it), or the site's
        ``torch.nn.Module`` (its trainable parameter count; with ``data``, its real per-sample
        gradients on up to ``max_background`` samples are the background).
    noise_multiplier, max_grad_norm, sample_rate, steps:
        The site's DP-SGD settings; the claim is computed from these.
    applied_noise_multiplier:
        Noise actually applied in the shadow run (default ``noise_multiplier``). Setting it
        below the claimed value simulates a broken implementation.
    claimed_epsilon:
        The epsilon to test (default: the ``accountant``'s epsilon for the settings).
    n_canaries, seed, delta, confidence, canary_scale:
        Audit parameters; canaries have norm ``canary_scale * max_grad_norm`` before clipping.

    Returns an :class:`AuditResult`; ``passed`` is False for a violation.
    """
    t0 = time.perf_counter()
    if isinstance(dim_or_model, (int, np.integer)) and not isinstance(dim_or_model, bool):
        model, dim = None, int(dim_or_model)
    elif hasattr(dim_or_model, "parameters"):
        model = dim_or_model
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        raise InputError(f"dim_or_model must be a parameter count or a torch module, got {type(dim_or_model)}")
    m = int(n_canaries)
    if m < 10:
        raise InputError(f"n_canaries must be at least 10, got {m}", key="n_canaries")
    if dim < m:
        raise InputError(f"the model has {dim} parameters, fewer than the {m} canaries (one coordinate "
                         "each)", key="n_canaries")
    if not 0 < sample_rate <= 1:
        raise InputError(f"sample_rate must be in (0, 1], got {sample_rate}", key="sample_rate")
    if steps < 1 or max_grad_norm <= 0 or noise_multiplier < 0:
        raise InputError("need steps >= 1, max_grad_norm > 0 and noise_multiplier >= 0")
    applied = noise_multiplier if applied_noise_multiplier is None else float(applied_noise_multiplier)
    if applied < 0:
        raise InputError(f"applied noise multiplier must be >= 0, got {applied}")

    accounted, used = compute_epsilon([(noise_multiplier, sample_rate, steps)], delta, mechanism=accountant,
                                      timeout_s=timeout_s)
    claim = accounted if claimed_epsilon is None else float(claimed_epsilon)
    notes = []
    if used != accountant:
        notes.append(f"{accountant} accountant unavailable; the claim was computed with {used}")

    rng = np.random.default_rng(seed)
    coords = rng.choice(dim, size=m, replace=False)
    included = rng.random(m) < 0.5
    if model is not None and data is not None:
        background = background_features(model, data, coords, loss_fn=loss_fn, max_samples=max_background)
    else:
        background = np.zeros((0, m + 1))
        if model is not None:
            notes.append("no data given: the shadow run has no background patients (the "
                         "strongest, least realistic audit)")
    canaries = np.zeros((int(included.sum()), m + 1))
    canaries[np.arange(len(canaries)), np.flatnonzero(included)] = canary_scale * max_grad_norm
    features = np.concatenate([background, canaries], axis=0)

    drift_theta = _shadow_dp_sgd(features, noise_multiplier=applied, max_grad_norm=max_grad_norm,
                                 sample_rate=sample_rate, steps=steps, seed=seed, progress=progress)
    # Expected drift from the background: each clipped background row is summed ~q*T times.
    if len(background):
        norms = np.linalg.norm(background, axis=1)
        factors = np.minimum(1.0, max_grad_norm / (norms + 1e-6))
        expected = steps * sample_rate * (background * factors[:, None]).sum(axis=0)
    else:
        expected = np.zeros(m + 1)
    scores = (drift_theta - expected)[:m]
    stats_ = lower_bound_from_scores(scores, included, delta, confidence=confidence,
                                     extra_k=[expected_sampled_k(m, sample_rate, steps)])
    lb = stats_["eps_lower_bound"]

    if math.isinf(claim):
        passed = False
        verdict = ("the settings claim no privacy: noise multiplier 0 gives an infinite epsilon "
                   f"(empirical lower bound {lb:.3f})")
    elif lb > claim:
        passed = False
        verdict = (f"the empirical lower bound {lb:.3f} exceeds the claimed epsilon {claim:.3f}: the "
                   "run leaks more than its accounting says (missing noise, broken clipping or sampling)")
    else:
        passed = True
        verdict = f"the empirical lower bound {lb:.3f} is within the claimed epsilon {claim:.3f}"
        if claim > stats_["max_detectable"]:
            notes.append(f"the claim {claim:.3f} is above what {m} canaries can refute in one run "
                         f"({stats_['max_detectable']:.3f}): audit fewer steps or use more canaries "
                         "for a sharper check")
    return AuditResult(
        eps_lower_bound=lb, accounted_epsilon=accounted, claimed_epsilon=claim, passed=passed,
        verdict=verdict, cost_seconds=time.perf_counter() - t0, max_detectable=stats_["max_detectable"],
        n_canaries=m, n_included=int(included.sum()), n_background=len(background),
        guesses=stats_["guesses"], correct=stats_["correct"], k_plus=stats_["k_plus"],
        k_minus=stats_["k_minus"], noise_multiplier=float(noise_multiplier),
        applied_noise_multiplier=applied, max_grad_norm=float(max_grad_norm),
        sample_rate=float(sample_rate), steps=int(steps), delta=float(delta), confidence=confidence,
        accountant=used, seed=seed, notes=notes)
