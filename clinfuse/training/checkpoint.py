"""Checkpoints: weights plus everything needed to use and trust them later.

A checkpoint is a ``torch.save`` dict with ``format``, ``state_dict`` (clean names, never the
``_module.`` prefix of an Opacus wrapper), ``config`` (the whole study config as JSON data),
``modalities`` (the study's modalities in declared order: ``name``, ``kind``, ``max_count``),
``preprocessing`` (what the inputs must look like, per modality), ``metrics``, ``privacy``
(epsilon spent, delta, noise, sample rate, steps) and ``versions``. Format 1 checkpoints (the
three fixed slots) still load: their ``image_encoder.*``-style names are renamed. Written to a temporary file and renamed, so
a crash never leaves a truncated checkpoint under the final name.

A checkpoint may also carry a ``calibration`` block (see :func:`write_calibrated_checkpoint`): the
temperature and decision threshold ``clinfuse predict`` applies, with where they were fitted.
Checkpoints without one (every training and federation output) load as before.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import torch

from clinfuse.config import Config, config_from_dict
from clinfuse.environment import versions
from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_bytes

FORMAT = "clinfuse-checkpoint/2"
_FORMATS = ("clinfuse-checkpoint/1", FORMAT)
_OLD_PREFIXES = {"image_encoder.": "encoders.image.", "text_encoder.": "encoders.text.",
                 "tabular_encoder.": "encoders.tabular."}


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the underlying model, with Opacus's ``_module.`` prefix removed, on CPU."""
    inner = getattr(model, "_module", model)
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names and bytes: identifies a released model in ledgers."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def modality_metadata(cfg: Config) -> list[dict]:
    """The study's modalities as a checkpoint records them, in declared order."""
    return [{"name": m.name, "kind": m.kind, "max_count": m.max_count} for m in cfg.modalities]


def preprocessing_metadata(cfg: Config) -> dict:
    from clinfuse.data.dataset import DECODER_VERSION, input_shape

    return {
        "modalities": {m.name: {"kind": m.kind, "input_shape": list(input_shape(m)), **m.preprocessing()}
                       for m in cfg.modalities},
        "labels": list(cfg.data.labels),
        "decoder_version": DECODER_VERSION,
    }


def atomic_torch_save(obj, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_checkpoint(path: str | Path, model: torch.nn.Module, cfg: Config, *, metrics: dict | None = None,
                    privacy: dict | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically; returns its path."""
    state = clean_state_dict(model)
    payload = {
        "format": FORMAT,
        "state_dict": state,
        "model_hash": state_dict_hash(state),
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.digest(),
        "modalities": modality_metadata(cfg),
        "preprocessing": preprocessing_metadata(cfg),
        "metrics": metrics or {},
        "privacy": privacy or {"enabled": False, "epsilon": None},
        "versions": versions(),
        **(extra or {}),
    }
    atomic_torch_save(payload, path)
    return Path(path)


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, checked for the clinfuse format."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", file=path)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        raise InputError(f"not a readable checkpoint ({type(exc).__name__}: {exc})", file=path) from None
    if not isinstance(payload, dict) or payload.get("format") not in _FORMATS:
        raise InputError(f"not a clinfuse checkpoint (expected format {FORMAT})", file=path)
    if payload["format"] != FORMAT:
        payload["state_dict"] = {_new_name(k): v for k, v in payload["state_dict"].items()}
    return payload


def _new_name(name: str) -> str:
    for old, new in _OLD_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def build_model_for(cfg: Config):
    """A fresh model shaped for this study: its modalities (and only those), classes and widths;
    the linear head or the fusion model as ``model.head`` says (:func:`clinfuse.privacy.recipe.resolve_head`)."""
    from clinfuse.privacy.recipe import resolve_head

    if resolve_head(cfg) == "linear":
        from clinfuse.models.linear import build_linear_model

        return build_linear_model(cfg.modalities, n_classes=cfg.n_classes)
    from clinfuse.models.fusion import build_model

    return build_model(cfg.modalities, cfg.model, n_classes=cfg.n_classes)


def load_checkpoint(path: str | Path):
    """Load a checkpoint; returns ``(model, cfg, meta)`` with the model in eval mode on CPU."""
    payload = read_checkpoint(path)
    cfg = config_from_dict(payload["config"], source=f"{path} (embedded config)")
    recorded = payload.get("modalities")
    if recorded is not None and recorded != modality_metadata(cfg):
        raise InputError(f"the checkpoint records modalities {recorded} but its config declares "
                         f"{modality_metadata(cfg)}", file=path)
    model = build_model_for(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"weights do not fit the model its config describes: {exc}", file=path) from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["label_names"] = list(cfg.data.labels)
    meta["epsilon"] = (payload.get("privacy") or {}).get("epsilon")
    return model, cfg, meta


# --------------------------------------------------------------------------------------------
# Calibration block: temperature + decision threshold, added after training by `clinfuse evaluate`

CALIBRATION_FORMAT = "clinfuse-calibration/1"


def write_calibrated_checkpoint(source: str | Path, dest: str | Path, calibration: dict) -> Path:
    """Copy checkpoint ``source`` to ``dest`` with ``calibration`` as its calibration block.

    ``calibration`` needs ``method`` ("temperature"), ``temperature`` (> 0) and ``thresholds``
    ({class label: threshold}); everything else in it (where it was fitted, what that means for
    privacy) is kept as given. The weights, their hash and the rest of the checkpoint are
    unchanged, and ``source`` is never modified: a federated ``global.pt`` stays what the
    federation released.
    """
    payload = read_checkpoint(source)
    block = {"format": CALIBRATION_FORMAT, **calibration}
    checkpoint_calibration({"calibration": block}, path=source)  # refuse a block predict cannot use
    payload["calibration"] = block
    atomic_torch_save(payload, dest)
    return Path(dest)


def checkpoint_calibration(meta: dict, *, path: str | Path | None = None) -> dict | None:
    """The checkpoint's calibration block, checked; ``None`` for an uncalibrated checkpoint."""
    import math

    block = (meta or {}).get("calibration")
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("format") != CALIBRATION_FORMAT:
        raise InputError(f"calibration block is not of format {CALIBRATION_FORMAT}", file=path, key="calibration")
    temperature = block.get("temperature")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise InputError(f"calibration temperature must be a positive number, got {temperature!r}",
                         file=path, key="calibration.temperature")
    thresholds = block.get("thresholds")
    if not isinstance(thresholds, dict) or not all(
            isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in thresholds.values()):
        raise InputError("calibration thresholds must map class labels to numbers in [0, 1]",
                         file=path, key="calibration.thresholds")
    return block
