"""Faster per-sample gradients for PyTorch's expanded weights (Opacus' ``ew`` mode).

PyTorch computes the per-sample gradients of expanded weights in ``torch.nn.utils._expanded_weights``:
one ``autograd.Function`` per layer type, looked up in a table when the layer's function
(``F.conv2d``, ``F.group_norm``, ...) is called on an ``ExpandedWeight``. Two of them cost far more
than the layer's ordinary weight gradient on a CPU:

* **convolution** builds an ``im2col`` patch matrix of the input (``F.unfold``) and multiplies it
  with the output gradient sample by sample (about 3-5x the ordinary weight gradient on the
  default small CNN; 10x on DenseNet121's 3x3 convolutions). :class:`ConvPerSampleGrad` gets the
  same numbers from one *grouped* weight-gradient call of the convolution backend: with the batch
  folded into the channels (input ``[1, B*C, ...]``, output gradient ``[1, B*O, ...]``, ``B*groups``
  groups), group ``b``'s weight gradient is exactly sample ``b``'s. The input gradient is the
  backend's ordinary one.
* **group norm** normalises the whole input a second time to get ``x_hat``, multiplies it with
  the output gradient and sums, after the backend's input gradient. :class:`GroupNormPerSampleGrad`
  makes one call of the backend's group-norm backward with the batch folded into the channels
  (``[1, B*C, HW]``, ``B*G`` groups, the saved mean and ``1/std``, the weight repeated ``B``
  times): its input gradient is the ordinary one, and its weight and bias gradients
  ``[B*C]`` are the per-sample ones.

:func:`expanded_weights_forward` runs a forward with expanded weights and these functions.

Both classes subclass PyTorch's own (same forward, same ``grad_sample`` bookkeeping through
``set_grad_sample_if_exists``), and fall back to PyTorch's backward where they do not apply
(string padding). :func:`faster_per_sample_grads` swaps them into the lookup table for the
duration of one forward (the class is chosen at forward time and its backward runs later), so
nothing outside clinfuse's own DP forward is affected. Should a future PyTorch move these private
modules, the import fails, :data:`AVAILABLE` is ``False`` and PyTorch's own functions are used.

``tests/test_per_sample_grads.py`` checks every variant against PyTorch's implementation, and
``tests/test_models.py`` checks the fused model's per-sample gradients against gradients computed
one sample at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

try:  # private PyTorch modules: see the module docstring
    from torch.nn.utils._expanded_weights import conv_expanded_weights as _torch_conv
    from torch.nn.utils._expanded_weights import group_norm_expanded_weights as _torch_group_norm
    from torch.nn.utils._expanded_weights.conv_utils import conv_backward as _torch_conv_backward
    from torch.nn.utils._expanded_weights.expanded_weights_impl import HANDLED_FUNCTIONS, ExpandedWeight
    from torch.nn.utils._expanded_weights.expanded_weights_utils import (
        set_grad_sample_if_exists,
        unpack_expanded_weight_or_tensor,
    )

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed PyTorch
    AVAILABLE = False


def _as_tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def conv_weight_grad_sample(x: torch.Tensor, grad_output: torch.Tensor, weight: torch.Tensor,
                            stride, padding, dilation, groups: int) -> torch.Tensor:
    """Per-sample weight gradients ``[B, *weight.shape]`` of ``conv{1,2,3}d(x, weight)``.

    ``x`` is the (already padded, for string padding) input ``[B, C, *spatial]``,
    ``grad_output`` the gradient of the convolution's output ``[B, O, *spatial_out]``; stride,
    padding and dilation as tuples of the spatial rank. One grouped weight-gradient call (the
    batch becomes groups), or for a 2-D single-channel input one batched matmul over its patches.
    """
    batch, out_channels = x.shape[0], weight.shape[0]
    if x.dim() == 4 and x.shape[1] == 1 and groups == 1 and tuple(dilation) == (1, 1):
        # One input channel (a grayscale image's first layer): groups of a single channel are slow
        # in the backend; the patches are few (kernel height x width per position), so take them as
        # strided views and contract them with the output gradient in one batched matmul.
        (pad_h, pad_w), (kernel_h, kernel_w) = padding, weight.shape[2:]
        patches = F.pad(x, (pad_w, pad_w, pad_h, pad_h)).unfold(2, kernel_h, stride[0]).unfold(3, kernel_w, stride[1])
        positions = patches.shape[2] * patches.shape[3]
        patches = patches.permute(0, 1, 4, 5, 2, 3).reshape(batch, kernel_h * kernel_w, positions)
        grad_weight = torch.bmm(grad_output.reshape(batch, out_channels, positions), patches.transpose(1, 2))
        return grad_weight.view(batch, *weight.shape)
    # The backend reads only the weight's shape here; the repeat is batch times the (small) kernel.
    weight_per_group = weight.unsqueeze(0).expand(batch, *weight.shape).reshape(batch * out_channels,
                                                                                *weight.shape[1:])
    grad_weight = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, batch * out_channels, *grad_output.shape[2:]),
        x.reshape(1, batch * x.shape[1], *x.shape[2:]),
        weight_per_group, None, stride, padding, dilation, False, [0] * len(stride), batch * groups,
        [False, True, False])[1]
    return grad_weight.view(batch, *weight.shape)


if AVAILABLE:

    class ConvPerSampleGrad(_torch_conv.ConvPerSampleGrad):
        """PyTorch's conv{1,2,3}d expanded-weights function with a grouped-convolution backward."""

        @staticmethod
        def backward(ctx, *grad_outputs):
            grad_output = grad_outputs[0]
            if ctx.was_same_padding or not hasattr(ctx, "input"):
                # String padding narrows the input gradient; no expanded weight: nothing to add.
                return _torch_conv_backward(ctx.conv_fn, ctx, grad_output)
            dims = grad_output.dim() - 2
            stride, padding, dilation = (_as_tuple(v, dims) for v in (ctx.stride, ctx.padding, ctx.dilation))
            weight = unpack_expanded_weight_or_tensor(ctx.weight)
            grad_input = None
            if ctx.input_required_grad:
                grad_input = torch.ops.aten.convolution_backward(
                    grad_output, ctx.input, weight, None, stride, padding, dilation, False, [0] * dims,
                    ctx.groups, [True, False, False])[0]
            set_grad_sample_if_exists(ctx.weight, lambda w: conv_weight_grad_sample(
                ctx.input, grad_output, w, stride, padding, dilation, ctx.groups))
            set_grad_sample_if_exists(ctx.bias, lambda _: grad_output.sum(dim=tuple(range(2, grad_output.dim()))))
            # kwarg names, conv function, input; then weight, bias, stride, padding, dilation, groups
            return (None, None, grad_input) + (None,) * 6

    class GroupNormPerSampleGrad(_torch_group_norm.GroupNormPerSampleGrad):
        """PyTorch's group-norm expanded-weights function; the backward is one folded kernel call."""

        @staticmethod
        def backward(ctx, grad_output):
            x, groups = ctx.input, ctx.num_groups
            batch, channels = x.shape[:2]
            folded = (1, batch * channels, x[0, 0].numel())
            weight = unpack_expanded_weight_or_tensor(ctx.weight)
            wants_weight, wants_bias = isinstance(ctx.weight, ExpandedWeight), hasattr(ctx, "bias")
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
                grad_output.contiguous().view(folded), x.contiguous().view(folded),
                ctx.mean.reshape(1, -1), ctx.rstd.reshape(1, -1),
                None if weight is None else weight.repeat(batch), 1, batch * channels, folded[2],
                batch * groups, (x.requires_grad, wants_weight, wants_bias))
            if wants_weight:
                set_grad_sample_if_exists(ctx.weight, lambda _: grad_weight.view(batch, channels))
            if wants_bias:
                set_grad_sample_if_exists(ctx.bias, lambda _: grad_bias.view(batch, channels))
            if grad_input is not None:
                grad_input = grad_input.view(x.shape)
            # kwarg names, function, input; then num_groups, weight, bias, eps
            return (None, None, grad_input) + (None,) * 4

    _FASTER = {F.conv1d: ConvPerSampleGrad, F.conv2d: ConvPerSampleGrad, F.conv3d: ConvPerSampleGrad,
               F.group_norm: GroupNormPerSampleGrad}


