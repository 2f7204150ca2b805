"""The one round loop of a federated study, :func:`run_study`, over a pluggable round executor.

For the Message API and SecAgg+ alike, :func:`run_study`:

1. reads the run config (:class:`~clinfuse.federation.run_config.RunConfig`) and the study config;
2. opens the run directory (a fresh start or a resume), writes the demo cohort (simulation only),
   and takes the initial weights (seeded) or the last checkpoint's;
3. loads the roster (:mod:`clinfuse.federation.identity`), or says once that identities are not
   verified;
4. per round: the executor trains (:class:`MessageRounds`: Flower's Message API strategies;
   :class:`federated.secagg.SecAggRounds`: Flower's legacy SecAgg+ workflow); every reply is read
   as trained, declined, failed or refused (a node whose signed claim to a site id does not hold);
   if fewer than ``min-sites`` trained the study stops (:class:`StudyStopped`, nothing written
   for that round); otherwise the executor aggregates and the round's checkpoint and history
   record are written;
5. evaluates each round's global model at every site: with the Message API inside the next
   round's train exchange (each site evaluates the weights it receives before training on them,
   :data:`~clinfuse.federation.protocol.EVALUATE_ROUND`; the round's record gets its ``val``
   then, and its console line and ``on_round`` call come with it), in an exchange of its own
   after the run's last round (and ``stop-after-round``), and after every round with SecAgg+;
6. records the run's summary.

Each exchange waits at most ``round-timeout`` seconds for replies (a dead site costs one wait,
then the round goes on with the others), and its messages expire after that long (a site that
comes back does not train for a round that is over). Replies are polled for every 0.1 s, after
30 s ever less often up to once a second (:func:`exchange`): Flower's own ``send_and_receive``
sleeps 3 s between polls in a deployment.

History (``history.json``), per round: ``sites`` (by site id only: status, metrics, reason,
``node``, ``public_key``, ``ledger_head`` and ``val`` with its own ``ledger_head``),
``unidentified`` (failed nodes whose site id is unknown, by node id), ``refused`` (node, claimed
site id, reason), ``val``, ``train``, ``aggregated``, ``evaluated_in_round`` (a folded
evaluation), ``started_at`` (epoch seconds) and wall times (``train_exchange_s``, ``aggregate_s``,
``train_wall_s`` the two together, ``eval_wall_s`` of an evaluate exchange, ``round_wall_s``
up to the checkpoint), ``client_dp_epsilon`` or ``secagg``; per run: ``identity`` (roster, verified) and, when the study stopped early,
``summary.stopped``; per study: ``warm_start``, the provenance of ``federation.initial_checkpoint``
(:mod:`clinfuse.training.warm_start`) or ``None``, also sent to the sites in every train config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from clinfuse.errors import InputError
from clinfuse.federation.identity import SiteIdentities
from clinfuse.federation.protocol import (
    ARRAYS,
    CONFIG,
    DECLINED,
    EVALUATE_ROUND,
    LOCAL_EPOCHS,
    METRICS,
    MODALITY_AWARE,
    NUM_EXAMPLES,
    NUM_ROUNDS,
    REASON,
    RUN_ID,
    SERVER_ROUND,
    SITE,
    VAL,
    WARM_START,
    SiteClaim,
    read_claim,
)
from clinfuse.federation.run_config import RunConfig
from clinfuse.privacy.roster import Roster

RoundCallback = Callable[[dict], None]


class StudyStopped(RuntimeError):
    """The study ended before its last round (too few sites trained, a failure with
    ``accept-failures`` off, too few sites connected). ``summary`` is the run's summary."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------

