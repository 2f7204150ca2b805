"""Site accountant persistence, epsilon computation with fallback, and noise planning."""

from __future__ import annotations

import json
import math

import pytest

from clinfuse.errors import BudgetExceededError, InputError
from clinfuse.privacy.accountant import (
    SiteAccountant,
    compute_epsilon,
    epsilon_series,
    plan_noise_multiplier,
)

DELTA = 1e-5


def _steps(site: SiteAccountant, n: int, sigma: float = 1.1, q: float = 0.02) -> None:
    # Exactly what the Opacus optimizer hook does after each DP-SGD step.
    for _ in range(n):
        site.accountant.step(noise_multiplier=sigma, sample_rate=q)


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_resumed_accountant_equals_uninterrupted_run(tmp_path, mechanism):
    path = tmp_path / "accountant.json"
    first = SiteAccountant(path, mechanism)
    _steps(first, 200)
    first.save()

    resumed = SiteAccountant(path, mechanism)  # a new process, next round
    assert resumed.steps == 200
    _steps(resumed, 200)
    resumed.save()

    straight = SiteAccountant(None, mechanism)
    _steps(straight, 400)
    assert SiteAccountant(path, mechanism).steps == 400
    assert resumed.epsilon(DELTA) == pytest.approx(straight.epsilon(DELTA), abs=1e-6)
    assert resumed.epsilon(DELTA) > first.epsilon(DELTA) > 0


def test_state_file_records_mechanism_and_history(tmp_path):
    path = tmp_path / "acc.json"
    site = SiteAccountant(path, "prv")
    _steps(site, 3, sigma=1.0, q=0.1)
    _steps(site, 2, sigma=0.8, q=0.1)
    site.save()
    data = json.loads(path.read_text())
    assert data["mechanism"] == "prv"
    assert data["state"]["history"] == [[1.0, 0.1, 3], [0.8, 0.1, 2]]
    assert SiteAccountant(path, "prv").history == [(1.0, 0.1, 3), (0.8, 0.1, 2)]
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize("damage", ["not json", "truncated", "empty", "checksum", "wrong mechanism"])
def test_corrupt_state_is_refused_not_reset(tmp_path, damage):
    path = tmp_path / "acc.json"
    site = SiteAccountant(path, "prv")
    _steps(site, 50)
    site.save()
    text = path.read_text()
    if damage == "not json":
        path.write_text("{oops" + text)
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "empty":
        path.write_text("")
    elif damage == "checksum":
        data = json.loads(text)
        data["state"]["history"][0][2] = 5  # someone "reduced" the steps
        path.write_text(json.dumps(data))
    mechanism = "rdp" if damage == "wrong mechanism" else "prv"
    with pytest.raises(InputError) as err:
        SiteAccountant(path, mechanism)
    assert str(path) in str(err.value)


def test_reservation_counts_steps_after_a_crash(tmp_path):
    path = tmp_path / "acc.json"
    site = SiteAccountant(path, "rdp")
    _steps(site, 10)
    site.save()
    site.reserve(1.1, 0.02, 30)  # about to train 30 steps ... and the process dies
    recovered = SiteAccountant(path, "rdp")
    assert recovered.steps == 40
    assert recovered.recovered_pending == [(1.1, 0.02, 30)]
    # a normal save clears the reservation
    site.save()
    assert SiteAccountant(path, "rdp").steps == 10


def test_projected_epsilon_does_not_change_state():
    site = SiteAccountant(None, "rdp")
    _steps(site, 100, sigma=1.0, q=0.01)
    before = site.epsilon(DELTA)
    projected = site.projected_epsilon(1.0, 0.01, 100, DELTA)
    assert site.steps == 100 and site.epsilon(DELTA) == before
    assert projected == pytest.approx(compute_epsilon([(1.0, 0.01, 200)], DELTA, mechanism="rdp")[0])
    assert projected > before


