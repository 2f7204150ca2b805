"""Fusion vs single-modality models, and the modality-balancing ablation, under DP-SGD.

On the synthetic cohort (sites pooled), every model is trained with DP-SGD at the same target
epsilon (default 8) through the library's trainer (``plan_privacy`` + an in-memory accountant):

- single-modality models: the fusion model trained and tested with the other two modalities
  removed (inputs zeroed and masked), so a patient without that modality gets the prior;
- the fused model on all modalities;
- the fused and image-only models on the test split with 50% of the notes removed.

Checks (issue 3): fused >= best single + 0.03; with half the notes removed, fused >= image-only.

Balancing ablation on the ``text_dominant`` cohort (notes nearly give the label away, the image
as informative as in the default cohort): the image auxiliary head's test AUROC with balancing
(text modality dropout + fixed auxiliary weights) vs without (no dropout, no auxiliary loss), plus
the intermediate "aux weights only". The demo model adds the aux logits of the present modalities
to its fused logits (``fusion.residual_aux``), so even without an auxiliary loss the image head is
trained, through the main loss, but only as far as the dominant note leaves anything to explain.
Also printed: the fused model's AUROC on test patients without a note (where the image has to
carry the prediction) and a linear probe (logistic regression, fitted on the training split) on
the image encoder's features, which separates "the encoder learned nothing" from "the head was
not trained". Check: image aux AUROC with balancing >= without + 0.03 (the probe is reported).

Defaults (3 sites x 1000 patients, batch 256, 20 epochs, Adam lr 0.005, 3 seeds, 1 thread) take
about 30 minutes on one core; ``--skip-ablation`` / ``--skip-fusion`` run either half alone.
The cohort is this size because at 200 patients per site the test split (about 100 patients)
gives AUROCs whose sampling error is larger than the differences being checked.

    python benchmarks/fusion.py [--patients 1000] [--epochs 20] [--seeds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from clinfuse.config import MODALITIES, config_from_dict, load_config
from clinfuse.data.dataset import MultimodalDataset

REPO = Path(__file__).resolve().parents[1]


class ModalityView(MultimodalDataset):
    """A dataset whose items keep only some modalities (the others zeroed and masked out).

    ``keep``: modalities to keep; ``drop_text``: optional boolean array, ``True`` rows lose their
    note (as in the "50% of notes removed" test). Shares the base dataset's decoded images.
    """

    def __init__(self, base: MultimodalDataset, keep=MODALITIES, drop_text: np.ndarray | None = None):
        self.__dict__.update(base.__dict__)
        self.keep = torch.tensor([m in keep for m in MODALITIES], dtype=torch.float32)
        self.drop_text = drop_text

    def __getitem__(self, index: int):
        image, text, tabular, mask, label = super().__getitem__(index)
        keep = self.keep.clone()
        if self.drop_text is not None and self.drop_text[index]:
            keep[1] = 0.0
        mask = mask * keep
        if not mask[0]:
            image = torch.zeros_like(image)
        if not mask[1]:
            text = torch.zeros_like(text)
        if not mask[2]:
            tabular = torch.zeros_like(tabular)
        return image, text, tabular, mask, label


def make_config(args, seed: int, balance: dict | None = None):
    raw = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    raw["train"].update(epochs=args.epochs, lr=args.lr, seed=seed, batch_size=args.batch_size)
    raw["privacy"].update(enabled=True, target_epsilon=args.epsilon)
    if args.model_dim:
        raw["model"]["dim"] = args.model_dim
    if args.text_embedding_dim:
        raw["model"]["text_encoder"]["embedding_dim"] = args.text_embedding_dim
    if args.channels:
        raw["model"]["image_encoder"]["channels"] = args.channels
    if args.fusion:
        raw["model"]["fusion"]["name"] = args.fusion
    if balance is not None:
        raw["balance"].update(balance)
    return config_from_dict(raw, source="benchmarks/fusion.py")


def train_dp(cfg, train_set: MultimodalDataset):
    """Train with DP-SGD at cfg.privacy.target_epsilon; returns (clean model, epsilon spent).

    The accountant is a fresh one per model, in a temporary file (the trainer saves it each epoch).
    """
    from clinfuse.privacy.accountant import SiteAccountant
    from clinfuse.privacy.plan import plan_privacy
    from clinfuse.training.checkpoint import build_model_for, clean_state_dict
    from clinfuse.training.trainer import LocalTrainer, seed_everything

    seed_everything(cfg.train.seed)
    n_patients = len({r.patient_id for r in train_set.records})
    plan = plan_privacy(cfg, n_patients, cfg.train.epochs)
    with tempfile.TemporaryDirectory(prefix="clinfuse-acct-") as state:
        accountant = SiteAccountant(Path(state) / "accountant.json", mechanism=cfg.privacy.accountant)
        trainer = LocalTrainer(cfg, build_model_for(cfg), train_set, plan=plan, accountant=accountant,
                               progress=False, device=torch.device("cpu"))
        trainer.fit(cfg.train.epochs)
        epsilon = trainer.epsilon()
    model = build_model_for(cfg)
    model.load_state_dict(clean_state_dict(trainer.model))
    model.eval()
    return model, epsilon


def auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def test_auroc(model, dataset) -> float:
    from clinfuse.training.trainer import predict_outputs

    out = predict_outputs(model, dataset)
    return auroc(out["labels"], out["probs"][:, 1])


def fused_auroc_without_note(model, dataset) -> float:
    from clinfuse.training.trainer import predict_outputs

    out = predict_outputs(model, dataset)
    lacks = out["masks"][:, 1] == 0
    return auroc(out["labels"][lacks], out["probs"][lacks, 1])


def image_aux_auroc(model, dataset) -> float:
    from clinfuse.training.trainer import predict_outputs

    out = predict_outputs(model, dataset)
    has = out["masks"][:, 0] > 0
    return auroc(out["labels"][has], out["aux"]["image"][has, 1])


@torch.no_grad()
def image_features(model, dataset):
    from torch.utils.data import DataLoader

    feats, labels = [], []
    for image, _, _, mask, label in DataLoader(dataset, batch_size=64):
        has = mask[:, 0] > 0
        feats.append(model.image_encoder(image[has]).numpy())
        labels.append(label[has].numpy())
    return np.concatenate(feats), np.concatenate(labels)


def image_probe_auroc(model, train_set, test_set) -> float:
    """Linear probe on the (frozen) image encoder: fit on train rows with an image, score test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_tr, y_tr = image_features(model, train_set)
    x_te, y_te = image_features(model, test_set)
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x_tr), y_tr)
    return auroc(y_te, clf.predict_proba(scaler.transform(x_te))[:, 1])


