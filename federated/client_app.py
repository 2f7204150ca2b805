"""The site's Flower ClientApp: thin wiring around :class:`clinfuse.federation.site_runtime.SiteRuntime`.

Which site
----------
Deployment: the SuperNode's ``--node-config`` names the site::

    manifest="/data/site/manifest.csv" site-id="hospital-a" state-dir="/var/lib/clinfuse/a"
    max-epsilon=8.0 config="/etc/clinfuse/study.yaml"     (config optional: configs/demo.yaml)

The cap (``max-epsilon``) and the config come from the site's own node config only; the server
cannot raise them. Simulation: the node config has only ``partition-id``; partition ``k`` is site
``site-k``: run config ``manifest-k``, or the demo cohort's (run config ``cohort``, default
``<workdir>/cohort``), with its state
in ``<workdir>/sites/site-k`` and the cap from run config ``max-epsilon-k`` or ``max-epsilon``
(default: the study's target epsilon).

What is sent
------------
Train reply: ``arrays`` (the model's state dict, same keys as received), ``metrics`` (sample
counts, per-modality counts, loss, epsilon/delta, timings) and ``site`` (``site-id``). A site that
declines (its cap would be passed) sends ``metrics`` with ``declined=1`` and ``site`` with
``reason``, and no weights. Evaluation reply: validation metrics and the validation count. An
exception is reported to the server by type only (the full text stays in the site's log: it
could quote a manifest cell).

Start-up
--------
In deployment every message starts a new process; this module imports only Flower at the top.
torch and the model are imported by the handlers, data decoding is cached on disk by the
dataset, and a manifest already validated by an earlier round is not re-opened file by file.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# Record keys of the clinfuse protocol (the server reads them in federated.strategy).
ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"
NUM_EXAMPLES, DECLINED, SITE_ID, REASON = "num-examples", "declined", "site-id", "reason"
CLIPPING_NORM = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM

_log = logging.getLogger("clinfuse.site")


# --------------------------------------------------------------------------------------------
# Which site this node is
# --------------------------------------------------------------------------------------------

def _path(value, base: Path | None = None) -> Path:
    path = Path(os.path.expandvars(str(value))).expanduser()
    return path if path.is_absolute() or base is None else base / path


def simulation_paths(run_config: dict) -> dict[str, Path]:
    """Work directory, cohort, run directory and site-state root of a simulation run."""
    workdir = _path(run_config.get("workdir") or ".clinfuse-demo")
    return {"workdir": workdir,
            "cohort": _path(run_config.get("cohort") or "cohort", workdir),
            "run_dir": _path(run_config.get("run-dir") or "run", workdir),
            "sites": _path(run_config.get("sites-dir") or "sites", workdir)}


def site_spec(node_config: dict, run_config: dict) -> dict:
    """``manifest``, ``site_id``, ``state_dir``, ``max_epsilon``, ``config`` of this node.

    Raises :class:`InputError` naming the missing node-config key.
    """
    from clinfuse.errors import InputError

    if "manifest" in node_config:
        missing = [k for k in ("site-id", "state-dir", "max-epsilon") if k not in node_config]
        if missing:
            raise InputError(f"node config lacks {', '.join(missing)} (set them with flower-supernode "
                             f"--node-config)", key=missing[0])
        try:
            cap = float(node_config["max-epsilon"])
        except (TypeError, ValueError):
            raise InputError(f"max-epsilon must be a number, got {node_config['max-epsilon']!r}",
                             key="max-epsilon") from None
        return {"manifest": _path(node_config["manifest"]), "site_id": str(node_config["site-id"]),
                "state_dir": _path(node_config["state-dir"]), "max_epsilon": cap,
                "config": _path(node_config["config"]) if node_config.get("config") else None,
                "simulation": False}
    if "partition-id" in node_config:
        k = int(node_config["partition-id"])
        paths = simulation_paths(run_config)
        cap = run_config.get(f"max-epsilon-{k}", run_config.get("max-epsilon"))
        manifest = (_path(run_config[f"manifest-{k}"]) if run_config.get(f"manifest-{k}")
                    else paths["cohort"] / f"site-{k}" / "manifest.csv")
        return {"manifest": manifest, "site_id": f"site-{k}",
                "state_dir": paths["sites"] / f"site-{k}", "max_epsilon": float(cap) if cap else None,
                "config": _path(run_config["config"]) if run_config.get("config") else None,
                "simulation": True}
    raise InputError("node config names no site: give manifest, site-id, state-dir and max-epsilon "
                     "(flower-supernode --node-config)", key="manifest")


def site_config(spec: dict, run_config: dict):
    """The study config the site trains with. Only in simulation may the run config change it."""
    from clinfuse.config import config_from_dict, load_config

    cfg = load_config(spec["config"])
    if spec["simulation"] and run_config.get("target-epsilon"):
        data = cfg.model_dump(mode="json")
        data["privacy"]["target_epsilon"] = float(run_config["target-epsilon"])
        cfg = config_from_dict(data, source="run config target-epsilon")
    return cfg


def open_site(context: Context, run_config: dict):
    """A fresh :class:`SiteRuntime` for this message (state re-read from the site's state dir).

    Nothing is kept in memory between messages on purpose: in simulation one worker serves
    several sites in turn, and the accountant on disk is the only truth.
    """
    from clinfuse.federation.site_runtime import SiteRuntime

    spec = site_spec(dict(context.node_config), run_config)
    cfg = site_config(spec, run_config)
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    cap = spec["max_epsilon"] if spec["max_epsilon"] is not None else cfg.privacy.target_epsilon
    return SiteRuntime(cfg, spec["manifest"], site_id=spec["site_id"], state_dir=spec["state_dir"],
                       max_epsilon=cap)


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------

def _reported(exc: BaseException, where: str) -> RuntimeError:
    """What the server learns of a site's exception: its type (and key for bad input), no text."""
    _log.error("%s failed:\n%s", where, "".join(traceback.format_exception(exc)))
    key = getattr(exc, "key", None)
    return RuntimeError(f"{where} failed with {type(exc).__name__}" + (f" (key {key})" if key else "")
                        + "; details are in the site's log")


def _round_config(msg: Message) -> dict:
    return dict(msg.content[CONFIG]) if CONFIG in msg.content.config_records else {}


def _quiet_known_warnings() -> None:
    """Silence two warnings every round would repeat (both are documented in docs/federation.md):
    Opacus' secure-RNG notice (torchcsprng is not installable here) and torch's note that a
    full backward hook fires without input gradients (Opacus hooks on the first layer)."""
    import warnings

    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")


def train_reply(msg: Message, context: Context, run_config: dict) -> Message:
    """Train one round on this site (or decline) and build the reply."""
    _quiet_known_warnings()
    started = time.perf_counter()
    site = None
    try:
        site = open_site(context, run_config)
        config = _round_config(msg)
        sent = msg.content[ARRAYS]
        state = {k: a.numpy() for k, a in sent.items()}
        setup_s = time.perf_counter() - started
        t0 = time.perf_counter()
        result = site.train_round(
            state, server_round=int(config.get("server-round", 0)),
            rounds=int(config.get("num-rounds", site.cfg.federation.rounds)),
            local_epochs=int(config.get("local-epochs", site.cfg.federation.local_epochs)),
            run_id=str(config.get("run-id", msg.metadata.run_id)),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            modality_aware=bool(config.get("modality-aware", True)))
        train_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - any failure is reported by type only
        raise _reported(exc, f"site {site.site_id if site else '?'} training") from None
    metrics = {NUM_EXAMPLES: int(result.num_examples), DECLINED: int(result.declined),
               "train-seconds": train_s, "setup-seconds": setup_s}
    metrics.update({f"examples-{m}": int(n) for m, n in result.modality_examples.items()})
    metrics.update({k.replace("_", "-"): float(v) for k, v in result.metrics.items()
                    if k != "declined" and v is not None})
    site_record = {SITE_ID: site.site_id}
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if result.declined:
        site_record[REASON] = result.declined_reason
    else:
        # Same keys, same order as received: Flower's clipping mod compares the key lists.
        content[ARRAYS] = ArrayRecord({k: Array(result.state[k]) for k in sent})
    content[SITE] = ConfigRecord(site_record)
    return Message(content, reply_to=msg)


def evaluate_reply(msg: Message, context: Context, run_config: dict) -> Message:
    """Validation metrics of the received global model on this site's validation split."""
    started = time.perf_counter()
    site = None
    try:
        site = open_site(context, run_config)
        config = _round_config(msg)
        state = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
        metrics = site.evaluate(state, server_round=int(config.get("server-round", 0)),
                                run_id=str(config.get("run-id", msg.metadata.run_id)))
    except Exception as exc:  # noqa: BLE001 - any failure is reported by type only
        raise _reported(exc, f"site {site.site_id if site else '?'} evaluation") from None
    out = {NUM_EXAMPLES: int(metrics.get("val_examples", 0)), "eval-seconds": time.perf_counter() - started}
    out.update({k.replace("_", "-"): float(v) for k, v in metrics.items()
                if k != "val_examples" and isinstance(v, (int, float))})
    content = RecordDict({METRICS: MetricRecord(out), SITE: ConfigRecord({SITE_ID: site.site_id})})
    return Message(content, reply_to=msg)


def client_dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server runs client-level DP, passing declines through.

    The server's DP wrapper puts ``clipping_norm`` in the train config; without it this mod does
    nothing. Flower's mod insists on one ArrayRecord in the reply, which a declining site does
    not send: the decline is handed back unchanged (there is no update to clip).
    """
    from flwr.clientapp.mod import fixedclipping_mod

    if CLIPPING_NORM not in _round_config(msg):
        return call_next(msg, context)
    declined: list[Message] = []

    def inner(m: Message, c: Context) -> Message:
        out = call_next(m, c)
        if not out.has_error() and ARRAYS not in out.content.array_records:
            declined.append(out)
            # a zero update for the mod to clip; the real (declining) reply is returned instead
            zero = RecordDict({ARRAYS: ArrayRecord({k: Array(a.numpy()) for k, a in m.content[ARRAYS].items()}),
                               METRICS: out.content[METRICS]})
            return Message(zero, reply_to=m)
        return out

    clipped = fixedclipping_mod(msg, context, inner)
    return declined[0] if declined else clipped


# --------------------------------------------------------------------------------------------
# SecAgg+ (Flower's legacy NumPyClient path)
# --------------------------------------------------------------------------------------------

def _legacy_client_fn(run_config: dict):
    """``client_fn`` for Flower's legacy ClientApp: a NumPyClient over the same SiteRuntime."""

    def client_fn(context: Context):
        from flwr.client import NumPyClient

        _quiet_known_warnings()
        # secaggplus_mod logs every protocol stage at DEBUG
        logging.getLogger("flwr").setLevel(max(logging.getLogger("flwr").level, logging.INFO))

        class SiteNumPyClient(NumPyClient):
            """SecAgg+ sums ``num_examples * weights``: a declining site sends weight 0."""

            def _site_and_keys(self):
                from clinfuse.training.checkpoint import build_model_for

                site = open_site(context, run_config)
                return site, list(build_model_for(site.cfg).state_dict().keys())

            def fit(self, parameters, config):
                site, keys = self._site_and_keys()
                try:
                    t0 = time.perf_counter()
                    result = site.train_round(
                        dict(zip(keys, parameters)), server_round=int(config.get("server-round", 0)),
                        rounds=int(config.get("num-rounds", site.cfg.federation.rounds)),
                        local_epochs=int(config.get("local-epochs", site.cfg.federation.local_epochs)),
                        run_id=str(config.get("run-id", "")), proximal_mu=float(config.get("proximal-mu", 0.0)),
                        modality_aware=False)
                    train_s = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001 - reported by type only
                    raise _reported(exc, f"site {site.site_id} training") from None
                metrics = {SITE_ID: site.site_id, DECLINED: int(result.declined), "train-seconds": train_s}
                metrics.update({k.replace("_", "-"): float(v) for k, v in result.metrics.items()
                                if k != "declined" and v is not None})
                if result.declined:
                    metrics[REASON] = result.declined_reason
                    return list(parameters), 0, metrics
                return [result.state[k] for k in keys], int(result.num_examples), metrics

            def evaluate(self, parameters, config):
                site, keys = self._site_and_keys()
                try:
                    metrics = site.evaluate(dict(zip(keys, parameters)),
                                            server_round=int(config.get("server-round", 0)))
                except Exception as exc:  # noqa: BLE001 - reported by type only
                    raise _reported(exc, f"site {site.site_id} evaluation") from None
                n = int(metrics.get("val_examples", 0))
                out = {k.replace("_", "-"): float(v) for k, v in metrics.items()
                       if k != "val_examples" and isinstance(v, (int, float))}
                out[SITE_ID] = site.site_id
                return float(metrics.get("val_loss", 0.0)), n, out

        return SiteNumPyClient().to_client()

    return client_fn


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------

class ClinfuseClientApp(ClientApp):
    """A ClientApp serving both clinfuse paths: the Message API (default) and, when the run config
    says ``secagg=true``, Flower's legacy SecAgg+ client (which only exists as a ``client_fn`` app).

    ``run_config`` (optional) is merged over the run's ``context.run_config``: the programmatic
    simulation passes its settings here (``run_simulation`` gives apps an empty run config).
    """

    def __init__(self, run_config: dict | None = None, mods: list | None = None):
        super().__init__(mods=mods)
        self.overrides = dict(run_config or {})
        self._extra_mods = list(mods or [])
        self._legacy: ClientApp | None = None

        @self.train(mods=[client_dp_clipping_mod])
        def _train(msg: Message, context: Context) -> Message:
            return train_reply(msg, context, self.run_config(context))

        @self.evaluate()
        def _evaluate(msg: Message, context: Context) -> Message:
            return evaluate_reply(msg, context, self.run_config(context))

    def run_config(self, context: Context) -> dict:
        return {**dict(context.run_config), **self.overrides}

    def __call__(self, message: Message, context: Context) -> Message:
        run_config = self.run_config(context)
        if _truthy(run_config.get("secagg")):
            if self._legacy is None:
                from flwr.client.mod import fixedclipping_mod, secaggplus_mod

                mods = [*self._extra_mods, secaggplus_mod]
                if _truthy(run_config.get("client-dp")):
                    mods.append(fixedclipping_mod)
                self._legacy = ClientApp(client_fn=_legacy_client_fn(run_config), mods=mods)
            return self._legacy(message, context)
        return super().__call__(message, context)


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def make_client_app(run_config: dict | None = None, mods: list | None = None) -> ClinfuseClientApp:
    """A ClientApp with ``run_config`` overrides and extra app-wide ``mods`` (tests record messages)."""
    return ClinfuseClientApp(run_config, mods)


app = make_client_app()