@dataclass
class SiteReply:
    """One node's answer to an exchange, classified.

    ``status``: ``trained`` | ``declined`` (train), ``evaluated`` (evaluate), ``failed`` (an
    error or no reply) or ``refused`` (its claim to a site id did not hold: ``reason`` says why).
    ``site_id`` is ``None`` when unknown (a node that failed before it was identified) and, for a
    refused reply, the id it claimed is ``claimed``. ``message`` is ``None`` without a reply.
    """
    node_id: int
    site_id: str | None
    status: str
    metrics: dict = field(default_factory=dict)
    reason: str | None = None
    message: Message | None = None
    claim: SiteClaim | None = None

    def summary(self) -> dict:
        """The reply as ``history.json`` keeps it under its site."""
        out = {"node": self.node_id, "status": self.status, **self.metrics}
        if self.reason:
            out["reason"] = self.reason
        if self.claim is not None:
            out["public_key"] = self.claim.public_key
            out["ledger_head"] = self.claim.ledger_head
        return out


def exchange(grid: Grid, messages: Sequence[Message], timeout: float) -> list[Message]:
    """Send ``messages`` and collect their replies until all came or ``timeout`` seconds passed.

    Flower's ``Grid.send_and_receive`` polls a deployment's SuperLink every 3 s; a round of a
    few seconds' training loses up to that much per exchange. Here the server polls every 0.1 s
    for the first 30 s of an exchange (a reply of a short round is collected within 0.1 s), then
    ever less often, up to once a second (a long round). A simulated
    grid is in-process: its own ``send_and_receive`` is used, Flower's in-memory grid polling
    every 20 ms instead of its default 100 ms (its ``pull_interval``).
    """
    if not messages:
        return []
    if is_simulation(grid):
        if isinstance(getattr(grid, "pull_interval", None), float):
            grid.pull_interval = min(grid.pull_interval, 0.02)
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    started, interval = time.monotonic(), 0.1
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        if not got:
            time.sleep(min(interval, left))
            if time.monotonic() - started > 30.0:
                interval = min(interval * 1.5, 1.0)
    return replies


def classify(replies: Iterable[Message], sent: Sequence[Message], *, server_round: int, run_id: str,
             identities: SiteIdentities, connected: Iterable[int], timeout: float) -> list[SiteReply]:
    """Read replies to ``sent`` (train or evaluate) with their signed claims checked by
    ``identities``; nodes sent a message but absent from ``replies`` are failed."""
    connected = set(connected)
    # An error the SuperLink makes for a node ("node unavailable") comes from the SuperLink's own
    # node id: the message it answers says which site it is about.
    addressee = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}
    out, seen = [], set()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            node = addressee.get(msg.metadata.reply_to_message_id, node)
        seen.add(node)
        if msg.has_error():
            out.append(SiteReply(node, identities.site_of(node), "failed", reason=str(msg.error.reason)[:500],
                                 message=msg))
            continue
        claim = read_claim(msg, server_round=server_round, run_id=run_id)
        refused = identities.admit(node, claim, connected=connected)
        content = msg.content
        metrics = dict(content[METRICS]) if METRICS in content.metric_records else {}
        if refused:
            out.append(SiteReply(node, None, "refused", reason=refused, message=msg, claim=claim))
        elif msg.metadata.message_type == MessageType.EVALUATE:
            out.append(SiteReply(node, claim.site_id, "evaluated", metrics, None, msg, claim))
        elif metrics.get(DECLINED):
            reason = str(content[SITE].get(REASON, ""))
            out.append(SiteReply(node, claim.site_id, "declined", metrics, reason, msg, claim))
        elif ARRAYS in content.array_records and NUM_EXAMPLES in metrics:
            out.append(SiteReply(node, claim.site_id, "trained", metrics, None, msg, claim))
        else:
            out.append(SiteReply(node, claim.site_id, "failed", metrics, "reply without weights or sample count",
                                 msg, claim))
    for msg in sent:
        node = int(msg.metadata.dst_node_id)
        if node not in seen:
            out.append(SiteReply(node, identities.site_of(node), "failed",
                                 reason=f"no reply within round-timeout ({timeout:g} s): site down or too slow"))
    return sorted(out, key=lambda r: (r.site_id is None, r.site_id or "", r.node_id))


