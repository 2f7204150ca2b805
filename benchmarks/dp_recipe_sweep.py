"""Sweep of DP-SGD recipe constants for the linear head, used to choose the plan's defaults.

Not the formal benchmark (that is ``benchmarks/dp_utility.py``): a fast simulation of federated
DP-SGD on the *fixed features* of :class:`clinfuse.models.linear.LinearHeadModel` (computed by
the library from each dataset), in closed form with numpy: Poisson sampling at the planned
rate, per-sample clipping to C, Gaussian noise of std sigma*C on the sum, division by the
expected batch, SGD with momentum (reset each round, as a new local trainer is), FedAvg weighted
by patients. sigma comes from the library's accountant (PRV) for the whole horizon. Prints
pooled-test AUROC (mean over seeds) per setting and whether any seed predicted one class.

    python benchmarks/dp_recipe_sweep.py --dataset breast|synth200|synth1000 [--eps 1 8] [--seeds 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def breast_cancer_sites(tmp: Path, seed: int = 0):
    """sklearn's breast-cancer data as 4 unequal site manifests (one of 40 patients) + config."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    from clinfuse.config import config_from_dict

    data = load_breast_cancer()
    x, y = data.data, data.target
    names = [f"f{i}" for i in range(x.shape[1])]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    sizes = [40, 110, 170, len(y) - 320]
    manifests, start = [], 0
    for k, size in enumerate(sizes):
        idx = order[start:start + size]
        start += size
        df = pd.DataFrame(x[idx], columns=names)
        df.insert(0, "patient_id", [f"s{k}-p{i}" for i in idx])
        df["label"] = [data.target_names[t] for t in y[idx]]
        split = rng.choice(["train", "val", "test"], size=size, p=[0.7, 0.1, 0.2])
        df["split"] = split
        (tmp / f"site-{k}").mkdir(parents=True, exist_ok=True)
        df.to_csv(tmp / f"site-{k}" / "manifest.csv", index=False)
        manifests.append(tmp / f"site-{k}" / "manifest.csv")
    # Declared reference scales, as a consortium would publish them (from the public data set).
    cols = [{"name": n, "type": "numeric", "min": float(min(0.0, x[:, i].min() * 1.5)),
             "max": float(x[:, i].max() * 1.5), "center": float(np.median(x[:, i])),
             "spread": float(x[:, i].std())} for i, n in enumerate(names)]
    cfg = config_from_dict({"study": "breast", "data": {"labels": list(data.target_names)},
                            "modalities": [{"name": "ehr", "kind": "tabular", "columns": cols}]})
    return cfg, manifests


def covid_sites(tmp: Path, image_size: int = 128):
    """covid-chestxray's site manifests (countries) and its config (images stay where they are)."""
    from clinfuse.config import config_from_dict, load_config
    from clinfuse.data.public.covid_chestxray import prepare_covid_chestxray

    repo = Path(__file__).resolve().parent.parent
    root = repo.parent / "shared" / "data" / "covid-chestxray"
    if not (root / "metadata.csv").is_file():
        root = Path("/work/shared/data/covid-chestxray")
    raw = load_config(repo / "configs" / "covid-chestxray.yaml").model_dump(mode="json")
    raw["data"]["image"]["size"] = [image_size, image_size]
    raw["data"]["roots"] = [str(root.resolve() / "images")]
    return config_from_dict(raw, source="covid"), prepare_covid_chestxray(root, tmp / "sites")


def synth_sites(tmp: Path, patients: int):
    from clinfuse.config import load_config
    from clinfuse.data.synthetic import write_demo_cohort

    return load_config(None), write_demo_cohort(tmp / "cohort", sites=3, patients=patients, seed=0)


def features(cfg, manifests):
    """Per site ``(Z_train, y_train)`` and the pooled test ``(Z, y)``: the linear head's inputs."""
    import torch

    from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
    from clinfuse.data.manifest import read_manifest
    from clinfuse.models.linear import build_linear_model

    model = build_linear_model(cfg.modalities, n_classes=cfg.n_classes)

    def z_of(ds):
        batch = ds.collate([ds[i] for i in range(len(ds))])
        feats = model.features_of(batch)
        w = (batch["mask"] > 0.5).float()
        parts = [w[:, i:i + 1] * feats[m] for i, m in enumerate(model.modality_names)]
        parts += [1.0 - w, torch.ones(len(w), 1)]
        return torch.cat(parts, 1).numpy().astype(np.float64), batch["label"].numpy()

    sites, test = [], []
    for m in manifests:
        data = read_manifest(m, cfg)
        for split, out in (("train", sites), ("test", test)):
            ds = MultimodalDataset([r for r in data.records if r.split == split], cfg, default_cache_dir(m, cfg))
            out.append(z_of(ds))
    zt = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
    return sites, zt


