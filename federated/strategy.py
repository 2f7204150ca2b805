"""Flower strategies whose array aggregation is clinfuse's (modality-aware) ``aggregate``.

Class layout (Flower 1.42 Message API, ``flwr.serverapp.strategy``)::

    FedAvg ── _SiteRounds ── _ModalityAware ── ClinfuseFedAvg
                 │                 ├── ClinfuseFedProx(FedProx, _ModalityAware)
                 │                 └── ClinfuseFedAdam(FedAdam, _ModalityAware)
                 ├── ClientDPFedAvg                 (Flower's own FedAvg.aggregate_train)
                 └── ClientDPFedProx(FedProx, ...)  (idem)

``_SiteRounds`` sends every round to every connected site (after waiting for the expected
number). ``_ModalityAware`` replaces Flower's array averaging with :func:`clinfuse.federation.aggregation.aggregate`; FedProx and FedAdam keep their
own behaviour around it (FedAdam applies its server optimiser to the modality-aware average).

Client-level DP wraps ``ClientDP*`` in Flower's ``DifferentialPrivacyClientSideFixedClipping`` with
its RDP accountant. Flower only accounts that wrapper around FedAvg's own uniform average, so in
that mode updates are averaged uniformly over all sampled sites and modality-aware weighting is
off; a site that declined or failed counts as a zero update (the fixed-denominator DP-FedAvg
estimator), which keeps the noise calibrated to the number of sampled sites.

The round loop that drives these (identity checks, checkpoints, resume, history, evaluation) is
:func:`federated.rounds.run_study`; :func:`weighted_means` averages the sites' metrics there (per
key over the sites that report it: a site whose validation split has one class reports no AUROC).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy
from flwr.supercore import log

from clinfuse.errors import InputError
from clinfuse.federation.protocol import ARRAYS, CONFIG, DECLINED, METRICS, NUM_EXAMPLES, SERVER_ROUND

CLIENT_DP_WEIGHT = "client-dp-weight"
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam")


class SitesUnavailable(RuntimeError):
    """Fewer sites than the minimum connected in time."""


# --------------------------------------------------------------------------------------------
# Averaging metrics
# --------------------------------------------------------------------------------------------

def weighted_means(rows: Sequence[Mapping[str, float]], weight_key: str = NUM_EXAMPLES) -> dict[str, float]:
    """Per key, the mean weighted by ``weight_key`` over the rows that have that key.

    Rows report different keys (a site without notes has no text AUROC; one whose validation
    split has a single class has no AUROC at all), so each key is averaged over its own rows.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for row in rows:
        w = float(row.get(weight_key, 0) or 0)
        if w <= 0:
            continue
        for key, value in row.items():
            if key == weight_key or isinstance(value, list) or value is None or not np.isfinite(value):
                continue
            totals[key] = totals.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    return {k: totals[k] / weights[k] for k in totals}


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

def _fedavg_kwargs(min_sites: int, weighted_by_key: str = NUM_EXAMPLES) -> dict:
    """FedAvg's constructor arguments: every site, every round; clinfuse's record keys."""
    return {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": min_sites,
            "min_evaluate_nodes": min_sites, "min_available_nodes": min_sites,
            "weighted_by_key": weighted_by_key, "arrayrecord_key": ARRAYS, "configrecord_key": CONFIG}


