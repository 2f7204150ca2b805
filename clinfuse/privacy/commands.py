"""``clinfuse audit``: what a privacy officer runs before approving and after running a study.

- ``audit verify LEDGER [LEDGER ...] [--json] [--out DIR]``: hash chains, recomputed epsilon
  (RDP, PRV, PLD bracket), findings, federation summary, remaining budget. Exit 0 clean,
  1 findings, 2 bad input.
- ``audit plan --sample-rate Q --steps T --delta D (--noise-multiplier S | --target-epsilon E)``:
  epsilon per accountant, or the noise multiplier each accountant needs for a target.
- ``audit empirical --config C --manifest M``: one-run canary audit of the site's DP-SGD
  settings (exit 0 pass, 1 violation).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from clinfuse.cli import nonneg_float, positive_float, positive_int
from clinfuse.errors import InputError


def register(subparsers) -> None:
    audit = subparsers.add_parser(
        "audit", help="privacy audit: verify ledgers, plan budgets, empirical canary audit",
        description="Privacy audit tools for a site's privacy officer.")
    sub = audit.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND")
    audit.set_defaults(handler=lambda args: (audit.print_help(), 2)[1])

    v = sub.add_parser("verify", help="verify ledgers and recompute epsilon",
                       description="Check each site ledger's hash chain, recompute epsilon from the recorded "
                                   "mechanism history (Opacus RDP and PRV, dp-accounting PLD pessimistic and "
                                   "optimistic) and report findings. Exit 0 clean, 1 findings, 2 bad input.")
    v.add_argument("ledgers", nargs="+", type=Path, metavar="LEDGER", help="a site's ledger.jsonl (one per site)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--out", type=Path, metavar="DIR", help="write report.html and report.json here")
    v.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                   help="time limit per accountant computation; beyond it RDP is used and the fallback "
                        "reported (default 60)")
    v.set_defaults(handler=_verify)

    p = sub.add_parser("plan", help="epsilon per accountant for given DP-SGD settings (or the inverse)",
                       description="Epsilon of Poisson-subsampled DP-SGD under each accountant, or with "
                                   "--target-epsilon the noise multiplier each accountant needs.")
    p.add_argument("--sample-rate", type=positive_float, required=True, metavar="Q",
                   help="Poisson sampling probability per step (expected batch size / patients)")
    p.add_argument("--steps", type=positive_int, required=True, metavar="T", help="number of DP-SGD steps")
    p.add_argument("--delta", type=positive_float, required=True, metavar="D", help="delta (below 1/patients)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--noise-multiplier", type=nonneg_float, metavar="S", help="noise multiplier")
    which.add_argument("--target-epsilon", type=positive_float, metavar="E",
                       help="target epsilon: print the noise multiplier per accountant instead")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                   help="time limit per accountant computation (default 60)")
    p.set_defaults(handler=_plan)

    e = sub.add_parser("empirical", help="one-run canary audit of the site's DP-SGD settings",
                       description="Shadow DP-SGD run (Opacus, the site's noise multiplier, clipping norm and "
                                   "sample rate) with white-box canaries, each included with probability 1/2; "
                                   "the epsilon lower bound at 95% confidence (Steinke, Nasr & Jagielski 2023) "
                                   "is compared with the epsilon the settings claim. Exit 0 pass, 1 violation.")
    e.add_argument("--config", type=Path, default=None, help="study config (default: the bundled demo study)")
    e.add_argument("--manifest", type=Path, required=True, help="the site's manifest")
    e.add_argument("--epochs", type=positive_int, default=None,
                   help="training horizon in epochs the noise is planned for (default: federation.rounds x "
                        "federation.local_epochs)")
    e.add_argument("--steps", type=positive_int, default=None,
                   help="steps to audit at the site's sample rate (default: the horizon when one run can "
                        "refute its claim, else a shorter run chosen so that it can; see the printed note)")
    e.add_argument("--canaries", type=positive_int, default=2000, help="number of canaries (default 2000)")
    e.add_argument("--seed", type=int, default=0,
                   help="seed of the shadow run: canaries, their inclusion, sampling, noise, background patients "
                        "(default 0)")
    e.add_argument("--applied-noise-multiplier", type=nonneg_float, default=None, metavar="S",
                   help="noise actually applied in the shadow run (default: what training applies); set it "
                        "below the planned value, e.g. 0, to see that the audit catches a broken run")
    e.add_argument("--background", type=int, default=256, metavar="N",
                   help="patients whose real per-sample gradients join the shadow run (0: none; default 256)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(handler=_empirical)


# --------------------------------------------------------------------------------------------

def _verify(args) -> int:
    from clinfuse.privacy.audit import format_text, to_json, verify_ledgers, write_report

    report = verify_ledgers(args.ledgers, timeout_s=args.timeout)
    if args.out:
        jpath, hpath = write_report(report, args.out)
    if args.json:
        print(to_json(report))
    else:
        print(format_text(report))
        if args.out:
            print(f"report: {hpath}\n        {jpath}")
    return 0 if report["ok"] else 1


def _plan(args) -> int:
    from clinfuse.errors import BudgetExceededError
    from clinfuse.privacy.accountant import compute_epsilon, plan_noise_multiplier

    if args.sample_rate > 1:
        raise InputError(f"the sample rate must be at most 1, got {args.sample_rate:g}", key="--sample-rate")
    if args.delta >= 1:
        raise InputError(f"delta must be below 1, got {args.delta:g}", key="--delta")
    q, steps, delta = args.sample_rate, args.steps, args.delta
    rows = []
    if args.noise_multiplier is not None:
        for mech, label, note in (("rdp", "RDP (Opacus)", "upper bound"),
                                  ("prv", "PRV (Opacus)", "upper bound, eps_error 0.01"),
                                  ("pld", "PLD pessimistic (dp-accounting)", "upper bound"),
                                  ("pld-optimistic", "PLD optimistic (dp-accounting)", "lower bound")):
            eps, used = compute_epsilon([(args.noise_multiplier, q, steps)], delta, mechanism=mech,
                                        timeout_s=args.timeout)
            if used != mech:
                note = f"{mech} timed out or failed: {used} shown"
            rows.append({"accountant": mech, "label": label, "epsilon": eps, "used": used, "note": note})
        head = (f"DP-SGD with Poisson sampling q={q:g}, noise multiplier {args.noise_multiplier:g}, "
                f"{steps} steps, delta={delta:g}")
        if args.json:
            print(json.dumps({"sample_rate": q, "noise_multiplier": args.noise_multiplier, "steps": steps,
                              "delta": delta, "accountants": [
                                  {**r, "epsilon": "inf" if math.isinf(r["epsilon"]) else r["epsilon"]}
                                  for r in rows]}, indent=2))
            return 0
        print(head)
        print(f"  {'accountant':<34} {'epsilon':>10}")
        for r in rows:
            eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.4f}"
            print(f"  {r['label']:<34} {eps:>10}   {r['note']}")
        print("  The true epsilon lies between the PLD optimistic and pessimistic values; report an upper bound.")
        return 0

    for mech, label in (("rdp", "RDP (Opacus)"), ("prv", "PRV (Opacus)"), ("pld", "PLD pessimistic (dp-accounting)")):
        try:
            sigma = plan_noise_multiplier(args.target_epsilon, q, steps, delta, mechanism=mech,
                                          timeout_s=args.timeout)
            eps, used = compute_epsilon([(sigma, q, steps)], delta, mechanism=mech, timeout_s=args.timeout)
        except BudgetExceededError as exc:
            raise InputError(str(exc), key="--target-epsilon") from None
        rows.append({"accountant": mech, "label": label, "noise_multiplier": sigma, "epsilon": eps, "used": used})
    if args.json:
        print(json.dumps({"sample_rate": q, "target_epsilon": args.target_epsilon, "steps": steps,
                          "delta": delta, "accountants": rows}, indent=2))
        return 0
    print(f"noise multiplier for epsilon <= {args.target_epsilon:g} at delta={delta:g}: Poisson sampling "
          f"q={q:g}, {steps} steps")
    print(f"  {'accountant':<34} {'noise mult.':>11} {'epsilon':>9}")
    for r in rows:
        print(f"  {r['label']:<34} {r['noise_multiplier']:>11.4f} {r['epsilon']:>9.4f}"
              + ("" if r["used"] == r["accountant"] else f"   ({r['used']} used: timed out)"))
    print("  (PLD optimistic is a lower bound on epsilon: never plan with it.)")
    return 0


def _empirical(args) -> int:
    import numpy as np
    import torch

    from clinfuse.config import load_config
    from clinfuse.privacy.canary import plan_audit, run_canary_audit
    from clinfuse.privacy.plan import plan_privacy
    from clinfuse.training.commands import load_split_datasets
    from clinfuse.training.trainer import seed_everything

    cfg = load_config(args.config)
    if args.canaries < 10:
        raise InputError("--canaries must be at least 10", key="--canaries")
    seed_everything(args.seed)
    datasets, _ = load_split_datasets([args.manifest], cfg)
    train = datasets["train"]
    n_patients = len({r.patient_id for r in train.records})
    if n_patients < 2:
        raise InputError("the manifest has fewer than 2 training patients", file=args.manifest)
    epochs = args.epochs or cfg.federation.rounds * cfg.federation.local_epochs

    # What the settings claim: the planned noise (or a positive override). What is applied: the
    # override when there is one (0 included: that is a run without noise), else the plan.
    override = cfg.privacy.noise_multiplier
    claim_cfg = cfg
    if override is not None and override <= 0:
        claim_cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"noise_multiplier": None})})
    plan = plan_privacy(claim_cfg, n_patients, epochs)
    applied = args.applied_noise_multiplier
    if applied is None:
        applied = override if override is not None else plan.noise_multiplier
    mechanism = plan.accountant

    notes = []
    sample_rate, steps = plan.sample_rate, args.steps
    if steps is None:
        sample_rate, steps, note = plan_audit(plan.noise_multiplier, plan.sample_rate, plan.horizon_steps,
                                              plan.delta, args.canaries, mechanism=mechanism)
        if note:
            notes.append(note)

    background = None
    model = None
    if args.background > 0:
        from torch.utils.data import DataLoader, Subset

        from clinfuse.data.dataset import PatientSampledDataset
        from clinfuse.training.balance import multimodal_loss
        from clinfuse.training.checkpoint import build_model_for

        model = build_model_for(cfg)
        # One row per patient, as in DP training (the patient is the privacy unit).
        patients = PatientSampledDataset(train, seed=args.seed)
        count = min(args.background, len(patients))
        subset = Subset(patients, np.random.default_rng(args.seed).permutation(len(patients))[:count].tolist())
        background = DataLoader(subset, batch_size=min(32, count))

        def loss_fn(output, batch):
            return multimodal_loss(output, batch[4], batch[3])[0].sum()
    else:
        loss_fn = None
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    dim = sum(p.numel() for p in model.parameters()) if model is not None else max(args.canaries, 10_000)
    # Per-group clipping bounds each patient's whole gradient by privacy.max_grad_norm and Opacus
    # scales the noise to that bound: the flat shadow run at that norm is the same mechanism.
    result = run_canary_audit(model if model is not None else dim, noise_multiplier=plan.noise_multiplier,
                              max_grad_norm=plan.max_grad_norm, sample_rate=sample_rate, steps=steps,
                              n_canaries=args.canaries, seed=args.seed, delta=plan.delta,
                              applied_noise_multiplier=applied, data=background, loss_fn=loss_fn,
                              max_background=args.background, accountant=mechanism,
                              progress=False if args.quiet else None)
    result.notes[:0] = notes
    if args.json:
        from clinfuse.privacy.ledger import _jsonable

        print(json.dumps(_jsonable({"site_manifest": str(args.manifest), "patients": n_patients,
                                    "target_epsilon": cfg.privacy.target_epsilon,
                                    "site_sample_rate": plan.sample_rate, "horizon_steps": plan.horizon_steps,
                                    **result.to_dict()}), indent=2))
    else:
        print(f"empirical privacy audit: {args.manifest} ({n_patients} training patients): noise multiplier "
              f"{plan.noise_multiplier:.4g}, sample rate {plan.sample_rate:.4g}, {plan.horizon_steps} steps for "
              f"target epsilon {cfg.privacy.target_epsilon:g} at delta {plan.delta:g}")
        print(result.describe())
    sys.stdout.flush()
    return 0 if result.passed else 1
