"""The site's long-lived worker process (clinfuse.federation.site_worker) and the deployed
ClientApp forwarding to it: one process serves a site's messages, is restarted when it dies, stops
when idle or orphaned, and only talks to holders of the site's key; a deployed site trained
through it spends and signs exactly what a process per message would."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clinfuse.federation import site_worker
from clinfuse.federation.site_worker import SiteWorkerError, WorkerUnavailable

ECHO = "support.worker_handlers:echo"


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` exits within ``timeout`` (reaping it when it is our child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return True
        time.sleep(0.05)
    return False


@pytest.fixture
def workers():
    """PIDs of workers a test started; each is stopped afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if gone(pid, 5):
                break


def echo(state_dir, workers, header=None, blobs=(b"abc",), **options):
    reply, out = site_worker.call(state_dir, ECHO, header or {}, list(blobs), **options)
    if reply["pid"] not in workers:
        workers.append(reply["pid"])
    return reply, out


def test_one_worker_serves_every_message_of_a_site(tmp_path, workers):
    first, out = echo(tmp_path / "state", workers)
    second, _ = echo(tmp_path / "state", workers)
    assert out == [b"cba"]
    assert second["pid"] == first["pid"] != os.getpid()
    assert (first["served"], second["served"]) == (1, 2)  # the same process, its state kept
    other, _ = echo(tmp_path / "other-site", workers)
    assert other["pid"] != first["pid"]  # a worker per state dir


