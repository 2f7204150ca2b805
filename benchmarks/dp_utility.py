"""DP utility: what differential privacy costs in AUROC and accuracy, old fixed settings vs the plan.

Datasets (each split into sites; every site's ``test`` split is the test set):

- ``covid``: the COVID-19 chest X-ray collection (``../shared/data/covid-chestxray``), sites by
  country as ``clinfuse prepare`` makes them, ``configs/covid-chestxray.yaml`` at its image size;
- ``breast-cancer``: scikit-learn's Wisconsin breast-cancer data (569 real patients), split with
  a fixed seed into 4 sites of 40, 115, 190 and 224 patients, written as a tabular-only study
  (manifest CSVs + a config made here) so it runs through the whole clinfuse pipeline;
- ``synth-50``, ``synth-200``, ``synth-1000``: the synthetic cohort (``clinfuse synth``, 3 sites)
  at 50, 200 and 1000 patients per site, ``configs/demo.yaml``.

Rows: pooled non-DP (all training splits in one place), federated non-DP, federated DP at
epsilon 1, 3 and 8 (every site's cap = the row's epsilon; delta per site is the library's
``default_delta``). The federation is an in-process loop over ``SiteRuntime.train_round`` +
``aggregate`` (``benchmarks/harness.py``), the library code the Flower app runs. Each row is
evaluated by ``clinfuse.evaluation.commands.evaluate_checkpoints`` (patient bootstrap 95%
intervals, threshold chosen on the ``val`` rows).

Plans (``--plan old|new|both``): ``old`` writes the former fixed settings into the config
(batch size, Adam and its learning rate, clipping norm 1.0, the 64-wide fusion model, as the
study configs of main had them); ``new`` leaves them out, so the library's defaults (its DP
training plan) decide.

Results are cached per (dataset, row, seed, plan) in ``docs/benchmarks/reports/dp-utility/``
(ignored by git), with the run's config digest and a hash of the clinfuse sources: a rerun trains
only what is missing or was trained by other code or settings. Writes
``docs/benchmarks/dp-utility.md`` and prints the targets and whether each is met.

    python benchmarks/dp_utility.py [--plan both] [--seeds 3] [--datasets covid,breast-cancer,...]
                                    [--quick] [--rows pooled,federated,dp1,dp3,dp8] [--fresh]
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.harness import evaluate_many, fmt_ci, hardware, train_federated, train_pooled

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (a worktree one level deeper: ../../shared)
COVID_ROOT = next((p / "shared" / "data" / "covid-chestxray" for p in (REPO.parent, REPO.parent.parent)
                   if (p / "shared" / "data" / "covid-chestxray" / "metadata.csv").is_file()),
                  REPO.parent / "shared" / "data" / "covid-chestxray")
WORK = REPO / "docs" / "benchmarks" / "reports" / "dp-utility"
MD = REPO / "docs" / "benchmarks" / "dp-utility.md"

#: (key, label, epsilon or None, federated)
ROWS = (("pooled", "pooled, non-DP", None, False),
        ("federated", "federated, non-DP", None, True),
        ("dp1", "federated DP, epsilon 1", 1.0, True),
        ("dp3", "federated DP, epsilon 3", 3.0, True),
        ("dp8", "federated DP, epsilon 8", 8.0, True))
ROW_KEYS = tuple(r[0] for r in ROWS)
SYNTH_SIZES = (50, 200, 1000)
BREAST_SITES = (40, 115, 190, 224)  # 569 patients; the smallest site is the "at most 40" one
PLANS = ("old", "new")

#: rounds (= pooled epochs) per dataset: (full, --quick)
ROUNDS = {"covid": (10, 2), "breast-cancer": (20, 3), "synth": (10, 2)}

# The former fixed settings, as main's study configs wrote them (configs/demo.yaml,
# configs/covid-chestxray.yaml): what "old" pins explicitly, and what "new" leaves out.
OLD_MODEL = {"dim": 64, "dropout": 0.1, "fusion": {"name": "attention"}}
OLD_TRAIN = {"batch_size": 32, "lr": 0.002, "optimizer": "adam"}
OLD_PRIVACY = {"max_grad_norm": 1.0}
PLAN_KEYS = {"train": ("batch_size", "lr", "optimizer", "weight_decay"),
             "privacy": ("max_grad_norm", "noise_multiplier")}


# -- datasets ---------------------------------------------------------------------------------

def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _strip_plan(raw: dict) -> dict:
    """The study config without the settings a DP training plan decides (what "new" runs)."""
    raw = copy.deepcopy(raw)
    raw.pop("model", None)
    for section, keys in PLAN_KEYS.items():
        for key in keys:
            raw.get(section, {}).pop(key, None)
    for spec in raw.get("modalities") or ():
        spec.pop("encoder", None)
    return raw


def covid_study(work: Path, root: Path, quick: bool) -> tuple[list[Path], dict, dict]:
    """Manifests, the study config without plan settings, and the "old" pins."""
    from clinfuse.data.public.covid_chestxray import prepare_covid_chestxray

    manifests = prepare_covid_chestxray(root, work / "covid" / "sites")
    raw = _yaml(REPO / "configs" / "covid-chestxray.yaml")
    raw["data"]["roots"] = [str(root.resolve() / "images")]  # the manifests point into the collection
    if quick:
        raw["data"]["image"]["size"] = [64, 64]
    old = {"model": raw["model"], "train": {k: raw["train"][k] for k in ("batch_size", "lr")} | {"optimizer": "adam"},
           "privacy": {"max_grad_norm": raw["privacy"]["max_grad_norm"]}}
    return manifests, _strip_plan(raw), old


def synth_study(work: Path, patients: int) -> tuple[list[Path], dict, dict]:
    from clinfuse.data.synthetic import ensure_demo_cohort

    manifests = ensure_demo_cohort(work / f"synth-{patients}", sites=3, patients=patients, seed=0,
                                   log=lambda line: print(line, flush=True))
    raw = _yaml(REPO / "configs" / "demo.yaml")
    raw["study"] = f"dp-utility-synth-{patients}"
    old = {"model": raw["model"], "train": {k: raw["train"][k] for k in ("batch_size", "lr")} | {"optimizer": "adam"},
           "privacy": {"max_grad_norm": raw["privacy"]["max_grad_norm"]}}
    return manifests, _strip_plan(raw), old


def _breast_ranges(descr: str) -> list[tuple[float, float]]:
    """The published (min, max) of each feature, from the data set's own description table
    (its "Summary Statistics", one line per feature in feature order)."""
    rows = re.findall(r"^[a-z ]+\((?:mean|standard error|worst)\):\s+([0-9.]+)\s+([0-9.]+)\s*$", descr, re.MULTILINE)
    if len(rows) != 30:
        raise RuntimeError(f"expected 30 feature ranges in load_breast_cancer().DESCR, found {len(rows)}")
    return [(float(lo), float(hi)) for lo, hi in rows]


def breast_study(work: Path) -> tuple[list[Path], dict, dict]:
    """4 sites of unequal size (fixed permutation, seed 0), one manifest CSV each.

    The tabular encoding is declared from the data set's published description (each feature's
    range, scaled around its mid-range by a quarter of it): a data dictionary, not statistics
    fitted on any site's rows. Declared ranges are widened (0 to twice the published maximum)
    because the published ones are rounded.
    """
    from sklearn.datasets import load_breast_cancer

    from clinfuse.fileio import atomic_write_text

    data = load_breast_cancer()
    names = [re.sub(r"[^a-z0-9]+", "_", n.lower()).strip("_") for n in data.feature_names]
    columns = [{"name": n, "type": "numeric", "min": 0.0, "max": 2 * hi, "center": (lo + hi) / 2,
                "spread": (hi - lo) / 4} for n, (lo, hi) in zip(names, _breast_ranges(data.DESCR))]
    # sklearn: 0 = malignant, 1 = benign; the study's positive class is malignant
    labels = np.where(data.target == 0, "malignant", "benign")
    order = np.random.default_rng(0).permutation(len(labels))
    manifests, start = [], 0
    for k, size in enumerate(BREAST_SITES):
        idx = order[start:start + size]
        start += size
        lines = [",".join(["patient_id", "label", *names])]
        lines += [",".join([f"bc{i:04d}", labels[i], *(repr(float(v)) for v in data.data[i])]) for i in idx]
        path = work / "breast-cancer" / f"site-{k}" / "manifest.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(lines) + "\n"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        manifests.append(path)
    if start != len(labels):
        raise RuntimeError(f"site sizes {BREAST_SITES} do not add up to {len(labels)} patients")
    raw = {"study": "dp-utility-breast-cancer",
           "data": {"labels": ["benign", "malignant"],
                    "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}},
           "modalities": [{"name": "tabular", "kind": "tabular", "columns": columns}],
           "train": {}, "privacy": {"enabled": True, "accountant": "prv"},
           "federation": {"local_epochs": 1, "strategy": "fedavg", "modality_aware": True, "min_sites": 2},
           "evaluation": {"threshold": "youden"}}
    old = {"model": {**OLD_MODEL, "dropout": 0.1}, "train": dict(OLD_TRAIN), "privacy": dict(OLD_PRIVACY),
           "modality_encoder": {"tabular": {"hidden": 32}}}
    return manifests, raw, old


# -- configs ----------------------------------------------------------------------------------

def run_config(base: dict, old: dict, *, plan: str, seed: int, epsilon: float | None, rounds: int,
               bootstrap: int, threads: int):
    """The config of one run: the study + (for "old") the pinned settings + the run's seed,
    horizon, privacy and evaluation settings."""
    from clinfuse.config import FederationConfig, ModelConfig, TrainConfig, config_from_dict

    raw = copy.deepcopy(base)
    if "min_site_patients" in FederationConfig.model_fields:
        # a study-level fact the consortium declares (the smallest site's training patients)
        raw.setdefault("federation", {})["min_site_patients"] = old["min_site_patients"]
    if plan == "old":
        raw["model"] = copy.deepcopy(old["model"])
        for section in ("train", "privacy"):
            raw.setdefault(section, {}).update(old[section])
        # where this version has them: the old model and trainer (fusion head, last iterate)
        if "head" in ModelConfig.model_fields:
            raw["model"]["head"] = "fusion"
        if "ema_decay" in TrainConfig.model_fields:
            raw["train"]["ema_decay"] = 0.0
        for spec in raw.get("modalities") or ():
            if spec["name"] in old.get("modality_encoder", {}):
                spec["encoder"] = dict(old["modality_encoder"][spec["name"]])
    raw.setdefault("train", {}).update(seed=seed, epochs=rounds, num_threads=threads, device="cpu")
    raw.setdefault("privacy", {}).update(enabled=epsilon is not None,
                                         target_epsilon=epsilon if epsilon is not None else 8.0)
    raw.setdefault("federation", {}).update(rounds=rounds, local_epochs=1)
    raw.setdefault("evaluation", {}).update(bootstrap=bootstrap)
    return config_from_dict(raw, source=f"benchmarks/dp_utility.py ({plan} plan)")


def min_training_patients(manifests, base: dict) -> int:
    """Training patients of the smallest site, by the config's patient split (no file is read
    but the manifests)."""
    from clinfuse.config import config_from_dict
    from clinfuse.data.manifest import patient_split

    cfg = config_from_dict(copy.deepcopy(base), source="benchmarks/dp_utility.py")
    counts = []
    for m in manifests:
        with open(m, newline="", encoding="utf-8") as f:
            split = {row["patient_id"]: row.get("split") or patient_split(row["patient_id"], cfg)
                     for row in csv.DictReader(f)}
        counts.append(sum(s == "train" for s in split.values()))
    return min(counts)


def code_hash() -> str:
    """sha256 (12 hex) of the clinfuse sources and the harness: what trained a cached row."""
    h = hashlib.sha256()
    for path in sorted([*(REPO / "clinfuse").rglob("*.py"), REPO / "benchmarks" / "harness.py"]):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


# -- running ----------------------------------------------------------------------------------

def train_one(cfg, manifests, row: str, out: Path) -> dict:
    """Train one row into ``out`` (emptied first); returns the cache record without metrics."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _key, _label, epsilon, federated = next(r for r in ROWS if r[0] == row)
    t0 = time.time()
    if federated:
        ckpt, info = train_federated(cfg, manifests, out, epsilon=epsilon)
    else:
        ckpt, info = train_pooled(cfg, manifests, out), {}
    return {"checkpoint": str(ckpt), "metrics": None, "info": info, "train_s": time.time() - t0, "eval_s": 0.0}


