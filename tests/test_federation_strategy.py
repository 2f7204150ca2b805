"""Strategies on hand-made replies: modality-aware averaging, declines and failures filtered,
FedAdam state for resume, client-level DP substitution, evaluation averaging."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clinfuse.errors import InputError
from federated.strategy import (
    ClientDP,
    SitesUnavailable,
    build_strategy,
    client_dp_replies,
    export_state,
    restore_state,
    weighted_means,
)

GROUPS = {"image": ["img.w"], "text": ["txt.w"], "tabular": ["tab.w"], "fusion": ["head.w"]}
NODES = (11, 12, 13)


class NodesOnly:
    """All a strategy's configure_* needs from a Grid."""

    def get_node_ids(self):
        return list(NODES)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0


def arrays(value: float) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(3, value, dtype=np.float32)) for k in ("img.w", "txt.w", "tab.w", "head.w")})


def trained(msg, site, value, n, image, text, tabular):
    content = RecordDict({"arrays": arrays(value), "metrics": MetricRecord({
        "num-examples": n, "declined": 0, "examples-image": image, "examples-text": text,
        "examples-tabular": tabular, "train-loss": value}), "site": ConfigRecord({"site-id": site})})
    return Message(content, reply_to=msg)


def declined(msg, site):
    content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "declined": 1, "epsilon": 3.0}),
                          "site": ConfigRecord({"site-id": site, "reason": "over the cap"})})
    return Message(content, reply_to=msg)


def send(strategy, value=0.0, server_round=1):
    messages = list(strategy.configure_train(server_round, arrays(value), ConfigRecord({}), NodesOnly()))
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"m{server_round}-{i}"
    return messages


