"""`clinfuse audit verify` / `audit plan`: recomputation, findings, federation summary, exit codes."""

from __future__ import annotations

import json
import re

import pytest

from clinfuse.cli import main
from clinfuse.privacy.accountant import SiteAccountant, compute_epsilon
from clinfuse.privacy.audit import verify_ledgers
from clinfuse.privacy.ledger import Ledger, mechanism_params
from clinfuse.privacy.site_key import SiteKey

DELTA = 1e-5
SIGMA, Q, STEPS = 1.0, 0.01, 100


def _site(tmp_path, name, rounds=3, *, cap=2.0, sigma=SIGMA, scale=1.0, poisson=True, n=3200, delta=DELTA):
    """A ledger written the way a site writes it: accountant steps, then a dp-training entry."""
    state = tmp_path / name
    acc = SiteAccountant(state / "accountant.json", "prv")
    ledger = Ledger(state / "ledger.jsonl", key=SiteKey.load_or_create(state))
    ledger.append("config", study="s1", config_hash="c" * 64, max_epsilon=cap, delta=delta, site=name)
    for r in range(1, rounds + 1):
        acc.record(sigma, Q, STEPS)
        acc.save()
        mech = mechanism_params(noise_multiplier=sigma, sample_rate=Q, steps=STEPS, n=n,
                                expected_batch_size=Q * n, max_grad_norm=1.0, poisson=poisson, delta=delta)
        ledger.append("dp-training", study="s1", run_id="r1", round=r, mechanism=mech,
                      epsilon=acc.epsilon(delta) * scale, site=name)
        ledger.append("release", study="s1", round=r, model_hash="m" * 64, num_examples=n, site=name)
    return ledger.path


def _codes(report):
    return {f["code"] for f in report["findings"] if f["severity"] == "error"}


def test_clean_ledgers_verify_and_federation_is_max_over_sites(tmp_path, capsys):
    a = _site(tmp_path, "site-a", rounds=3)
    b = _site(tmp_path, "site-b", rounds=2)
    report = verify_ledgers([a, b])
    assert report["ok"], report["findings"]
    study = report["sites"][0]["studies"][0]
    assert [r["round"] for r in study["rows"]] == [1, 2, 3]
    for row in study["rows"]:
        assert row["pld-optimistic"] <= row["pld"] <= row["recorded"] * 1.01
        assert row["pld"] < row["rdp"]
    final = study["rows"][-1]
    assert final["prv"] == pytest.approx(final["recorded"], abs=1e-6)
    fed = report["federation"]
    assert fed["epsilon_recomputed_pld"] == pytest.approx(report["sites"][0]["site_total"]["pld"])
    assert fed["epsilon_recomputed_pld"] > report["sites"][1]["site_total"]["pld"]
    assert {f["code"] for f in report["findings"]} == {"authorship-unverified"}  # no key given: said plainly
    keys = [f"--public-key={site}={SiteKey.load(tmp_path / site / 'site-key.pem').public_key}"
            for site in ("site-a", "site-b")]
    assert main(["audit", "verify", str(a), str(b), *keys]) == 0
    out = capsys.readouterr().out
    assert "site-a" in out and "site-b" in out and "no findings" in out and "authorship verified" in out


def test_remaining_budget_and_rounds_that_fit(tmp_path):
    spent = compute_epsilon([(SIGMA, Q, 3 * STEPS)], DELTA, mechanism="prv")[0]
    cap = compute_epsilon([(SIGMA, Q, 7 * STEPS)], DELTA, mechanism="prv")[0] + 1e-3  # 4 more rounds
    report = verify_ledgers([_site(tmp_path, "site-a", rounds=3, cap=cap)])
    study = report["sites"][0]["studies"][0]
    assert study["remaining"] == pytest.approx(cap - spent, abs=1e-4)
    assert study["rounds_left"] == 4


