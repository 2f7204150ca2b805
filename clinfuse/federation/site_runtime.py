"""One hospital's side of a federated study, independent of Flower.

A :class:`SiteRuntime` holds the site's validated data, its persistent privacy accountant, its
noise plan and its ledger, all under the site's state directory:

``state_dir/accountant.json``  the one accountant of this site, across rounds, processes and runs
``state_dir/plan.json``        the DP-SGD mechanism planned once for the whole study horizon
``state_dir/ledger.jsonl``     every release and refusal
``state_dir/file-checks.json`` what validation found in each image file (unchanged files are not
                               re-opened by the next round's process, and keep their verdict)

Before each round the site computes the epsilon it would reach after the round; if that passes
``max_epsilon`` it declines, trains nothing and says why. What it returns (``RoundResult``) is
only weights, counts and metrics.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clinfuse.config import MODALITIES, Config
from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_json

_log = logging.getLogger("clinfuse.site")


@dataclass
class RoundResult:
    """A site's reply for one round. ``state`` is ``None`` when the site declined."""
    state: dict[str, np.ndarray] | None
    num_examples: int
    modality_examples: dict[str, int]
    metrics: dict[str, float]
    declined_reason: str | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def declined(self) -> bool:
        return self.declined_reason is not None


def state_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def numpy_to_state(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items()}


