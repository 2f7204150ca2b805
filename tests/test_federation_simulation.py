"""Flower's simulation engine (Ray) end to end: a site crashing mid-run, every message recorded
on the way out of the ClientApp, and the SecAgg+ legacy path. Slow: each starts Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from clinfuse.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def recording_mod(folder: str):
    """Outermost mod: writes every reply (or the exception) the ClientApp hands to Flower."""

    def mod(msg, ctx, call_next):
        import uuid
        from pathlib import Path


        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        try:
            reply = call_next(msg, ctx)
        except Exception as exc:
            (out / f"{uuid.uuid4().hex}.error").write_text(f"{type(exc).__name__}: {exc}")
            raise
        (out / f"{uuid.uuid4().hex}.msg").write_bytes(message_to_proto(reply).SerializeToString())
        return reply

    return mod


@pytest.fixture
def cohort(federation_cohort):
    return federation_cohort


def test_simulation_survives_a_crashing_site_and_sends_only_weights_counts_metrics(tmp_path, cohort):
    from test_federation_rounds import check_reply, crash_mod, note_sentences, tiny_config

    from clinfuse.training.checkpoint import build_model_for
    from federated.simulation import simulate

    cfg_path = tiny_config(tmp_path)
    sent = tmp_path / "sent"
    run_config = {"config": str(cfg_path), "workdir": str(tmp_path / "work"), "cohort": str(cohort),
                  "num-rounds": 3, "min-sites": 2, "max-epsilon": 100.0}
    rounds = []
    summary = simulate(run_config, num_sites=3, cpus=2,
                       client_mods=[recording_mod(str(sent)), crash_mod(1, {2})], on_round=rounds.append)

    assert summary["rounds"] == 3 and [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["sites"]["site-1"]["status"] for r in rounds] == ["trained", "failed", "trained"]
    assert all(r["aggregated"] for r in rounds)
    assert set(summary["epsilon"]) == {"site-0", "site-1", "site-2"}
    assert Path(summary["global_checkpoint"]).exists()

    cfg = load_config(cfg_path)
    shapes = {k: tuple(v.shape) for k, v in build_model_for(cfg).state_dict().items()}
    messages = [message_from_proto(ProtoMessage.FromString(p.read_bytes())) for p in sent.glob("*.msg")]
    errors = [p.read_text() for p in sent.glob("*.error")]
    # A train reply per site and round (rounds 2-3 carry the previous round's evaluation folded in),
    # an evaluate reply per site after the last round; site-1 crashed once.
    assert len(messages) == 3 * 3 + 3 - 1 and len(errors) == 1
    sentences = note_sentences(cohort)
    for message in messages:
        check_reply(message, shapes, cfg, sentences)
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert len(history["rounds"]) == 3


def test_secagg_plus_legacy_path_runs_and_checkpoints(tmp_path, cohort):
    from test_federation_rounds import tiny_config

    from federated.simulation import simulate

    run_config = {"config": str(tiny_config(tmp_path)), "workdir": str(tmp_path / "work"), "cohort": str(cohort),
                  "num-rounds": 2, "min-sites": 2, "max-epsilon": 100.0, "secagg": True}
    summary = simulate(run_config, num_sites=3, cpus=2)
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [1, 2] and all(r["secagg"] for r in history)
    assert all(s["status"] == "trained" for s in history[-1]["sites"].values())
    assert history[-1]["val"].get("num-examples") is None and "val-loss" in history[-1]["val"]
    assert len(summary["epsilon"]) == 3


@pytest.mark.parametrize("app", ["checkout", "flower-app"])
def test_flwr_run_dot_on_a_local_simulation_superlink(tmp_path, cohort, app):
    """`flwr run .` as docs/federation.md shows it: a local SuperLink started beforehand without
    runtime dependency installation (else it downloads torch), 3 simulated SuperNodes. The app is
    this checkout, or the project `clinfuse flower-app` writes over the installed package."""
    import os
    import subprocess

    from support.deploy import local_simulation_superlink
    from test_federation_rounds import REPO, tiny_config

    # Flower's tools (and the processes the SuperLink spawns) from this Python's environment, also
    # when it is not activated (`make test` runs .venv/bin/python directly).
    tools = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": tools + os.pathsep + os.environ.get("PATH", "")}
    with local_simulation_superlink(tmp_path / "flwr", env, start_timeout_s=60) as env:
        run_config = (f"config='{tiny_config(tmp_path)}' cohort='{cohort}' workdir='work' num-rounds=2 "
                      f"max-epsilon=100.0")
        app_dir = REPO
        if app == "flower-app":
            from federated.commands import write_flower_app

            app_dir = write_flower_app(tmp_path / "app").parent
        out = subprocess.run(["flwr", "run", str(app_dir), "--stream", "--federation-config", "num-supernodes=3",
                              "--run-config", run_config], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, check=False)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    history = json.loads((tmp_path / "work" / "run" / "history.json").read_text())  # relative to the SuperLink
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert set(history["rounds"][-1]["sites"]) == {"site-0", "site-1", "site-2"}
    assert not (tmp_path / "flwr" / "runtime-envs").exists() or not any((tmp_path / "flwr" / "runtime-envs").iterdir())


def test_clinfuse_demo_prints_rounds_epsilon_per_site_and_auroc(tmp_path):
    import subprocess

    from test_federation_rounds import tiny_config

    cmd = [sys.executable, "-m", "clinfuse.cli", "demo", "--workdir", str(tmp_path / "demo"), "--patients", "40",
           "--rounds", "2", "--config", str(tiny_config(tmp_path)), "--cpus", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("round ") for line in lines) == 2
    assert {f"epsilon site-{k}" for k in range(3)} <= {line.split(":")[0] for line in lines}
    assert any(line.startswith("final validation AUROC") for line in lines)
    console = (out.stdout + out.stderr).splitlines()
    assert any(line.startswith("privacy: DP-SGD at every site") and "seed 0 fixes" in line for line in console)
    assert (tmp_path / "demo" / "run" / "global.pt").exists()
    assert json.loads((tmp_path / "demo" / "cohort" / "cohort.json").read_text())["patients"] == 40


def test_a_demo_where_every_site_fails_exits_1_without_a_global_checkpoint(tmp_path):
    """Issue #11 item 10: `demo --patients 1` leaves every site without training rows."""
    import subprocess

    from test_federation_rounds import tiny_config

    cmd = [sys.executable, "-m", "clinfuse.cli", "demo", "--workdir", str(tmp_path / "demo"), "--patients", "1",
           "--rounds", "2", "--config", str(tiny_config(tmp_path)), "--cpus", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert "study stopped: round 1: 0 site(s) trained" in out.stderr and "no global checkpoint" in out.stderr
    assert "global checkpoint:" not in out.stdout
    run_dir = tmp_path / "demo" / "run"
    assert not (run_dir / "global.pt").exists() and not (run_dir / "checkpoints").exists()
    history = json.loads((run_dir / "history.json").read_text())
    assert history["rounds"] == []
    record = history["runs"][-1]["summary"]["stopped"]["record"]
    assert not any(name.startswith("node") for name in record["sites"])  # sites by site id only
