"""The clinfuse message protocol between the coordinator and a site, in one place.

This is the one module of the library that speaks Flower's record types (``RecordDict``,
``ArrayRecord``, ``MetricRecord``, ``ConfigRecord``; imported where they are built). The server,
the strategies and the ClientApp all read their keys and helpers from here.

Which site a node is (:func:`site_spec`)
    Deployment: the SuperNode's ``--node-config`` names the site: ``manifest``, ``site-id``,
    ``state-dir``, ``max-epsilon`` and optionally ``config`` (the site's own study config; its cap
    and config come from there only, the server cannot raise them). Simulation: the node config
    has only ``partition-id``; partition ``K`` is site ``site-id-K`` (default ``site-K``) with
    manifest ``manifest-K`` (default ``<cohort>/site-K/manifest.csv``), state in
    ``<sites-dir>/<site id>`` and cap ``max-epsilon-K`` or ``max-epsilon`` (default the study's
    target epsilon).

A round's instructions (the train message's ``config`` record)
    ``server-round``, ``num-rounds``, ``local-epochs``, ``run-id``, ``modality-aware``
    (and ``proximal-mu`` for FedProx, ``clipping_norm`` for client-level DP, ``warm-start`` when
    the study started from a public-data checkpoint: its provenance, which the site's ledger records). :func:`train_site`
    is the one place a site trains a round from them. ``evaluate-round`` (round ``r`` > 1 of a
    Message-API study): the received weights are round ``r - 1``'s global model; the site first
    evaluates them as that round's evaluation, saving an exchange (a process per site in a
    deployment) per round.

A reply
    ``arrays`` (the state dict, same keys and order as received; absent when the site declined),
    ``metrics`` (:func:`train_metrics` / :func:`evaluate_metrics`: numbers only, keys with
    hyphens, flattened by :func:`metric_values`; ``<part>-seconds`` timings), ``val`` (the
    evaluation a train message asked for, as :func:`evaluate_metrics`) and ``site`` (:data:`SITE_ID`, ``reason`` when
    declining, and the signed identity below).

Signed replies (:func:`sign_fields`, :func:`read_claim`)
    Every reply carries the site's public key, its ledger head (``ledger-seq``, ``ledger-hash``:
    the last entry after this release) and an Ed25519 signature, made with the site key in its
    state dir, over the canonical digest of what matters (:func:`reply_digest`): the site id, the
    message type, the server round and run id it answers, the hash of the array record, the
    metrics (epsilon included) and the ``val`` metrics when present, the decline reason, the ledger head and the public key. A
    replayed reply (another round or run), an altered one, or one signed by another key does not
    verify. Which key may speak for which site id is :mod:`clinfuse.federation.identity`'s job.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from clinfuse.errors import InputError
from clinfuse.federation.run_config import RunConfig, expand_path

# Records of a message (``val``: a train reply's evaluation of the model it received, when asked)
ARRAYS, CONFIG, METRICS, SITE, VAL = "arrays", "config", "metrics", "site", "val"
# Metrics every reply may carry
NUM_EXAMPLES, DECLINED = "num-examples", "declined"
# The site record
SITE_ID, REASON = "site-id", "reason"
PUBLIC_KEY, LEDGER_SEQ, LEDGER_HASH, SIGNATURE = "public-key", "ledger-seq", "ledger-hash", "signature"
IDENTITY_FIELDS = (SITE_ID, REASON, PUBLIC_KEY, LEDGER_SEQ, LEDGER_HASH, SIGNATURE)
# The round's instructions (train and evaluate config records)
SERVER_ROUND, NUM_ROUNDS, LOCAL_EPOCHS, RUN_ID = "server-round", "num-rounds", "local-epochs", "run-id"
PROXIMAL_MU, MODALITY_AWARE = "proximal-mu", "modality-aware"
WARM_START = "warm-start"  # JSON of the public-data checkpoint's provenance (federation.initial_checkpoint)
# In a train message: evaluate the received model (the previous round's global) before training,
# as round ``evaluate-round``, and reply with its metrics in the ``val`` record
EVALUATE_ROUND = "evaluate-round"
CLIPPING_NORM = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM
TRAIN, EVALUATE = "train", "evaluate"  # message types signed into a reply
REPLY_FORMAT = "clinfuse.reply/1"

_log = logging.getLogger("clinfuse.site")


# --------------------------------------------------------------------------------------------
# Which site this node is
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteSpec:
    """Where a node's site lives: its manifest, id, private state dir, cap and study config."""
    manifest: Path
    site_id: str
    state_dir: Path
    max_epsilon: float | None  # None: the study's target epsilon
    config: Path | None  # None: configs/demo.yaml
    simulation: bool
    # deployment: serve messages from the site's long-lived worker process (node config
    # ``site-worker``, default true; :mod:`clinfuse.federation.site_worker`)
    worker: bool = False