class SiteRuntime:
    """The site's data, accountant, plan and ledger; trains and evaluates rounds.

    Parameters
    ----------
    cfg: the study configuration (shared by all sites).
    manifest: the site's manifest (validated here; unusable rows are skipped).
    site_id: the site's name in ledgers and reports.
    state_dir: persistent, private directory of this site (created if absent; must be writable).
    max_epsilon: the site's cap, set by its privacy officer; training never takes it past the cap.
    data_roots: folders of this site, besides the manifest's, that its paths may point into.
    """

    def __init__(self, cfg: Config, manifest: str | Path, *, site_id: str, state_dir: str | Path,
                 max_epsilon: float, progress: bool = False, data_roots=()):
        from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
        from clinfuse.privacy.accountant import SiteAccountant
        from clinfuse.privacy.ledger import Ledger

        if not max_epsilon > 0:
            raise InputError(f"max-epsilon must be positive, got {max_epsilon}", key="max-epsilon")
        self.cfg, self.site_id, self.max_epsilon, self.progress = cfg, site_id, float(max_epsilon), progress
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.data = self._read_manifest(manifest, data_roots)
        self.data.require_records()
        for line in self.data.skip_report():
            _log.warning("%s: %s", site_id, line)
        cache = default_cache_dir(manifest, cfg)
        self.train_set = MultimodalDataset([r for r in self.data.records if r.split == "train"], cfg, cache)
        self.val_set = MultimodalDataset([r for r in self.data.records if r.split == "val"], cfg, cache)
        if len(self.train_set) == 0:
            raise InputError("the site has no training rows", file=manifest)
        self.accountant = SiteAccountant(self.state_dir / "accountant.json", mechanism=cfg.privacy.accountant)
        self.ledger = Ledger(self.state_dir / "ledger.jsonl")

    def _read_manifest(self, manifest, data_roots):
        """Validate the manifest in full, every round: the ClientApp is a fresh process each time,
        and an image that was refused (undecodable, identifying) must stay refused. Image findings
        are kept in the state dir, so an unchanged file is not decoded again."""
        from collections import ChainMap

        from clinfuse.data.manifest import read_manifest

        path = self.state_dir / "file-checks.json"
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
            before = before if isinstance(before, dict) else {}
        except (OSError, ValueError):
            before = {}  # none yet, or unreadable: check every file again
        if not before:
            _log.info("%s: validating %s (every file is decoded once)", self.site_id, manifest)
        used: dict = {}
        data = read_manifest(manifest, self.cfg, data_roots=data_roots, file_checks=ChainMap(used, before),
                             progress=self.progress)
        if used != before:
            atomic_write_json(path, used)
        return data

    # -- facts about the site that are released (counts only) ----------------------------------

    @property
    def n_patients(self) -> int:
        return len({r.patient_id for r in self.train_set.records})

    def modality_examples(self) -> dict[str, int]:
        """Training samples per modality. Under DP the unit is the patient: count patients having it."""
        if self.cfg.privacy.enabled:
            having = {m: set() for m in MODALITIES}
            for r in self.train_set.records:
                for m, has in zip(MODALITIES, r.mask):
                    if has:
                        having[m].add(r.patient_id)
            return {m: len(v) for m, v in having.items()}
        return {m: sum(r.mask[i] for r in self.train_set.records) for i, m in enumerate(MODALITIES)}

    def num_examples(self) -> int:
        return self.n_patients if self.cfg.privacy.enabled else len(self.train_set)

    # -- privacy plan ---------------------------------------------------------------------------
    def plan(self, rounds: int, local_epochs: int):
        """The study's mechanism, planned once for ``rounds * local_epochs`` epochs and then kept.

        A restarted server or a new run of the same study reuses the stored plan: re-planning
        mid-study would change the noise the budget was approved for.
        """
        from clinfuse.privacy.plan import PrivacyPlan, plan_privacy

        path = self.state_dir / "plan.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("study") == self.cfg.study and stored.get("n_patients") == self.n_patients:
                return PrivacyPlan(**{k: v for k, v in stored.items() if k in PrivacyPlan.__dataclass_fields__})
        plan = plan_privacy(self.cfg, self.n_patients, rounds * local_epochs, history=self.accountant.history)
        atomic_write_json(path, {**plan.to_dict(), "study": self.cfg.study, "rounds": rounds,
                                 "local_epochs": local_epochs})
        self.ledger.append("config", study=self.cfg.study, config_hash=self.cfg.digest(),
                           max_epsilon=self.max_epsilon, delta=plan.delta, site=self.site_id,
                           plan=plan.to_dict())
        return plan

    # -- rounds ---------------------------------------------------------------------------------
    def _model(self, global_state: dict[str, np.ndarray]):
        from clinfuse.training.checkpoint import build_model_for

        model = build_model_for(self.cfg)
        model.load_state_dict(numpy_to_state(global_state))
        return model

    def train_round(self, global_state: dict[str, np.ndarray], *, server_round: int, rounds: int,
                    local_epochs: int, run_id: str = "", proximal_mu: float = 0.0,
                    modality_aware: bool = True) -> RoundResult:
        """Train one round from ``global_state``; decline (train nothing) if it would pass the cap."""
        from clinfuse.training.checkpoint import clean_state_dict, state_dict_hash
        from clinfuse.training.trainer import LocalTrainer, seed_everything

        counts = self.modality_examples()
        _log.info("%s: round %d: training %d patients (%d local epoch%s)", self.site_id, server_round,
                  self.n_patients, local_epochs, "" if local_epochs == 1 else "s")
        dp = self.cfg.privacy.enabled
        plan = self.plan(rounds, local_epochs) if dp else None
        epsilon_before = self.accountant.epsilon(plan.delta) if dp else None
        if dp:
            steps = plan.steps_per_epoch * local_epochs
            projected = self.accountant.projected_epsilon(plan.noise_multiplier, plan.sample_rate, steps, plan.delta)
            if projected > self.max_epsilon:
                reason = (f"round {server_round} would raise epsilon from {epsilon_before:.3f} to "
                          f"{projected:.3f}, past this site's cap {self.max_epsilon:g}; declining")
                self.ledger.append("refusal", study=self.cfg.study, run_id=run_id, round=server_round,
                                   epsilon=epsilon_before, delta=plan.delta, reason=reason, site=self.site_id)
                metrics = {"declined": 1.0, "epsilon": epsilon_before, "delta": plan.delta,
                           "max_epsilon": self.max_epsilon}
                return RoundResult(None, 0, dict.fromkeys(MODALITIES, 0), metrics, reason)

        seed_everything(self.cfg.train.seed + 1000 * server_round)
        self.train_set.warm(self.progress)
        frozen = [m for m in MODALITIES if counts[m] == 0] if modality_aware else []
        anchor = numpy_to_state(global_state) if proximal_mu > 0 else None
        trainer = LocalTrainer(self.cfg, self._model(global_state), self.train_set, plan=plan,
                               accountant=self.accountant if dp else None, frozen_groups=frozen,
                               prox_anchor=anchor, prox_mu=proximal_mu, progress=self.progress)
        history = trainer.fit(local_epochs, desc=f"{self.site_id} round {server_round}")
        state = clean_state_dict(trainer.model)
        metrics = {"declined": 0.0, "train_loss": float(history[-1]["train_loss"])}
        if dp:
            epsilon = self.accountant.epsilon(plan.delta)
            metrics.update(epsilon=epsilon, delta=plan.delta, max_epsilon=self.max_epsilon,
                           noise_multiplier=plan.noise_multiplier)
            mechanism = plan.mechanism(trainer.steps, trainer.clipping, trainer.norms)
            self.ledger.append("dp-training", study=self.cfg.study, run_id=run_id, round=server_round,
                               mechanism=mechanism, epsilon=epsilon, delta=plan.delta,
                               config_hash=self.cfg.digest(), model_hash=state_dict_hash(state), site=self.site_id)
        num_examples = self.num_examples()
        self.ledger.append("release", study=self.cfg.study, run_id=run_id, round=server_round,
                           epsilon=metrics.get("epsilon"), model_hash=state_dict_hash(state),
                           num_examples=num_examples, modality_examples=counts, metrics=metrics,
                           site=self.site_id)
        return RoundResult(state_to_numpy(state), num_examples, counts, metrics, None, history)

    def evaluate(self, global_state: dict[str, np.ndarray], *, server_round: int = 0, run_id: str = "") -> dict:
        """Validation metrics of the global model on this site's validation split (released, logged)."""
        from clinfuse.training.trainer import validation_metrics

        if len(self.val_set) == 0:
            return {"val_examples": 0}
        self.val_set.warm(self.progress)
        metrics = validation_metrics(self._model(global_state), self.val_set)
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.ledger.append("release", study=self.cfg.study, run_id=run_id, round=server_round,
                           kind_detail="evaluation", metrics=metrics, site=self.site_id)
        return metrics
