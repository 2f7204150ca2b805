"""Opacus DP-SGD with less overhead per step: same mechanism, fewer and larger tensor operations.

* :class:`DPEngine` is ``opacus.PrivacyEngine`` with two substitutions in ``make_private``:
  ``grad_sample_mode="ew"`` wraps the model in :class:`ExpandedWeightsGradSampleModule`, and flat
  clipping (not distributed, not secure mode) uses :class:`FlatDPOptimizer`. Everything else
  (Poisson loader, sample rate, expected batch size, accountant hook) is Opacus' own.
* :class:`ExpandedWeightsGradSampleModule` — Opacus' ``ew`` wrapper (per-sample gradients from
  PyTorch's expanded weights: no module hooks, no ``[B, ...]`` weight gradient computed and then
  thrown away) that also accepts the empty batches Poisson sampling produces, runs a plain
  forward where no gradient is taken (validation), and computes convolution and group-norm
  per-sample gradients with :mod:`clinfuse.training.per_sample_grads`.
* :class:`FlatDPOptimizer` — ``DPOptimizer`` whose clipped sum, noise and scaling act on one flat
  vector of all parameters: one noise draw and one add instead of a few operations per parameter.
* :func:`choose_grad_sample_mode` — what ``privacy.grad_sample_mode: auto`` means: ``ew`` when
  every trainable layer is one expanded weights supports, else ``hooks``.

The mechanism is unchanged: every trainable parameter's per-sample gradient enters one flat
per-sample L2 norm, clipped to ``max_grad_norm`` with Opacus' factor ``min(1, C / (norm + 1e-6))``;
the clipped sum gets i.i.d. ``N(0, (sigma C)^2)`` noise per coordinate; the result is divided by
the expected batch size; the accountant counts every step, empty batches included.
"""

from __future__ import annotations

import functools
import warnings

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleExpandedWeights
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from clinfuse.training.per_sample_grads import expanded_weights_forward

# Layers whose parameters PyTorch's expanded weights compute per-sample gradients for (the
# functions registered in torch.nn.utils._expanded_weights). A parameter held by any other module
# would reach the forward as an ExpandedWeight that the function using it cannot handle.
EXPANDED_WEIGHTS_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)


def expanded_weights_supported(model: nn.Module) -> bool:
    """True when every module that directly holds a trainable parameter is an expanded-weights layer.

    A layer that mixes trainable and frozen parameters is refused too (expanded weights reject
    that mix inside one function call).
    """
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        trainable = [p.requires_grad for p in own]
        if not any(trainable):
            continue
        if not isinstance(module, EXPANDED_WEIGHTS_LAYERS) or not all(trainable):
            return False
    return True


def choose_grad_sample_mode(model: nn.Module, requested: str) -> str:
    """The Opacus grad-sample mode to use for ``model``: ``requested``, or for ``"auto"`` the
    faster ``"ew"`` where it supports every trainable layer and ``"hooks"`` otherwise."""
    if requested != "auto":
        return requested
    return "ew" if expanded_weights_supported(model) else "hooks"


