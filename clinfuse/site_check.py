"""``clinfuse site check``: is this hospital ready to join a federated study?

Run by the site's engineer before starting its SuperNode, with the same values the SuperNode's
``--node-config`` will carry. Each check prints one line, ``OK``, ``WARN``, ``FAIL`` or ``SKIP``:

- ``config``     the study configuration loads
- ``data``       the manifest validates and leaves training rows (problems summarised)
- ``state dir``  the site's private state directory is writable (an atomic write is tried), its
                 ledger, if any, verifies (hash chain and every signature against the site's
                 key), and no other process holds it
- ``cap``        ``max-epsilon`` is positive; the epsilon this site has already spent (its
                 accountant, cross-checked against the signed ledger: a missing or older
                 accountant fails) is below it; once the site has a privacy plan (signed in the
                 ledger at its first round, copied to ``plan.json``), the plan still matches the
                 config and the planned next round still fits under the cap
- ``cache``      every image decodes, into the site's cache (so the first round does not pay
                 for decoding inside Flower's per-message ClientApp process)

Exit status 0 when nothing failed (the site is ready), 2 otherwise. The check changes nothing
but the image cache and a probe file it removes again: it never touches the accountant.

The ``site`` command also has the explicit state operations a site engineer may need:
``site key`` (create or show the site's signing key, for the study roster), ``site replan``
(re-plan the study after a change to its privacy settings, with a ledger entry saying why) and
``site recover`` (rebuild a missing or stale accountant state from the signed ledger).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from clinfuse.cli import add_data_root_option, positive_float, positive_int
from clinfuse.errors import InputError

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
MAX_PROBLEMS_SHOWN = 5


@dataclass
class Check:
    """One line of the checklist; ``details`` are printed indented below it."""
    name: str
    status: str
    message: str
    details: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        return [f"[{self.status:^4}] {self.name:<10} {self.message}"] + [f"{'':18}{d}" for d in self.details]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "site", help="site-side tools (check readiness before joining a study)",
        description="Tools a hospital site runs next to its data.")
    sub = p.add_subparsers(dest="site_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser(
        "check", help="check data, privacy cap, state dir and image cache before joining",
        description="Validate this site before its SuperNode joins a study: the data, the privacy cap "
                    "(and what the site's accountant has already spent), the state directory, and the "
                    "image cache (every image is decoded into it). Pass the values of the SuperNode's "
                    "--node-config. Exit 0 if ready, 2 if not.")
    c.add_argument("--manifest", type=Path, required=True, help="the site's manifest (CSV or Parquet)")
    c.add_argument("--config", type=Path, required=True, help="the study configuration (YAML)")
    c.add_argument("--state-dir", type=Path, default=None,
                   help="the site's private state directory (accountant, plan, ledger); "
                        "without it the state checks are skipped")
    c.add_argument("--max-epsilon", type=positive_float, default=None,
                   help="this site's privacy cap (default: the config's privacy.target_epsilon)")
    c.add_argument("--no-cache", action="store_true", help="skip decoding images into the cache")
    add_data_root_option(c)
    c.set_defaults(handler=_check_command)
    k = sub.add_parser(
        "key", help="print this site's public key and fingerprint (for the study's roster)",
        description="Print the public key and fingerprint of this site's signing key (created in the state "
                    "dir on first use) and the entry for the study's roster file. The private key never "
                    "leaves the state dir; the coordinator accepts replies for this site id only when "
                    "signed with it, and 'clinfuse audit verify --roster' checks the site's ledger against it.")
    k.add_argument("--state-dir", type=Path, required=True, help="the site's private state directory")
    k.add_argument("--site-id", default=None, help="this site's id (as in the SuperNode's --node-config)")
    k.set_defaults(handler=_key_command)

    r = sub.add_parser(
        "replan", help="re-plan the study's privacy after its settings changed (writes a ledger entry)",
        description="A site refuses to train when the study's privacy settings (target epsilon, delta, noise, "
                    "clipping norm, batch size, accountant) or its number of training patients no longer match "
                    "the plan it signed. This plans again for the remaining rounds, counting everything already "
                    "spent, and records the new plan in the ledger with the reason.")
    r.add_argument("--config", type=Path, required=True, help="the study configuration (YAML), as changed")
    r.add_argument("--manifest", type=Path, required=True, help="the site's manifest")
    r.add_argument("--state-dir", type=Path, required=True, help="the site's private state directory")
    r.add_argument("--reason", required=True, help="why the plan changes (written to the ledger)")
    r.add_argument("--rounds", type=positive_int, default=None,
                   help="rounds still to plan for (default: federation.rounds less the rounds already trained)")
    r.add_argument("--local-epochs", type=positive_int, default=None,
                   help="local epochs per round (default: federation.local_epochs)")
    r.add_argument("--max-epsilon", type=positive_float, default=None,
                   help="this site's cap (default: the config's privacy.target_epsilon)")
    r.add_argument("--site-id", default=None, help="the site's id (default: the one its ledger records)")
    r.set_defaults(handler=_replan_command)

    v = sub.add_parser(
        "recover", help="rebuild a missing or stale accountant state from the signed ledger",
        description="A site refuses to start when accountant.json is missing or holds less than its signed "
                    "ledger records (starting from zero would under-report epsilon). After checking the "
                    "ledger's chain and signatures against the site key, this writes accountant.json from it; "
                    "steps a readable old state holds beyond the ledger are kept.")
    v.add_argument("--state-dir", type=Path, required=True, help="the site's private state directory")
    v.add_argument("--config", type=Path, default=None,
                   help="the study configuration (its privacy.accountant; default: the accountant the ledger names)")
    v.set_defaults(handler=_recover_command)


def _check_command(args) -> int:
    import sys

    checks = check_site(args.manifest, args.config, state_dir=args.state_dir, max_epsilon=args.max_epsilon,
                        warm_cache=not args.no_cache, progress=True, data_roots=args.data_roots)
    print(format_checklist(checks))
    failed = [c for c in checks if c.status == FAIL]
    if failed:  # the reason on stderr too, for scripts that read only it
        print(f"clinfuse site check: not ready: {failed[0].name}: {failed[0].message}", file=sys.stderr)
    return 0 if ready(checks) else 2


def _key_command(args) -> int:
    from clinfuse.privacy.roster import site_key_summary

    print(site_key_summary(args.state_dir, args.site_id))
    return 0


def _replan_command(args) -> int:
    from clinfuse.config import load_config
    from clinfuse.federation.site_runtime import SiteRuntime
    from clinfuse.privacy.plan import describe_plan
    from clinfuse.privacy.site_state import SitePrivacyState

    cfg = load_config(args.config)
    if not cfg.privacy.enabled:
        raise InputError("privacy.enabled is false in the config: there is no privacy plan to make",
                         file=args.config, key="privacy.enabled")
    site_id = args.site_id or _recorded_site(SitePrivacyState(args.state_dir, create=False)) or args.state_dir.name
    cap = args.max_epsilon if args.max_epsilon is not None else cfg.privacy.target_epsilon
    site = SiteRuntime(cfg, args.manifest, site_id=site_id, state_dir=args.state_dir, max_epsilon=cap)
    rounds = args.rounds or max(cfg.federation.rounds - site.rounds_trained(), 1)
    plan, entry = site.replan(rounds, args.local_epochs or cfg.federation.local_epochs, reason=args.reason)
    print(f"re-planned {site_id} for {rounds} more round(s): ledger entry seq {entry['seq']}")
    for line in describe_plan(plan):
        print(f"  {line}")
    return 0


def _recorded_site(state) -> str | None:
    for entry in reversed(state.entries()):
        if isinstance(entry.get("site"), str) and entry["site"]:
            return entry["site"]
    return None


def _recover_command(args) -> int:
    from clinfuse.config import load_config
    from clinfuse.privacy.site_state import SitePrivacyState

    mechanism = load_config(args.config).privacy.accountant if args.config else None
    state = SitePrivacyState(args.state_dir, mechanism=mechanism or "prv", create=False)
    if state.key is None:
        raise InputError("no site key and no ledger here: nothing to recover", file=args.state_dir)
    with state.locked():
        accountant, lines = state.recover(mechanism)
    for line in lines:
        print(line)
    delta = state._last_delta(state.entries())
    if delta is not None:
        print(f"epsilon spent: {accountant.epsilon(delta):.4f} at delta {delta:g} ({accountant.mechanism})")
    return 0


def ready(checks: list[Check]) -> bool:
    """True when no check failed (warnings and skips do not stop a site from joining)."""
    return not any(c.status == FAIL for c in checks)


def format_checklist(checks: list[Check]) -> str:
    lines = [line for c in checks for line in c.lines()]
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append("")
    lines.append("READY: this site can join the study" if not failed
                 else f"NOT READY: fix {', '.join(failed)} and run the check again")
    return "\n".join(lines)


def check_site(manifest: str | Path, config: str | Path | None, *, state_dir: str | Path | None = None,
               max_epsilon: float | None = None, warm_cache: bool = True, progress: bool = False,
               data_roots=()) -> list[Check]:
    """Run every readiness check and return them in order (config, data, state dir, cap, cache).

    A check that cannot run because an earlier one failed is reported as ``SKIP``. Never raises
    for bad input: each problem is a ``FAIL`` line naming the file or key.
    """
    from clinfuse.config import load_config
    from clinfuse.errors import InputError

    checks: list[Check] = []
    try:
        cfg = load_config(config)
        checks.append(Check("config", OK, f"{config} (study '{cfg.study}', config hash {cfg.digest()[:12]})"))
    except InputError as exc:
        cfg = None
        checks.append(Check("config", FAIL, exc.describe()))

    data, data_check = ((None, Check("data", SKIP, "needs a valid config")) if cfg is None
                        else _check_data(manifest, cfg, data_roots))
    checks.append(data_check)
    checks.append(_check_state_dir(state_dir))
    state_usable = state_dir is not None and checks[-1].status != FAIL
    checks.append(_check_cap(cfg, data, Path(state_dir) if state_usable else None, max_epsilon,
                             state_dir_given=state_dir is not None))
    if not warm_cache:
        checks.append(Check("cache", SKIP, "--no-cache given"))
    elif data is None:
        checks.append(Check("cache", SKIP, "needs valid data"))
    else:
        checks.append(_check_cache(manifest, cfg, data, progress))
    return checks


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

def _check_data(manifest, cfg, data_roots=()):
    from clinfuse.data.manifest import read_manifest
    from clinfuse.errors import InputError

    try:
        data = read_manifest(manifest, cfg, data_roots=data_roots)
    except InputError as exc:
        return None, Check("data", FAIL, exc.describe())
    except OSError as exc:
        return None, Check("data", FAIL, f"{manifest}: cannot read: {exc}")
    s = data.summary(cfg.data.labels)
    details = ["splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
               "labels: " + ", ".join(f"{k} {v}" for k, v in s["labels"].items()),
               "availability: " + ", ".join(f"{m} {n}" for m, n in s["availability"].items())]
    shown = [p.describe() for p in data.problems[:MAX_PROBLEMS_SHOWN]]
    if len(data.problems) > MAX_PROBLEMS_SHOWN:
        shown.append(f"... {len(data.problems) - MAX_PROBLEMS_SHOWN} more: run 'clinfuse validate {manifest}'")
    head = (f"{s['usable_rows']} of {s['rows']} rows usable, {s['patients']} patients "
            f"({s['errors']} errors: rows skipped, {s['warnings']} warnings)")
    train = [r for r in data.records if r.split == "train"]
    try:
        data.require_records()
    except InputError as exc:
        return None, Check("data", FAIL, f"{exc.describe()}; {head}", tuple(shown))
    if not train:
        return None, Check("data", FAIL, f"{manifest}: no training rows; " + head, tuple(details + shown))
    train_labels = {r.label for r in train}
    if len(train_labels) < len(cfg.data.labels):
        missing = [name for i, name in enumerate(cfg.data.labels) if i not in train_labels]
        details.insert(0, f"warning: no training rows labelled {', '.join(missing)}")
        return data, Check("data", WARN, head, tuple(details + shown))
    status = WARN if data.problems else OK
    return data, Check("data", status, head, tuple(details + shown))


def _check_state_dir(state_dir) -> Check:
    from clinfuse.fileio import atomic_write_text
    from clinfuse.privacy.site_state import SitePrivacyState

    if state_dir is None:
        return Check("state dir", SKIP, "no --state-dir: pass the state-dir of the SuperNode's --node-config")
    state_dir = Path(state_dir)
    probe = state_dir / f".clinfuse-write-check-{os.getpid()}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, "probe\n")
        if probe.read_text() != "probe\n":
            return Check("state dir", FAIL, f"{state_dir}: a file written there did not read back intact")
    except OSError as exc:
        return Check("state dir", FAIL, f"{state_dir}: not writable ({exc.strerror or exc})")
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    try:
        state = SitePrivacyState(state_dir, create=False)
        entries = state.entries()
    except InputError as exc:
        return Check("state dir", FAIL, exc.describe())
    details = [state.describe_key()]
    status = OK
    if state.lock.is_held_elsewhere():
        status = WARN
        details.insert(0, f"in use now by {state.lock.describe_holder()} (a site training?): what is shown "
                          "may be one round behind")
    if not entries:
        return Check("state dir", status, f"{state_dir} is writable (new site: no ledger yet)", tuple(details))
    return Check("state dir", status, f"{state_dir} is writable; ledger verifies ({len(entries)} entries, every "
                 "one signed by the site key)", tuple(details))


def _check_cap(cfg, data, state_dir: Path | None, max_epsilon: float | None, *, state_dir_given: bool) -> Check:
    """The cap is valid; spent < cap; the plan still holds and its next round fits under the cap."""
    if cfg is None:
        return Check("cap", SKIP, "needs a valid config")
    source = "--max-epsilon"
    if max_epsilon is None:
        max_epsilon, source = cfg.privacy.target_epsilon, "privacy.target_epsilon (no --max-epsilon given)"
    if isinstance(max_epsilon, bool) or not (isinstance(max_epsilon, (int, float)) and math.isfinite(max_epsilon)
                                             and max_epsilon > 0):
        return Check("cap", FAIL, f"max-epsilon must be a positive finite number, got {max_epsilon!r}")
    if not cfg.privacy.enabled:
        return Check("cap", WARN, f"privacy.enabled is false in the config: updates leave this site without "
                     f"differential privacy and the cap {max_epsilon:g} is not enforced")
    details = []
    if cfg.privacy.target_epsilon > max_epsilon:
        details.append(f"the study targets epsilon {cfg.privacy.target_epsilon:g} > this cap: the site will "
                       "decline its last rounds")
    if state_dir is None:
        why = "the state dir is not usable" if state_dir_given else "no --state-dir"
        return Check("cap", OK, f"{max_epsilon:g} from {source}; spent unknown ({why})", tuple(details))
    if data is None:
        return Check("cap", SKIP, f"{max_epsilon:g} from {source}; the spend check needs valid data")

    from clinfuse.privacy.plan import check_plan_inputs, describe_plan
    from clinfuse.privacy.site_state import SitePrivacyState

    n_patients = len({r.patient_id for r in data.records if r.split == "train"})
    if n_patients < 2:
        return Check("cap", FAIL, f"DP training needs at least 2 training patients, this site has {n_patients}")
    try:
        delta = check_plan_inputs(cfg, n_patients)
        state = SitePrivacyState(state_dir, mechanism=cfg.privacy.accountant, create=False)
        entries = state.entries()
        accountant = state.open_accountant(entries=entries)
        # The same plan store SiteRuntime uses: an edited plan.json or changed settings fail here.
        plan = state.plan_in_force(cfg, n_patients, entries=entries)
        if plan is not None:
            delta = plan.delta
            for history, d, eps in plan.known_epsilons():
                accountant.know(history, d, eps)
        spent = accountant.epsilon(delta)
        head = (f"{max_epsilon:g} from {source}; spent {spent:.3f} ({accountant.steps} steps, delta {delta:g}), "
                f"{max(max_epsilon - spent, 0):.3f} left")
        if spent >= max_epsilon:
            return Check("cap", FAIL, head + "; budget spent: this site would decline every round", tuple(details))
        warned = bool(details)
        if plan is None:
            # Tabulating runs the accountant once per epoch of the horizon; the site does it once,
            # at its first round, and signs the plan in its ledger. The preview only solves for
            # the noise: enough for the recipe and its utility forecast.
            from clinfuse.privacy.plan import plan_privacy
            from clinfuse.privacy.recipe import too_small

            fed = cfg.federation
            from clinfuse.errors import BudgetExceededError

            try:
                preview = plan_privacy(cfg, n_patients, fed.rounds * fed.local_epochs, history=accountant.history,
                                       epochs_per_round=fed.local_epochs, rounds=fed.rounds, tabulate=False)
            except BudgetExceededError as exc:
                details.append(f"plan preview: {exc}")
                preview = None
            if preview is not None:
                details += [f"plan preview (not signed): {line}" for line in describe_plan(preview)]
            details.append("no privacy plan yet: the site plans its noise for the whole study at its first round")
            if preview is None:
                return Check("cap", WARN, head, tuple(details))
            return Check("cap", WARN if warned or too_small(preview) else OK, head, tuple(details))
        steps = plan.steps_per_epoch * cfg.federation.local_epochs
        after = accountant.projected_epsilon(plan.noise_multiplier, plan.sample_rate, steps, plan.delta)
    except InputError as exc:
        return Check("cap", FAIL, exc.describe(), tuple(details))
    from clinfuse.privacy.recipe import too_small

    warned = warned or too_small(plan)
    details += [f"plan (signed): {line}" for line in describe_plan(plan)]
    details.append(f"next round (plan.json): noise multiplier {plan.noise_multiplier:.3f}, sample rate "
                   f"{plan.sample_rate:.3g}, {steps} steps -> epsilon {after:.3f}")
    if after > max_epsilon:
        return Check("cap", FAIL, head + "; the next round would pass the cap: the site would decline it",
                     tuple(details))
    return Check("cap", WARN if warned else OK, head, tuple(details))


def _check_cache(manifest, cfg, data, progress: bool) -> Check:
    from clinfuse.data.dataset import MultimodalDataset, default_cache_dir

    cache_dir = default_cache_dir(manifest, cfg)
    dataset = MultimodalDataset(data.records, cfg, cache_dir)
    from clinfuse.data.manifest import PATH_KINDS

    n_images = sum(len(s.inputs[m.name]) for s in dataset.samples for m in cfg.modalities if m.kind in PATH_KINDS)
    try:
        dataset.warm(progress)
    except OSError as exc:
        return Check("cache", FAIL, f"{cache_dir}: cannot write the image cache ({exc.strerror or exc})")
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the site unable to train
        return Check("cache", FAIL, f"an image does not decode: {type(exc).__name__}: {exc}")
    caches = dataset.caches.values()
    hits = sum(c.hits for c in caches)
    new = sum(c.misses + c.rebuilt for c in caches)
    return Check("cache", OK, f"{n_images} files decoded into {cache_dir} ({hits} already cached, {new} new)")
