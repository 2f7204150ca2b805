"""Public-data warm starts: ``clinfuse pretrain`` and ``federation.initial_checkpoint``.

Pretraining runs **without** differential privacy on data the consortium declares public. No
site's budget is spent: no accountant, plan or ledger is opened. It is only fair when the data is
really public: otherwise its patients have no DP protection at all (docs/federation.md, "Warm
start from public data"). :func:`refuse_site_manifests` refuses a manifest that lies under a
site's state dir (a folder holding a site key, ledger, accountant or plan), or beside one (the
``clinfuse init`` layout: ``DIR/manifest.csv`` with ``DIR/state``): that is a site's private data.

The checkpoint (format 2, :mod:`clinfuse.training.checkpoint`) carries a ``pretraining`` block,
its provenance (:data:`PRETRAINING_FORMAT`): ``dataset`` (the name given, default the manifest's
folder), ``public`` ("declared by the consortium"), ``manifests`` (path and sha256 of each
manifest's bytes; the files a manifest names are not hashed), ``manifest_sha256`` (over those
digests in order), ``rows`` and ``patients`` of the training split used, ``epochs``, ``seed``,
``config_hash`` and the checkpoint's ``model_hash``.

A study starts from such a checkpoint (:func:`read_initial_checkpoint`) only when it matches the
study: the same modalities, preprocessing and labels, the same architecture (model width, fusion,
encoders) and so the same parameter names and shapes; anything else is refused, naming what
differs. A checkpoint without a ``pretraining`` block (say, one trained on a site's data) is
refused too: starting from it would carry that data's privacy loss into the study unrecorded.
The provenance then goes into the run's history, every global checkpoint, and each site's
ledger (a signed ``"warm-start"`` entry, :meth:`SiteRuntime.train_round`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from clinfuse.config import Config
from clinfuse.errors import InputError

PRETRAINING_FORMAT = "clinfuse-pretraining/1"
PUBLIC_DECLARATION = "declared by the consortium"
NO_BUDGET = ("pretraining WITHOUT differential privacy on data the consortium declares public: no site's "
             "privacy budget is spent (no accountant, plan or ledger is opened); its patients have no DP "
             "protection, so use only data that is really public")
#: The provenance fields a site's ledger records (plus where the site saw it).
LEDGER_FIELDS = ("format", "dataset", "public", "manifest_sha256", "rows", "patients", "config_hash",
                 "model_hash")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def site_state_dir_of(manifest: str | Path) -> Path | None:
    """The site state dir ``manifest`` lies under or beside (its folder holds one), or ``None``."""
    from clinfuse.privacy.site_state import is_state_dir

    folder = Path(manifest).resolve().parent
    for parent in (folder, *folder.parents):
        if is_state_dir(parent):
            return parent
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return None
    return next((child for child in children if is_state_dir(child)), None)


def refuse_site_manifests(manifests: Sequence[str | Path]) -> None:
    """:class:`InputError` naming the first manifest that lies under or beside a site's state dir."""
    for manifest in manifests:
        state_dir = site_state_dir_of(manifest)
        if state_dir is None:
            continue
        where = "lies under" if Path(manifest).resolve().is_relative_to(state_dir) else "lies beside"
        raise InputError(f"this manifest {where} a site's state dir ({state_dir}): it is a site's private data, "
                         "which pretraining (no DP) must never read; pretrain only on data the consortium "
                         "declares public, kept apart from every site's state", file=manifest)


