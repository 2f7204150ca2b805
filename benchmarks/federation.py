"""Federation overheads: ClientApp start-up and round overhead in Flower's engines.

Round overhead is ``(round wall - slowest site's training) / round wall``: the share of a round
not spent training at the site that holds everyone up (messages, process and Ray start-up,
imports, data loading, evaluation, aggregation, checkpoint). It is computed from the run's
``history.json`` by :func:`support.deploy.round_overheads` (``tests/support/deploy.py``), the same for both engines:

- simulation (this module): ``flwr.simulation.run_simulation`` with the demo config;
- deployment (``--engine deployment|both``): a real SuperLink and one SuperNode per site on
  loopback, through :func:`support.deploy.measure_deployment_round_overhead`.

ClientApp start-up: in deployment every message starts a new ``flwr-clientapp`` process, which
imports the app and then, in the handler, torch, Opacus and clinfuse, and opens the site
(manifest, cache, accountant). Each piece is timed in fresh interpreters (median of
``--repeats``), and opening a site is timed cold (first time: files checked, images decoded
into the cache) and warm (as every later round).

    python benchmarks/federation.py [--engine simulation|deployment|both] [--rounds 3] [--patients 200]
                                    [--repeats 3] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # support.deploy: the deployment helpers (not installed)

STARTUP_STEPS = [
    ("python interpreter", "pass"),
    ("+ ClientApp module (flwr)", "import federated.client_app"),
    ("+ torch", "import federated.client_app, torch"),
    ("+ everything a train message imports",
     ("import federated.client_app, torch, opacus; import clinfuse.federation.site_runtime, clinfuse.training.trainer, "
      "clinfuse.models.fusion, clinfuse.data.dataset, clinfuse.privacy.accountant, clinfuse.privacy.ledger")),
]


def time_imports(repeats: int) -> list[dict]:
    """Median wall seconds of a fresh interpreter running each import line."""
    rows = []
    for label, code in STARTUP_STEPS:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
            times.append(time.perf_counter() - started)
        rows.append({"step": label, "seconds": statistics.median(times)})
    return rows


def time_site_open(manifest: Path, state_dir: Path, repeats: int) -> dict:
    """Opening a site in a fresh interpreter (imports excluded: they are timed above): first time
    (cold: every image file checked and decoded into the cache) and later (warm cache, manifest
    already validated)."""
    code = ("import sys, time; from clinfuse.config import load_config; "
            "from clinfuse.federation.site_runtime import SiteRuntime; import opacus, clinfuse.data.manifest, "
            "clinfuse.data.dataset, clinfuse.privacy.accountant, clinfuse.privacy.ledger; t = time.perf_counter(); "
            "s = SiteRuntime(load_config(None), sys.argv[1], site_id='bench', state_dir=sys.argv[2], max_epsilon=8); "
            "s.train_set.warm(False); s.val_set.warm(False); print(time.perf_counter() - t)")
    run = (lambda: float(subprocess.run([sys.executable, "-c", code, str(manifest), str(state_dir)], check=True,
                                        cwd=REPO, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
    cold = run()
    warm = statistics.median(run() for _ in range(repeats))
    return {"cold_s": cold, "warm_s": warm}


def simulation_overhead(workdir: Path, *, rounds: int, patients: int, sites: int = 3) -> dict:
    """The demo study in the simulation engine; per-round overhead from its history."""
    from support.deploy import round_overheads

    from clinfuse.data.synthetic import ensure_demo_cohort
    from federated.simulation import simulate

    ensure_demo_cohort(workdir / "cohort", sites=sites, patients=patients)
    for name in ("run", "sites"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    started = time.perf_counter()
    summary = simulate({"workdir": str(workdir), "num-rounds": rounds}, num_sites=sites)
    wall = time.perf_counter() - started
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    per_round = round_overheads(history)
    setup = [[s.get("setup-seconds") for s in r["sites"].values() if s.get("setup-seconds") is not None]
             for r in history["rounds"]]
    return {"engine": "simulation", "rounds": per_round, "run_wall_s": wall,
            "mean_overhead": statistics.mean(r["overhead"] for r in per_round) if per_round else None,
            "site_setup_s": setup}


def print_rounds(result: dict) -> None:
    print(f"\n{result['engine']} engine: {len(result['rounds'])} rounds, whole run {result['run_wall_s']:.1f} s")
    print(f"{'round':>5}{'wall s':>9}{'train phase s':>15}{'slowest site s':>16}{'overhead':>10}"
          f"{'train-phase overhead':>22}")
    for r in result["rounds"]:
        phase = r.get("train_phase_s")
        phase_overhead = (phase - r["slowest_train_s"]) / phase if phase else float("nan")
        print(f"{r['round']:>5}{r['round_wall_s']:>9.1f}{(phase or float('nan')):>15.1f}{r['slowest_train_s']:>16.1f}"
              f"{r['overhead']:>10.0%}{phase_overhead:>22.0%}")
    if result["rounds"]:
        later = [r["overhead"] for r in result["rounds"][1:]] or [result["rounds"][0]["overhead"]]
        print(f"mean overhead {result['mean_overhead']:.0%} (rounds after the first: {statistics.mean(later):.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["simulation", "deployment", "both"], default="simulation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="start-up timings: median of this many")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        report: dict = {}
        print("ClientApp start-up (fresh interpreter, median wall seconds):")
        report["imports"] = time_imports(args.repeats)
        for row in report["imports"]:
            print(f"  {row['step']:<40}{row['seconds']:>7.2f}")
        from clinfuse.data.synthetic import write_demo_cohort

        probe = workdir / "startup"
        shutil.rmtree(probe, ignore_errors=True)
        manifest = write_demo_cohort(probe / "cohort", sites=1, patients=args.patients)[0]
        report["site_open"] = time_site_open(manifest, probe / "state", args.repeats)
        print(f"  {'open a site, first time (cold cache)':<40}{report['site_open']['cold_s']:>7.2f}")
        print(f"  {'open a site, later rounds (warm)':<40}{report['site_open']['warm_s']:>7.2f}")

        if args.engine in ("simulation", "both"):
            report["simulation"] = simulation_overhead(workdir / "simulation", rounds=args.rounds,
                                                       patients=args.patients)
            print_rounds(report["simulation"])
        if args.engine in ("deployment", "both"):
            from support.deploy import measure_deployment_round_overhead

            report["deployment"] = measure_deployment_round_overhead(workdir / "deployment", rounds=args.rounds,
                                                                     patients=args.patients)
            print_rounds(report["deployment"])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
