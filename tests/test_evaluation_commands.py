"""`clinfuse evaluate` end to end on real files: manifests, checkpoints, report outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from clinfuse.cli import main
from clinfuse.config import config_from_dict
from clinfuse.data.dataset import MultimodalDataset
from clinfuse.data.manifest import read_manifest
from clinfuse.data.tabular import encode_tabular
from clinfuse.evaluation.calibration import apply_temperature
from clinfuse.evaluation.commands import _absent_inputs, _RowView
from clinfuse.training.checkpoint import build_model_for, save_checkpoint

HEADER = ["patient_id", "label", "split", "image", "note", "age", "sex", "temperature", "spo2", "wbc"]


def write_site(folder, site_index: int, n_patients: int = 14):
    """A site with explicit splits; some patients have two rows; modality patterns vary."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(site_index)
    rows = []
    for i in range(n_patients):
        split = ("val", "test", "test", "train", "test", "val", "test")[i % 7]  # both classes in val
        label = "positive" if i % 2 else "negative"
        for visit in range(2 if i % 3 == 0 else 1):
            image = ""
            if (i + visit) % 4 != 1:
                image = f"img{i}_{visit}.png"
                Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(folder / image)
            rows.append({"patient_id": f"p{i:02d}", "label": label, "split": split, "image": image,
                         "note": "" if i % 5 == 2 else f"cough fever visit {visit} {label}",
                         "age": "" if i % 7 == 3 else str(40 + i), "sex": "" if i % 7 == 3 else ("F" if i % 2 else "M"),
                         "temperature": "" if i % 7 == 3 else "37.9", "spo2": "" if i % 7 == 3 else "94",
                         "wbc": "" if i % 7 == 3 else "8.1"})
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_study(tmp_path, small_cfg, *, privacy: dict | None = None):
    """Two sites and two untrained checkpoints (seeds 0 and 1): ``(cfg, config data, manifests, checkpoints)``."""
    manifests = [write_site(tmp_path / f"site-{k}", k) for k in range(2)]
    data = small_cfg.model_dump(mode="json")
    data["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg = config_from_dict(data, source="test")
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(save_checkpoint(tmp_path / f"model{seed}.pt", build_model_for(cfg), cfg, privacy=privacy))
    return cfg, data, manifests, ckpts


@pytest.fixture
def setup(tmp_path, small_cfg):
    cfg, data, manifests, ckpts = write_study(tmp_path, small_cfg)
    eval_cfg = dict(data, evaluation={**data["evaluation"], "bootstrap": 200, "seed": 7},
                    train={**data["train"], "num_threads": 1})
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump(eval_cfg))
    threads = torch.get_num_threads()
    yield cfg, manifests, ckpts, cfg_path
    torch.set_num_threads(threads)  # evaluate applies train.num_threads process-wide


def test_evaluate_cli_writes_report_metrics_and_predictions(tmp_path, setup, capsys):
    _cfg, manifests, ckpts, cfg_path = setup
    out = tmp_path / "report"
    code = main(["evaluate", "--checkpoint", str(ckpts[0]), "--checkpoint", str(ckpts[1]),
                 "--manifest", *map(str, manifests), "--out", str(out), "--config", str(cfg_path),
                 "--device", "cpu"])
    assert code == 0
    assert "report.html" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 4

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bootstrap"]["resamples"] == 200 and metrics["bootstrap"]["seed"] == 7  # from --config
    assert list(metrics["runs"]) == ["model0", "model1"]
    run = metrics["runs"]["model0"]
    assert run["threshold_source"] == "val"
    assert set(run["per_site"]) == {"site-0", "site-1"}
    assert len(run["per_pattern"]) >= 3
    assert run["overall"]["metrics"]["auroc"]["ci"][0] is not None
    assert len(metrics["robustness"]["model1"]) == 15
    assert metrics["comparisons"][0]["reference"] == "model0"

    pred = pd.read_csv(out / "predictions.csv")
    for col in ("patient_id", "site", "row", "split", "pattern", "label", "prob_negative",
                "prob_positive", "checkpoint"):
        assert col in pred.columns
    assert set(pred["split"]) == {"val", "test"}
    assert np.allclose(pred["prob_negative"] + pred["prob_positive"], 1, atol=1e-5)
    test_rows = pred[(pred.checkpoint == "model0") & (pred.split == "test")]
    assert len(test_rows) == run["overall"]["n_rows"]
    # Predictions are those of the checkpoint on each manifest's own dataset, row for row.
    from clinfuse.training.checkpoint import load_checkpoint
    from clinfuse.training.trainer import predict_proba

    model, ckpt_cfg, _ = load_checkpoint(ckpts[0])
    site0 = read_manifest(manifests[0], ckpt_cfg)
    recs = [r for r in site0.records if r.split == "test"]
    cal = run["calibration"]
    direct = apply_temperature(predict_proba(model, MultimodalDataset(recs, ckpt_cfg)), cal["temperature"])
    mine = test_rows[test_rows.site == "site-0"].sort_values("row")
    order = np.argsort([r.row for r in recs])
    assert np.allclose(mine["prob_positive"].to_numpy(), direct[order, 1], atol=1e-5)