def test_modality_aware_average_ignores_declines_failures_and_sites_without_a_modality():
    strategy = build_strategy("fedavg", groups=GROUPS, min_sites=2)
    sent = send(strategy, value=0.0)
    assert [m.metadata.dst_node_id for m in sent] == list(NODES)  # every site, every round
    replies = [trained(sent[0], "a", 1.0, 10, image=10, text=10, tabular=10),
               trained(sent[1], "b", 4.0, 30, image=30, text=0, tabular=30),  # no notes
               declined(sent[2], "c")]
    error = Message(Error(code=2, reason="boom"), reply_to=sent[2])
    new, metrics = strategy.aggregate_train(1, replies[:2] + [replies[2], error])
    got = {k: float(a.numpy()[0]) for k, a in new.items()}
    assert got["txt.w"] == pytest.approx(1.0)  # only site a trained the text encoder
    assert got["img.w"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert got["head.w"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert metrics["train-loss"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)

    plain = build_strategy("fedavg", groups=GROUPS, modality_aware=False, min_sites=2)
    sent = send(plain)
    new, _ = plain.aggregate_train(1, [trained(sent[0], "a", 1.0, 10, 10, 10, 10),
                                       trained(sent[1], "b", 4.0, 30, 30, 0, 30)])
    assert float(new["txt.w"].numpy()[0]) == pytest.approx(3.25)  # FedAvg drags text towards b's copy


def test_fedadam_and_fedprox_wrap_the_modality_aware_average_and_fedadam_resumes():
    prox = build_strategy("fedprox", groups=GROUPS, proximal_mu=0.5, min_sites=1)
    sent = send(prox)
    assert sent[0].content["config"]["proximal-mu"] == 0.5

    adam = build_strategy("fedadam", groups=GROUPS, server_lr=0.1, min_sites=1)
    sent = send(adam, value=0.0)
    new, _ = adam.aggregate_train(1, [trained(sent[0], "a", 1.0, 10, 10, 0, 10)])
    moved = {k: float(a.numpy()[0]) for k, a in new.items()}
    assert 0 < moved["img.w"] < 1.0  # a server-side Adam step towards the sites' average
    assert moved["txt.w"] == pytest.approx(0.0)  # no site trained text: no update, no moment
    state = export_state(adam)
    assert set(state) == {"m_t", "v_t"}

    resumed = build_strategy("fedadam", groups=GROUPS, server_lr=0.1, min_sites=1)
    restore_state(resumed, state)
    sent_a, sent_b = send(adam, value=0.5, server_round=2), send(resumed, value=0.5, server_round=2)
    a, _ = adam.aggregate_train(2, [trained(sent_a[0], "a", 1.0, 10, 10, 0, 10)])
    b, _ = resumed.aggregate_train(2, [trained(sent_b[0], "a", 1.0, 10, 10, 0, 10)])
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_client_level_dp_counts_declines_as_zero_updates_and_accounts_each_release():
    dp = ClientDP(noise_multiplier=1.0, clipping_norm=0.5)
    strategy = build_strategy("fedavg", groups=GROUPS, min_sites=2, expected_sites=3, client_dp=dp)
    sent = send(strategy, value=0.0)
    assert all(m.content["config"]["clipping_norm"] == 0.5 for m in sent)
    from federated.rounds import SiteReply

    replies = [trained(sent[0], "a", 0.1, 10, 10, 10, 10), trained(sent[1], "b", 0.1, 99, 99, 0, 99),
               declined(sent[2], "c")]
    site_replies = [SiteReply(node, site, status, message=reply) for node, site, status, reply in
                    zip(NODES, "abc", ("trained", "trained", "declined"), replies)]
    usable = client_dp_replies(site_replies, sent, arrays(0.0))
    assert len(usable) == 3 and all(dict(m.content["metrics"]) == {"client-dp-weight": 1.0} for m in usable)
    new, _ = strategy.aggregate_train(1, usable)
    assert new is not None
    first = strategy.privacy_spent().epsilon
    state = export_state(strategy)
    again = build_strategy("fedavg", groups=GROUPS, min_sites=2, expected_sites=3, client_dp=dp)
    restore_state(again, state)
    assert again.privacy_spent().epsilon == pytest.approx(first) and first > 0
    with pytest.raises(InputError, match="fedavg or fedprox"):
        build_strategy("fedadam", groups=GROUPS, client_dp=dp)


def test_evaluation_metrics_are_averaged_per_key_over_the_sites_reporting_them():
    rows = [{"num-examples": 10, "val-auroc": 0.8, "val-loss": 0.5},
            {"num-examples": 30, "val-loss": 0.7},  # one class only: no AUROC
            {"num-examples": 0, "val-auroc": 0.1}]  # no validation rows: no weight
    means = weighted_means(rows)
    assert means == {"val-auroc": pytest.approx(0.8), "val-loss": pytest.approx(0.65)}


def test_sites_are_awaited_before_the_first_round_only():
    class Joining:
        def __init__(self):
            self.calls = 0

        def get_node_ids(self):
            self.calls += 1
            return list(NODES[:2]) if self.calls < 3 else list(NODES)  # the third site joins late

    strategy = build_strategy("fedavg", groups=GROUPS, min_sites=2, expected_sites=3, wait_s=30)
    grid = Joining()
    assert strategy.connected_sites(grid) == list(NODES)  # waited for the third

    class OneDied:
        def get_node_ids(self):
            return list(NODES[:2])

    started = time.monotonic()
    assert strategy.connected_sites(OneDied()) == list(NODES[:2])  # not waited for again
    assert time.monotonic() - started < 1.0
    lonely = build_strategy("fedavg", groups=GROUPS, min_sites=3, wait_s=0.1)
    with pytest.raises(SitesUnavailable):
        lonely.connected_sites(OneDied())


def test_fedavgm_weights_sites_by_patients_and_carries_momentum_across_rounds_and_resume():
    """The server under DP noise (docs/benchmarks/aggregation.md): each site's weights count by its
    patients, so a 30-patient site (the noisiest) moves the model a tenth as much as a 300-patient
    one; server momentum adds the previous rounds' steps (Flower's FedAvgM formulas)."""
    lr, beta = 1.0, 0.9
    strategy = build_strategy("fedavgm", groups=GROUPS, modality_aware=False, server_lr=lr, server_momentum=beta,
                              min_sites=2)
    sent = send(strategy, value=0.0)
    new, _ = strategy.aggregate_train(1, [trained(sent[0], "small", 4.0, 30, 30, 30, 30),
                                          trained(sent[1], "large", 1.0, 300, 300, 300, 300)])
    first = (4.0 * 30 + 1.0 * 300) / 330
    assert all(float(a.numpy()[0]) == pytest.approx(first) for a in new.values())
    assert first < (4.0 + 1.0) / 2 - 1  # uniform weights would let the small site drag it to 2.5
    state = export_state(strategy)
    assert set(state) == {"momentum"}

    resumed = build_strategy("fedavgm", groups=GROUPS, modality_aware=False, server_lr=lr, server_momentum=beta,
                             min_sites=2)
    restore_state(resumed, state)
    results = []
    for s in (strategy, resumed):
        sent = send(s, value=first, server_round=2)
        out, _ = s.aggregate_train(2, [trained(sent[0], "small", 2.0, 30, 30, 30, 30),
                                       trained(sent[1], "large", 2.0, 300, 300, 300, 300)])
        results.append(float(out["head.w"].numpy()[0]))
    momentum = beta * (0.0 - first) + (first - 2.0)  # pseudo-gradients are old - new
    assert results[0] == pytest.approx(first - lr * momentum) == pytest.approx(results[1])
    assert results[0] > 2.0  # momentum carries the step past the plain average


def test_default_server_lr_follows_the_strategy_and_client_dp_runs_fedavgm_as_fedavg():
    from clinfuse.config import DEFAULT_SERVER_LR, config_from_dict, load_config
    from clinfuse.federation.run_config import RunConfig

    data = load_config().model_dump(mode="json")
    for name in ("fedavgm", "fedadam"):
        data["federation"].update(strategy=name, server_lr=None)
        settings = RunConfig.parse({}).for_study(config_from_dict(data))
        assert settings.server_lr == DEFAULT_SERVER_LR[name]
    assert RunConfig.parse({"server-lr": 0.5}).for_study(config_from_dict(data)).server_lr == 0.5
    wrapped = build_strategy("fedavgm", groups=GROUPS, client_dp=ClientDP(0.5, 1.0), min_sites=1)
    assert type(wrapped.strategy).__name__ == "ClientDPFedAvg"
