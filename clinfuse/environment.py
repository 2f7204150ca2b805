"""What a result was computed with: the installed package versions and the torch device.

* :func:`versions` — the versions recorded beside every checkpoint, run directory and ledger
  entry, so a result can be repeated (and an audit can tell which accountant code counted it).
* :func:`resolve_device` — what ``train.device`` (or ``clinfuse evaluate --device``) means on
  this machine: ``auto`` is CUDA when present, else the CPU; ``cuda`` without a GPU is an error,
  never a silent fall-back to the CPU.
"""

from __future__ import annotations

import functools
from importlib import metadata

# The distributions that determine a result: the model and data code, the privacy accounting,
# the federation, the file decoders.
RESULT_PACKAGES = ("clinfuse", "torch", "monai", "opacus", "dp-accounting", "flwr", "pydicom", "numpy")


def versions() -> dict[str, str | None]:
    """Installed version of each of :data:`RESULT_PACKAGES` (``None`` for one not installed)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str | None]:
    # Once per process: every ledger entry records them, and each lookup scans site-packages.
    out = {}
    for name in RESULT_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def resolve_device(name: str = "auto", *, key: str = "train.device"):
    """The ``torch.device`` for ``name`` (``auto``, ``cpu`` or ``cuda``).

    Raises :class:`~clinfuse.errors.InputError` naming ``key`` when ``cuda`` is asked for and no
    GPU is available.
    """
    import torch

    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from clinfuse.errors import InputError

            raise InputError("CUDA was requested but no GPU is available", key=key)
        return torch.device("cuda")
    return torch.device("cpu")