def test_removed_modality_looks_like_a_naturally_absent_one(tmp_path, setup):
    cfg, manifests, _, _ = setup
    recs = read_manifest(manifests[0], cfg).records
    ds = MultimodalDataset(recs, cfg)
    full = next(i for i, r in enumerate(recs) if all(r.mask))
    view = _RowView([(ds, full)], masks=np.array([[0, 0, 0]], dtype=np.float32), absent=_absent_inputs(cfg))
    image, text, tabular, mask, label = view[0]
    assert mask.tolist() == [0, 0, 0] and mask.dtype == torch.float32
    assert not image.any() and not text.any()
    assert torch.equal(tabular, torch.from_numpy(encode_tabular({}, cfg.data.tabular)))
    assert tabular.dtype == ds[full][2].dtype and int(label) == recs[full].label
    # The dataset's own item for a row without tabular data is the same encoding.
    no_tab = next(i for i, r in enumerate(recs) if not r.mask[2])
    assert torch.equal(ds[no_tab][2], tabular)
    untouched = _RowView([(ds, full)])[0]
    assert torch.equal(untouched[0], ds[full][0]) and untouched[3].tolist() == [1, 1, 1]


def test_evaluate_cli_errors_are_one_line(tmp_path, setup, capsys):
    _cfg, manifests, ckpts, _ = setup
    code = main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--manifest", str(manifests[0]),
                 "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err and "not found" in err and "Traceback" not in err
    # A manifest without any row of the requested split.
    code = main(["evaluate", "--checkpoint", str(ckpts[0]), "--manifest", str(manifests[0]),
                 "--out", str(tmp_path / "o"), "--split", "train", "--no-robustness", "--device", "cpu"])
    assert code == 0  # train rows exist
    only_val = tmp_path / "only-val"
    only_val.mkdir()
    frame = pd.read_csv(manifests[0], dtype=str, keep_default_na=False)
    frame = frame[frame.split == "val"]
    frame["image"] = ""
    frame.to_csv(only_val / "manifest.csv", index=False)
    code = main(["evaluate", "--checkpoint", str(ckpts[0]), "--manifest", str(only_val / "manifest.csv"),
                 "--out", str(tmp_path / "o2"), "--device", "cpu"])
    assert code == 2 and "no rows with split 'test'" in capsys.readouterr().err


def test_evaluate_without_val_rows_warns_and_fixes_threshold(tmp_path, setup, capsys):
    _cfg, manifests, ckpts, cfg_path = setup
    frame = pd.read_csv(manifests[0], dtype=str, keep_default_na=False)
    frame = frame[frame.split != "val"]
    path = manifests[0].parent / "no-val.csv"
    frame.to_csv(path, index=False)
    code = main(["evaluate", "--checkpoint", str(ckpts[0]), "--manifest", str(path), "--out",
                 str(tmp_path / "nv"), "--config", str(cfg_path), "--no-robustness", "--device", "cpu"])
    assert code == 0
    assert "no 'val' rows" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "nv" / "metrics.json").read_text())
    assert metrics["runs"]["model0"]["thresholds"] == {"positive": 0.5}
    assert any("no 'val' rows" in n for n in metrics["notes"])
    assert metrics["robustness"] == {}


def test_robustness_sweeps_only_the_modalities_the_study_has(tmp_path, setup):
    _cfg, manifests, ckpts, cfg_path = setup
    no_notes = []
    for m in manifests:
        frame = pd.read_csv(m, dtype=str, keep_default_na=False).drop(columns=["note"])
        path = m.parent / "no-notes.csv"
        frame.to_csv(path, index=False)
        no_notes.append(path)
    code = main(["evaluate", "--checkpoint", str(ckpts[0]), "--manifest", *map(str, no_notes), "--out",
                 str(tmp_path / "nn"), "--config", str(cfg_path), "--device", "cpu"])
    assert code == 0
    metrics = json.loads((tmp_path / "nn" / "metrics.json").read_text())
    assert metrics["modalities"] == ["image", "tabular"]
    assert {c["modality"] for c in metrics["robustness"]["model0"]} == {"image", "tabular"}
    html = (tmp_path / "nn" / "report.html").read_text()
    assert '<td class="l">image<' in html and '<td class="l">text<' not in html  # sweep rows
