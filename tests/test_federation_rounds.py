"""The ServerApp round loop and the ClientApp together, in-process (no Ray): budget, failures,
resume, client-level DP, and an inspection of every message the sites send.

``LocalGrid`` is a Flower ``Grid`` that delivers each message to the ClientApp in this process,
serialising it to Flower's wire format (protobuf) and back in both directions, so the replies
inspected here are exactly what a SuperNode would put on the network.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clinfuse.config import load_config
from clinfuse.privacy.accountant import compute_epsilon

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parent.parent


class LocalGrid(Grid):
    """Delivers messages in-process to ``client_app``; node ``1000 + k`` is partition ``k``.

    ``extra_nodes``: node id -> node config of more nodes (e.g. a deployment-style node claiming a
    site). ``dead``: node ids that never reply (a killed SuperNode); ``unavailable``: node ids the
    SuperLink answers for, as Flower does once a node missed its heartbeats (an error from the
    SuperLink's own node id, 1). ``simulated``: the sites are
    simulated (as in Flower's in-memory grid), so the run config may change their study.
    """

    simulated = True

    def __init__(self, client_app, num_sites: int, run_id: int = 4242, *, extra_nodes: dict | None = None,
                 dead=(), unavailable=()):
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        configs = {1000 + k: {"partition-id": k, "num-partitions": num_sites} for k in range(num_sites)}
        configs.update(extra_nodes or {})
        self.contexts = {node: Context(run_id=run_id, node_id=node, node_config=config, state=RecordDict(),
                                       run_config={}) for node, config in configs.items()}
        self.dead, self.unavailable = set(dead), set(unavailable)
        self.timeouts: list = []
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    @property
    def run(self) -> Run:
        return self._run

    def set_run(self, run) -> None:
        self._run = run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    @staticmethod
    def wire(msg: Message) -> Message:
        return message_from_proto(message_to_proto(msg))

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            delivered = self.wire(msg)
            self.sent.append(delivered)
            if msg.metadata.dst_node_id in self.dead:
                continue
            if msg.metadata.dst_node_id in self.unavailable:
                reply = Message(Error(code=0, reason="Error: Node Unavailable"), reply_to=delivered)
                reply.metadata.__dict__["_src_node_id"] = 1
                out.append(self.wire(reply))
                continue
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - what Flower's runtime does with a ClientApp error
                reply = Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=delivered)
            reply = self.wire(reply)
            self.replies.append(reply)
            out.append(reply)
        return out


def tiny_config(folder: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["data"]["image"]["size"] = [32, 32]
    data["data"]["text"]["max_tokens"] = 37  # no model parameter has this length
    data["train"]["batch_size"] = 8
    data["model"]["dim"] = 24  # no weight matrix shaped like a 32x32 image
    data["privacy"]["accountant"] = "rdp"
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def cohort(federation_cohort):
    return federation_cohort


def crash_mod(partition: int, rounds: set[int]):
    """A site that dies while training in ``rounds`` (the ClientApp raises, as a killed process would)."""

    def mod(msg, ctx, call_next):
        config = msg.content["config"] if "config" in msg.content.config_records else {}
        if (ctx.node_config.get("partition-id") == partition and config.get("server-round") in rounds
                and msg.metadata.message_type == "train"):
            raise RuntimeError("simulated crash of the site's ClientApp")
        return call_next(msg, ctx)

    return mod


def run_rounds(run_config: dict, num_sites: int, mods=(), **grid_options):
    from federated.client_app import make_client_app
    from federated.rounds import run_study

    grid = LocalGrid(make_client_app(run_config, mods=list(mods)), num_sites, **grid_options)
    summary = run_study(grid, {"expected-sites": num_sites, "wait-seconds": 1, **run_config})
    return summary, grid


def base_config(tmp_path, cohort, **extra) -> dict:
    return {"config": str(tiny_config(tmp_path)), "workdir": str(tmp_path / "work"), "cohort": str(cohort),
            "min-sites": 2, "max-epsilon": 100.0, **extra}


def site_epsilon_after(cfg_path, manifest, rounds_done, rounds, state_dir):
    """What one accountant over all the steps of ``rounds_done`` rounds reports."""
    from clinfuse.federation.site_runtime import SiteRuntime

    site = SiteRuntime(load_config(cfg_path), manifest, site_id="probe", state_dir=state_dir, max_epsilon=100)
    plan = site.plan(rounds, 1)
    steps = plan.steps_per_epoch * rounds_done
    return compute_epsilon([(plan.noise_multiplier, plan.sample_rate, steps)], plan.delta, mechanism="rdp")[0]


# --------------------------------------------------------------------------------------------
# What leaves a site
# --------------------------------------------------------------------------------------------

METRIC_KEYS = re.compile(r"^(num-examples|declined|(process|worker-start|import|manifest|privacy|accountant|data|model|train|ledger|evaluate|handler)-seconds|examples-(image|text|tabular)"
                         r"|train-loss|epsilon|delta|max-epsilon|noise-multiplier|val-loss|val-auroc"
                         r"|val-aux-auroc-(image|text|tabular)|val-single-class|loss-at-chance|collapsed|val-predicted-classes)$")


def note_sentences(cohort: Path) -> list[str]:
    sentences = set()
    for note in cohort.rglob("notes/*.txt"):
        sentences.update(s.strip() for s in note.read_text().split(".") if len(s.strip()) > 12)
    return sorted(sentences)


def check_reply(reply: Message, model_shapes: dict, cfg, sentences: list[str]) -> None:
    """Only weights (exactly the model's), counts and metrics, a site name and a decline reason."""
    H, W = cfg.data.image.size
    input_shapes = {(1, H, W), (H, W), (cfg.data.text.max_tokens,)}
    if reply.has_error():
        text = reply.error.reason
        assert "failed with" in text or "simulated crash" in text, text
    else:
        content = reply.content
        # val: a train reply's evaluation of the model it received (folded evaluation)
        assert set(content.keys()) <= {"arrays", "metrics", "site", "val"}, set(content.keys())
        if "arrays" in content.array_records:
            arrays = content["arrays"]
            assert list(arrays.keys()) == list(model_shapes)  # the model's state dict, nothing more
            for name, array in arrays.items():
                assert tuple(array.shape) == model_shapes[name], name
                assert tuple(array.shape) not in input_shapes, name
                assert array.dtype in ("float32", "float64", "int64"), (name, array.dtype)
        for record in ("metrics", "val"):
            for key, value in (content[record].items() if record in content.metric_records else ()):
                assert METRIC_KEYS.match(key), key
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        site = dict(content["site"])
        assert {"site-id", "public-key", "signature"} <= set(site) <= {
            "site-id", "reason", "public-key", "ledger-seq", "ledger-hash", "signature"}
        assert re.fullmatch(r"site-\d+", site["site-id"])
        if "reason" in site:
            assert re.fullmatch(r"round \d+ would raise epsilon from [\d.]+ to [\d.]+, past this site's cap "
                                r"[\d.e+-]+; declining", site["reason"]), site["reason"]
        text = " ".join(str(v) for v in site.values())
    assert not any(sentence in text for sentence in sentences)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_budget_failure_and_every_message_a_site_sends(tmp_path, cohort):
    from clinfuse.training.checkpoint import build_model_for, load_checkpoint

    cfg_path = tiny_config(tmp_path)
    manifest0 = cohort / "site-0" / "manifest.csv"
    eps2 = site_epsilon_after(cfg_path, manifest0, 2, 4, tmp_path / "probe")
    eps3 = site_epsilon_after(cfg_path, manifest0, 3, 4, tmp_path / "probe")
    cap = (eps2 + eps3) / 2  # site-0's officer allows 2 of the 4 rounds
    run_config = base_config(tmp_path, cohort, **{"num-rounds": 4, "max-epsilon-0": cap})
    summary, grid = run_rounds(run_config, 3, mods=[crash_mod(2, {2})])

    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"]
    status = {s: [r["sites"][s]["status"] for r in history] for s in ("site-0", "site-1")}
    assert status["site-0"] == ["trained", "trained", "declined", "declined"]
    assert status["site-1"] == ["trained"] * 4
    assert [r["sites"]["site-2"]["status"] for r in history] == ["trained", "failed", "trained", "trained"]
    assert history[1]["sites"]["site-2"]["val"]["num-examples"] > 0  # it evaluated after its crash
    assert all(r["aggregated"] for r in history)  # the round completes with the others
    assert "past this site's cap" in history[2]["sites"]["site-0"]["reason"]
    eps0 = [r["sites"]["site-0"]["epsilon"] for r in history]
    assert max(eps0) <= cap and eps0[3] == pytest.approx(eps2)
    assert [p.name for p in sorted((Path(summary["run_dir"]) / "checkpoints").iterdir())] == [
        f"round-{r:04d}.pt" for r in range(1, 5)]
    _, _, meta = load_checkpoint(summary["global_checkpoint"])
    assert meta["federation"]["round"] == 4 and meta["epsilon"] == pytest.approx(max(summary["epsilon"].values()))
    assert history[-1]["val"].get("val-auroc") is not None

    cfg = load_config(cfg_path)
    shapes = {k: tuple(v.shape) for k, v in build_model_for(cfg).state_dict().items()}
    sentences = note_sentences(cohort)
    # a train exchange per round (from round 2 on carrying the last round's evaluation), then the
    # last round's evaluation
    assert sentences and len(grid.replies) == 4 * 3 + 3
    for reply in grid.replies:
        check_reply(reply, shapes, cfg, sentences)


def test_server_restart_with_resume_continues_model_and_epsilon(tmp_path, cohort):
    from clinfuse.federation.rundir import RunDir
    from clinfuse.training.checkpoint import build_model_for

    run_config = base_config(tmp_path, cohort, **{"num-rounds": 3, "min-sites": 1})
    first, _ = run_rounds({**run_config, "stop-after-round": 1}, 2)
    assert first["rounds"] == 1
    after_one = RunDir(first["run_dir"]).last()

    resumed, grid = run_rounds({**run_config, "resume": True}, 2)
    assert resumed["rounds"] == 3
    train_sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {m.content["config"]["server-round"] for m in train_sent} == {2, 3}
    round2 = train_sent[0].content["arrays"]
    assert all(np.array_equal(round2[k].numpy(), after_one.state[k]) for k in after_one.state)

    cfg = load_config(tiny_config(tmp_path))
    shapes = {k: tuple(v.shape) for k, v in build_model_for(cfg).state_dict().items()}
    assert len(grid.replies) == 2 * 2 + 2  # rounds 2 and 3 (3 carrying 2's evaluation), then 3's
    for reply in grid.replies:  # everything the sites sent after the restart
        check_reply(reply, shapes, cfg, note_sentences(cohort))

    doc = RunDir(first["run_dir"]).document()
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert [r["resumed"] for r in doc["runs"]] == [False, True]
    for k in range(2):
        expected = site_epsilon_after(tiny_config(tmp_path), cohort / f"site-{k}" / "manifest.csv", 3, 3,
                                      tmp_path / f"probe{k}")
        assert resumed["epsilon"][f"site-{k}"] == pytest.approx(expected, rel=1e-9)
        assert doc["rounds"][0]["sites"][f"site-{k}"]["epsilon"] < resumed["epsilon"][f"site-{k}"]


def test_without_accept_failures_a_failed_site_stops_the_run(tmp_path, cohort):
    from federated.rounds import StudyStopped

    run_config = base_config(tmp_path, cohort, **{"num-rounds": 2, "accept-failures": False})
    with pytest.raises(StudyStopped, match="accept-failures"):
        run_rounds(run_config, 2, mods=[crash_mod(1, {1})])


def test_client_level_dp_clips_updates_and_reports_flowers_epsilon(tmp_path, cohort):
    clip = 0.05
    run_config = base_config(tmp_path, cohort, **{"num-rounds": 2, "client-dp": True, "client-dp-noise": 0.3,
                                                  "client-dp-clip": clip})
    summary, grid = run_rounds(run_config, 2)
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"]
    eps = [r["client_dp_epsilon"] for r in history]
    assert 0 < eps[0] < eps[1] and summary["client_dp_epsilon"] == pytest.approx(eps[1])
    sent = {m.metadata.message_id: m for m in grid.sent if m.metadata.message_type == "train"}
    trained = [r for r in grid.replies if not r.has_error() and "arrays" in r.content.array_records]
    assert trained
    for reply in trained:
        original = sent[reply.metadata.reply_to_message_id].content["arrays"]
        norm = np.sqrt(sum(float(np.sum((reply.content["arrays"][k].numpy().astype(np.float64)
                                         - original[k].numpy()) ** 2)) for k in original))
        assert norm <= clip * (1 + 1e-4)


# --------------------------------------------------------------------------------------------
# Site identity, lost sites, failed studies (issue #11 items 5, 9, 10)
# --------------------------------------------------------------------------------------------

def write_roster(path: Path, state_dirs: dict[str, Path]) -> Path:
    """The study's roster: each site's public key, as `clinfuse site key` prints it."""
    from clinfuse.privacy.site_key import SiteKey

    sites = [{"site-id": name, "public-key": SiteKey.load_or_create(d).public_key} for name, d in state_dirs.items()]
    path.write_text(yaml.safe_dump({"sites": sites}))
    return path


def ledger_has(state_dir: Path, head: dict) -> dict:
    from clinfuse.privacy.ledger import read_entries

    entry = next(e for e in read_entries(state_dir / "ledger.jsonl") if e["seq"] == head["seq"])
    assert entry["hash"] == head["hash"]
    return entry


@pytest.mark.parametrize("secagg", [False, True], ids=["message-api", "secagg"])
def test_an_impostor_claiming_a_roster_site_is_refused_on_both_paths(tmp_path, cohort, secagg):
    """One loop for both executors: the same identity check, history and ledger heads."""
    from clinfuse.privacy.site_key import SiteKey

    run_config = base_config(tmp_path, cohort, **{"num-rounds": 1, "secagg": secagg})
    sites = {f"site-{k}": tmp_path / "work" / "sites" / f"site-{k}" for k in range(3)}
    run_config["roster"] = str(write_roster(tmp_path / "roster.yaml", sites))
    impostor = {"manifest": str(cohort / "site-0" / "manifest.csv"), "site-id": "site-0",
                "state-dir": str(tmp_path / "impostor"), "max-epsilon": 100.0, "config": run_config["config"]}
    summary, grid = run_rounds(run_config, 3, extra_nodes={2000: impostor})

    doc = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    record = doc["rounds"][0]
    assert record["aggregated"] and record.get("secagg", False) == secagg
    assert set(record["sites"]) == set(sites) and record["unidentified"] == []
    assert record["sites"]["site-0"]["node"] == 1000  # the real site-0, not the impostor
    assert [(r["node"], r["claimed_site_id"]) for r in record["refused"]] == [(2000, "site-0")]
    assert "the roster's key for 'site-0'" in record["refused"][0]["reason"]
    assert record["refused"][0]["public_key"] == SiteKey.load_or_create(tmp_path / "impostor").public_key
    assert doc["runs"][-1]["summary"]["identity"]["verified"] is True
    for name, state_dir in sites.items():
        site = record["sites"][name]
        assert site["status"] == "trained"
        assert site["public_key"] == SiteKey.load_or_create(state_dir).public_key
        assert ledger_has(state_dir, site["ledger_head"])["kind"] == "release"
        assert ledger_has(state_dir, site["val"]["ledger_head"])["kind_detail"] == "evaluation"
    # The impostor is asked nothing after its refusal.
    to_impostor = [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == 2000]
    assert to_impostor == (["evaluate"] if secagg else ["train"])


@pytest.mark.parametrize("lost", ["dead", "unavailable"])
def test_a_lost_site_costs_one_timeout_and_the_round_completes_with_the_others(tmp_path, cohort, lost):
    run_config = base_config(tmp_path, cohort, **{"num-rounds": 2, "round-timeout": 7.5})
    summary, grid = run_rounds(run_config, 3, **{lost: {1002}})
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"]
    assert [r["aggregated"] for r in history] == [True, True]
    reason = ("no reply within round-timeout (7.5 s): site down or too slow" if lost == "dead"
              else "Error: Node Unavailable")
    for record in history:
        assert {s: v["status"] for s, v in record["sites"].items()} == {"site-0": "trained", "site-1": "trained"}
        assert record["unidentified"] == [{"node": 1002, "phase": phase, "status": "failed", "reason": reason}
                                          for phase in ("train", "evaluate")]
    assert set(grid.timeouts) == {7.5}  # every exchange waits at most round-timeout
    assert {m.metadata.ttl for m in grid.sent} == {7.5}  # and its messages expire then


def test_fewer_trained_sites_than_min_sites_stop_the_study_clearly(tmp_path, cohort):
    from federated.rounds import StudyStopped

    run_config = base_config(tmp_path, cohort, **{"num-rounds": 3, "min-sites": 2})
    with pytest.raises(StudyStopped, match=r"round 2: 1 site\(s\) trained, fewer than min-sites=2 \(1 failed\)"
                                           r".*global model is round 1's") as stopped:
        run_rounds(run_config, 2, mods=[crash_mod(1, {2})])
    doc = json.loads((Path(stopped.value.summary["run_dir"]) / "history.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1]  # round 2 aggregated nothing: no checkpoint
    assert sorted(p.name for p in (Path(stopped.value.summary["run_dir"]) / "checkpoints").iterdir()) == [
        "round-0001.pt"]
    record = doc["runs"][-1]["summary"]["stopped"]["record"]
    assert record["sites"]["site-1"]["status"] == "failed" and record["sites"]["site-0"]["status"] == "trained"
    assert stopped.value.summary["epsilon"]["site-0"] == record["sites"]["site-0"]["epsilon"]


def crash_everywhere_mod(partitions: set[int]):
    """Sites whose ClientApp dies on every message (train and evaluate)."""

    def mod(msg, ctx, call_next):
        if ctx.node_config.get("partition-id") in partitions:
            raise RuntimeError("simulated crash of the site's ClientApp")
        return call_next(msg, ctx)

    return mod


def test_a_study_where_every_site_failed_writes_no_global_checkpoint(tmp_path, cohort):
    from federated.rounds import StudyStopped

    run_config = base_config(tmp_path, cohort, **{"num-rounds": 2, "min-sites": 1})
    with pytest.raises(StudyStopped, match=r"round 1: 0 site\(s\) trained.*no global checkpoint was written"):
        run_rounds(run_config, 2, mods=[crash_everywhere_mod({0, 1})])
    run_dir = tmp_path / "work" / "run"
    assert not (run_dir / "global.pt").exists() and not (run_dir / "checkpoints").exists()
    doc = json.loads((run_dir / "history.json").read_text())
    assert doc["rounds"] == [] and doc["runs"][-1]["summary"]["global_checkpoint"] is None
    # Nodes that never said which site they are: by node id, apart from the sites.
    record = doc["runs"][-1]["summary"]["stopped"]["record"]
    assert record["sites"] == {} and [u["node"] for u in record["unidentified"]] == [1000, 1001]


def test_history_names_sites_by_site_id_only(tmp_path, cohort):
    run_config = base_config(tmp_path, cohort, **{"num-rounds": 1, "min-sites": 1})
    summary, _ = run_rounds(run_config, 2, mods=[crash_everywhere_mod({1})])
    record = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"][0]
    assert list(record["sites"]) == ["site-0"]
    assert [(u["node"], u["phase"]) for u in record["unidentified"]] == [(1001, "train"), (1001, "evaluate")]


def test_named_sites_without_dp_and_a_seed_that_fixes_the_initial_model(tmp_path, cohort):
    """What `clinfuse federate --site-id ... --no-dp --seed S` hands the loop."""
    from clinfuse.privacy.ledger import read_entries

    def first_model(seed, name):
        (tmp_path / name).mkdir()
        run_config = base_config(tmp_path / name, cohort, **{"num-rounds": 1, "dp": False, "seed": seed,
                                                             "site-id-0": "hospital-a", "site-id-1": "hospital-b"})
        summary, grid = run_rounds(run_config, 2)
        record = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"][0]
        assert set(record["sites"]) == {"hospital-a", "hospital-b"}
        assert all("epsilon" not in s for s in record["sites"].values())
        kinds = {e["kind"] for e in read_entries(tmp_path / name / "work" / "sites" / "hospital-a" / "ledger.jsonl")}
        assert "dp-training" not in kinds and "release" in kinds
        return {k: a.numpy() for k, a in grid.sent[0].content["arrays"].items()}

    a, b, c = first_model(7, "a"), first_model(7, "b"), first_model(8, "c")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Exchanges: polling, and the evaluation folded into the next train message
# --------------------------------------------------------------------------------------------

class PolledGrid(LocalGrid):
    """A deployment-like grid (not simulated): replies appear ``delay`` seconds after the push
    and are collected with ``pull_messages``, as from a SuperLink."""

    simulated = False

    def __init__(self, *args, delay: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay, self.ready, self.pulls = delay, [], 0

    def push_messages(self, messages):
        import time

        ids = []
        for reply in self.send_and_receive(list(messages)):
            self.ready.append((time.monotonic() + self.delay, reply))
        for msg in self.sent[-len(messages):]:
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        import time

        self.pulls += 1
        now, wanted = time.monotonic(), set(message_ids)
        out = [r for t, r in self.ready if t <= now and r.metadata.reply_to_message_id in wanted]
        self.ready = [(t, r) for t, r in self.ready if r not in out]
        return out


def test_exchange_collects_replies_soon_after_they_arrive_and_stops_at_the_timeout(tmp_path, cohort):
    import time

    from flwr.app import ConfigRecord

    from federated.rounds import exchange

    content = RecordDict({"config": ConfigRecord({})})
    # Sites that answer at once, without work: what is timed is the polling.
    grid = PolledGrid(lambda msg, ctx: Message(RecordDict(), reply_to=msg), 2, delay=0.3, dead={1001})
    sent = [Message(content, 1000 + k, "query", ttl=5.0) for k in range(2)]
    started = time.monotonic()
    replies = exchange(grid, sent, timeout=1.5)
    took = time.monotonic() - started
    assert [int(r.metadata.src_node_id) for r in replies] == [1000]  # 1001 never answers
    assert 1.5 <= took < 2.0  # waited for the dead node until the timeout, not longer

    grid = PolledGrid(lambda msg, ctx: Message(RecordDict(), reply_to=msg), 2, delay=0.3)
    started = time.monotonic()
    replies = exchange(grid, [Message(content, 1000 + k, "query", ttl=5.0) for k in range(2)], timeout=30)
    took = time.monotonic() - started
    assert len(replies) == 2 and 0.3 <= took < 0.6, took  # Flower's own loop would take 3 s here


def test_folded_evaluation_records_the_same_metrics_as_an_evaluate_exchange(tmp_path, cohort):
    """Round 1 is evaluated inside round 2's train exchange, round 2 (the last) in an exchange of
    its own: both records hold the same metric keys, per site and averaged (timings apart: an
    exchange of its own also times opening the site)."""

    def keys(metrics):
        return {k for k in metrics if not k.endswith("-seconds")}

    summary, grid = run_rounds(base_config(tmp_path, cohort, **{"num-rounds": 2}), 3)
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["rounds"]
    folded, separate = history
    assert folded["evaluated_in_round"] == 2 and "evaluated_in_round" not in separate
    assert keys(folded["val"]) == keys(separate["val"]) and "val-auroc" in folded["val"]
    for name in ("site-0", "site-1", "site-2"):
        assert keys(folded["sites"][name]["val"]) == keys(separate["sites"][name]["val"])
        assert folded["sites"][name]["val"]["num-examples"] == separate["sites"][name]["val"]["num-examples"] > 0
    types = [m.metadata.message_type for m in grid.sent]
    assert types.count("train") == 6 and types.count("evaluate") == 3
    round2 = [m for m in grid.sent if m.metadata.message_type == "train" and m.content["config"]["server-round"] == 2]
    assert all(m.content["config"]["evaluate-round"] == 1 for m in round2)
    assert summary["final_val"] == separate["val"]


def test_a_removed_or_altered_folded_evaluation_does_not_verify(tmp_path, cohort):
    from flwr.app import MetricRecord

    from clinfuse.federation.protocol import VAL, read_claim

    _, grid = run_rounds(base_config(tmp_path, cohort, **{"num-rounds": 2}), 2)
    reply = next(r for r in grid.replies if VAL in r.content.metric_records)
    rnd, run_id = 2, "4242"
    assert read_claim(reply, server_round=rnd, run_id=run_id).signed
    altered = LocalGrid.wire(reply)
    altered.content[VAL] = MetricRecord({**dict(reply.content[VAL]), "val-auroc": 0.99})
    assert not read_claim(altered, server_round=rnd, run_id=run_id).signed
    removed = LocalGrid.wire(reply)
    del removed.content[VAL]
    assert not read_claim(removed, server_round=rnd, run_id=run_id).signed
