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
CALIBRATION_MODES = ("auto", "fit", "none")


def register(subparsers) -> None:
    from clinfuse.evaluation.prediction import run_predict

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate checkpoints on held-out patients: metrics with intervals, report",
        description=(
            "Score one or more checkpoints on the rows of the given site manifests with the chosen "
            "split (default test), with the operating threshold chosen on the 'val' rows. Writes "
            "report.html (plots embedded), metrics.json (each metric with its patient-level "
            "bootstrap 95% interval, per site and per modality pattern, robustness sweep, paired "
            "differences between checkpoints) and predictions.csv to --out. Probabilities are calibrated "
            "by temperature scaling fitted on the 'val' rows (ECE and Brier shown before and after); the "
            "calibrated checkpoint, with its temperature and threshold, goes to OUT/calibrated/ for "
            "`clinfuse predict`. Never fitted on the evaluated split."),
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
    p.add_argument("--calibration", choices=CALIBRATION_MODES, default="auto",
                   help="auto (default): a checkpoint's own calibration if it has one, else fit a temperature "
                        "on the 'val' rows and write OUT/calibrated/<name>.pt for `clinfuse predict`; fit: "
                        "always refit on 'val'; none: raw probabilities")
    add_data_root_option(p)
    p.set_defaults(handler=_handle)

    p = subparsers.add_parser(
        "predict",
        help="predict for new patients with a (calibrated) checkpoint: no labels needed",
        description=(
            "Score every usable row of the manifests (the label column is optional) and write one row "
            "per patient: the probability of each class (a patient's rows averaged), the predicted class "
            "at the checkpoint's threshold, the modalities present and used, and the checkpoint's model "
            "and config hash. The temperature and threshold are the checkpoint's calibration (written by "
            "`clinfuse evaluate`); an uncalibrated checkpoint predicts at 0.5, with a warning. A checkpoint "
            "whose preprocessing or modalities do not match the manifests' study is refused (exit 2)."),
    )
    p.add_argument("--checkpoint", required=True, metavar="C",
                   help="checkpoint file (a calibrated one from `clinfuse evaluate`'s OUT/calibrated/)")
    p.add_argument("--manifest", action="extend", nargs="+", required=True, metavar="M",
                   help="manifest(s) of the patients to predict (CSV or Parquet)")
    p.add_argument("--out", type=Path, default=None, metavar="CSV", help="predictions file to write (CSV)")
    p.add_argument("--config", metavar="CFG", default=None,
                   help="the manifests' study config, checked against the checkpoint (default: the "
                        "checkpoint's own config)")
    p.add_argument("--json", action="store_true", help="print the predictions and their provenance as JSON")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="device for inference (default: the checkpoint config's train.device)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="inference batch size (default 64)")
    add_data_root_option(p)
    p.set_defaults(handler=run_predict)


def _handle(args) -> int:
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    paths = evaluate_checkpoints(args.checkpoint, args.manifest, args.out, config=args.config,
                                 split=args.split, device=args.device, batch_size=args.batch_size,
                                 robustness=not args.no_robustness, calibration=args.calibration,
                                 data_roots=args.data_roots)
    print(headline(json.loads(Path(paths["metrics"]).read_text(encoding="utf-8"))))
    for kind in ("report", "metrics", "predictions"):
        print(f"{kind}: {paths[kind]}")
    for name, path in paths["calibrated"].items():
        print(f"calibrated checkpoint ({name}): {path}")
    return 0


