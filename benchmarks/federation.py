"""Federation overheads: where a round's time goes in Flower's engines, and the round overhead.

Round overhead is ``(round wall - slowest site's training) / slowest site's training``: what a
round costs beyond the local epochs of the site that holds everyone up, as a share of those
epochs. A round's wall runs from the start of its train exchange to the start of the next round
(the last round: to its record, its evaluate exchange included); a site's training is the
``train-seconds`` it reports (``LocalTrainer.fit``: its local epochs, nothing else). Computed
from the run's ``history.json`` by :func:`support.deploy.round_overheads`
(``tests/support/deploy.py``), the same for both engines:

- simulation: :func:`federated.simulation.simulate` (``flwr.simulation.run_simulation``) with
  the demo config, one local epoch, every site at once (one Ray actor and thread each);
- deployment (``--engine deployment|both``): a real SuperLink with TLS and SuperNode
  authentication and one SuperNode per site on loopback, through
  :func:`support.deploy.measure_deployment_round_overhead`.

Each round's time is broken into parts, from the site that finished its train message last
(its reply's ``<part>-seconds``) and the server's record: the ClientApp process start (in a
deployment every message is a new process: interpreter, flwr, installing the app bundle, pulling
the message; it forwards the message to the site's long-lived worker, started by the first one),
reaching the worker, the site code's imports (torch, Opacus, clinfuse: a worker's first message
only), the manifest (validation or the process cache), the privacy state, the accountant (noise
plan, epsilon), data decoding, the model, training, the signed ledger, evaluation (folded into the train message from round 2),
then Flower's messaging and polling (the exchange's wall less that site's time), aggregation,
an evaluate exchange of its own (last round), and the server's checkpoint and history. In
fresh interpreters (median of ``--repeats``): the import chain, opening a site cold and warm,
and installing the app bundle as each deployed ClientApp process does.

    python benchmarks/federation.py [--engine simulation|deployment|both] [--rounds 3] [--patients 200]
                                    [--repeats 3] [--workdir DIR] [--json OUT] [--without-worker]
"""

from __future__ import annotations

import argparse
import json
import os
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

SIMULATION_TARGET, DEPLOYMENT_TARGET, WALL_RATIO_TARGET = 0.15, 0.30, 1.5

STARTUP_STEPS = [
    ("python interpreter", "pass"),
    ("+ ClientApp module (flwr)", "import federated.client_app"),
    ("+ torch", "import federated.client_app, torch"),
    ("+ everything a train message imports",
     ("import federated.client_app, torch, opacus; import clinfuse.federation.site_runtime, clinfuse.training.trainer, "
      "clinfuse.models.fusion, clinfuse.data.dataset, clinfuse.privacy.accountant, clinfuse.privacy.ledger")),
]

# (label, the site's metric without "-seconds"), in the order a message runs them
SITE_PARTS = [("ClientApp process start (interpreter, flwr, app install, message pull)", "process"),
              ("reaching the site's worker (deployment; starting it, first message)", "worker-start"),
              ("site code imports (torch, Opacus, clinfuse)", "import"),
              ("manifest (validated, or this process's cache)", "manifest"),
              ("privacy state (key, ledger check, accountant file)", "privacy"),
              ("accountant (noise plan, epsilon)", "accountant"),
              ("data decoding", "data"),
              ("model (copy, weights, DP wrapper)", "model"),
              ("training (local epochs)", "train"),
              ("ledger (signed entries, model hash)", "ledger"),
              ("evaluation (folded into the train message)", "evaluate")]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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


def time_app_install(workdir: Path, repeats: int) -> float:
    """Median seconds of installing this app's bundle (FAB) into a fresh ``FLWR_HOME``, as every
    deployed ``flwr-clientapp`` process does before it loads the app."""
    code = ("import sys, time, pathlib; from flwr.cli.build import build_fab_from_disk; "
            "from flwr.cli.install import install_from_fab; fab = build_fab_from_disk(pathlib.Path(sys.argv[1])); "
            "t = time.perf_counter(); install_from_fab(fab, skip_prompt=True); print(time.perf_counter() - t)")
    times = []
    for k in range(repeats):
        home = workdir / f"fab-{k}"
        shutil.rmtree(home, ignore_errors=True)
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(REPO)], check=True, cwd=workdir,
                             capture_output=True, text=True, env={**os.environ, "FLWR_HOME": str(home)}).stdout
        times.append(float(out.strip().splitlines()[-1]))
    return statistics.median(times)


