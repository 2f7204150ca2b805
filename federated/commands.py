"""``clinfuse demo`` and ``clinfuse federate``: federated simulations from the command line.

``clinfuse demo`` writes the synthetic demo cohort (once), runs a DP federated study over its
sites in Flower's simulation engine, and prints per-round metrics, each site's epsilon and the
final validation AUROC; the global checkpoint is ``<workdir>/run/global.pt``. ``--variant rich``
runs the five-modality study of ``configs/rich.yaml`` (chest film, CT series, note, tabular, ECG;
one site without volumes).

``clinfuse federate`` runs the same simulation over manifests you name (one per site; each site
is named after its manifest's folder unless ``--site-id`` names them).

``clinfuse flower-app DIR`` writes the Flower app project of the installed package
(:func:`write_flower_app`): ``flwr run DIR`` needs a folder whose ``pyproject.toml`` declares the
app's components and run config, and a wheel has none.

A study that stops early (too few sites trained, every site failed) prints why and exits 1; bad
input exits 2.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from clinfuse.cli import positive_float, positive_int

_log = logging.getLogger("clinfuse.federation")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="federated DP demo: synthetic cohort -> 3-site Flower simulation -> global model",
        description="Write the demo cohort (if absent), run a differentially private federated study over "
                    "its sites in Flower's simulation engine and print per-round metrics, epsilon per "
                    "site and the final validation AUROC. The demo starts its study afresh each time "
                    "(it clears <workdir>/run and <workdir>/sites; the cohort is kept) unless --resume.")
    p.add_argument("--workdir", type=Path, default=Path(".clinfuse-demo"),
                   help="folder for the cohort, the sites' state and the run (default .clinfuse-demo)")
    p.add_argument("--rounds", type=positive_int, default=None, help="rounds (default: federation.rounds, 5)")
    p.add_argument("--sites", type=int, default=3, help="number of simulated sites (default 3)")
    p.add_argument("--patients", type=int, default=None,
                   help="patients per site in the demo cohort (default 200; with --resume, the cohort's own)")
    p.add_argument("--variant", choices=["default", "rich"], default="default",
                   help="rich: five modalities (chest film, CT series, note, tabular, ECG), configs/rich.yaml")
    _common(p)
    p.set_defaults(handler=_demo)

    p = subparsers.add_parser(
        "federate", help="simulate a federated study over site manifests (one Flower site per manifest)",
        description="Run a federated study in Flower's simulation engine, one site per manifest. Each "
                    "site's accountant and ledger live in <state-root>/<site id> and persist across runs; a "
                    "site is named after its manifest's folder unless --site-id names it.")
    p.add_argument("--manifest", type=Path, nargs="+", required=True, help="one manifest per site")
    p.add_argument("--site-id", nargs="+", default=None, metavar="ID",
                   help="the sites' ids, one per manifest (default: each manifest's folder name)")
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoints, global.pt and history.json")
    p.add_argument("--state-root", type=Path, required=True,
                   help="one private state dir per site below it (<state-root>/<site id>)")
    p.add_argument("--rounds", type=positive_int, default=None, help="rounds (default: federation.rounds)")
    p.add_argument("--no-dp", action="store_true",
                   help="train without DP-SGD (privacy.enabled: false): no privacy guarantee at all")
    p.add_argument("--seed", type=int, default=None,
                   help="fixes the initial model and the data order (train.seed); DP noise and DP's "
                        "sampling still come from the OS's entropy")
    _common(p)
    p.set_defaults(handler=_federate)


    p = subparsers.add_parser(
        "flower-app", help="write a Flower app project (pyproject.toml) running the installed clinfuse apps",
        description="Write DIR/pyproject.toml declaring the installed package's Flower apps "
                    "(federated.server_app:app, federated.client_app:app) and every run-config key, so "
                    "'flwr run DIR ...' works without the source tree. An existing file is never "
                    "overwritten (exit 2).")
    p.add_argument("dir", type=Path, help="folder to write into (created if needed)")
    p.set_defaults(handler=_flower_app)


#: ``[tool.flwr.app.config]`` values that differ from :class:`RunConfig`'s defaults: the demo
#: cohort is written in the simulation engine (never in a deployment) unless turned off.
APP_CONFIG_CHANGES = {"demo-cohort": True}


def flower_app_config() -> dict:
    """``[tool.flwr.app.config]``: every run-config key (``flwr run --run-config`` can set only
    declared keys) with its default; ``""`` where the study config decides (TOML has no null)."""
    from clinfuse.federation.run_config import RunConfig

    table = {}
    for name, info in RunConfig.model_fields.items():
        if not info.exclude:
            table[name.replace("_", "-")] = "" if info.default is None else info.default
    return {**table, **APP_CONFIG_CHANGES}


def write_flower_app(folder: Path) -> Path:
    """Write ``folder/pyproject.toml``, a Flower app project over the installed clinfuse apps;
    returns its path. Raises :class:`InputError` if the file exists."""
    import tomli_w  # a dependency of flwr

    from clinfuse import __version__
    from clinfuse.errors import InputError
    from clinfuse.fileio import atomic_write_text

    path = Path(folder) / "pyproject.toml"
    if path.exists():
        raise InputError("exists; not overwritten (remove it or choose another folder)", file=path)
    doc = {"build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
           "project": {"name": "clinfuse-app", "version": __version__,
                       "description": "The clinfuse Flower apps, from the installed clinfuse package",
                       "dependencies": [f"clinfuse=={__version__}"]},
           "tool": {"flwr": {"app": {"publisher": "clinfuse",
                                     "components": {"serverapp": "federated.server_app:app",
                                                    "clientapp": "federated.client_app:app"},
                                     "config": flower_app_config()}}}}
    header = ("# The clinfuse Flower apps of the installed package (written by `clinfuse flower-app`).\n"
              "# flwr run THIS_FOLDER [CONNECTION] --run-config 'num-rounds=3 config=\"/abs/study.yaml\"'\n"
              "# Run config keys: docs/federation.md (\"\" = the study config decides; 0 means 0). Relative\n"
              "# paths resolve against the folder the ServerApp/ClientApp processes run in: use absolute ones.\n"
              "# Start the SuperLink with --disable-runtime-dependency-installation: clinfuse is installed.\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, header + tomli_w.dumps(doc))


def _flower_app(args) -> int:
    path = write_flower_app(args.dir)
    print(f"wrote {path}\nrun it: flwr run {args.dir} [CONNECTION] --stream (see docs/federation.md)")
    return 0


def _common(p) -> None:
    p.add_argument("--config", type=Path, default=None, help="study config (default: the bundled demo study)")
    p.add_argument("--strategy", choices=["fedavg", "fedavgm", "fedprox", "fedadam"], default=None,
                   help="aggregation (default: federation.strategy)")
    p.add_argument("--max-epsilon", type=positive_float, default=None,
                   help="every site's cap (default: the study's target epsilon)")
    p.add_argument("--client-dp", action="store_true", help="add client-level DP (Flower's fixed clipping)")
    p.add_argument("--secagg", action="store_true", help="SecAgg+ (Flower's legacy workflow)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation (default: all)")
    p.add_argument("--parallel", type=int, default=None, help="sites training at once (default: min(sites, cpus))")
    p.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more run-config keys (docs/federation.md, 'Run config')")
    p.add_argument("--roster", type=Path, default=None,
                   help="the study's roster of site ids and public keys (clinfuse site key prints an entry)")


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _run_config(args) -> dict:
    from clinfuse.errors import InputError

    rc: dict = {}
    if args.config:
        rc["config"] = str(args.config.resolve())
    if args.rounds is not None:
        if args.rounds < 1:
            raise InputError("--rounds must be at least 1", key="--rounds")
        rc["num-rounds"] = args.rounds
    if args.strategy:
        rc["strategy"] = args.strategy
    if args.max_epsilon is not None:
        rc["max-epsilon"] = args.max_epsilon
    if args.client_dp:
        rc["client-dp"] = True
    if args.secagg:
        rc["secagg"] = True
    if args.roster is not None:
        rc["roster"] = str(args.roster.resolve())
    if getattr(args, "no_dp", False):
        rc["dp"] = False
    if getattr(args, "seed", None) is not None:
        if args.seed < 0:
            raise InputError("--seed must be a non-negative integer", key="--seed")
        rc["seed"] = args.seed
    rc["resume"] = bool(args.resume)
    for item in args.run_config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--run-config takes KEY=VALUE, got {item!r}", key="--run-config")
        rc[key.strip()] = _parse_value(value.strip())
    return rc


def _print_round(record: dict) -> None:
    from federated.rounds import format_round

    print(format_round(record), flush=True)


def _report(summary: dict, started: float) -> None:
    from clinfuse.models.fusion import format_parameter_counts

    print()
    if summary.get("parameters"):
        print(f"modalities: {', '.join(summary.get('modalities', []))}; "
              f"{format_parameter_counts(summary['parameters'])}")
    auroc = summary["final_val"].get("val-auroc")
    print(f"final validation AUROC (weighted over sites): {auroc:.3f}" if auroc is not None
          else "final validation AUROC: n/a (no site reported one)")
    for name, eps in sorted(summary["epsilon"].items()):
        print(f"epsilon {name}: {eps:.3f}")
    if summary.get("client_dp_epsilon") is not None:
        print(f"client-level epsilon (Flower's accountant): {summary['client_dp_epsilon']:.3f}")
    print(f"global checkpoint: {summary['global_checkpoint']}")
    print(f"history: {Path(summary['run_dir']) / 'history.json'}")
    print(f"wall time: {time.time() - started:.1f} s")


def _privacy_line(run_config: dict) -> str:
    """How the run is protected, in words: DP or not, and what its seed fixes (never DP noise, whose
    source :data:`clinfuse.privacy.plan.NOISE_SOURCE` names)."""
    from clinfuse.federation.run_config import RunConfig

    cfg = RunConfig.parse(run_config).study_config()
    seed = f"seed {cfg.train.seed} fixes the initial model and the data order"
    if not cfg.privacy.enabled:
        return f"privacy: DP-SGD is OFF (--no-dp / privacy.enabled: false): no privacy guarantee; {seed}"
    return (f"privacy: DP-SGD at every site (target epsilon {cfg.privacy.target_epsilon:g}); {seed}, "
            "not DP's noise or sampling, so DP runs do not repeat bit for bit")


def _simulate(args, run_config: dict, num_sites: int) -> int:
    from clinfuse.privacy.plan import NOISE_SOURCE
    from federated.rounds import StudyStopped
    from federated.simulation import simulate

    started = time.time()
    _log.info("starting %d simulated sites (Ray actors); each says when it starts a round", num_sites)
    privacy = _privacy_line(run_config)
    _log.info(privacy)
    if not privacy.startswith("privacy: DP-SGD is OFF"):
        _log.info(NOISE_SOURCE)
    try:
        summary = simulate(run_config, num_sites=num_sites, cpus=args.cpus, parallel=args.parallel,
                           on_round=_print_round, verbose=args.verbose)
    except StudyStopped as stopped:
        print(f"clinfuse {args.command}: study stopped: {stopped}", file=sys.stderr)
        print(f"history: {Path(stopped.summary.get('run_dir', '?')) / 'history.json'}", file=sys.stderr)
        return 1
    _report(summary, started)
    return 0


def _demo(args) -> int:
    from clinfuse.data.synthetic import ensure_demo_cohort, recorded_demo_cohort
    from clinfuse.errors import InputError

    if args.sites < 2:
        raise InputError("the demo needs at least 2 sites", key="--sites")
    workdir = args.workdir.resolve()
    if args.variant == "rich" and args.config is None:
        from clinfuse.config import CONFIGS_DIR

        args.config = CONFIGS_DIR / "rich.yaml"
    run_config = {"workdir": str(workdir), "min-sites": 2, **_run_config(args)}  # validates first
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.patients is None:
        # A resumed study keeps its cohort: rewriting it at another size would change every
        # site's patients, which their signed plans then (rightly) refuse.
        recorded = recorded_demo_cohort(workdir / "cohort") if args.resume else None
        args.patients = recorded["patients"] if recorded else 200
    ensure_demo_cohort(workdir / "cohort", sites=args.sites, patients=args.patients, variant=args.variant,
                       log=lambda line: print(line, file=sys.stderr))
    if not args.resume:
        # The demo is a fresh study each time; a real study never clears a site's accountant.
        for name in ("run", "sites"):
            if (workdir / name).exists():
                shutil.rmtree(workdir / name)
    print(f"federated DP study: {args.sites} sites, Flower simulation, run dir {workdir / 'run'}", flush=True)
    code = _simulate(args, run_config, args.sites)
    print(f"total wall time (cohort included): {time.time() - started:.1f} s")
    return code


def site_ids_for(manifests: list[Path], given: list[str] | None) -> list[str]:
    """The sites' ids: ``given`` (one per manifest), else each manifest's folder name.

    Raises :class:`InputError` when the counts differ, an id is repeated or is not a plain name
    (it names the site's state dir).
    """
    import re

    from clinfuse.errors import InputError
    from clinfuse.federation.run_config import SITE_ID_PATTERN

    if given is not None and len(given) != len(manifests):
        raise InputError(f"--site-id gives {len(given)} ids for {len(manifests)} manifests", key="--site-id")
    ids = list(given) if given is not None else [m.resolve().parent.name for m in manifests]
    for site_id, manifest in zip(ids, manifests):
        if not re.match(SITE_ID_PATTERN, site_id):
            raise InputError(f"site id {site_id!r} must be letters, digits, '.', '_' or '-' (it names the "
                             "site's state dir); name the sites with --site-id", file=manifest, key="--site-id")
    repeated = sorted({s for s in ids if ids.count(s) > 1})
    if repeated:
        where = "given twice" if given is not None else "the folder name of two manifests"
        raise InputError(f"site id {repeated[0]!r} is {where}: name the sites with --site-id", key="--site-id")
    return ids


def _federate(args) -> int:
    from clinfuse.errors import InputError

    for m in args.manifest:
        if not m.is_file():
            raise InputError("manifest not found", file=m)
    site_ids = site_ids_for(args.manifest, args.site_id)
    run_config = {"run-dir": str(args.run_dir.resolve()), "sites-dir": str(args.state_root.resolve()),
                  "workdir": str(args.run_dir.resolve().parent), **_run_config(args)}
    for k, (m, site_id) in enumerate(zip(args.manifest, site_ids)):
        run_config[f"manifest-{k}"] = str(m.resolve())
        run_config[f"site-id-{k}"] = site_id
    _log.info("sites: %s", ", ".join(f"{s} ({m})" for s, m in zip(site_ids, args.manifest)))
    return _simulate(args, run_config, len(args.manifest))
