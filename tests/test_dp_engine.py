"""DPEngine: flat-vector DP optimizer, empty-batch-safe expanded weights, grad-sample mode choice."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clinfuse.training import dp_engine
from clinfuse.training.balance import AuxLossWeights, multimodal_loss
from clinfuse.training.cpu_memory import keep_freed_memory_for_reuse
from clinfuse.training.dp_engine import (
    DPEngine,
    ExpandedWeightsGradSampleModule,
    FlatDPOptimizer,
    choose_grad_sample_mode,
)
from tests.modelkit import as_batch, random_data, tiny_model

MODALITIES = ("image", "text", "tabular")

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Secure RNG turned off",
                                        "ignore:Optimal order is the largest alpha")


def _private(engine, mode, *, noise=0.0, max_grad_norm=0.05, batch=12, seed=0, fusion="attention", lr=0.1):
    torch.manual_seed(seed)
    model = tiny_model(fusion)
    data = random_data(24, seed=3)
    loader = DataLoader(TensorDataset(*data), batch_size=batch)
    dp_model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
        noise_multiplier=noise, max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode)
    return model, dp_model, optimizer, data


def _train_steps(dp_model, optimizer, data, steps=2):
    for step in range(steps):
        rows = slice(12 * step, 12 * step + 12)
        batch = [t[rows] for t in data]
        out = dp_model(as_batch(*batch[:4]))
        multimodal_loss(out, batch[4], batch[3], AuxLossWeights(modalities=MODALITIES))[0].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("small_parameter", [2048, 64, 1])  # one shared block of small parameters, or none
@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_flat_optimizer_takes_the_same_clipped_steps_as_opacus(mode, small_parameter, monkeypatch):
    """Without noise the update is deterministic: it must equal Opacus' DPOptimizer's (hooks mode)."""
    monkeypatch.setattr(dp_engine, "SMALL_PARAMETER", small_parameter)
    reference, ref_dp, ref_opt, data = _private(PrivacyEngine(), "hooks")
    assert type(ref_opt) is DPOptimizer
    _train_steps(ref_dp, ref_opt, data)
    model, dp_model, optimizer, data = _private(DPEngine(), mode)
    assert isinstance(optimizer, FlatDPOptimizer)
    assert isinstance(dp_model, ExpandedWeightsGradSampleModule) == (mode == "ew")
    _train_steps(dp_model, optimizer, data)
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("small_parameter", [2048, 64])
def test_flat_optimizer_accumulates_over_skipped_steps(small_parameter, monkeypatch):
    """Virtual batches: a skipped step keeps the clipped sum, the next one adds to it."""
    monkeypatch.setattr(dp_engine, "SMALL_PARAMETER", small_parameter)
    ref, ref_dp, ref_opt, data = _private(PrivacyEngine(), "hooks")
    model, dp_model, optimizer, _ = _private(DPEngine(), "ew")
    for dp, opt in ((ref_dp, ref_opt), (dp_model, optimizer)):
        for step, skip in enumerate((True, False)):
            batch = [t[12 * step:12 * step + 12] for t in data]
            multimodal_loss(dp(as_batch(*batch[:4])), batch[4], batch[3], AuxLossWeights(modalities=MODALITIES))[0].mean().backward()
            opt.signal_skip_step(skip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    expected = ref.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_flat_optimizer_noise_has_the_mechanism_scale():
    """An empty batch leaves only noise: p.grad ~ N(0, (sigma C / expected batch)^2) per coordinate."""
    sigma, clip, batch = 2.0, 0.5, 12
    model, dp_model, optimizer, data = _private(DPEngine(), "ew", noise=sigma, max_grad_norm=clip, batch=batch)
    empty = [t[:0] for t in data]
    multimodal_loss(dp_model(as_batch(*empty[:4])), empty[4], empty[3], AuxLossWeights(modalities=MODALITIES))[0].sum().backward()
    optimizer.pre_step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected_std = sigma * clip / batch
    assert abs(float(grads.mean())) < 5 * expected_std / math.sqrt(grads.numel())
    assert float(grads.std()) == pytest.approx(expected_std, rel=0.1)


def test_expanded_weights_survive_empty_poisson_batches_and_count_every_step():
    torch.manual_seed(1)
    model = tiny_model("attention")
    loader = DataLoader(TensorDataset(*random_data(3, seed=6)), batch_size=1)
    engine = DPEngine(accountant="rdp")
    dp_model, optimizer, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode="ew")
    sizes = []
    for _ in range(6):
        for image, text, tabular, mask, label in dp_loader:
            sizes.append(len(label))
            before = model.head.weight.detach().clone()
            optimizer.zero_grad(set_to_none=True)  # before the forward, as in the trainer (ew needs it)
            per_sample, _ = multimodal_loss(dp_model(as_batch(image, text, tabular, mask)), label, mask, AuxLossWeights(modalities=MODALITIES))
            (per_sample.mean() if len(label) else per_sample.sum()).backward()
            optimizer.step()
            assert not torch.equal(before, model.head.weight)  # noise, even on an empty batch
            assert torch.isfinite(model.head.weight).all()
    assert 0 in sizes and max(sizes) > 0
    assert sum(steps for _, _, steps in engine.accountant.history) == len(sizes)


def test_expanded_weights_plain_forward_for_evaluation_after_a_step():
    model, dp_model, optimizer, data = _private(DPEngine(), "ew")
    out = dp_model(as_batch(*data[:4]))
    multimodal_loss(out, data[4], data[3], AuxLossWeights(modalities=MODALITIES))[0].mean().backward()
    optimizer.step()  # grad_sample stays set until zero_grad, as in the trainer
    dp_model.eval()
    with torch.no_grad():
        logits = dp_model(as_batch(*data[:4]))["logits"]
    torch.testing.assert_close(logits, model.eval()(as_batch(*data[:4]))["logits"])


class _BareParameterScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention", "lowrank"])
def test_auto_mode_picks_expanded_weights_for_every_fusion_model(fusion):
    assert choose_grad_sample_mode(tiny_model(fusion), "auto") == "ew"


def test_auto_mode_falls_back_to_hooks_and_explicit_modes_are_kept():
    model = nn.Sequential(nn.Linear(4, 4), _BareParameterScale())
    assert choose_grad_sample_mode(model, "auto") == "hooks"
    mixed = nn.Linear(4, 4)
    mixed.bias.requires_grad_(False)  # expanded weights refuse a trainable/frozen mix in one call
    assert choose_grad_sample_mode(mixed, "auto") == "hooks"
    frozen = tiny_model()
    for p in frozen.encoders["image"].parameters():
        p.requires_grad_(False)  # a frozen encoder is no obstacle
    assert choose_grad_sample_mode(frozen, "auto") == "ew"
    for mode in ("hooks", "ew", "functorch"):
        assert choose_grad_sample_mode(tiny_model(), mode) == mode


def test_allocator_tuning_is_idempotent():
    first = keep_freed_memory_for_reuse()
    assert isinstance(first, bool) and keep_freed_memory_for_reuse() == first
