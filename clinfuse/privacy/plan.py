"""A site's DP-SGD plan: the mechanism fixed for the whole horizon before any step is taken.

:func:`plan_privacy` turns the study config, the site's patient count and the horizon (epochs,
or rounds x local epochs) into a :class:`PrivacyPlan`: Poisson sample rate, batch size, steps per
epoch, delta and the noise multiplier that keeps the whole horizon (plus what the site already
spent) within the target epsilon. It also tabulates epsilon after every epoch of the horizon,
once, with the site's accountant: a round whose history is the planned one reads its epsilon
from the table instead of running the accountant (seconds per call with PRV); any other history
is computed (:meth:`clinfuse.privacy.accountant.SiteAccountant.know`).

:class:`PlanStore` is the one reader and writer of ``plan.json``. The plan in force is the one
in the site's signed ledger (a ``"config"`` entry holding the plan and its ``plan_sha256``);
``plan.json`` is its readable copy, and a ``plan.json`` that is no plan the ledger signed is
refused. A plan whose inputs (target, delta, noise override, clipping norm, batch size,
accountant, patient count) no longer match the config is refused too, until the site re-plans
explicitly (``clinfuse site replan``, which writes its own ledger entry).

The trainer, the site runtime, ``site check`` and the audit commands all take their plan from here.

Extending the plan: add a field with a default to :class:`PrivacyPlan` (and, if it is chosen from
the config, to :func:`plan_inputs`). A plan written by a newer clinfuse keeps fields this
version does not know in :attr:`PrivacyPlan.extra` and writes them back unchanged: they are part
of the signed record. A plan of a newer ``version`` is refused rather than half-understood.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from clinfuse.config import Config
from clinfuse.errors import InputError

PLAN_FILE = "plan.json"
PLAN_FORMAT = "clinfuse.plan"
PLAN_VERSION = 1
NO_DP_HINT = ("non-DP training is only ever the explicit --no-dp or privacy.enabled: false")

#: Where DP-SGD's noise comes from, said once per command that trains (SECURITY.md, "Randomness").
NOISE_SOURCE = ("DP noise: PyTorch's generator seeded from OS entropy, not from the config seed "
                "(Opacus' secure mode needs torchcsprng, not available; see SECURITY.md)")


def default_delta(n_patients: int) -> float:
    """delta well below 1/n (the probability of failure must be small for every patient)."""
    return min(1e-5, 0.1 / max(n_patients, 1))


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD mechanism of one site, fixed for the whole horizon before training starts.

    ``epsilon_table[i]`` is epsilon after ``i + 1`` epochs of the horizon on top of
    ``prior_history`` (what the site had spent when it planned, epsilon ``prior_epsilon``);
    ``None`` where the accountant fell back to another one (that epoch is then computed live).
    A round is ``epochs_per_round`` epochs. ``inputs`` are the settings the plan was made from.
    """
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
    study: str = ""
    rounds: int | None = None
    epochs_per_round: int = 1
    prior_history: tuple[tuple[float, float, int], ...] = ()
    prior_epsilon: float = 0.0
    epsilon_table: tuple[float | None, ...] = ()
    inputs: Mapping = field(default_factory=dict)
    # The training recipe (clinfuse.privacy.recipe); a plan written before it existed reads as
    # the trainer's defaults of that time. ``sources[name]``: "config" (set by the user) or "plan".
    head: str = "fusion"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    ema_decay: float = 0.0
    sources: Mapping = field(default_factory=dict)
    extra: Mapping = field(default_factory=dict)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_patients

    @property
    def noise_ratio(self) -> float:
        """Noise std per coordinate of one step's averaged update, in units of the clip C:
        ``sigma / expected batch`` (the clipped mean itself has norm at most C)."""
        return self.noise_multiplier / max(self.expected_batch_size, 1e-12)

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.epochs_per_round

    def mechanism(self, steps: int, clipping: str, norms) -> dict:
        """Mechanism parameters as written to the site's ledger."""
        return {
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "n": self.n_patients, "expected_batch_size": self.expected_batch_size, "steps": steps,
            "max_grad_norm": norms, "clipping": clipping, "poisson": True, "delta": self.delta,
            "privacy_unit": "patient", "accountant": self.accountant,
        }

    def known_epsilons(self):
        """``(history, delta, epsilon)`` for the prior spend and after each epoch of the table."""
        from clinfuse.privacy.accountant import merge_history

        prior = [tuple(h) for h in self.prior_history]
        out = [(prior, self.delta, self.prior_epsilon)]
        for epochs, eps in enumerate(self.epsilon_table, start=1):
            if eps is not None:
                step = (self.noise_multiplier, self.sample_rate, self.steps_per_epoch * epochs)
                out.append((merge_history(prior + [step]), self.delta, eps))
        return out

    def epsilon_after_round(self, k: int) -> float | None:
        """Tabulated epsilon after ``k`` rounds of this plan (``None`` beyond the table)."""
        if k == 0:
            return self.prior_epsilon
        i = k * self.epochs_per_round - 1
        return self.epsilon_table[i] if 0 <= i < len(self.epsilon_table) else None

    def differences(self, cfg: Config, n_patients: int) -> list[str]:
        """How the config and cohort differ from what this plan was made from (empty: no change)."""
        now = plan_inputs(cfg, n_patients)
        out = []
        for key, planned in self.inputs.items():
            if key == "study" or key not in now or now[key] == planned:
                continue
            out.append(f"{INPUT_NAMES.get(key, key)} was {_show(planned)} when the plan was made, "
                       f"now {_show(now[key])}")
        return out

    def to_dict(self) -> dict:
        """The plan as written to ``plan.json`` and the ledger (unknown fields carried forward)."""
        doc = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **dict(self.extra)}
        for f in fields(self):
            if f.name != "extra":
                doc[f.name] = getattr(self, f.name)
        doc["inputs"] = dict(self.inputs)
        doc["sources"] = dict(self.sources)
        return _normalized(doc)

    @classmethod
    def from_dict(cls, doc: Mapping, *, source: str | Path | None = None) -> PrivacyPlan:
        """Read a plan written by :meth:`to_dict`; :class:`InputError` naming ``source`` if malformed."""
        if not isinstance(doc, Mapping) or doc.get("format") != PLAN_FORMAT:
            raise InputError(f"not a clinfuse privacy plan (no format {PLAN_FORMAT!r})", file=source)
        if doc.get("version") != PLAN_VERSION:
            raise InputError(f"privacy plan version {doc.get('version')!r} is not supported by this clinfuse "
                             f"(it reads version {PLAN_VERSION}): upgrade clinfuse", file=source)
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in doc.items() if k in known}
        extra = {k: v for k, v in doc.items() if k not in known and k not in ("format", "version")}
        try:
            values["prior_history"] = tuple((float(s), float(q), int(t)) for s, q, t in values.get("prior_history", ()))
            values["epsilon_table"] = tuple(None if e is None else _number(e) for e in values.get("epsilon_table", ()))
            values["prior_epsilon"] = _number(values.get("prior_epsilon", 0.0))
            values["sources"] = dict(values.get("sources") or {})
            plan = cls(**values, extra=extra)
            for name in ("noise_multiplier", "sample_rate", "delta", "max_grad_norm", "target_epsilon", "lr",
                         "momentum", "ema_decay"):
                if not isinstance(getattr(plan, name), (int, float)) or isinstance(getattr(plan, name), bool):
                    raise TypeError(f"{name} is not a number")
        except (TypeError, ValueError) as exc:
            raise InputError(f"malformed privacy plan ({exc})", file=source) from None
        return plan


