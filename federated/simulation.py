"""Run a federated study in Flower's simulation engine from Python (``clinfuse demo``, tests).

``flwr run .`` is the other way in (it reads ``[tool.flwr.app.config]``). This module uses
``flwr.simulation.run_simulation``: deprecated in Flower 1.42 but the fastest start (no
SuperLink, no process per message: Ray actors live for the whole run and keep torch imported),
and it lets the caller hand the apps their settings directly; ``run_simulation`` itself gives
apps an empty run config.

Sites are partitions: partition ``k`` is site ``site-id-k`` (default ``site-k``) with manifest
``<cohort>/site-k/manifest.csv`` (or run config ``manifest-k``) and its private state in
``<sites-dir>/<site id>``; see :func:`clinfuse.federation.protocol.site_spec`.

Console: Flower's deprecation banner for ``run_simulation`` (a log record of the ``flwr``
logger, not a Python warning) and the "Manually terminating ClientAppActor" line each actor
logs when the run ends are dropped; each site's ``clinfuse.*`` log lines (e.g. "site-0: round 1:
training ...") reach the console through Ray, prefixed with the actor's pid, at the level of the
command that started the simulation (``clinfuse --quiet`` / ``--verbose``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable


class _DropFlowerNotices(logging.Filter):
    """Drops the two ``flwr`` log records a simulation would print on every run, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Manually terminating %s":  # logged by every actor at shutdown
            return False
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and "`run_simulation` function is deprecated" in str(record.args))


_FLOWER_NOTICES = _DropFlowerNotices()


@functools.cache
def _site_console() -> None:
    """Once per site process (Ray actor): clinfuse's logging at the command's level, Flower's
    shutdown notice dropped."""
    from clinfuse.cli import configure_logging

    configure_logging()  # the level comes from the environment the command set
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_FLOWER_NOTICES)
    flwr_logger.propagate = False  # see simulate(): Flower's own handler prints each record once


def site_console_mod(msg, context, call_next):
    """Flower mod run in each site process before its handlers: see :func:`_site_console`."""
    _site_console()
    return call_next(msg, context)


def backend_config(num_sites: int, cpus: int | None = None, parallel: int | None = None) -> dict:
    """Ray backend settings: ``cpus`` for the whole simulation, ``parallel`` sites training at once.

    Each site (Ray actor) gets ``cpus // parallel`` CPUs and as many torch threads. On a
    2-core machine the default runs 2 sites at a time with one thread each.
    """
    cpus = max(1, int(cpus or os.cpu_count() or 1))
    parallel = max(1, min(int(parallel or min(num_sites, cpus)), num_sites, cpus))
    return {
        "client_resources": {"num_cpus": max(1, cpus // parallel), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": "ERROR", "log_to_driver": True,
                      # small object store: messages are a few MB; the default reserves 30% of RAM
                      "object_store_memory": 256 * 1024 * 1024},
    }


def simulate(run_config: dict, *, num_sites: int, cpus: int | None = None, parallel: int | None = None,
             client_mods: list | None = None, on_round: Callable[[dict], None] | None = None,
             verbose: bool = False) -> dict:
    """Run the study described by ``run_config`` (server_app's keys) over ``num_sites`` simulated sites.

    ``client_mods`` are Flower mods added to every site's ClientApp (tests use one to record what
    sites send). ``on_round(record)`` is called after each round. Returns the server's run summary;
    raises what the server raised (e.g. :class:`InputError`, :class:`federated.rounds.StudyStopped`
    when the study ended early).
    """
    from flwr.simulation import run_simulation

    from federated.client_app import make_client_app
    from federated.server_app import make_server_app

    if num_sites < 1:
        from clinfuse.errors import InputError

        raise InputError(f"a simulation needs at least one site, got {num_sites}", key="sites")
    run_config = {"expected-sites": num_sites, **run_config}
    results: list[dict] = []
    server = make_server_app(run_config, on_round=on_round, results=results)
    client = make_client_app(run_config, mods=[site_console_mod, *(client_mods or [])])
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes around "(ClientAppActor pid=...)"
    flwr_logger = logging.getLogger("flwr")
    level, propagate = flwr_logger.level, flwr_logger.propagate
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(_FLOWER_NOTICES)
    # Opacus calls logging.basicConfig() on import: a root handler that would print every Flower
    # record a second time (the doubled "Manually terminating ClientAppActor" lines).
    flwr_logger.propagate = False
    # Flower colours its level names even when stderr is a log file.
    from flwr.supercore.logger import update_console_handler

    update_console_handler(colored=sys.stderr.isatty())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            run_simulation(server_app=server, client_app=client, num_supernodes=num_sites,
                           backend_config=backend_config(num_sites, cpus, parallel), verbose_logging=False)
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.propagate = propagate
        flwr_logger.removeFilter(_FLOWER_NOTICES)
    if not results:
        raise RuntimeError("the simulation ended without a result from the server (see the log above)")
    return results[0]