def folded_evaluations(replies: Sequence[SiteReply]) -> list[SiteReply]:
    """The evaluations carried in train replies (:data:`~clinfuse.federation.protocol.VAL`):
    ``evaluated`` with the reply's (verified) claim, or ``failed`` (no message: the record names
    the phase ``evaluate``) for a node whose train reply failed or carried none. Refused replies
    are left to the train record."""
    out = []
    for r in replies:
        if r.status in ("trained", "declined") and r.message is not None and VAL in r.message.content.metric_records:
            out.append(SiteReply(r.node_id, r.site_id, "evaluated", dict(r.message.content[VAL]), None,
                                 r.message, r.claim))
        elif r.status != "refused":
            out.append(SiteReply(r.node_id, r.site_id, "failed",
                                 reason=r.reason if r.status == "failed" else "train reply without evaluation"))
    return out


def _log_replies(server_round: int, phase: str, replies: Sequence[SiteReply]) -> None:
    for r in replies:
        name = r.site_id or f"node {r.node_id}"
        if r.status == "refused":
            log(WARNING, "round %d %s: REFUSED node %d claiming %r: %s", server_round, phase, r.node_id,
                r.claim.site_id if r.claim else None, r.reason)
        elif r.status in ("declined", "failed"):
            log(WARNING, "round %d %s: %s %s: %s", server_round, phase, name, r.status, r.reason)
        elif r.status == "trained" and r.metrics.get("collapsed"):
            why = [w for k, w in (("val-single-class", "predicts a single class on its validation rows"),
                                  ("loss-at-chance", "training loss at chance")) if r.metrics.get(k)]
            log(WARNING, "round %d %s: %s: COLLAPSED model (%s)", server_round, phase, name, "; ".join(why))
        elif r.status == "evaluated" and server_round == 1 and not r.metrics.get("num-examples"):
            log(WARNING, "%s has no validation rows: a collapsed model is not monitored there", name)


# --------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------

class MessageRounds:
    """Training through Flower's Message API strategies (:func:`federated.strategy.build_strategy`)."""

    secagg = False
    #: the next round's train messages carry the evaluation of this round's model
    folds_evaluation = True

    def __init__(self, study: Study):
        from clinfuse.models.fusion import parameter_groups
        from clinfuse.training.checkpoint import build_model_for
        from federated.strategy import ClientDP, build_strategy

        s = study.settings
        self.study = study
        self.client_dp = ClientDP(s.client_dp_noise, s.client_dp_clip, s.client_dp_delta) if s.client_dp else None
        if self.client_dp and s.modality_aware:
            log(WARNING, "client-level DP: Flower accounts only its uniform FedAvg average, so aggregation "
                         "is uniform over the sampled sites (not modality-aware)")
        self.strategy = build_strategy(s.strategy, groups=parameter_groups(build_model_for(study.cfg)),
                                       modality_aware=s.modality_aware, min_sites=s.min_sites,
                                       expected_sites=s.expected_sites, proximal_mu=s.proximal_mu,
                                       server_lr=s.server_lr, server_momentum=s.server_momentum,
                                       client_dp=self.client_dp, wait_s=s.wait_seconds)
        self._sent: list[Message] = []
        self._arrays: ArrayRecord | None = None

    def train(self, server_round: int, arrays: ArrayRecord, evaluate_round: int | None = None) -> list[SiteReply]:
        """Round ``server_round``'s train exchange; with ``evaluate_round`` each site first
        evaluates ``arrays`` as that round's global model (:func:`folded_evaluations`)."""
        s, study = self.study.settings, self.study
        config = {NUM_ROUNDS: s.num_rounds, LOCAL_EPOCHS: s.local_epochs, RUN_ID: study.run_id,
                  MODALITY_AWARE: bool(s.modality_aware and not self.client_dp),
                  **study.warm_start_config()}
        if evaluate_round is not None:
            config[EVALUATE_ROUND] = int(evaluate_round)
        sent = [m for m in self.strategy.configure_train(server_round, arrays, ConfigRecord(config), study.grid)
                if int(m.metadata.dst_node_id) not in study.identities.refused_nodes]
        for m in sent:
            m.metadata.ttl = s.round_timeout
        self._sent, self._arrays = sent, arrays
        replies = exchange(study.grid, sent, s.round_timeout)
        return study.classify(replies, sent, server_round)

    def aggregate(self, server_round: int, replies: Sequence[SiteReply]) -> tuple[ArrayRecord | None, dict]:
        from federated.strategy import client_dp_replies

        trained = [r.message for r in replies if r.status == "trained"]
        usable = client_dp_replies(replies, self._sent, self._arrays) if self.client_dp else trained
        new_arrays, metrics = self.strategy.aggregate_train(server_round, usable)
        return new_arrays, dict(metrics) if metrics is not None else {}

    def record(self) -> dict:
        if not self.client_dp:
            return {}
        spent = self.strategy.privacy_spent()
        return {"client_dp_epsilon": spent.epsilon if spent else None}

    def export_state(self) -> dict:
        from federated.strategy import export_state

        return export_state(self.strategy)

    def restore_state(self, state: dict) -> None:
        from federated.strategy import restore_state

        restore_state(self.strategy, state)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------