def _number(value) -> float:
    if value in ("inf", "Infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _show(value) -> str:
    return "the default" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _normalized(doc: Mapping) -> dict:
    """Plain JSON types (tuples as lists, inf as "inf"): the form that is hashed and signed."""
    from clinfuse.fileio import to_jsonable

    return json.loads(json.dumps(to_jsonable(doc, strict=True)))


def plan_digest(doc: Mapping) -> str:
    """sha256 of the canonical JSON of a plan dict (what the ledger's ``plan_sha256`` holds)."""
    from clinfuse.privacy.ledger import canonical_json

    return hashlib.sha256(canonical_json(_normalized(doc)).encode("ascii")).hexdigest()


# How each plan input is named to the user (config keys where they come from the config).
INPUT_NAMES = {"target_epsilon": "privacy.target_epsilon", "delta": "privacy.delta",
               "noise_multiplier": "privacy.noise_multiplier", "max_grad_norm": "privacy.max_grad_norm",
               "batch_size": "train.batch_size", "accountant": "privacy.accountant",
               "n_patients": "the number of training patients", "head": "model.head"}


def plan_inputs(cfg: Config, n_patients: int) -> dict:
    """The settings a plan is made from; a change in any of them needs an explicit re-plan.

    Clipping norm and batch size are recorded as in effect (the user's, else the recipe's), so a
    plan made when they were fixed defaults still matches a config that leaves them unset."""
    from clinfuse.privacy.recipe import DEFAULT_CLIP, default_batch_size, resolve_head

    p = cfg.privacy
    return {"study": cfg.study, "target_epsilon": p.target_epsilon, "delta": p.delta,
            "noise_multiplier": p.noise_multiplier,
            "max_grad_norm": p.max_grad_norm if p.max_grad_norm is not None else DEFAULT_CLIP,
            "batch_size": default_batch_size(cfg), "accountant": p.accountant, "n_patients": int(n_patients),
            "head": resolve_head(cfg)}


def check_plan_inputs(cfg: Config, n_patients: int) -> float:
    """Refuse settings no plan can be made from (cheap: before anything is written). Returns delta."""
    if n_patients < 2:
        raise InputError(f"DP training needs at least 2 patients, got {n_patients}")
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(n_patients)
    if delta >= 1.0 / n_patients:
        raise InputError(f"delta {delta:g} must be below 1/n = {1 / n_patients:g} ({n_patients} patients)",
                         key="privacy.delta")
    target = cfg.privacy.target_epsilon
    if not (math.isfinite(target) and target > 0):
        raise InputError(f"target epsilon must be a positive finite number, got {target!r}",
                         key="privacy.target_epsilon")
    if cfg.privacy.noise_multiplier is not None and cfg.privacy.noise_multiplier <= 0:
        raise InputError(f"a noise multiplier of {cfg.privacy.noise_multiplier:g} gives no differential privacy "
                         f"(epsilon is infinite); {NO_DP_HINT}", key="privacy.noise_multiplier")
    return delta


def plan_privacy(cfg: Config, n_patients: int, horizon_epochs: int, history=(), *, epochs_per_round: int = 1,
                 rounds: int | None = None, tabulate: bool = True) -> PrivacyPlan:
    """Plan the noise multiplier so ``horizon_epochs`` epochs over ``n_patients`` meet the target.

    ``history`` is what the site's accountant already holds; with a non-empty history the plan
    fits the remaining budget. ``privacy.noise_multiplier`` in the config overrides planning.
    ``tabulate`` computes :attr:`PrivacyPlan.epsilon_table` (one accountant call per epoch of
    the horizon); without it the table is empty (a plan only looked at, e.g. by an audit).
    Raises :class:`InputError` for settings that give no plan (delta >= 1/n, an infinite
    epsilon) and :class:`~clinfuse.errors.BudgetExceededError` when the budget is spent.
    """
    from clinfuse.privacy.accountant import compute_epsilon, normalize_history, plan_noise_multiplier
    from clinfuse.privacy.recipe import DEFAULT_CLIP, choose_recipe, default_batch_size

    delta = check_plan_inputs(cfg, n_patients)
    batch = min(default_batch_size(cfg), n_patients)
    steps_per_epoch = math.ceil(n_patients / batch)
    batch = math.ceil(n_patients / steps_per_epoch)  # the same steps, batches as even as they go
    # Opacus' Poisson loader over k batches samples at 1/k but runs int(1 / (1/k)) steps, and its
    # accountant records 1 / (that): for some k (93, 99, 105, ...) float rounding makes it k - 1,
    # so the rate planned, sampled and accounted would differ. Take the next batch size whose k
    # is exact.
    while int(1 / (1 / steps_per_epoch)) != steps_per_epoch:
        batch += 1
        steps_per_epoch = math.ceil(n_patients / batch)
    sample_rate = 1.0 / steps_per_epoch  # what Opacus's Poisson loader uses for this loader length
    horizon = steps_per_epoch * horizon_epochs
    prior = normalize_history(history)
    mechanism = cfg.privacy.accountant
    if cfg.privacy.noise_multiplier is not None:
        sigma = float(cfg.privacy.noise_multiplier)
    else:
        sigma = plan_noise_multiplier(cfg.privacy.target_epsilon, sample_rate, horizon, delta,
                                      mechanism=mechanism, history=prior)
    table: list[float | None] = []
    prior_epsilon = 0.0
    if tabulate:
        prior_epsilon = compute_epsilon(prior, delta, mechanism=mechanism)[0]
        for epochs in range(1, horizon_epochs + 1):
            eps, used = compute_epsilon(prior + [(sigma, sample_rate, steps_per_epoch * epochs)], delta,
                                        mechanism=mechanism)
            table.append(eps if used == mechanism else None)
        _check_table(table, cfg)
    recipe = choose_recipe(cfg, noise_multiplier=sigma, expected_batch=sample_rate * n_patients,
                           horizon_steps=horizon)
    clip = cfg.privacy.max_grad_norm if cfg.privacy.max_grad_norm is not None else DEFAULT_CLIP
    return PrivacyPlan(noise_multiplier=sigma, sample_rate=sample_rate, delta=delta,
                       max_grad_norm=clip, n_patients=n_patients, batch_size=batch,
                       steps_per_epoch=steps_per_epoch, horizon_steps=horizon,
                       target_epsilon=cfg.privacy.target_epsilon, accountant=mechanism, study=cfg.study,
                       rounds=rounds, epochs_per_round=epochs_per_round, prior_history=tuple(prior),
                       prior_epsilon=prior_epsilon, epsilon_table=tuple(table),
                       inputs=plan_inputs(cfg, n_patients), head=recipe.head, optimizer=recipe.optimizer,
                       lr=recipe.lr, momentum=recipe.momentum, ema_decay=recipe.ema_decay,
                       sources=recipe.sources)


def _check_table(table: Sequence[float | None], cfg: Config) -> None:
    values = [e for e in table if e is not None]
    if any(math.isinf(e) or math.isnan(e) for e in values):
        raise InputError(f"this plan gives an infinite epsilon (no noise): {NO_DP_HINT}",
                         key="privacy.noise_multiplier")
    if any(b < a for a, b in itertools.pairwise(values)):
        raise RuntimeError(f"the accountant's epsilon table is not increasing ({values}): refusing to plan")
    if cfg.privacy.noise_multiplier is None and values and values[-1] > cfg.privacy.target_epsilon * (1 + 1e-9):
        raise RuntimeError(f"planned noise gives epsilon {values[-1]:.6g} over target "
                           f"{cfg.privacy.target_epsilon:g}: refusing to plan")


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

class PlanStore:
    """``plan.json`` of a state dir: a readable copy of the plan the site's signed ledger holds.

    :meth:`current` reads the plan in force from verified ledger entries and checks plan.json
    against it; :meth:`record` writes a new plan (ledger entry first, then the copy).
    """

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / PLAN_FILE

    def read_file(self) -> dict | None:
        """plan.json as JSON (``None`` when absent); :class:`InputError` if unreadable."""
        if not self.path.exists():
            return None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"unreadable privacy plan ({exc})", file=self.path) from None
        if not isinstance(doc, dict):
            raise InputError("the privacy plan is not a JSON object", file=self.path)
        return doc

    @staticmethod
    def signed_plans(entries: Sequence[Mapping]) -> list[Mapping]:
        """Ledger ``"config"`` entries that record a plan, oldest first."""
        return [e for e in entries if e.get("kind") == "config" and isinstance(e.get("plan"), Mapping)
                and isinstance(e.get("plan_sha256"), str)]

    def current(self, entries: Sequence[Mapping], *, study: str | None = None,
                repair: bool = False) -> tuple[PrivacyPlan, Mapping] | None:
        """The plan in force and its ledger entry (``None`` when the ledger records no plan).

        The plan in force is the last one the ledger records (for ``study``, when given).
        ``entries`` must come from a ledger verified with the site's key. plan.json must be a
        copy of a plan the ledger signed: anything else is refused (:class:`InputError`). A
        copy that is missing or stale (a crash between the ledger entry and the copy, or
        another study's plan) is rewritten from the ledger when ``repair`` is true.
        """
        every = self.signed_plans(entries)
        signed = [e for e in every if study is None or e["plan"].get("study") == study]
        doc = self.read_file()
        if doc is not None and plan_digest(doc) not in {e["plan_sha256"] for e in every}:
            where = f"the last is ledger seq {every[-1].get('seq')}" if every else "the ledger records none"
            raise InputError(
                "plan.json is not a plan this site's signed ledger records (" + where + "): it was edited "
                "or written by hand; restore it from the ledger by deleting it, or change the plan "
                "explicitly with 'clinfuse site replan'", file=self.path)
        if not signed:
            return None
        entry = signed[-1]
        if plan_digest(entry["plan"]) != entry["plan_sha256"]:
            raise InputError(f"ledger seq {entry.get('seq')}: the plan does not match its plan_sha256",
                             file=self.path)
        plan = PrivacyPlan.from_dict(entry["plan"], source=f"{self.path} (ledger seq {entry.get('seq')})")
        if repair and (doc is None or plan_digest(doc) != entry["plan_sha256"]):
            self._write_copy(entry["plan"])
        return plan, entry

    def record(self, plan: PrivacyPlan, ledger, **entry) -> dict:
        """Append the signed ``"config"`` entry holding ``plan``, then write plan.json; return the entry."""
        doc = plan.to_dict()
        written = ledger.append("config", plan=doc, plan_sha256=plan_digest(doc), delta=plan.delta, **entry)
        self._write_copy(doc)
        return written

    def _write_copy(self, doc: Mapping) -> None:
        from clinfuse.fileio import atomic_write_json

        atomic_write_json(self.path, _normalized(doc))


