"""``clinfuse predict``: probabilities and a decision for new patients, no labels needed.

The checkpoint decides everything about the inputs (its embedded config: preprocessing, classes,
modalities) and, through its calibration block (written by ``clinfuse evaluate``), the temperature
and the decision threshold. Before any row is read the checkpoint is checked against what it
will be given: its recorded preprocessing must be what this clinfuse makes of its config, and,
with ``--config``, what the manifests' study declares; a mismatch is refused with one line.

One output row per patient (site + patient id): a patient's manifest rows (several images, a
follow-up visit) are pooled into one input as in training (up to each modality's ``max_count``,
:class:`clinfuse.data.dataset.MultimodalDataset`) and scored once; the decision is taken on the
calibrated probabilities with the checkpoint's rule
(:func:`clinfuse.evaluation.metrics.predicted_classes`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from clinfuse.errors import InputError


def _first_difference(a, b, prefix: str = ""):
    """``(key, a value, b value)`` of the first place two JSON-like values differ, or ``None``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{prefix}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (prefix or "(whole)", a, b)


def _declared_modalities(*sources) -> list[str] | None:
    """The study's modality names where a checkpoint or config records them (``None``: not recorded)."""
    for source in sources:
        if source is None:
            continue
        value = source.get("modalities") if isinstance(source, dict) else getattr(source, "modalities", None)
        if value:
            return [str(m.get("name")) if isinstance(m, dict) else str(getattr(m, "name", m)) for m in value]
    return None


def check_checkpoint_matches(meta: dict, cfg, path: Path, *, study_cfg=None, study_source=None) -> None:
    """Refuse a checkpoint whose inputs would not be prepared the way it was trained.

    ``meta``/``cfg``: from :func:`~clinfuse.training.checkpoint.load_checkpoint`; ``study_cfg``:
    the manifests' study config, when given. Raises :class:`InputError` naming the first
    differing key.
    """
    from clinfuse.training.checkpoint import preprocessing_metadata

    stored = meta.get("preprocessing")
    if not isinstance(stored, dict):
        raise InputError("the checkpoint records no preprocessing: it cannot be checked against the data",
                         file=path, key="preprocessing")
    found = _first_difference(stored, preprocessing_metadata(cfg))
    if found:
        key, theirs, ours = found
        raise InputError(f"the checkpoint was trained with preprocessing '{key}' = {theirs!r}, but this "
                         f"clinfuse prepares inputs for its config with {ours!r}; use the clinfuse version "
                         "that trained it", file=path, key=f"preprocessing.{key}")
    if study_cfg is None:
        return
    found = _first_difference(stored, preprocessing_metadata(study_cfg))
    if found:
        key, theirs, ours = found
        raise InputError(f"the checkpoint does not match the study of {study_source}: preprocessing '{key}' "
                         f"is {theirs!r} in the checkpoint, {ours!r} in the study", file=path,
                         key=f"preprocessing.{key}")
    ours, theirs = _declared_modalities(study_cfg, getattr(study_cfg, "data", None)), \
        _declared_modalities(meta, cfg, getattr(cfg, "data", None))
    if ours is not None and theirs is not None and list(ours) != list(theirs):
        raise InputError(f"the checkpoint's modalities {theirs} differ from the study's {ours} "
                         f"({study_source})", file=path, key="modalities")


def decision_of(meta: dict, label_names: list[str], path: Path) -> dict:
    """Temperature, thresholds and their provenance that ``predict`` applies for this checkpoint."""
    from clinfuse.evaluation.metrics import evaluated_classes
    from clinfuse.training.checkpoint import checkpoint_calibration

    classes = [label_names[c] for c in evaluated_classes(len(label_names))]
    block = checkpoint_calibration(meta, path=path)
    if block is None:
        return {"calibrated": False, "temperature": 1.0, "thresholds": dict.fromkeys(classes, 0.5),
                "source": "uncalibrated checkpoint: raw model probabilities, threshold 0.5",
                "privacy": None, "fitted_on": None}
    missing = [c for c in classes if c not in block["thresholds"]]
    if missing:
        raise InputError(f"the checkpoint's calibration has no threshold for class(es) {missing}",
                         file=path, key="calibration.thresholds")
    fitted = block.get("fitted_on") or {}
    source = (f"temperature and {block.get('threshold_method', '?')} threshold fitted by "
              f"{block.get('fitted_by', '?')} on {fitted.get('rows', '?')} '{fitted.get('split', 'val')}' rows "
              f"of {fitted.get('patients', '?')} patients")
    return {"calibrated": True, "temperature": float(block["temperature"]),
            "thresholds": {c: float(block["thresholds"][c]) for c in classes}, "source": source,
            "privacy": block.get("privacy"), "fitted_on": fitted}


