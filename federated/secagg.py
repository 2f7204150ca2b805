"""SecAgg+ through Flower's legacy workflow: the server sees only the sum of the sites' updates.

Flower 1.42 offers SecAgg+ only on its legacy path (``flwr.server.strategy.FedAvg``,
``LegacyContext``, ``SecAggPlusWorkflow``; at the site a ``NumPyClient`` under ``secaggplus_mod``).
Only the train exchange goes that way: evaluation, identity checks, checkpoints and history are
the round loop's (:func:`federated.rounds.run_study`), as on the Message-API path.

- :class:`SecAggRounds` (server): the round executor. The masked sum is weighted by each site's
  sample count, so aggregation is plain FedAvg (not modality-aware) and a declining site adds
  weight 0. The server cannot take a refused reply out of a masked sum, so a node is asked to
  train only once a signed reply has identified it as a roster site (before round 1 every node
  evaluates the initial model for that); a train reply that still fails its identity check
  discards the round's aggregate.
- :func:`secagg_client_app` (site): the legacy ClientApp that answers the train exchange. Its
  metrics carry the signed identity fields; the signature cannot cover the update itself (the
  server never sees it unmasked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.supercore import log

from clinfuse.federation.protocol import (
    DECLINED,
    IDENTITY_FIELDS,
    NUM_EXAMPLES,
    REASON,
    RUN_ID,
    SERVER_ROUND,
    TRAIN,
    claim_from_fields,
    metric_values,
    open_site,
    reported,
    seconds_metrics,
    sign_fields,
    site_spec,
    train_site,
)
from clinfuse.federation.run_config import RunConfig
from federated.rounds import SiteReply, Study


class SecAggRounds:
    """Round executor over Flower's ``SecAggPlusWorkflow`` (see the module docstring)."""

    secagg = True
    folds_evaluation = False

    def __init__(self, study: Study):
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.compat.app_utils import start_update_client_manager_thread
        from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

        from clinfuse.training.checkpoint import build_model_for

        s = study.settings
        self.study = study
        self.keys = list(build_model_for(study.cfg).state_dict().keys())
        seen = self._seen = {"fit": [], "sampled": []}
        identities = study.identities

        class ClinfuseLegacyFedAvg(LegacyFedAvg):
            """Samples only identified sites; records what each site sent (metrics, weight)."""

            def configure_fit(self, server_round, parameters, client_manager):
                from flwr.common import FitIns

                clients = [p for _, p in sorted(client_manager.all().items())
                           if identities.site_of(int(p.node_id)) is not None
                           and int(p.node_id) not in identities.refused_nodes]
                seen["sampled"] = [int(p.node_id) for p in clients]
                fit_ins = FitIns(parameters, self.on_fit_config_fn(server_round))
                return [(c, fit_ins) for c in clients]

            def aggregate_fit(self, server_round, results, failures):
                seen["fit"] = [(int(proxy.node_id), res.num_examples, dict(res.metrics)) for proxy, res in results]
                if not any(res.num_examples for _, res in results):
                    return None, {}
                return super().aggregate_fit(server_round, results, failures)

        strategy = ClinfuseLegacyFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
            accept_failures=True, fit_metrics_aggregation_fn=lambda _: {},
            on_fit_config_fn=lambda r: {SERVER_ROUND: r, "num-rounds": s.num_rounds,
                                        "local-epochs": s.local_epochs, RUN_ID: study.run_id,
                                        **study.warm_start_config()})
        if s.client_dp:
            strategy = DifferentialPrivacyClientSideFixedClipping(
                strategy, s.client_dp_noise, s.client_dp_clip, s.expected_sites)
        self.context = LegacyContext(context=Context(run_id=study.grid.run.run_id, node_id=0, node_config={},
                                                     state=RecordDict(), run_config={}),
                                     config=ServerConfig(num_rounds=s.num_rounds, round_timeout=s.round_timeout),
                                     strategy=strategy)
        self.workflow = SecAggPlusWorkflow(num_shares=s.secagg_shares, reconstruction_threshold=s.secagg_threshold,
                                           max_weight=s.secagg_max_weight, timeout=s.round_timeout)
        self._thread, self._stop, done = start_update_client_manager_thread(study.grid, self.context.client_manager)
        done.wait()
        self._rounds_cfg = ConfigRecord({Key.START_TIME: time.time()})
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = self._rounds_cfg
        self._identified = False
        self._result: ArrayRecord | None = None

    def train(self, server_round: int, arrays: ArrayRecord) -> list[SiteReply]:
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD, Key

        study = self.study
        early: list[SiteReply] = []
        if not self._identified:
            # A masked sum cannot be un-summed: identify every node before it may train (the
            # refusals of this exchange are reported with the round's own).
            early = [r for r in study.evaluate(server_round - 1, arrays) if r.status == "refused"]
            self._identified = True
        self.context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
            [np.ascontiguousarray(arrays[k].numpy()) for k in self.keys])
        self._rounds_cfg[Key.CURRENT_ROUND] = server_round
        self._seen["fit"], self._seen["sampled"] = [], []
        self.workflow(study.grid, self.context)
        replies = self._classify(server_round)
        params = self.context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        aggregated = any(r.status == "trained" for r in replies)
        self._result = (ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in zip(self.keys, params, strict=True)})
                        if aggregated else None)
        if any(r.status == "refused" for r in replies):
            log(WARNING, "round %d: the SecAgg+ sum includes a refused reply: its aggregate is discarded",
                server_round)
            self._result = None
        return early + replies

    def _classify(self, server_round: int) -> list[SiteReply]:
        study = self.study
        connected = set(study.grid.get_node_ids())
        out, seen = [], set()
        for node, n, metrics in self._seen["fit"]:
            seen.add(node)
            fields = {k: metrics.pop(k) for k in IDENTITY_FIELDS if k in metrics}
            claim = claim_from_fields(fields, message_type=TRAIN, server_round=server_round, run_id=study.run_id,
                                      arrays=None, metrics=metrics)
            refused = study.identities.admit(node, claim, connected=connected)
            metrics = {NUM_EXAMPLES: n, **metrics}
            if refused:
                out.append(SiteReply(node, None, "refused", reason=refused, claim=claim))
            elif metrics.get(DECLINED):
                out.append(SiteReply(node, claim.site_id, "declined", metrics, str(fields.get(REASON, "")),
                                     claim=claim))
            else:
                out.append(SiteReply(node, claim.site_id, "trained", metrics, claim=claim))
        for node in self._seen["sampled"]:
            if node not in seen:
                out.append(SiteReply(node, study.identities.site_of(node), "failed",
                                     reason="dropped out of the SecAgg+ round (no reply within round-timeout, "
                                            "or an error: see the site's log)"))
        return sorted(out, key=lambda r: (r.site_id is None, r.site_id or "", r.node_id))

    def aggregate(self, server_round: int, replies: Sequence[SiteReply]) -> tuple[ArrayRecord | None, dict]:
        return self._result, {}

    def record(self) -> dict:
        return {}

    def export_state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# The site