class ExpandedWeightsGradSampleModule(GradSampleModuleExpandedWeights):
    """Opacus' expanded-weights wrapper, for every batch a Poisson loader can produce.

    ``forward(x, *args, **kwargs)`` with ``x`` batch-first, as Opacus' class. Differences:

    * an empty batch (PyTorch's expanded weights refuse batch size 0) runs the plain module and
      gives each trainable parameter the empty per-sample gradient ``[0, *shape]`` that hooks
      mode produces, so the DP optimizer clips nothing, still adds noise, and the step counts;
    * without autograd or in eval mode (validation) the plain module runs: no per-sample
      gradient is wanted, and expanded weights would refuse parameters that still hold the last
      step's ``grad_sample``;
    * convolutions and group norms get their per-sample gradients from
      :mod:`clinfuse.training.per_sample_grads` (same numbers, a fraction of the time);
    * with ``loss_reduction="mean"`` the gradient reaching the outputs is scaled by the batch size
      instead of every per-sample gradient afterwards.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not torch.is_grad_enabled() or not self.training:
            return self._module(x, *args, **kwargs)
        if x.shape[0] == 0:
            out = self._module(x, *args, **kwargs)
            trainable = [p for p in self._module.parameters() if p.requires_grad]
            # Set at backward time, like every per-sample gradient: zero_grad may come in between.
            return tree_map(lambda t: _EmptyGradSamplesOnBackward.apply(t, trainable)
                            if isinstance(t, torch.Tensor) and t.requires_grad else t, out)
        batch = x.shape[0]
        inputs_need_grad = any(isinstance(t, torch.Tensor) and t.requires_grad
                               for t in tree_leaves((x, args, kwargs)))
        # "mean": PyTorch would multiply every per-sample gradient by the batch size, one pass over
        # all of them. Scaling the gradient that reaches the outputs instead gives the same
        # per-sample gradients (they are linear in it) at the cost of a few logits. Not done when
        # an input wants its own gradient, which the scaling would change.
        scale_outputs = self.loss_reduction == "mean" and not inputs_need_grad
        reduction = "sum" if scale_outputs else self.loss_reduction
        out = expanded_weights_forward(self._module, batch, reduction, x, *args, **kwargs)
        if scale_outputs:
            out = tree_map(lambda t: _ScaleGradient.apply(t, batch)
                           if isinstance(t, torch.Tensor) and t.requires_grad else t, out)
        return out


class _ScaleGradient(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _EmptyGradSamplesOnBackward(torch.autograd.Function):
    """Identity on a model output of an empty batch; its backward gives every trainable parameter
    the empty per-sample gradient ``[0, *shape]`` (if it has none yet)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
        ctx.params = params
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        for p in ctx.params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = p.new_zeros((0, *p.shape))
        return grad, None


# Parameters smaller than this (elements) share one block of the flat vectors (_flat_layout).
SMALL_PARAMETER = 2048


@functools.lru_cache(maxsize=16)
def _flat_layout(sizes: tuple[int, ...], small_below: int) -> tuple[list[list[int]], list[int]]:
    """Where parameters of ``sizes`` elements live in FlatDPOptimizer's flat vectors.

    Each parameter of at least ``small_below`` elements is a block of its own; all smaller ones
    (biases, norm scales) share the last block, so clipping costs a few large operations instead
    of several small ones per parameter. Returns ``(blocks, offsets)``: ``blocks`` lists parameter
    indices in flat order, ``offsets[i]`` is where parameter ``i`` starts. A function of the sizes
    only, so skipped steps accumulate into the same places.
    """
    small = [i for i, n in enumerate(sizes) if n < small_below]
    blocks = [[i] for i, n in enumerate(sizes) if n >= small_below] + ([small] if small else [])
    offsets, at = [0] * len(sizes), 0
    for i in (i for block in blocks for i in block):
        offsets[i], at = at, at + sizes[i]
    return blocks, offsets


