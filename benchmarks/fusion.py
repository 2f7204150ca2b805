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

``--variant rich`` runs instead the five-modality study of ``configs/rich.yaml`` on the rich cohort
(chest film, CT series, note, tabular, ECG; site 1 has no volumes, site 2 no ECG and no notes):
the test AUROC of each modality alone and of the fused model (check: fused >= best single), and
a volume-vs-middle-slice comparison on the patients with a CT: a model of the whole series (the
3-D encoder) against a 2-D model of its middle slice alone (what clinfuse did with a series
before volumes were a kind) — the cohort's signal lies off the middle slice, so the check is
volume >= middle slice + 0.05.

    python benchmarks/fusion.py [--patients 1000] [--epochs 20] [--seeds 3] [--workdir DIR]
    python benchmarks/fusion.py --variant rich [--patients 400] [--epochs 10] [--seeds 2]
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

from clinfuse.config import config_from_dict, load_config
from clinfuse.data.dataset import MultimodalDataset, without_modalities

REPO = Path(__file__).resolve().parents[1]


class ModalityView(MultimodalDataset):
    """A dataset whose items keep only some modalities (the others removed: absent input, mask 0).

    ``keep``: modality names to keep (default: all); ``drop_text``: optional boolean array, ``True``
    patients lose their note (as in the "50% of notes removed" test). Shares the base dataset's
    decoded inputs.
    """

    def __init__(self, base: MultimodalDataset, keep=None, drop_text: np.ndarray | None = None):
        self.__dict__.update(base.__dict__)
        names = self.cfg.modality_names
        self.keep = np.array([keep is None or m in keep for m in names], dtype=np.float32)
        self.text_index = names.index("text") if "text" in names else None
        self.drop_text = drop_text

    def __getitem__(self, index: int):
        keep = self.keep.copy()
        if self.drop_text is not None and self.drop_text[index]:
            keep[self.text_index] = 0.0
        return without_modalities(super().__getitem__(index), keep, self.cfg)


def make_config(args, seed: int, balance: dict | None = None):
    """demo.yaml (or, ``--variant rich``, rich.yaml) with the benchmark's training settings."""
    rich = getattr(args, "variant", "default") == "rich"
    raw = load_config(REPO / "configs" / ("rich.yaml" if rich else "demo.yaml")).model_dump(mode="json")
    raw["train"].update(epochs=args.epochs, lr=args.lr, seed=seed, batch_size=args.batch_size)
    raw["privacy"].update(enabled=True, target_epsilon=args.epsilon)
    if args.model_dim:
        raw["model"]["dim"] = args.model_dim
    if args.fusion:
        raw["model"]["fusion"]["name"] = args.fusion
    if not rich:  # encoder overrides of the three-slot demo config
        if args.text_embedding_dim:
            raw["model"]["text_encoder"]["embedding_dim"] = args.text_embedding_dim
        if args.channels:
            raw["model"]["image_encoder"]["channels"] = args.channels
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
    n_patients = len(train_set)  # one item per patient
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
    lacks = out["masks"][:, dataset.cfg.modality_names.index("text")] == 0
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
    for batch in DataLoader(dataset, batch_size=64, collate_fn=dataset.collate):
        has = batch["mask"][:, 0] > 0
        feats.append(model.encoders["image"](batch["image"][has]).numpy())
        labels.append(batch["label"][has].numpy())
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


def study_config(args, seed: int, modalities: list[dict], epochs: int | None = None):
    """The rich config reduced to ``modalities`` (no modality dropout: single-modality studies)."""
    raw = make_config(args, seed).model_dump(mode="json")
    raw["modalities"] = modalities
    raw["train"]["epochs"] = epochs or args.epochs
    raw["balance"]["modality_dropout"] = {}
    return config_from_dict(raw, source="benchmarks/fusion.py (rich, one study)")


