"""The empirical privacy audit, run on clinfuse's own DP-SGD code.

:mod:`clinfuse.privacy.canary` holds the statistics (canaries, scores, the epsilon lower bound)
and imports no training code. This module runs the DP-SGD it audits, through the entry points
the site's trainer uses, so a bug in the code that trains fails the audit:

- :func:`shadow_dp_sgd`: ``DPEngine.make_private`` (:mod:`clinfuse.training.dp_engine`) on a
  *gradient probe* — a one-channel ``Conv1d`` whose kernel spans the input row, so each sample's
  gradient *is* its row — with the grad-sample mode the trainer chooses (``ew``: clinfuse's
  :class:`ExpandedWeightsGradSampleModule` and the convolution per-sample gradients of
  :mod:`clinfuse.training.per_sample_grads`; or ``hooks``), flat clipping and noise by
  :class:`FlatDPOptimizer`, Poisson sampling by the loader ``make_private`` builds, and the
  trainer's mean loss reduction (its gradient scaling included).
- :func:`background_gradients`: the site's real patients' per-sample gradients from the site's
  model, computed by the same engine, compressed to the canary coordinates.
- :func:`run_empirical_audit`: both, handed to :func:`clinfuse.privacy.canary.run_canary_audit`.

Not covered by the probe: per-layer (clip-group) clipping runs Opacus' per-layer optimizer in
training; the audit runs flat clipping at the same total norm (each patient's whole gradient is
bounded by ``max_grad_norm`` either way, and the noise is scaled to that bound).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from clinfuse.errors import InputError
from clinfuse.privacy.accountant import DEFAULT_TIMEOUT_S
from clinfuse.privacy.canary import AuditResult, run_canary_audit
from clinfuse.training.dp_engine import DPEngine, FlatDPOptimizer


class GradientProbe(nn.Module):
    """``[B, width] -> [B]``: a ``Conv1d(1, 1, width)`` over the row; d(output_b)/d(kernel) = row_b."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size=width, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.conv(rows.unsqueeze(1)).reshape(rows.shape[0])


def shadow_dp_sgd(features: np.ndarray, noise_multiplier: float, *, max_grad_norm: float, sample_rate: float,
                  steps: int, seed: int, grad_sample_mode: str = "ew", progress: bool | None = None) -> np.ndarray:
    """DP-SGD through clinfuse's engine on :class:`GradientProbe` rows; returns ``theta_0 - theta_T``.

    In units of summed clipped gradients (the trainer divides each noisy sum by the expected
    batch size; that factor is undone here). ``sample_rate`` must be ``1/k`` for an integer ``k``:
    the rate a Poisson loader of ``k`` batches samples at, as in training.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from clinfuse.progress import Progress

    n, width = features.shape
    k = round(1 / sample_rate)
    if k < 1 or not math.isclose(1 / k, sample_rate, rel_tol=1e-12) or int(1 / (1 / k)) != k:
        raise InputError(f"the audited sample rate {sample_rate:g} is not 1/k for a loader of k batches",
                         key="sample_rate")
    torch.manual_seed(seed)  # Opacus' Poisson sampler draws from the global generator
    probe = GradientProbe(width)
    dataset = TensorDataset(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
    # Only the loader's length matters: make_private replaces its batches by Poisson sampling at 1/len.
    loader = DataLoader(dataset, batch_sampler=[[i % max(n, 1)] for i in range(k)])
    reduction = "mean" if int(n / k) >= 1 else "sum"  # Opacus divides "mean" by int(n * q)
    engine = DPEngine(accountant="rdp")
    module, optimizer, loader = engine.make_private(
        module=probe, optimizer=torch.optim.SGD(probe.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True, clipping="flat",
        grad_sample_mode=grad_sample_mode, loss_reduction=reduction,
        noise_generator=torch.Generator().manual_seed(seed + 1))
    if not isinstance(optimizer, FlatDPOptimizer):  # the audit must run what trains
        raise TypeError(f"DPEngine built {type(optimizer).__name__}, not the FlatDPOptimizer training uses")
    if not math.isclose(loader.sample_rate, sample_rate, rel_tol=1e-12):
        raise RuntimeError(f"the engine's loader samples at {loader.sample_rate}, not {sample_rate}")
    done = 0
    bar = Progress(steps, "shadow DP-SGD (clinfuse engine)", "step", enabled=progress is not False)
    try:
        with warnings.catch_warnings():
            # Opacus' hooks warn that no *input* needs a gradient; only the parameters do here.
            warnings.simplefilter("ignore", UserWarning)
            while done < steps:
                for (rows,) in loader:
                    optimizer.zero_grad(set_to_none=True)
                    out = module(rows)
                    (out.mean() if len(rows) and reduction == "mean" else out.sum()).backward()
                    optimizer.step()
                    done += 1
                    bar.update(1)
                    if done >= steps:
                        break
    finally:
        bar.close()
        if hasattr(module, "_close"):
            module._close()
    scale = optimizer.expected_batch_size if reduction == "mean" else 1.0
    return -probe.conv.weight.detach().double().numpy().reshape(width) * scale


def patient_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample training loss of one collated batch (the dict batch of
    :mod:`clinfuse.data.dataset`: one item per patient), as :class:`LocalTrainer` computes it."""
    from clinfuse.training.balance import multimodal_loss

    return multimodal_loss(model(batch), batch["label"], batch["mask"])[0]


