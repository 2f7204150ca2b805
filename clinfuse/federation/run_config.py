"""The run config of a federated study: one typed model, validated once at the boundary.

Flower hands the apps a flat mapping (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden
by ``flwr run --run-config 'k=v ...'``, or the dict :func:`federated.simulation.simulate` is
given). :meth:`RunConfig.parse` turns it into a :class:`RunConfig`:

- every key is declared, typed and range-checked; an undeclared key, a value of the wrong type
  (``num-rounds=2.5``, ``secagg=1``) or one out of range raises :class:`InputError` naming the key;
- unset is ``None``: the study config (``federation.*``) decides, or the field's default does;
  ``0`` means 0 (``proximal-mu=0`` is no proximal term, ``client-dp-noise=0`` no noise);
- TOML has no null, so ``pyproject.toml`` writes an unset key as the empty string ``""``; an empty
  string is read as "unset" for every key.

Per-site keys of a programmatic simulation (not settable through ``flwr run``, whose overrides are
limited to the keys ``pyproject.toml`` declares): ``manifest-K``, ``site-id-K`` and
``max-epsilon-K`` for partition ``K`` become :attr:`RunConfig.manifests`,
:attr:`RunConfig.site_ids` and :attr:`RunConfig.max_epsilons`.

:meth:`RunConfig.for_study` fills the keys the study config decides, once, so the server and the
sites read the same settings. The full list of keys is :data:`RUN_CONFIG_KEYS`, each documented in
docs/federation.md ("Run config").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from clinfuse.errors import InputError

# A simulated site's id names its state dir: a plain name.
SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_PER_SITE = re.compile(r"^(manifest|site-id|max-epsilon)-(\d+)$")
_PER_SITE_FIELD = {"manifest": "manifests", "site-id": "site_ids", "max-epsilon": "max_epsilons"}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def expand_path(value: str, base: Path | None = None) -> Path:
    """A run- or node-config path: ``$VARS`` and ``~`` expanded; relative ones below ``base``."""
    import os

    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() or base is None else base / path


class RunConfig(BaseModel):
    """Settings of one federated run. Field ``foo_bar`` is run-config key ``foo-bar``."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False,
                              alias_generator=_kebab, populate_by_name=True)

    # -- the study --------------------------------------------------------------------------
    config: str | None = None  # study config YAML; None: configs/demo.yaml
    target_epsilon: float | None = Field(None, gt=0)  # overrides privacy.target_epsilon
    dp: bool | None = None  # simulation only: overrides privacy.enabled (False: no DP-SGD)
    seed: int | None = Field(None, ge=0)  # simulation only: overrides train.seed
    roster: str | None = None  # the study's roster of site ids and public keys (clinfuse.federation.identity)

    # -- simulation paths and the demo cohort -----------------------------------------------
    workdir: str = ".clinfuse-demo"
    cohort: str | None = None  # default <workdir>/cohort
    run_dir: str | None = None  # default <workdir>/run
    sites_dir: str | None = None  # default <workdir>/sites
    demo_cohort: bool = False
    cohort_patients: int = Field(200, ge=1)
    max_epsilon: float | None = Field(None, gt=0)  # simulated sites' cap; default the target epsilon

    # -- rounds -----------------------------------------------------------------------------
    num_rounds: int | None = Field(None, ge=1)
    local_epochs: int | None = Field(None, ge=1)
    strategy: Literal["fedavg", "fedavgm", "fedprox", "fedadam"] | None = None
    proximal_mu: float | None = Field(None, ge=0)
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float | None = Field(None, ge=0, lt=1)
    modality_aware: bool | None = None
    min_sites: int | None = Field(None, ge=1)
    expected_sites: int | None = Field(None, ge=1)  # default min-sites
    wait_seconds: float = Field(600.0, gt=0)  # for sites to connect
    round_timeout: float = Field(3600.0, gt=0)  # for the sites' replies in each exchange
    accept_failures: bool | None = None
    resume: bool = False
    stop_after_round: int | None = Field(None, ge=1)

    # -- client-level DP and SecAgg+ --------------------------------------------------------
    client_dp: bool | None = None
    client_dp_noise: float | None = Field(None, ge=0)
    client_dp_clip: float | None = Field(None, gt=0)
    client_dp_delta: float | None = Field(None, gt=0, lt=1)  # default 1e-5
    secagg: bool | None = None
    secagg_shares: int | None = Field(None, ge=3)  # default expected-sites (Flower: more than 2)
    secagg_threshold: int | None = Field(None, ge=2)  # default shares - 1 (at least 2)
    secagg_max_weight: float | None = Field(None, gt=0)  # default 10000

    # -- per partition (programmatic simulation) --------------------------------------------
    manifests: dict[int, str] = Field(default_factory=dict, exclude=True)
    site_ids: dict[int, Annotated[str, StringConstraints(pattern=SITE_ID_PATTERN)]] = Field(
        default_factory=dict, exclude=True)
    max_epsilons: dict[int, float] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out: dict[str, Any] = {}
        per_site: dict[str, dict[int, Any]] = {f: {} for f in _PER_SITE_FIELD.values()}
        for key, value in data.items():
            if value == "" and not isinstance(value, bool):
                continue  # pyproject.toml's "unset"
            match = _PER_SITE.match(str(key))
            if match:
                per_site[_PER_SITE_FIELD[match.group(1)]][int(match.group(2))] = value
            else:
                out[key] = value
        for field, values in per_site.items():
            if values:
                out.setdefault(field, {}).update(values)
        return out

    # -- reading ----------------------------------------------------------------------------
    @classmethod
    def parse(cls, values: Mapping[str, Any] | RunConfig | None) -> RunConfig:
        """A :class:`RunConfig` from Flower's flat run config; :class:`InputError` naming the key."""
        if isinstance(values, RunConfig):
            return values
        try:
            return cls.model_validate(dict(values or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = [str(p) for p in err["loc"]]
            field = loc[0] if loc else ""
            if field in _PER_SITE_FIELD.values() and len(loc) > 1:
                prefix = next(k for k, f in _PER_SITE_FIELD.items() if f == field)
                key = f"{prefix}-{loc[1]}"
            else:
                key = _kebab(field)
            value = (values or {}).get(key, "?") if isinstance(values, Mapping) else "?"
            if err["type"] == "extra_forbidden":
                message = (f"unknown run-config key '{key}' (the keys are listed in docs/federation.md, "
                           "'Run config')")
            else:
                message = f"run config {key}={value!r}: {err['msg']}"
            raise InputError(message, key=key) from None

    def study_config(self):
        """The study :class:`~clinfuse.config.Config` with this run's overrides applied.

        ``dp`` and ``seed`` are for simulations only (the server refuses them in a deployment,
        where each site's own config decides).
        """
        from clinfuse.config import load_config

        cfg = load_config(Path(self.config).expanduser() if self.config else None)
        return self._override(cfg, dp=self.dp, seed=self.seed)

    def site_study_config(self, config_path: Path | None, *, simulation: bool):
        """The study config a site trains with (``config_path``; ``None``: configs/demo.yaml).

        In a deployment it is the site's own file, untouched by the server's run config (which
        cannot lower a site's privacy); in simulation the run's overrides apply to the sites too.
        """
        from clinfuse.config import load_config

        cfg = load_config(config_path)
        return self._override(cfg, dp=self.dp, seed=self.seed) if simulation else cfg

    def _override(self, cfg, *, dp: bool | None, seed: int | None):
        from clinfuse.config import config_from_dict

        if self.target_epsilon is None and dp is None and seed is None:
            return cfg
        data = cfg.model_dump(mode="json")
        if self.target_epsilon is not None:
            data["privacy"]["target_epsilon"] = self.target_epsilon
        if dp is not None:
            data["privacy"]["enabled"] = dp
        if seed is not None:
            data["train"]["seed"] = seed
        return config_from_dict(data, source="run config")

    def for_study(self, cfg) -> RunConfig:
        """A copy where every key the study config decides is filled (``cfg.federation``)."""
        fed = cfg.federation
        min_sites = self.min_sites if self.min_sites is not None else fed.min_sites
        expected = max(self.expected_sites if self.expected_sites is not None else min_sites, min_sites)
        shares = self.secagg_shares if self.secagg_shares is not None else expected

        def pick(value, default):
            return default if value is None else value

        from clinfuse.config import DEFAULT_SERVER_LR

        strategy = pick(self.strategy, fed.strategy)

        return self.model_copy(update={
            "num_rounds": pick(self.num_rounds, fed.rounds),
            "local_epochs": pick(self.local_epochs, fed.local_epochs),
            "strategy": strategy,
            "proximal_mu": pick(self.proximal_mu, fed.proximal_mu),
            "server_lr": pick(self.server_lr, pick(fed.server_lr, DEFAULT_SERVER_LR[strategy])),
            "server_momentum": pick(self.server_momentum, fed.server_momentum),
            "modality_aware": pick(self.modality_aware, fed.modality_aware),
            "min_sites": min_sites, "expected_sites": expected,
            "accept_failures": pick(self.accept_failures, fed.accept_failures),
            "client_dp": pick(self.client_dp, fed.client_dp),
            "client_dp_noise": pick(self.client_dp_noise, fed.client_dp_noise),
            "client_dp_clip": pick(self.client_dp_clip, fed.client_dp_clip),
            "client_dp_delta": pick(self.client_dp_delta, 1e-5),
            "secagg": pick(self.secagg, fed.secagg),
            "secagg_shares": shares,
            "secagg_threshold": pick(self.secagg_threshold, max(2, shares - 1)),
            "secagg_max_weight": pick(self.secagg_max_weight, 10000.0),
        })

    # -- paths ------------------------------------------------------------------------------
    @property
    def workdir_path(self) -> Path:
        return expand_path(self.workdir)

    @property
    def cohort_path(self) -> Path:
        return expand_path(self.cohort or "cohort", self.workdir_path)

    @property
    def run_path(self) -> Path:
        return expand_path(self.run_dir or "run", self.workdir_path)

    @property
    def sites_path(self) -> Path:
        return expand_path(self.sites_dir or "sites", self.workdir_path)

    def describe(self) -> dict:
        """What the run directory records of these settings (JSON types, run-config keys)."""
        out = self.model_dump(mode="json", by_alias=True)
        for prefix, field in _PER_SITE_FIELD.items():
            out.update({f"{prefix}-{k}": v for k, v in getattr(self, field).items()})
        return out


RUN_CONFIG_KEYS = tuple(_kebab(name) for name, info in RunConfig.model_fields.items() if not info.exclude)
