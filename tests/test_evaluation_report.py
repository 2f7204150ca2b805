"""Report files: self-contained HTML with embedded PNGs, strict JSON with intervals, CSV."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from clinfuse.evaluation.bootstrap import evaluate_runs
from clinfuse.evaluation.metrics import METRICS
from clinfuse.evaluation.report import render_html, to_jsonable, write_report
from clinfuse.evaluation.robustness import robustness_sweep

VOID = {"meta", "img", "br", "hr", "input", "link"}


class TagChecker(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    n = 160
    groups = np.repeat(np.arange(80), 2)
    labels = rng.integers(0, 2, 80)[groups]
    mask = (rng.random((n, 3)) < 0.75).astype(np.float32)
    mask[:, 2] = 1
    p = np.clip(0.5 + (labels - 0.5) * 0.5 + rng.normal(0, 0.2, n), 0, 1)
    q = np.clip(p + rng.normal(0, 0.05, n), 0, 1)
    runs = {"fedavg": np.c_[1 - p, p], "fedavg+dp<eps=3>": np.c_[1 - q, q]}
    sites = np.where(groups % 2, "site-a", "site-b")
    patterns = np.where(mask[:, 0] > 0, "image+tabular", "tabular only")
    core = evaluate_runs(runs, labels, groups, label_names=["negative", "positive"], sites=sites,
                         patterns=patterns, val_runs=runs, val_labels=labels, n_resamples=200,
                         progress=False)

    def predict(rows, m, probs):
        return probs[rows] * 0.9 + 0.05

    robustness = {name: robustness_sweep(lambda r, m, pr=pr: predict(r, m, pr), mask, labels, groups,
                                         np.array(list(core["runs"][name]["thresholds"].values())),
                                         label_names=["negative", "positive"], n_resamples=100,
                                         modalities=("image", "text", "tabular"),
                                         baseline_probs=pr, progress=False)
                  for name, pr in runs.items()}
    return {"labels": ["negative", "positive"], "split": "test", "threshold_method": "youden",
            "bootstrap": {"resamples": 200, "seed": 0, "level": 0.95}, "ece_bins": 10,
            "checkpoints": {k: {"path": f"/x/{k}.pt", "meta": {"epsilon": 3.0}} for k in runs},
            "robustness": robustness, **core, "notes": [*core["notes"], "a note with <angle> & ampersand"]}


def test_write_report_outputs(tmp_path, result):
    frame = pd.DataFrame({"checkpoint": ["fedavg"], "patient_id": ["p1"], "prob_positive": [0.7]})
    paths = write_report(tmp_path / "out", result, frame)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.html", "metrics.json", "predictions.csv"}
    assert paths["report"].name == "report.html"

    text = paths["report"].read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert '<img src="data:image/png;base64,' in text
    assert "&lt;angle&gt; &amp; ampersand" in text and "fedavg+dp&lt;eps=3&gt;" in text
    checker = TagChecker()
    checker.feed(text)
    assert checker.errors == [] and checker.stack == []
    # ROC, reliability, robustness and paired-difference plots, all decodable PNGs.
    assert len(checker.imgs) == 4
    for img in checker.imgs:
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'src="(?!data:)', text), "the report must not reference external files"

    def no_nan(token):
        raise AssertionError(f"non-JSON constant {token} in metrics.json")

    metrics = json.loads(paths["metrics"].read_text(), parse_constant=no_nan)
    run = metrics["runs"]["fedavg"]
    for subset in [run["overall"], *run["per_site"].values(), *run["per_pattern"].values()]:
        for m in METRICS:
            entry = subset["metrics"][m]
            assert isinstance(entry["value"], float) and len(entry["ci"]) == 2
            assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
    assert set(run["per_site"]) == {"site-a", "site-b"}
    assert set(run["per_pattern"]) == {"image+tabular", "tabular only"}
    assert metrics["comparisons"][0]["other"] == "fedavg+dp<eps=3>"
    assert len(metrics["robustness"]["fedavg"]) == 15
    assert pd.read_csv(paths["predictions"]).shape == (1, 3)


def test_summary_box_comes_first_and_small_subgroups_are_flagged(tmp_path, result):
    small = {**result, "runs": {k: {**v, "per_site": {**v["per_site"], "site-c": {
        **v["per_site"]["site-a"], "n_patients": 8, "reliable": False,
        "unreliable_because": ["8 patients (fewer than 20)"]}}} for k, v in result["runs"].items()}}
    text = render_html(small)
    body = text[text.index("<body>") + len("<body>"):].lstrip()
    assert body.startswith('<section class="summary" id="summary">')
    summary = body[:body.index("</section>")]
    assert "AUROC" in summary and "Warnings" in summary and "site-c" in summary
    assert text.count('<tr class="unreliable">') == 2  # site-c, for each of the two checkpoints
    assert "unreliable: 8 patients (fewer than 20)" in text
    # Hashes stay out of the prose; the report refers to metrics.json for them.
    assert not re.search(r"[0-9a-f]{64}", text)


def test_privacy_in_words():
    from clinfuse.evaluation.report import fmt_delta, privacy_words

    words = privacy_words({"enabled": True, "epsilon_per_site": {"a": 7.999984728778938, "b": 7.999984728778938},
                           "delta": 1e-5, "delta_source": "checkpoint", "unit": "patient", "accountant": "prv"})
    assert "ε = 8.00 per site (δ = 1e-5)" in words and "PRV accountant" in words and "patient" in words
    assert "7.9999" not in words
    bound = privacy_words({"enabled": True, "epsilon_per_site": {"a": 3.0, "b": 2.5}, "delta": 1e-5,
                           "delta_source": "upper bound", "accountant": "rdp"})
    assert "ε = 2.50 to 8.00" not in bound and "ε = 2.50 to 3.00 per site (a 3.00, b 2.50)" in bound
    assert "δ ≤ 1e-5" in bound
    assert "without differential privacy" in privacy_words({"enabled": False})
    assert fmt_delta(2.5e-6) == "2.5e-6" and fmt_delta(1e-5) == "1e-5"


def test_report_renders_from_metrics_json_alone(tmp_path, result):
    paths = write_report(tmp_path, result)
    again = render_html(json.loads(paths["metrics"].read_text()))
    assert again.count("data:image/png;base64,") == 4
    assert "predictions" not in paths


def test_report_without_comparisons_or_robustness(tmp_path, result):
    single = {**result, "runs": {"fedavg": result["runs"]["fedavg"]}, "comparisons": [], "robustness": {}}
    text = write_report(tmp_path, single)["report"].read_text()
    assert text.count("data:image/png;base64,") == 2  # ROC and reliability only
    assert "Checkpoint differences" not in text


def test_to_jsonable_removes_nan_and_numpy():
    out = to_jsonable({"a": np.float64("nan"), "b": np.arange(2), 3: [np.int64(4), float("inf")]})
    assert out == {"a": None, "b": [0, 1], "3": [4, "inf"]}
    json.dumps(out, allow_nan=False)