def predict_patients(checkpoint, manifests, *, config=None, device: str | None = None,
                     batch_size: int = 64, progress: bool = True, data_roots=()) -> dict:
    """Score every usable row of ``manifests`` and return one prediction per patient.

    ``checkpoint``: path; ``manifests``: paths (CSV/Parquet, the ``label`` column optional);
    ``config``: path of the manifests' study config, checked against the checkpoint (default:
    only the checkpoint's own); ``data_roots``: folders manifest paths may point into (see
    :mod:`clinfuse.data.paths`). Returns a JSON-ready dict: ``checkpoint``, ``model_hash``,
    ``config_hash``, ``study``, ``labels``, ``modalities``, ``decision`` (see :func:`decision_of`),
    ``patients`` (one dict per patient: ``site``, ``patient_id``, ``rows``, ``prob_<class>``,
    ``predicted``, ``modalities_present``, ``modalities_used``), ``skipped_rows`` and ``warnings``.
    """
    from clinfuse.config import load_config
    from clinfuse.data.dataset import MultimodalDataset, default_cache_dir
    from clinfuse.data.manifest import pattern_name, read_manifest, study_columns
    from clinfuse.evaluation.calibration import apply_temperature
    from clinfuse.evaluation.metrics import predicted_classes
    from clinfuse.progress import stage
    from clinfuse.training.checkpoint import load_checkpoint
    from clinfuse.training.trainer import predict_outputs, resolve_device

    path = Path(checkpoint)
    manifest_paths = [Path(m) for m in manifests]
    if not manifest_paths:
        raise InputError("give at least one --manifest")
    for m in manifest_paths:
        if not m.is_file():
            raise InputError("manifest not found", file=m)
    model, cfg, meta = load_checkpoint(path)
    study_cfg = load_config(config) if config else None
    check_checkpoint_matches(meta, cfg, path, study_cfg=study_cfg, study_source=config)
    label_names = list(cfg.data.labels)
    decision = decision_of(meta, label_names, path)
    warnings: list[str] = []
    if not decision["calibrated"]:
        warnings.append("the checkpoint has no calibration: probabilities are the model's raw outputs and the "
                        "threshold is 0.5; `clinfuse evaluate` on validation rows writes a calibrated one")
    dev = resolve_device(device or cfg.train.device)
    model.to(dev)

    # Any other column is not read by the model: said, so a misspelt field does not pass silently.
    declared = set(study_columns(cfg))
    fields = {c.name for spec in cfg.modalities if spec.kind == "tabular" for c in spec.columns}
    patients: dict[tuple[str, str], dict] = {}
    skipped: list[dict] = []
    modality_names: list[str] = []
    sites = []
    for mp in manifest_paths:  # every manifest is checked before any row is scored
        try:
            sites.append(read_manifest(mp, cfg, require_label=False, data_roots=data_roots))
        except InputError as exc:
            if exc.key in fields:
                raise InputError(f"the checkpoint's study declares tabular field '{exc.key}', which this "
                                 "manifest lacks: the checkpoint does not match the manifest's study",
                                 file=mp, key=exc.key) from None
            raise
    for mp, site in zip(manifest_paths, sites):
        skipped.extend({"manifest": str(mp), "row": pr.row, "column": pr.column, "message": pr.message}
                       for pr in site.problems if pr.severity == "error")
        ignored = [c for c in site.columns if c not in declared]
        kept = [pr for pr in site.problems if pr.severity == "warning"]
        if kept:
            warnings.append(f"{mp}: {len(kept)} row warning(s), rows kept (first: {kept[0].describe()})")
        if ignored:
            warnings.append(f"{mp}: column(s) {ignored} are not inputs of this checkpoint and were ignored")
        if not site.records:
            warnings.append(f"{mp}: no usable rows")
            continue
        stage(f"clinfuse predict: scoring {len(site.records)} rows of {mp}", enabled=progress)
        dataset = MultimodalDataset(site.records, cfg, cache_dir=default_cache_dir(mp, cfg))
        out = predict_outputs(model, dataset, batch_size=batch_size, device=dev)
        modality_names = list(out["aux"])  # the model's modalities, in its mask order
        probs = apply_temperature(out["probs"], decision["temperature"])
        for sample, p, mask in zip(dataset.samples, probs, np.asarray(out["masks"])):
            entry = patients.setdefault((site.site, sample.patient_id), {
                "site": site.site, "patient_id": sample.patient_id, "rows": [], "probs": [],
                "in_manifest": np.zeros(len(cfg.modalities), dtype=bool),
                "used": np.zeros(len(modality_names), dtype=bool)})
            for i in sample.rows:
                record = dataset.records[i]
                entry["rows"].append(f"{mp.name}:{record.row}")
                entry["in_manifest"] |= np.asarray(record.mask, dtype=bool)  # what the rows carry
            entry["probs"].append(p)
            entry["used"] |= mask > 0.5  # what the model received (absent ones masked, never imputed)
    if not patients:
        raise InputError("no usable rows in the manifests: fix the problems `clinfuse validate` lists",
                         file=manifest_paths[0] if len(manifest_paths) == 1 else None)

    mean = np.array([np.mean(e["probs"], axis=0) for e in patients.values()])
    predicted = predicted_classes(mean, decision["thresholds"], label_names)
    rows = []
    for entry, p, pred in zip(patients.values(), mean, predicted):
        used = [m for m, has in zip(modality_names, entry["used"]) if has]
        row = {"site": entry["site"], "patient_id": entry["patient_id"], "rows": len(entry["rows"])}
        row.update({f"prob_{c}": float(v) for c, v in zip(label_names, p)})
        row.update({"predicted": label_names[int(pred)],
                    "threshold": decision["thresholds"][label_names[1]] if len(label_names) == 2 else None,
                    "modalities_present": pattern_name(entry["in_manifest"], cfg.modality_names).removesuffix(" only"),
                    "modalities_used": "+".join(used) or "none"})
        rows.append(row)
    return {
        "schema": "clinfuse-predictions/1",
        "checkpoint": str(path),
        "model_hash": meta.get("model_hash"),
        "config_hash": meta.get("config_hash"),
        "study": cfg.study,
        "labels": label_names,
        "modalities": modality_names,
        "decision": decision,
        "patients": rows,
        "skipped_rows": skipped,
        "warnings": warnings,
    }