@pytest.mark.parametrize("mechanism,expected", [("rdp", 2.1014), ("prv", 1.8384), ("pld", 1.8282)])
def test_reference_epsilons(mechanism, expected):
    eps, used = compute_epsilon([(1.0, 0.01, 1000)], DELTA, mechanism=mechanism)
    assert used == mechanism
    assert eps == pytest.approx(expected, abs=2e-3)


def test_optimistic_pld_is_below_pessimistic():
    low, _ = compute_epsilon([(1.0, 0.01, 1000)], DELTA, mechanism="pld-optimistic")
    high, _ = compute_epsilon([(1.0, 0.01, 1000)], DELTA, mechanism="pld")
    assert 1.7 < low < high


def test_series_is_cumulative_and_skips_empty_entries():
    values, used, reason = epsilon_series([(1.0, 0.01, 500), (1.0, 0.01, 0), (1.0, 0.01, 500)], DELTA,
                                          mechanism="rdp")
    assert used == "rdp" and reason is None
    assert values[0] == values[1] < values[2]
    assert values[2] == pytest.approx(compute_epsilon([(1.0, 0.01, 1000)], DELTA, mechanism="rdp")[0])


def test_zero_noise_is_infinite_epsilon():
    assert compute_epsilon([(1.0, 0.01, 10), (0.0, 0.01, 1)], DELTA, mechanism="prv")[0] == math.inf
    assert compute_epsilon([], DELTA)[0] == 0.0


def test_timeout_falls_back_to_rdp_and_says_so():
    history = [(0.9, 0.02, 700)]
    eps, used = compute_epsilon(history, DELTA, mechanism="prv", timeout_s=1e-4)
    assert used == "rdp"
    assert eps == pytest.approx(compute_epsilon(history, DELTA, mechanism="rdp")[0])
    # a lower bound cannot fall back to an upper bound: the trivial bound 0 is used instead
    low, used_low = compute_epsilon(history, DELTA, mechanism="pld-optimistic", timeout_s=1e-4)
    assert (low, used_low) == (0.0, "none")


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_plan_hits_target_from_below(mechanism):
    target, q, steps = 2.0, 0.01, 1000
    sigma = plan_noise_multiplier(target, q, steps, DELTA, mechanism=mechanism)
    eps, _ = compute_epsilon([(sigma, q, steps)], DELTA, mechanism=mechanism)
    assert eps <= target
    assert eps > target * 0.99  # not needlessly noisy
    assert compute_epsilon([(sigma * 0.99, q, steps)], DELTA, mechanism=mechanism)[0] > target


def test_plan_includes_prior_spend():
    prior = [(1.0, 0.01, 1000)]
    fresh = plan_noise_multiplier(3.0, 0.01, 1000, DELTA, mechanism="rdp")
    after = plan_noise_multiplier(3.0, 0.01, 1000, DELTA, mechanism="rdp", history=prior)
    assert after > fresh
    assert compute_epsilon(prior + [(after, 0.01, 1000)], DELTA, mechanism="rdp")[0] <= 3.0


def test_plan_refuses_spent_budget():
    with pytest.raises(BudgetExceededError, match="already spent"):
        plan_noise_multiplier(1.0, 0.01, 100, DELTA, mechanism="rdp", history=[(1.0, 0.01, 1000)])


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError):
        compute_epsilon([(1.0, 1.5, 10)], DELTA)
    with pytest.raises(InputError):
        compute_epsilon([(1.0, 0.1, 10)], 1.0)
    with pytest.raises(InputError):
        SiteAccountant(None, "gdp")


def test_without_fork_a_thread_enforces_the_time_limit(monkeypatch):
    from clinfuse.privacy import accountant as mod

    monkeypatch.setattr(mod.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    history = [(1.3, 0.03, 333)]  # settings no other test uses (results are cached)
    eps, used = compute_epsilon(history, DELTA, mechanism="pld")
    assert used == "pld" and 0 < eps < compute_epsilon(history, DELTA, mechanism="rdp")[0]
    _, used = compute_epsilon([(1.3, 0.03, 334)], DELTA, mechanism="prv", timeout_s=1e-4)
    assert used == "rdp"
