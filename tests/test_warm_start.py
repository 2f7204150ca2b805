"""Public-data warm starts: ``clinfuse pretrain`` spends no budget and refuses a site's data; a study
started from its checkpoint records the provenance in history.json, global.pt and every site's
signed ledger; a checkpoint that does not fit the study is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from clinfuse.cli import main
from clinfuse.config import load_config
from clinfuse.errors import InputError
from clinfuse.privacy.site_state import STATE_DIR_FILES
from clinfuse.training.warm_start import PRETRAINING_FORMAT, file_sha256, read_initial_checkpoint
from tests.conftest import tiny_config
from tests.test_federation_rounds import base_config, run_rounds

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def state_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name in STATE_DIR_FILES]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, federation_cohort):
    """A pretraining run on site-2 of the shared cohort (declared public here): (checkpoint, config, output)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("pretrain")
    cfg_path = tiny_config(folder)
    data = yaml.safe_load(cfg_path.read_text())
    data["model"]["dim"] = 24  # the federation tests' tiny model
    cfg_path.write_text(yaml.safe_dump(data))
    public = federation_cohort / "site-2" / "manifest.csv"
    # A separate process: what a user runs, and its console output as printed.
    done = subprocess.run([sys.executable, "-m", "clinfuse.cli", "pretrain", "--config", str(cfg_path),
                           "--manifest", str(public), "--out", str(folder / "out"), "--epochs", "1",
                           "--dataset-name", "open-cohort"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return folder / "out" / "model.pt", cfg_path, done.stdout + done.stderr


def test_pretrain_spends_no_budget_and_records_its_provenance(pretrained, federation_cohort):
    import torch

    ckpt, cfg_path, output = pretrained
    assert "no site's privacy budget is spent" in output and "WITHOUT differential privacy" in output
    payload = torch.load(ckpt, weights_only=True)
    block = payload["pretraining"]
    public = federation_cohort / "site-2" / "manifest.csv"
    rows = sum(1 for line in public.read_text().splitlines()[1:] if line.strip())
    assert block["format"] == PRETRAINING_FORMAT and block["dataset"] == "open-cohort"
    assert block["public"] == "declared by the consortium"
    assert block["manifests"] == [{"path": str(public), "sha256": file_sha256(public)}]
    assert 0 < block["patients"] <= block["rows"] <= rows
    assert block["config_hash"] == load_config(cfg_path).digest() == payload["config_hash"]
    assert block["model_hash"] == payload["model_hash"]
    assert payload["privacy"]["enabled"] is False and payload["privacy"]["epsilon"] is None
    # No accountant, plan, key or ledger anywhere: not beside the output, not beside the data.
    assert state_files(ckpt.parent.parent) == [] and state_files(federation_cohort) == []


def test_pretrain_refuses_a_manifest_under_or_beside_a_site_state_dir(tmp_path, federation_cohort, capsys):
    from clinfuse.privacy.site_state import SitePrivacyState

    source = federation_cohort / "site-0" / "manifest.csv"
    under = tmp_path / "site-a" / "state"
    SitePrivacyState(under)  # a site's state dir: its key exists
    (under / "data").mkdir()
    shutil.copy(source, under / "data" / "manifest.csv")
    beside = tmp_path / "site-b"
    SitePrivacyState(beside / "state")  # the `clinfuse init` layout: DIR/manifest.csv, DIR/state
    shutil.copy(source, beside / "manifest.csv")
    for manifest, word in ((under / "data" / "manifest.csv", "under"), (beside / "manifest.csv", "beside")):
        capsys.readouterr()
        code = main(["pretrain", "--manifest", str(manifest), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert str(manifest) in err and f"lies {word} a site's state dir" in err
    assert not (tmp_path / "out").exists()


def write_config(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = tiny_config(folder)
    data = yaml.safe_load(path.read_text())
    data["model"]["dim"] = 24
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_checkpoint_that_does_not_fit_the_study_is_refused(pretrained, tmp_path, federation_cohort):
    ckpt, cfg_path, _ = pretrained
    read_initial_checkpoint(ckpt, load_config(cfg_path))  # fits its own study
    cases = {"architecture 'model'": {"model.dim": 32},
             "preprocessing 'labels'": {"data.labels": ["negative", "positive", "other"]},
             "preprocessing 'modalities'": {"data.text": {"max_tokens": 40, "ngram_max": 2, "hash_buckets": 4096,
                                                          "lowercase": True}}}
    for i, (what, changes) in enumerate(cases.items()):
        with pytest.raises(InputError, match="does not match the study") as info:
            read_initial_checkpoint(ckpt, load_config(write_config(tmp_path / str(i), **changes)))
        assert what in str(info.value) and str(ckpt) in info.value.describe()
    # A checkpoint of training on a site's own data is no warm start.
    code = main(["train", "--config", str(cfg_path), "--manifest", str(federation_cohort / "site-0" / "manifest.csv"),
                 "--out", str(tmp_path / "private"), "--no-dp", "--epochs", "1", "--quiet"])
    assert code == 0
    with pytest.raises(InputError, match="not a pretraining checkpoint"):
        read_initial_checkpoint(tmp_path / "private" / "model.pt", load_config(cfg_path))
    # The federation refuses it before it writes a run directory.
    cfg = write_config(tmp_path / "study", **{"model.dim": 32})
    data = yaml.safe_load(cfg.read_text())
    data["federation"]["initial_checkpoint"] = str(ckpt)
    cfg.write_text(yaml.safe_dump(data))
    run_config = {**base_config(tmp_path, federation_cohort, **{"num-rounds": 1}), "config": str(cfg)}
    with pytest.raises(InputError, match="architecture 'model'"):
        run_rounds(run_config, 2)
    assert not (tmp_path / "work" / "run").exists()


def test_a_study_from_a_warm_start_records_it_in_history_checkpoint_and_every_ledger(pretrained, tmp_path,
                                                                                     federation_cohort):
    import torch

    from clinfuse.privacy.ledger import read_entries
    from clinfuse.privacy.site_key import SiteKey

    ckpt, cfg_path, _ = pretrained
    data = yaml.safe_load(cfg_path.read_text())
    data["federation"]["initial_checkpoint"] = str(ckpt)
    study = tmp_path / "warm-study.yaml"
    study.write_text(yaml.safe_dump(data))
    run_config = {**base_config(tmp_path, federation_cohort, **{"num-rounds": 2}), "config": str(study)}
    summary, grid = run_rounds(run_config, 2)
    payload = torch.load(ckpt, weights_only=True)
    # Round 1 was sent the pretrained weights.
    sent = {k: a.numpy() for k, a in grid.sent[0].content["arrays"].items()}
    assert all(np.array_equal(sent[k], payload["state_dict"][k].numpy()) for k in sent)
    expected = {k: payload["pretraining"][k] for k in ("dataset", "manifest_sha256", "public", "model_hash")}
    doc = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert {k: doc["warm_start"][k] for k in expected} == expected and doc["warm_start"]["checkpoint"] == str(ckpt)
    assert summary["warm_start"] == doc["warm_start"]
    global_ckpt = torch.load(Path(summary["run_dir"]) / "global.pt", weights_only=True)
    assert global_ckpt["warm_start"] == doc["warm_start"]
    for site in ("site-0", "site-1"):
        state_dir = tmp_path / "work" / "sites" / site
        key = SiteKey.load(state_dir / "site-key.pem")
        entries = read_entries(state_dir / "ledger.jsonl", public_key=key.public_key)  # every entry signed
        warm = [e for e in entries if e["kind"] == "warm-start"]
        assert len(warm) == 1, "once per study, not per round"
        assert {k: warm[0]["pretraining"][k] for k in expected} == expected
        assert warm[0]["round"] == 1 and warm[0]["received_is_checkpoint"] is True
        # Recorded before the round's DP steps, and no budget is charged for it.
        kinds = [e["kind"] for e in entries]
        assert kinds.index("warm-start") < kinds.index("reservation")
        assert warm[0]["mechanism"] is None and warm[0]["epsilon"] is None
        # The audit takes the new entry in its stride: chain, signatures, recorded heads, epsilon.
        history = Path(summary["run_dir"]) / "history.json"
        assert main(["audit", "verify", str(state_dir / "ledger.jsonl"), f"--public-key={site}={key.public_key}",
                     "--history", str(history), "--quiet"]) == 0