def is_simulation(grid: Grid) -> bool:
    """Whether the sites are simulated (Flower's in-memory grid, or a grid saying ``simulated``):
    only then is a demo cohort written and may the run config change the sites' study."""
    return bool(getattr(grid, "simulated", type(grid).__name__ == "InMemoryGrid"))


class Study:
    """What one run of the loop shares with its executor: grid, settings, study config, identities."""

    def __init__(self, grid: Grid, settings: RunConfig, cfg, identities: SiteIdentities,
                 warm_start: dict | None = None):
        self.grid, self.settings, self.cfg, self.identities = grid, settings, cfg, identities
        self.run_id = str(grid.run.run_id)
        self.warm_start = warm_start  # provenance of federation.initial_checkpoint, or None

    def warm_start_config(self) -> dict:
        """The train config's ``warm-start`` entry (the sites' ledgers record it), or nothing."""
        import json

        return {WARM_START: json.dumps(self.warm_start, sort_keys=True)} if self.warm_start else {}

    def classify(self, replies: Iterable[Message], sent: Sequence[Message], server_round: int) -> list[SiteReply]:
        return classify(replies, sent, server_round=server_round, run_id=self.run_id, identities=self.identities,
                        connected=self.grid.get_node_ids(), timeout=self.settings.round_timeout)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> list[SiteReply]:
        """Every connected node (not refused) evaluates ``arrays``; their classified replies."""
        s = self.settings
        nodes = [n for n in sorted(self.grid.get_node_ids()) if n not in self.identities.refused_nodes]
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: server_round, RUN_ID: self.run_id})})
        sent = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n, ttl=s.round_timeout)
                for n in nodes]
        return self.classify(exchange(self.grid, sent, s.round_timeout), sent, server_round)


