"""The server side under DP noise: how to weight sites, and whether server momentum or FedAdam helps.

Every site trains with DP-SGD (its own plan, patient-level, Poisson sampling); only what the
server does with the updates differs between rows:

- FedAvg weighted by **patients** (each site's training patient count: what clinfuse sends as
  ``num-examples``), **uniform** (every site alike), or by **SNR** (inverse noise variance of the
  site's update relative to its signal, ``q n^2 / sigma^2``: sample rate q, patients n, noise
  multiplier sigma; n for a site without DP). Under patient-level DP rows are not a weight
  of their own: one patient is one sample whatever their rows, and these cohorts have one row each.
- FedAvg with a server learning rate above 1 (the step size momentum reaches, without momentum),
  FedAvgM (server momentum beta 0.9 at a few server learning rates) and FedAdam (Flower's
  formulas: beta1 0.9, beta2 0.99, tau 1e-3) at a few learning rates, on top of patient weights.

Datasets (tabular, so a grid of runs stays cheap on 2 CPU cores):

- ``breast``: scikit-learn's breast-cancer data (569 real patients): a seeded stratified quarter
  is the test set, the rest is split into 4 sites of 30, 60, 120 and the remaining patients. The
  30 features are declared with the ranges the dataset's documentation publishes (DESCR), widened
  by 5%: nothing is fitted on the sites' rows.
- ``synth``: the tabular fields of clinfuse's synthetic cohort, sites of 30, 100 and 300
  patients (separate seeds), tested on 400 more.

The loop is clinfuse's own (``SiteRuntime.train_round`` + ``aggregate``, no Flower), as in
benchmarks/covid_chestxray.py. AUROC is on the pooled test set at the coordinator (benchmark only).
Each run can write its results as JSON (``--json``); ``--merge A.json B.json ...`` writes
docs/benchmarks/aggregation.md from those runs (and this one's), every run's command with it.

    python benchmarks/server_noise.py [--datasets breast synth] [--eps 1 8] [--lr 0.01] [--seeds 2]
        [--rounds 10] [--json OUT] [--merge RUN.json ...] [--md-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parents[1]
MD = REPO / "docs" / "benchmarks" / "aggregation.md"

# name -> (kind, weighting, server lr, momentum)
SERVERS = {
    "fedavg, uniform": ("avg", "uniform", 1.0, 0.0),
    "fedavg, patients": ("avg", "patients", 1.0, 0.0),
    "fedavg, snr": ("avg", "snr", 1.0, 0.0),
    "fedavg, server lr 3": ("avg", "patients", 3.0, 0.0),
    "fedavgm lr 0.3": ("avgm", "patients", 0.3, 0.9),
    "fedavgm lr 1.0": ("avgm", "patients", 1.0, 0.9),
    "fedavgm lr 1.0, snr": ("avgm", "snr", 1.0, 0.9),
    "fedadam lr 0.01": ("adam", "patients", 0.01, 0.0),
    "fedadam lr 0.03": ("adam", "patients", 0.03, 0.0),
    "fedadam lr 0.1": ("adam", "patients", 0.1, 0.0),
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def breast_ranges() -> dict[str, tuple[float, float]]:
    """Feature ranges as the dataset's documentation (DESCR) publishes them, by feature name."""
    from sklearn.datasets import load_breast_cancer

    suffix = {"mean": "mean {}", "standard error": "{} error", "worst": "worst {}"}
    out = {}
    for m in re.finditer(r"^\s*([a-z ]+?) \((mean|standard error|worst)\):\s+([\d.]+)\s+([\d.]+)",
                         load_breast_cancer().DESCR, re.MULTILINE):
        out[suffix[m.group(2)].format(m.group(1).strip())] = (float(m.group(3)), float(m.group(4)))
    return out