def test_the_key_and_socket_are_private(tmp_path, workers):
    echo(tmp_path / "state", workers)
    key = tmp_path / "state" / site_worker.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    address = Path(site_worker.worker_address(tmp_path / "state"))
    assert stat.S_IMODE(address.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(address.stat().st_mode) == 0o600


def test_a_key_other_accounts_can_read_is_not_used(tmp_path):
    site_worker.authkey(tmp_path / "state")
    (tmp_path / "state" / site_worker.KEY_FILE).chmod(0o644)
    with pytest.raises(WorkerUnavailable, match="chmod 600"):  # the app process then handles the message
        site_worker.call(tmp_path / "state", ECHO, {}, [])


def test_a_process_without_the_site_key_is_refused(tmp_path, workers):
    echo(tmp_path / "state", workers)
    from multiprocessing.connection import AuthenticationError, Client

    address = site_worker.worker_address(tmp_path / "state")
    with pytest.raises(AuthenticationError):
        Client(address, family="AF_UNIX", authkey=b"x" * 32)
    assert echo(tmp_path / "state", workers)[0]["served"] == 2  # still serving


def test_a_handler_error_comes_back_by_its_text_and_the_worker_stays(tmp_path, workers):
    echo(tmp_path / "state", workers)
    with pytest.raises(SiteWorkerError, match=r"ValueError: asked to fail \(now\)"):
        site_worker.call(tmp_path / "state", ECHO, {"fail": "now"}, [])
    assert echo(tmp_path / "state", workers)[0]["served"] == 3


def test_a_worker_that_dies_is_replaced_by_the_next_message(tmp_path, workers):
    first, _ = echo(tmp_path / "state", workers)
    with pytest.raises(SiteWorkerError, match="stopped while handling") as info:
        site_worker.call(tmp_path / "state", ECHO, {"die": True}, [])
    assert not isinstance(info.value, WorkerUnavailable)  # sent: the caller must not retry it itself
    assert gone(first["pid"])
    again, _ = echo(tmp_path / "state", workers)
    assert again["pid"] != first["pid"] and again["served"] == 1
    os.kill(again["pid"], signal.SIGKILL)  # killed: its socket file is left behind
    assert gone(again["pid"])
    third, _ = echo(tmp_path / "state", workers)
    assert third["pid"] not in (first["pid"], again["pid"])
    address = Path(site_worker.worker_address(tmp_path / "state"))
    os.kill(third["pid"], signal.SIGTERM)  # stopped: it removes its files
    assert gone(third["pid"])
    assert not address.exists() and not Path(f"{address}.lock").exists()


def test_a_worker_running_other_code_hands_over_to_a_new_one(tmp_path, workers, monkeypatch):
    old, _ = echo(tmp_path / "state", workers)
    monkeypatch.setattr(site_worker, "code_identity", lambda: "an upgraded clinfuse")
    new, _ = echo(tmp_path / "state", workers)
    assert new["pid"] != old["pid"] and new["served"] == 1  # the old one handled nothing more
    assert gone(old["pid"])  # one worker per site, never two
    assert echo(tmp_path / "state", workers)[0]["pid"] == new["pid"]


def test_a_worker_stops_when_idle_and_when_its_supernode_is_gone(tmp_path, workers):
    idle, _ = echo(tmp_path / "idle", workers, idle_timeout_s=1.0)
    address = Path(site_worker.worker_address(tmp_path / "idle"))
    assert gone(idle["pid"], 10)
    assert not address.exists() and not Path(f"{address}.lock").exists()
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan, _ = echo(tmp_path / "orphan", workers, watch_pid=supernode.pid)
        assert not gone(orphan["pid"], 1.5)
    finally:
        supernode.kill()
        supernode.wait()
    assert gone(orphan["pid"], 10)


def test_a_worker_that_cannot_start_is_reported_before_anything_is_sent(tmp_path):
    with pytest.raises(WorkerUnavailable, match="exited with status"):
        site_worker.call(tmp_path / "state", "support.worker_handlers:no_such_handler", {}, [])


# --------------------------------------------------------------------------------------------
# The deployed ClientApp over the worker
# --------------------------------------------------------------------------------------------

def site_workers(state_dir: Path) -> list[int]:
    """PIDs of live site workers serving ``state_dir`` (from their command lines)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"clinfuse.federation.site_worker" in argv and str(state_dir).encode() in argv
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("secagg", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["message-api", "secagg"])
def test_deployed_sites_train_through_one_worker_each_and_spend_what_they_report(tmp_path, federation_cohort, secagg):
    from test_federation_rounds import (
        LocalGrid,
        check_reply,
        ledger_has,
        note_sentences,
        site_epsilon_after,
        tiny_config,
    )

    from clinfuse.config import load_config
    from clinfuse.training.checkpoint import build_model_for
    from federated.client_app import app
    from federated.rounds import run_study

    config, sites = str(tiny_config(tmp_path)), 3 if secagg else 2  # SecAgg+ needs 3
    nodes = {2000 + k: {"manifest": str(federation_cohort / f"site-{k}" / "manifest.csv"), "site-id": f"site-{k}",
                        "state-dir": str(tmp_path / "state" / f"site-{k}"), "max-epsilon": 100.0, "config": config}
             for k in range(sites)}
    run_config = {"config": config, "workdir": str(tmp_path / "work"), "num-rounds": 2, "min-sites": sites,
                  "secagg": secagg}
    grid = LocalGrid(app, 0, extra_nodes=nodes)
    for node in nodes:
        grid.contexts[node].run_config = dict(run_config)  # the run config a SuperNode hands the app
    state_dirs = [Path(n["state-dir"]) for n in nodes.values()]
    try:
        summary = run_study(grid, {"expected-sites": sites, "wait-seconds": 1, **run_config})
        assert [len(site_workers(d)) for d in state_dirs] == [1] * sites  # one worker per site served it all
    finally:
        for state_dir in state_dirs:
            for pid in site_workers(state_dir):
                os.kill(pid, signal.SIGTERM)
    doc = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert all(r["aggregated"] and r.get("secagg", False) == secagg for r in doc["rounds"])
    cfg = load_config(config)
    shapes = {k: tuple(v.shape) for k, v in build_model_for(cfg).state_dict().items()}
    for reply in grid.replies if not secagg else ():  # what left the sites is what a process per message sends
        check_reply(reply, shapes, cfg, note_sentences(federation_cohort))
    for k, node in enumerate(nodes.values()):
        records = [r["sites"][f"site-{k}"] for r in doc["rounds"]]
        assert [r["status"] for r in records] == ["trained", "trained"]
        # What the site reports is what one accountant over every step of both rounds says.
        expected = site_epsilon_after(config, node["manifest"], 2, 2, tmp_path / f"probe-{k}")
        assert summary["epsilon"][f"site-{k}"] == pytest.approx(expected, rel=1e-9)
        assert ledger_has(state_dirs[k], records[-1]["ledger_head"])["kind"] == "release"
    if not secagg:  # SecAgg+'s replies carry Flower's own metrics
        first, second = (m.content["metrics"] for m in grid.replies[:1] + grid.replies[2:3])
        assert first["worker-start-seconds"] > 0 and first["import-seconds"] > 0.05
        assert second["import-seconds"] < 0.05  # the worker kept torch, Opacus and the model loaded


def test_without_a_usable_worker_the_app_process_handles_the_message(tmp_path, federation_cohort, caplog):
    from test_federation_rounds import LocalGrid, site_epsilon_after, tiny_config

    from federated.client_app import app
    from federated.rounds import run_study

    config, state_dir = str(tiny_config(tmp_path)), tmp_path / "state" / "site-0"
    site_worker.authkey(state_dir)
    (state_dir / site_worker.KEY_FILE).chmod(0o644)
    node = {"manifest": str(federation_cohort / "site-0" / "manifest.csv"), "site-id": "site-0",
            "state-dir": str(state_dir), "max-epsilon": 100.0, "config": config}
    run_config = {"config": config, "workdir": str(tmp_path / "work"), "num-rounds": 1, "min-sites": 1}
    grid = LocalGrid(app, 0, extra_nodes={2000: node})
    grid.contexts[2000].run_config = dict(run_config)
    with caplog.at_level("WARNING", logger="clinfuse.site"):
        summary = run_study(grid, {"expected-sites": 1, "wait-seconds": 1, **run_config})
    assert site_workers(state_dir) == []
    assert "chmod 600" in caplog.text and "handling this message in the ClientApp process" in caplog.text
    assert summary["epsilon"]["site-0"] == pytest.approx(
        site_epsilon_after(config, node["manifest"], 1, 1, tmp_path / "probe"), rel=1e-9)


def test_a_warm_worker_reads_the_privacy_state_from_disk_every_message(tmp_path, federation_cohort, capfd):
    """An attacker or an accident between rounds: a deleted accountant, then an edited plan. The
    worker that served round 1 is still alive, and still refuses both, as a fresh process would."""
    from test_federation_rounds import LocalGrid, tiny_config

    from federated.client_app import app
    from federated.rounds import StudyStopped, run_study

    config, state_dir = str(tiny_config(tmp_path)), tmp_path / "state" / "site-0"
    node = {"manifest": str(federation_cohort / "site-0" / "manifest.csv"), "site-id": "site-0",
            "state-dir": str(state_dir), "max-epsilon": 100.0, "config": config}

    def one_round(name: str) -> str:
        """The site's status in round 1 of a 3-round study stopped after it, or why the study stopped."""
        run_config = {"config": config, "workdir": str(tmp_path / name), "num-rounds": 3, "min-sites": 1,
                      "stop-after-round": 1}
        grid = LocalGrid(app, 0, extra_nodes={2000: node})
        grid.contexts[2000].run_config = dict(run_config)
        try:
            summary = run_study(grid, {"expected-sites": 1, "wait-seconds": 1, **run_config})
        except StudyStopped as stopped:
            return str(stopped)
        return json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"][0]["sites"]["site-0"][
            "status"]

    def dp_entries() -> int:
        from clinfuse.privacy.ledger import read_entries

        return sum(e["kind"] == "dp-training" for e in read_entries(state_dir / "ledger.jsonl"))

    try:
        assert one_round("first") == "trained"
        worker = site_workers(state_dir)
        spent = dp_entries()
        accountant = state_dir / "accountant.json"
        saved = accountant.read_bytes()
        accountant.unlink()
        capfd.readouterr()
        assert "0 site(s) trained" in one_round("deleted")
        assert "refusing to start from zero" in capfd.readouterr().err  # the worker's log, on the node's console
        accountant.write_bytes(saved)
        plan = state_dir / "plan.json"
        edited = json.loads(plan.read_text())
        edited["noise_multiplier"] = edited["noise_multiplier"] * 4  # less epsilon per step on paper
        plan.write_text(json.dumps(edited))
        assert "0 site(s) trained" in one_round("edited")
        assert "site replan" in capfd.readouterr().err
        assert site_workers(state_dir) == worker  # the same warm worker refused both
        assert dp_entries() == spent  # nothing trained, nothing spent unrecorded
    finally:
        for pid in site_workers(state_dir):
            os.kill(pid, signal.SIGTERM)
