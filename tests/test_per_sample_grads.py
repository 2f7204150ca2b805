"""clinfuse.training.per_sample_grads: the same per-sample gradients as PyTorch's expanded weights."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clinfuse.training import per_sample_grads
from clinfuse.training.dp_engine import ExpandedWeightsGradSampleModule
from clinfuse.training.per_sample_grads import faster_per_sample_grads

# PyTorch's private expanded weights: the reference the tests compare with.
_impl = pytest.importorskip("torch.nn.utils._expanded_weights.expanded_weights_impl")
ExpandedWeight, HANDLED_FUNCTIONS = _impl.ExpandedWeight, _impl.HANDLED_FUNCTIONS

pytestmark = [pytest.mark.skipif(not per_sample_grads.AVAILABLE, reason="PyTorch moved its expanded weights"),
              pytest.mark.filterwarnings("ignore:Full backward hook")]


def _gradients(layer: nn.Module, x: torch.Tensor, faster: bool, reduction: str = "mean"):
    """Input gradient and per-sample parameter gradients of a cubic loss through ``layer``."""
    for p in layer.parameters():
        p.grad_sample = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    params = {name: ExpandedWeight(p, len(x), reduction) for name, p in layer.named_parameters()}
    with faster_per_sample_grads() if faster else contextlib.nullcontext():
        out = functional_call(layer, params, (x,))
    (out ** 3).mean().backward()
    return ([x.grad] if x.requires_grad else []) + [p.grad_sample for p in layer.parameters()]


def _assert_same(expected, actual):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))


CONVS = [  # class, in, out, kernel, other arguments, input size
    (nn.Conv2d, 1, 6, 3, {"stride": 2, "padding": 1, "bias": False}, (16, 16)),  # single channel: patches
    (nn.Conv2d, 1, 4, (3, 5), {"stride": (2, 1), "padding": (1, 2)}, (9, 12)),
    (nn.Conv2d, 1, 3, 7, {"stride": 2, "padding": 3}, (20, 20)),
    (nn.Conv2d, 1, 3, 3, {"dilation": 2}, (9, 9)),
    (nn.Conv2d, 4, 6, 3, {"stride": 2, "padding": 1}, (9, 9)),
    (nn.Conv2d, 3, 5, (3, 4), {"stride": (1, 2), "padding": (2, 1)}, (8, 11)),
    (nn.Conv2d, 4, 6, 3, {"groups": 2, "dilation": 2, "padding": 2}, (10, 10)),
    (nn.Conv2d, 4, 4, 3, {"groups": 4, "padding": 1}, (7, 7)),
    (nn.Conv2d, 4, 5, 3, {"padding": "same"}, (7, 7)),
    (nn.Conv1d, 3, 5, 3, {"stride": 2, "padding": 1}, (20,)),
    (nn.Conv3d, 2, 3, 3, {"padding": 1}, (5, 6, 4)),
]


@pytest.mark.parametrize("batch", [3, 40])  # PyTorch switches its own method at batch 32
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("conv_class, in_channels, out_channels, kernel, kwargs, spatial", CONVS)
def test_convolution_per_sample_gradients_equal_pytorchs(conv_class, in_channels, out_channels, kernel, kwargs,
                                                         spatial, input_grad, batch):
    torch.manual_seed(0)
    layer = conv_class(in_channels, out_channels, kernel, **kwargs)
    x = torch.randn(batch, in_channels, *spatial).requires_grad_(input_grad)
    _assert_same(_gradients(layer, x, faster=False), _gradients(layer, x, faster=True))


GROUP_NORMS = [(8, 16, (12, 12), True), (4, 8, (5,), True), (2, 6, (3, 4, 5), True), (3, 6, (7, 7), False)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("groups, channels, spatial, affine, input_grad", [
    (*case, input_grad) for case in GROUP_NORMS for input_grad in (True, False)
    if case[-1] or input_grad])  # without affine parameters only the input has a gradient
def test_group_norm_per_sample_gradients_equal_pytorchs(groups, channels, spatial, affine, input_grad, reduction):
    torch.manual_seed(0)
    layer = nn.GroupNorm(groups, channels, affine=affine)
    if affine:
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
    x = (torch.randn(6, channels, *spatial) * 3 + 1).requires_grad_(input_grad)
    _assert_same(_gradients(layer, x, faster=False, reduction=reduction),
                 _gradients(layer, x, faster=True, reduction=reduction))


def test_faster_functions_are_used_only_inside_the_block():
    before = dict(HANDLED_FUNCTIONS)
    with faster_per_sample_grads():
        assert HANDLED_FUNCTIONS[F.conv2d] is per_sample_grads.ConvPerSampleGrad
        assert HANDLED_FUNCTIONS[F.group_norm] is per_sample_grads.GroupNormPerSampleGrad
    assert HANDLED_FUNCTIONS == before
    with pytest.raises(RuntimeError), faster_per_sample_grads():
        raise RuntimeError("the table is restored on errors too")
    assert HANDLED_FUNCTIONS == before


class _ImageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.head(F.relu(self.norm(self.conv(x))).mean((2, 3))), "batch": x.shape[0]}


@pytest.mark.parametrize("input_grad", [False, True])
def test_wrapper_mean_reduction_gives_pytorchs_per_sample_gradients(input_grad):
    """The wrapper scales the outputs' gradient instead of every per-sample gradient (mean loss);
    with an input that wants a gradient it keeps PyTorch's scaling, so that gradient is right too."""
    torch.manual_seed(0)
    model = _ImageNet()
    x = torch.randn(7, 1, 8, 8)
    labels = torch.randint(0, 2, (7,))

    def run(forward):
        for p in model.parameters():
            p.grad_sample = None
        xi = x.clone().requires_grad_(input_grad)
        out = forward(xi)
        F.cross_entropy(out["logits"], labels).backward()
        return ([xi.grad] if input_grad else []) + [p.grad_sample for p in model.parameters()]

    def pytorch(xi):
        params = {n: ExpandedWeight(p, len(xi), "mean") for n, p in model.named_parameters()}
        return functional_call(model, params, (xi,))

    wrapper = ExpandedWeightsGradSampleModule(model, loss_reduction="mean")
    _assert_same(run(pytorch), run(wrapper))


@pytest.mark.parametrize("encoder", ["small_cnn", "resnet10", "densenet121"])
def test_image_encoders_get_the_per_sample_gradients_of_opacus_hooks(encoder):
    """Whole MONAI backbones (strided, 1x1 and 7x7 convolutions, group norms, a single-channel stem):
    the wrapper's per-sample gradients equal those of Opacus' hooks, which use neither PyTorch's
    expanded weights nor this module."""
    from opacus import GradSampleModule

    from clinfuse.config import ImageEncoderConfig
    from clinfuse.models.encoders.image import build_image_encoder

    torch.manual_seed(0)
    net = build_image_encoder(ImageEncoderConfig(name=encoder), dim=8)
    x = torch.randn(3, 1, 32, 32)

    def per_sample(wrapped):
        for p in net.parameters():
            p.grad_sample = None
        wrapped(x).pow(2).sum(1).mean().backward()
        grads = {name: p.grad_sample.detach().clone() for name, p in net.named_parameters()}
        for p in net.parameters():
            p.grad_sample = None
            p.grad = None
        return grads

    hooked = GradSampleModule(net, loss_reduction="mean")
    expected = per_sample(hooked)
    hooked.remove_hooks()
    actual = per_sample(ExpandedWeightsGradSampleModule(net, loss_reduction="mean"))
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5 * float(value.abs().max()) + 1e-8,
                                   msg=name)
