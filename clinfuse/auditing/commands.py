"""``clinfuse audit``: what a privacy officer runs before approving and after running a study.

- ``audit verify LEDGER [LEDGER ...] [--public-key [SITE=]KEY] [--roster FILE] [--history FILE]
  [--json] [--out DIR]``: hash chains, signatures against the sites' trusted keys, the
  coordinator's recorded ledger heads, recomputed epsilon (RDP, PRV, PLD bracket), findings,
  federation summary, remaining budget. Exit 0 clean, 1 findings, 2 bad input.
- ``audit plan --sample-rate Q --steps T --delta D (--noise-multiplier S | --target-epsilon E)``:
  epsilon per accountant, or the noise multiplier each accountant needs for a target.
  ``audit plan --state-dir D``: the site's signed plan, its epsilon table recomputed by a fresh
  accountant (exit 1 if they disagree) and where the site's spend stands in it.
- ``audit empirical --config C --manifest M [--state-dir D]``: one-run canary audit of
  clinfuse's own DP-SGD code at the site's settings (exit 0 pass, 1 violation).
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
    v.add_argument("--public-key", action="append", default=[], metavar="[SITE=]KEY",
                   help="a site's trusted public key (base64, from 'clinfuse site key') or fingerprint "
                        "(SHA256:...); SITE= may be left out with a single ledger; repeat for several sites")
    v.add_argument("--roster", type=Path, metavar="FILE",
                   help="the study's roster (YAML/JSON): the trusted public key or fingerprint of each site")
    v.add_argument("--history", type=Path, metavar="FILE",
                   help="the coordinator's run history (RUN_DIR/history.json): every ledger head it recorded "
                        "must be in the site's chain, and the public key it recorded is trusted when no "
                        "other key is given")
    v.set_defaults(handler=_verify)

    p = sub.add_parser("plan", help="epsilon per accountant for given DP-SGD settings (or the inverse), or a "
                                    "site's signed plan",
                       description="Epsilon of Poisson-subsampled DP-SGD under each accountant, or with "
                                   "--target-epsilon the noise multiplier each accountant needs. With --state-dir: "
                                   "the site's signed privacy plan, its epsilon table checked against a fresh "
                                   "accountant (exit 1 if they disagree), and the site's spend.")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="show and check this site's signed plan instead")
    p.add_argument("--sample-rate", type=positive_float, metavar="Q",
                   help="Poisson sampling probability per step (expected batch size / patients)")
    p.add_argument("--steps", type=positive_int, metavar="T", help="number of DP-SGD steps")
    p.add_argument("--delta", type=positive_float, metavar="D", help="delta (below 1/patients)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--noise-multiplier", type=nonneg_float, metavar="S", help="noise multiplier")
    which.add_argument("--target-epsilon", type=positive_float, metavar="E",
                       help="target epsilon: print the noise multiplier per accountant instead")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                   help="time limit per accountant computation (default 60)")
    p.set_defaults(handler=_plan)

    e = sub.add_parser("empirical", help="one-run canary audit of clinfuse's DP-SGD code at the site's settings",
                       description="Shadow DP-SGD run through clinfuse's own DP engine (the trainer's DPEngine, "
                                   "its per-sample gradients, flat clipping and noise, Poisson sampling) at the "
                                   "site's noise multiplier, clipping norm and sample rate, with white-box "
                                   "canaries each included with probability 1/2; the epsilon lower bound at 95% "
                                   "confidence (Steinke, Nasr & Jagielski 2023) is compared with the epsilon the "
                                   "settings claim. Exit 0 pass, 1 violation.")
    e.add_argument("--config", type=Path, default=None, help="study config (default: the bundled demo study)")
    e.add_argument("--manifest", type=Path, required=True, help="the site's manifest")
    e.add_argument("--state-dir", type=Path, default=None,
                   help="audit the plan this site signed (its ledger, verified with its key) instead of "
                        "planning from the config")
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

def _trusted_keys(args):
    from clinfuse.privacy.audit import TrustedKeys
    from clinfuse.privacy.roster import Roster

    by_site, sources, default = {}, {}, None
    if args.roster:
        by_site = {site: entry.fingerprint for site, entry in Roster.load(args.roster).entries.items()}
        sources = dict.fromkeys(by_site, f"the roster {args.roster}")
    for value in args.public_key:
        site, _, key = value.partition("=")
        if not key.strip("="):  # no SITE=: the '=' was the base64 key's own padding
            site, key = "", value
        if not key:
            raise InputError(f"--public-key {value!r}: no key given", key="--public-key")
        if site:
            by_site[site], sources[site] = key, "--public-key"
        else:
            default = key
    if not by_site and default is None:
        return None
    return TrustedKeys(by_site, default, sources)


def _verify(args) -> int:
    from clinfuse.privacy.audit import format_text, to_json, verify_ledgers, write_report

    report = verify_ledgers(args.ledgers, timeout_s=args.timeout, trusted=_trusted_keys(args), history=args.history)
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

    if args.state_dir is not None:
        given = [o for o, v in (("--sample-rate", args.sample_rate), ("--steps", args.steps), ("--delta", args.delta),
                                ("--noise-multiplier", args.noise_multiplier),
                                ("--target-epsilon", args.target_epsilon)) if v is not None]
        if given:
            raise InputError(f"--state-dir shows the site's own plan: drop {', '.join(given)}", key=given[0])
        return _site_plan(args)
    missing = [o for o, v in (("--sample-rate", args.sample_rate), ("--steps", args.steps), ("--delta", args.delta))
               if v is None]
    if args.noise_multiplier is None and args.target_epsilon is None:
        missing.append("--noise-multiplier or --target-epsilon")
    if missing:
        raise InputError(f"give {', '.join(missing)} (or --state-dir for a site's signed plan)", key=missing[0])
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


def _site_plan(args) -> int:
    """The signed plan in a state dir, its table recomputed, and the site's spend against it."""
    from clinfuse.privacy.accountant import SiteAccountant, compute_epsilon, merge_history
    from clinfuse.privacy.plan import describe_plan
    from clinfuse.privacy.site_state import SitePrivacyState

    state = SitePrivacyState(args.state_dir, create=False)
    entries = state.entries()  # chain and signatures against the site's key
    found = state.plans.current(entries)
    if found is None:
        raise InputError("this site has no signed privacy plan yet (it plans at its first round)",
                         file=state.plans.path)
    plan, entry = found
    state.mechanism = plan.accountant
    prior = [tuple(h) for h in plan.prior_history]
    rows, worst = [], 0.0
    for epochs, tabulated in enumerate(plan.epsilon_table, start=1):
        history = merge_history(prior + [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_epoch * epochs)])
        fresh, used = compute_epsilon(history, plan.delta, mechanism=plan.accountant, timeout_s=args.timeout)
        diff = None if tabulated is None or used != plan.accountant else abs(fresh - tabulated)
        worst = max(worst, diff or 0.0)
        rows.append({"epoch": epochs, "tabulated": tabulated, "recomputed": fresh, "accountant": used,
                     "difference": diff})
    spent_history = state.spent_history(entries)
    spent = SiteAccountant(None, mechanism=plan.accountant, timeout_s=args.timeout)
    spent.replace_history(spent_history)
    spent_epsilon = spent.epsilon(plan.delta)
    agrees = worst <= 1e-6
    if args.json:
        from clinfuse.fileio import to_jsonable

        print(json.dumps(to_jsonable({"state_dir": str(args.state_dir), "ledger_seq": entry.get("seq"),
                                    "replan": bool(entry.get("replan")), "plan": plan.to_dict(), "table": rows,
                                    "table_agrees": agrees, "spent_epsilon": spent_epsilon,
                                    "spent_steps": spent.steps}), indent=2))
        return 0 if agrees else 1
    print(f"privacy plan of {args.state_dir} (study '{plan.study}'), signed at ledger seq {entry.get('seq')}"
          + (f" (a re-plan: {entry.get('reason')})" if entry.get("replan") else ""))
    for line in describe_plan(plan):
        print(f"  {line}")
    print(f"  {'epoch':>5} {'tabulated':>10} {'recomputed':>10} {'|diff|':>9}")
    for r in rows:
        tab = "-" if r["tabulated"] is None else f"{r['tabulated']:.6f}"
        diff = "-" if r["difference"] is None else f"{r['difference']:.1e}"
        print(f"  {r['epoch']:>5} {tab:>10} {r['recomputed']:>10.6f} {diff:>9}")
    print(f"  table {'agrees with' if agrees else 'DISAGREES with'} a fresh {plan.accountant.upper()} accountant "
          f"(largest difference {worst:.1e}, tolerance 1e-6)")
    print(f"  spent so far (signed ledger): epsilon {spent_epsilon:.4f} over {spent.steps} steps at delta {plan.delta:g}")
    return 0 if agrees else 1


