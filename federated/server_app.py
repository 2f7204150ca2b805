"""The coordinator's Flower ServerApp: rounds, checkpoints, resume, history.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run . --run-config 'k=v ...'``,
or the ``run_config`` given to :func:`make_server_app`); every key is optional:

=====================  =====================================================================
``config``             study config YAML (default ``configs/demo.yaml``)
``run-dir``            run directory (default ``<workdir>/run``): checkpoints, ``global.pt``,
                       ``history.json``
``workdir``            base of the simulation paths (default ``.clinfuse-demo``)
``num-rounds``         rounds (default ``federation.rounds``)
``local-epochs``       epochs per round at each site (default ``federation.local_epochs``)
``strategy``           ``fedavg`` | ``fedprox`` | ``fedadam`` (default ``federation.strategy``)
``proximal-mu``        FedProx mu; ``server-lr`` FedAdam's eta
``modality-aware``     modality-aware aggregation (default ``federation.modality_aware``)
``min-sites``          a round aggregates only when at least this many sites trained, and the
                       run needs this many connected (default ``federation.min_sites``)
``expected-sites``     sites to wait for before each round (default ``min-sites``)
``wait-seconds``       how long to wait for them (default 600)
``accept-failures``    go on when a site fails (default ``federation.accept_failures``)
``round-timeout``      seconds to wait for replies in a round (default 3600)
``client-dp``          client-level DP with Flower's fixed-clipping wrapper and accountant;
                       ``client-dp-noise``, ``client-dp-clip``, ``client-dp-delta``
``secagg``             SecAgg+ through Flower's legacy workflow; ``secagg-shares``,
                       ``secagg-threshold``, ``secagg-max-weight``
``target-epsilon``     override ``privacy.target_epsilon`` (simulation: sites use it too)
``resume``             continue from the run directory's last checkpoint
``stop-after-round``   end the run cleanly after this round (resume later)
``demo-cohort``        simulation engine only: write the demo cohort into ``cohort`` if it has
                       no manifests (``cohort-patients`` per site, default 200)
=====================  =====================================================================

Each round: the strategy sends the global weights to every connected site; replies are read as
trained, declined (the site's cap; its reason is logged) or failed (an error or no reply); if at
least ``min-sites`` trained, their weights are aggregated, otherwise the global model stays as it
was. Then every site evaluates the new global model, and the round's checkpoint and history
record (per site: status, epsilon, reason, timings, validation metrics; the weighted validation
metrics) are written. ``resume`` starts after the last recorded round with its weights and the
strategy's state (FedAdam moments, the client-DP accountant); the sites' epsilon continues by
itself, from their own accountants.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from clinfuse.data.synthetic import ensure_demo_cohort
from clinfuse.errors import InputError
from federated.client_app import METRICS, NUM_EXAMPLES, SITE, SITE_ID, _truthy, simulation_paths

_log = logging.getLogger("clinfuse.federation")
RoundCallback = Callable[[dict], None]


@dataclass
class ServerSettings:
    """The run's settings: the study config's ``federation`` section overridden by the run config."""
    config: str | None
    run_dir: str
    num_rounds: int
    local_epochs: int
    strategy: str
    proximal_mu: float
    server_lr: float
    modality_aware: bool
    min_sites: int
    expected_sites: int
    wait_seconds: float
    accept_failures: bool
    round_timeout: float
    client_dp: bool
    client_dp_noise: float
    client_dp_clip: float
    client_dp_delta: float
    secagg: bool
    secagg_shares: int
    secagg_threshold: int
    secagg_max_weight: float
    target_epsilon: float
    resume: bool
    stop_after_round: int
    demo_cohort: bool
    cohort: str
    cohort_patients: int

    @classmethod
    def from_run_config(cls, run_config: dict) -> tuple[ServerSettings, object]:
        """Settings and the study :class:`Config` (with ``target-epsilon`` applied)."""
        from clinfuse.config import config_from_dict, load_config

        rc = dict(run_config)
        config = str(rc["config"]) if rc.get("config") else None
        cfg = load_config(Path(config).expanduser() if config else None)
        if rc.get("target-epsilon"):
            data = cfg.model_dump(mode="json")
            data["privacy"]["target_epsilon"] = float(rc["target-epsilon"])
            cfg = config_from_dict(data, source="run config target-epsilon")
        fed = cfg.federation
        paths = simulation_paths(rc)

        def get(key, default, kind):
            value = rc.get(key)
            if value is None or (not isinstance(value, bool) and value in ("", 0)):
                value = default  # pyproject.toml lists every key; 0 and "" mean "not set"
            try:
                return _truthy(value) if kind is bool else kind(value)
            except (TypeError, ValueError):
                raise InputError(f"run config {key}={value!r} is not a {kind.__name__}", key=key) from None

        min_sites = get("min-sites", fed.min_sites, int)
        expected = max(get("expected-sites", min_sites, int), min_sites)
        if min_sites < 1:
            raise InputError(f"min-sites must be at least 1, got {min_sites}", key="min-sites")
        settings = cls(
            config=config, run_dir=str(paths["run_dir"]), num_rounds=get("num-rounds", fed.rounds, int),
            local_epochs=get("local-epochs", fed.local_epochs, int), strategy=get("strategy", fed.strategy, str),
            proximal_mu=get("proximal-mu", fed.proximal_mu, float), server_lr=get("server-lr", fed.server_lr, float),
            modality_aware=get("modality-aware", fed.modality_aware, bool), min_sites=min_sites,
            expected_sites=expected, wait_seconds=get("wait-seconds", 600.0, float),
            accept_failures=get("accept-failures", fed.accept_failures, bool),
            round_timeout=get("round-timeout", 3600.0, float), client_dp=get("client-dp", fed.client_dp, bool),
            client_dp_noise=get("client-dp-noise", fed.client_dp_noise, float),
            client_dp_clip=get("client-dp-clip", fed.client_dp_clip, float),
            client_dp_delta=get("client-dp-delta", 1e-5, float), secagg=get("secagg", fed.secagg, bool),
            secagg_shares=get("secagg-shares", expected, int),
            secagg_threshold=get("secagg-threshold", max(2, expected - 1), int),
            secagg_max_weight=get("secagg-max-weight", 10000.0, float),
            target_epsilon=cfg.privacy.target_epsilon,
            resume=get("resume", False, bool), stop_after_round=get("stop-after-round", 0, int),
            demo_cohort=get("demo-cohort", False, bool), cohort=str(paths["cohort"]),
            cohort_patients=get("cohort-patients", 200, int))
        if settings.num_rounds < 1 or settings.local_epochs < 1:
            raise InputError("num-rounds and local-epochs must be at least 1", key="num-rounds")
        if settings.strategy not in ("fedavg", "fedprox", "fedadam"):
            raise InputError(f"unknown strategy {settings.strategy!r} (fedavg, fedprox, fedadam)", key="strategy")
        return settings, cfg

    def describe(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def is_simulation(grid: Grid) -> bool:
    """Whether the sites are simulated (Flower's in-memory grid): only then is a demo cohort written."""
    return type(grid).__name__ == "InMemoryGrid"


def _site_summaries(site_replies) -> dict[str, dict]:
    out = {}
    for reply in site_replies:
        out[reply.site_id] = reply.summary()
    return out


def _eval_by_site(replies, names: dict[int, str]) -> dict[str, dict]:
    out = {}
    for msg in replies:
        if msg.has_error():
            continue
        node = int(msg.metadata.src_node_id)
        site = msg.content[SITE] if SITE in msg.content.config_records else {}
        names[node] = name = str(site.get(SITE_ID, names.get(node, f"node-{node}")))
        out[name] = dict(msg.content[METRICS]) if METRICS in msg.content.metric_records else {}
    return out


def _stop_here(settings: ServerSettings, server_round: int) -> bool:
    stop = settings.stop_after_round
    return bool(stop) and server_round >= stop and server_round < settings.num_rounds


def format_round(record: dict) -> str:
    """One line per round: AUROC, each site's status and epsilon."""
    val = record.get("val") or {}
    auroc = val.get("val-auroc")
    parts = [f"round {record['round']}: {record['round_wall_s']:.1f} s",
             f"val AUROC {auroc:.3f}" if auroc is not None else "val AUROC n/a"]
    for name, site in sorted(record["sites"].items()):
        eps = site.get("epsilon")
        tag = {"trained": "", "declined": " DECLINED", "failed": " FAILED"}[site["status"]]
        parts.append(f"{name} eps {eps:.2f}{tag}" if eps is not None else f"{name}{tag or ' ok'}")
    if not record.get("aggregated"):
        parts.append("global model unchanged")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# The Message-API round loop
# --------------------------------------------------------------------------------------------

def run_federation(grid: Grid, run_config: dict, *, on_round: RoundCallback | None = None) -> dict:
    """Run (or resume) the study's rounds on ``grid``; returns the run summary.

    The summary: ``rounds`` run, ``final_val`` (weighted validation metrics of the last round),
    ``epsilon`` per site (last reported), ``client_dp_epsilon`` (client-level, when enabled),
    ``run_dir`` and ``global_checkpoint``.
    """
    from clinfuse.federation.rundir import RunDir
    from clinfuse.models.fusion import format_parameter_counts, parameter_counts, parameter_groups
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything
    from federated.strategy import (
        ClientDP,
        build_strategy,
        client_dp_replies,
        export_state,
        read_replies,
        restore_state,
    )

    settings, cfg = ServerSettings.from_run_config(run_config)
    if settings.secagg:
        return run_secagg(grid, settings, cfg, on_round=on_round)
    rundir = RunDir(settings.run_dir)
    first = rundir.begin(cfg, settings.describe(), resume=settings.resume, num_rounds=settings.num_rounds)
    if settings.demo_cohort and is_simulation(grid):
        ensure_demo_cohort(settings.cohort, sites=max(settings.expected_sites, len(list(grid.get_node_ids()))),
                           patients=settings.cohort_patients, log=lambda line: log(INFO, "%s", line))
    model = build_model_for(cfg)
    groups = parameter_groups(model)
    counts = parameter_counts(model)
    log(INFO, "study %s: modalities %s; %s", cfg.study, ", ".join(cfg.modality_names), format_parameter_counts(counts))
    strategy_state: dict = {}
    if first > 1:
        last = rundir.last()
        state, strategy_state = last.state, last.strategy_state
        log(INFO, "resuming after round %d from %s", last.round, last.path)
    else:
        seed_everything(cfg.train.seed)
        state = {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}
    client_dp = (ClientDP(settings.client_dp_noise, settings.client_dp_clip, settings.client_dp_delta)
                 if settings.client_dp else None)
    if client_dp and settings.modality_aware:
        log(WARNING, "client-level DP: Flower accounts only its uniform FedAvg average, so aggregation "
                     "is uniform over the sampled sites (not modality-aware)")
    strategy = build_strategy(settings.strategy, groups=groups, modality_aware=settings.modality_aware,
                              min_sites=settings.min_sites, expected_sites=settings.expected_sites,
                              proximal_mu=settings.proximal_mu, server_lr=settings.server_lr,
                              client_dp=client_dp, wait_s=settings.wait_seconds)
    restore_state(strategy, strategy_state)
    arrays = _record(state)
    run_id = str(grid.run.run_id)
    common = {"num-rounds": settings.num_rounds, "local-epochs": settings.local_epochs,
              "modality-aware": bool(settings.modality_aware and not client_dp), "run-id": run_id}
    epsilon: dict[str, float] = {}
    names: dict[int, str] = {}  # node id -> site id, for naming a site that fails
    for record in rundir.history():
        for name, site in record.get("sites", {}).items():
            if site.get("epsilon") is not None:
                epsilon[name] = site["epsilon"]
            if site.get("node") is not None:
                names[int(site["node"])] = name
    last_record = None
    for server_round in range(first, settings.num_rounds + 1):
        started = time.perf_counter()
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(common)), grid))
        replies = list(grid.send_and_receive(sent, timeout=settings.round_timeout))
        site_replies = read_replies(replies, sent, names)
        trained = [r for r in site_replies if r.status == "trained"]
        for reply in site_replies:
            if reply.status == "declined":
                log(WARNING, "round %d: %s declined: %s", server_round, reply.site_id, reply.reason)
            elif reply.status == "failed":
                log(WARNING, "round %d: %s failed: %s", server_round, reply.site_id, reply.reason)
        failed = [r for r in site_replies if r.status == "failed"]
        if failed and not settings.accept_failures:
            raise RuntimeError(f"round {server_round}: {len(failed)} site(s) failed and accept-failures is off")
        aggregated, train_metrics = False, {}
        if len(trained) >= settings.min_sites:
            usable = (client_dp_replies(site_replies, sent, arrays) if client_dp
                      else [r.message for r in trained])
            new_arrays, metrics = strategy.aggregate_train(server_round, usable)
            if new_arrays is not None:
                arrays, aggregated = new_arrays, True
            train_metrics = dict(metrics) if metrics is not None else {}
        else:
            log(WARNING, "round %d: %d site(s) trained, fewer than min-sites=%d: the global model is unchanged",
                server_round, len(trained), settings.min_sites)
        train_wall = time.perf_counter() - started

        eval_started = time.perf_counter()
        eval_sent = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({"run-id": run_id}), grid))
        eval_replies = list(grid.send_and_receive(eval_sent, timeout=settings.round_timeout))
        val = strategy.aggregate_evaluate(server_round, eval_replies)
        eval_wall = time.perf_counter() - eval_started

        sites = _site_summaries(site_replies)
        for name, metrics in _eval_by_site(eval_replies, names).items():
            sites.setdefault(name, {"status": "failed"})["val"] = metrics
        for name, site in sites.items():
            if site.get("epsilon") is not None:
                epsilon[name] = site["epsilon"]
        record = {"round": server_round, "aggregated": aggregated, "sites": sites, "train": train_metrics,
                  "val": dict(val) if val is not None else {}, "train_wall_s": train_wall,
                  "eval_wall_s": eval_wall}
        if client_dp:
            spent = strategy.privacy_spent()
            record["client_dp_epsilon"] = spent.epsilon if spent else None
        privacy = {"enabled": cfg.privacy.enabled, "epsilon": max(epsilon.values()) if epsilon else None,
                   "per_site": dict(epsilon), "privacy_unit": "patient", "note": "epsilon is the largest "
                   "over sites; each site's guarantee covers its own patients"}
        record["round_wall_s"] = time.perf_counter() - started
        rundir.save_round(server_round, _numpy(arrays), cfg, record, strategy_state=export_state(strategy),
                          privacy=privacy)
        log(INFO, "%s", format_round(record))
        if on_round is not None:
            on_round(record)
        last_record = record
        if _stop_here(settings, server_round):
            log(INFO, "stopping after round %d as asked (stop-after-round); resume to continue", server_round)
            break
    summary = {"rounds": (last_record or {}).get("round", first - 1), "num_rounds": settings.num_rounds,
               "final_val": (last_record or {}).get("val", {}), "epsilon": epsilon,
               "client_dp_epsilon": (last_record or {}).get("client_dp_epsilon"),
               "run_dir": str(rundir.path), "global_checkpoint": str(rundir.global_path),
               "modalities": list(cfg.modality_names), "parameters": counts}
    rundir.finish(summary)
    return summary