def cohort(workdir: Path, variant: str, args):
    from clinfuse.data.synthetic import write_demo_cohort
    from clinfuse.training.commands import load_split_datasets

    out = workdir / f"{variant}-s{args.sites}-p{args.patients}"
    manifests = [out / f"site-{s}" / "manifest.csv" for s in range(args.sites)]
    if not all(m.exists() for m in manifests):
        manifests = write_demo_cohort(out, sites=args.sites, patients=args.patients, seed=0, variant=variant)
    datasets, _ = load_split_datasets(manifests, make_config(args, 0))
    for split in ("train", "test"):
        datasets[split].warm(progress=False)
    return datasets


def fmt(x: float) -> str:
    return f"{x:.3f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=1000, help="patients per site")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--seeds", type=int, default=3, help="training seeds; AUROCs are averaged")
    p.add_argument("--text-dropout", type=float, default=0.5, help="balancing: text modality dropout")
    p.add_argument("--aux-weight", type=float, default=0.5, help="balancing: fixed auxiliary weight")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="keep the synthetic cohorts here (reused)")
    p.add_argument("--clip-groups", action="store_true",
                   help="fused model: per-modality clipping groups (balance.clip_groups.enabled)")
    p.add_argument("--model-dim", type=int, default=None, help="override model.dim (default: demo.yaml)")
    p.add_argument("--text-embedding-dim", type=int, default=None,
                   help="override model.text_encoder.embedding_dim (the fixed random table's width)")
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="override model.image_encoder.channels (small_cnn)")
    p.add_argument("--fusion", choices=["concat", "gated", "attention", "lowrank"], default=None,
                   help="override model.fusion.name")
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--skip-fusion", action="store_true")
    p.add_argument("--views", nargs="+", default=None, metavar="NAME",
                   help="train only these of: image tabular text fused (checks then need all four)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="clinfuse-fusion-bench-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    failures = 0
    print(f"synthetic cohort: {args.sites} sites x {args.patients} patients, pooled; DP-SGD at epsilon "
          f"{args.epsilon:g}; {args.epochs} epochs, lr {args.lr:g}, batch {args.batch_size}; seeds {seeds}")
    model = make_config(args, 0).model
    print(f"model: dim {model.dim}, image {model.image_encoder.name} {model.image_encoder.channels}, text "
          f"{model.text_encoder.name} (trainable_embedding={model.text_encoder.trainable_embedding}, "
          f"embedding_dim {model.text_encoder.embedding_dim}), fusion {model.fusion.name}; clip groups "
          f"for the fused model: {args.clip_groups}")

    if not args.skip_fusion:
        data = cohort(workdir, "default", args)
        train, test = data["train"], data["test"]
        has_note = np.array([r.mask[1] for r in test.records], dtype=bool)
        rng = np.random.default_rng(12345)
        drop = has_note & (rng.random(len(test)) < 0.5)
        views = {"image only": ("image",), "text only": ("text",), "tabular only": ("tabular",),
                 "fused": MODALITIES}
        if args.views:
            views = {k: v for k, v in views.items() if k.split()[0] in args.views}
        no_dropout = {"modality_dropout": {"image": 0.0, "text": 0.0, "tabular": 0.0}}
        results = {name: [] for name in views}
        half_notes = {"fused": [], "image only": []}
        eps_spent = []
        for seed in seeds:
            for name, keep in views.items():
                # a single-modality model cannot drop its only modality
                fused_balance = {"clip_groups": {"enabled": True}} if args.clip_groups else None
                cfg = make_config(args, seed, fused_balance if name == "fused" else no_dropout)
                t0 = time.time()
                model, eps = train_dp(cfg, ModalityView(train, keep))
                eps_spent.append(eps)
                results[name].append(test_auroc(model, ModalityView(test, keep)))
                if name in half_notes:
                    half_notes[name].append(test_auroc(model, ModalityView(test, keep, drop_text=drop)))
                print(f"  seed {seed} {name:<13} test AUROC {results[name][-1]:.3f} "
                      f"(epsilon {eps:.2f}, {time.time() - t0:.0f} s)", flush=True)
        mean = {k: float(np.mean(v)) for k, v in results.items()}
        mean_half = {k: float(np.mean(v)) for k, v in half_notes.items() if v}
        print()
        print(f"Test AUROC, {len(test)} test rows ({int(has_note.sum())} with notes; "
              f"{int(drop.sum())} notes removed in the 50% condition); epsilon spent "
              f"{min(eps_spent):.2f}-{max(eps_spent):.2f}")
        print("| model | all notes | 50% notes removed |\n| --- | --- | --- |")
        for name in views:
            extra = fmt(mean_half[name]) if name in mean_half else ""
            print(f"| {name} | {fmt(mean[name])} | {extra} |")
        if len(views) < 4:
            print("(not all four models trained: checks skipped)")
            args.skip_ablation = True
            return 0
        best_name = max(("image only", "text only", "tabular only"), key=mean.get)
        ok1 = mean["fused"] >= mean[best_name] + 0.03
        ok2 = mean_half["fused"] >= mean_half["image only"]
        failures += (not ok1) + (not ok2)
        print(f"{verdict(ok1)}: fused {fmt(mean['fused'])} >= best single ({best_name} "
              f"{fmt(mean[best_name])}) + 0.03")
        print(f"{verdict(ok2)}: 50% notes removed: fused {fmt(mean_half['fused'])} >= image only "
              f"{fmt(mean_half['image only'])}")
        print()

    if not args.skip_ablation:
        data = cohort(workdir, "text_dominant", args)
        train, test = data["train"], data["test"]
        settings = {
            "without (no dropout, aux none)": {"modality_dropout": {"image": 0.0, "text": 0.0, "tabular": 0.0},
                                               "aux_weights": {"mode": "none"}},
            "aux weights only": {"modality_dropout": {"image": 0.0, "text": 0.0, "tabular": 0.0},
                                 "aux_weights": {"mode": "fixed", "weight": args.aux_weight}},
            "with balancing": {"modality_dropout": {"image": 0.0, "text": args.text_dropout, "tabular": 0.0},
                               "aux_weights": {"mode": "fixed", "weight": args.aux_weight}},
        }
        rows = {name: {"aux": [], "probe": [], "fused": [], "no_note": []} for name in settings}
        for seed in seeds:
            for name, balance in settings.items():
                t0 = time.time()
                model, eps = train_dp(make_config(args, seed, balance), train)
                rows[name]["aux"].append(image_aux_auroc(model, test))
                rows[name]["probe"].append(image_probe_auroc(model, train, test))
                rows[name]["fused"].append(test_auroc(model, test))
                rows[name]["no_note"].append(fused_auroc_without_note(model, test))
                print(f"  seed {seed} {name:<30} image aux {rows[name]['aux'][-1]:.3f} probe "
                      f"{rows[name]['probe'][-1]:.3f} fused {rows[name]['fused'][-1]:.3f} "
                      f"(no note {rows[name]['no_note'][-1]:.3f}) "
                      f"(epsilon {eps:.2f}, {time.time() - t0:.0f} s)", flush=True)
        m = {name: {k: float(np.mean(v)) for k, v in r.items()} for name, r in rows.items()}
        print()
        print(f"Balancing ablation, text_dominant cohort (text dropout {args.text_dropout:g}, "
              f"aux weight {args.aux_weight:g}); test AUROC")
        n_no_note = int(sum(1 for r in test.records if not r.mask[1]))
        print(f"({len(test)} test rows, {n_no_note} without a note)")
        print("| setting | image aux head | image-encoder linear probe | fused | fused, no note |\n"
              "| --- | --- | --- | --- | --- |")
        for name in settings:
            print(f"| {name} | {fmt(m[name]['aux'])} | {fmt(m[name]['probe'])} | {fmt(m[name]['fused'])} "
                  f"| {fmt(m[name]['no_note'])} |")
        w, wo = m["with balancing"], m["without (no dropout, aux none)"]
        ok3 = w["aux"] >= wo["aux"] + 0.03
        ok4 = w["probe"] >= wo["probe"] + 0.03
        failures += not ok3
        print(f"{verdict(ok3)}: image aux-head AUROC with balancing {fmt(w['aux'])} >= without "
              f"{fmt(wo['aux'])} + 0.03 (without an aux loss that head learns only through the main loss)")
        print(f"{verdict(ok4)} (informative): image-encoder probe AUROC with balancing {fmt(w['probe'])} "
              f">= without {fmt(wo['probe'])} + 0.03")
        a = m["aux weights only"]
        print(f"  (aux weights only: image aux {fmt(a['aux'])}, probe {fmt(a['probe'])}: the gain of text "
              f"dropout on top of aux weights is {w['aux'] - a['aux']:+.3f} aux / {w['probe'] - a['probe']:+.3f} probe)")

    print(f"\ntotal {time.time() - started:.0f} s, {args.threads} threads")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
