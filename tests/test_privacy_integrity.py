"""A site's epsilon cannot be reset, tampered with, raced or silently bypassed (issue #11).

Each test is one way epsilon used to be under-reported: a deleted accountant state, an edited
plan, two processes on one state dir, a rebuilt ledger, DP without noise, a changed target,
bad numbers in a ledger line, and numbers the CLI must refuse as bad input.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest
import yaml

from clinfuse.cli import main
from clinfuse.config import load_config
from clinfuse.errors import InputError
from clinfuse.privacy.accountant import compute_epsilon
from clinfuse.privacy.ledger import entry_hash, read_ledger
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def manifest(federation_cohort) -> Path:
    return federation_cohort / "site-1" / "manifest.csv"


@pytest.fixture
def config(tmp_path) -> Path:
    return tiny_config(tmp_path)


def initial_state(cfg):
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything

    seed_everything(0)
    return {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}


def open_site(config: Path, manifest: Path, state: Path, cap: float = 100.0):
    from clinfuse.federation.site_runtime import SiteRuntime

    return SiteRuntime(load_config(config), manifest, site_id="site-x", state_dir=state, max_epsilon=cap)


def train(site, server_round: int, rounds: int = 4):
    return site.train_round(initial_state(site.cfg), server_round=server_round, rounds=rounds, local_epochs=1)


def one_accountant(plan, rounds_done: int, mechanism: str = "rdp") -> float:
    steps = plan.steps_per_epoch * rounds_done
    return compute_epsilon([(plan.noise_multiplier, plan.sample_rate, steps)], plan.delta, mechanism=mechanism)[0]


# --------------------------------------------------------------------------------------------
# 1. a deleted accountant state is refused, never a silent zero
# --------------------------------------------------------------------------------------------

def test_deleted_accountant_state_is_refused_and_recovered_only_explicitly(config, manifest, tmp_path, capsys):
    from clinfuse.site_check import FAIL, check_site

    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    train(site, 2)
    plan = site.plan(4, 1)
    (state / "accountant.json").unlink()

    with pytest.raises(InputError) as refused:
        train(open_site(config, manifest, state), 3)
    assert "accountant.json" in str(refused.value) and "clinfuse site recover" in str(refused.value)

    cap = {c.name: c for c in check_site(manifest, config, state_dir=state, max_epsilon=100.0,
                                         warm_cache=False)}["cap"]
    assert cap.status == FAIL and "accountant.json" in cap.message, cap.lines()

    assert main(["site", "recover", "--state-dir", str(state), "--config", str(config)]) == 0
    assert "rebuilt" in capsys.readouterr().out
    third = train(open_site(config, manifest, state), 3)
    assert third.metrics["epsilon"] == pytest.approx(one_accountant(plan, 3), rel=1e-9)


def test_an_older_accountant_state_is_refused(config, manifest, tmp_path):
    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    older = (state / "accountant.json").read_bytes()
    train(site, 2)
    (state / "accountant.json").write_bytes(older)  # a backup from one round ago
    with pytest.raises(InputError, match="disagrees with the ledger"):
        train(open_site(config, manifest, state), 3)


# --------------------------------------------------------------------------------------------
# 2. an edited plan.json is refused; the audit flags training off the signed plan
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("delta", 0.0065), ("noise_multiplier", 0.3)])
def test_edited_plan_is_refused(config, manifest, tmp_path, field, value):
    state = tmp_path / "state"
    train(open_site(config, manifest, state), 1)
    path = state / "plan.json"
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as refused:
        train(open_site(config, manifest, state), 2)
    assert "plan.json" in str(refused.value) and "signed" in str(refused.value)


def test_audit_flags_training_that_differs_from_the_signed_plan(config, manifest, tmp_path, capsys):
    from clinfuse.privacy.ledger import Ledger
    from clinfuse.privacy.site_key import SiteKey

    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    plan = site.plan(4, 1)
    key = SiteKey.load_or_create(state)
    mech = {**plan.mechanism(plan.steps_per_epoch, "flat", 1.0), "noise_multiplier": 0.3, "delta": 0.0065}
    Ledger(state / "ledger.jsonl", key=key).append(
        "dp-training", study=site.cfg.study, round=2, mechanism=mech, epsilon=50.0, site="site-x")
    code = main(["audit", "verify", str(state / "ledger.jsonl"), "--public-key", key.public_key])
    out = capsys.readouterr().out
    assert code == 1 and "off-plan" in out


# --------------------------------------------------------------------------------------------
# 3. two processes on one state dir: never a lost update
# --------------------------------------------------------------------------------------------

def _train_in_child(config, manifest, state, barrier, results):
    import torch

    torch.set_num_threads(1)
    try:
        site = open_site(Path(config), Path(manifest), Path(state))
        barrier.wait(120)
        result = train(site, 1)
        results.put(("trained", result.metrics["epsilon"]))
    except InputError as exc:
        results.put(("refused", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - report anything else to the parent
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def test_two_processes_on_one_state_dir_never_lose_steps(config, manifest, tmp_path):
    from clinfuse.privacy.accountant import SiteAccountant

    state = tmp_path / "state"
    plan = open_site(config, manifest, state).plan(4, 1)  # plan once, so both children only train
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_train_in_child, args=(str(config), str(manifest), str(state), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert not [o for o in outcomes if o[0] == "error"], outcomes
    trained = sum(o[0] == "trained" for o in outcomes)
    assert trained >= 1
    for status, message in outcomes:
        if status == "refused":
            assert "in use by another clinfuse process" in message
    steps = SiteAccountant(state / "accountant.json", mechanism="rdp").steps
    assert steps == trained * plan.steps_per_epoch  # every step that ran is counted


def test_state_lock_names_the_holder(tmp_path):
    from clinfuse.privacy.state_lock import StateLock, StateLockedError

    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    child.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StateLockedError) as locked, StateLock(tmp_path).hold():
            pass
        assert str(child.pid) in str(locked.value) and str(tmp_path) in str(locked.value)
    finally:
        release.set()
        child.join(60)
    with StateLock(tmp_path).hold():  # free again once the holder is gone
        pass


def _hold_lock(folder, ready, release):
    from clinfuse.privacy.state_lock import StateLock

    with StateLock(folder).hold():
        ready.set()
        release.wait(60)


# --------------------------------------------------------------------------------------------
# 4. a rebuilt chain does not verify without the site's key
# --------------------------------------------------------------------------------------------

def _rebuild_claiming_noise(path: Path, sigma: float) -> None:
    """What an attacker without the key can do: edit entries and recompute every hash."""
    entries, problems = read_ledger(path)
    assert not problems
    prev = "0" * 64
    lines = []
    for e in entries:
        e.pop("_line")
        if e["kind"] == "dp-training":
            e["mechanism"]["noise_multiplier"] = sigma
        e["prev_hash"] = prev
        e["hash"] = entry_hash(e)
        prev = e["hash"]
        lines.append(json.dumps(e, sort_keys=True, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n")


def test_rebuilt_chain_fails_signature_checks(config, manifest, tmp_path, capsys):
    from clinfuse.privacy.site_key import SiteKey

    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    public_key = SiteKey.load(state / "site-key.pem").public_key
    ledger = state / "ledger.jsonl"
    assert main(["audit", "verify", str(ledger), "--public-key", public_key]) == 0
    assert "authorship verified" in capsys.readouterr().out

    _rebuild_claiming_noise(ledger, 3.0)
    assert main(["audit", "verify", str(ledger), "--public-key", public_key]) == 1
    assert "bad-signature" in capsys.readouterr().out
    # Without a trusted key the report says plainly what was not checked.
    main(["audit", "verify", str(ledger)])
    assert "only the chain" in capsys.readouterr().out
    with pytest.raises(InputError, match="signature"):
        train(open_site(config, manifest, state), 2)


# --------------------------------------------------------------------------------------------
# 6. no DP without noise
# --------------------------------------------------------------------------------------------

def test_zero_noise_with_dp_on_is_refused(tmp_path, manifest, capsys):
    from clinfuse.site_check import FAIL, check_site

    config = tiny_config(tmp_path, noise_multiplier=0.0)
    with pytest.raises(InputError) as refused:
        load_config(config)
    assert "privacy.noise_multiplier" in str(refused.value) and "--no-dp" in str(refused.value)
    checks = {c.name: c for c in check_site(manifest, config, warm_cache=False)}
    assert checks["config"].status == FAIL
    assert main(["train", "--config", str(config), "--manifest", str(manifest), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert "--no-dp" in capsys.readouterr().err
    # Non-DP is the explicit switch, and then the key is simply not used.
    load_config(tiny_config(tmp_path, "plain.yaml", noise_multiplier=0.0, enabled=False))


def test_a_plan_without_noise_is_refused_at_plan_time(config):
    from clinfuse.privacy.plan import plan_privacy

    cfg = load_config(config)
    no_noise = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"noise_multiplier": 0.0})})
    with pytest.raises(InputError, match="infinite"):
        plan_privacy(no_noise, 30, 4)


# --------------------------------------------------------------------------------------------
# 7. a changed target is refused, or re-planned explicitly with a ledger entry
# --------------------------------------------------------------------------------------------

def test_changed_target_is_refused_then_replanned_explicitly(config, manifest, tmp_path, capsys):
    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    old = site.plan(4, 1)
    target = (old.epsilon_after_round(1) + old.target_epsilon) / 2  # lower, still above what one round spent
    lower = tiny_config(tmp_path, "lower.yaml", target_epsilon=target)
    with pytest.raises(InputError) as refused:
        train(open_site(lower, manifest, state), 2)
    message = str(refused.value)
    assert "target_epsilon" in message and "clinfuse site replan" in message

    assert main(["site", "replan", "--config", str(lower), "--manifest", str(manifest), "--state-dir",
                 str(state), "--rounds", "3", "--reason", "the privacy officer lowered the target"]) == 0
    capsys.readouterr()
    site = open_site(lower, manifest, state)
    new = site.plan(4, 1)
    assert new.target_epsilon == target and new.noise_multiplier > old.noise_multiplier
    entries, _ = read_ledger(state / "ledger.jsonl")
    replans = [e for e in entries if e["kind"] == "config" and e.get("replan")]
    assert len(replans) == 1 and replans[0]["reason"] == "the privacy officer lowered the target"
    second = train(site, 2)
    assert not second.declined and second.metrics["noise_multiplier"] == new.noise_multiplier


# --------------------------------------------------------------------------------------------
# 11. bad numbers in a ledger line: one clear line, exit 2
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_bare_non_finite_number_in_a_ledger_line(tmp_path, manifest, config, capsys, bad):
    from clinfuse.privacy.ledger import Ledger
    from clinfuse.privacy.site_key import SiteKey
    from clinfuse.site_check import FAIL, check_site

    state = tmp_path / "state"
    ledger = Ledger(state / "ledger.jsonl", key=SiteKey.load_or_create(state))
    ledger.append("config", study="s", max_epsilon=8.0, site="site-x")
    ledger.append("refusal", study="s", round=1, reason="test", site="site-x")
    lines = ledger.path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"round":1', f'"round":{bad}')
    ledger.path.write_text("".join(lines))

    assert main(["audit", "verify", str(ledger.path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "ledger.jsonl" in err[0] and "line 2" in err[0], captured
    assert "Traceback" not in captured.out + captured.err

    checks = {c.name: c for c in check_site(manifest, config, state_dir=state, max_epsilon=8.0,
                                            warm_cache=False)}
    assert checks["state dir"].status == FAIL
    assert "ledger.jsonl" in checks["state dir"].message and "line 2" in checks["state dir"].message


# --------------------------------------------------------------------------------------------
# 17. numbers the CLI refuses as bad input: exit 2, nothing left behind
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("privacy", [{"delta": 0.5}, {"target_epsilon": math.inf}])
def test_bad_privacy_numbers_exit_2_and_leave_no_output(tmp_path, manifest, capsys, privacy):
    config = tiny_config(tmp_path, **privacy)
    out = tmp_path / "out"
    code = main(["train", "--config", str(config), "--manifest", str(manifest), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error" in err[0], err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Accounting off the hot path (issue #12 item 6)
# --------------------------------------------------------------------------------------------

def test_plan_tabulates_epsilon_as_a_fresh_accountant_computes_it(tmp_path, manifest):
    config = tiny_config(tmp_path, accountant="prv")
    site = open_site(config, manifest, tmp_path / "state")
    plan = site.plan(3, 1)
    assert len(plan.epsilon_table) == 3
    for k, eps in enumerate(plan.epsilon_table, start=1):
        fresh = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_epoch * k)],
                                plan.delta, mechanism="prv")[0]
        assert eps == pytest.approx(fresh, abs=1e-6)
    assert plan.epsilon_table[-1] <= plan.target_epsilon


def test_rounds_read_the_table_and_fall_back_when_history_deviates(config, manifest, tmp_path, monkeypatch):
    import clinfuse.privacy.accountant as accountant_module

    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    plan = site.plan(4, 1)
    calls = []
    real = accountant_module.compute_epsilon

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(accountant_module, "compute_epsilon", counting)
    first = train(site, 1)
    assert calls == []  # budget check, reservation and reported epsilon all came from the table
    assert first.metrics["epsilon"] == pytest.approx(plan.epsilon_table[0], abs=1e-12)

    # A crash mid-round leaves pending steps: the history is off the plan, so epsilon is computed.
    site = open_site(config, manifest, state)
    site.accountant.reserve(plan.noise_multiplier, plan.sample_rate, 1)
    second = train(open_site(config, manifest, state), 2)
    assert calls, "a history off the plan must be computed by the accountant"
    truth = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, 2 * plan.steps_per_epoch + 1)],
                            plan.delta, mechanism="rdp")[0]
    assert second.metrics["epsilon"] == pytest.approx(truth, rel=1e-9)


# --------------------------------------------------------------------------------------------
# The coordinator's record: ledger heads in history.json, keys from a roster
# --------------------------------------------------------------------------------------------

def _history_with_heads(path: Path, heads: list[dict], public_key: str) -> Path:
    """A run directory's history.json as the coordinator writes it (the fields audit verify reads)."""
    rounds = [{"round": r, "sites": {"site-x": {"status": "trained", "ledger_head": head, "public_key": public_key}}}
              for r, head in enumerate(heads, start=1)]
    path.write_text(json.dumps({"format": "clinfuse-federated-history/1", "runs": [], "rounds": rounds}))
    return path