def _settings(grid: Grid, run_config) -> tuple[RunConfig, object]:
    rc = RunConfig.parse(run_config)
    if not is_simulation(grid) and (rc.dp is not None or rc.seed is not None):
        key = "dp" if rc.dp is not None else "seed"
        raise InputError(f"run config {key} applies to simulations only: in a deployment each site's own "
                         "study config decides", key=key)
    cfg = rc.study_config()
    settings = rc.for_study(cfg)
    if settings.secagg and settings.secagg_shares < 3:
        raise InputError(f"SecAgg+ needs at least 3 sites (Flower's num_shares > 2), got secagg-shares="
                         f"{settings.secagg_shares} (expected-sites {settings.expected_sites})", key="secagg-shares")
    return settings, cfg


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _round_record(server_round: int, train: Sequence[SiteReply], evaluated: Sequence[SiteReply],
                  identities: SiteIdentities) -> dict:
    """``sites`` (by site id), ``unidentified`` and ``refused`` of one round's two exchanges."""
    sites: dict[str, dict] = {}
    unidentified, refused = [], []
    for exchange, replies in (("train", train), ("evaluate", evaluated)):
        for r in replies:
            phase = r.message.metadata.message_type if r.message is not None else exchange
            site_id = r.site_id or (identities.site_of(r.node_id) if r.status == "failed" else None)
            if r.status == "refused":
                refused.append({"node": r.node_id, "phase": phase, "claimed_site_id": r.claim.site_id if r.claim
                                else None, "public_key": r.claim.public_key if r.claim else None,
                                "reason": r.reason})
            elif site_id is None:
                unidentified.append({"node": r.node_id, "phase": phase, "status": r.status, "reason": r.reason})
            elif exchange == "train":
                sites[site_id] = r.summary()
            else:
                site = sites.setdefault(site_id, {"node": r.node_id, "status": "failed",
                                                  "reason": "no train reply"})
                if r.status == "evaluated":
                    site["val"] = {**r.metrics, "ledger_head": r.claim.ledger_head}
                else:
                    site["val"] = {"status": r.status, "reason": r.reason}
    return {"round": server_round, "sites": sites, "unidentified": unidentified, "refused": refused}


def format_round(record: dict) -> str:
    """One line per round: AUROC, each site's status and epsilon, refusals."""
    val = record.get("val") or {}
    auroc = val.get("val-auroc")
    parts = [f"round {record['round']}: {record.get('round_wall_s', 0.0):.1f} s",
             f"val AUROC {auroc:.3f}" if auroc is not None else "val AUROC n/a"]
    for name, site in sorted(record["sites"].items()):
        eps = site.get("epsilon")
        tag = {"trained": "", "declined": " DECLINED", "failed": " FAILED"}.get(site["status"], "")
        if site.get("collapsed"):
            tag += " COLLAPSED"
        parts.append(f"{name} eps {eps:.2f}{tag}" if eps is not None else f"{name}{tag or ' ok'}")
    if record.get("unidentified"):
        parts.append(f"{len(record['unidentified'])} unidentified node(s) failed")
    if record.get("refused"):
        parts.append(f"{len(record['refused'])} reply(ies) REFUSED (site identity)")
    if not record.get("aggregated"):
        parts.append("global model unchanged")
    return " | ".join(parts)


def _stop_reason(replies: Sequence[SiteReply], settings: RunConfig) -> str | None:
    """Why the study cannot go on after these train replies, or ``None``."""
    failed = [r for r in replies if r.status == "failed"]
    if failed and not settings.accept_failures:
        return (f"{len(failed)} site(s) failed and accept-failures is off "
                f"({'; '.join(f'{r.site_id or r.node_id}: {r.reason}' for r in failed)})")
    trained = sum(r.status == "trained" for r in replies)
    if trained >= settings.min_sites:
        return None
    counts = {s: sum(r.status == s for r in replies) for s in ("declined", "failed", "refused")}
    detail = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"{trained} site(s) trained, fewer than min-sites={settings.min_sites}" + (f" ({detail})" if detail else "")


def _note_epsilon(epsilon: dict[str, float], sites: dict) -> None:
    """Keep each site's last reported epsilon."""
    for name, site in sites.items():
        if site.get("epsilon") is not None:
            epsilon[name] = site["epsilon"]