def predictions_table(result: dict):
    """The per-patient rows as a DataFrame, with the checkpoint's identity on every row."""
    import pandas as pd

    frame = pd.DataFrame.from_records(result["patients"])
    frame["temperature"] = result["decision"]["temperature"]
    frame["calibration"] = result["decision"]["source"]
    frame["model_hash"] = result["model_hash"]
    frame["config_hash"] = result["config_hash"]
    frame["checkpoint"] = result["checkpoint"]
    return frame


def run_predict(args) -> int:
    """The ``clinfuse predict`` handler (parser in :mod:`clinfuse.evaluation.commands`)."""
    from clinfuse.evaluation.report import write_predictions_csv
    from clinfuse.fileio import to_jsonable

    if args.out is None and not args.json:
        raise InputError("give --out predictions.csv (or --json to print the predictions)", key="--out")
    result = predict_patients(args.checkpoint, args.manifest, config=args.config, device=args.device,
                              batch_size=args.batch_size, progress=not args.json,
                              data_roots=args.data_roots)
    if args.out is not None:
        write_predictions_csv(args.out, predictions_table(result))
        result["out"] = str(args.out)
    for warning in result["warnings"]:
        print(f"clinfuse predict: warning: {warning}", file=sys.stderr)
    if result["skipped_rows"]:
        first = result["skipped_rows"][0]
        print(f"clinfuse predict: {len(result['skipped_rows'])} row(s) skipped (first: {first['manifest']}, "
              f"row {first['row']}: {first['message']}); `clinfuse validate` lists them all", file=sys.stderr)
    if args.json:
        print(json.dumps(to_jsonable(result), indent=2, allow_nan=False))
        return 0
    counts = {}
    for row in result["patients"]:
        counts[row["predicted"]] = counts.get(row["predicted"], 0) + 1
    print(f"{len(result['patients'])} patients: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"decision: {result['decision']['source']}")
    print(f"predictions: {args.out}")
    return 0
