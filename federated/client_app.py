"""The site's Flower ClientApp over :mod:`clinfuse.federation.protocol` (which site, what is sent).

In deployment every message starts a new process. That process imports only Flower and the
protocol, and forwards the message and its context to the site's long-lived worker
(:mod:`clinfuse.federation.site_worker`, started by the first message; node config
``site-worker=false`` handles messages in the process instead), where torch, the model and the
decoded data stay loaded. The worker runs the same handlers (:func:`serve_forwarded`).

Each reply's metrics time the parts of the message (``process-seconds``: from the ClientApp
process's start to the handler, or to forwarding; ``worker-start-seconds``: reaching the worker,
starting it included; ``import-seconds``; the site's own parts, see
:data:`clinfuse.federation.site_runtime.ROUND_PARTS`; ``handler-seconds`` in all).
"""

from __future__ import annotations

import logging
import os
import time

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from clinfuse.federation import protocol, site_worker
from clinfuse.federation.run_config import RunConfig
from federated.mods import client_dp_clipping_mod

_log = logging.getLogger("clinfuse.site")


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            started = int(fh.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", encoding="ascii") as fh:
            return max(0.0, float(fh.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return None


_first_message = True
_forwarded_startup: dict[str, float] | None = None  # the forwarding process's, while the worker serves it


def _startup_seconds() -> dict[str, float]:
    """``{"process_seconds": s}`` for the first message of this process, ``{}`` after it; in the
    site worker, the start-up of the ClientApp process that forwarded the message."""
    global _first_message
    if _forwarded_startup is not None:
        return dict(_forwarded_startup)
    if not _first_message:
        return {}
    _first_message = False
    age = _process_age()
    return {"process_seconds": age} if age is not None else {}


class ClinfuseClientApp(ClientApp):
    """Train and evaluate handlers over the site runtime. A train message without clinfuse's
    ``arrays`` record is one of Flower's legacy SecAgg+ exchanges: it goes to the legacy client
    (:func:`federated.secagg.secagg_client_app`), whatever the run config says.

    ``run_config`` (optional) is merged over the run's ``context.run_config`` (the programmatic
    simulation passes its settings here); ``mods`` wrap every message (tests record them).
    """

    def __init__(self, run_config: dict | None = None, mods: list | None = None):
        super().__init__(mods=mods)
        self.overrides, self.extra_mods = dict(run_config or {}), list(mods or [])
        self._secagg: ClientApp | None = None
        # The signature is made last, over the reply as sent (after client-DP clipping).
        self.train(mods=[self.signed, client_dp_clipping_mod])(self.train_handler)
        self.evaluate(mods=[self.signed])(self.evaluate_handler)

    def settings(self, context: Context) -> RunConfig:
        return RunConfig.parse({**dict(context.run_config), **self.overrides})

    def site_of(self, context: Context) -> tuple[RunConfig, protocol.SiteSpec]:
        settings = self.settings(context)
        return settings, protocol.site_spec(context.node_config, settings)

    def train_handler(self, msg: Message, context: Context) -> Message:
        """Train a round; first evaluate the received model when the message asks
        (:data:`~clinfuse.federation.protocol.EVALUATE_ROUND`). The reply's ``<part>-seconds``
        cover the whole message (the evaluation's parts included); ``val`` has its own."""
        startup = _startup_seconds()
        settings, spec = self.site_of(context)
        started = time.perf_counter()
        val, eval_timings = None, {}
        try:
            imports = protocol.load_site_code()
            site = protocol.open_site(spec, settings)
            state, config = protocol.received_state(msg), protocol.round_config(msg)
            if protocol.EVALUATE_ROUND in config:
                val = self._evaluate(site, state, int(config[protocol.EVALUATE_ROUND]),
                                     str(config.get(protocol.RUN_ID, msg.metadata.run_id)), eval_timings)
            result = protocol.train_site(site, state, config, run_id=str(msg.metadata.run_id))
        except Exception as exc:  # noqa: BLE001 - any failure is reported by type only
            raise protocol.reported(exc, f"site {spec.site_id} training") from None
        parts = dict(site.open_timings)
        for timings in (result.timings, eval_timings):
            for part, seconds in timings.items():
                parts[part] = parts.get(part, 0.0) + seconds
        metrics = protocol.train_metrics(result, parts, **startup, import_seconds=imports,
                                         handler_seconds=time.perf_counter() - started)
        content = protocol.train_content(spec.site_id, result, msg.content[protocol.ARRAYS].keys(), metrics, val)
        return Message(content, reply_to=msg)

    @staticmethod
    def _evaluate(site, state, server_round: int, run_id: str, timings: dict[str, float] | None = None) -> dict:
        timings = {} if timings is None else timings
        metrics = site.evaluate(state, server_round=server_round, run_id=run_id, timings=timings)
        return protocol.evaluate_metrics(metrics, **{f"{k}_seconds": v for k, v in timings.items()})

    def evaluate_handler(self, msg: Message, context: Context) -> Message:
        startup = _startup_seconds()
        settings, spec = self.site_of(context)
        started = time.perf_counter()
        try:
            imports = protocol.load_site_code()
            site = protocol.open_site(spec, settings)
            config = protocol.round_config(msg)
            metrics = self._evaluate(site, protocol.received_state(msg), int(config.get(protocol.SERVER_ROUND, 0)),
                                     str(config.get(protocol.RUN_ID, msg.metadata.run_id)))
        except Exception as exc:  # noqa: BLE001 - any failure is reported by type only
            raise protocol.reported(exc, f"site {spec.site_id} evaluation") from None
        metrics.update(protocol.metric_values({**startup, "import_seconds": imports,
                                               **{f"{k}_seconds": v for k, v in site.open_timings.items()},
                                               "handler_seconds": time.perf_counter() - started}))
        return Message(protocol.evaluate_content(spec.site_id, metrics), reply_to=msg)

    def signed(self, msg: Message, context: Context, call_next) -> Message:
        """Mod: sign the reply with the site key, over the reply as it leaves the site."""
        reply = call_next(msg, context)
        if not reply.has_error():
            protocol.sign_reply(reply, msg, self.site_of(context)[1].state_dir)
        return reply

    def worker_site(self, context: Context) -> protocol.SiteSpec | None:
        """The site whose worker this process hands messages to: in deployment, unless the node
        config says ``site-worker=false`` or the platform has no Unix sockets; never for an app
        with its own overrides or mods (the worker serves this module's :data:`app`)."""
        if self.overrides or self.extra_mods or not site_worker.AVAILABLE:
            return None
        try:
            spec = self.site_of(context)[1]
        except Exception:  # noqa: BLE001 - a bad node config is reported by the handler itself
            return None
        return spec if spec.worker else None

    def __call__(self, message: Message, context: Context) -> Message:
        spec = self.worker_site(context)
        return self.handle(message, context) if spec is None else forward(message, context, spec)

    def handle(self, message: Message, context: Context) -> Message:
        """Run the message's handler in this process (SecAgg+'s legacy exchanges included)."""
        if (message.metadata.message_type == MessageType.TRAIN
                and protocol.ARRAYS not in message.content.array_records):
            if self._secagg is None:
                from flwr.client.mod import secaggplus_mod

                from federated.mods import legacy_clipping_mod
                from federated.secagg import secagg_client_app

                self._secagg = secagg_client_app(self.settings(context),
                                                 [*self.extra_mods, secaggplus_mod, legacy_clipping_mod])
            return self._secagg(message, context)
        return super().__call__(message, context)


def forward(message: Message, context: Context, spec: protocol.SiteSpec) -> Message:
    """Hand ``message`` to the worker of site ``spec``; its reply, and the context it updated
    (Flower keeps ``context.state`` between a run's messages, SecAgg+'s keys among them), come back."""
    startup = _startup_seconds()
    try:
        _, blobs = site_worker.call(
            spec.state_dir, WORKER_HANDLER, {"startup": startup},
            [serde.message_to_proto(message).SerializeToString(), serde.context_to_proto(context).SerializeToString()])
    except site_worker.WorkerUnavailable as exc:
        _log.warning("site %s: %s; handling this message in the ClientApp process", spec.site_id, exc)
        return _handle_as_forwarded(message, context, startup)
    context.state = serde.context_from_proto(ProtoContext.FromString(blobs[1])).state
    return serde.message_from_proto(ProtoMessage.FromString(blobs[0]))


def _handle_as_forwarded(message: Message, context: Context, startup: dict[str, float]) -> Message:
    """:data:`app` handles ``message``, its replies timed with the forwarding process's ``startup``."""
    global _forwarded_startup
    _forwarded_startup = startup
    try:
        return app.handle(message, context)
    finally:
        _forwarded_startup = None


def serve_forwarded(header: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
    """The site worker's handler (:data:`WORKER_HANDLER`): a forwarded message and context in,
    the reply and the updated context out, handled by this module's :data:`app`."""
    message = serde.message_from_proto(ProtoMessage.FromString(blobs[0]))
    context = serde.context_from_proto(ProtoContext.FromString(blobs[1]))
    reply = _handle_as_forwarded(message, context, {**header.get("startup", {}),
                                                    "worker_start_seconds": header.get("client-wait-seconds", 0.0)})
    return {}, [serde.message_to_proto(reply).SerializeToString(), serde.context_to_proto(context).SerializeToString()]


WORKER_HANDLER = f"{__name__}:serve_forwarded"


def make_client_app(run_config: dict | None = None, mods: list | None = None) -> ClinfuseClientApp:
    """A ClientApp with ``run_config`` overrides and extra app-wide ``mods`` (tests record messages)."""
    return ClinfuseClientApp(run_config, mods)


app = make_client_app()