# --------------------------------------------------------------------------------------------

def secagg_client_app(run_config: RunConfig, mods: list):
    """The legacy ClientApp answering SecAgg+ train exchanges (``secaggplus_mod`` is in ``mods``)."""
    from flwr.clientapp import ClientApp

    def client_fn(context: Context):
        from flwr.client import NumPyClient

        # secaggplus_mod logs every protocol stage at DEBUG
        logging.getLogger("flwr").setLevel(max(logging.getLogger("flwr").level, INFO))
        spec = site_spec(dict(context.node_config), run_config)

        class SiteNumPyClient(NumPyClient):
            """SecAgg+ sums ``num_examples * weights``: a declining site sends weight 0."""

            def fit(self, parameters, config):
                from clinfuse.training.checkpoint import build_model_for

                site = None
                try:
                    site = open_site(spec, run_config)
                    keys = list(build_model_for(site.cfg).state_dict().keys())
                    result = train_site(site, dict(zip(keys, parameters)), config, modality_aware=False)
                except Exception as exc:  # noqa: BLE001 - reported by type only
                    raise reported(exc, f"site {spec.site_id} training") from None
                metrics = {DECLINED: int(result.declined), **seconds_metrics(result.timings),
                           **metric_values(result.metrics, drop=("declined",))}
                fields = sign_fields(spec.state_dir, site_id=spec.site_id, message_type=TRAIN,
                                     server_round=int(config.get(SERVER_ROUND, 0)),
                                     run_id=str(config.get(RUN_ID, "")), arrays=None, metrics=metrics,
                                     reason=result.declined_reason)
                if result.declined:
                    return list(parameters), 0, {**metrics, **fields}
                return [result.state[k] for k in keys], int(result.num_examples), {**metrics, **fields}

        return SiteNumPyClient().to_client()

    return ClientApp(client_fn=client_fn, mods=mods)
