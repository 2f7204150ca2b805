"""Five declared modalities (image, volume, text, tabular, signal): every presence pattern, exact
per-sample gradients of the 3-D and 1-D encoders, zero gradients for absent modalities, several
images per patient pooled into one prediction and one clipped gradient, a study-shaped model."""

from __future__ import annotations

import itertools

import pytest
import torch
from opacus import GradSampleModule

from clinfuse.config import (
    ImageModality,
    ModelConfig,
    SignalModality,
    TabularModality,
    TextModality,
    VolumeModality,
)
from clinfuse.models import build_model, parameter_groups
from clinfuse.training.balance import AuxLossWeights, multimodal_loss
from clinfuse.training.dp_engine import DPEngine, ExpandedWeightsGradSampleModule, choose_grad_sample_mode
from tests.modelkit import TAB_COLUMNS

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Secure RNG turned off")

NAMES = ("chest", "ct", "note", "ehr", "ecg")
PATTERNS = [p for p in itertools.product((0, 1), repeat=5) if any(p)]
N_CLASSES = 2


def specs(chest_count=1):
    return (ImageModality(name="chest", kind="image", size=(12, 12), max_count=chest_count,
                          encoder={"name": "small_cnn", "channels": [4, 8]}),
            VolumeModality(name="ct", kind="volume", size=(4, 8, 8), encoder={"channels": [4, 8]}),
            TextModality(name="note", kind="text", max_tokens=8, hash_buckets=64),
            TabularModality(name="ehr", kind="tabular", columns=TAB_COLUMNS, encoder={"hidden": 8}),
            SignalModality(name="ecg", kind="signal", channels=2, sampling_rate=50, length=32,
                           encoder={"channels": [4, 8], "kernel_size": 5}))


def model_of(fusion="attention", chest_count=1, **kw):
    cfg = ModelConfig(dim=16, dropout=0.0, fusion={"name": fusion, "rank": 2, **kw})
    return build_model(specs(chest_count), cfg, n_classes=N_CLASSES)