def middle_slice_manifests(manifests: list[Path]) -> list[Path]:
    """Per site, the rows with a CT series, plus a column ``ct_mid``: the series' middle slice file
    (the slice a 2-D pipeline keeps of a series). Written beside each manifest."""
    import pandas as pd

    out = []
    for manifest in manifests:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        frame = frame[frame["ct"] != ""].copy()
        if frame.empty:
            continue
        mids = []
        for rel in frame["ct"]:
            files = sorted((manifest.parent / rel).glob("*.dcm"))
            mids.append(str(Path(rel) / files[len(files) // 2].name))
        frame["ct_mid"] = mids
        path = manifest.with_name("manifest-ct.csv")
        frame.to_csv(path, index=False)
        out.append(path)
    return out


def rich_benchmark(args, workdir: Path, seeds: list[int]) -> int:
    """Per-modality vs fused AUROC on the five-modality study; volume vs its middle slice."""

    failures = 0
    cfg0 = make_config(args, 0)
    names = cfg0.modality_names
    print("study: " + ", ".join(f"{m.name} ({m.kind}, {getattr(m.encoder, 'name', 'mlp')})" for m in cfg0.modalities)
          + f"; dim {cfg0.model.dim}, fusion {cfg0.model.fusion.name}")
    if args.skip_modalities:
        return failures + volume_vs_middle_slice(args, workdir, seeds, cfg0)
    data = cohort(workdir, "rich", args)
    train, test = data["train"], data["test"]
    views = {f"{m} only": (m,) for m in names} | {"fused": None}
    results = {k: [] for k in views}
    for seed in seeds:
        for view, keep in views.items():
            cfg = make_config(args, seed, {"modality_dropout": {}} if keep else None)
            t0 = time.time()
            model, eps = train_dp(cfg, ModalityView(train, keep))
            results[view].append(test_auroc(model, ModalityView(test, keep)))
            print(f"  seed {seed} {view:<11} test AUROC {results[view][-1]:.3f} (epsilon {eps:.2f}, "
                  f"{time.time() - t0:.0f} s)", flush=True)
    mean = {k: float(np.mean(v)) for k, v in results.items()}
    have = {m: int(sum(p.mask[i] for p in test.samples)) for i, m in enumerate(names)}
    print(f"\nTest AUROC, {len(test)} test patients (with " + ", ".join(f"{m} {n}" for m, n in have.items())
          + "); a single-modality model predicts the prior for a patient without its modality")
    print("| model | test AUROC |\n| --- | --- |")
    for view in views:
        print(f"| {view} | {fmt(mean[view])} |")
    best = max((v for v in views if v != "fused"), key=mean.get)
    ok = mean["fused"] >= mean[best]
    failures += not ok
    print(f"{verdict(ok)}: fused {fmt(mean['fused'])} >= best single ({best} {fmt(mean[best])})\n")
    return failures + volume_vs_middle_slice(args, workdir, seeds, cfg0)


def volume_vs_middle_slice(args, workdir: Path, seeds: list[int], cfg0) -> int:
    """A CT-only study of the whole series vs a 2-D study of its middle slice, same patients."""
    from clinfuse.data.synthetic import write_demo_cohort
    from clinfuse.training.commands import load_split_datasets

    epochs = args.volume_epochs or args.epochs
    out = workdir / f"rich-s{args.sites}-p{args.patients}"
    manifests = [out / f"site-{s}" / "manifest.csv" for s in range(args.sites)]
    if not all(m.exists() for m in manifests):
        manifests = write_demo_cohort(out, sites=args.sites, patients=args.patients, seed=0, variant="rich")
    ct_manifests = middle_slice_manifests(manifests)
    ct_spec = cfg0.modality("ct").model_dump(mode="json")
    mid_spec = {"name": "ct_mid", "kind": "image", "size": list(ct_spec["size"][1:]), "apply_voi_lut": False,
                "encoder": {"name": "small_cnn", "channels": [16, 32, 64]}}
    scores = {"volume (3-D encoder)": [], "middle slice (2-D encoder)": []}
    for seed in seeds:
        for name, spec in (("volume (3-D encoder)", ct_spec), ("middle slice (2-D encoder)", mid_spec)):
            cfg = study_config(args, seed, [spec], epochs)
            split, _ = load_split_datasets(ct_manifests, cfg)
            split["train"].warm(progress=False)
            t0 = time.time()
            model, eps = train_dp(cfg, split["train"])
            scores[name].append(test_auroc(model, split["test"]))
            print(f"  seed {seed} {name:<27} test AUROC {scores[name][-1]:.3f} (epsilon {eps:.2f}, "
                  f"{time.time() - t0:.0f} s)", flush=True)
    m = {k: float(np.mean(v)) for k, v in scores.items()}
    print(f"\nVolume vs middle slice ({len(split['test'])} test patients with a CT, {epochs} epochs; the "
          "nodules lie in slices 4-7 of 16, the middle slice is 8)")
    print("| model | test AUROC |\n| --- | --- |")
    for name in scores:
        print(f"| {name} | {fmt(m[name])} |")
    vol, mid = m["volume (3-D encoder)"], m["middle slice (2-D encoder)"]
    ok = vol >= mid + 0.05
    print(f"{verdict(ok)}: volume {fmt(vol)} >= middle slice {fmt(mid)} + 0.05")
    return int(not ok)


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
    p.add_argument("--variant", choices=["default", "rich"], default="default",
                   help="rich: the five-modality study (per-modality vs fused; volume vs middle slice)")
    p.add_argument("--skip-modalities", action="store_true", help="rich: only the volume vs middle slice part")
    p.add_argument("--volume-epochs", type=int, default=None,
                   help="rich: epochs of the volume vs middle slice studies (default --epochs)")
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
    if args.variant == "rich":
        failures += rich_benchmark(args, workdir, seeds)
        args.skip_fusion = args.skip_ablation = True
    else:
        cfg0 = make_config(args, 0)
        image, text = cfg0.modality("image").encoder, cfg0.modality("text").encoder
        print(f"model: dim {cfg0.model.dim}, image {image.name} {image.channels}, text {text.name} "
              f"(trainable_embedding={text.trainable_embedding}, embedding_dim {text.embedding_dim}), fusion "
              f"{cfg0.model.fusion.name}; clip groups for the fused model: {args.clip_groups}")

    if not args.skip_fusion:
        data = cohort(workdir, "default", args)
        train, test = data["train"], data["test"]
        has_note = np.array([p.mask[1] for p in test.samples], dtype=bool)
        rng = np.random.default_rng(12345)
        drop = has_note & (rng.random(len(test)) < 0.5)
        views = {"image only": ("image",), "text only": ("text",), "tabular only": ("tabular",),
                 "fused": None}
        if args.views:
            views = {k: v for k, v in views.items() if k.split()[0] in args.views}
        no_dropout = {"modality_dropout": {}}
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
        print(f"Test AUROC, {len(test)} test patients ({int(has_note.sum())} with notes; "
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
            "without (no dropout, aux none)": {"modality_dropout": {},
                                               "aux_weights": {"mode": "none"}},
            "aux weights only": {"modality_dropout": {},
                                 "aux_weights": {"mode": "fixed", "weight": args.aux_weight}},
            "with balancing": {"modality_dropout": {"text": args.text_dropout},
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
        n_no_note = int(sum(1 for p in test.samples if not p.mask[1]))
        print(f"({len(test)} test patients, {n_no_note} without a note)")
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
