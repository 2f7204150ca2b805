"""``clinfuse evaluate``: score checkpoints on site manifests and write the evaluation report.

The statistics live in :mod:`~clinfuse.evaluation.metrics`, :mod:`~clinfuse.evaluation.bootstrap`
and :mod:`~clinfuse.evaluation.robustness`, which work on plain arrays; this module turns
checkpoints and manifests into those arrays (through the data and training packages) and hands
the result to :mod:`~clinfuse.evaluation.report`.

Which configuration does what: each checkpoint's own configuration decides how the manifests
are read and preprocessed (the model only understands inputs prepared the way it was trained);
``--config``, when given, supplies only the ``evaluation`` settings (threshold rule, bootstrap
resamples and seed, ECE bins) and ``train.num_threads``; otherwise they come from the first
checkpoint.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from clinfuse.cli import add_data_root_option, positive_int
from clinfuse.config import MODALITIES
from clinfuse.errors import InputError

SPLITS = ("train", "val", "test")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate checkpoints on held-out patients: metrics with intervals, report",
        description=(
            "Score one or more checkpoints on the rows of the given site manifests with the chosen "
            "split (default test), with the operating threshold chosen on the 'val' rows. Writes "
            "report.html (plots embedded), metrics.json (each metric with its patient-level "
            "bootstrap 95% interval, per site and per modality pattern, robustness sweep, paired "
            "differences between checkpoints) and predictions.csv to --out."),
    )
    p.add_argument("--checkpoint", action="extend", nargs="+", required=True, metavar="C",
                   help="checkpoint file; repeat (or list several) to compare, the first is the reference")
    p.add_argument("--manifest", action="extend", nargs="+", required=True, metavar="M",
                   help="site manifest(s) (CSV or Parquet)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--config", metavar="CFG", default=None,
                   help="YAML config whose 'evaluation' section is used (default: the first checkpoint's)")
    p.add_argument("--split", choices=SPLITS, default="test", help="rows to evaluate (default: test)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="device for inference (default: the checkpoint config's train.device)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="inference batch size (default 64)")
    p.add_argument("--no-robustness", action="store_true", help="skip the missing-modality sweep")
    add_data_root_option(p)
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    paths = evaluate_checkpoints(args.checkpoint, args.manifest, args.out, config=args.config,
                                 split=args.split, device=args.device, batch_size=args.batch_size,
                                 robustness=not args.no_robustness, data_roots=args.data_roots)
    for kind in ("report", "metrics", "predictions"):
        print(f"{kind}: {paths[kind]}")
    return 0


class _RowView:
    """Map-style dataset over chosen items of several datasets, optionally with modalities removed.

    ``items`` lists ``(dataset, index)`` pairs. With ``masks [len(items), 3]``, a modality whose
    mask entry is 0 gets its mask entry zeroed and its input replaced by ``absent[m]``, the exact
    input the dataset gives a record that lacks the modality, so a removed modality looks like a
    naturally missing one. Module-level so DataLoader workers could pickle it.
    """

    def __init__(self, items, masks=None, absent=None):
        self.items = items
        self.masks = masks
        self.absent = absent

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ds, j = self.items[i]
        image, text, tabular, mask, label = ds[j]
        if self.masks is None:
            return image, text, tabular, mask, label
        keep = np.asarray(self.masks[i], dtype=np.float32)
        inputs = [image, text, tabular]
        for m in range(len(MODALITIES)):
            if keep[m] < 0.5:
                inputs[m] = self.absent[m].to(inputs[m].dtype)
        return (*inputs, mask.new_tensor(keep), label)


def _absent_inputs(cfg):
    """The inputs a record without each modality gets from the dataset (image, text, tabular)."""
    import torch

    from clinfuse.data.tabular import encode_tabular
    from clinfuse.data.text import tokenize

    return (torch.zeros((1, *cfg.data.image.size), dtype=torch.float32),
            torch.from_numpy(tokenize(None, cfg.data.text)),
            torch.from_numpy(encode_tabular({}, cfg.data.tabular)))


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _checkpoint_names(paths: list[Path]) -> list[str]:
    names = [p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return names


def _plain_meta(meta: dict) -> dict:
    # Only small JSON scalars go into the report (top level and privacy.*): meta also holds
    # the whole config, versions and training metrics, which metrics.json need not repeat.
    out = {}
    for k, v in (meta or {}).items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[str(k)] = v
        elif k == "privacy" and isinstance(v, dict):
            out.update({f"privacy.{kk}": vv for kk, vv in v.items()
                        if isinstance(vv, (str, int, float, bool)) or vv is None})
    return out


def evaluate_checkpoints(checkpoints, manifests, out_dir, *, config=None, split: str = "test",
                         device: str | None = None, batch_size: int = 64, robustness: bool = True,
                         progress: bool = True, data_roots=()) -> dict[str, Path]:
    """Evaluate checkpoints on manifests and write the report files in ``out_dir``.

    ``checkpoints``/``manifests``: paths; ``config``: path of a YAML config for the evaluation
    settings (or ``None``); ``data_roots``: folders manifest paths may point into (see
    :mod:`clinfuse.data.paths`). Returns ``{"report", "metrics", "predictions"}`` paths.
    """
    from clinfuse import __version__
    from clinfuse.config import load_config
    from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
    from clinfuse.data.manifest import pattern_name, read_manifest
    from clinfuse.evaluation.bootstrap import evaluate_runs
    from clinfuse.evaluation.report import write_report
    from clinfuse.evaluation.robustness import robustness_sweep
    from clinfuse.training.checkpoint import load_checkpoint
    from clinfuse.training.trainer import predict_proba

    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    ckpt_paths = [Path(c) for c in checkpoints]
    manifest_paths = [Path(m) for m in manifests]
    if not ckpt_paths:
        raise InputError("give at least one --checkpoint")
    if not manifest_paths:
        raise InputError("give at least one --manifest")
    for p in [*ckpt_paths, *manifest_paths]:
        if not p.is_file():
            raise InputError("file not found", file=p)

    loaded = []
    for p in ckpt_paths:
        model, cfg, meta = load_checkpoint(p)
        loaded.append((model, cfg, dict(meta or {})))
    label_names = list(loaded[0][2].get("label_names") or loaded[0][1].data.labels)
    for p, (_, cfg, meta) in zip(ckpt_paths, loaded):
        own_labels = list(meta.get("label_names") or cfg.data.labels)
        if own_labels != label_names:
            raise InputError(f"checkpoint classes {own_labels} differ from the first checkpoint's {label_names}; "
                             "only checkpoints of the same task can be compared", file=p)
    eval_cfg = load_config(config) if config else loaded[0][1]
    ev = eval_cfg.evaluation
    if eval_cfg.train.num_threads:  # as `clinfuse train` does: inference threads from the config
        import torch

        torch.set_num_threads(eval_cfg.train.num_threads)
    names = _checkpoint_names(ckpt_paths)
    notes: list[str] = []

    # Read each manifest once per distinct data configuration; rows are identified by
    # (manifest, row) so predictions of different checkpoints line up.
    per_data: dict[str, list] = {}
    row_info: list[dict] | None = None
    runs_eval, runs_val, robustness_out, all_probs = {}, {}, {}, {}
    masks = None
    for name, p, (model, cfg, meta) in zip(names, ckpt_paths, loaded):
        key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
        if key not in per_data:
            items = []
            for mi, mp in enumerate(manifest_paths):
                sd = read_manifest(mp, cfg, data_roots=data_roots)
                cache_dir = default_cache_dir(mp, cfg)
                for s in ("val", split) if split != "val" else ("val",):
                    recs = [r for r in sd.records if r.split == s]
                    if not recs:
                        continue
                    ds = MultimodalDataset(recs, cfg, cache_dir=cache_dir)
                    for j, r in enumerate(recs):
                        items.append({"manifest": str(mp), "manifest_index": mi, "row": r.row,
                                      "patient_id": str(r.patient_id),
                                      "site": str(getattr(r, "site", None) or sd.site or mp.stem),
                                      "split": s, "label": int(r.label), "mask": r.mask,
                                      "pattern": pattern_name(r.mask), "dataset": ds, "index": j})
            per_data[key] = items
        items = per_data[key]
        if row_info is None:
            row_info = items
            if not any(it["split"] == split for it in items):
                raise InputError(f"no rows with split '{split}' in the manifests "
                                 f"({', '.join(str(m) for m in manifest_paths)})")
            masks = np.array([it["mask"] for it in items], dtype=np.float32).reshape(-1, len(MODALITIES))
        else:
            ref = [(it["manifest_index"], it["row"]) for it in row_info]
            if [(it["manifest_index"], it["row"]) for it in items] != ref:
                raise InputError(f"checkpoint '{name}' reads the manifests into different rows than "
                                 f"'{names[0]}' (its data configuration differs); evaluate them "
                                 "separately", file=p)

        dev = _resolve_device(device or cfg.train.device)
        model.to(dev)  # load_checkpoint gives a CPU model; predict_proba moves only the batches
        view = _RowView([(it["dataset"], it["index"]) for it in items])
        probs = np.asarray(predict_proba(model, view, batch_size=batch_size, device=dev), dtype=np.float64)
        if probs.shape != (len(items), len(label_names)):
            raise InputError(f"checkpoint '{name}' returned probabilities of shape {probs.shape} "
                             f"for {len(items)} rows and {len(label_names)} classes", file=p)
        is_eval = np.array([it["split"] == split for it in items])
        is_val = np.array([it["split"] == "val" for it in items])
        runs_eval[name] = probs[is_eval]
        runs_val[name] = probs[is_val]
        all_probs[name] = probs

    eval_items = [it for it in row_info if it["split"] == split]
    val_items = [it for it in row_info if it["split"] == "val"]
    eval_labels = np.array([it["label"] for it in eval_items], dtype=np.int64)
    val_labels = np.array([it["label"] for it in val_items], dtype=np.int64)
    # Patient ids are only unique within a site.
    groups = np.array([f"{it['site']}\x1f{it['patient_id']}" for it in eval_items], dtype=object)
    is_eval = np.array([it["split"] == split for it in row_info])
    eval_masks = masks[is_eval]
    if not val_items:
        notes.append("the manifests have no 'val' rows: thresholds are fixed at 0.5, not chosen on "
                     "validation data")
        print("clinfuse evaluate: warning: no 'val' rows; thresholds fixed at 0.5", file=sys.stderr)
    elif split == "val":
        notes.append("the evaluated split is 'val', on which the thresholds were also chosen: "
                     "threshold metrics are optimistic")

    result_core = evaluate_runs(
        runs_eval, eval_labels, groups, label_names=label_names,
        sites=[it["site"] for it in eval_items], patterns=[it["pattern"] for it in eval_items],
        val_runs=runs_val if val_items else None, val_labels=val_labels if val_items else None,
        method=ev.threshold, target_sensitivity=ev.target_sensitivity, n_resamples=ev.bootstrap,
        seed=ev.seed, ece_bins=ev.ece_bins, progress=progress)

    if robustness:
        eval_pairs = [(it["dataset"], it["index"]) for it in eval_items]
        for name, (model, cfg, _meta) in zip(names, loaded):
            dev = _resolve_device(device or cfg.train.device)
            if len(per_data) > 1:
                key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
                own = per_data[key]
                eval_pairs = [(it["dataset"], it["index"]) for it in own if it["split"] == split]

            absent = _absent_inputs(cfg)

            def predict(rows, mask_rows, _model=model, _dev=dev, _pairs=eval_pairs, _absent=absent):
                view = _RowView([_pairs[r] for r in rows], masks=mask_rows, absent=_absent)
                return predict_proba(_model, view, batch_size=batch_size, device=_dev)

            thresholds = np.array(list(result_core["runs"][name]["thresholds"].values()))
            robustness_out[name] = robustness_sweep(
                predict, eval_masks, eval_labels, groups, thresholds, label_names=label_names,
                seed=ev.seed, n_resamples=ev.bootstrap, ece_bins=ev.ece_bins,
                baseline_probs=runs_eval[name], progress=progress)

    result = {
        "schema": "clinfuse-evaluation/1",
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "clinfuse_version": __version__,
        "config_digest": eval_cfg.digest(),
        "split": split,
        "labels": label_names,
        "positive_label": label_names[1] if len(label_names) == 2 else None,
        "threshold_method": ev.threshold,
        "target_sensitivity": ev.target_sensitivity,
        "ece_bins": ev.ece_bins,
        "bootstrap": {"resamples": ev.bootstrap, "seed": ev.seed, "level": 0.95, "unit": "patient",
                      "interval": "percentile"},
        "manifests": [str(m) for m in manifest_paths],
        "checkpoints": {n: {"path": str(p), "config_digest": cfg.digest(), "meta": _plain_meta(meta)}
                        for n, p, (_, cfg, meta) in zip(names, ckpt_paths, loaded)},
        "notes": notes + result_core["notes"],
        "runs": result_core["runs"],
        "comparisons": result_core["comparisons"],
        "robustness": robustness_out,
        "metric_definitions": {
            "binary": f"positive class is '{label_names[1]}'" if len(label_names) == 2 else None,
            "multiclass": "one-vs-rest per class, macro average over classes where defined",
            "threshold": "row predicted positive when its probability >= threshold",
            "ece": f"{ev.ece_bins} equal-width bins, weighted by rows per bin",
        },
    }
    frame = _predictions_frame(row_info, all_probs, label_names, result_core)
    return write_report(out_dir, result, frame)


def _predictions_frame(rows: list[dict], all_probs: dict, label_names: list[str], core: dict):
    import pandas as pd

    records = []
    for name, probs in all_probs.items():
        thresholds = core["runs"][name]["thresholds"]
        for it, pr in zip(rows, probs):
            if len(label_names) == 2:
                predicted = label_names[1] if pr[1] >= thresholds[label_names[1]] else label_names[0]
            else:
                predicted = label_names[int(np.argmax(pr))]
            rec = {"checkpoint": name, "manifest": it["manifest"], "row": it["row"],
                   "patient_id": it["patient_id"], "site": it["site"], "split": it["split"],
                   "pattern": it["pattern"], "label": label_names[it["label"]]}
            rec.update({f"prob_{c}": float(v) for c, v in zip(label_names, pr)})
            rec["predicted"] = predicted
            records.append(rec)
    return pd.DataFrame.from_records(records)