def batch_of(mask_rows, *, seed=0, chest_count=1, filled=None):
    """A batch dict following the contract; absent inputs (and empty instance slots) are zeros."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(mask_rows, dtype=torch.float32)
    b = mask.shape[0]

    def keep(x, i):
        return x * mask[:, i].view(b, *([1] * (x.dim() - 1))).to(x.dtype)

    chest = torch.randn(b, chest_count, 1, 12, 12, generator=g) if chest_count > 1 else torch.randn(b, 1, 12, 12, generator=g)
    batch = {"chest": keep(chest, 0), "ct": keep(torch.randn(b, 1, 4, 8, 8, generator=g), 1),
             "note": keep(torch.randint(1, 64, (b, 8), generator=g), 2),
             "ehr": keep(torch.rand(b, 5, generator=g), 3), "ecg": keep(torch.randn(b, 2, 32, generator=g), 4),
             "mask": mask, "instances": {}, "label": torch.randint(0, N_CLASSES, (b,), generator=g)}
    if chest_count > 1:
        slots = filled if filled is not None else torch.ones(b, chest_count)
        slots = slots * mask[:, :1]
        batch["chest"] = batch["chest"] * slots.view(b, chest_count, 1, 1, 1)
        batch["instances"] = {"chest": slots}
    return batch


def rows(batch, s):
    out = {k: v[s] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["instances"] = {k: v[s] for k, v in batch["instances"].items()}
    return out


def loss_of(out, batch):
    return multimodal_loss(out, batch["label"], batch["mask"], AuxLossWeights(modalities=NAMES))[0]


def per_sample_vs_single(model, batch, mode):
    wrapped = (GradSampleModule(model, batch_first=True, loss_reduction="sum") if mode == "hooks"
               else ExpandedWeightsGradSampleModule(model, batch_first=True, loss_reduction="sum"))
    try:
        loss_of(wrapped(batch), batch).sum().backward()
        per_sample = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
        for i in range(batch["mask"].shape[0]):
            model.zero_grad(set_to_none=True)
            one = rows(batch, slice(i, i + 1))
            loss_of(model(one), one).sum().backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(per_sample[n][i], p.grad, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, n=n, i=i: f"{n}, sample {i}: {m}")
    finally:
        if mode == "hooks":
            wrapped._close()
        for p in model.parameters():
            p.grad_sample = None
    return per_sample


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention", "lowrank"])
def test_all_31_presence_patterns_forward_and_backward(fusion):
    torch.manual_seed(0)
    model = model_of(fusion)
    assert len(PATTERNS) == 31
    batch = batch_of(PATTERNS)
    out = model(batch)
    assert out["logits"].shape == (31, N_CLASSES) and list(out["aux"]) == list(NAMES)
    loss = loss_of(out, batch)
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # what sits in an absent slot does not change a prediction
    model.eval()
    with torch.no_grad():
        ref = model(batch)["logits"]
        noisy = dict(batch)
        for i, name in enumerate(NAMES):
            absent = (1 - batch["mask"][:, i]).view(-1, *([1] * (batch[name].dim() - 1)))
            noise = torch.full_like(batch[name], 3) if name == "note" else torch.randn_like(batch[name]) * 4
            noisy[name] = batch[name] + absent.to(batch[name].dtype) * noise
        torch.testing.assert_close(model(noisy)["logits"], ref)


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_volume_and_signal_per_sample_gradients_equal_one_at_a_time(mode):
    torch.manual_seed(1)
    model = model_of("attention", residual_aux=True)
    assert choose_grad_sample_mode(model, "auto") == "ew"  # the trainer's path: clinfuse's fast conv3d/conv1d
    patterns = [(1, 1, 1, 1, 1), (0, 1, 0, 1, 0), (1, 0, 1, 0, 1), (0, 0, 0, 1, 1), (1, 1, 0, 0, 0)]
    batch = batch_of(patterns, seed=2)
    per_sample = per_sample_vs_single(model, batch, mode)
    groups = parameter_groups(model)
    mask = batch["mask"]
    for i, name in enumerate(NAMES):
        absent = (mask[:, i] == 0).nonzero().flatten().tolist()
        present = (mask[:, i] == 1).nonzero().flatten().tolist()
        for param in groups[name]:  # exactly zero from a sample without the modality
            for s in absent:
                assert torch.count_nonzero(per_sample[param][s]) == 0, (param, s)
        encoder = [n for n in groups[name] if n.startswith(f"encoders.{name}.")]
        assert encoder and any(per_sample[n][present].abs().sum() > 0 for n in encoder), name


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_several_images_per_patient_one_prediction_and_one_clipped_gradient(mode):
    torch.manual_seed(3)
    model = model_of("attention", chest_count=3)
    assert "pools.chest.score.0.weight" in parameter_groups(model)["chest"]
    filled = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    batch = batch_of([(1, 1, 1, 1, 1), (1, 0, 1, 1, 0), (1, 1, 0, 1, 1), (0, 1, 1, 1, 1)], seed=4,
                     chest_count=3, filled=filled)
    out = model(batch)
    assert out["logits"].shape == (4, N_CLASSES)  # one prediction per patient
    per_sample = per_sample_vs_single(model, batch, mode)
    assert all(g.shape[0] == 4 for g in per_sample.values())  # one gradient per patient
    # an empty instance slot's content changes nothing; a patient without images gets no chest gradient
    model.eval()
    with torch.no_grad():
        moved = dict(batch, chest=batch["chest"] + (1 - filled).view(4, 3, 1, 1, 1) * 5.0)
        torch.testing.assert_close(model(moved)["logits"], model(batch)["logits"])
    for param in parameter_groups(model)["chest"]:
        assert torch.count_nonzero(per_sample[param][3]) == 0, param

    # Through the DP engine: per-patient gradients clipped to C, summed, scaled: one clipped gradient
    # per patient per step (no noise, so the update is exactly that).
    model.train()
    clip = 0.01
    engine = DPEngine(accountant="rdp")
    loader = torch.utils.data.DataLoader([0] * 4, batch_size=4)
    dp_model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD([p for p in model.parameters()], lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode)
    loss_of(dp_model(batch), batch).mean().backward()
    optimizer.pre_step()
    names = [n for n, _ in model.named_parameters()]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(4):
        norm = torch.sqrt(sum(per_sample[n][i].pow(2).sum() for n in names))
        for n in names:
            expected[n] += per_sample[n][i] * min(1.0, clip / (float(norm) + 1e-6))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n] / 4, atol=1e-7, rtol=1e-4, msg=n)