def evaluate_pending(results: dict, names: list[str], manifests, out: Path) -> None:
    """Evaluate the trained, not yet evaluated runs ``names`` in one call; fills their metrics."""
    if not names:
        return
    t0 = time.time()
    docs = evaluate_many([Path(results[n]["checkpoint"]) for n in names], manifests, out)
    share = (time.time() - t0) / len(names)
    for n, doc in zip(names, docs):
        results[n].update(metrics=doc, eval_s=share)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(results: dict, dataset: str, row: str, plan: str, seeds) -> dict | None:
    recs = [results.get(f"{dataset}|{row}|{s}|{plan}") for s in seeds]
    recs = [r for r in recs if r is not None and r.get("metrics")]
    if not recs:
        return None
    au = [r["metrics"]["auroc"]["value"] for r in recs]
    acc = [r["metrics"].get("accuracy", {}).get("value") for r in recs]
    single = {rule: [r["seed"] for r in recs if r["metrics"]["predicted_classes"][rule] < 2]
              for rule in ("threshold", "argmax")}
    return {"auroc": _mean(au), "auroc_sd": float(np.std([a for a in au if a is not None])) if au else None,
            "accuracy": _mean(acc), "seeds": [r["seed"] for r in recs], "single_class": single,
            "records": recs}