def breakdown(history: dict, walls: dict[int, float]) -> list[dict]:
    """Per round: seconds of each part (:data:`SITE_PARTS` of the site that finished last, then
    the server's); they add up to the round wall (``walls``: round -> wall from
    :func:`support.deploy.round_overheads`)."""
    out = []
    for record in history.get("rounds", []):
        wall = walls.get(record["round"])
        sites = [s for s in record.get("sites", {}).values() if s.get("handler-seconds") is not None]
        if wall is None or not sites:
            continue
        exchange = float(record.get("train_exchange_s") or record.get("train_wall_s") or 0.0)
        slowest = max(sites, key=lambda s: (s.get("process-seconds", 0.0) + s.get("worker-start-seconds", 0.0)
                                            + s["handler-seconds"]))
        handler = float(slowest["handler-seconds"])
        # A simulation's actor starts with the run, before the round: count only what falls in it.
        parts = {"process": min(float(slowest.get("process-seconds", 0.0)), max(0.0, exchange - handler))}
        for _, key in SITE_PARTS[1:]:
            parts[key] = float(slowest.get(f"{key}-seconds", 0.0))
        before_handler = ("process", "worker-start")  # in the ClientApp process, before the handler runs
        parts["site-other"] = handler - sum(v for k, v in parts.items() if k not in before_handler)
        parts["flower"] = exchange - parts["process"] - parts["worker-start"] - handler
        parts["aggregate"] = float(record.get("aggregate_s") or 0.0)
        parts["evaluate-exchange"] = float(record.get("eval_wall_s") or 0.0)
        parts["server-other"] = wall - exchange - parts["aggregate"] - parts["evaluate-exchange"]
        out.append({"round": record["round"], "wall_s": wall, "parts": parts})
    return out


PART_LABELS = dict([(key, label) for label, key in SITE_PARTS] + [
    ("site-other", "rest of the site's handler (round config, reply, signature)"),
    ("flower", "Flower: messages, polling, process spawn (exchange less the site)"),
    ("aggregate", "aggregation"),
    ("evaluate-exchange", "evaluate exchange of its own (last round)"),
    ("server-other", "server: checkpoint, history, log")])


def print_breakdown(rows: list[dict]) -> None:
    if not rows:
        return
    later = rows[1:] or rows
    mean_wall = statistics.mean(r["wall_s"] for r in later)
    print(f"\n  where the time goes (seconds; round 1, and the mean of rounds {later[0]['round']}-{later[-1]['round']})")
    print(f"  {'part':<72}{'round 1':>9}{'later':>9}{'share':>8}")
    for key, label in PART_LABELS.items():
        first = rows[0]["parts"].get(key, 0.0)
        mean = statistics.mean(r["parts"].get(key, 0.0) for r in later)
        print(f"  {label:<72}{first:>9.2f}{mean:>9.2f}{mean / mean_wall:>8.0%}")
    print(f"  {'round wall':<72}{rows[0]['wall_s']:>9.2f}{mean_wall:>9.2f}")


def summarise(result: dict) -> None:
    from support.deploy import round_overheads

    per_round = round_overheads(result["history"])
    result["rounds"] = per_round
    result["breakdown"] = breakdown(result["history"], {r["round"]: r["round_wall_s"] for r in per_round})
    result["mean_overhead"] = statistics.mean(r["overhead"] for r in per_round) if per_round else None
    later = per_round[1:] or per_round
    result["mean_overhead_later"] = statistics.mean(r["overhead"] for r in later) if later else None


