"""The coordinator's run directory: a checkpoint per round, history, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clinfuse.config import config_from_dict, load_config
from clinfuse.errors import InputError
from clinfuse.federation.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg():
    data = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    data["model"]["dim"] = 16
    data["data"]["image"]["size"] = [32, 32]
    return config_from_dict(data, source="test")


def state_of(cfg, seed):
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything

    seed_everything(seed)
    return {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}


def test_rounds_are_checkpointed_and_resume_continues_after_the_last(cfg, tmp_path):
    from clinfuse.training.checkpoint import load_checkpoint

    run = RunDir(tmp_path / "run")
    assert run.begin(cfg, {"num_rounds": 4}, resume=False, num_rounds=4) == 1
    states = [state_of(cfg, s) for s in (1, 2)]
    moments = {"m_t": {"w": np.arange(3.0)}}
    for r, state in enumerate(states, start=1):
        run.save_round(r, state, cfg, {"sites": {"a": {"epsilon": 0.5 * r}}, "val": {"val-auroc": 0.6}},
                       strategy_state=moments)
    assert [h["round"] for h in run.history()] == [1, 2]
    assert (run.path / "checkpoints" / "round-0001.pt").exists()
    model, _, meta = load_checkpoint(run.global_path)  # what `clinfuse evaluate` reads
    assert meta["federation"]["round"] == 2
    assert all(np.array_equal(v.numpy(), states[1][k]) for k, v in model.state_dict().items())

    again = RunDir(tmp_path / "run")
    assert again.begin(cfg, {"num_rounds": 4}, resume=True, num_rounds=4) == 3
    last = again.last()
    assert last.round == 2
    assert all(np.array_equal(last.state[k], states[1][k]) for k in states[1])
    assert np.array_equal(last.strategy_state["m_t"]["w"], np.arange(3.0))
    doc = again.document()
    assert [r["resumed"] for r in doc["runs"]] == [False, True]
    assert not list(run.path.rglob("*.tmp"))


def test_a_fresh_start_over_existing_rounds_is_refused(cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin(cfg, {}, resume=False, num_rounds=3)
    run.save_round(1, state_of(cfg, 0), cfg, {})
    with pytest.raises(InputError, match="resume"):
        RunDir(tmp_path / "run").begin(cfg, {}, resume=False, num_rounds=3)


def test_resume_with_another_config_is_refused(cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin(cfg, {}, resume=False, num_rounds=3)
    run.save_round(1, state_of(cfg, 0), cfg, {})
    other = config_from_dict({**cfg.model_dump(mode="json"), "study": "another"}, source="test")
    with pytest.raises(InputError, match="same study config"):
        RunDir(tmp_path / "run").begin(other, {}, resume=True, num_rounds=3)


def test_resume_of_a_finished_run_asks_for_more_rounds(cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin(cfg, {}, resume=False, num_rounds=1)
    run.save_round(1, state_of(cfg, 0), cfg, {})
    with pytest.raises(InputError, match="num-rounds"):
        RunDir(tmp_path / "run").begin(cfg, {}, resume=True, num_rounds=1)


def test_a_tampered_checkpoint_is_not_resumed_from(cfg, tmp_path):
    import torch

    run = RunDir(tmp_path / "run")
    run.begin(cfg, {}, resume=False, num_rounds=3)
    path = run.save_round(1, state_of(cfg, 0), cfg, {})
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name] + 1.0
    torch.save(payload, path)
    with pytest.raises(InputError, match="hash"):
        run.last()


def test_rounds_must_be_saved_in_order_and_history_is_valid_json(cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin(cfg, {}, resume=False, num_rounds=3)
    with pytest.raises(ValueError, match="out of order"):
        run.save_round(2, state_of(cfg, 0), cfg, {})
    run.save_round(1, state_of(cfg, 0), cfg, {"val": {"val-auroc": float("nan")}})
    doc = json.loads(run.history_path.read_text())  # NaN became null: strict JSON
    assert doc["rounds"][0]["val"]["val-auroc"] is None