def site_spec(node_config: Mapping, run_config: RunConfig) -> SiteSpec:
    """The site a node serves, from its node config (and, in simulation, the run config).

    Raises :class:`InputError` naming the node-config key that is missing or malformed.
    """
    if "manifest" in node_config:
        missing = [k for k in ("site-id", "state-dir", "max-epsilon") if k not in node_config]
        if missing:
            raise InputError(f"node config lacks {', '.join(missing)} (set them with flower-supernode "
                             f"--node-config)", key=missing[0])
        cap = node_config["max-epsilon"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise InputError(f"max-epsilon must be a positive number, got {cap!r}", key="max-epsilon")
        site_id = node_config["site-id"]
        if not isinstance(site_id, str) or not site_id.strip():
            raise InputError(f"site-id must be a non-empty string, got {site_id!r}", key="site-id")
        worker = node_config.get("site-worker", True)
        if not isinstance(worker, bool):
            raise InputError(f"site-worker must be true or false, got {worker!r}", key="site-worker")
        return SiteSpec(manifest=expand_path(str(node_config["manifest"])), site_id=site_id,
                        state_dir=expand_path(str(node_config["state-dir"])), max_epsilon=float(cap),
                        config=expand_path(str(node_config["config"])) if node_config.get("config") else None,
                        simulation=False, worker=worker)
    if "partition-id" in node_config:
        k = int(node_config["partition-id"])
        site_id = run_config.site_ids.get(k, f"site-{k}")
        manifest = (expand_path(run_config.manifests[k]) if k in run_config.manifests
                    else run_config.cohort_path / f"site-{k}" / "manifest.csv")
        return SiteSpec(manifest=manifest, site_id=site_id, state_dir=run_config.sites_path / site_id,
                        max_epsilon=run_config.max_epsilons.get(k, run_config.max_epsilon),
                        config=expand_path(run_config.config) if run_config.config else None, simulation=True)
    raise InputError("node config names no site: give manifest, site-id, state-dir and max-epsilon "
                     "(flower-supernode --node-config)", key="manifest")


def load_site_code() -> float:
    """Import what a site's round runs (torch, Opacus, the trainer, the privacy state); returns the
    seconds it took (about 0 once loaded: a simulation's actor keeps it, a deployment's process
    per message does not). Imported here, not where first used, so the benchmark's breakdown
    counts imports as imports (Opacus' alone is seconds: it pulls SciPy and torch.distributed)."""
    import time

    started = time.perf_counter()
    import opacus  # noqa: F401

    import clinfuse.federation.site_runtime
    import clinfuse.privacy.site_state
    import clinfuse.training.trainer  # noqa: F401

    return time.perf_counter() - started


def open_site(spec: SiteSpec, run_config: RunConfig):
    """A :class:`~clinfuse.federation.site_runtime.SiteRuntime` for one message.

    Its privacy state is read from the state dir every time (in simulation one worker serves
    several sites in turn, and the accountant on disk is the only truth); the validated manifest
    and decoded data come from the process's cache while nothing they depend on changed.
    """
    from clinfuse.federation.site_runtime import SiteRuntime

    _quiet_known_warnings()
    cfg = run_config.site_study_config(spec.config, simulation=spec.simulation)
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    cap = spec.max_epsilon if spec.max_epsilon is not None else cfg.privacy.target_epsilon
    return SiteRuntime(cfg, spec.manifest, site_id=spec.site_id, state_dir=spec.state_dir, max_epsilon=cap)


def _quiet_known_warnings() -> None:
    """Silence two warnings every round would repeat (both are documented in docs/federation.md):
    Opacus' secure-RNG notice (torchcsprng is not installable here) and torch's note that a
    full backward hook fires without input gradients (Opacus hooks on the first layer)."""
    import warnings

    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")


def reported(exc: BaseException, where: str) -> RuntimeError:
    """What the server learns of a site's exception: its type (and key for bad input), no text.

    The full traceback goes to the site's own log: its text could quote a manifest cell.
    """
    _log.error("%s failed:\n%s", where, "".join(traceback.format_exception(exc)))
    key = getattr(exc, "key", None)
    return RuntimeError(f"{where} failed with {type(exc).__name__}" + (f" (key {key})" if key else "")
                        + "; details are in the site's log")


# --------------------------------------------------------------------------------------------
# Rounds and metrics
# --------------------------------------------------------------------------------------------

def train_site(site, state: Mapping, config: Mapping, *, run_id: str = "", modality_aware: bool = True):
    """Train one round of ``site`` from ``state`` as the round's ``config`` record says.

    Keys absent from ``config`` fall back to the site's study config; ``modality_aware`` is the
    default for ``modality-aware`` (SecAgg+ sums plainly, so it passes False).
    """
    return site.train_round(
        dict(state), server_round=int(config.get(SERVER_ROUND, 0)),
        rounds=int(config.get(NUM_ROUNDS, site.cfg.federation.rounds)),
        local_epochs=int(config.get(LOCAL_EPOCHS, site.cfg.federation.local_epochs)),
        run_id=str(config.get(RUN_ID, run_id)), proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
        modality_aware=bool(config.get(MODALITY_AWARE, modality_aware)), warm_start=read_warm_start(config))


def read_warm_start(config: Mapping) -> dict | None:
    """The warm-start provenance of a round's config record (``None`` without one)."""
    from clinfuse.training.warm_start import PRETRAINING_FORMAT

    text = config.get(WARM_START)
    if not text:
        return None
    try:
        provenance = json.loads(str(text))
    except ValueError:
        provenance = None
    if not isinstance(provenance, dict) or provenance.get("format") != PRETRAINING_FORMAT:
        raise InputError(f"the round's {WARM_START} record is not a {PRETRAINING_FORMAT} provenance", key=WARM_START)
    return provenance


def metric_values(values: Mapping, *, drop: tuple[str, ...] = ()) -> dict[str, int | float]:
    """Numbers only, ``snake_case`` keys as ``kebab-case``: what a metrics record may carry."""
    out: dict[str, int | float] = {}
    for key, value in values.items():
        if key in drop or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        out[key.replace("_", "-")] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def seconds_metrics(timings: Mapping[str, float]) -> dict[str, float]:
    """``{part: s}`` as metrics ``<part>-seconds``."""
    return {f"{part}-seconds": float(s) for part, s in timings.items()}


def train_metrics(result, timings: Mapping[str, float] | None = None, **seconds: float) -> dict[str, int | float]:
    """A train reply's metrics: counts (overall, per modality), the site's metrics, timings
    (``timings`` as ``<part>-seconds``, default the result's own; ``seconds`` as ``part_seconds=s``)."""
    out: dict[str, int | float] = {NUM_EXAMPLES: int(result.num_examples), DECLINED: int(result.declined)}
    out.update({f"examples-{m}": int(n) for m, n in result.modality_examples.items()})
    out.update(metric_values(result.metrics, drop=("declined",)))
    out.update(seconds_metrics(result.timings if timings is None else timings))
    out.update(metric_values(seconds))
    return out


def evaluate_metrics(metrics: Mapping, **seconds: float) -> dict[str, int | float]:
    """An evaluate reply's metrics: the validation count, the validation metrics, timings."""
    out: dict[str, int | float] = {NUM_EXAMPLES: int(metrics.get("val_examples", 0))}
    out.update(metric_values(metrics, drop=("val_examples",)))
    out.update(metric_values(seconds))
    return out


def round_config(message) -> dict:
    """The ``config`` record of a server message (empty when it has none)."""
    return dict(message.content[CONFIG]) if CONFIG in message.content.config_records else {}


def received_state(message) -> dict:
    """The arrays of a server message as numpy arrays, in the order sent."""
    return {k: a.numpy() for k, a in message.content[ARRAYS].items()}


def train_content(site_id: str, result, sent_keys, metrics: Mapping, val: Mapping | None = None):
    """The train reply's records (not yet signed: :func:`sign_reply` does that last); ``val``
    the evaluation metrics the message asked for (:data:`EVALUATE_ROUND`)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    site = {SITE_ID: site_id}
    content = RecordDict({METRICS: MetricRecord(dict(metrics))})
    if val is not None:
        content[VAL] = MetricRecord(dict(val))
    if result.declined:
        site[REASON] = result.declined_reason
    else:
        # Same keys, same order as received: Flower's clipping mod compares the key lists.
        content[ARRAYS] = ArrayRecord({k: Array(result.state[k]) for k in sent_keys})
    content[SITE] = ConfigRecord(site)
    return content


def evaluate_content(site_id: str, metrics: Mapping):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    return RecordDict({METRICS: MetricRecord(dict(metrics)), SITE: ConfigRecord({SITE_ID: site_id})})


# --------------------------------------------------------------------------------------------
# Signed replies
# --------------------------------------------------------------------------------------------

def site_key(state_dir: Path):
    """The site's signing key (the one :class:`SiteRuntime` signs its ledger with)."""
    from clinfuse.privacy.site_key import SiteKey

    return SiteKey.load_or_create(state_dir)


def ledger_head(state_dir: Path) -> dict | None:
    """``{"seq", "hash"}`` of the last entry of the site's ledger, or ``None`` before the first."""
    from clinfuse.privacy.ledger import Ledger
    from clinfuse.privacy.site_state import LEDGER_FILE

    head = Ledger(Path(state_dir) / LEDGER_FILE).head_entry()
    return None if head["seq"] < 0 else head


def arrays_hash(arrays) -> str | None:
    """sha256 over an array record's names, dtypes, shapes and bytes (``None`` for no record)."""
    if arrays is None:
        return None
    from clinfuse.privacy.ledger import array_digest

    return array_digest({k: a.numpy() for k, a in arrays.items()})


def reply_digest(*, site_id: str, message_type: str, server_round: int, run_id: str,
                 arrays: str | None, metrics: Mapping, reason: str | None, head: Mapping | None,
                 public_key: str, val: Mapping | None = None) -> bytes:
    """The canonical bytes a site signs and the server verifies (sorted-key JSON); ``val`` is
    in them when the reply carries one (a removed or added ``val`` record does not verify)."""
    body = {"format": REPLY_FORMAT, "site_id": str(site_id), "message_type": str(message_type),
            "server_round": int(server_round), "run_id": str(run_id), "arrays": arrays,
            "metrics": {str(k): v for k, v in metrics.items()}, "reason": reason,
            "ledger_head": dict(head) if head else None, "public_key": public_key}
    if val is not None:
        body["val"] = {str(k): v for k, v in val.items()}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign_fields(state_dir: Path, *, site_id: str, message_type: str, server_round: int, run_id: str,
                arrays: str | None, metrics: Mapping, reason: str | None = None, val: Mapping | None = None) -> dict:
    """The identity fields of a reply (site id, public key, ledger head, signature)."""
    key, head = site_key(state_dir), ledger_head(state_dir)
    signature = key.sign(reply_digest(site_id=site_id, message_type=message_type, server_round=server_round,
                                      run_id=run_id, arrays=arrays, metrics=metrics, reason=reason, head=head,
                                      public_key=key.public_key, val=val))
    fields = {SITE_ID: site_id, PUBLIC_KEY: key.public_key, SIGNATURE: signature}
    if head is not None:
        fields.update({LEDGER_SEQ: head["seq"], LEDGER_HASH: head["hash"]})
    if reason is not None:
        fields[REASON] = reason
    return fields


def sign_reply(reply, request, state_dir: Path) -> None:
    """Add the signed identity fields to ``reply``'s site record (in place).

    Run after every mod that changes the reply (Flower's clipping mod rewrites the arrays).
    """
    from flwr.app import ConfigRecord

    content = reply.content
    site = dict(content[SITE]) if SITE in content.config_records else {}
    config = round_config(request)
    metrics = dict(content[METRICS]) if METRICS in content.metric_records else {}
    content[SITE] = ConfigRecord(sign_fields(
        state_dir, site_id=str(site[SITE_ID]), message_type=request.metadata.message_type,
        server_round=int(config.get(SERVER_ROUND, 0)), run_id=str(config.get(RUN_ID, request.metadata.run_id)),
        arrays=arrays_hash(content[ARRAYS] if ARRAYS in content.array_records else None), metrics=metrics,
        reason=site.get(REASON), val=dict(content[VAL]) if VAL in content.metric_records else None))


@dataclass(frozen=True)
class SiteClaim:
    """Who a reply says it is from, and whether its signature verifies against the key it carries."""
    site_id: str
    public_key: str | None
    ledger_head: dict | None
    signed: bool  # the signature verifies (against ``public_key``, over this round's digest)

    @property
    def fingerprint(self) -> str | None:
        from clinfuse.privacy.site_key import fingerprint

        try:
            return fingerprint(self.public_key) if self.public_key else None
        except InputError:
            return None


def claim_from_fields(fields: Mapping, *, message_type: str, server_round: int, run_id: str,
                      arrays: str | None, metrics: Mapping, val: Mapping | None = None) -> SiteClaim | None:
    """Read and verify the identity fields of a reply; ``None`` when it names no site."""
    from clinfuse.privacy.site_key import verify_signature

    if SITE_ID not in fields:
        return None
    site_id, public_key, signature = str(fields[SITE_ID]), fields.get(PUBLIC_KEY), fields.get(SIGNATURE)
    head = ({"seq": int(fields[LEDGER_SEQ]), "hash": str(fields[LEDGER_HASH])}
            if LEDGER_SEQ in fields and LEDGER_HASH in fields else None)
    signed = False
    if isinstance(public_key, str) and isinstance(signature, str):
        reason = fields.get(REASON)
        digest = reply_digest(site_id=site_id, message_type=message_type, server_round=server_round, run_id=run_id,
                              arrays=arrays, metrics=metrics, reason=str(reason) if reason is not None else None,
                              head=head, public_key=public_key, val=val)
        signed = verify_signature(public_key, digest, signature)
    return SiteClaim(site_id, public_key if isinstance(public_key, str) else None, head, signed)


def read_claim(reply, *, server_round: int, run_id: str) -> SiteClaim | None:
    """The verified claim of a (non-error) Message-API reply to this round's ``message_type``."""
    content = reply.content
    if SITE not in content.config_records:
        return None
    metrics = dict(content[METRICS]) if METRICS in content.metric_records else {}
    return claim_from_fields(content[SITE], message_type=reply.metadata.message_type, server_round=server_round,
                             run_id=run_id, metrics=metrics,
                             val=dict(content[VAL]) if VAL in content.metric_records else None,
                             arrays=arrays_hash(content[ARRAYS] if ARRAYS in content.array_records else None))
