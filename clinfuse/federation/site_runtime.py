"""One hospital's side of a federated study, independent of Flower.

A :class:`SiteRuntime` holds the site's validated data and its privacy state
(:class:`clinfuse.privacy.site_state.SitePrivacyState`), all under the site's state directory:

``state_dir/site-key.pem``     the site's signing key (:attr:`SiteRuntime.key`): signs the ledger
``state_dir/ledger.jsonl``     every plan, reservation, DP training, release and refusal, signed
``state_dir/accountant.json``  the one accountant of this site, cross-checked against the ledger
``state_dir/plan.json``        copy of the DP-SGD mechanism planned once for the whole study horizon
``state_dir/file-checks.json`` what validation found in each image, volume and signal file
                               (unchanged files are not re-opened by the next round's process,
                               and keep their verdict)
``state_dir/worker.key``       secret shared by the site's ClientApp processes and its worker
                               (:mod:`clinfuse.federation.site_worker`, deployment only)

Opening a site checks its state (a refused state stops it there: a missing or older accountant,
an edited plan or a changed target, a ledger that does not verify with the site's key). Every
method that writes holds the state dir's exclusive lock; a second process gets a clear error.

Before each round the site reads, from its plan's epsilon table (or the accountant when the
history is off the plan), the epsilon it would reach after the round; if that passes
``max_epsilon`` it declines, trains nothing and says why. Otherwise it reserves the round's
steps in the ledger, trains, and settles the reservation. What it returns (``RoundResult``) is
only weights, counts, metrics and its ledger head.

Within one process (a simulation's Ray actor serves many messages) the validated manifest, its
decoded data and an untrained model of the study are kept (:func:`_site_data`,
:func:`_model_template`) and reused while the manifest, every input file it names and the study
config are unchanged; the privacy state (key, ledger, accountant, plan) is read from the state
dir at every open, since another process may have trained the site since.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clinfuse.config import Config
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
    #: ``{"seq": int, "hash": str}`` of the site's ledger after this round's entries
    ledger_head: dict | None = None
    #: wall seconds of each part of the round (:data:`ROUND_PARTS`), for the benchmark's breakdown
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def declined(self) -> bool:
        return self.declined_reason is not None


#: The parts of a site's round that :attr:`RoundResult.timings` and :attr:`SiteRuntime.open_timings`
#: time: reading and validating the manifest (or finding it in this process's cache), opening the
#: privacy state (key, ledger check, accountant), planning and accounting, decoding the data,
#: building the model, the local epochs, the signed ledger entries, evaluating.
ROUND_PARTS = ("manifest", "privacy", "accountant", "data", "model", "train", "ledger", "evaluate")


@contextmanager
def timed(timings: dict[str, float], part: str):
    """Add the wall seconds of the ``with`` block to ``timings[part]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[part] = timings.get(part, 0.0) + time.perf_counter() - started