class FlatDPOptimizer(DPOptimizer):
    """``DPOptimizer`` (flat clipping) computed on one flat vector of all parameters.

    Same constructor and semantics as ``opacus.optimizers.DPOptimizer``, including skipped steps
    (virtual batches accumulate into ``summed_grad``) and the processed-flag checks. After
    ``clip_and_accumulate`` each ``p.summed_grad`` is a view of one flat buffer; after
    ``add_noise``/``scale_grad`` each ``p.grad`` is a view of another. Parameters of mixed dtype
    or device, and secure mode, fall back to Opacus' per-parameter code.
    """

    def __init__(self, *args, **kwargs):
        self._summed_flat: torch.Tensor | None = None  # clipped sum, kept across skipped steps
        self._noised_flat: torch.Tensor | None = None  # what p.grad views after add_noise
        super().__init__(*args, **kwargs)

    def _flat_applies(self) -> bool:
        params = self.params
        return (not self.secure_mode and len(params) > 0
                and len({(p.dtype, p.device) for p in params}) == 1)

    def _layout(self) -> tuple[list[list[int]], list[int]]:
        """Where each parameter lives in the flat vectors: see :func:`_flat_layout`."""
        return _flat_layout(tuple(p.numel() for p in self.params), SMALL_PARAMETER)

    def _param_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's slice of ``flat``, shaped like the parameter, in ``self.params`` order."""
        offsets = self._layout()[1]
        return [flat[at:at + p.numel()].view_as(p) for p, at in zip(self.params, offsets)]

    def clip_and_accumulate(self) -> None:
        if not self._flat_applies():
            self._summed_flat = None
            return super().clip_and_accumulate()
        params = self.params
        for p in params:
            _check_processed_flag(p.grad_sample)
        samples = [s.to(p.dtype).reshape(len(s), p.numel()) for p, s in zip(params, self.grad_samples)]
        batch = len(samples[0])
        blocks = [samples[b[0]] if len(b) == 1 else torch.cat([samples[i] for i in b], dim=1)
                  for b in self._layout()[0]]
        if batch == 0:
            clip_factor = samples[0].new_zeros(0)
        else:
            per_block = torch.stack([torch.linalg.vector_norm(s, dim=1) for s in blocks], dim=1)
            per_sample = torch.linalg.vector_norm(per_block, dim=1)
            clip_factor = (self.max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0)
        clipped_sum = params[0].new_empty(sum(p.numel() for p in params))
        for block, out in zip(blocks, clipped_sum.split([s.shape[1] for s in blocks])):
            torch.mv(block.t(), clip_factor, out=out)  # sum_i clip_i * g_i, without a [B, n] temporary
        accumulate = self._summed_flat is not None and all(p.summed_grad is not None for p in params)
        if accumulate:
            self._summed_flat += clipped_sum
        else:
            self._summed_flat = clipped_sum
        for p, view in zip(params, self._param_views(self._summed_flat)):
            p.summed_grad = view
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        if self._summed_flat is None:
            return super().add_noise()
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        std = self.noise_multiplier * self.max_grad_norm
        flat = self._summed_flat
        if std > 0:
            flat = flat + torch.normal(mean=0.0, std=std, size=flat.shape, device=flat.device,
                                       dtype=flat.dtype, generator=self.generator)
        else:
            flat = flat.clone()  # p.grad must not alias summed_grad, which may keep accumulating
        for p, view in zip(params, self._param_views(flat)):
            p.grad = view
            _mark_as_processed(p.summed_grad)
        self._noised_flat = flat

    def scale_grad(self) -> None:
        if self._summed_flat is None:
            return super().scale_grad()
        if self.loss_reduction == "mean":
            self._noised_flat /= self.expected_batch_size * self.accumulated_iterations

    def zero_grad(self, set_to_none: bool = False) -> None:
        if not self._is_last_step_skipped:
            self._summed_flat = None
        self._noised_flat = None
        super().zero_grad(set_to_none)


class DPEngine(PrivacyEngine):
    """``opacus.PrivacyEngine`` using :class:`ExpandedWeightsGradSampleModule` for ``ew`` and
    :class:`FlatDPOptimizer` for flat clipping; ``make_private`` is Opacus' own.

    Opacus warns "Secure RNG turned off" on every engine built without secure mode (every round of
    every site); the trainer seeds its noise generator from OS entropy instead, and commands say
    so once (:data:`clinfuse.privacy.plan.NOISE_SOURCE`).
    """

    def __init__(self, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            super().__init__(*args, **kwargs)

    def _prepare_model(self, module: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                       grad_sample_mode: str = "hooks", wrap_model: bool = True, **kwargs):
        if grad_sample_mode == "ew" and wrap_model and not isinstance(module, AbstractGradSampleModule):
            self.validate(module=module, optimizer=None, data_loader=None)
            return ExpandedWeightsGradSampleModule(module, batch_first=batch_first,
                                                   loss_reduction=loss_reduction)
        return super()._prepare_model(module, batch_first=batch_first, loss_reduction=loss_reduction,
                                      grad_sample_mode=grad_sample_mode, wrap_model=wrap_model, **kwargs)

    def _prepare_optimizer(self, *, optimizer, noise_multiplier, max_grad_norm, expected_batch_size,
                           loss_reduction: str = "mean", distributed: bool = False, clipping: str = "flat",
                           noise_generator=None, grad_sample_mode: str = "hooks", **kwargs):
        if (clipping == "flat" and not distributed and not self.secure_mode
                and grad_sample_mode in ("hooks", "functorch", "ew")):
            if isinstance(optimizer, DPOptimizer):
                optimizer = optimizer.original_optimizer
            return FlatDPOptimizer(optimizer=optimizer, noise_multiplier=noise_multiplier,
                                   max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                   loss_reduction=loss_reduction, generator=noise_generator,
                                   secure_mode=False, **kwargs)
        return super()._prepare_optimizer(
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, distributed=distributed,
            clipping=clipping, noise_generator=noise_generator, grad_sample_mode=grad_sample_mode, **kwargs)