def test_under_report_is_an_error_naming_the_entry(tmp_path, capsys):
    path = _site(tmp_path, "site-a", rounds=2, scale=0.9)  # every entry claims 10% less than spent
    report = verify_ledgers([path])
    under = [f for f in report["findings"] if f["code"] == "under-report"]
    assert [f["seq"] for f in under] == [1, 3]
    assert not report["ok"]
    assert main(["audit", "verify", str(path)]) == 1
    assert "under-report" in capsys.readouterr().out


def test_non_poisson_and_large_delta_are_flagged(tmp_path):
    report = verify_ledgers([_site(tmp_path, "a", rounds=1, poisson=False)])
    assert "non-poisson" in _codes(report)
    report = verify_ledgers([_site(tmp_path, "b", rounds=1, n=1000, delta=2e-3)])
    assert "delta-too-large" in _codes(report)


def test_training_without_noise_is_an_error(tmp_path):
    ledger = Ledger(tmp_path / "a" / "ledger.jsonl")
    mech = mechanism_params(noise_multiplier=0.0, sample_rate=Q, steps=STEPS, n=3200, delta=DELTA)
    ledger.append("dp-training", study="s1", round=1, mechanism=mech, epsilon=float("inf"))
    report = verify_ledgers([ledger.path])
    assert "no-noise" in _codes(report)
    assert report["sites"][0]["studies"][0]["rows"][0]["pld"] == float("inf")


def test_tampered_ledger_exits_1_and_names_line(tmp_path, capsys):
    path = _site(tmp_path, "site-a", rounds=2)
    lines = path.read_text().splitlines(keepends=True)
    del lines[2]  # drop the first release
    path.write_text("".join(lines))
    assert main(["audit", "verify", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    broken = [f for f in report["findings"] if f["code"] in ("chain-break", "seq-gap")]
    assert broken and all(f["line"] == 3 and f["seq"] == 3 for f in broken)
    assert report["sites"][0]["chain_ok"] is False


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\nworld\n")
    assert main(["audit", "verify", str(junk)]) == 2
    assert "not a clinfuse privacy ledger" in capsys.readouterr().err


def test_report_files_are_written(tmp_path, capsys):
    path = _site(tmp_path, "site-a", rounds=2)
    out = tmp_path / "report"
    assert main(["audit", "verify", str(path), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "site-a" in page
    data = json.loads((out / "report.json").read_text())
    assert data["ok"] is True and data["sites"][0]["site"] == "site-a"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]


def _table(text):
    return {m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r"^\s+((?:RDP|PRV|PLD)[^\d]*?)\s+(\d+\.\d+)", text, re.MULTILINE)}


def test_plan_prints_reference_epsilons(capsys):
    args = ["audit", "plan", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000",
            "--delta", "1e-5"]
    assert main(args) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["RDP (Opacus)"] == pytest.approx(2.10, abs=0.01)
    assert rows["PRV (Opacus)"] == pytest.approx(1.83, abs=0.01)
    assert rows["PLD pessimistic (dp-accounting)"] == pytest.approx(1.83, abs=0.01)
    assert rows["PLD optimistic (dp-accounting)"] < rows["PLD pessimistic (dp-accounting)"]


def test_plan_inverse_gives_noise_for_target(capsys):
    assert main(["audit", "plan", "--sample-rate", "0.05", "--target-epsilon", "3", "--steps", "100",
                 "--delta", "1e-5", "--json"]) == 0
    rows = {r["accountant"]: r for r in json.loads(capsys.readouterr().out)["accountants"]}
    assert set(rows) == {"rdp", "prv", "pld"}
    for mech, row in rows.items():
        assert compute_epsilon([(row["noise_multiplier"], 0.05, 100)], 1e-5, mechanism=mech)[0] <= 3.0
    assert rows["rdp"]["noise_multiplier"] > rows["pld"]["noise_multiplier"]


def test_plan_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse: both given
        main(["audit", "plan", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5",
              "--noise-multiplier", "1", "--target-epsilon", "2"])
    assert exc.value.code == 2
    assert main(["audit", "plan", "--sample-rate", "1.5", "--steps", "10", "--delta", "1e-5",
                 "--noise-multiplier", "1"]) == 2