def background_gradients(model: nn.Module, batches: Iterable, coords: np.ndarray, *, grad_sample_mode: str,
                         max_samples: int = 1000,
                         loss_fn: Callable[[nn.Module, object], torch.Tensor] = patient_losses) -> np.ndarray:
    """Per-sample gradients of ``model`` on ``batches``, by clinfuse's engine, at the canary coordinates.

    ``loss_fn(model, batch)`` gives the per-sample losses (default: the trainer's). Returns
    ``[n, len(coords) + 1]``: the gradient at each of ``coords`` (indices into the concatenated
    flattened trainable parameters, in ``parameters()`` order) and, last, the norm of all the
    other coordinates, so clipping sees each sample's true norm. Dropout is off (the gradients
    are a fixed background, not a training step).
    """
    from torch.utils.data import DataLoader, TensorDataset

    params = [p for p in model.parameters() if p.requires_grad]
    coords = np.asarray(coords)
    engine = DPEngine(accountant="rdp")
    module, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=DataLoader(TensorDataset(torch.zeros(1))),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=grad_sample_mode)
    module.train()
    for sub in model.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.eval()
    rows, seen = [], 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs need grad"
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(module, batch).mean().backward()
                grads = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], dim=1)
                grads = grads.detach().double().numpy()
                picked = grads[:, coords]
                rest = np.sqrt(np.maximum((grads ** 2).sum(axis=1) - (picked ** 2).sum(axis=1), 0.0))
                rows.append(np.concatenate([picked, rest[:, None]], axis=1))
                seen += grads.shape[0]
                if seen >= max_samples:
                    break
    finally:
        optimizer.zero_grad(set_to_none=True)
        if hasattr(module, "_close"):
            module._close()
    if not rows:
        return np.zeros((0, len(coords) + 1))
    return np.concatenate(rows, axis=0)[:max_samples]


def run_empirical_audit(dim_or_model, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float,
                        steps: int, n_canaries: int = 1000, seed: int = 0, delta: float = 1e-5,
                        applied_noise_multiplier: float | None = None, claimed_epsilon: float | None = None,
                        data: Iterable | None = None, loss_fn: Callable | None = None, max_background: int = 1000,
                        canary_scale: float = 10.0, accountant: str = "prv", confidence: float = 0.95,
                        grad_sample_mode: str = "ew", timeout_s: float = DEFAULT_TIMEOUT_S,
                        progress: bool | None = None) -> AuditResult:
    """One-run canary audit of clinfuse's DP-SGD at the given settings.

    ``dim_or_model``: a parameter count, or the site's model (its trainable parameter count;
    with ``data``, batches of its patients, their per-sample gradients are the background).
    ``grad_sample_mode``: what the trainer uses (``choose_grad_sample_mode(model, ...)``).
    The other parameters are :func:`clinfuse.privacy.canary.run_canary_audit`'s.
    """
    if isinstance(dim_or_model, nn.Module):
        model = dim_or_model
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        model, dim = None, dim_or_model
    background = None
    notes = []
    if model is not None and data is not None:
        def background(coords):
            return background_gradients(model, data, coords, grad_sample_mode=grad_sample_mode,
                                        max_samples=max_background, loss_fn=loss_fn or patient_losses)
    elif model is not None:
        notes.append("no data given: the shadow run has no background patients (the strongest, least "
                     "realistic audit)")

    def shadow_run(features, applied):
        return shadow_dp_sgd(features, applied, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
                             steps=steps, seed=seed, grad_sample_mode=grad_sample_mode, progress=progress)

    result = run_canary_audit(dim, shadow_run=shadow_run, noise_multiplier=noise_multiplier,
                              max_grad_norm=max_grad_norm, sample_rate=sample_rate, steps=steps,
                              n_canaries=n_canaries, seed=seed, delta=delta,
                              applied_noise_multiplier=applied_noise_multiplier, claimed_epsilon=claimed_epsilon,
                              background=background, canary_scale=canary_scale, accountant=accountant,
                              confidence=confidence, timeout_s=timeout_s)
    engine = (f"shadow run: clinfuse's DPEngine ({grad_sample_mode} per-sample gradients, FlatDPOptimizer "
              "flat clipping and noise, Poisson sampling)")
    result.notes[:0] = [*notes, engine]
    return result