def headline(result: dict) -> str:
    """The lines ``clinfuse evaluate`` ends with: per checkpoint, the headline metrics with intervals."""
    from clinfuse.evaluation.report import fmt_interval

    lines = []
    for name, run in result["runs"].items():
        overall = run["overall"]
        metrics = overall["metrics"]
        lines.append(f"{name} on {result['split']} ({overall['n_patients']} patients, {overall['n_rows']} rows):")
        lines.append("  " + "  ".join(f"{label} {fmt_interval(metrics[m])}" for m, label in (
            ("auroc", "AUROC"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"))))
        cal = run.get("calibration") or {}
        if cal.get("before"):
            lines.append(f"  ECE {fmt_interval(cal['before']['ece'])} -> {fmt_interval(cal['after']['ece'])}, "
                         f"Brier {fmt_interval(cal['before']['brier'])} -> {fmt_interval(cal['after']['brier'])} "
                         f"after calibration (temperature {cal['temperature']:.3g})")
        else:
            lines.append(f"  ECE {fmt_interval(metrics['ece'])}  Brier {fmt_interval(metrics['brier'])} (not calibrated)")
    return "\n".join(lines)


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
                         calibration: str = "auto", progress: bool = True, data_roots=()) -> dict[str, Path]:
    """Evaluate checkpoints on manifests and write the report files in ``out_dir``.

    ``checkpoints``/``manifests``: paths; ``config``: path of a YAML config for the evaluation
    settings (or ``None``); ``data_roots``: folders manifest paths may point into (see
    :mod:`clinfuse.data.paths`). ``calibration``: ``"auto"`` (a checkpoint's own calibration block
    if it has one, else a temperature fitted on the 'val' rows), ``"fit"`` (always fit on 'val') or
    ``"none"`` (raw probabilities). Returns ``{"report", "metrics", "predictions"}`` paths, plus
    ``"calibrated": {name: path}`` for each calibrated checkpoint written to ``out_dir/calibrated``.
    """
    from clinfuse import __version__
    from clinfuse.config import load_config
    from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
    from clinfuse.data.manifest import pattern_name, read_manifest
    from clinfuse.environment import resolve_device
    from clinfuse.evaluation.bootstrap import evaluate_runs
    from clinfuse.evaluation.calibration import apply_temperature
    from clinfuse.evaluation.report import write_report
    from clinfuse.evaluation.robustness import robustness_sweep
    from clinfuse.progress import stage
    from clinfuse.training.checkpoint import checkpoint_calibration, load_checkpoint
    from clinfuse.training.trainer import predict_outputs, predict_proba

    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    if calibration not in CALIBRATION_MODES:
        raise InputError(f"unknown calibration mode {calibration!r} (one of {', '.join(CALIBRATION_MODES)})")
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
        checkpoint_calibration(meta, path=p)  # a damaged calibration block is refused here, not used
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
    runs_eval, runs_val, raw_eval, robustness_out, all_probs = {}, {}, {}, {}, {}
    calibrations: dict[str, dict] = {}
    modality_names: list[str] = []
    masks = None
    for index, (name, p, (model, cfg, meta)) in enumerate(zip(names, ckpt_paths, loaded)):
        key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
        if key not in per_data:
            stage(f"clinfuse evaluate: reading {len(manifest_paths)} manifest(s)", enabled=progress)
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
        else:
            ref = [(it["manifest_index"], it["row"]) for it in row_info]
            if [(it["manifest_index"], it["row"]) for it in items] != ref:
                raise InputError(f"checkpoint '{name}' reads the manifests into different rows than "
                                 f"'{names[0]}' (its data configuration differs); evaluate them "
                                 "separately", file=p)

        dev = resolve_device(device or cfg.train.device, key="--device" if device else "train.device")
        model.to(dev)  # load_checkpoint gives a CPU model; predict_outputs moves only the batches
        stage(f"clinfuse evaluate: scoring checkpoint {index + 1}/{len(names)} '{name}' on {len(items)} rows",
              enabled=progress)
        view = _RowView([(it["dataset"], it["index"]) for it in items])
        outputs = predict_outputs(model, view, batch_size=batch_size, device=dev)
        probs = np.asarray(outputs["probs"], dtype=np.float64)
        if probs.shape != (len(items), len(label_names)):
            raise InputError(f"checkpoint '{name}' returned probabilities of shape {probs.shape} "
                             f"for {len(items)} rows and {len(label_names)} classes", file=p)
        if masks is None:
            # The modalities and their order are the model's own (its auxiliary heads).
            modality_names = list(outputs["aux"])
            masks = np.asarray(outputs["masks"], dtype=np.float32).reshape(len(items), len(modality_names))
        is_eval = np.array([it["split"] == split for it in items])
        is_val = np.array([it["split"] == "val" for it in items])
        val_labels_here = np.array([it["label"] for it in items], dtype=np.int64)[is_val]
        calibrations[name] = _calibration_for(calibration, meta, probs[is_val], val_labels_here,
                                              [it for it, v in zip(items, is_val) if v], label_names, p)
        calibrated = apply_temperature(probs, calibrations[name].get("temperature"))
        if calibrations[name]["source"] != "none":
            stage(f"clinfuse evaluate: '{name}': {calibrations[name]['summary']}", enabled=progress)
        raw_eval[name] = probs[is_eval]
        runs_eval[name] = calibrated[is_eval]
        runs_val[name] = calibrated[is_val]
        all_probs[name] = calibrated

    eval_items = [it for it in row_info if it["split"] == split]
    val_items = [it for it in row_info if it["split"] == "val"]
    eval_labels = np.array([it["label"] for it in eval_items], dtype=np.int64)
    val_labels = np.array([it["label"] for it in val_items], dtype=np.int64)
    # Patient ids are only unique within a site.
    groups = np.array([f"{it['site']}\x1f{it['patient_id']}" for it in eval_items], dtype=object)
    is_eval = np.array([it["split"] == split for it in row_info])
    eval_masks = masks[is_eval]
    fixed = {n: c["thresholds_array"] for n, c in calibrations.items() if c["source"] == "checkpoint"}
    if not val_items:
        notes.append("the manifests have no 'val' rows: thresholds are fixed at 0.5 (or the checkpoint's "
                     "own), not chosen on validation data, and no calibration was fitted")
        print("clinfuse evaluate: warning: no 'val' rows; no calibration fitted, thresholds fixed at 0.5 "
              "unless the checkpoint carries its own", file=sys.stderr)
    elif split == "val":
        notes.append("the evaluated split is 'val', on which the thresholds and the calibration were also "
                     "fitted: threshold and calibration metrics are optimistic")

    stage(f"clinfuse evaluate: bootstrap, {ev.bootstrap} resamples of {len(set(groups.tolist()))} patients",
          enabled=progress)
    result_core = evaluate_runs(
        runs_eval, eval_labels, groups, label_names=label_names,
        sites=[it["site"] for it in eval_items], patterns=[it["pattern"] for it in eval_items],
        val_runs=runs_val if val_items else None, val_labels=val_labels if val_items else None,
        method=ev.threshold, target_sensitivity=ev.target_sensitivity, n_resamples=ev.bootstrap,
        seed=ev.seed, ece_bins=ev.ece_bins, fixed_thresholds=fixed, progress=progress)

    calibrated_paths: dict[str, Path] = {}
    for name, p, (_model, _cfg, meta) in zip(names, ckpt_paths, loaded):
        run = result_core["runs"][name]
        run["calibration"] = _calibration_report(calibrations[name], raw_eval[name], runs_eval[name],
                                                 eval_labels, groups, run["thresholds"], label_names, ev)
        if calibrations[name]["source"] == "fitted":
            block = _calibration_block(calibrations[name], run["thresholds"], ev, p, meta, __version__)
            calibrated_paths[name] = _write_calibrated(p, Path(out_dir), name, block)
            run["calibration"]["checkpoint"] = str(calibrated_paths[name])

    # The sweep removes only modalities the evaluated rows have: removing one the study lacks
    # changes nothing and would only add rows that look like robustness.
    study_modalities = [m for j, m in enumerate(modality_names) if eval_masks[:, j].any()]
    if robustness:
        eval_pairs = [(it["dataset"], it["index"]) for it in eval_items]
        for name, (model, cfg, _meta) in zip(names, loaded):
            dev = resolve_device(device or cfg.train.device, key="--device" if device else "train.device")
            if len(per_data) > 1:
                key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
                own = per_data[key]
                eval_pairs = [(it["dataset"], it["index"]) for it in own if it["split"] == split]

            absent = _absent_inputs(cfg)
            temperature = calibrations[name].get("temperature")

            def predict(rows, mask_rows, _model=model, _dev=dev, _pairs=eval_pairs, _absent=absent,
                        _t=temperature):
                view = _RowView([_pairs[r] for r in rows], masks=mask_rows, absent=_absent)
                return apply_temperature(predict_proba(_model, view, batch_size=batch_size, device=_dev), _t)

            stage(f"clinfuse evaluate: missing-modality sweep of '{name}' ({', '.join(study_modalities)})",
                  enabled=progress)
            thresholds = np.array(list(result_core["runs"][name]["thresholds"].values()))
            robustness_out[name] = robustness_sweep(
                predict, eval_masks, eval_labels, groups, thresholds, label_names=label_names,
                modalities=study_modalities, seed=ev.seed, n_resamples=ev.bootstrap, ece_bins=ev.ece_bins,
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
        "modalities": study_modalities,
        "data": _data_summary(eval_items, val_items),
        "checkpoints": {n: {"path": str(p), "config_digest": cfg.digest(), "meta": _plain_meta(meta),
                            "provenance": _provenance(cfg, meta)}
                        for n, p, (_, cfg, meta) in zip(names, ckpt_paths, loaded)},
        "notes": notes + result_core["notes"],
        "runs": result_core["runs"],
        "comparisons": result_core["comparisons"],
        "robustness": robustness_out,
        "metric_definitions": {
            "binary": f"positive class is '{label_names[1]}'" if len(label_names) == 2 else None,
            "multiclass": "one-vs-rest per class, macro average over classes where defined; accuracy "
                          "and balanced accuracy of the top-label (argmax) prediction",
            "threshold": "row predicted positive when its probability >= threshold",
            "accuracy": "fraction of rows predicted right at the threshold",
            "balanced_accuracy": "(sensitivity + specificity) / 2 at the threshold (multi-class: mean recall)",
            "ece": f"{ev.ece_bins} equal-width bins, weighted by rows per bin",
            "calibration": "temperature scaling: softmax(log p / T), T fitted by maximum likelihood on "
                           "the 'val' rows only",
            "reliable": "false for a subset of fewer than 20 patients or with a class absent",
        },
    }
    frame = _predictions_frame(row_info, all_probs, label_names, result_core)
    paths = write_report(out_dir, result, frame)
    paths["calibrated"] = calibrated_paths
    return paths


def _calibration_for(mode: str, meta: dict, val_probs, val_labels, val_items: list[dict],
                     label_names: list[str], path: Path) -> dict:
    """Which temperature (and thresholds) a run uses, and where they come from.

    Returns ``{"source": "none"|"checkpoint"|"fitted", "temperature", "summary", ...}``; a
    checkpoint's block also gives ``thresholds_array``, a fit gives ``fit`` and ``fitted_on``.
    """
    from clinfuse.evaluation.calibration import fit_temperature
    from clinfuse.evaluation.prediction import decision_of

    if mode == "none":
        return {"source": "none", "temperature": None, "summary": "not calibrated (--calibration none)"}
    stored = decision_of(meta, label_names, path)  # what `clinfuse predict` would apply
    if mode == "auto" and stored["calibrated"]:
        return {"source": "checkpoint", "temperature": stored["temperature"],
                "thresholds_array": np.array(list(stored["thresholds"].values())), "stored": stored,
                "summary": f"the checkpoint's own calibration (temperature {stored['temperature']:.3g}, "
                           f"fitted on {_fitted_on_words(stored.get('fitted_on'))})"}
    try:
        temperature, fit = fit_temperature(val_probs, val_labels)
    except InputError as exc:
        return {"source": "none", "temperature": None, "summary": f"not calibrated: {exc.message}"}
    fitted_on = _rows_summary(val_items, label_names)
    fitted_on["split"] = "val"
    where = f"{fitted_on['rows']} 'val' rows of {fitted_on['patients']} patients"
    if fit["at_bound"]:
        # A temperature at the edge of the search says the rows cannot pin it down (too few, or
        # separable); applying it would make the probabilities worse, not better.
        return {"source": "none", "temperature": None,
                "summary": f"not calibrated: the temperature fit on {where} ran to its bound ({temperature:.3g}); "
                           "the validation rows are too few or separable"}
    summary = (f"temperature {temperature:.3g} fitted on {where} (validation NLL {fit['nll_before']:.3f} -> "
               f"{fit['nll_after']:.3f})")
    return {"source": "fitted", "temperature": temperature, "fit": fit, "fitted_on": fitted_on,
            "summary": summary}


def _rows_summary(items: list[dict], label_names: list[str]) -> dict:
    sites: dict[str, set] = {}
    for it in items:
        sites.setdefault(it["site"], set()).add(it["patient_id"])
    return {"rows": len(items), "patients": sum(len(v) for v in sites.values()),
            "sites": {s: len(v) for s, v in sorted(sites.items())},
            "class_counts": {name: sum(it["label"] == c for it in items) for c, name in enumerate(label_names)}}


def _fitted_on_words(fitted_on: dict | None) -> str:
    if not fitted_on:
        return "unrecorded rows"
    sites = fitted_on.get("sites") or {}
    return (f"{fitted_on.get('rows', '?')} '{fitted_on.get('split', 'val')}' rows of "
            f"{fitted_on.get('patients', '?')} patients at {len(sites)} site(s)")


def _calibration_report(cal: dict, before, after, labels, groups, thresholds: dict, label_names, ev) -> dict:
    """The run's ``calibration`` entry of metrics.json: what was applied, and ECE/Brier before/after
    on the evaluated rows (paired patient bootstrap)."""
    from clinfuse.evaluation.calibration import calibration_effect

    entry = {"source": cal["source"], "method": "temperature" if cal["source"] != "none" else "none",
             "temperature": cal.get("temperature"), "summary": cal["summary"]}
    if cal["source"] == "fitted":
        entry["fitted_on"] = cal["fitted_on"]
        entry["validation_nll"] = {"before": cal["fit"]["nll_before"], "after": cal["fit"]["nll_after"]}
    elif cal["source"] == "checkpoint":
        entry["fitted_on"] = cal["stored"].get("fitted_on")
        entry["privacy"] = cal["stored"].get("privacy")
    if cal["source"] != "none":
        from clinfuse.evaluation.metrics import evaluated_classes, reliability_curve

        entry.update(calibration_effect(before, after, labels, groups, np.array(list(thresholds.values())),
                                        label_names=label_names, n_resamples=ev.bootstrap, seed=ev.seed,
                                        ece_bins=ev.ece_bins))
        # The reliability curve of the uncalibrated probabilities, beside the run's calibrated one.
        entry["reliability_before"] = {
            label_names[c]: {k: np.asarray(v).tolist() for k, v in
                             reliability_curve(labels == c, np.asarray(before)[:, c], ev.ece_bins).items()}
            for c in evaluated_classes(len(label_names))}
    return entry


# What the calibrated checkpoint says about its two new numbers (see SECURITY.md, "Calibration").
CALIBRATION_PRIVACY = (
    "The temperature and the decision threshold were fitted by `clinfuse evaluate` on the validation "
    "rows named in fitted_on, read by whoever ran it; they are outside any DP guarantee and no site's "
    "ledger accounts for them. Keep this calibrated checkpoint with the party that holds those rows "
    "(or release it only where releasing two statistics of those patients is allowed). The source "
    "checkpoint, and the epsilon its sites spent, are unchanged.")


def _calibration_block(cal: dict, thresholds: dict, ev, source: Path, meta: dict, version: str) -> dict:
    return {
        "method": "temperature",
        "temperature": float(cal["temperature"]),
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "threshold_method": ev.threshold,
        "target_sensitivity": ev.target_sensitivity if ev.threshold == "sensitivity" else None,
        "decision": ("binary: predicted positive when the calibrated positive probability >= threshold"
                     if len(thresholds) == 1 else "multi-class: the class of highest calibrated probability"),
        "fitted_on": cal["fitted_on"],
        "fitted_by": f"clinfuse evaluate {version}",
        "fitted_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "validation_nll": {"before": cal["fit"]["nll_before"], "after": cal["fit"]["nll_after"]},
        "source_checkpoint": {"path": str(source), "model_hash": meta.get("model_hash")},
        "privacy": {"differentially_private": False, "released_statistics": ["temperature", "threshold"],
                    "statement": CALIBRATION_PRIVACY},
    }


def _write_calibrated(source: Path, out_dir: Path, name: str, block: dict) -> Path:
    from clinfuse.training.checkpoint import write_calibrated_checkpoint

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return write_calibrated_checkpoint(source, out_dir / "calibrated" / f"{safe}.pt", block)


def _data_summary(eval_items: list[dict], val_items: list[dict]) -> dict:
    """Who was evaluated: sites, patients, rows and modality patterns of the evaluated split."""
    from collections import Counter

    sites: dict[str, dict] = {}
    for it in eval_items:
        entry = sites.setdefault(it["site"], {"patients": set(), "rows": 0})
        entry["patients"].add(it["patient_id"])
        entry["rows"] += 1
    return {
        "sites": {s: {"patients": len(v["patients"]), "rows": v["rows"]} for s, v in sorted(sites.items())},
        "patients": sum(len(v["patients"]) for v in sites.values()),
        "rows": len(eval_items),
        "patterns": dict(Counter(it["pattern"] for it in eval_items).most_common()),
        "val_patients": len({(it["site"], it["patient_id"]) for it in val_items}),
    }


def _provenance(cfg, meta: dict) -> dict:
    """What a reader needs to know about a checkpoint, structured (the report words it)."""
    from clinfuse.privacy.plan import default_delta

    privacy = dict(meta.get("privacy") or {})
    enabled = bool(privacy.get("enabled"))
    per_site = privacy.get("per_site") or ({} if privacy.get("epsilon") is None else {"this site": privacy["epsilon"]})
    if privacy.get("delta") is not None:
        delta, delta_source = float(privacy["delta"]), "checkpoint"
    elif cfg.privacy.delta is not None:
        delta, delta_source = float(cfg.privacy.delta), "config"
    else:  # each site used min(1e-5, 0.1 / its patients): at most default_delta(1)
        delta, delta_source = default_delta(1), "upper bound"
    federation = meta.get("federation") or {}
    return {
        "study": cfg.study,
        "model_hash": meta.get("model_hash"),
        "config_hash": meta.get("config_hash"),
        "labels": list(cfg.data.labels),
        "tabular_fields": [c.name for c in cfg.data.tabular],
        "image_size": list(cfg.data.image.size),
        "model": {"image_encoder": cfg.model.image_encoder.name, "text_encoder": cfg.model.text_encoder.name,
                  "fusion": cfg.model.fusion.name},
        "trained_by": (f"federated learning, {federation.get('round')} round(s), {len(per_site)} site(s)"
                       if federation else "local training"),
        "versions": meta.get("versions") or {},
        "privacy": {
            "enabled": enabled,
            "epsilon_per_site": {k: float(v) for k, v in per_site.items() if v is not None} if enabled else {},
            "delta": delta if enabled else None,
            "delta_source": delta_source if enabled else None,
            "unit": privacy.get("privacy_unit", "patient") if enabled else None,
            "accountant": privacy.get("accountant") or cfg.privacy.accountant if enabled else None,
            "target_epsilon": privacy.get("target_epsilon", cfg.privacy.target_epsilon) if enabled else None,
        },
        "calibration": ({k: meta["calibration"].get(k) for k in ("temperature", "thresholds", "fitted_on",
                                                                   "fitted_by")}
                        if meta.get("calibration") else None),
    }


def _predictions_frame(rows: list[dict], all_probs: dict, label_names: list[str], core: dict):
    import pandas as pd

    from clinfuse.evaluation.metrics import predicted_classes

    records = []
    for name, probs in all_probs.items():
        predicted = predicted_classes(probs, core["runs"][name]["thresholds"], label_names)
        temperature = core["runs"][name]["calibration"].get("temperature")
        for it, pr, pred in zip(rows, probs, predicted):
            rec = {"checkpoint": name, "manifest": it["manifest"], "row": it["row"],
                   "patient_id": it["patient_id"], "site": it["site"], "split": it["split"],
                   "pattern": it["pattern"], "label": label_names[it["label"]]}
            rec.update({f"prob_{c}": float(v) for c, v in zip(label_names, pr)})
            rec["predicted"] = label_names[int(pred)]
            rec["temperature"] = temperature
            records.append(rec)
    return pd.DataFrame.from_records(records)