def targets(results: dict, datasets, seeds, plan: str) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met) for one plan; met is None when the rows were not run."""
    out = []

    def gap(dataset, margin):
        fed, dp8 = summarize(results, dataset, "federated", plan, seeds), summarize(results, dataset, "dp8", plan, seeds)
        name = f"{dataset}: federated DP epsilon 8 within {margin:.2f} AUROC of federated non-DP"
        if dataset not in datasets or not fed or not dp8 or fed["auroc"] is None or dp8["auroc"] is None:
            return name, "not run", None
        d = fed["auroc"] - dp8["auroc"]
        return name, f"{dp8['auroc']:.3f} vs {fed['auroc']:.3f} (gap {d:+.3f})", bool(d <= margin)

    out += [gap("breast-cancer", 0.03), gap("synth-1000", 0.03), gap("synth-200", 0.05)]
    ran = {d: summarize(results, d, "dp1", plan, seeds) for d in datasets}
    ran = {d: v for d, v in ran.items() if v}
    n_runs = sum(len(v["seeds"]) for v in ran.values())

    def collapsed(rule):
        bad = {d: v["single_class"][rule] for d, v in ran.items() if v["single_class"][rule]}
        return bad, (f"none of {n_runs} runs" if not bad else
                     "; ".join(f"{d} seed(s) {', '.join(map(str, s))}" for d, s in bad.items()))

    bad, figure = collapsed("threshold")
    _, argmax_figure = collapsed("argmax")
    # The verdict is on the decision `clinfuse evaluate` / `predict` make (the threshold chosen on
    # the val rows); the most probable class is shown beside it (an uncalibrated intercept can put
    # every patient on one side of 0.5 while the model still ranks them).
    out.append(("epsilon 1: no seed of any dataset predicts a single class for all test patients",
                f"at the val threshold: {figure}; at the most probable class: {argmax_figure}" if ran else "not run",
                (not bad) if ran else None))
    cov = summarize(results, "covid", "dp8", plan, seeds)
    if "covid" in datasets and cov and cov["auroc"] is not None:
        out.append(("covid: federated DP epsilon 8 mean AUROC >= 0.70", f"{cov['auroc']:.3f}", bool(cov["auroc"] >= 0.70)))
    else:
        out.append(("covid: federated DP epsilon 8 mean AUROC >= 0.70", "not run", None))
    return out


# -- markdown ---------------------------------------------------------------------------------

def _cell(rec) -> str:
    m = rec["metrics"]
    one = [rule for rule, k in m["predicted_classes"].items() if k < 2]
    flag = f" (one class at {' and '.join(one)})" if one else ""
    return f"{fmt_ci(m['auroc'])} / {fmt_ci(m.get('accuracy'))}{flag}"


def _privacy_line(rec) -> str:
    info = rec["info"]
    if "epsilon_per_site" not in info:
        return ""
    eps = info["epsilon_per_site"].values()
    sig = info["noise_multiplier_per_site"].values()
    batch = info["expected_batch_per_site"].values()
    delta = info["delta_per_site"].values()
    return (f"epsilon spent {min(eps):.2f}-{max(eps):.2f}, delta {min(delta):.2g}-{max(delta):.2g}, "
            f"noise multiplier {min(sig):.2f}-{max(sig):.2f}, expected batch {min(batch):.0f}-{max(batch):.0f}, "
            f"clip {', '.join(sorted({f'{c:g}' for c in info['max_grad_norm_per_site'].values()}))}"
            + _recipe_text(info.get("recipe_per_site") or {}))


def _recipe_text(per_site: dict) -> str:
    """The plan's training recipe over sites, where the plan has one: head, optimizer, lr range, EMA."""
    if not per_site or not any(per_site.values()):
        return ""
    parts = []
    for field in ("head", "optimizer"):
        values = sorted({str(r[field]) for r in per_site.values() if field in r})
        if values:
            parts.append(f"{field} {'/'.join(values)}")
    for field, name in (("lr", "lr"), ("ema_decay", "EMA decay"), ("noise_ratio", "noise/batch")):
        values = [r[field] for r in per_site.values() if field in r]
        if values:
            lo, hi = min(values), max(values)
            parts.append(f"{name} {lo:.3g}" + (f"-{hi:.3g}" if hi != lo else ""))
    return "; " + ", ".join(parts)