@contextlib.contextmanager
def faster_per_sample_grads() -> Iterator[None]:
    """Within the block, expanded-weights convolutions and group norms use this module's functions.

    Wrap the forward pass (the function is chosen when the layer is called); the backward may
    run after the block. Restores PyTorch's table on exit; a no-op where :data:`AVAILABLE` is False.
    """
    if not AVAILABLE:
        yield
        return
    saved = {fn: HANDLED_FUNCTIONS.get(fn) for fn in _FASTER}
    HANDLED_FUNCTIONS.update(_FASTER)
    try:
        yield
    finally:
        for fn, original in saved.items():
            if original is None:
                HANDLED_FUNCTIONS.pop(fn, None)
            else:
                HANDLED_FUNCTIONS[fn] = original


def expanded_weights_forward(module: nn.Module, batch_size: int, loss_reduction: str, *args, **kwargs):
    """``module(*args, **kwargs)`` with every trainable parameter an ``ExpandedWeight``, so the
    backward leaves per-sample gradients in ``p.grad_sample``; with the faster functions above.

    What ``torch.nn.utils._per_sample_grad.call_for_per_sample_grads`` does, with the parameters
    swapped in the modules' parameter tables directly instead of through ``functional_call``
    (about a third of the forward's DP overhead on the default model). A parameter used by two
    modules gets one ``ExpandedWeight``, whose per-sample gradients add up, as in PyTorch.
    """
    if not AVAILABLE:
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        return call_for_per_sample_grads(module, batch_size=batch_size, loss_reduction=loss_reduction)(
            *args, **kwargs)
    slots = [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items()
             if p is not None and p.requires_grad]
    for _, name, p in slots:
        if getattr(p, "grad_sample", None) is not None:
            raise RuntimeError(f"parameter {name!r} still holds per-sample gradients of an earlier batch; "
                               "clear them (optimizer.zero_grad) before the next forward")
    expanded: dict[int, ExpandedWeight] = {}
    try:
        for owner, name, p in slots:
            if id(p) not in expanded:
                expanded[id(p)] = ExpandedWeight(p, batch_size, loss_reduction)
            owner._parameters[name] = expanded[id(p)]
        with faster_per_sample_grads():
            return module(*args, **kwargs)
    finally:
        for owner, name, p in slots:
            owner._parameters[name] = p