# One process may serve several sites in turn (simulation): a few entries, least recently used
# dropped first.
_CACHE_SIZE = 8
_SITE_DATA: OrderedDict = OrderedDict()
_MODELS: OrderedDict = OrderedDict()


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _stat(path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(path), st.st_size, st.st_mtime_ns


def _still_valid(fingerprint) -> bool:
    try:
        return all(_stat(path) == (path, size, mtime) for path, size, mtime in fingerprint)
    except OSError:
        return False


def clear_caches() -> None:
    """Forget the validated manifests and model templates this process keeps (tests)."""
    _SITE_DATA.clear()
    _MODELS.clear()


def _model_template(cfg: Config):
    """An untrained model of ``cfg``'s study, built once per process and config (copy it)."""
    from clinfuse.training.checkpoint import build_model_for

    key = cfg.digest()
    model = _MODELS.get(key)
    if model is None:
        # Its random initial weights are always overwritten: drawing them must not move the
        # caller's random stream, or a seeded round would depend on which process served it.
        with torch.random.fork_rng(devices=[]):
            model = build_model_for(cfg)
    _remember(_MODELS, key, model)
    return model


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
    lock_wait_s: how long a write waits for another process holding the state dir (default: it
        refuses at once with :class:`~clinfuse.privacy.state_lock.StateLockedError`).

    For the federation layer: :attr:`key` (the site's :class:`~clinfuse.privacy.site_key.SiteKey`,
    to sign replies), :meth:`ledger_head` (to put in every reply), :attr:`public_key`.
    """

    def __init__(self, cfg: Config, manifest: str | Path, *, site_id: str, state_dir: str | Path,
                 max_epsilon: float, progress: bool = False, data_roots=(), lock_wait_s: float = 0.0):
        from clinfuse.privacy.site_state import SitePrivacyState

        if not max_epsilon > 0:
            raise InputError(f"max-epsilon must be positive, got {max_epsilon}", key="max-epsilon")
        self.cfg, self.site_id, self.max_epsilon, self.progress = cfg, site_id, float(max_epsilon), progress
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        #: wall seconds of opening the site (``manifest``, ``privacy``): see :data:`ROUND_PARTS`
        self.open_timings: dict[str, float] = {}
        with timed(self.open_timings, "manifest"):
            self.data, self.train_set, self.val_set = self._site_data(manifest, data_roots)
        with timed(self.open_timings, "privacy"):
            self.privacy = SitePrivacyState(self.state_dir, mechanism=cfg.privacy.accountant,
                                            lock_wait_s=lock_wait_s)
            self.key = self.privacy.key
            self.ledger = self.privacy.ledger
            # Checked at every open (read-only): a refused state stops the site before it answers
            # anything. The plan is checked when it is used (plan(), train_round()).
            self.accountant = self.privacy.open_accountant()

    @property
    def public_key(self) -> str:
        """The site's public key (base64): what the study's roster declares for this site."""
        return self.key.public_key

    def ledger_head(self) -> dict:
        """``{"seq": int, "hash": str}`` of the last ledger entry (``seq`` -1 before any)."""
        return self.privacy.ledger_head()

    def _site_data(self, manifest, data_roots):
        """``(data, train_set, val_set)``: the validated manifest and its datasets.

        Reused from this process's cache when the manifest, every input file it names (size and
        modification time) and the study config are as they were, and that validation skipped no
        row: a refused row is looked at again every time (a fixed file is taken, a refused one
        stays refused). Otherwise validated in full (:meth:`_read_manifest`).
        """
        from clinfuse.data.dataset import MultimodalDataset, default_cache_dir

        key = (str(Path(manifest).resolve()), self.cfg.digest(), tuple(str(r) for r in data_roots),
               str(self.state_dir.resolve()))
        cached = _SITE_DATA.get(key)
        if cached is not None and _still_valid(cached[0]):
            _remember(_SITE_DATA, key, cached)
            return cached[1:]
        _SITE_DATA.pop(key, None)
        data, inputs = self._read_manifest(manifest, data_roots)
        data.require_records()
        for line in data.skip_report():
            _log.warning("%s: %s", self.site_id, line)
        cache = default_cache_dir(manifest, self.cfg)
        train_set = MultimodalDataset([r for r in data.records if r.split == "train"], self.cfg, cache)
        val_set = MultimodalDataset([r for r in data.records if r.split == "val"], self.cfg, cache)
        if len(train_set) == 0:
            raise InputError("the site has no training rows", file=manifest)
        if inputs is not None and not data.skipped_rows:
            try:
                fingerprint = (_stat(Path(manifest)), *inputs)
            except OSError:
                fingerprint = None
            if fingerprint is not None:
                _remember(_SITE_DATA, key, (fingerprint, data, train_set, val_set))
        return data, train_set, val_set

    def _read_manifest(self, manifest, data_roots):
        """Validate the manifest in full; returns ``(data, inputs)``, ``inputs`` the
        ``(path, size, mtime_ns)`` of every input file that decoded (``None`` if unknown). A file
        that was refused (undecodable, identifying) stays refused. File findings are kept in the
        state dir, so an unchanged file is not decoded again by the next process."""
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
        try:
            inputs = sorted({tuple(stat) for key in used for stat in json.loads(key)[1]})
        except (ValueError, TypeError, IndexError):
            inputs = None  # a memo key of another form: do not cache
        return data, inputs

    # -- facts about the site that are released (counts only) ----------------------------------

    @property
    def n_patients(self) -> int:
        return len(self.train_set)  # one item per patient

    def modality_examples(self) -> dict[str, int]:
        """Training patients having each of the study's modalities (the patient is the sample)."""
        return {m: sum(p.mask[i] for p in self.train_set.samples) for i, m in enumerate(self.cfg.modality_names)}

    def num_examples(self) -> int:
        return self.n_patients

    # -- privacy plan ---------------------------------------------------------------------------
    def plan(self, rounds: int, local_epochs: int):
        """The study's mechanism, planned once for ``rounds * local_epochs`` epochs and then kept.

        A restarted server or a new run of the same study reuses the signed plan: re-planning
        mid-study would change the noise the budget was approved for. A config or cohort that
        no longer matches the plan is refused (:meth:`replan` changes it explicitly).
        """
        with self.privacy.locked():
            entries = self.privacy.entries()
            plan = self.privacy.plan_in_force(self.cfg, self.n_patients, entries=entries, repair=True)
            if plan is None:
                plan, _ = self._new_plan(rounds, local_epochs, entries, replan=False, reason=None)
            return plan

    def replan(self, rounds: int, local_epochs: int, *, reason: str):
        """Plan the study again from the current config and what was spent; returns ``(plan, entry)``.

        The explicit way to change a plan (``clinfuse site replan``): the new plan covers
        ``rounds`` more rounds within the (possibly changed) target, counting everything already
        spent, and its ledger entry says ``replan: true`` with ``reason`` and the plan it replaces.
        """
        if not reason or not reason.strip():
            raise InputError("say why the plan changes (--reason): it is written to the ledger", key="reason")
        with self.privacy.locked():
            entries = self.privacy.entries()
            return self._new_plan(rounds, local_epochs, entries, replan=True, reason=reason.strip())

    def rounds_trained(self) -> int:
        """DP rounds of this study the ledger records (what a re-plan subtracts from the horizon)."""
        return len({e.get("round") for e in self.privacy.entries()
                    if e.get("kind") == "dp-training" and e.get("study") == self.cfg.study})

    def _new_plan(self, rounds: int, local_epochs: int, entries, *, replan: bool, reason: str | None):
        from clinfuse.privacy.plan import plan_privacy

        replaces = self.privacy.plans.current(entries, study=self.cfg.study)
        accountant = self.privacy.open_accountant(repair=True, entries=entries, site=self.site_id)
        plan = plan_privacy(self.cfg, self.n_patients, rounds * local_epochs, history=accountant.history,
                            epochs_per_round=local_epochs, rounds=rounds)
        entry = self.privacy.plans.record(
            plan, self.ledger, study=self.cfg.study, config_hash=self.cfg.digest(), max_epsilon=self.max_epsilon,
            site=self.site_id, replan=replan, reason=reason,
            replaces=replaces[1].get("seq") if replaces else None)
        return plan, entry

    # -- rounds ---------------------------------------------------------------------------------
    def _model(self, global_state: dict[str, np.ndarray]):
        model = copy.deepcopy(_model_template(self.cfg))
        model.load_state_dict(numpy_to_state(global_state))
        return model

    def train_round(self, global_state: dict[str, np.ndarray], *, server_round: int, rounds: int,
                    local_epochs: int, run_id: str = "", proximal_mu: float = 0.0,
                    modality_aware: bool = True, warm_start: dict | None = None) -> RoundResult:
        """Train one round from ``global_state``; decline (train nothing) if it would pass the cap.

        ``warm_start``: the provenance of the public-data checkpoint the study started from (as the
        coordinator sends it); the first round that trains with it writes a signed ``"warm-start"``
        ledger entry (:mod:`clinfuse.training.warm_start`).
        """
        with self.privacy.locked():
            result = self._train_round(global_state, server_round=server_round, rounds=rounds,
                                       local_epochs=local_epochs, run_id=run_id, proximal_mu=proximal_mu,
                                       modality_aware=modality_aware, warm_start=warm_start)
            result.ledger_head = self.ledger_head()
            return result

    def _record_warm_start(self, provenance: dict, global_state, *, server_round: int, run_id: str) -> None:
        """A ``"warm-start"`` entry, once per study and pretrained checkpoint: where the weights the
        site trains came from, and whether the weights it received are that checkpoint's."""
        from clinfuse.training.checkpoint import state_dict_hash
        from clinfuse.training.warm_start import ledger_provenance

        recorded = ledger_provenance(provenance)
        if any(e.get("kind") == "warm-start" and e.get("study") == self.cfg.study and e.get("pretraining") == recorded
               for e in self.privacy.entries()):
            return
        received = state_dict_hash(numpy_to_state(global_state))
        self.ledger.append("warm-start", study=self.cfg.study, run_id=run_id, round=server_round,
                           pretraining=recorded, received_model_hash=received,
                           received_is_checkpoint=received == recorded.get("model_hash"), site=self.site_id)

    def _train_round(self, global_state, *, server_round, rounds, local_epochs, run_id, proximal_mu,
                     modality_aware, warm_start=None) -> RoundResult:
        from clinfuse.training.checkpoint import clean_state_dict, state_dict_hash
        from clinfuse.training.trainer import LocalTrainer, seed_everything

        t: dict[str, float] = {}
        counts = self.modality_examples()
        _log.info("%s: round %d: training %d patients (%d local epoch%s)", self.site_id, server_round,
                  self.n_patients, local_epochs, "" if local_epochs == 1 else "s")
        note = self.monitoring_note() if server_round == 1 else None
        if note:
            _log.warning(note)
        dp = self.cfg.privacy.enabled
        reservation = None
        if dp:
            with timed(t, "accountant"):
                plan = self.plan(rounds, local_epochs)
                self.accountant = self.privacy.open_accountant(repair=True, site=self.site_id)
                for history, delta, epsilon in plan.known_epsilons():
                    self.accountant.know(history, delta, epsilon)
                epsilon_before = self.accountant.epsilon(plan.delta)
                steps = plan.steps_per_epoch * local_epochs
                projected = self.accountant.projected_epsilon(plan.noise_multiplier, plan.sample_rate, steps,
                                                              plan.delta)
            if projected > self.max_epsilon:
                reason = (f"round {server_round} would raise epsilon from {epsilon_before:.3f} to "
                          f"{projected:.3f}, past this site's cap {self.max_epsilon:g}; declining")
                with timed(t, "ledger"):
                    self.ledger.append("refusal", study=self.cfg.study, run_id=run_id, round=server_round,
                                       epsilon=epsilon_before, delta=plan.delta, reason=reason, site=self.site_id)
                metrics = {"declined": 1.0, "epsilon": epsilon_before, "delta": plan.delta,
                           "max_epsilon": self.max_epsilon}
                return RoundResult(None, 0, dict.fromkeys(self.cfg.modality_names, 0), metrics, reason, timings=t)

        if warm_start:
            self._record_warm_start(warm_start, global_state, server_round=server_round, run_id=run_id)
        seed_everything(self.cfg.train.seed + 1000 * server_round)
        with timed(t, "data"):
            self.train_set.warm(self.progress)
        frozen = [m for m in self.cfg.modality_names if counts[m] == 0] if modality_aware else []
        anchor = numpy_to_state(global_state) if proximal_mu > 0 else None
        with timed(t, "model"):
            trainer = LocalTrainer(self.cfg, self._model(global_state), self.train_set, plan=plan if dp else None,
                                   accountant=self.accountant if dp else None, frozen_groups=frozen,
                                   prox_anchor=anchor, prox_mu=proximal_mu, progress=self.progress)
        if dp:
            # Before the first step: a crash during training still counts every reserved step.
            with timed(t, "ledger"):
                reservation = self.ledger.append(
                    "reservation", study=self.cfg.study, run_id=run_id, round=server_round,
                    mechanism=plan.mechanism(steps, None, plan.max_grad_norm), epsilon=projected, delta=plan.delta,
                    site=self.site_id)
        with timed(t, "train"):
            history = trainer.fit(local_epochs, desc=f"{self.site_id} round {server_round}")
        metrics = {"declined": 0.0, "train_loss": float(history[-1]["train_loss"])}
        metrics.update(self._collapse_check(trainer, history[-1], server_round))
        with timed(t, "ledger"):
            state = clean_state_dict(trainer.model)
            model_hash = state_dict_hash(state)
        if dp:
            with timed(t, "accountant"):
                epsilon = self.accountant.epsilon(plan.delta)
            metrics.update(epsilon=epsilon, delta=plan.delta, max_epsilon=self.max_epsilon,
                           noise_multiplier=plan.noise_multiplier)
            mechanism = plan.mechanism(trainer.steps, trainer.clipping, trainer.norms)
            with timed(t, "ledger"):
                self.ledger.append("dp-training", study=self.cfg.study, run_id=run_id, round=server_round,
                                   mechanism=mechanism, epsilon=epsilon, delta=plan.delta,
                                   settles=reservation["seq"], config_hash=self.cfg.digest(), model_hash=model_hash,
                                   site=self.site_id)
        num_examples = self.num_examples()
        with timed(t, "ledger"):
            self.ledger.append("release", study=self.cfg.study, run_id=run_id, round=server_round,
                               epsilon=metrics.get("epsilon"), model_hash=model_hash,
                               num_examples=num_examples, modality_examples=counts, metrics=metrics,
                               site=self.site_id)
        return RoundResult(state_to_numpy(state), num_examples, counts, metrics, None, history, timings=t)

    def _collapse_check(self, trainer, record: dict, server_round: int) -> dict:
        """Flags of a round whose model learned nothing (:func:`~clinfuse.training.trainer.collapse_flags`):
        one class predicted on the site's validation rows, or a training loss at chance. Logged
        as a warning; returned for the round's metrics."""
        from clinfuse.training.trainer import _auroc, collapse_flags, describe_collapse, predict_outputs

        predicted = auroc = None
        if len(self.val_set):
            self.val_set.warm(self.progress)
            out = predict_outputs(trainer.model, self.val_set)
            predicted = len(np.unique(out["probs"].argmax(1)))
            auroc = _auroc(out["labels"], out["probs"])
        flags = collapse_flags(record.get("train_main_loss"), predicted, self.cfg.n_classes, auroc)
        line = describe_collapse(flags)
        if line:
            _log.warning("%s: round %d: %s", self.site_id, server_round, line)
        return flags

    def monitoring_note(self) -> str | None:
        """What to say at the start of a study when this site cannot detect a collapsed model."""
        if len(self.val_set):
            return None
        return (f"{self.site_id}: no validation rows: a model that predicts a single class will not be "
                f"detected here (only a training loss at chance is)")

    def evaluate(self, global_state: dict[str, np.ndarray], *, server_round: int = 0, run_id: str = "",
                 timings: dict[str, float] | None = None) -> dict:
        """Validation metrics of the global model on this site's validation split (released, logged).

        ``timings`` (optional) gets the wall seconds of its parts (``data``, ``model``,
        ``evaluate``, ``ledger``) added.
        """
        from clinfuse.training.trainer import validation_metrics

        t = timings if timings is not None else {}
        if len(self.val_set) == 0:
            return {"val_examples": 0}
        with timed(t, "data"):
            self.val_set.warm(self.progress)
        with timed(t, "model"):
            model = self._model(global_state)
        with timed(t, "evaluate"):
            metrics = validation_metrics(model, self.val_set)
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with timed(t, "ledger"), self.privacy.locked():
            self.ledger.append("release", study=self.cfg.study, run_id=run_id, round=server_round,
                               kind_detail="evaluation", metrics=metrics, site=self.site_id)
        return metrics
