"""Plain FedAvg vs modality-aware aggregation on the demo cohort, whose last site has no notes.

Both runs train the same sites from the same initial weights with the same number of rounds
(DP-SGD with the demo config unless --no-dp); only the server's averaging differs. Under plain
FedAvg the note-less site sends back its untouched (frozen) text encoder and pulls the global one
towards its initial weights; modality-aware averaging takes the text encoder only from the sites
that have notes. Prints, on the pooled test split of all sites (evaluated at the coordinator for
the benchmark only):

- global AUROC: the fused model with every modality the patient has;
- text-only AUROC: the fused model given only the note (image and tabular masked out), on the
  patients that have one.

The loop is clinfuse's own (SiteRuntime + aggregate, no Flower): aggregation is the only thing
compared, and the numbers are those a Flower run gives with the same settings.

    python benchmarks/aggregation.py [--rounds 5] [--patients 200] [--seeds 1] [--no-dp] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clinfuse.config import config_from_dict, load_config
from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
from clinfuse.data.manifest import read_manifest
from clinfuse.data.synthetic import write_demo_cohort
from clinfuse.federation.aggregation import SiteUpdate, aggregate
from clinfuse.federation.site_runtime import SiteRuntime, numpy_to_state
from clinfuse.models.fusion import parameter_groups
from clinfuse.training.checkpoint import build_model_for, clean_state_dict
from clinfuse.training.trainer import _auroc, predict_outputs, seed_everything

TEXT = 1  # the demo config's modalities: image, text, tabular


def only_text(batch):
    """Keep the note; the image and tabular inputs are zeroed and masked out."""
    import torch

    keep = torch.zeros_like(batch["mask"])
    keep[:, TEXT] = batch["mask"][:, TEXT]
    return {**batch, "image": torch.zeros_like(batch["image"]), "tabular": torch.zeros_like(batch["tabular"]),
            "mask": keep}


def test_set(manifests, cfg) -> MultimodalDataset:
    records, cache = [], None
    for manifest in manifests:
        site = read_manifest(manifest, cfg)
        records += [r for r in site.records if r.split == "test"]
        cache = cache or default_cache_dir(manifest, cfg)
    return MultimodalDataset(records, cfg, cache)


def scores(cfg, state, dataset) -> dict:
    model = build_model_for(cfg)
    model.load_state_dict(numpy_to_state(state))
    full = predict_outputs(model, dataset)
    text = predict_outputs(model, dataset, transform=only_text)
    has_note = text["masks"][:, TEXT] > 0
    return {"global_auroc": _auroc(full["labels"], full["probs"]),
            "text_only_auroc": _auroc(text["labels"][has_note], text["probs"][has_note]),
            "test_patients": len(full["labels"]), "with_notes": int(has_note.sum())}


def federate(cfg, manifests, work: Path, *, rounds: int, modality_aware: bool, seed: int) -> dict:
    """``rounds`` of every site training, then (modality-aware or plain) averaging."""
    sites = [SiteRuntime(cfg, m, site_id=f"site-{k}", state_dir=work / f"site-{k}", max_epsilon=1e9)
             for k, m in enumerate(manifests)]
    seed_everything(seed)
    model = build_model_for(cfg)
    groups = parameter_groups(model)
    state = {k: v.numpy() for k, v in clean_state_dict(model).items()}
    for r in range(1, rounds + 1):
        updates = []
        for site in sites:
            result = site.train_round(state, server_round=r, rounds=rounds, local_epochs=1,
                                      modality_aware=modality_aware)
            updates.append(SiteUpdate(result.state, result.num_examples, result.modality_examples))
        state = aggregate(updates, state, groups=groups, modality_aware=modality_aware)
        print(f"  {'modality-aware' if modality_aware else 'fedavg'} seed {seed} round {r}/{rounds}",
              file=sys.stderr, flush=True)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=200, help="patients per site")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with this many initial weights")
    parser.add_argument("--no-dp", action="store_true", help="train without DP (clearer, slower)")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    cfg = load_config(args.config)
    if args.no_dp:
        data = cfg.model_dump(mode="json")
        data["privacy"]["enabled"] = False
        cfg = config_from_dict(data, source="--no-dp")
    started = time.time()
    results = {"fedavg": [], "modality-aware": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifests = write_demo_cohort(tmp / "cohort", sites=3, patients=args.patients, seed=0)
        test = test_set(manifests, cfg)
        for seed in range(args.seeds):
            for name, aware in (("fedavg", False), ("modality-aware", True)):
                state = federate(cfg, manifests, tmp / f"{name}-{seed}", rounds=args.rounds,
                                 modality_aware=aware, seed=seed)
                results[name].append(scores(cfg, state, test))

    print(f"aggregation benchmark: demo cohort, 3 sites x {args.patients} patients (site-2 has no notes), "
          f"{args.rounds} rounds, {'no DP' if args.no_dp else f'DP-SGD, target epsilon {cfg.privacy.target_epsilon:g}'}, "
          f"{args.seeds} seed(s); pooled test split: {results['fedavg'][0]['test_patients']} rows, "
          f"{results['fedavg'][0]['with_notes']} with a note")
    print(f"{'aggregation':<16}{'global AUROC':>16}{'text-only AUROC':>18}")
    summary = {}
    for name, rows in results.items():
        g = np.array([r["global_auroc"] for r in rows], dtype=float)
        t = np.array([r["text_only_auroc"] for r in rows], dtype=float)
        spread = (lambda a: f" +/- {a.std():.3f}" if len(a) > 1 else "")
        print(f"{name:<16}{g.mean():>10.3f}{spread(g):<6}{t.mean():>12.3f}{spread(t)}")
        summary[name] = {"global_auroc": g.tolist(), "text_only_auroc": t.tolist()}
    print(f"({time.time() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": args.rounds, "patients": args.patients, "dp": not args.no_dp,
                                         "results": summary}, indent=2))


if __name__ == "__main__":
    main()