def test_audit_cross_checks_the_ledger_against_the_coordinators_heads(config, manifest, tmp_path, capsys):
    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    heads = []
    for r in (1, 2):
        train(site, r)
        heads.append(site.ledger_head())
    entries, _ = read_ledger(state / "ledger.jsonl")
    assert heads[-1] == {"seq": entries[-1]["seq"], "hash": entries[-1]["hash"]}
    history = _history_with_heads(tmp_path / "history.json", heads, site.key.public_key)
    ledger = state / "ledger.jsonl"

    assert main(["audit", "verify", str(ledger), "--history", str(history)]) == 0
    out = capsys.readouterr().out
    assert "coordinator" in out and "authorship verified" in out  # the key the coordinator recorded

    # Cutting the last round off leaves a valid, signed, shorter chain: only the coordinator's
    # record shows that entries are missing.
    kept = [line for line in ledger.read_text().splitlines(keepends=True)
            if json.loads(line)["seq"] <= heads[0]["seq"]]
    ledger.write_text("".join(kept))
    assert main(["audit", "verify", str(ledger)]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", str(ledger), "--history", str(history)]) == 1
    assert "coordinator-mismatch" in capsys.readouterr().out


def test_roster_keys_are_trusted_and_a_wrong_key_is_an_error(config, manifest, tmp_path, capsys):
    from clinfuse.privacy.site_key import SiteKey

    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    ledger = str(state / "ledger.jsonl")
    roster = tmp_path / "roster.yaml"
    roster.write_text(yaml.safe_dump({"sites": [{"site-id": "site-x", "fingerprint": site.key.fingerprint}]}))
    assert main(["audit", "verify", ledger, "--roster", str(roster)]) == 0
    assert "authorship verified" in capsys.readouterr().out

    other = SiteKey.create(tmp_path / "other.pem")
    assert main(["audit", "verify", ledger, "--public-key", f"site-x={other.public_key}"]) == 1
    assert "wrong-key" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Crash recovery, the site's plan as the audit shows it, the key command
# --------------------------------------------------------------------------------------------

def test_a_round_that_crashed_after_its_reservation_is_counted(config, manifest, tmp_path, capsys):
    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    plan = site.plan(4, 1)
    # What a crash leaves: the round's steps reserved in the ledger, never reported.
    site.ledger.append("reservation", study=site.cfg.study, round=2, site="site-x", delta=plan.delta,
                       mechanism=plan.mechanism(plan.steps_per_epoch, None, plan.max_grad_norm), epsilon=0.0)
    third = train(open_site(config, manifest, state), 3)
    assert third.metrics["epsilon"] == pytest.approx(one_accountant(plan, 3), rel=1e-9)
    entries, problems = read_ledger(state / "ledger.jsonl")
    assert not problems
    recovered = [e for e in entries if e.get("recovered")]
    assert len(recovered) == 1 and recovered[0]["round"] == 2
    assert main(["audit", "verify", str(state / "ledger.jsonl"), "--public-key", site.public_key]) == 0
    assert "recovered-steps" in capsys.readouterr().out


def test_audit_plan_shows_the_signed_plan_and_checks_its_table(config, manifest, tmp_path, capsys):
    state = tmp_path / "state"
    site = open_site(config, manifest, state)
    train(site, 1)
    assert main(["audit", "plan", "--state-dir", str(state), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["table_agrees"] and len(shown["table"]) == 4
    assert shown["spent_epsilon"] == pytest.approx(site.plan(4, 1).epsilon_after_round(1), abs=1e-12)
    assert main(["audit", "plan", "--state-dir", str(state)]) == 0
    assert "agrees with a fresh RDP accountant" in capsys.readouterr().out
    assert main(["audit", "plan", "--state-dir", str(state), "--steps", "3"]) == 2  # one or the other


def test_site_key_command_prints_what_the_roster_declares(tmp_path, capsys):
    from clinfuse.privacy.site_key import SiteKey

    assert main(["site", "key", "--state-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    key = SiteKey.load(tmp_path / "state" / "site-key.pem")
    assert key.fingerprint in out and key.public_key in out
    assert main(["site", "key", "--state-dir", str(tmp_path / "state")]) == 0  # the same key, not a new one
    assert key.public_key in capsys.readouterr().out
