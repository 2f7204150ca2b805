"""One-run canary audit (Steinke, Nasr & Jagielski 2023): statistics and the shadow DP-SGD run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from clinfuse.privacy.canary import (
    epsilon_lower_bound,
    lower_bound_from_scores,
    p_value,
    plan_audit,
    run_canary_audit,
)


def test_p_value_without_delta_is_the_binomial_tail():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(stats.binom.sf(39, 50, q))
    # delta only makes the null easier to satisfy: larger p-value
    assert p_value(100, 50, 40, 1.0, 1e-3) > p_value(100, 50, 40, 1.0, 0.0)
    assert p_value(100, 50, 0, 1.0, 0.0) == 1.0


def test_lower_bound_is_the_largest_rejected_epsilon():
    eps = epsilon_lower_bound(1000, 200, 180, 1e-5, significance=0.05)
    assert eps > 0
    assert p_value(1000, 200, 180, eps - 1e-3, 1e-5) <= 0.05 < p_value(1000, 200, 180, eps + 1e-3, 1e-5)
    # chance-level guessing proves nothing; more correct guesses prove more
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 200, 200, 1e-5) > eps


def test_scores_that_separate_perfectly_give_a_large_bound():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    perfect = lower_bound_from_scores(included.astype(float), included, 1e-5)
    random = lower_bound_from_scores(rng.normal(size=1000), included, 1e-5)
    assert perfect["correct"] == perfect["guesses"] and perfect["eps_lower_bound"] > 4
    assert random["eps_lower_bound"] < 1.0
    assert perfect["eps_lower_bound"] <= perfect["max_detectable"] + 1e-9


SETTINGS = {"max_grad_norm": 1.0, "sample_rate": 0.05, "steps": 60, "n_canaries": 500, "delta": 1e-5, "seed": 3,
                "progress": False}


def test_dp_run_passes():
    result = run_canary_audit(2000, noise_multiplier=1.0, **SETTINGS)
    assert result.passed
    assert result.eps_lower_bound <= result.accounted_epsilon
    assert result.claimed_epsilon == result.accounted_epsilon
    assert 0 < result.cost_seconds and result.n_included > 0


def test_run_without_noise_is_a_violation():
    # The settings claim sigma = 1.0; the implementation applies none.
    result = run_canary_audit(2000, noise_multiplier=1.0, applied_noise_multiplier=0.0, **SETTINGS)
    assert not result.passed
    assert result.eps_lower_bound > result.accounted_epsilon
    assert "VIOLATION" in result.describe()


def test_settings_with_zero_noise_are_a_violation():
    result = run_canary_audit(2000, noise_multiplier=0.0, **SETTINGS)
    assert math.isinf(result.accounted_epsilon)
    assert not result.passed and "no privacy" in result.verdict


def test_too_little_noise_is_caught():
    # A claim made for 10x the noise that is actually applied.
    result = run_canary_audit(2000, noise_multiplier=5.0, applied_noise_multiplier=0.5, **SETTINGS)
    assert not result.passed


def test_model_background_gradients():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(64, 40)
    y = (x[:, 0] > 0).long()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    result = run_canary_audit(model, noise_multiplier=1.0, data=batches, max_background=48,
                              **{**SETTINGS, "n_canaries": 200})
    assert result.n_background == 48
    assert result.passed


def test_audit_plan_picks_a_refutable_run():
    # A large budget over a long horizon: one run cannot refute it, a prefix can.
    q, steps, note = plan_audit(1.2, 0.01, 20000, 1e-5, 1000, mechanism="rdp")
    assert q == 0.01 and 1 <= steps < 20000 and "same mechanism" in note
    # Even one step at this sample rate claims too much: a lower rate, same noise and clipping.
    q, steps, note = plan_audit(0.84, 0.2, 15, 1e-5, 2000, mechanism="rdp")
    assert q < 0.2 and f"sample rate {q:.4g}" in note
    assert (plan_audit(3.0, 0.01, 50, 1e-5, 1000, mechanism="rdp")) == (0.01, 50, None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from clinfuse.data.synthetic import write_demo_cohort

    return write_demo_cohort(tmp_path_factory.mktemp("cohort"), sites=1, patients=60, seed=1)[0]


def test_empirical_cli_passes_with_noise_and_flags_a_run_without(cohort, capsys):
    import json

    from clinfuse.cli import main

    base = ["audit", "empirical", "--manifest", str(cohort), "--canaries", "1000", "--background", "0",
            "--quiet", "--json"]
    assert main(base) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["passed"] and ok["eps_lower_bound"] <= ok["claimed_epsilon"] and ok["cost_seconds"] > 0
    assert main([*base, "--applied-noise-multiplier", "0"]) == 1
    broken = json.loads(capsys.readouterr().out)
    assert not broken["passed"] and broken["applied_noise_multiplier"] == 0.0
    assert broken["eps_lower_bound"] > broken["claimed_epsilon"]