# --------------------------------------------------------------------------------------------
# SecAgg+ (Flower's legacy workflow)
# --------------------------------------------------------------------------------------------

def run_secagg(grid: Grid, settings: ServerSettings, cfg, *, on_round: RoundCallback | None = None) -> dict:
    """Rounds through Flower's legacy ``SecAggPlusWorkflow``: the server sees only the sum.

    SecAgg+ exists in Flower 1.42 only on the legacy path (``flwr.server.strategy.FedAvg``,
    ``LegacyContext``, a NumPyClient with ``secaggplus_mod``). The masked sum is weighted by each
    site's sample count, so aggregation is plain FedAvg (not modality-aware), and a site that
    declines contributes weight 0. Checkpoints, history and resume work as on the main path.
    """
    from flwr.app import RecordDict
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_evaluate_workflow

    from clinfuse.federation.rundir import RunDir
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything
    from federated.strategy import weighted_means

    rundir = RunDir(settings.run_dir)
    first = rundir.begin(cfg, settings.describe(), resume=settings.resume, num_rounds=settings.num_rounds)
    if settings.demo_cohort and is_simulation(grid):
        ensure_demo_cohort(settings.cohort, sites=max(settings.expected_sites, len(list(grid.get_node_ids()))),
                           patients=settings.cohort_patients, log=lambda line: log(INFO, "%s", line))
    keys = list(build_model_for(cfg).state_dict().keys())
    if first > 1:
        state = rundir.last().state
    else:
        seed_everything(cfg.train.seed)
        state = {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}
    run_id = str(grid.run.run_id)
    seen: dict[str, list] = {"fit": [], "evaluate": []}

    class RecordingFedAvg(LegacyFedAvg):
        def aggregate_fit(self, server_round, results, failures):
            seen["fit"] = [(res.num_examples, dict(res.metrics)) for _, res in results]
            seen["fit_failures"] = len(failures)
            if not any(res.num_examples for _, res in results):
                return None, {}
            return super().aggregate_fit(server_round, results, failures)

        def aggregate_evaluate(self, server_round, results, failures):
            seen["evaluate"] = [(res.num_examples, dict(res.metrics)) for _, res in results]
            return None, {}

    offset = first - 1
    strategy = RecordingFedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=settings.expected_sites,
        min_evaluate_clients=settings.expected_sites, min_available_clients=settings.expected_sites,
        accept_failures=settings.accept_failures, fit_metrics_aggregation_fn=lambda _: {},
        on_fit_config_fn=lambda r: {"server-round": r + offset, "num-rounds": settings.num_rounds,
                                    "local-epochs": settings.local_epochs, "run-id": run_id},
        on_evaluate_config_fn=lambda r: {"server-round": r + offset, "run-id": run_id})
    if settings.client_dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, settings.client_dp_noise, settings.client_dp_clip, settings.expected_sites)
    context = LegacyContext(context=Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                            state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=settings.num_rounds - offset), strategy=strategy)
    fit_workflow = SecAggPlusWorkflow(num_shares=settings.secagg_shares,
                                      reconstruction_threshold=settings.secagg_threshold,
                                      max_weight=settings.secagg_max_weight)
    thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
    c_done.wait()
    epsilon: dict[str, float] = {}
    last_record = None
    try:
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
            [np.ascontiguousarray(state[k]) for k in keys])
        rounds_cfg = ConfigRecord({Key.START_TIME: time.time()})
        context.state.config_records[MAIN_CONFIGS_RECORD] = rounds_cfg
        for legacy_round in range(1, settings.num_rounds - offset + 1):
            server_round = legacy_round + offset
            started = time.perf_counter()
            rounds_cfg[Key.CURRENT_ROUND] = legacy_round
            seen["fit"], seen["evaluate"] = [], []
            fit_workflow(grid, context)
            train_wall = time.perf_counter() - started
            eval_started = time.perf_counter()
            default_evaluate_workflow(grid, context)
            eval_wall = time.perf_counter() - eval_started
            params = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
            state = dict(zip(keys, params, strict=True))
            sites: dict[str, dict] = {}
            for n, metrics in seen["fit"]:
                name = str(metrics.pop(SITE_ID, f"site{len(sites)}"))
                status = "declined" if metrics.get("declined") else "trained"
                sites[name] = {"status": status, NUM_EXAMPLES: n, **metrics}
                if metrics.get("epsilon") is not None:
                    epsilon[name] = float(metrics["epsilon"])
            eval_rows = []
            for n, metrics in seen["evaluate"]:
                name = str(metrics.pop(SITE_ID, "?"))
                sites.setdefault(name, {"status": "failed"})["val"] = {NUM_EXAMPLES: n, **metrics}
                eval_rows.append({NUM_EXAMPLES: n, **metrics})
            record = {"round": server_round, "aggregated": any(n for n, _ in seen["fit"]), "sites": sites,
                      "val": weighted_means(eval_rows), "train": {}, "train_wall_s": train_wall,
                      "eval_wall_s": eval_wall, "secagg": True,
                      "round_wall_s": time.perf_counter() - started}
            privacy = {"enabled": cfg.privacy.enabled, "epsilon": max(epsilon.values()) if epsilon else None,
                       "per_site": dict(epsilon), "privacy_unit": "patient"}
            rundir.save_round(server_round, state, cfg, record, privacy=privacy)
            log(INFO, "%s", format_round(record))
            if on_round is not None:
                on_round(record)
            last_record = record
            if _stop_here(settings, server_round):
                break
    finally:
        f_stop.set()
        thread.join()
    summary = {"rounds": (last_record or {}).get("round", first - 1), "num_rounds": settings.num_rounds,
               "final_val": (last_record or {}).get("val", {}), "epsilon": epsilon, "secagg": True,
               "run_dir": str(rundir.path), "global_checkpoint": str(rundir.global_path)}
    rundir.finish(summary)
    return summary


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------

def make_server_app(run_config: dict | None = None, *, on_round: RoundCallback | None = None,
                    results: list | None = None) -> ServerApp:
    """A ServerApp running :func:`run_federation` with ``run_config`` merged over the run's own.

    ``on_round(record)`` is called after each round; the run summary is appended to ``results``
    (both only useful in-process, i.e. with the programmatic simulation).
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_federation(grid, {**dict(context.run_config), **(run_config or {})}, on_round=on_round)
        if results is not None:
            results.append(summary)

    return server


app = make_server_app()