class _SiteRounds(FedAvg):
    """FedAvg sampling every connected site each round, with robust evaluation averaging.

    No ``__init__`` here: Flower's FedProx/FedAdam constructors call ``super().__init__`` with
    FedAvg's arguments only, so the concrete classes call :meth:`_setup_sites` after them.
    ``min_sites``: fewer connected sites than this after ``wait_s`` seconds is an error.
    ``expected_sites``: how many to wait for (up to ``wait_s``) before a round starts.
    """

    min_sites = 2
    expected_sites = 2
    wait_s = 600.0
    _started = False

    def _setup_sites(self, min_sites: int, expected_sites: int | None, wait_s: float) -> None:
        if min_sites < 1:
            raise InputError(f"min-sites must be at least 1, got {min_sites}", key="min-sites")
        self.min_sites = int(min_sites)
        self.expected_sites = max(int(expected_sites or min_sites), self.min_sites)
        self.wait_s = float(wait_s)
        self._started = False

    def connected_sites(self, grid: Grid) -> list[int]:
        """All connected nodes.

        Before the first round, wait up to ``wait_s`` for ``expected_sites`` of them; later
        rounds go on at once with whoever is connected (a site that died is not waited for),
        waiting only while fewer than ``min_sites`` are.
        """
        target = self.min_sites if self._started else self.expected_sites
        deadline = time.monotonic() + self.wait_s
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= target:
                self._started = True
                return nodes
            if time.monotonic() > deadline:
                if len(nodes) >= self.min_sites:
                    log(WARNING, "%d of %d expected sites connected; going on with them",
                        len(nodes), self.expected_sites)
                    self._started = True
                    return nodes
                raise SitesUnavailable(f"only {len(nodes)} sites connected after {self.wait_s:.0f} s; "
                                       f"the study needs at least {self.min_sites}")
            time.sleep(0.5)

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                  message_type: str) -> list[Message]:
        config[SERVER_ROUND] = server_round
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(content=record, message_type=message_type, dst_node_id=node)
                for node in self.connected_sites(grid)]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = self._messages(server_round, arrays, config, grid, MessageType.TRAIN)
        log(INFO, "configure_train: round %d sent to %d sites", server_round, len(messages))
        return messages


class _ModalityAware(_SiteRounds):
    """Array aggregation by :func:`clinfuse.federation.aggregation.aggregate`.

    ``groups``: parameter names per group (``parameter_groups(model)``); ``modality_aware=False``
    makes it plain FedAvg weighted by sample count.
    """

    def _setup_groups(self, groups: Mapping[str, Sequence[str]] | None, modality_aware: bool) -> None:
        self.groups = {k: list(v) for k, v in (groups or {}).items()}
        self.modality_aware = bool(modality_aware)
        self._previous: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._previous = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from clinfuse.federation.aggregation import SiteUpdate, aggregate

        if self._previous is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        trained = [m for m in replies if not m.has_error() and ARRAYS in m.content.array_records
                   and METRICS in m.content.metric_records and not m.content[METRICS].get(DECLINED)]
        if not trained:
            return None, None
        updates = []
        for reply in trained:
            m = dict(reply.content[METRICS])
            arrays = reply.content[ARRAYS]
            updates.append(SiteUpdate(state={k: a.numpy() for k, a in arrays.items()},
                                      num_examples=int(m[NUM_EXAMPLES]),
                                      modality_examples={mod: int(m.get(f"examples-{mod}", 0))
                                                         for mod in self.groups if mod != "fusion"}))
        missing = [k for u in updates for k in self._previous if k not in u.state]
        if missing:
            raise InputError(f"a site's reply lacks parameter {missing[0]!r}: sites run different models?")
        new = aggregate(updates, self._previous, groups=self.groups, modality_aware=self.modality_aware)
        metrics = weighted_means([dict(r.content[METRICS]) for r in trained])
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()}), MetricRecord(metrics)


class ClinfuseFedAvg(_ModalityAware):
    """FedAvg with clinfuse's modality-aware averaging."""

    def __init__(self, *, groups, modality_aware: bool = True, min_sites: int = 2,
                 expected_sites: int | None = None, wait_s: float = 600.0):
        super().__init__(**_fedavg_kwargs(min_sites))
        self._setup_sites(min_sites, expected_sites, wait_s)
        self._setup_groups(groups, modality_aware)