def combined_sha256(digests: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def pretrain(cfg: Config, manifests: Sequence[str | Path], out: str | Path, *, dataset_name: str | None = None,
             epochs: int | None = None, data_roots=(), progress: bool = False, splits=("train",),
             say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Train without DP on public ``manifests`` (the rows of ``splits``, pooled: the training split
    unless told otherwise); returns ``(checkpoint path, provenance)``. The checkpoint is ``out/model.pt``.

    Refuses (:class:`InputError`) a manifest under or beside a site's state dir before anything is
    read, and a manifest set without training rows.
    """
    from clinfuse.fileio import atomic_write_json
    from clinfuse.training.checkpoint import (
        build_model_for,
        clean_state_dict,
        save_checkpoint,
        state_dict_hash,
    )
    from clinfuse.training.commands import load_split_datasets
    from clinfuse.training.trainer import LocalTrainer, seed_everything

    manifests = [Path(m) for m in manifests]
    if not manifests:
        raise InputError("give at least one public manifest", key="--manifest")
    refuse_site_manifests(manifests)
    for m in manifests:
        if not m.is_file():
            raise InputError("manifest not found", file=m)
    name = (dataset_name or manifests[0].resolve().parent.name).strip()
    if not name:
        raise InputError("the dataset name is empty", key="--dataset-name")
    epochs = epochs or cfg.train.epochs
    say(NO_BUDGET)
    seed_everything(cfg.train.seed)
    datasets, _ = load_split_datasets(manifests, cfg, data_roots=data_roots)
    train_set = datasets["train"]
    if tuple(splits) != ("train",):
        from clinfuse.data.dataset import MultimodalDataset, default_cache_dir

        unknown = sorted(set(splits) - set(datasets))
        if unknown:
            raise InputError(f"unknown split(s) {unknown}; the splits are {sorted(datasets)}", key="splits")
        records = [r for split in splits for r in datasets[split].records]
        train_set = MultimodalDataset(records, cfg, cache_dir=default_cache_dir(manifests[0], cfg))
    if len(train_set) == 0:
        raise InputError("the public manifests have no training rows", file=manifests[0])
    train_set.warm(progress)
    say(f"dataset {name!r}: {len(train_set.records)} training rows of {len(train_set)} patients, {epochs} epochs")
    val_set = datasets["val"] if "val" not in splits and len(datasets["val"]) else None
    trainer = LocalTrainer(cfg, build_model_for(cfg), train_set, val_set=val_set, plan=None,
                           progress=progress)
    history = trainer.fit(epochs)
    digests = [file_sha256(m) for m in manifests]

    provenance = {"format": PRETRAINING_FORMAT, "dataset": name, "public": PUBLIC_DECLARATION,
                  "manifests": [{"path": str(m), "sha256": d} for m, d in zip(manifests, digests)],
                  "manifest_sha256": combined_sha256(digests), "rows": len(train_set.records),
                  "patients": len(train_set), "splits": list(splits), "epochs": epochs, "seed": cfg.train.seed,
                  "config_hash": cfg.digest(), "model_hash": state_dict_hash(clean_state_dict(trainer.model))}
    out = Path(out)
    path = save_checkpoint(out / "model.pt", trainer.model, cfg, metrics={"history": history},
                           privacy={"enabled": False, "epsilon": None, "note": "pretrained without DP on data "
                                    "declared public; no site budget spent"},
                           extra={"pretraining": provenance})
    atomic_write_json(out / "run.json", {"command": "pretrain", "pretraining": provenance,
                                         "config": cfg.model_dump(mode="json")})
    return path, provenance


# --------------------------------------------------------------------------------------------
# Starting a study from a pretrained checkpoint
# --------------------------------------------------------------------------------------------

def architecture(cfg: Config) -> dict:
    """What fixes the model's parameters besides the inputs: width, fusion, each encoder, classes."""
    model = cfg.model.model_dump(mode="json")
    for key in ("image_encoder", "text_encoder", "tabular_encoder", "dropout"):
        model.pop(key, None)
    return {"model": model, "encoders": {m.name: m.encoder.model_dump(mode="json") for m in cfg.modalities},
            "n_classes": cfg.n_classes}


def study_mismatches(payload: dict, cfg: Config, *, source: str | Path) -> list[str]:
    """How checkpoint ``payload`` differs from the study ``cfg`` (empty: it fits)."""
    from clinfuse.config import config_from_dict
    from clinfuse.training.checkpoint import build_model_for, modality_metadata, preprocessing_metadata

    theirs = config_from_dict(payload["config"], source=f"{source} (embedded config)")
    out = []
    if modality_metadata(theirs) != modality_metadata(cfg):
        out.append(f"modalities {modality_metadata(theirs)} vs the study's {modality_metadata(cfg)}")
    recorded, ours = payload.get("preprocessing") or {}, preprocessing_metadata(cfg)
    for key in sorted(set(recorded) | set(ours)):
        if recorded.get(key) != ours.get(key):
            out.append(f"preprocessing '{key}': {json.dumps(recorded.get(key), sort_keys=True)} vs the study's "
                       f"{json.dumps(ours.get(key), sort_keys=True)}")
    a, b = architecture(theirs), architecture(cfg)
    for key in sorted(a):
        if a[key] != b[key]:
            out.append(f"architecture '{key}': {json.dumps(a[key], sort_keys=True)} vs the study's "
                       f"{json.dumps(b[key], sort_keys=True)}")
    if not out:
        shapes = {k: tuple(v.shape) for k, v in build_model_for(cfg).state_dict().items()}
        given = {k: tuple(v.shape) for k, v in payload["state_dict"].items()}
        if shapes != given:
            diff = sorted(set(shapes) ^ set(given)) or [k for k in shapes if shapes[k] != given[k]]
            out.append(f"parameters differ (first: {diff[0]})")
    return out


def read_initial_checkpoint(path: str | Path, cfg: Config) -> tuple[dict, dict]:
    """The weights (numpy, by name) and provenance of a pretraining checkpoint that fits ``cfg``.

    Refuses (:class:`InputError` naming the file) a checkpoint without pretraining provenance,
    whose weights do not match their hash, or that does not match the study.
    """
    from clinfuse.training.checkpoint import read_checkpoint, state_dict_hash

    path = Path(path)
    payload = read_checkpoint(path)
    provenance = payload.get("pretraining")
    if not isinstance(provenance, dict) or provenance.get("format") != PRETRAINING_FORMAT:
        raise InputError("not a pretraining checkpoint (no public-data provenance; 'clinfuse pretrain' writes "
                         "one): a model trained on private data would carry its patients' privacy loss into the "
                         "study unrecorded", file=path, key="federation.initial_checkpoint")
    if state_dict_hash(payload["state_dict"]) != payload.get("model_hash"):
        raise InputError("checkpoint weights do not match their recorded hash (corrupt or edited file)", file=path)
    problems = study_mismatches(payload, cfg, source=path)
    if problems:
        raise InputError("the initial checkpoint does not match the study: " + "; ".join(problems)
                         + ". Pretrain with the study's config", file=path, key="federation.initial_checkpoint")
    state = {k: v.numpy() for k, v in payload["state_dict"].items()}
    return state, {**provenance, "checkpoint": str(path), "model_hash": payload["model_hash"]}


def ledger_provenance(provenance: dict) -> dict:
    """The provenance a site's ``"warm-start"`` ledger entry records (its ``pretraining`` field)."""
    return {k: provenance.get(k) for k in LEDGER_FIELDS}