def softmax(a):
    a = a - a.max(1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(1, keepdims=True)


def auroc(y, p):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p[:, 1])) if p.shape[1] == 2 else float(roc_auc_score(y, p, multi_class="ovr"))


def fedavg(sites, n_classes, rounds, local_steps):
    """Patient-weighted FedAvg of a linear softmax model, one local epoch per round;
    ``local_steps(z, onehot, local)`` yields ``(gradient, lr, momentum)`` per local step, each
    gradient taken at ``local[0]``, the site's iterate as the previous steps left it."""
    w = np.zeros((sites[0][0].shape[1], n_classes))
    total = sum(len(y) for _, y in sites)
    for _ in range(rounds):
        new = np.zeros_like(w)
        for z, y in sites:
            local, v = [w.copy()], np.zeros_like(w)
            for g, lr, momentum in local_steps(z, np.eye(n_classes)[y], local):
                v = momentum * v + g
                local[0] = local[0] - lr * v
            new += local[0] * len(y) / total
        w = new
    return w


def federate(sites, n_classes, *, rounds, lr, momentum, rng, batch=32):
    """FedAvg of non-DP minibatch SGD with momentum (one epoch per round): the reference rows."""

    def local_steps(z, onehot, local):
        order = rng.permutation(len(z))
        for s in range(0, len(z), batch):
            b = order[s:s + batch]
            yield z[b].T @ (softmax(z[b] @ local[0]) - onehot[b]) / len(b), lr, momentum

    return fedavg(sites, n_classes, rounds, local_steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="breast")
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 8.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, nargs="+", default=[5])
    ap.add_argument("--steps", type=str, nargs="+", default=["1", "2", "4", "b256"],
                    help="steps per epoch: an integer, or bN = ceil(n / N)")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--clip", type=float, nargs="+", default=[1.0])
    ap.add_argument("--momentum", type=float, nargs="+", default=[0.0, 0.9])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--set", nargs="*", default=[], help="with --library: config overrides section.key=value")
    ap.add_argument("--library", action="store_true",
                    help="run the library's federation with the plan's defaults instead (eps 0 = non-DP)")
    args = ap.parse_args(argv)
    if args.library:
        library_run(args.dataset, [e or None for e in args.eps], args.seeds, args.rounds[0], args.set)
        return 0
    from clinfuse.privacy.accountant import plan_noise_multiplier
    from clinfuse.privacy.plan import default_delta

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dataset == "breast":
            cfg, manifests = breast_cancer_sites(tmp)
        elif args.dataset == "covid":
            cfg, manifests = covid_sites(tmp)
        else:
            cfg, manifests = synth_sites(tmp, int(args.dataset.removeprefix("synth")))
        sites, (zt, yt) = features(cfg, manifests)
    print(f"{args.dataset}: sites {[len(y) for _, y in sites]} train patients, {len(yt)} test; "
          f"{sites[0][0].shape[1]} features ({time.time() - started:.0f} s)", flush=True)
    results = []
    for lr_nodp in (0.5, 2.0):
        for rounds in args.rounds:
            aucs = [auroc(yt, softmax(zt @ federate(sites, cfg.n_classes, rounds=rounds, lr=lr_nodp, momentum=0.9,
                                                    rng=np.random.default_rng(s)))) for s in range(args.seeds)]
            print(f"non-DP SGD(0.9) lr {lr_nodp} rounds {rounds}: AUROC {np.mean(aucs):.4f}", flush=True)
            results.append({"dp": False, "lr": lr_nodp, "rounds": rounds, "auroc": aucs})
    sigmas = {}
    for eps, rounds, steps, clip, lr, mom in itertools.product(args.eps, args.rounds, args.steps, args.clip,
                                                               args.lr, args.momentum):
        def k_of(n, s=steps):
            return max(1, math.ceil(n / int(s[1:]))) if s.startswith("b") else int(s)
        aucs, single = [], 0
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            # One sigma per site (its own n): the largest is what the weakest site adds.
            sig = {}
            for _, y in sites:
                n = len(y)
                key = (eps, rounds, k_of(n), n)
                if key not in sigmas:
                    sigmas[key] = plan_noise_multiplier(eps, 1.0 / k_of(n), rounds * k_of(n), default_delta(n))
                sig[n] = sigmas[key]
            w = federate_sites(sites, cfg.n_classes, rounds, k_of, sig, clip, lr, mom, rng)
            p = softmax(zt @ w)
            single += len(np.unique(p.argmax(1))) < 2
            aucs.append(auroc(yt, p))
        line = {"eps": eps, "rounds": rounds, "steps": steps, "clip": clip, "lr": lr, "momentum": mom,
                "auroc": aucs, "single_class_seeds": single,
                "sigma": {n: round(s, 3) for n, s in sig.items()}}
        results.append(line)
        print(f"eps {eps:g} R {rounds} steps {steps} C {clip:g} lr {lr:g} mom {mom:g}: AUROC "
              f"{np.mean(aucs):.4f} (min {np.min(aucs):.4f}) single {single} sigma {line['sigma']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"done in {time.time() - started:.0f} s")
    return 0


def federate_sites(sites, n_classes, rounds, k_of, sig, clip, lr, mom, rng):
    """Like :func:`federate`, under DP-SGD: Poisson batches (rate 1/k), per-patient clipping and
    each site's own sigma (planned for its own n)."""

    def local_steps(z, onehot, local):
        n = len(z)
        k, sigma = k_of(n), sig[n]
        q = 1.0 / k
        for _ in range(k):
            pick = rng.random(n) < q
            zb, yb = z[pick], onehot[pick]
            g = np.zeros((z.shape[1], n_classes))
            if len(zb):
                r = softmax(zb @ local[0]) - yb
                norms = np.linalg.norm(r, axis=1) * np.linalg.norm(zb, axis=1)
                g = zb.T @ (r * np.minimum(1.0, clip / (norms + 1e-6))[:, None])
            yield (g + rng.normal(0, sigma * clip, size=g.shape)) / (q * n), lr, mom

    return fedavg(sites, n_classes, rounds, local_steps)


def library_run(dataset: str, epsilons, seeds: int, rounds: int = 5, overrides=()) -> None:
    """The same federation through the library (SiteRuntime + aggregate) with the plan's defaults."""
    import shutil

    from clinfuse.config import config_from_dict
    from clinfuse.federation.aggregation import SiteUpdate, aggregate
    from clinfuse.federation.site_runtime import SiteRuntime, numpy_to_state, state_to_numpy
    from clinfuse.models.fusion import parameter_groups
    from clinfuse.training.checkpoint import build_model_for
    from clinfuse.training.trainer import predict_proba, seed_everything

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg, manifests = (breast_cancer_sites(tmp) if dataset == "breast" else covid_sites(tmp)
                          if dataset == "covid" else synth_sites(tmp, int(dataset.removeprefix("synth"))))
        raw = cfg.model_dump(mode="json")
        raw["federation"].update(rounds=rounds, min_site_patients=30)
        for key in ("batch_size", "lr"):
            raw["train"].pop(key, None)
        raw["privacy"].pop("max_grad_norm", None)
        raw["balance"] = {}
        for item in overrides:  # section.key=value (YAML value)
            import yaml

            key, value = item.split("=", 1)
            section, name = key.split(".", 1)
            raw[section][name] = yaml.safe_load(value)
        from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
        from clinfuse.data.manifest import read_manifest

        for eps in epsilons:
            raw["privacy"].update(enabled=eps is not None, target_epsilon=eps or 8.0)
            c = config_from_dict(raw, source="library_run")
            test = [r for m in manifests for r in read_manifest(m, c).records if r.split == "test"]
            test = MultimodalDataset(test, c, default_cache_dir(manifests[0], c))
            aucs, single = [], 0
            for seed in range(seeds):
                shutil.rmtree(tmp / "state", ignore_errors=True)
                seed_everything(seed)
                model = build_model_for(c)
                groups = parameter_groups(model)
                state = state_to_numpy(model.state_dict())
                sites = [SiteRuntime(c, m, site_id=f"s{k}", state_dir=tmp / "state" / f"s{k}", max_epsilon=1e9)
                         for k, m in enumerate(manifests)]
                for r in range(1, rounds + 1):
                    ups = []
                    for s in sites:
                        res = s.train_round(state, server_round=r, rounds=rounds, local_epochs=1)
                        ups.append(SiteUpdate(res.state, res.num_examples, res.modality_examples))
                    state = aggregate(ups, state, groups=groups, modality_aware=True)
                model.load_state_dict(numpy_to_state(state))
                p = predict_proba(model, test)
                y = np.array([test[i]["label"].item() for i in range(len(test))])
                single += len(np.unique(p.argmax(1))) < 2
                aucs.append(auroc(y, p))
            print(f"library {dataset} eps {eps}: AUROC {np.mean(aucs):.4f} (seeds {[round(a, 4) for a in aucs]}), "
                  f"single-class seeds {single}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
