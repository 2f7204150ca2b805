"""``clinfuse train``: local (pooled or single-site) training, DP-SGD by default.

It prints one table row per epoch as the epoch ends (loss, epsilon so far, validation AUROC when
there are validation rows, seconds), or with ``--json`` one JSON object at the end.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from clinfuse.cli import add_data_root_option, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the fusion model on one or more site manifests (DP-SGD by default)",
        description="Train locally on the given manifests (pooled). Differential privacy is on unless "
                    "--no-dp is given; the accountant lives in --state-dir (default OUT/privacy) and a "
                    "second run with the same state dir continues it, within the same target epsilon.")
    p.add_argument("--config", type=Path, default=None, help="study config (default: the bundled demo study)")
    p.add_argument("--manifest", type=Path, nargs="+", required=True,
                   help="site manifest(s) (CSV or Parquet); several are pooled into one training set")
    p.add_argument("--out", type=Path, required=True, help="run directory for checkpoint and reports")
    p.add_argument("--no-dp", action="store_true", help="explicitly train WITHOUT differential privacy")
    p.add_argument("--epochs", type=positive_int, default=None, help="override train.epochs")
    p.add_argument("--state-dir", type=Path, default=None, help="where the privacy accountant and ledger live")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (history, checkpoint, privacy) instead of the table")
    add_data_root_option(p)
    p.set_defaults(handler=_train)


class EpochTable:
    """The epoch table ``clinfuse train`` prints, one row per :meth:`LocalTrainer.fit` record.

    Columns: epoch, training loss, epsilon spent so far (``dp``), validation AUROC (``val``), and
    the seconds the epoch took (``record["seconds"]``). ``n/a``: AUROC undefined (one class).
    """

    def __init__(self, *, dp: bool, val: bool):
        self.columns = [("epoch", 5), ("train loss", 10)]
        if dp:
            self.columns.append(("epsilon", 8))
        if val:
            self.columns.append(("val AUROC", 9))
        self.columns.append(("seconds", 7))

    def header(self) -> str:
        return "  ".join(f"{name:>{width}}" for name, width in self.columns)

    def row(self, record: dict) -> str:
        cells = {"epoch": str(record["epoch"]), "train loss": f"{record['train_loss']:.4f}",
                 "epsilon": f"{record['epsilon']:.3f}" if record.get("epsilon") is not None else "",
                 "val AUROC": f"{record['val_auroc']:.3f}" if record.get("val_auroc") is not None else "n/a",
                 "seconds": f"{record['seconds']:.1f}"}
        return "  ".join(f"{cells[name]:>{width}}" for name, width in self.columns)


def load_split_datasets(manifests, cfg, *, data_roots=(), report=None):
    """Read and validate manifests; return ``{split: MultimodalDataset}`` pooled over them and the SiteData list.

    ``report(line)`` (e.g. ``print``) is given the skipped-row report of every site that skipped rows.
    A site without a usable row is an :class:`InputError` that says why.
    """
    from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
    from clinfuse.data.manifest import SPLITS, read_manifest

    sites = [read_manifest(m, cfg, data_roots=data_roots) for m in manifests]
    for site in sites:
        site.require_records()
        for line in site.skip_report() if report else ():
            report(line)
    datasets = {}
    for split in SPLITS:
        parts = []
        for site in sites:
            records = [r for r in site.records if r.split == split]
            parts.append(MultimodalDataset(records, cfg, cache_dir=default_cache_dir(site.manifest, cfg)))
        if len(parts) == 1:
            datasets[split] = parts[0]
        else:
            # Cache entries are keyed by image content, so one site's cache can serve the pool.
            datasets[split] = MultimodalDataset([r for p in parts for r in p.records], cfg,
                                                cache_dir=default_cache_dir(sites[0].manifest, cfg))
    return datasets, sites


def _train(args) -> int:
    import contextlib

    import torch

    from clinfuse.config import load_config
    from clinfuse.environment import versions
    from clinfuse.errors import InputError
    from clinfuse.fileio import atomic_write_json, to_jsonable
    from clinfuse.privacy.plan import NOISE_SOURCE, check_plan_inputs, plan_privacy
    from clinfuse.privacy.site_state import ACCOUNTANT_FILE, LEDGER_FILE, SitePrivacyState
    from clinfuse.training.checkpoint import (
        build_model_for,
        clean_state_dict,
        save_checkpoint,
        state_dict_hash,
    )
    from clinfuse.training.trainer import LocalTrainer, seed_everything

    cfg = load_config(args.config)
    epochs = args.epochs or cfg.train.epochs
    if epochs < 1:
        raise InputError("--epochs must be at least 1", key="--epochs")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    progress = not args.quiet

    def say(line: str) -> None:  # the human-readable output; under --json stdout is the JSON only
        if not args.json:
            print(line, flush=True)

    datasets, _ = load_split_datasets(args.manifest, cfg, data_roots=args.data_roots,
                                      report=lambda line: print(line, file=sys.stderr))
    train_set = datasets["train"]
    if len(train_set) == 0:
        raise InputError("the manifests have no training rows", file=args.manifest[0])
    dp = cfg.privacy.enabled and not args.no_dp
    n_patients = len(train_set)  # one item per patient
    if dp:
        check_plan_inputs(cfg, n_patients)  # bad numbers are refused before anything is written
    train_set.warm(progress)
    out = args.out
    model = build_model_for(cfg)
    from clinfuse.models.fusion import format_parameter_counts, parameter_counts

    say(f"study {cfg.study}: modalities {', '.join(f'{m.name} ({m.kind})' for m in cfg.modalities)}; "
        f"{n_patients} training patients")
    say(format_parameter_counts(parameter_counts(model)))

    with contextlib.ExitStack() as stack:
        plan = accountant = ledger = reservation = None
        if dp:
            state_dir = args.state_dir or out / "privacy"
            fresh = not (state_dir / LEDGER_FILE).exists() and not (state_dir / ACCOUNTANT_FILE).exists()
            if fresh:  # plan before the state dir (and its key) is created: a refusal leaves nothing
                plan = plan_privacy(cfg, n_patients, epochs)
            privacy = SitePrivacyState(state_dir, mechanism=cfg.privacy.accountant)
            stack.enter_context(privacy.locked())  # for the whole run: one process per state dir
            accountant = privacy.open_accountant(repair=True)
            if plan is None or accountant.history:
                plan = plan_privacy(cfg, n_patients, epochs, history=accountant.history)
            for history, delta, epsilon in plan.known_epsilons():
                accountant.know(history, delta, epsilon)
            ledger = privacy.ledger
            privacy.plans.record(plan, ledger, study=cfg.study, config_hash=cfg.digest(),
                                 max_epsilon=cfg.privacy.target_epsilon)
            say(f"DP-SGD: {n_patients} patients, q={plan.sample_rate:.4f}, noise multiplier "
                f"{plan.noise_multiplier:.3f}, {plan.horizon_steps} steps, target epsilon "
                f"{plan.target_epsilon:g} at delta {plan.delta:.2e}")
            from clinfuse.privacy.plan import describe_recipe
            from clinfuse.privacy.recipe import forecast_lines

            say(describe_recipe(plan))
            for line in forecast_lines(plan):
                say(line)
            logging.getLogger(__name__).info(NOISE_SOURCE)
        else:
            say("training WITHOUT differential privacy (--no-dp or privacy.enabled: false)")
        out.mkdir(parents=True, exist_ok=True)

        val_set = datasets["val"] or None
        trainer = LocalTrainer(cfg, model, train_set, val_set=val_set, plan=plan,
                               accountant=accountant, progress=progress)
        if dp:
            # Before the first step: a crash during training still counts every reserved step.
            reservation = ledger.append(
                "reservation", study=cfg.study, mechanism=plan.mechanism(plan.horizon_steps, None, plan.max_grad_norm),
                epsilon=accountant.projected_epsilon(plan.noise_multiplier, plan.sample_rate, plan.horizon_steps,
                                                     plan.delta), delta=plan.delta)
        if val_set is None:
            say("no validation rows: a model that predicts a single class will not be detected "
                "(only a training loss at chance is)")
        table = EpochTable(dp=dp, val=val_set is not None)
        say(table.header())
        started = last = time.time()

        def on_epoch(record: dict) -> None:
            nonlocal last
            now = time.time()
            record["seconds"], last = now - last, now
            say(table.row(record))

        history = trainer.fit(epochs, on_epoch=on_epoch)
        from clinfuse.training.trainer import collapse_flags, describe_collapse

        flags = collapse_flags(history[-1].get("train_main_loss"), history[-1].get("val_predicted_classes"),
                               cfg.n_classes, history[-1].get("val_auroc"))
        history[-1].update(flags)
        if describe_collapse(flags):
            print(describe_collapse(flags), file=sys.stderr, flush=True)
        privacy_summary = trainer.privacy_summary()
        state = clean_state_dict(trainer.model)
        if dp:
            ledger.append("dp-training", study=cfg.study,
                          mechanism=plan.mechanism(trainer.steps, trainer.clipping, trainer.norms),
                          epsilon=privacy_summary["epsilon"], delta=plan.delta, settles=reservation["seq"],
                          config_hash=cfg.digest(), model_hash=state_dict_hash(state))
    metrics = {"history": history, "train_seconds": time.time() - started}
    path = save_checkpoint(out / "model.pt", trainer.model, cfg, metrics=metrics, privacy=privacy_summary)
    atomic_write_json(out / "run.json", {
        "command": "train", "manifests": [str(m) for m in args.manifest], "config": cfg.model_dump(mode="json"),
        "seed": cfg.train.seed, "privacy": privacy_summary, "versions": versions()})
    if args.json:
        print(json.dumps(to_jsonable({"checkpoint": path, "history": history, "privacy": privacy_summary,
                                      "plan": plan.to_dict() if plan else None,
                                      "train_seconds": metrics["train_seconds"]}), indent=2))
        return 0
    print(f"checkpoint: {path}")
    if dp:
        print(f"epsilon spent: {privacy_summary['epsilon']:.3f} (delta {plan.delta:.2e}, "
              f"target {plan.target_epsilon:g})")
    return 0