def write_rows(path: Path, header: list[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def breast_study(work: Path, split_seed: int = 0):
    """(config dict, site manifests, test manifest) of the 4-site breast-cancer study."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    ranges = breast_ranges()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    columns = []
    for name, feature in zip(names, data.feature_names):
        lo, hi = ranges[feature]
        pad = 0.05 * (hi - lo)
        columns.append({"name": name, "type": "numeric", "min": lo - pad, "max": hi + pad})
    idx = np.arange(len(data.target))
    train, test = train_test_split(idx, test_size=0.25, stratify=data.target, random_state=split_seed)
    rng = np.random.default_rng(split_seed)
    train = rng.permutation(train)
    sizes = [30, 60, 120, len(train) - 210]
    header = ["patient_id", "label", "split", *names]

    def rows(ids, split):
        return [[f"p{i:04d}", int(data.target[i]), split, *(f"{v:.6g}" for v in data.data[i])] for i in ids]

    manifests, start = [], 0
    for k, n in enumerate(sizes):
        manifests.append(write_rows(work / "breast" / f"site-{k}" / "manifest.csv", header,
                                    rows(train[start:start + n], "train")))
        start += n
    test_manifest = write_rows(work / "breast" / "test" / "manifest.csv", header, rows(test, "test"))
    cfg = {"study": "breast-cancer-4-sites", "data": {"labels": ["0", "1"]},
           "modalities": [{"name": "cells", "kind": "tabular", "columns": columns}]}
    return cfg, manifests, test_manifest


def synth_study(work: Path):
    """(config dict, site manifests, test manifest): the synthetic cohort's tabular fields, 30/100/300."""
    import yaml

    from clinfuse.data.synthetic import write_demo_cohort

    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    manifests = []
    for k, (n, seed) in enumerate(((30, 11), (100, 12), (300, 13))):
        (m,) = write_demo_cohort(work / "synth" / f"site-{k}", sites=1, patients=n, seed=seed)
        manifests.append(m)
    (test,) = write_demo_cohort(work / "synth" / "test", sites=1, patients=400, seed=99)
    cfg = {"study": "synthetic-tabular-3-sites", "data": {"labels": demo["data"]["labels"]},
           "modalities": [{"name": "ehr", "kind": "tabular", "columns": demo["data"]["tabular"]}]}
    return cfg, manifests, test


def patients_in(manifest: Path) -> int:
    with open(manifest, newline="") as fh:
        return len({row["patient_id"] for row in csv.DictReader(fh)})


def make_config(base: dict, *, epsilon: float | None, seed: int, rounds: int, lr: float, batch: int):
    from clinfuse.config import config_from_dict

    raw = json.loads(json.dumps(base))
    raw["data"]["split"] = {"val_fraction": 0.0, "test_fraction": 0.0, "seed": 0}
    raw["train"] = {"batch_size": batch, "lr": lr, "optimizer": "adam", "seed": seed, "device": "cpu",
                    "num_threads": 1}
    raw["privacy"] = {"enabled": epsilon is not None, "target_epsilon": epsilon or 8.0, "accountant": "rdp",
                      "max_grad_norm": 1.0}
    raw["federation"] = {"rounds": rounds, "local_epochs": 1, "modality_aware": False}
    raw["balance"] = {"aux_weights": {"mode": "none"}}
    return config_from_dict(raw, source="benchmarks/server_noise.py")


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

def site_weight(weighting: str, n: int, noise: float | None, sample_rate: float | None) -> float:
    if weighting == "uniform":
        return 1.0
    if weighting == "snr" and noise:
        return sample_rate * n * n / noise ** 2
    return float(n)


class Server:
    """Weighted average of the sites' weights, then plain (lr 1), momentum or Adam steps on the
    pseudo-gradient, with Flower's FedAvgM / FedAdam formulas."""

    def __init__(self, kind: str, lr: float, momentum: float):
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.m: dict | None = None
        self.v: dict | None = None
        self.t = 0

    def step(self, previous: dict, averaged: dict) -> dict:
        self.t += 1
        delta = {k: averaged[k].astype(np.float64) - previous[k] for k in previous}
        if self.kind == "avg":
            return {k: (previous[k] + self.lr * delta[k]).astype(previous[k].dtype) for k in previous}
        if self.kind == "avgm":
            self.m = delta if self.m is None else {k: self.momentum * self.m[k] + delta[k] for k in delta}
            return {k: (previous[k] + self.lr * self.m[k]).astype(previous[k].dtype) for k in previous}
        beta1, beta2, tau = 0.9, 0.99, 1e-3
        self.m = {k: (beta1 * self.m[k] if self.m else 0) + (1 - beta1) * delta[k] for k in delta}
        self.v = {k: (beta2 * self.v[k] if self.v else 0) + (1 - beta2) * delta[k] ** 2 for k in delta}
        eta = self.lr * np.sqrt(1 - beta2 ** (self.t + 1)) / (1 - beta1 ** (self.t + 1))
        return {k: (previous[k] + eta * self.m[k] / (np.sqrt(self.v[k]) + tau)).astype(previous[k].dtype)
                for k in previous}


def federate(cfg, manifests, work: Path, server: str, *, rounds: int) -> tuple[dict, dict]:
    """``rounds`` of DP training at every site and the ``server`` row's aggregation."""
    from clinfuse.federation.aggregation import SiteUpdate, aggregate
    from clinfuse.federation.site_runtime import SiteRuntime
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import seed_everything

    kind, weighting, lr, momentum = SERVERS[server]
    sites = [SiteRuntime(cfg, m, site_id=f"site-{k}", state_dir=work / f"site-{k}", max_epsilon=1e9)
             for k, m in enumerate(manifests)]
    seed_everything(cfg.train.seed)
    state = {k: v.numpy() for k, v in clean_state_dict(build_model_for(cfg)).items()}
    opt = Server(kind, lr, momentum)
    info = {"noise": {}, "sample_rate": {}, "patients": {s.site_id: s.n_patients for s in sites}}
    for r in range(1, rounds + 1):
        updates = []
        for site in sites:
            res = site.train_round(state, server_round=r, rounds=rounds, local_epochs=1, modality_aware=False)
            if res.declined:
                continue
            noise = res.metrics.get("noise_multiplier")
            q = site.plan(rounds, 1).sample_rate if cfg.privacy.enabled else None
            info["noise"][site.site_id], info["sample_rate"][site.site_id] = noise, q
            w = site_weight(weighting, res.num_examples, noise, q)
            updates.append(SiteUpdate(res.state, w, {}))
        state = opt.step(state, aggregate(updates, state, modality_aware=False))
    return state, info


def auroc(cfg, state, test_manifest) -> float:
    from clinfuse.data.dataset import MultimodalDataset
    from clinfuse.data.manifest import read_manifest
    from clinfuse.federation.site_runtime import numpy_to_state
    from clinfuse.training.checkpoint import build_model_for
    from clinfuse.training.trainer import _auroc, predict_outputs

    model = build_model_for(cfg)
    model.load_state_dict(numpy_to_state(state))
    data = read_manifest(test_manifest, cfg)
    out = predict_outputs(model, MultimodalDataset(data.records, cfg, None))
    return float(_auroc(out["labels"], out["probs"]))


def setting(epsilon: float, lr: float) -> str:
    """The column a run belongs to: privacy and the sites' learning rate."""
    return (f"epsilon {epsilon:g}" if epsilon else "no DP") + f", site lr {lr:g}"


def write_markdown(runs: list[dict]) -> None:
    """The table of every (dataset, column, server) over ``runs`` (each one invocation's JSON)."""
    from clinfuse.fileio import atomic_write_text

    results: dict = {}
    info: dict = {}
    for run in runs:
        for dataset, by_setting in run["results"].items():
            for label, by_server in by_setting.items():
                for server, values in by_server.items():
                    results.setdefault(dataset, {}).setdefault(label, {}).setdefault(server, []).extend(values)
        for dataset, about in run["info"].items():
            info.setdefault(dataset, {}).update(about)
    first = runs[0]["args"]
    lines = ["# Benchmark: the server side under DP noise (site weighting, server momentum, FedAdam)", "",
             ("Written by `benchmarks/server_noise.py`. Every site runs DP-SGD with its own plan (patient-level, "
              "Poisson sampling, noise planned for the whole horizon); only the server's aggregation differs. "
              f"{first['rounds']} rounds x 1 local epoch, Adam at the sites (learning rate per column), expected "
              f"batch {first['batch']}, clipping norm 1, RDP accountant, tabular-only model. AUROC on a pooled "
              "held-out test set (coordinator-side, benchmark only): mean +/- sd over the runs (n in brackets; "
              "the seed fixes the model initialisation, DP noise is never seeded, so runs of one seed differ)."), ""]
    for dataset, by_setting in results.items():
        labels = list(by_setting)
        lines += [f"## {dataset}", "", info.get(dataset, {}).get("about", ""), "",
                  "| server | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
        for server in SERVERS:
            cells = []
            for label in labels:
                vals = by_setting[label].get(server, [])
                cells.append(f"{np.mean(vals):.3f} +/- {np.std(vals):.3f} ({len(vals)})" if vals else "")
            if any(cells):
                lines.append(f"| {server} | " + " | ".join(cells) + " |")
        for label in labels:
            sites = info.get(dataset, {}).get(label)
            if sites and any(sites["noise"].values()):
                lines += ["", f"{label}: " + ", ".join(
                    f"{s}: {sites['patients'][s]} patients, noise multiplier {sites['noise'][s]:.2f}, sample rate "
                    f"{sites['sample_rate'][s]:.3f}" for s in sites["patients"])]
        lines.append("")
    lines += ["Runs (1 torch thread each):", "", "```"]
    lines += [f"{r['command']}    # {r['elapsed'] / 60:.1f} min" for r in runs]
    lines += ["```", ""]
    MD.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(MD, "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["breast", "synth"], choices=["breast", "synth"])
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 8.0], help="0: without DP")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--lr", type=float, nargs="+", default=[0.01], help="the sites' Adam learning rate(s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="write this run's results here")
    p.add_argument("--merge", type=Path, nargs="*", default=None,
                   help="write docs/benchmarks/aggregation.md from these runs' JSON files (and this run's)")
    p.add_argument("--md-only", action="store_true", help="with --merge: train nothing")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("clinfuse").setLevel(logging.WARNING)
    runs = [json.loads(Path(f).read_text()) for f in args.merge or []]
    if args.md_only:
        write_markdown(runs)
        print(f"wrote {MD}")
        return 0
    started = time.time()
    results: dict = {}
    info: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dataset in args.datasets:
            base, manifests, test = (breast_study if dataset == "breast" else synth_study)(tmp)
            info[dataset] = {"about": f"{len(manifests)} sites of " + ", ".join(
                str(patients_in(m)) for m in manifests) + f" patients; test set {patients_in(test)} patients."}
            for lr in args.lr:
                for e in args.eps:
                    label = setting(e, lr)
                    for server in args.servers:
                        for seed in range(args.first_seed, args.first_seed + args.seeds):
                            cfg = make_config(base, epsilon=e or None, seed=seed, rounds=args.rounds, lr=lr,
                                              batch=args.batch)
                            work = tmp / "runs" / dataset / re.sub(r"\W+", "-", f"{label}-{server}") / str(seed)
                            t0 = time.time()
                            state, site_info = federate(cfg, manifests, work, server, rounds=args.rounds)
                            value = auroc(cfg, state, test)
                            results.setdefault(dataset, {}).setdefault(label, {}).setdefault(server, []).append(value)
                            info[dataset][label] = site_info
                            print(f"{dataset} | {label} | {server:<20} seed {seed}: AUROC {value:.3f} "
                                  f"({time.time() - t0:.0f} s)", flush=True)
    elapsed = time.time() - started
    for dataset, by_setting in results.items():
        for label, by_server in by_setting.items():
            for server, vals in by_server.items():
                print(f"{dataset:<8} {label:<24} {server:<20} AUROC {np.mean(vals):.3f} +/- {np.std(vals):.3f}")
    print(f"({elapsed:.0f} s)")
    command = "python benchmarks/server_noise.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run = {"results": results, "info": info, "elapsed": elapsed, "command": command,
           "args": {"rounds": args.rounds, "batch": args.batch}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run, indent=2))
    if args.merge is not None:
        write_markdown([*runs, run])
        print(f"wrote {MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
