"""``clinfuse site check``: each check passes on a ready site and fails on the matching defect."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from clinfuse.cli import main
from clinfuse.site_check import FAIL, OK, SKIP, check_site, ready


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from clinfuse.data.synthetic import write_demo_cohort

    out = tmp_path_factory.mktemp("cohort")
    (manifest,) = write_demo_cohort(out, sites=1, patients=20)
    return manifest


@pytest.fixture
def site(cohort, tmp_path) -> Path:
    """A private copy of the one-site cohort (its image cache starts empty)."""
    folder = shutil.copytree(cohort.parent, tmp_path / "site", ignore=shutil.ignore_patterns(".clinfuse-cache"))
    return Path(folder) / cohort.name


@pytest.fixture
def config(small_cfg, tmp_path) -> Path:
    path = tmp_path / "study.yaml"
    data = small_cfg.model_dump(mode="json")
    data["privacy"]["accountant"] = "rdp"  # fast planning
    # The whole 15-patient site in every step: its utility forecast stays under the small-site
    # warning (tests/test_dp_recipe.py covers the warning).
    data["train"]["batch_size"] = 16
    path.write_text(yaml.safe_dump(data))
    return path


def by_name(checks):
    return {c.name: c for c in checks}


def test_ready_site_passes_every_check_and_warms_the_cache(site, config, tmp_path, capsys):
    state = tmp_path / "state"
    code = main(["site", "check", "--manifest", str(site), "--config", str(config),
                 "--state-dir", str(state), "--max-epsilon", "50"])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in ("config", "data", "state dir", "cap", "cache"):
        assert f"[ OK ] {name}" in out, out
    assert "READY" in out and "NOT READY" not in out
    cached = list((site.parent / ".clinfuse-cache" / "images").rglob("*.npc"))
    assert cached, "the check must decode images into the site cache"
    # The check is read-only for the site's privacy state: no accountant, plan or ledger appears,
    # and the write probe is removed.
    assert sorted(p.name for p in state.iterdir()) == []

    again = by_name(check_site(site, config, state_dir=state, max_epsilon=50))
    assert again["cache"].status == OK and f"{len(cached)} already cached" in again["cache"].message


def spend(state: Path, sigma: float, q: float, steps: int) -> None:
    """DP steps recorded as a site records them: a signed ledger entry and the accountant beside it."""
    from clinfuse.privacy.ledger import mechanism_params
    from clinfuse.privacy.site_state import SitePrivacyState

    privacy = SitePrivacyState(state, mechanism="rdp")
    accountant = privacy.open_accountant()
    accountant.record(sigma, q, steps)
    accountant.save()
    privacy.ledger.append("dp-training", study="clinfuse-demo", site="site-0", epsilon=accountant.epsilon(1e-5),
                          mechanism=mechanism_params(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5))


def test_spent_budget_fails_the_cap(site, config, tmp_path, capsys):
    state = tmp_path / "state"
    spend(state, 0.6, 0.5, 200)  # a heavy history: epsilon far above 3
    code = main(["site", "check", "--manifest", str(site), "--config", str(config),
                 "--state-dir", str(state), "--max-epsilon", "3", "--no-cache"])
    out = capsys.readouterr().out
    assert code == 2
    assert "[FAIL] cap" in out and "budget spent" in out and "NOT READY: fix cap" in out


def write_plan(state: Path, manifest: Path, config: Path, **overrides) -> None:
    """A plan signed in the site's ledger (and copied to plan.json), as SiteRuntime.plan makes it."""
    from clinfuse.config import load_config
    from clinfuse.data.manifest import read_manifest
    from clinfuse.privacy.plan import plan_privacy
    from clinfuse.privacy.site_state import SitePrivacyState

    cfg = load_config(config).model_copy(update=overrides)
    n = len({r.patient_id for r in read_manifest(manifest, cfg).records if r.split == "train"})
    plan = plan_privacy(cfg, n, 5, rounds=5)
    state_ = SitePrivacyState(state, mechanism=cfg.privacy.accountant)
    state_.plans.record(plan, state_.ledger, study=cfg.study, site="site-0", max_epsilon=8.0)


def test_next_round_past_the_cap_fails(site, config, tmp_path):
    state = tmp_path / "state"
    write_plan(state, site, config)
    cap = by_name(check_site(site, config, state_dir=state, max_epsilon=1.0, warm_cache=False))["cap"]
    assert cap.status == FAIL and "next round would pass the cap" in cap.message
    assert any("plan.json" in d for d in cap.details)
    roomy = by_name(check_site(site, config, state_dir=state, max_epsilon=100.0, warm_cache=False))["cap"]
    assert roomy.status == OK and "-> epsilon" in roomy.details[-1]


def test_plan_of_another_study_is_not_used(site, config, tmp_path):
    state = tmp_path / "state"
    write_plan(state, site, config, study="another-study")
    cap = by_name(check_site(site, config, state_dir=state, max_epsilon=8.0, warm_cache=False))["cap"]
    assert cap.status == OK and "no privacy plan yet" in cap.details[-1]


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_cap_must_be_positive(site, config, value):
    checks = check_site(site, config, max_epsilon=value, warm_cache=False)
    assert by_name(checks)["cap"].status == FAIL and not ready(checks)


def test_state_dir_that_cannot_be_created_fails(site, config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    checks = by_name(check_site(site, config, state_dir=blocker / "state", max_epsilon=50, warm_cache=False))
    assert checks["state dir"].status == FAIL and "not writable" in checks["state dir"].message
    assert checks["cap"].status == OK and "spent unknown" in checks["cap"].message


def test_tampered_ledger_fails_the_state_dir(site, config, tmp_path):
    from clinfuse.privacy.ledger import Ledger
    from clinfuse.privacy.site_key import SiteKey

    state = tmp_path / "state"
    ledger = Ledger(state / "ledger.jsonl", key=SiteKey.load_or_create(state))
    ledger.append("config", study="clinfuse-demo", site="site-0", max_epsilon=50)
    ledger.append("refusal", study="clinfuse-demo", site="site-0", round=1, reason="test")
    lines = (state / "ledger.jsonl").read_text().splitlines(keepends=True)
    (state / "ledger.jsonl").write_text(lines[1])  # the first entry removed
    check = by_name(check_site(site, config, state_dir=state, max_epsilon=50, warm_cache=False))["state dir"]
    assert check.status == FAIL and "does not verify" in check.message


def test_bad_manifest_fails_data_and_skips_the_cache(config, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,image\np1,a.png\n")  # no label column
    code = main(["site", "check", "--manifest", str(manifest), "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 2
    assert "[FAIL] data" in out and "label" in out
    assert "[SKIP] cache" in out and "[SKIP] state dir" in out


def test_bad_config_fails_and_skips_what_depends_on_it(site, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("study: x\ntrain: {epochs: -1}\n")
    checks = by_name(check_site(site, config, warm_cache=True))
    assert checks["config"].status == FAIL
    assert checks["data"].status == SKIP and checks["cache"].status == SKIP
