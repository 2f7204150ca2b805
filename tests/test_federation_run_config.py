"""The typed run config: unset is None, 0 means 0, every key round-trips, errors name the key,
and pyproject.toml's [tool.flwr.app.config] declares exactly the model's keys."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from clinfuse.errors import InputError
from clinfuse.federation.run_config import RUN_CONFIG_KEYS, RunConfig

REPO = Path(__file__).resolve().parent.parent

# A valid value for every key, none of them the default (a new key must be added here).
SAMPLES = {
    "config": "/etc/clinfuse/study.yaml", "target-epsilon": 3.5, "dp": False, "seed": 0, "roster": "/etc/roster.yaml",
    "workdir": "/tmp/w", "cohort": "/tmp/c", "run-dir": "/tmp/r", "sites-dir": "/tmp/s", "demo-cohort": True,
    "cohort-patients": 17, "max-epsilon": 2.0, "num-rounds": 4, "local-epochs": 2, "strategy": "fedprox",
    "proximal-mu": 0.0, "server-lr": 0.3, "server-momentum": 0.5, "modality-aware": False, "min-sites": 1, "expected-sites": 5,
    "wait-seconds": 12.5, "round-timeout": 30.0, "accept-failures": False, "resume": True, "stop-after-round": 2,
    "client-dp": True, "client-dp-noise": 0.0, "client-dp-clip": 0.25, "client-dp-delta": 1e-6, "secagg": True,
    "secagg-shares": 5, "secagg-threshold": 3, "secagg-max-weight": 500.0,
}


def study(**federation):
    from clinfuse.config import config_from_dict, load_config

    data = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    data["federation"].update(federation)
    return config_from_dict(data)


def test_every_key_has_a_sample_and_round_trips_exactly():
    assert set(SAMPLES) == set(RUN_CONFIG_KEYS)
    parsed = RunConfig.parse(SAMPLES)
    described = parsed.for_study(study()).describe()
    for key, value in SAMPLES.items():
        assert described[key] == value and type(described[key]) is type(value), key
    assert RunConfig.parse(described) == parsed.for_study(study())  # what history.json keeps parses back


def test_zero_means_zero_and_unset_takes_the_study_config():
    cfg = study(proximal_mu=0.01, client_dp_noise=0.5)
    zero = RunConfig.parse({"proximal-mu": 0, "client-dp-noise": 0, "stop-after-round": ""}).for_study(cfg)
    assert zero.proximal_mu == 0.0 and zero.client_dp_noise == 0.0 and zero.stop_after_round is None
    unset = RunConfig.parse({"proximal-mu": "", "client-dp-noise": ""})
    assert unset.proximal_mu is None and unset.client_dp_noise is None
    assert unset.for_study(cfg).proximal_mu == 0.01 and unset.for_study(cfg).client_dp_noise == 0.5


def test_a_fedprox_mu_of_zero_reaches_the_sites():
    from federated.strategy import build_strategy

    settings = RunConfig.parse({"strategy": "fedprox", "proximal-mu": 0.0}).for_study(study(proximal_mu=0.01))
    strategy = build_strategy(settings.strategy, groups={}, proximal_mu=settings.proximal_mu, min_sites=1)
    assert strategy.proximal_mu == 0.0


@pytest.mark.parametrize("values, key", [
    ({"num-round": 3}, "num-round"),  # undeclared
    ({"num-rounds": 2.5}, "num-rounds"),  # not an integer
    ({"num-rounds": "3"}, "num-rounds"),  # a string is not a number
    ({"secagg": 1}, "secagg"),  # 1 is not a boolean
    ({"min-sites": 0}, "min-sites"),  # out of range
    ({"proximal-mu": -0.1}, "proximal-mu"),
    ({"client-dp-delta": 1.0}, "client-dp-delta"),
    ({"round-timeout": math.nan}, "round-timeout"),
    ({"strategy": "fedsgd"}, "strategy"),
    ({"max-epsilon-2": "x"}, "max-epsilon-2"),
    ({"site-id-1": "../other-site"}, "site-id-1"),  # it names the site's state dir
])
def test_an_undeclared_or_mistyped_key_names_itself(values, key):
    with pytest.raises(InputError) as err:
        RunConfig.parse(values)
    assert err.value.key == key and f"'{key}'" in err.value.describe()


def test_per_site_keys_of_a_simulation():
    rc = RunConfig.parse({"manifest-0": "/a/m.csv", "site-id-0": "hospital-a", "max-epsilon-1": 4.0,
                          "workdir": "/w"})
    assert rc.manifests == {0: "/a/m.csv"} and rc.site_ids == {0: "hospital-a"} and rc.max_epsilons == {1: 4.0}
    assert rc.run_path == Path("/w/run") and rc.sites_path == Path("/w/sites")
    assert rc.describe()["site-id-0"] == "hospital-a"


def test_pyproject_declares_exactly_the_run_config_keys_and_they_parse():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(RUN_CONFIG_KEYS)
    rc = RunConfig.parse(declared)
    # what pyproject leaves to the study config is unset, not a value that would override it
    assert rc.num_rounds is None and rc.proximal_mu is None and rc.client_dp_noise is None


def test_dp_and_seed_change_simulated_sites_only():
    rc = RunConfig.parse({"dp": False, "seed": 11, "target-epsilon": 2.0})
    cfg = rc.study_config()
    assert not cfg.privacy.enabled and cfg.train.seed == 11 and cfg.privacy.target_epsilon == 2.0
    simulated = rc.site_study_config(None, simulation=True)
    assert not simulated.privacy.enabled and simulated.train.seed == 11
    deployed = rc.site_study_config(None, simulation=False)  # a site's own config decides
    assert deployed.privacy.enabled and deployed.train.seed == 0 and deployed.privacy.target_epsilon == 8.0