def describe_plan(plan: PrivacyPlan) -> list[str]:
    """Lines describing a plan for ``site check`` and ``audit plan``."""
    rounds = f"{plan.rounds} rounds x {plan.epochs_per_round} epoch(s)" if plan.rounds else \
        f"{plan.horizon_steps // max(plan.steps_per_epoch, 1)} epochs"
    mechanism = (f"noise multiplier {plan.noise_multiplier:.4g}, Poisson sample rate {plan.sample_rate:.4g} "
                 f"(expected batch {plan.expected_batch_size:.3g} of {plan.n_patients} patients), clip "
                 f"{plan.max_grad_norm:g}, delta {plan.delta:g}, {plan.accountant.upper()} accountant")
    horizon = (f"horizon {plan.horizon_steps} steps ({rounds}) for target epsilon {plan.target_epsilon:g}"
               + (f", on top of epsilon {plan.prior_epsilon:.3f} already spent" if plan.prior_history else ""))
    lines = [mechanism, horizon]
    if plan.epsilon_table:
        shown = ", ".join("-" if e is None else f"{e:.3f}" for e in plan.epsilon_table[:12])
        more = f", ... ({len(plan.epsilon_table)} in all)" if len(plan.epsilon_table) > 12 else ""
        lines.append(f"epsilon after each epoch: {shown}{more}")
    lines.append(describe_recipe(plan))
    from clinfuse.privacy.recipe import forecast_lines

    return lines + forecast_lines(plan)


def describe_recipe(plan: PrivacyPlan) -> str:
    """One line: the training recipe, each value marked (config) or (plan)."""
    src = plan.sources

    def mark(name: str) -> str:
        return f" ({src[name]})" if name in src else ""

    optimizer = f"{plan.optimizer}{mark('optimizer')}"
    if plan.optimizer == "sgd":
        optimizer += f" momentum {plan.momentum:g}{mark('momentum')}"
    averaging = (f"EMA of the iterates {plan.ema_decay:g}{mark('ema_decay')}" if plan.ema_decay
                 else f"last iterate{mark('ema_decay')}")
    return (f"recipe: {plan.head} model{mark('head')}, {plan.steps_per_epoch} step(s) per epoch of expected batch "
            f"{plan.expected_batch_size:.3g}{mark('batch_size')}, {optimizer}, lr {plan.lr:g}{mark('lr')}, clip "
            f"{plan.max_grad_norm:g}{mark('max_grad_norm')}, {averaging}")