class ClinfuseFedProx(FedProx, _ModalityAware):
    """FedProx: sends ``proximal-mu``; the sites' trainers pull towards the global weights."""

    def __init__(self, *, groups, proximal_mu: float, modality_aware: bool = True, min_sites: int = 2,
                 expected_sites: int | None = None, wait_s: float = 600.0):
        super().__init__(proximal_mu=proximal_mu, **_fedavg_kwargs(min_sites))
        self._setup_sites(min_sites, expected_sites, wait_s)
        self._setup_groups(groups, modality_aware)


class ClinfuseFedAvgM(FedAvgM, _ModalityAware):
    """FedAvgM: server momentum (SGD with momentum on the pseudo-gradient, Flower's formulas) over
    the modality-aware average. Momentum averages each site's DP noise over rounds while the
    signal adds up: under DP it measured best (docs/benchmarks/aggregation.md)."""

    def __init__(self, *, groups, server_lr: float, server_momentum: float, modality_aware: bool = True,
                 min_sites: int = 2, expected_sites: int | None = None, wait_s: float = 600.0):
        super().__init__(server_learning_rate=server_lr, server_momentum=server_momentum,
                         **_fedavg_kwargs(min_sites))
        self._setup_sites(min_sites, expected_sites, wait_s)
        self._setup_groups(groups, modality_aware)


class ClinfuseFedAdam(FedAdam, _ModalityAware):
    """FedAdam: Adam on the server applied to the modality-aware average of the sites' weights."""

    def __init__(self, *, groups, eta: float, modality_aware: bool = True, min_sites: int = 2,
                 expected_sites: int | None = None, wait_s: float = 600.0):
        super().__init__(eta=eta, **_fedavg_kwargs(min_sites))
        self._setup_sites(min_sites, expected_sites, wait_s)
        self._setup_groups(groups, modality_aware)


class ClientDPFedAvg(_SiteRounds):
    """Uniform FedAvg for Flower's client-level DP wrapper and accountant (keeps FedAvg.aggregate_train)."""

    def __init__(self, *, min_sites: int = 2, expected_sites: int | None = None, wait_s: float = 600.0):
        super().__init__(**_fedavg_kwargs(min_sites, CLIENT_DP_WEIGHT))
        self._setup_sites(min_sites, expected_sites, wait_s)


class ClientDPFedProx(FedProx, _SiteRounds):
    """Uniform FedProx for Flower's client-level DP wrapper and accountant."""

    def __init__(self, *, proximal_mu: float, min_sites: int = 2, expected_sites: int | None = None,
                 wait_s: float = 600.0):
        super().__init__(proximal_mu=proximal_mu, **_fedavg_kwargs(min_sites, CLIENT_DP_WEIGHT))
        self._setup_sites(min_sites, expected_sites, wait_s)


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP (Flower's fixed-clipping wrapper): noise multiplier, clipping norm, delta."""
    noise_multiplier: float
    clipping_norm: float
    delta: float = 1e-5


def build_strategy(name: str, *, groups: Mapping[str, Sequence[str]], modality_aware: bool = True,
                   min_sites: int = 2, expected_sites: int | None = None, proximal_mu: float = 0.01,
                   server_lr: float = 0.03, server_momentum: float = 0.9, client_dp: ClientDP | None = None,
                   wait_s: float = 600.0) -> Strategy:
    """The configured strategy. ``name`` is ``fedavg``, ``fedavgm``, ``fedprox`` or ``fedadam``.

    ``server_lr`` is FedAdam's eta or FedAvgM's server learning rate; ``server_momentum`` FedAvgM's.

    With ``client_dp`` the result is Flower's ``DifferentialPrivacyClientSideFixedClipping`` around a
    uniform FedAvg/FedProx, with Flower's RDP accountant (``strategy.privacy_spent()``); sites must
    then attach ``fixedclipping_mod`` to their train handler (the clinfuse ClientApp does).
    """
    if name not in STRATEGIES:
        raise InputError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}", key="strategy")
    common = {"min_sites": min_sites, "expected_sites": expected_sites, "wait_s": wait_s}
    if client_dp is None:
        aware = {"groups": groups, "modality_aware": modality_aware, **common}
        if name == "fedprox":
            return ClinfuseFedProx(proximal_mu=proximal_mu, **aware)
        if name == "fedadam":
            return ClinfuseFedAdam(eta=server_lr, **aware)
        if name == "fedavgm":
            return ClinfuseFedAvgM(server_lr=server_lr, server_momentum=server_momentum, **aware)
        return ClinfuseFedAvg(**aware)

    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    if name == "fedadam":
        raise InputError("client-level DP is accounted by Flower only around FedAvg's average: use strategy "
                         "fedavg or fedprox with client-dp", key="strategy")
    if name == "fedavgm":
        log(WARNING, "client-level DP: Flower accounts only FedAvg's plain average, so server momentum is "
                     "not applied (strategy fedavgm runs as fedavg)")
    inner = (ClientDPFedProx(proximal_mu=proximal_mu, **common) if name == "fedprox"
             else ClientDPFedAvg(**common))
    sampled = inner.expected_sites
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=client_dp.delta, population_size=sampled,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return DifferentialPrivacyClientSideFixedClipping(inner, client_dp.noise_multiplier, client_dp.clipping_norm,
                                                      sampled, accountant=accountant)


