"""The coordinator's run directory: a checkpoint every round, a history, and resume.

Layout of ``run_dir``::

    history.json               the study's runs, one record per completed round (rewritten atomically)
                               and ``warm_start``: the public-data checkpoint round 1 started from
    checkpoints/round-0003.pt  the global model after round 3 (clinfuse checkpoint format)
    global.pt                  the latest global model (same format; what ``clinfuse evaluate`` reads)

Every round the checkpoint is written first, then ``global.pt``, then ``history.json``; each write
goes to a temporary file that is renamed into place. A crash between the writes leaves a
checkpoint the history does not name yet, and resuming repeats that round: a site's spent
epsilon is in its own accountant, never in these files, so a repeated round is counted again
and privacy loss is never under-reported.

This module knows nothing of Flower: it stores numpy state dicts, JSON records and an opaque
``strategy_state`` (e.g. FedAdam's moments) that the server hands it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clinfuse.config import Config
from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_bytes, atomic_write_json, to_jsonable

HISTORY_FORMAT = "clinfuse-federated-history/1"


@dataclass
class RoundCheckpoint:
    """The state to resume from: the round it completed, its global weights and strategy state."""
    round: int
    state: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    path: Path


def _to_tensors(obj):
    """Numpy arrays -> tensors so the checkpoint loads with ``torch.load(weights_only=True)``."""
    import torch

    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_tensors(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj


def _to_numpy(obj):
    import torch

    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_numpy(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    return obj


class RunDir:
    """A federated run's directory on the coordinator.

    Parameters
    ----------
    path: the run directory (created on :meth:`begin`).

    Use: ``first = run.begin(cfg, settings, resume=...)``; after each round
    ``run.save_round(r, state, cfg, record, strategy_state=...)``; ``run.last()`` is the
    checkpoint to resume from; ``run.history()`` the completed rounds.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- files ----------------------------------------------------------------------------------
    @property
    def history_path(self) -> Path:
        return self.path / "history.json"

    @property
    def global_path(self) -> Path:
        return self.path / "global.pt"

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:04d}.pt"

    def _read(self) -> dict | None:
        if not self.history_path.exists():
            return None
        try:
            doc = json.loads(self.history_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"unreadable run history ({exc})", file=self.history_path) from None
        if not isinstance(doc, dict) or doc.get("format") != HISTORY_FORMAT:
            raise InputError(f"not a clinfuse run history (expected format {HISTORY_FORMAT})",
                             file=self.history_path)
        if not isinstance(doc.get("rounds"), list) or not isinstance(doc.get("runs"), list):
            raise InputError("corrupt run history (no 'rounds' or 'runs' list)", file=self.history_path)
        return doc

    def _write(self, doc: dict) -> None:
        atomic_write_json(self.history_path, to_jsonable(doc))

    # -- queries --------------------------------------------------------------------------------
    def history(self) -> list[dict]:
        """Completed rounds, oldest first (empty for a new run directory)."""
        doc = self._read()
        return list(doc["rounds"]) if doc else []

    def document(self) -> dict | None:
        """The whole history document (runs and rounds), or ``None`` before the first run."""
        return self._read()

    def last(self) -> RoundCheckpoint | None:
        """The checkpoint of the last completed round, or ``None`` when no round completed."""
        from clinfuse.training.checkpoint import read_checkpoint, state_dict_hash

        rounds = self.history()
        if not rounds:
            return None
        record = rounds[-1]
        path = self.checkpoint_path(int(record["round"]))
        payload = read_checkpoint(path)
        if record.get("model_hash") and payload.get("model_hash") != record["model_hash"]:
            raise InputError(f"checkpoint does not match the history's round {record['round']} "
                             f"(model hash differs); restore it or start a new run directory", file=path)
        if state_dict_hash(payload["state_dict"]) != payload.get("model_hash"):
            raise InputError("checkpoint weights do not match their recorded hash (corrupt file)", file=path)
        federation = payload.get("federation") or {}
        state = {k: v.numpy() for k, v in payload["state_dict"].items()}
        strategy_state = _to_numpy(payload.get("strategy_state") or {})
        return RoundCheckpoint(int(federation.get("round", record["round"])), state, strategy_state, path)

    # -- writing --------------------------------------------------------------------------------
    def begin(self, cfg: Config, settings: dict, *, resume: bool, num_rounds: int,
              warm_start: dict | None = None) -> int:
        """Open the run; returns the first round to run (1, or the round after the last checkpoint).

        A fresh start refuses a directory that already holds rounds (pass ``resume``); a resume
        refuses a different study configuration, which would mix two models in one history.
        A resume that finds no completed round starts at round 1. ``warm_start`` (the provenance of
        the public-data checkpoint round 1 starts from) is kept as the history's ``warm_start``
        and copied into every round's checkpoint; a resume keeps the one recorded.
        """
        doc = self._read()
        done = len(doc["rounds"]) if doc else 0
        if doc and done and not resume:
            raise InputError(f"this run directory already holds rounds 1..{done}; resume it "
                             f"(--resume / run-config resume=true) or use a new run directory",
                             file=self.path)
        if doc and doc.get("config_hash") != cfg.digest():
            if done:
                raise InputError(f"the run was started with config hash {doc.get('config_hash', '?')[:12]}, "
                                 f"this config is {cfg.digest()[:12]}: resume with the same study config",
                                 file=self.history_path, key="config")
            doc = None  # nothing completed: the old history records nothing worth keeping
        if done >= num_rounds:
            raise InputError(f"the run already completed {done} of {num_rounds} rounds; raise num-rounds "
                             f"to continue it", file=self.history_path, key="num-rounds")
        if doc is None:
            doc = {"format": HISTORY_FORMAT, "study": cfg.study, "config_hash": cfg.digest(),
                   "config": cfg.model_dump(mode="json"), "runs": [], "rounds": []}
        if not done:
            doc["warm_start"] = warm_start
        from clinfuse.environment import versions

        doc["runs"].append({"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "first_round": done + 1,
                            "num_rounds": num_rounds, "resumed": bool(resume and done), "settings": settings,
                            "versions": versions()})
        self.path.mkdir(parents=True, exist_ok=True)
        self._write(doc)
        return done + 1

    def save_round(self, server_round: int, state: dict[str, np.ndarray], cfg: Config, record: dict, *,
                   strategy_state: dict | None = None, privacy: dict | None = None) -> Path:
        """Checkpoint the global model after ``server_round`` and append ``record`` to the history.

        ``record`` is the round's JSON summary (sites, epsilon, metrics); ``model_hash`` and the
        checkpoint path are added to it. Rounds must be saved in order.
        """
        from clinfuse.training.checkpoint import (
            build_model_for,
            clean_state_dict,
            save_checkpoint,
            state_dict_hash,
        )

        doc = self._read()
        if doc is None:
            raise RuntimeError("RunDir.begin() must be called before save_round()")
        expected = len(doc["rounds"]) + 1
        if server_round != expected:
            raise ValueError(f"round {server_round} saved out of order: the history expects round {expected}")
        model = build_model_for(cfg)
        model.load_state_dict({k: _to_tensors(np.asarray(v)) for k, v in state.items()})
        path = self.checkpoint_path(server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {"federation": {"round": server_round, "study": cfg.study},
                 "strategy_state": _to_tensors(strategy_state or {}), "warm_start": doc.get("warm_start")}
        save_checkpoint(path, model, cfg, metrics=to_jsonable(record.get("val") or {}),
                        privacy=to_jsonable(privacy or {"enabled": cfg.privacy.enabled, "epsilon": None}),
                        extra=extra)
        atomic_write_bytes(self.global_path, path.read_bytes())
        doc["rounds"].append({**record, "round": server_round, "model_hash": state_dict_hash(clean_state_dict(model)),
                              "checkpoint": str(path.relative_to(self.path))})
        self._write(doc)
        return path

    def amend_round(self, server_round: int, fields: dict) -> None:
        """Update the history record of an already saved round with ``fields`` (its evaluation,
        which a study folding evaluation into the next round's train exchange learns later).
        The checkpoint is left as saved; its ``model_hash`` and path stay in the record."""
        doc = self._read()
        if doc is None:
            raise RuntimeError("RunDir.begin() must be called before amend_round()")
        for record in doc["rounds"]:
            if record.get("round") == server_round:
                record.update({k: v for k, v in fields.items() if k not in ("round", "model_hash", "checkpoint")})
                self._write(doc)
                return
        raise ValueError(f"round {server_round} is not in the history")

    def finish(self, summary: dict) -> None:
        """Record the end of the current run (final metrics, epsilon per site)."""
        doc = self._read()
        if doc is None or not doc["runs"]:
            raise RuntimeError("RunDir.begin() must be called before finish()")
        doc["runs"][-1].update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary)
        self._write(doc)