def _empirical(args) -> int:
    import numpy as np
    import torch

    from clinfuse.auditing.empirical import run_empirical_audit
    from clinfuse.config import load_config
    from clinfuse.privacy.canary import plan_audit
    from clinfuse.privacy.plan import plan_privacy
    from clinfuse.training.checkpoint import build_model_for
    from clinfuse.training.commands import load_split_datasets
    from clinfuse.training.dp_engine import choose_grad_sample_mode
    from clinfuse.training.trainer import seed_everything

    cfg = load_config(args.config)
    if args.canaries < 10:
        raise InputError("--canaries must be at least 10", key="--canaries")
    seed_everything(args.seed)
    datasets, _ = load_split_datasets([args.manifest], cfg)
    train = datasets["train"]
    n_patients = len(train)  # one item per patient
    if n_patients < 2:
        raise InputError("the manifest has fewer than 2 training patients", file=args.manifest)
    epochs = args.epochs or cfg.federation.rounds * cfg.federation.local_epochs

    # What the settings claim: the site's signed plan, or the plan the config gives. What is
    # applied: that plan's noise, unless --applied-noise-multiplier simulates a broken run.
    if args.state_dir is not None:
        from clinfuse.privacy.site_state import SitePrivacyState

        plan = SitePrivacyState(args.state_dir, mechanism=cfg.privacy.accountant,
                                create=False).plan_in_force(cfg, n_patients)
        if plan is None:
            raise InputError(f"the site has no signed plan for study '{cfg.study}' yet", file=args.state_dir)
    else:
        plan = plan_privacy(cfg, n_patients, epochs, tabulate=False)
    applied = args.applied_noise_multiplier if args.applied_noise_multiplier is not None else plan.noise_multiplier
    mechanism = plan.accountant

    notes = []
    sample_rate, steps = plan.sample_rate, args.steps
    if steps is None:
        sample_rate, steps, note = plan_audit(plan.noise_multiplier, plan.sample_rate, plan.horizon_steps,
                                              plan.delta, args.canaries, mechanism=mechanism)
        if note:
            notes.append(note)

    model = build_model_for(cfg)
    mode = choose_grad_sample_mode(model, cfg.privacy.grad_sample_mode)
    background = None
    if args.background > 0:
        from torch.utils.data import DataLoader, Subset

        # One item per patient, as in DP training (the patient is the privacy unit), collated as
        # the trainer's loader does (the dict batch of clinfuse.data.dataset).
        count = min(args.background, len(train))
        subset = Subset(train, np.random.default_rng(args.seed).permutation(len(train))[:count].tolist())
        background = DataLoader(subset, batch_size=min(32, count), collate_fn=train.collate)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    dim = sum(p.numel() for p in model.parameters())
    # Per-group clipping bounds each patient's whole gradient by privacy.max_grad_norm and Opacus
    # scales the noise to that bound: the flat shadow run at that norm is the same mechanism.
    result = run_empirical_audit(model if background is not None else dim, noise_multiplier=plan.noise_multiplier,
                                 max_grad_norm=plan.max_grad_norm, sample_rate=sample_rate, steps=steps,
                                 n_canaries=args.canaries, seed=args.seed, delta=plan.delta,
                                 applied_noise_multiplier=applied, data=background,
                                 max_background=args.background, accountant=mechanism, grad_sample_mode=mode,
                                 progress=False if args.quiet else None)
    result.notes[:0] = notes
    if args.json:
        from clinfuse.fileio import to_jsonable

        print(json.dumps(to_jsonable({"site_manifest": str(args.manifest), "patients": n_patients,
                                    "target_epsilon": plan.target_epsilon, "signed_plan": args.state_dir is not None,
                                    "site_sample_rate": plan.sample_rate, "horizon_steps": plan.horizon_steps,
                                    **result.to_dict()}), indent=2))
    else:
        print(f"empirical privacy audit: {args.manifest} ({n_patients} training patients): noise multiplier "
              f"{plan.noise_multiplier:.4g}, sample rate {plan.sample_rate:.4g}, {plan.horizon_steps} steps for "
              f"target epsilon {plan.target_epsilon:g} at delta {plan.delta:g}"
              + (" (the site's signed plan)" if args.state_dir is not None else ""))
        print(result.describe())
    sys.stdout.flush()
    return 0 if result.passed else 1