def write_markdown(path: Path, args, results, datasets, plans, seeds, describe: dict, elapsed: float,
                   command: str) -> list[str]:
    from clinfuse.fileio import atomic_write_text

    lines = ["# Benchmark: what DP costs (old fixed settings vs the library's plan)", "",
             ("Test set: every site's `test` split (patient-level split from the config). Each cell: "
              "AUROC [95% CI] / accuracy [95% CI], patient bootstrap, "
              f"{args.bootstrap} resamples; accuracy at the threshold `clinfuse evaluate` chooses on the `val` "
              "rows (Youden). *(one class at threshold / argmax)*: the model predicts one class for every test "
              "patient at that threshold / at its most probable class. DP rows: DP-SGD at every site (patient-level, "
              "Poisson sampling, noise planned for the whole horizon, each site's cap = the row's "
              "epsilon, delta = `clinfuse.privacy.plan.default_delta`: min(1e-5, 0.1/n))."), "",
             ("Plans: **old** writes the former fixed settings into the config (Adam at lr 0.002, batch "
              "32 (covid: 16), clipping norm 1.0, the 64-wide attention-fusion model of main's configs); "
              "**new** leaves every one of them out: the library's defaults and DP training plan decide."), ""]
    shown = [r for r in ROWS if r[0] in args.rows]
    lines += ["## Summary: mean test AUROC over seeds", "",
              "| dataset | plan | " + " | ".join(r[1] for r in shown) + " |",
              "| --- | --- | " + " | ".join("---" for _ in shown) + " |"]
    for dataset in datasets:
        for plan in plans:
            cells = []
            for key, *_ in shown:
                s = summarize(results, dataset, key, plan, seeds)
                cells.append("not run" if s is None or s["auroc"] is None else
                             f"{s['auroc']:.3f}" + (" *" if s["single_class"]["threshold"] else "")
                             + (" †" if s["single_class"]["argmax"] else ""))
            lines.append(f"| {dataset} | {plan} | " + " | ".join(cells) + " |")
    lines += ["", ("\\* at least one seed predicts a single class for every test patient at the threshold chosen "
                   "on the val rows; † at the most probable class (details below)."), ""]
    for dataset in datasets:
        d = describe[dataset]
        lines += [f"## {d['title']}", "", d["text"], ""]
        header = "| row | plan | AUROC mean (sd) | accuracy mean | " + " | ".join(f"seed {s}" for s in seeds) + " |"
        lines += [header, "| --- | --- | --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
        notes = []
        for key, label, _eps, _fed in ROWS:
            if key not in args.rows:
                continue
            for plan in plans:
                s = summarize(results, dataset, key, plan, seeds)
                if s is None:
                    lines.append(f"| {label} | {plan} | not run | | " + " | ".join("" for _ in seeds) + " |")
                    continue
                by_seed = {r["seed"]: r for r in s["records"]}
                cells = [_cell(by_seed[x]) if x in by_seed else "not run" for x in seeds]
                acc = f"{s['accuracy']:.3f}" if s["accuracy"] is not None else "n/a"
                sd = f" ({s['auroc_sd']:.3f})" if len(s["seeds"]) > 1 else ""
                lines.append(f"| {label} | {plan} | {s['auroc']:.3f}{sd} | {acc} | "
                             + " | ".join(cells) + " |")
                for r in s["records"]:
                    if r["info"].get("epsilon_per_site"):
                        notes.append(f"- {label}, {plan}, seed {r['seed']}: {_privacy_line(r)}")
        params = sorted({(r["plan"], r["info"].get("trainable_parameters")) for r in results.values()
                         if r["dataset"] == dataset and r["info"].get("trainable_parameters")})
        if params:
            lines += ["", "Trainable parameters: " + ", ".join(f"{p} plan {n:,}" for p, n in params) + "."]
        if notes:
            lines += ["", "<details><summary>Privacy spent and mechanism per DP run</summary>", "", *notes, "",
                      "</details>"]
        lines.append("")
    lines += ["## Targets", ""]
    printed = []
    for plan in plans:
        lines += [f"{plan} plan:", ""]
        for name, figure, met in targets(results, datasets, seeds, plan):
            verdict = "" if met is None else (": met" if met else ": **missed**")
            lines.append(f"- {name}: {figure}{verdict}")
            printed.append(f"[{plan}] {name}: {figure}: {'NOT RUN' if met is None else ('met' if met else 'MISSED')}")
        lines.append("")
    recs = [r for r in results.values() if r["dataset"] in datasets and r["plan"] in plans and r["seed"] in seeds
            and r.get("metrics")]
    cpu = sum(r["train_s"] + r["eval_s"] for r in recs)
    codes = sorted({r["code"] for r in recs})
    lines += [
        "## How it was run", "",
        (f"Hardware: {hardware()}; {args.threads} torch thread per run, runs one after another. "
         f"Training + evaluation time summed over the {len(recs)} runs in the tables: {cpu / 60:.1f} min "
         f"(per dataset: " + ", ".join(
             f"{d} {sum(r['train_s'] + r['eval_s'] for r in recs if r['dataset'] == d) / 60:.1f}" for d in datasets)
         + f"). Wall time of the invocation that wrote this file: {elapsed / 60:.1f} min (cached runs are "
         "not retrained)."),
        "",
        "clinfuse sources (sha256 prefix of `clinfuse/**/*.py` + `benchmarks/harness.py`) that trained the runs: "
        + ", ".join(f"`{c}` ({sum(r['code'] == c for r in recs)} runs: "
                    + ", ".join(sorted({f"{r['dataset']} {r['plan']}" for r in recs if r["code"] == c})) + ")"
                    for c in codes) + ".",
        "",
        "```", command, "```", "",
        ("Per-run evaluation reports (report.html, metrics.json, predictions.csv), checkpoints and the "
         "results cache are under `docs/benchmarks/reports/dp-utility/` (not committed)."), ""]
    atomic_write_text(path, "\n".join(lines))
    return printed


def describe_sites(dataset: str, manifests, cfg_rounds: int, extra: str = "") -> dict:
    sizes = []
    for m in manifests:
        with open(m, newline="", encoding="utf-8") as f:
            sizes.append(len({row["patient_id"] for row in csv.DictReader(f)}))
    title = {"covid": "(a) covid-chestxray (real images, notes, tabular)",
             "breast-cancer": "(b) breast cancer, 4 hospitals (real, tabular only)"}.get(
        dataset, f"(c) synthetic cohort, {dataset.removeprefix('synth-')} patients per site")
    text = (f"{len(manifests)} sites of {', '.join(map(str, sizes))} patients (all splits); "
            f"{cfg_rounds} federated rounds x 1 local epoch (pooled: {cfg_rounds} epochs). {extra}").strip()
    return {"title": title, "text": text}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=("old", "new", "both"), default="both")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--datasets", default="covid,breast-cancer,synth-50,synth-200,synth-1000",
                   help="comma-separated: covid, breast-cancer, synth-<patients per site>")
    p.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma-separated, of {', '.join(ROW_KEYS)}")
    p.add_argument("--rounds", type=int, default=None, help="override every dataset's rounds")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 1 seed, covid at 64 px, synth 50 patients per site, few rounds")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--covid-root", type=Path, default=COVID_ROOT)
    p.add_argument("--workdir", type=Path, default=WORK, help="cohorts, runs and the results cache")
    p.add_argument("--md", type=Path, default=None,
                   help=f"markdown out (default {MD.relative_to(REPO)}; --quick: <workdir>/dp-utility-quick.md)")
    p.add_argument("--fresh", action="store_true", help="retrain every run, ignoring the cache")
    p.add_argument("--keep-other-code", action="store_true",
                   help="reuse cached runs trained by other clinfuse sources (same config); the md lists the sources")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROW_KEYS]
    if bad:
        p.error(f"unknown rows {bad} (of {', '.join(ROW_KEYS)})")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if args.quick and "--datasets" not in " ".join(argv if argv is not None else sys.argv):
        datasets = ["covid", "breast-cancer", "synth-50"]
    for d in datasets:
        if d not in ("covid", "breast-cancer") and not re.fullmatch(r"synth-[1-9][0-9]*", d):
            p.error(f"unknown dataset {d!r}")
    if "covid" in datasets and not (args.covid_root / "metadata.csv").is_file():
        print(f"covid: skipped: data not found at {args.covid_root}")
        datasets.remove("covid")
    plans = list(PLANS) if args.plan == "both" else [args.plan]
    seeds = [0] if args.quick else list(range(args.seeds))
    md = args.md or (args.workdir / "dp-utility-quick.md" if args.quick else MD)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("clinfuse").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from clinfuse.fileio import atomic_write_json

    started = time.time()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / ("results-quick.json" if args.quick else "results.json")
    results = {} if args.fresh or not cache_path.is_file() else json.loads(cache_path.read_text())["results"]
    code = code_hash()

    studies, describe = {}, {}
    for d in datasets:
        if d == "covid":
            manifests, base, old = covid_study(work, args.covid_root, args.quick)
            rounds = ROUNDS["covid"][args.quick]
            size = base["data"]["image"]["size"]
            extra = f"Images {size[0]}x{size[1]} (the config's size{'; --quick: 64' if args.quick else ''})."
        elif d == "breast-cancer":
            manifests, base, old = breast_study(work)
            rounds = ROUNDS["breast-cancer"][args.quick]
            extra = ("Sites drawn from one fixed permutation (seed 0); 30 numeric fields, encoded from the "
                     "data set's published ranges (no statistic fitted on a site).")
        else:
            manifests, base, old = synth_study(work, int(d.split("-")[1]))
            rounds = ROUNDS["synth"][args.quick]
            extra = "Image, note and tabular; the last site has no notes."
        rounds = args.rounds or rounds
        old["min_site_patients"] = min_training_patients(manifests, base)
        studies[d] = (manifests, base, old, rounds)
        describe[d] = describe_sites(d, manifests, rounds, extra)

    command = "python benchmarks/dp_utility.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # Seeds innermost: their plans repeat (same sites, epsilon and horizon), so the accountant's
    # in-process cache answers seeds 1 and 2. One evaluation call per dataset and plan.
    for d in datasets:
        manifests, base, old, rounds = studies[d]
        for plan in plans:
            pending = []
            for key, label, eps, _fed in ROWS:
                if key not in args.rows:
                    continue
                for seed in seeds:
                    cfg = run_config(base, old, plan=plan, seed=seed, epsilon=eps, rounds=rounds,
                                     bootstrap=args.bootstrap, threads=args.threads)
                    fingerprint = f"{cfg.digest()[:16]}-{code}"
                    name = f"{d}|{key}|{seed}|{plan}"
                    rec = results.get(name, {})
                    same = (rec.get("fingerprint", "").split("-")[0] == fingerprint.split("-")[0]
                            if args.keep_other_code else rec.get("fingerprint") == fingerprint)
                    if same and (rec.get("metrics") or Path(rec["checkpoint"]).is_file()):
                        if not rec.get("metrics"):
                            pending.append(name)
                        continue
                    rec = train_one(cfg, manifests, key, work / "runs" / d / plan / key / f"seed{seed}")
                    rec.update(dataset=d, row=key, seed=seed, plan=plan, fingerprint=fingerprint, code=code)
                    results[name] = rec
                    pending.append(name)
                    atomic_write_json(cache_path, {"results": results})
                    print(f"{d:<14} {label:<26} {plan:<3} seed {seed} | trained in {rec['train_s']:.0f} s", flush=True)
            if pending:
                evaluate_pending(results, pending, manifests, work / "runs" / d / plan / "evaluation")
                atomic_write_json(cache_path, {"results": results})
                for name in pending:
                    rec, label = results[name], {r[0]: r[1] for r in ROWS}[results[name]["row"]]
                    m = rec["metrics"]
                    print(f"{d:<14} {label:<26} {plan:<3} seed {rec['seed']} | AUROC {fmt_ci(m['auroc'])} | "
                          f"acc {fmt_ci(m.get('accuracy'))} | classes {m['predicted_classes']}", flush=True)
                # after every evaluation: an interrupted benchmark still leaves a truthful, partial table
                write_markdown(md, args, results, datasets, plans, seeds, describe, time.time() - started, command)
    printed = write_markdown(md, args, results, datasets, plans, seeds, describe, time.time() - started, command)
    print("\nTargets:")
    for line in printed:
        print("  " + line)
    print(f"wrote {md} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
