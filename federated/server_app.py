"""The coordinator's Flower ServerApp: the study's round loop, :func:`federated.rounds.run_study`.

Its settings are the run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, ``flwr run .
--run-config 'k=v ...'``, or the ``run_config`` given to :func:`make_server_app`), read by
:class:`clinfuse.federation.run_config.RunConfig`; docs/federation.md lists every key.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federated.rounds import RoundCallback, StudyStopped, run_study


def make_server_app(run_config: dict | None = None, *, on_round: RoundCallback | None = None,
                    results: list | None = None) -> ServerApp:
    """A ServerApp running :func:`run_study` with ``run_config`` merged over the run's own.

    ``on_round(record)`` is called after each round; the run summary (also of a study that
    stopped early) is appended to ``results`` (both only useful in-process, i.e. with the
    programmatic simulation).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_study(grid, {**dict(context.run_config), **(run_config or {})}, on_round=on_round)
        except StudyStopped as stopped:
            if results is not None:
                results.append(stopped.summary)
            raise
        if results is not None:
            results.append(summary)

    return app


app = make_server_app()
