"""What the utility benchmarks share: pooled and in-process federated training, evaluation, formatting.

The federation is a loop over :meth:`clinfuse.federation.site_runtime.SiteRuntime.train_round`
and :func:`clinfuse.federation.aggregation.aggregate`, the library code the Flower app runs,
without Flower processes. Used by ``benchmarks/covid_chestxray.py`` and ``benchmarks/dp_utility.py``
(run as scripts from the repository root, which puts the repository on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

#: Plan fields of the DP training recipe, recorded where the plan has them.
RECIPE_FIELDS = ("head", "optimizer", "lr", "momentum", "ema_decay", "noise_ratio")


def train_pooled(cfg, manifests, out: Path) -> Path:
    """Non-DP training on the pooled training splits of ``manifests`` for ``cfg.train.epochs``
    epochs; returns the checkpoint ``out/model.pt``."""
    from clinfuse.training.checkpoint import build_model_for, save_checkpoint
    from clinfuse.training.commands import load_split_datasets
    from clinfuse.training.trainer import LocalTrainer, seed_everything

    seed_everything(cfg.train.seed)
    datasets, _ = load_split_datasets(manifests, cfg)
    datasets["train"].warm(progress=False)
    trainer = LocalTrainer(cfg, build_model_for(cfg), datasets["train"], plan=None, progress=False)
    history = trainer.fit(cfg.train.epochs)
    return save_checkpoint(out / "model.pt", trainer.model, cfg, metrics={"history": history},
                           privacy={"enabled": False, "epsilon": None})


def train_federated(cfg, manifests, out: Path, *, modality_aware: bool = True,
                    epsilon: float | None = None, initial: tuple[dict, dict] | None = None) -> tuple[Path, dict]:
    """``cfg.federation.rounds`` rounds of one local epoch at every site, in process.

    ``initial``: ``(weights, provenance)`` of a public-data warm start
    (:func:`clinfuse.training.warm_start.read_initial_checkpoint`); the sites' ledgers record it.

    ``epsilon`` is every site's cap (and ``cfg.privacy.target_epsilon`` should equal it) when
    ``cfg.privacy.enabled``. Each call starts fresh accountants under ``out/state``. Returns
    ``(checkpoint, info)``; ``info`` holds declined site-rounds, the last round's metrics per
    site (train loss, and whatever else the site reports) and, under DP, epsilon, delta, noise multiplier and expected batch per site.
    """
    from clinfuse.federation.aggregation import SiteUpdate, aggregate
    from clinfuse.federation.site_runtime import SiteRuntime, numpy_to_state, state_to_numpy
    from clinfuse.models.fusion import parameter_groups
    from clinfuse.training.checkpoint import build_model_for, save_checkpoint
    from clinfuse.training.trainer import seed_everything

    seed_everything(cfg.train.seed)
    model = build_model_for(cfg)
    groups = parameter_groups(model)
    global_state = initial[0] if initial else state_to_numpy(model.state_dict())
    state_root = out / "state"
    if state_root.exists():
        shutil.rmtree(state_root)  # a rerun starts fresh accountants
    sites = []
    for m in manifests:
        site_dir = state_root / m.parent.name
        checks = m.parent / ".benchmark-file-checks.json"
        if checks.is_file():
            # Only the validation verdicts of unchanged files (the runtime re-checks changed ones):
            # spares decoding every image again for each run. Accountant and ledger start empty.
            site_dir.mkdir(parents=True)
            shutil.copyfile(checks, site_dir / "file-checks.json")
        site = SiteRuntime(cfg, m, site_id=m.parent.name, state_dir=site_dir,
                           max_epsilon=epsilon if epsilon is not None else 1e9)
        if not checks.is_file() and (site_dir / "file-checks.json").is_file():
            shutil.copyfile(site_dir / "file-checks.json", checks)
        sites.append(site)
    rounds = cfg.federation.rounds
    declined, last_metrics = 0, {}
    for r in range(1, rounds + 1):
        updates = []
        for site in sites:
            res = site.train_round(global_state, server_round=r, rounds=rounds, local_epochs=1,
                                   run_id=out.name, modality_aware=modality_aware,
                                   warm_start=initial[1] if initial else None)
            if res.declined:
                declined += 1
                continue
            last_metrics[site.site_id] = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}
            updates.append(SiteUpdate(res.state, res.num_examples, res.modality_examples))
        global_state = aggregate(updates, global_state, groups=groups, modality_aware=modality_aware)
    model.load_state_dict(numpy_to_state(global_state))
    info = {"declined_site_rounds": declined, "last_round_metrics": last_metrics,
            "n_patients": {s.site_id: s.n_patients for s in sites},
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    privacy = {"enabled": False, "epsilon": None}
    if cfg.privacy.enabled:
        plans = {s.site_id: s.plan(rounds, 1) for s in sites}
        per_site = {s.site_id: s.accountant.epsilon(plans[s.site_id].delta) for s in sites}
        info.update(epsilon_per_site=per_site,
                    delta_per_site={k: p.delta for k, p in plans.items()},
                    noise_multiplier_per_site={k: p.noise_multiplier for k, p in plans.items()},
                    expected_batch_per_site={k: p.expected_batch_size for k, p in plans.items()},
                    max_grad_norm_per_site={k: p.max_grad_norm for k, p in plans.items()},
                    recipe_per_site={k: {f: getattr(p, f) for f in RECIPE_FIELDS if hasattr(p, f)}
                                     for k, p in plans.items()})
        privacy = {"enabled": True, "epsilon": max(per_site.values()), "epsilon_per_site": per_site,
                   "target_epsilon": epsilon, "privacy_unit": "patient", "level": "record (site DP-SGD)"}
    path = save_checkpoint(out / "model.pt", model, cfg, metrics=info, privacy=privacy,
                           extra={"warm_start": initial[1] if initial else None})
    return path, info


def evaluate(checkpoint: Path, manifests, out: Path) -> dict:
    """:func:`evaluate_many` of one checkpoint."""
    return evaluate_many([checkpoint], manifests, out)[0]


def evaluate_many(checkpoints, manifests, out: Path) -> list[dict]:
    """Evaluate checkpoints of one study on every site's ``test`` split, in one
    ``evaluate_checkpoints`` call (the manifests are read and their files decoded once; one set
    of patient-bootstrap resamples serves every checkpoint).

    Returns, per checkpoint in order, ``{"auroc"|"accuracy"|"balanced_accuracy": {"value",
    "ci"}, "n_patients", "n_rows", "per_site": {site: auroc entry}, "predicted_classes":
    {"threshold": k, "argmax": k}}``: the number of distinct classes predicted over the test
    patients at the threshold ``evaluate`` chose on the ``val`` rows, and at the most probable class.
    """
    import pandas as pd

    from clinfuse.evaluation.commands import evaluate_checkpoints

    checkpoints = [Path(c) for c in checkpoints]
    paths = evaluate_checkpoints(checkpoints, manifests, out, robustness=False, progress=False)
    result = json.loads(Path(paths["metrics"]).read_text())
    name_of = {Path(v["path"]).resolve(): k for k, v in result["checkpoints"].items()}
    frame = pd.read_csv(paths["predictions"])
    docs = []
    for ckpt in checkpoints:
        name = name_of[ckpt.resolve()]
        run = result["runs"][name]
        overall = run.get("overall", run)
        metrics = overall["metrics"]
        doc = {k: {"value": metrics[k]["value"], "ci": metrics[k]["ci"]}
               for k in ("auroc", "accuracy", "balanced_accuracy") if k in metrics}
        doc["n_patients"] = overall.get("n_patients")
        doc["n_rows"] = overall.get("n_rows")
        doc["per_site"] = {site: v["metrics"]["auroc"] for site, v in (run.get("per_site") or {}).items()}
        test = frame[(frame["checkpoint"] == name) & (frame["split"] == "test")]
        probs = test[[c for c in test.columns if c.startswith("prob_")]].to_numpy()
        doc["predicted_classes"] = {"threshold": int(test["predicted"].nunique()),
                                    "argmax": len(np.unique(probs.argmax(axis=1)))}
        docs.append(doc)
    return docs


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def hardware() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__}, CPU only"


def fmt_ci(entry) -> str:
    """``0.812 [0.701, 0.905]`` from ``{"value", "ci"}``; ``n/a`` when there is no value."""
    if entry is None or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci") or (None, None)
    ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "[n/a]"
    return f"{entry['value']:.3f} {ci}"
