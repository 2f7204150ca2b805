"""A site's privacy across rounds, without Flower: budget refusal and epsilon continuity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinfuse.config import load_config
from clinfuse.privacy.accountant import compute_epsilon
from clinfuse.privacy.ledger import read_entries
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def cohort(federation_cohort):
    """The shared cohort's manifests, site 0 first."""
    return [federation_cohort / f"site-{k}" / "manifest.csv" for k in range(3)]


@pytest.fixture
def cfg(tmp_path):
    return load_config(tiny_config(tmp_path))


def initial_state(cfg):
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything

    seed_everything(0)
    return {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}


def open_site(cfg, manifest, state_dir, cap):
    from clinfuse.federation.site_runtime import SiteRuntime

    return SiteRuntime(cfg, manifest, site_id="site-x", state_dir=state_dir, max_epsilon=cap)


def epsilon_after(site, rounds_done: int, rounds: int = 4) -> float:
    """Epsilon of ONE accountant that ran every step of ``rounds_done`` rounds in one go."""
    plan = site.plan(rounds, 1)
    steps = plan.steps_per_epoch * rounds_done
    return compute_epsilon([(plan.noise_multiplier, plan.sample_rate, steps)], plan.delta, mechanism="rdp")[0]


def test_cap_allowing_two_of_four_rounds_trains_two_and_declines_two(cfg, cohort, tmp_path):
    state_dir = tmp_path / "state"
    probe = open_site(cfg, cohort[0], tmp_path / "probe", 100.0)
    cap = (epsilon_after(probe, 2) + epsilon_after(probe, 3)) / 2  # room for exactly 2 rounds
    site = open_site(cfg, cohort[0], state_dir, cap)
    state = initial_state(cfg)
    results = [site.train_round(state, server_round=r, rounds=4, local_epochs=1) for r in range(1, 5)]

    assert [r.declined for r in results] == [False, False, True, True]
    assert all(r.state is None and r.num_examples == 0 for r in results[2:])
    assert "past this site's cap" in results[2].declined_reason
    reported = [r.metrics["epsilon"] for r in results]
    assert max(reported) <= cap
    assert reported[2] == reported[3] == pytest.approx(reported[1])  # declining spends nothing
    assert site.accountant.epsilon(results[0].metrics["delta"]) <= cap
    kinds = [e["kind"] for e in read_entries(state_dir / "ledger.jsonl")]
    assert kinds.count("refusal") == 2 and kinds.count("dp-training") == 2


def test_epsilon_after_r_rounds_equals_one_accountant_over_all_steps(cfg, cohort, tmp_path):
    state_dir = tmp_path / "state"
    state = initial_state(cfg)
    reported = []
    for r in range(1, 4):
        # a new SiteRuntime each round, as a new ClientApp process would build
        site = open_site(cfg, cohort[1], state_dir, 100.0)
        result = site.train_round(state, server_round=r, rounds=4, local_epochs=1)
        state = result.state
        reported.append(result.metrics["epsilon"])
    for r, eps in enumerate(reported, start=1):
        assert eps == pytest.approx(epsilon_after(site, r), rel=1e-9)
    saved = json.loads((state_dir / "accountant.json").read_text())
    assert saved["steps"] == 3 * site.plan(4, 1).steps_per_epoch
    assert reported == sorted(reported) and reported[0] < reported[-1]


def test_a_site_without_notes_freezes_its_text_encoder(cfg, cohort, tmp_path):
    from clinfuse.models.fusion import parameter_groups
    from clinfuse.training.checkpoint import build_model_for

    site = open_site(cfg, cohort[2], tmp_path / "state", 100.0)  # the last demo site has no notes
    assert site.modality_examples()["text"] == 0
    state = initial_state(cfg)
    result = site.train_round(state, server_round=1, rounds=2, local_epochs=1)
    text = parameter_groups(build_model_for(cfg))["text"]
    assert text and all(np.array_equal(result.state[k], state[k]) for k in text)
    image = parameter_groups(build_model_for(cfg))["image"]
    assert any(not np.array_equal(result.state[k], state[k]) for k in image)


# --------------------------------------------------------------------------------------------
# What one process keeps between messages (a simulation's actor serves many)
# --------------------------------------------------------------------------------------------

def test_two_rounds_in_one_process_report_what_fresh_processes_report(cfg, cohort, tmp_path):
    """The process cache (validated manifest, decoded data, model template) changes no result:
    the same seeds give the same weights and the same epsilon as sites opened with empty caches,
    as a new ClientApp process opens them."""
    from clinfuse.federation import site_runtime

    def two_rounds(state_dir, fresh: bool):
        state, out = initial_state(cfg), []
        for r in (1, 2):
            if fresh:
                site_runtime.clear_caches()
            site = open_site(cfg, cohort[0], state_dir, 100.0)
            result = site.train_round(state, server_round=r, rounds=4, local_epochs=1)
            out.append((result.metrics["epsilon"], result.state, site.evaluate(result.state, server_round=r)))
            state = result.state
        return out

    # DP noise comes from the OS's entropy: weights are compared without DP (the next test).
    site_runtime.clear_caches()
    cached = two_rounds(tmp_path / "cached", fresh=False)
    fresh = two_rounds(tmp_path / "fresh", fresh=True)
    for (eps_c, state_c, val_c), (eps_f, state_f, val_f) in zip(cached, fresh):
        assert eps_c == pytest.approx(eps_f, rel=1e-12)
        assert set(val_c) == set(val_f) and val_c["val_examples"] == val_f["val_examples"]
        assert set(state_c) == set(state_f)
    reopened = open_site(cfg, cohort[0], tmp_path / "cached", 100.0)
    assert cached[1][0] == pytest.approx(epsilon_after(reopened, 2), rel=1e-9)


def test_seeded_non_dp_rounds_are_identical_with_and_without_the_cache(cohort, tmp_path):
    from clinfuse.federation import site_runtime
    from tests.conftest import tiny_config

    cfg = load_config(tiny_config(tmp_path, enabled=False))
    weights = []
    for fresh in (False, True):
        site_runtime.clear_caches()
        state = initial_state(cfg)
        for r in (1, 2):
            if fresh:
                site_runtime.clear_caches()
            state = open_site(cfg, cohort[0], tmp_path / f"state-{fresh}", 100.0).train_round(
                state, server_round=r, rounds=2, local_epochs=1).state
        weights.append(state)
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_changed_manifest_or_input_file_is_validated_again(cfg, cohort, tmp_path):
    import os
    import shutil

    from clinfuse.federation import site_runtime

    site_dir = tmp_path / "site"
    shutil.copytree(cohort[0].parent, site_dir)
    manifest = site_dir / "manifest.csv"
    site_runtime.clear_caches()
    first = open_site(cfg, manifest, tmp_path / "state", 100.0)
    assert open_site(cfg, manifest, tmp_path / "state", 100.0).data is first.data  # unchanged: kept

    # One row fewer: the manifest is read again.
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))
    second = open_site(cfg, manifest, tmp_path / "state", 100.0)
    assert second.data is not first.data and second.data.n_rows == first.data.n_rows - 1

    # An image rewritten in place (same manifest): validated again, and refused when it no longer decodes.
    image = next(p for p in (site_dir / "images").iterdir() if p.is_file())
    image.write_bytes(b"not an image")
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    third = open_site(cfg, manifest, tmp_path / "state", 100.0)
    assert third.data is not second.data and third.data.skipped_rows
    # A validation that skipped rows is not kept: the refused file is looked at every time.
    assert open_site(cfg, manifest, tmp_path / "state", 100.0).data is not third.data