def run_study(grid: Grid, run_config, *, on_round: RoundCallback | None = None) -> dict:
    """Run (or resume) the study's rounds on ``grid``; returns the run summary.

    ``run_config``: Flower's flat run config (or a :class:`RunConfig`). The summary: ``rounds``
    completed, ``num_rounds``, ``final_val``, ``epsilon`` per site (last reported),
    ``client_dp_epsilon``, ``identity``, ``run_dir``, ``global_checkpoint`` (``None`` when no round
    completed). Raises :class:`StudyStopped` (with the summary, recorded in the run directory too)
    when the study ends early, :class:`InputError` for a bad run config or roster.
    """
    from clinfuse.federation.rundir import RunDir
    from clinfuse.models.fusion import format_parameter_counts, parameter_counts
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything
    from federated.strategy import SitesUnavailable, weighted_means

    settings, cfg = _settings(grid, run_config)
    roster = Roster.load(settings.roster) if settings.roster else None
    if roster is not None:
        roster.check_study(cfg.study)
    rundir = RunDir(settings.run_path)
    initial = None
    if cfg.federation.initial_checkpoint and not (settings.resume and rundir.history()):
        from clinfuse.federation.run_config import expand_path
        from clinfuse.training.warm_start import read_initial_checkpoint

        # Before the run directory is touched: a checkpoint that does not fit leaves nothing behind.
        initial = read_initial_checkpoint(expand_path(cfg.federation.initial_checkpoint), cfg)
    first = rundir.begin(cfg, settings.describe(), resume=settings.resume, num_rounds=settings.num_rounds,
                         warm_start=initial[1] if initial else None)
    warm_start = (rundir.document() or {}).get("warm_start")
    if settings.demo_cohort and is_simulation(grid):
        from clinfuse.data.synthetic import ensure_demo_cohort

        ensure_demo_cohort(settings.cohort_path, sites=max(settings.expected_sites, len(list(grid.get_node_ids()))),
                           patients=settings.cohort_patients, log=lambda line: log(INFO, "%s", line))
    counts = parameter_counts(build_model_for(cfg))
    log(INFO, "study %s: modalities %s; %s", cfg.study, ", ".join(cfg.modality_names), format_parameter_counts(counts))
    identities = SiteIdentities(roster)
    if roster is None:
        # INFO: a simulation or the demo has no roster by design; a deployment's server log shows it.
        log(INFO, "no roster (run config 'roster'): site identities are not verified against declared "
                  "keys; each site id is bound to the first key that signs for it in this run")
    strategy_state: dict = {}
    if first > 1:
        last = rundir.last()
        state, strategy_state = last.state, last.strategy_state
        log(INFO, "resuming after round %d from %s", last.round, last.path)
    elif initial is not None:
        state = initial[0]
        log(INFO, "round 1 starts from %s: pretrained without DP on %r (declared public; manifests sha256 %s)",
            warm_start["checkpoint"], warm_start["dataset"], warm_start["manifest_sha256"][:16])
    else:
        seed_everything(cfg.train.seed)
        state = {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}
    arrays = _record(state)
    epsilon: dict[str, float] = {}
    for record in rundir.history():
        _note_epsilon(epsilon, record.get("sites", {}))
    identity = {"roster": str(roster.path) if roster else None, "verified": roster is not None}
    last_record: dict | None = None
    stopped: dict | None = None
    study = Study(grid, settings, cfg, identities, warm_start)
    if settings.secagg:
        from federated.secagg import SecAggRounds

        executor = SecAggRounds(study)
    else:
        executor = MessageRounds(study)
    pending: tuple[dict, list[SiteReply]] | None = None  # a saved round awaiting its folded evaluation

    def finish_round(record: dict, train: Sequence[SiteReply], evaluated: Sequence[SiteReply]) -> None:
        """Complete ``record`` with its evaluations; log it and call ``on_round``."""
        nonlocal last_record
        done = _round_record(record["round"], train, evaluated, identities)
        record.update(sites=done["sites"], unidentified=done["unidentified"], refused=done["refused"],
                      val=weighted_means([r.metrics for r in evaluated if r.status == "evaluated"]))
        log(INFO, "%s", format_round(record))
        if on_round is not None:
            on_round(record)
        last_record = record

    try:
        executor.restore_state(strategy_state)
        for server_round in range(first, settings.num_rounds + 1):
            started, started_at = time.perf_counter(), time.time()
            if pending is not None:
                replies = executor.train(server_round, arrays, evaluate_round=pending[0]["round"])
                exchange_s = time.perf_counter() - started
                record, train_replies = pending
                folded = folded_evaluations(replies)
                _log_replies(record["round"], "evaluate", folded)
                finish_round(record, train_replies, folded)
                rundir.amend_round(record["round"], record)
                pending = None
            else:
                replies = executor.train(server_round, arrays)
                exchange_s = time.perf_counter() - started
            _log_replies(server_round, "train", replies)
            problem = _stop_reason(replies, settings)
            new_arrays = None
            train_metrics: dict = {}
            aggregate_started = time.perf_counter()
            if problem is None:
                new_arrays, train_metrics = executor.aggregate(server_round, replies)
                if new_arrays is None:
                    problem = "the round's aggregate was discarded (see the log)"
            if problem is not None:
                record = {**_round_record(server_round, replies, [], identities), "aggregated": False,
                          "round_wall_s": time.perf_counter() - started}
                _note_epsilon(epsilon, record["sites"])
                stopped = {"round": server_round, "reason": problem, "record": record}
                break
            arrays = new_arrays
            train_wall = time.perf_counter() - started
            stop = settings.stop_after_round
            stops_here = bool(stop and stop <= server_round < settings.num_rounds)
            defer = executor.folds_evaluation and server_round < settings.num_rounds and not stops_here
            eval_started = time.perf_counter()
            evaluated: list[SiteReply] = []
            if not defer:
                evaluated = study.evaluate(server_round, arrays)
                _log_replies(server_round, "evaluate", evaluated)
            eval_wall = time.perf_counter() - eval_started
            record = {**_round_record(server_round, replies, evaluated, identities), "aggregated": True,
                      "train": train_metrics, "val": {}, "started_at": started_at, "train_wall_s": train_wall,
                      "train_exchange_s": exchange_s, "aggregate_s": eval_started - aggregate_started,
                      "eval_wall_s": eval_wall, **executor.record()}
            if defer:
                record["evaluated_in_round"] = server_round + 1
            if executor.secagg:
                record["secagg"] = True
            _note_epsilon(epsilon, record["sites"])
            privacy = {"enabled": cfg.privacy.enabled, "epsilon": max(epsilon.values()) if epsilon else None,
                       "per_site": dict(epsilon), "privacy_unit": "patient", "note": "epsilon is the largest "
                       "over sites; each site's guarantee covers its own patients"}
            if not defer:
                record["val"] = weighted_means([r.metrics for r in evaluated if r.status == "evaluated"])
            record["round_wall_s"] = time.perf_counter() - started
            rundir.save_round(server_round, {k: a.numpy() for k, a in arrays.items()}, cfg, record,
                              strategy_state=executor.export_state(), privacy=privacy)
            if defer:
                pending = (record, replies)
            else:
                finish_round(record, replies, evaluated)
            if stops_here:
                log(INFO, "stopping after round %d as asked (stop-after-round); resume to continue", server_round)
                break
    except SitesUnavailable as exc:
        stopped = {"round": (pending[0] if pending else last_record or {}).get("round", first - 1) + 1,
                   "reason": str(exc)}
    finally:
        executor.close()
    if pending is not None:  # the study ended before the exchange that would have evaluated it
        finish_round(*pending, [])
    completed = (last_record or {}).get("round", first - 1)
    summary = {"rounds": completed, "num_rounds": settings.num_rounds,
               "final_val": (last_record or {}).get("val", {}), "epsilon": epsilon,
               "client_dp_epsilon": (last_record or {}).get("client_dp_epsilon"), "identity": identity,
               "secagg": executor.secagg, "run_dir": str(rundir.path),
               "global_checkpoint": str(rundir.global_path) if completed >= 1 else None,
               "modalities": list(cfg.modality_names), "parameters": counts, "warm_start": warm_start}
    if stopped is not None:
        summary["stopped"] = stopped
        rundir.finish(summary)
        kept = (f"the global model is round {completed}'s ({rundir.global_path}); fix the sites and resume"
                if completed >= 1 else "no global checkpoint was written")
        message = f"round {stopped['round']}: {stopped['reason']}: the study stops; {kept}"
        log(WARNING, "%s", message)
        raise StudyStopped(message, summary)
    rundir.finish(summary)
    return summary
