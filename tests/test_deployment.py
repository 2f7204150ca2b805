"""The deployment engine: a SuperLink with TLS and SuperNode authentication, one SuperNode per site.

The end-to-end test (slow, run in CI) starts real ``flower-superlink`` / ``flower-supernode``
processes on free loopback ports and runs the clinfuse app with ``flwr run``; the fast tests
cover the pieces it is built from (credentials, config strings, stopping by PID).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.deploy import LocalDeployment, format_config, make_credentials, stop_process

REPO = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------------------------
# Pieces (fast)
# --------------------------------------------------------------------------------------------

def test_server_certificate_names_loopback_and_nodes_get_p384_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    commands: list[str] = []
    creds = make_credentials(tmp_path / "certs", ["site-0", "site-1"], record=commands)
    cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    for name in ("site-0", "site-1"):
        private = load_ssh_private_key(creds.node_keys[name].read_bytes(), password=None)
        public = load_ssh_public_key(creds.public_key(name).read_bytes())
        assert isinstance(private.curve, ec.SECP384R1)
        assert public.public_numbers() == private.public_key().public_numbers()
    assert oct(creds.server_key.stat().st_mode & 0o777) == "0o600"
    assert any(c.startswith("ssh-keygen -q -t ecdsa -b 384") for c in commands)


def test_node_names_must_be_plain_file_names(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        make_credentials(tmp_path, ["../escape"])


def test_config_strings_round_trip_through_flowers_parser():
    from flwr.common.config import parse_config_args

    values = {"manifest": "/data/site a/manifest.csv", "site-id": "hospital-a", "max-epsilon": 8.0,
              "rounds": 3, "resume": False, "path": r"C:\data\x"}
    assert parse_config_args([format_config(values)]) == values
    with pytest.raises(ValueError, match="double quote"):
        format_config({"x": 'say "hi"'})
    with pytest.raises(ValueError, match="without spaces"):
        format_config({"bad key": 1})


def test_stop_process_ends_the_process_and_what_it_left_in_its_group():
    # A parent that starts a long-lived child and ignores SIGTERM: both must be gone after stop.
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print(child.pid, flush=True); time.sleep(600)")
    popen = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    child = int(popen.stdout.readline())
    started = time.monotonic()
    stop_process(popen, grace_s=1.0)
    assert not alive(popen.pid) and not alive(child)
    assert time.monotonic() - started < 15


# --------------------------------------------------------------------------------------------
# The real thing (slow)
# --------------------------------------------------------------------------------------------

def small_study(demo_cfg, path: Path) -> Path:
    """The demo study, small enough for CI: 32x32 images, RDP accounting (fast planning)."""
    data = demo_cfg.model_dump(mode="json")
    data["data"]["image"]["size"] = [32, 32]
    data["train"]["batch_size"] = 16
    data["privacy"]["accountant"] = "rdp"
    path.write_text(yaml.safe_dump(data))
    return path


def two_sites(demo_cfg, tmp_path: Path) -> tuple[Path, dict]:
    """The small study and the node configs of two sites of a 30-patient demo cohort."""
    from clinfuse.data.synthetic import write_demo_cohort

    manifests = write_demo_cohort(tmp_path / "cohort", sites=2, patients=30)
    config = small_study(demo_cfg, tmp_path / "study.yaml")
    return config, {f"site-{k}": {"manifest": str(m), "site-id": f"site-{k}", "max-epsilon": 50.0,
                                  "state-dir": str(tmp_path / "state" / f"site-{k}"), "config": str(config)}
                    for k, m in enumerate(manifests)}


@pytest.mark.slow
def test_two_authenticated_sites_train_two_rounds_over_tls(demo_cfg, tmp_path):
    from clinfuse.config import load_config
    from clinfuse.privacy.ledger import read_entries
    from clinfuse.training.checkpoint import load_checkpoint, read_checkpoint

    config, sites = two_sites(demo_cfg, tmp_path)
    run_dir = tmp_path / "run"
    deployment = LocalDeployment(REPO, tmp_path / "deploy", sites)
    started = time.monotonic()
    pids: list[int] = []
    try:
        deployment.start()
        pids = [p.pid for p in deployment.processes]
        assert len(pids) == 3
        result = deployment.run({"config": str(config), "run-dir": str(run_dir), "num-rounds": 2,
                                 "local-epochs": 1}, timeout=600)
        # SuperNode authentication is enforced: a node with a key nobody registered is refused.
        intruder = deployment.add_supernode("intruder", {**sites["site-0"], "site-id": "intruder"}, register=False)
        pids.append(intruder.pid)
        intruder_status = intruder.popen.wait(timeout=180)
    finally:
        codes = deployment.stop()
        print("\n".join(deployment.commands))
        print(f"deployment test wall {time.monotonic() - started:.1f} s; exit codes {codes}")
    assert result.ok, result.status
    assert intruder_status != 0 and "Exit Code: 305" in intruder.tail(), intruder.tail()
    assert not [pid for pid in pids if alive(pid)], "every process started must be stopped"

    # What ran is the hardened configuration.
    superlink = next(c for c in deployment.commands if "flower-superlink" in c)
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in superlink
    assert "--insecure" not in " ".join(deployment.commands)
    assert sum("flwr supernode register" in c for c in deployment.commands) == 2

    # The coordinator's run directory: two rounds, a checkpoint each, the global model.
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert all(set(r["sites"]) == {"site-0", "site-1"} for r in history["rounds"])
    assert all(s["status"] == "trained" for r in history["rounds"] for s in r["sites"].values())
    final = run_dir / "checkpoints" / "round-0002.pt"
    _, model_cfg, meta = load_checkpoint(final)  # a loadable clinfuse checkpoint of this study
    assert model_cfg.digest() == load_config(config).digest()
    assert read_checkpoint(run_dir / "global.pt")["model_hash"] == meta["model_hash"]

    # Each site's ledger verifies and records DP training and a release for both rounds.
    for name, node in sites.items():
        entries = read_entries(Path(node["state-dir"]) / "ledger.jsonl")
        for kind in ("dp-training", "release"):
            rounds = {e.get("round") for e in entries if e["kind"] == kind}
            assert {1, 2} <= rounds, (name, kind, rounds)
        assert all(e.get("site") == name for e in entries if e["kind"] == "dp-training")


@pytest.mark.slow
def test_an_impostor_is_refused_and_a_killed_site_costs_one_wait(demo_cfg, tmp_path):
    """Issue #11, items 5 and 9, in the deployment engine (TLS, SuperNode authentication): a node
    that registered its own key and claims site-0 is refused by the roster; a SuperNode killed
    after round 1 costs each later round at most round-timeout, and the others go on."""
    import threading

    from clinfuse.privacy.site_key import SiteKey

    config, sites = two_sites(demo_cfg, tmp_path)
    run_dir = tmp_path / "run"
    roster = tmp_path / "roster.yaml"  # what each site's `clinfuse site key` printed
    roster.write_text(yaml.safe_dump({"sites": [
        {"site-id": name, "public-key": SiteKey.load_or_create(node["state-dir"]).public_key}
        for name, node in sites.items()]}))
    impostor = {**sites["site-0"], "state-dir": str(tmp_path / "state" / "impostor")}
    timeout = 90.0
    deployment = LocalDeployment(REPO, tmp_path / "deploy", {**sites, "impostor": impostor})
    outcome: dict = {}
    try:
        deployment.start()

        def run():
            try:
                outcome["result"] = deployment.run({"config": str(config), "run-dir": str(run_dir), "num-rounds": 3,
                                                    "local-epochs": 1, "min-sites": 1, "roster": str(roster),
                                                    "round-timeout": timeout}, timeout=900)
            except Exception as exc:  # noqa: BLE001 - reported by the assertions below
                outcome["error"] = exc

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 600
        while runner.is_alive() and time.monotonic() < deadline:
            history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").exists() else {}
            if history.get("rounds"):
                deployment.kill("site-1")
                break
            time.sleep(0.5)
        runner.join(timeout=900)
    finally:
        deployment.stop()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].ok

    doc = json.loads((run_dir / "history.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["aggregated"] for r in rounds)
    first = rounds[0]
    assert {s: v["status"] for s, v in first["sites"].items()} == {"site-0": "trained", "site-1": "trained"}
    assert [r["claimed_site_id"] for r in first["refused"]] == ["site-0"]
    assert "roster's key for 'site-0'" in first["refused"][0]["reason"]
    assert first["refused"][0]["node"] != first["sites"]["site-0"]["node"]
    assert first["sites"]["site-0"]["public_key"] == SiteKey.load_or_create(sites["site-0"]["state-dir"]).public_key
    assert all(r["refused"] == [] for r in rounds[1:])  # the impostor is asked nothing more
    assert "REFUSED" in outcome["result"].log and doc["runs"][-1]["summary"]["identity"]["verified"]
    # After the kill: site-1 fails (no reply, or Flower's "node unavailable"), site-0 trains on.
    later = rounds[1:]
    assert all(r["sites"]["site-0"]["status"] == "trained" for r in later)
    assert any(r["sites"].get("site-1", {}).get("status") == "failed" for r in later)
    for r in later:
        assert r["train_wall_s"] <= timeout + 20 and r["eval_wall_s"] <= timeout + 20, r
    print("round walls:", [round(r["round_wall_s"], 1) for r in rounds])
