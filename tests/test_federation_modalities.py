"""Federation over declared modalities: a five-modality study under DP with a site that lacks the
volume (modality-aware aggregation), and study-shaped models whose checkpoints and messages hold
only the declared modalities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clinfuse.config import load_config
from tests.conftest import REPO, rich_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def initial_state(cfg):
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything

    seed_everything(0)
    return {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}


def sites_of(cfg, cohort, tmp_path, n=3):
    from clinfuse.federation.site_runtime import SiteRuntime

    return [SiteRuntime(cfg, cohort / f"site-{k}" / "manifest.csv", site_id=f"site-{k}",
                        state_dir=tmp_path / f"state-{k}", max_epsilon=100.0) for k in range(n)]


def test_five_modality_study_trains_under_dp_in_federation_with_a_site_lacking_the_volume(tmp_path, rich_cohort):
    from clinfuse.federation.aggregation import SiteUpdate, aggregate
    from clinfuse.models.fusion import parameter_groups
    from clinfuse.training.checkpoint import build_model_for

    cfg = load_config(rich_config(tmp_path))
    assert cfg.modality_names == ("chest", "ct", "note", "ehr", "ecg") and cfg.privacy.enabled
    state = initial_state(cfg)
    groups = parameter_groups(build_model_for(cfg))
    sites = sites_of(cfg, rich_cohort, tmp_path)
    results = [s.train_round(state, server_round=1, rounds=2, local_epochs=1) for s in sites]
    assert not any(r.declined for r in results)
    assert all(0 < r.metrics["epsilon"] < 100 and np.isfinite(r.metrics["train_loss"]) for r in results)
    counts = [r.modality_examples for r in results]
    assert counts[1]["ct"] == 0 and counts[0]["ct"] > 0 and counts[2]["ct"] > 0
    assert counts[2]["ecg"] == 0 and counts[2]["note"] == 0 and counts[1]["ecg"] > 0
    # the site without volumes froze the volume encoder: it sends back what it was sent
    for name in groups["ct"]:
        np.testing.assert_array_equal(results[1].state[name], state[name])
    assert any(not np.array_equal(results[0].state[n], state[n]) for n in groups["ct"])
    # modality-aware averaging: the volume group from the sites that have volumes only
    updates = [SiteUpdate(r.state, r.num_examples, r.modality_examples) for r in results]
    new = aggregate(updates, state, groups=groups, modality_aware=True)
    w0, w2 = counts[0]["ct"], counts[2]["ct"]
    for name in groups["ct"]:
        expected = (results[0].state[name] * w0 + results[2].state[name] * w2) / (w0 + w2)
        np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-7)
    plain = aggregate(updates, state, groups=groups, modality_aware=False)
    assert any(not np.allclose(plain[n], new[n]) for n in groups["ct"])
    # a second round from the aggregate keeps one accountant per site
    again = sites[0].train_round(new, server_round=2, rounds=2, local_epochs=1)
    assert again.metrics["epsilon"] > results[0].metrics["epsilon"]


def test_tabular_only_study_has_no_image_or_text_parameters_in_checkpoint_or_messages(tmp_path, rich_cohort):
    from clinfuse.models.fusion import parameter_counts
    from clinfuse.training.checkpoint import build_model_for, load_checkpoint, save_checkpoint

    rich = yaml.safe_load((REPO / "configs" / "rich.yaml").read_text())
    ehr = next(m for m in rich["modalities"] if m["name"] == "ehr")
    path = tmp_path / "tabular.yaml"
    path.write_text(yaml.safe_dump({"data": {"labels": ["negative", "positive"]}, "modalities": [ehr],
                                    "train": {"batch_size": 8}, "privacy": {"accountant": "rdp"}}))
    cfg = load_config(path)
    assert cfg.model.dim == 8 and cfg.model.fusion.name == "concat"  # width follows the 5 fields
    model = build_model_for(cfg)
    counts = parameter_counts(model)
    assert set(counts) == {"ehr", "fusion", "total"} and counts["total"] < 1000
    site = sites_of(cfg, rich_cohort, tmp_path, n=1)[0]
    result = site.train_round(initial_state(cfg), server_round=1, rounds=1, local_epochs=1)
    message_names = set(result.state)  # what the site sends
    ckpt = save_checkpoint(tmp_path / "m.pt", model, cfg)
    _, _, meta = load_checkpoint(ckpt)
    saved = set(torch.load(ckpt, weights_only=True)["state_dict"])
    assert meta["modalities"] == [{"name": "ehr", "kind": "tabular", "max_count": 1}]
    for names in (message_names, saved):
        assert names == set(model.state_dict())
        assert not any(w in n for n in names for w in ("image", "text", "chest", "note", "ct", "ecg")), names
    assert set(result.modality_examples) == {"ehr"}


def test_text_only_study_runs_no_image_cnn(tmp_path, rich_cohort):
    from clinfuse.training.checkpoint import build_model_for

    rich = yaml.safe_load((REPO / "configs" / "rich.yaml").read_text())
    note = next(m for m in rich["modalities"] if m["name"] == "note")
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump({"data": {"labels": ["negative", "positive"]}, "modalities": [note],
                                    "train": {"batch_size": 8}, "privacy": {"accountant": "rdp"}}))
    cfg = load_config(path)
    model = build_model_for(cfg)
    assert not any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for m in model.modules())
    site = sites_of(cfg, rich_cohort, tmp_path, n=1)[0]
    assert site.train_set[0].keys() == {"note", "mask", "instances", "label"}  # no image is even decoded
    result = site.train_round(initial_state(cfg), server_round=1, rounds=1, local_epochs=1)
    assert not result.declined and set(result.modality_examples) == {"note"}


@pytest.mark.slow
def test_five_modality_study_over_flower_messages(tmp_path, rich_cohort):
    """The same study through the ServerApp round loop and the ClientApp (messages on the wire)."""
    import json

    from tests.test_federation_rounds import run_rounds

    run_config = {"config": str(rich_config(tmp_path)), "workdir": str(tmp_path / "work"),
                  "cohort": str(rich_cohort), "min-sites": 2, "max-epsilon": 100.0, "num-rounds": 2}
    summary, grid = run_rounds(run_config, 3)
    assert summary["rounds"] == 2 and summary["modalities"] == ["chest", "ct", "note", "ehr", "ecg"]
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"]
    assert all(site["status"] == "trained" for r in history for site in r["sites"].values())
    trained = [m for m in grid.replies if not m.has_error() and "arrays" in m.content.array_records]
    assert trained and all("examples-ct" in m.content["metrics"] for m in trained)
    assert sorted(int(m.content["metrics"]["examples-ct"]) == 0 for m in trained).count(True) == 2  # site 1, 2 rounds