def inner_strategy(strategy: Strategy) -> Strategy:
    """The strategy inside a DP wrapper (or the strategy itself)."""
    return getattr(strategy, "strategy", strategy)


def client_dp_replies(site_replies: Sequence, sent: Sequence[Message],
                      arrays: ArrayRecord) -> list[Message]:
    """Replies for Flower's accounted client-DP FedAvg: one per sampled site, uniform weight.

    A trained site contributes its (clipped) weights; a site that declined or failed contributes
    the weights it was sent, i.e. a zero update. Only weights and the weight key go in: the
    wrapper's validation wants identical metric keys everywhere.
    """
    by_node = {r.node_id: r for r in site_replies}
    out = []
    for msg in sent:
        reply = by_node.get(int(msg.metadata.dst_node_id))
        if reply is not None and reply.status == "trained":
            site_arrays = reply.message.content[ARRAYS]
        else:
            site_arrays = ArrayRecord({k: Array(a.numpy().copy()) for k, a in arrays.items()})
        content = RecordDict({ARRAYS: site_arrays, METRICS: MetricRecord({CLIENT_DP_WEIGHT: 1.0})})
        out.append(Message(content, reply_to=msg))
    return out


# --------------------------------------------------------------------------------------------
# State for resume
# --------------------------------------------------------------------------------------------

def export_state(strategy: Strategy) -> dict:
    """What a strategy carries between rounds (FedAdam's moments, the client-DP accountant)."""
    import json

    state: dict = {}
    inner = inner_strategy(strategy)
    for key in ("m_t", "v_t"):
        value = getattr(inner, key, None)
        if value:
            state[key] = {k: np.asarray(v) for k, v in value.items()}
    momentum = getattr(inner, "momentum_vector", None)
    if momentum is not None:  # FedAvgM's: a list in the order of the model's arrays
        state["momentum"] = {f"{i:05d}": np.asarray(v) for i, v in enumerate(momentum)}
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        state["client_dp_accountant"] = json.dumps(accountant.state_dict(), default=str)
    return state


def restore_state(strategy: Strategy, state: Mapping) -> None:
    """Inverse of :func:`export_state` (a resumed server continues FedAdam and the client-DP accountant)."""
    import json

    inner = inner_strategy(strategy)
    for key in ("m_t", "v_t"):
        if key in state and hasattr(inner, key):
            setattr(inner, key, {k: np.asarray(v) for k, v in state[key].items()})
    if "momentum" in state and hasattr(inner, "momentum_vector"):
        inner.momentum_vector = [np.asarray(state["momentum"][k]) for k in sorted(state["momentum"])]
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and state.get("client_dp_accountant"):
        accountant.load_state_dict(json.loads(state["client_dp_accountant"]))
