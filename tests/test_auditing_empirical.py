"""The empirical audit runs clinfuse's own DP-SGD code: breaking noise or clipping there fails it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clinfuse.auditing.empirical import GradientProbe, run_empirical_audit, shadow_dp_sgd
from clinfuse.cli import main
from clinfuse.training.dp_engine import FlatDPOptimizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SETTINGS = {"max_grad_norm": 1.0, "sample_rate": 0.05, "steps": 60, "n_canaries": 500, "delta": 1e-5, "seed": 3,
            "progress": False}


@pytest.fixture
def no_noise_in_the_engine(monkeypatch):
    """clinfuse's DP optimizer with its noise silently gone (a bug in the code that trains)."""
    original = FlatDPOptimizer.add_noise

    def add_no_noise(self):
        kept, self.noise_multiplier = self.noise_multiplier, 0.0
        try:
            original(self)
        finally:
            self.noise_multiplier = kept  # the accountant still records the claimed noise

    monkeypatch.setattr(FlatDPOptimizer, "add_noise", add_no_noise)


@pytest.fixture
def no_clipping_in_the_engine(monkeypatch):
    """clinfuse's DP optimizer that no longer clips (noise still scaled to the claimed norm)."""
    original = FlatDPOptimizer.clip_and_accumulate

    def clip_nothing(self):
        kept, self.max_grad_norm = self.max_grad_norm, 1e12
        try:
            original(self)
        finally:
            self.max_grad_norm = kept

    monkeypatch.setattr(FlatDPOptimizer, "clip_and_accumulate", clip_nothing)


def test_the_probes_per_sample_gradient_is_its_row():
    from clinfuse.training.dp_engine import ExpandedWeightsGradSampleModule

    rows = torch.randn(5, 7)
    probe = ExpandedWeightsGradSampleModule(GradientProbe(7), loss_reduction="sum")
    probe(rows).sum().backward()
    assert torch.allclose(probe._module.conv.weight.grad_sample.reshape(5, 7), rows, atol=1e-6)


def test_shadow_run_without_noise_is_the_clipped_gradient_sum():
    features = np.zeros((4, 3))
    features[0, 0], features[1, 1] = 10.0, 0.5  # one row clipped to norm 1, one below it
    drift = shadow_dp_sgd(features, 0.0, max_grad_norm=1.0, sample_rate=1.0, steps=3, seed=0)
    assert drift == pytest.approx([3.0, 1.5, 0.0], abs=1e-5)


def test_dp_run_passes():
    result = run_empirical_audit(2000, noise_multiplier=1.0, **SETTINGS)
    assert result.passed
    assert result.eps_lower_bound <= result.accounted_epsilon
    assert 0 < result.cost_seconds and result.n_included > 0
    assert any("clinfuse's DPEngine" in note for note in result.notes)


def test_engine_without_noise_fails_the_audit(no_noise_in_the_engine):
    result = run_empirical_audit(2000, noise_multiplier=1.0, **SETTINGS)
    assert not result.passed and result.eps_lower_bound > result.claimed_epsilon


def test_engine_without_clipping_fails_the_audit(no_clipping_in_the_engine):
    result = run_empirical_audit(2000, noise_multiplier=1.0, **SETTINGS)
    assert not result.passed and result.eps_lower_bound > result.claimed_epsilon


def test_asking_for_less_noise_than_claimed_is_caught():
    result = run_empirical_audit(2000, noise_multiplier=5.0, applied_noise_multiplier=0.5, **SETTINGS)
    assert not result.passed


def test_settings_with_zero_noise_are_a_violation():
    result = run_empirical_audit(2000, noise_multiplier=0.0, **SETTINGS)
    assert math.isinf(result.accounted_epsilon)
    assert not result.passed and "no privacy" in result.verdict


def test_model_background_gradients_through_the_engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(64, 40)
    y = (x[:, 0] > 0).long()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]

    def loss_fn(module, batch):
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1], reduction="none")

    result = run_empirical_audit(model, noise_multiplier=1.0, data=batches, loss_fn=loss_fn, max_background=48,
                                 **{**SETTINGS, "n_canaries": 200})
    assert result.n_background == 48
    assert result.passed


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from clinfuse.data.synthetic import write_demo_cohort

    return write_demo_cohort(tmp_path_factory.mktemp("cohort"), sites=1, patients=60, seed=1)[0]


def _audit(cohort, capsys, *extra):
    code = main(["audit", "empirical", "--manifest", str(cohort), "--canaries", "1000", "--background", "0",
                 "--quiet", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_empirical_cli_passes_with_noise_and_flags_a_run_without(cohort, capsys):
    code, ok = _audit(cohort, capsys)
    assert code == 0 and ok["passed"] and ok["eps_lower_bound"] <= ok["claimed_epsilon"] and ok["cost_seconds"] > 0
    code, broken = _audit(cohort, capsys, "--applied-noise-multiplier", "0")
    assert code == 1 and not broken["passed"] and broken["applied_noise_multiplier"] == 0.0
    assert broken["eps_lower_bound"] > broken["claimed_epsilon"]


def test_empirical_cli_fails_when_the_engine_loses_its_noise(cohort, capsys, no_noise_in_the_engine):
    code, result = _audit(cohort, capsys)
    assert code == 1 and not result["passed"]
    assert result["applied_noise_multiplier"] == result["noise_multiplier"] > 0  # asked for noise, got none


def test_empirical_cli_fails_when_the_engine_stops_clipping(cohort, capsys, no_clipping_in_the_engine):
    code, result = _audit(cohort, capsys)
    assert code == 1 and not result["passed"]


def test_empirical_cli_with_background_patients(cohort, capsys):
    code = main(["audit", "empirical", "--manifest", str(cohort), "--canaries", "500", "--background", "24",
                 "--quiet", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n_background"] == 24