def simulation_run(workdir: Path, *, rounds: int, patients: int, sites: int = 3) -> dict:
    """The demo study in the simulation engine, one local epoch; its history and wall time."""
    from clinfuse.data.synthetic import ensure_demo_cohort
    from federated.simulation import simulate

    ensure_demo_cohort(workdir / "cohort", sites=sites, patients=patients)
    for name in ("run", "sites"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    started = time.perf_counter()
    # Every site at once (one Ray actor and one thread each), as hospitals train and as the
    # deployment's SuperNodes do: with the default two at a time on 2 cores the third site would
    # wait for the first two, and that wait would count as overhead.
    summary = simulate({"workdir": str(workdir), "num-rounds": rounds, "local-epochs": 1}, num_sites=sites,
                       cpus=sites, parallel=sites)
    wall = time.perf_counter() - started
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    return {"engine": "simulation", "history": history, "run_wall_s": wall}


def print_rounds(result: dict) -> None:
    print(f"\n{result['engine']} engine: {len(result['rounds'])} rounds, whole run {result['run_wall_s']:.1f} s"
          + (f" (deployment start-up {result['startup_s']:.1f} s before it)" if "startup_s" in result else ""))
    print(f"  {'round':>5}{'wall s':>9}{'slowest site trained s':>24}{'overhead':>10}")
    for r in result["rounds"]:
        print(f"  {r['round']:>5}{r['round_wall_s']:>9.2f}{r['slowest_train_s']:>24.2f}{r['overhead']:>10.0%}")
    print_breakdown(result["breakdown"])


def verdict(name: str, value: float | None, target: float, fmt: str = "{:.0%}") -> str:
    if value is None:
        return f"  {name}: n/a (target {fmt.format(target)})"
    ok = "PASS" if value <= target else "MISS"
    return f"  {name}: {fmt.format(value)} (target <= {fmt.format(target)}): {ok}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["simulation", "deployment", "both"], default="simulation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="start-up timings: median of this many")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--without-worker", action="store_true",
                        help="deployment: also run with site-worker=false (a process per message does everything)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        report: dict = {"load_before": load(), "cpus": os.cpu_count()}
        print(f"machine: {os.cpu_count()} CPUs, load average {report['load_before']} (1, 5, 15 min)")
        print("overhead = (round wall - slowest site's training) / slowest site's training; training = the "
              "site's local epochs (train-seconds); round wall = start of its train exchange to the start "
              "of the next round (the last: to its record)\n")
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
        print(f"  {'open a site, later (new process, warm)':<40}{report['site_open']['warm_s']:>7.2f}")
        report["app_install_s"] = time_app_install(probe, args.repeats)
        print(f"  {'install the app bundle (FAB)':<40}{report['app_install_s']:>7.2f}")

        if args.engine in ("simulation", "both"):
            report["simulation"] = simulation_run(workdir / "simulation", rounds=args.rounds, patients=args.patients)
            summarise(report["simulation"])
            print_rounds(report["simulation"])
        if args.engine in ("deployment", "both"):
            from support.deploy import measure_deployment_round_overhead

            report["deployment"] = measure_deployment_round_overhead(workdir / "deployment", rounds=args.rounds,
                                                                     patients=args.patients, local_epochs=1)
            summarise(report["deployment"])
            print_rounds(report["deployment"])
            if args.without_worker:
                print("\nthe same deployment with site-worker=false (every message imports and validates again):")
                report["deployment_without_worker"] = measure_deployment_round_overhead(
                    workdir / "deployment", rounds=args.rounds, patients=args.patients, local_epochs=1,
                    site_worker=False)
                summarise(report["deployment_without_worker"])
                print_rounds(report["deployment_without_worker"])
        report["load_after"] = load()
        print(f"\ntargets (demo config, {args.patients} patients x 3 sites, one local epoch, {args.rounds} rounds; "
              f"load average before {report['load_before']}, after {report['load_after']}):")
        for engine, target in (("simulation", SIMULATION_TARGET), ("deployment", DEPLOYMENT_TARGET)):
            if engine in report:
                r = report[engine]
                print(verdict(f"{engine} round overhead, rounds after the first", r["mean_overhead_later"], target))
                print(verdict(f"{engine} round overhead, all rounds", r["mean_overhead"], target))
        if "simulation" in report and "deployment" in report:
            ratio = report["deployment"]["run_wall_s"] / report["simulation"]["run_wall_s"]
            report["wall_ratio"] = ratio
            print(verdict(f"deployed study wall {report['deployment']['run_wall_s']:.1f} s / simulated "
                          f"{report['simulation']['run_wall_s']:.1f} s", ratio, WALL_RATIO_TARGET, "{:.2f}x"))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
