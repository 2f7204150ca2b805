"""The DP-utility benchmark (benchmarks/dp_utility.py) on a tiny case: breast cancer, 1 seed, 1 round.

The table it writes must hold the figures its evaluation produced (read back from the results
cache), the pooled model must have learnt the task, and a rerun must train nothing.
"""

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn")


def _run(tmp_path: Path, rows: str) -> tuple[str, dict]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import dp_utility

    md = tmp_path / "dp-utility.md"
    argv = ["--datasets", "breast-cancer", "--seeds", "1", "--rounds", "1", "--rows", rows, "--plan", "old",
            "--bootstrap", "100", "--workdir", str(tmp_path / "work"), "--md", str(md)]
    assert dp_utility.main(argv) == 0
    results = json.loads((tmp_path / "work" / "results.json").read_text())["results"]
    return md.read_text(), results


def _row_line(text: str, label: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(f"| {label} | old |")]
    assert len(lines) == 1, f"no single table row for {label!r} in:\n{text}"
    return lines[0]


def test_table_holds_the_evaluated_figures_and_a_rerun_trains_nothing(tmp_path, capsys):
    text, results = _run(tmp_path, "pooled,federated")
    for key, label in (("pooled", "pooled, non-DP"), ("federated", "federated, non-DP")):
        rec = results[f"breast-cancer|{key}|0|old"]
        auroc, acc = rec["metrics"]["auroc"], rec["metrics"]["accuracy"]
        assert 0.0 <= auroc["value"] <= 1.0 and auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
        line = _row_line(text, label)
        # the seed cell: AUROC [CI] / accuracy [CI], as evaluated
        assert f"{auroc['value']:.3f} [{auroc['ci'][0]:.3f}, {auroc['ci'][1]:.3f}]" in line
        assert f"{acc['value']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}]" in line
        assert rec["metrics"]["n_patients"] > 50  # every site's test split, pooled
    # one epoch over 400 real patients separates malignant from benign: a broken pipeline
    # (labels swapped, features lost) does not
    assert results["breast-cancer|pooled|0|old"]["metrics"]["auroc"]["value"] > 0.85
    assert "## Targets" in text
    target = next(ln for ln in text.splitlines() if ln.startswith("- breast-cancer: federated DP epsilon 8"))
    assert target.endswith("not run")  # no DP row was asked for: not reported as met or missed
    assert re.search(r"Wall time of the invocation that wrote this file: [0-9.]+ min", text)

    checkpoint = Path(results["breast-cancer|pooled|0|old"]["checkpoint"])
    mtime = checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    _run(tmp_path, "pooled,federated")
    assert "trained in" not in capsys.readouterr().out
    assert checkpoint.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_dp_row_reports_its_privacy_and_a_verdict(tmp_path):
    text, results = _run(tmp_path, "federated,dp8")
    rec = results["breast-cancer|dp8|0|old"]
    spent = rec["info"]["epsilon_per_site"]
    assert len(spent) == 4 and all(0 < e <= 8.0 + 1e-6 for e in spent.values())
    assert all(d <= 1e-5 for d in rec["info"]["delta_per_site"].values())
    target = next(ln for ln in text.splitlines() if ln.startswith("- breast-cancer: federated DP epsilon 8"))
    assert target.endswith((": met", ": **missed**"))
    fed = results["breast-cancer|federated|0|old"]["metrics"]["auroc"]["value"]
    dp8 = rec["metrics"]["auroc"]["value"]
    assert f"(gap {fed - dp8:+.3f})" in target
