"""Modality balancing: modality dropout, loss weights, per-group clipping, DP-SGD end to end."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from clinfuse.config import AuxWeightsConfig, ClipGroupsConfig
from clinfuse.models import parameter_groups
from clinfuse.training.balance import (
    AuxLossWeights,
    HeadLossMeter,
    ModalityDropout,
    clip_group_norms,
    modality_contributions,
    multimodal_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Secure RNG turned off",
                                        "ignore:Optimal order is the")

from tests.modelkit import as_batch, random_data, three_modalities, tiny_model

MODALITIES = ("image", "text", "tabular")
HEADS = ("main", *MODALITIES)


def rates(**kw):
    return {m: kw.get(m, 0.0) for m in MODALITIES}


# --- modality dropout ---------------------------------------------------------------------

def test_modality_dropout_never_empties_a_sample_and_never_adds_a_modality():
    drop = ModalityDropout(rates(image=0.9, text=0.9, tabular=0.9), MODALITIES)
    g = torch.Generator().manual_seed(0)
    patterns = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    mask = patterns.repeat(400, 1)
    out = drop(mask, generator=g)
    assert out.dtype == mask.dtype and out.shape == mask.shape
    assert (out.sum(1) >= 1).all()
    assert (out <= mask).all()
    # Something was dropped (the rates are high), and a single present modality is always kept.
    assert out.sum() < 0.6 * mask.sum()
    single = mask.sum(1) == 1
    assert torch.equal(out[single], mask[single])


def test_modality_dropout_rates_apply_per_modality():
    drop = ModalityDropout(rates(image=0.5, text=0.0, tabular=0.2), MODALITIES)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(20000, 3)
    out = drop(mask, generator=g)
    assert torch.equal(out[:, 1], mask[:, 1])  # rate 0 never drops
    assert abs(1 - out[:, 0].mean().item() - 0.5) < 0.02
    assert abs(1 - out[:, 2].mean().item() - 0.2) < 0.02


def test_modality_dropout_is_per_sample():
    """A sample's outcome must not depend on the other samples in the batch."""
    drop = ModalityDropout(rates(image=0.5, text=0.5, tabular=0.5), MODALITIES)
    first = torch.tensor([[1.0, 1.0, 1.0]])
    outcomes = []
    for others in ([[1, 1, 1]] * 7, [[0, 0, 1]] * 7, [[1, 0, 0], [0, 1, 0]] * 3 + [[1, 1, 1]]):
        mask = torch.cat([first, torch.tensor(others, dtype=torch.float32)])
        outcomes.append(drop(mask, generator=torch.Generator().manual_seed(3))[0])
    assert all(torch.equal(o, outcomes[0]) for o in outcomes)


def test_modality_dropout_disabled_is_identity():
    drop = ModalityDropout({}, MODALITIES)
    assert not drop.enabled
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert torch.equal(drop(mask), mask)


# --- losses and weights -------------------------------------------------------------------

def test_multimodal_loss_masks_absent_aux_losses():
    logits = torch.randn(3, 2)
    aux = {m: torch.randn(3, 2) for m in MODALITIES}
    label = torch.tensor([0, 1, 1])
    mask = torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0]])
    out = {"logits": logits, "aux": aux}
    ce = torch.nn.functional.cross_entropy

    loss, parts = multimodal_loss(out, label, mask, AuxLossWeights(AuxWeightsConfig(mode="fixed", weight=0.5), MODALITIES))
    expected = ce(logits, label, reduction="none")
    for i, m in enumerate(MODALITIES):
        expected = expected + 0.5 * mask[:, i] * ce(aux[m], label, reduction="none")
    torch.testing.assert_close(loss, expected)
    assert parts["text"][0] == 0 and parts["image"][1] == 0 and parts["tabular"][2] == 0
    assert parts["image"][0] > 0

    none_loss, _ = multimodal_loss(out, label, mask, AuxLossWeights(AuxWeightsConfig(mode="none"), MODALITIES))
    torch.testing.assert_close(none_loss, ce(logits, label, reduction="none"))
    torch.testing.assert_close(multimodal_loss(out, label, mask, None)[0], none_loss)


def test_aux_heads_stay_in_the_graph_with_zero_weight():
    # Without the residual, an aux head reaches the loss only through its (zero-weight) aux term.
    model = tiny_model("concat", residual_aux=False)
    image, text, tabular, mask, label = random_data(4)
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        out = gsm(as_batch(image, text, tabular, mask))
        loss, _ = multimodal_loss(out, label, mask, AuxLossWeights(AuxWeightsConfig(mode="none"), MODALITIES))
        loss.sum().backward()
        # The DP optimizer needs a per-sample gradient (zero here) for every trainable parameter.
        for m in MODALITIES:
            gs = model.aux_heads[m].weight.grad_sample
            assert gs is not None and torch.count_nonzero(gs) == 0
    finally:
        gsm._close()


def test_uncertainty_weights_get_per_sample_gradients():
    torch.manual_seed(0)
    model = tiny_model("lowrank")
    weights = AuxLossWeights(AuxWeightsConfig(mode="uncertainty"), MODALITIES)
    model.attach_loss_weights(weights)
    assert "loss_weights.log_vars.weight" in parameter_groups(model)["fusion"]
    with torch.no_grad():
        weights.log_vars.weight.copy_(torch.tensor([[0.3], [-0.2], [0.1], [0.5]]))
    image, text, tabular, mask, label = random_data(5, seed=2)
    mask[0] = torch.tensor([1.0, 0.0, 0.0])
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        out = gsm(as_batch(image, text, tabular, mask))
        assert out["log_vars"].shape == (5, 4)
        loss, parts = multimodal_loss(out, label, mask, weights)
        loss.sum().backward()
        gs = weights.log_vars.weight.grad_sample.view(5, 4)
    finally:
        gsm._close()
    s = weights.log_vars.weight.detach().view(4)
    # d/ds_k of present_k * (exp(-s_k) L_k + s_k / 2), sample by sample.
    present = torch.cat([torch.ones(5, 1), mask], dim=1)
    losses = torch.stack([parts[h] for h in HEADS], dim=1)
    expected = present * (-torch.exp(-s) * losses + 0.5)
    torch.testing.assert_close(gs, expected, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(gs[0, 2:]) == 0  # text and tabular absent for sample 0

    with pytest.raises(ValueError, match="attach"):
        multimodal_loss({k: v for k, v in out.items() if k != "log_vars"}, label, mask, weights)


def test_gblend_weights_follow_generalisation_over_overfitting():
    w = AuxLossWeights(AuxWeightsConfig(mode="gblend"), MODALITIES)
    assert w.current() == dict.fromkeys(HEADS, 1.0)
    train_before = {"main": 0.60, "image": 0.65, "text": 0.66, "tabular": 0.68}
    val_before = {"main": 0.65, "image": 0.68, "text": 0.69, "tabular": 0.69}
    train_after = {"main": 0.30, "image": 0.40, "text": 0.20, "tabular": 0.60}
    # Gain (val drop) / overfitting growth: main 0.15 / 0.15, image 0.13 / 0.12,
    # text 0.09 / 0.37; tabular gets worse on validation.
    val_after = {"main": 0.50, "image": 0.55, "text": 0.60, "tabular": 0.70}
    new = w.update_from_losses(train_before, val_before, train_after, val_after)
    assert math.isclose(sum(new.values()), len(HEADS))
    assert new["image"] > new["main"] > new["text"] > 0
    assert new["tabular"] == min(new.values()) > 0  # raised to the floor, not zero
    # A head with no validation samples (NaN) gets no weight.
    nan_val = dict(val_after, tabular=math.nan)
    assert w.update_from_losses(train_before, val_before, train_after, nan_val)["tabular"] == 0.0
    # No head improved: weights unchanged.
    before = w.current()
    assert w.update_from_losses(train_before, val_before, train_before, val_before) == before
    with pytest.raises(ValueError, match="gblend"):
        AuxLossWeights(AuxWeightsConfig(mode="fixed"), MODALITIES).update_from_losses({}, {}, {}, {})


def test_head_loss_meter_averages_aux_losses_over_present_samples():
    meter = HeadLossMeter(MODALITIES)
    parts = {"main": torch.tensor([1.0, 3.0]), "image": torch.tensor([2.0, 0.0]),
             "text": torch.tensor([0.0, 0.0]), "tabular": torch.tensor([1.0, 5.0])}
    meter.update(parts, torch.tensor([[1.0, 0, 1], [0, 0, 1]]))
    means = meter.means()
    assert means["main"] == 2.0 and means["image"] == 2.0 and means["tabular"] == 3.0
    assert math.isnan(means["text"])


# --- per-group clipping and contributions ---------------------------------------------------

def test_clip_group_norms_split_the_total_budget():
    model = tiny_model("gated")
    shares = ClipGroupsConfig(enabled=True, image=0.4, text=0.2, tabular=0.1, fusion=0.3)
    norms = clip_group_norms(model, 2.0, shares.shares(three_modalities()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(norms) == len(trainable)
    assert math.isclose(sum(x * x for x in norms), 4.0, rel_tol=1e-9)
    groups = parameter_groups(model)
    by_name = dict(zip(trainable, norms))
    for g, share in [("image", 0.4), ("text", 0.2), ("tabular", 0.1), ("fusion", 0.3)]:
        group_sq = sum(by_name[n] ** 2 for n in groups[g])
        assert math.isclose(group_sq, 4.0 * share, rel_tol=1e-9), g
        assert len({by_name[n] for n in groups[g]}) == 1  # split evenly inside a group
    # Shares are renormalised: only their ratios matter.
    doubled = clip_group_norms(model, 2.0, {"image": 0.8, "text": 0.4, "tabular": 0.2, "fusion": 0.6})
    assert doubled == pytest.approx(norms)


def test_modality_contributions_from_grad_and_grad_sample():
    model = tiny_model("concat")
    image, text, tabular, mask, label = random_data(4)
    mask[:, 2] = 0  # no tabular data: its group contributes nothing
    out = model(as_batch(image, text, tabular, mask))
    loss, _ = multimodal_loss(out, label, mask, AuxLossWeights(modalities=MODALITIES))
    loss.mean().backward()
    shares = modality_contributions(model)
    assert set(shares) == {"image", "text", "tabular", "fusion"}
    assert math.isclose(sum(shares.values()), 1.0)
    assert shares["tabular"] == 0.0 and shares["image"] > 0 and shares["text"] > 0
    model.zero_grad(set_to_none=True)
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        out = gsm(as_batch(image, text, tabular, mask))
        multimodal_loss(out, label, mask, AuxLossWeights(modalities=MODALITIES))[0].sum().backward()
        per_sample = modality_contributions(gsm)
    finally:
        gsm._close()
    assert math.isclose(sum(per_sample.values()), 1.0) and per_sample["tabular"] == 0.0


# --- DP-SGD end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_dp_sgd_end_to_end_with_poisson_sampling(clipping):
    torch.manual_seed(0)
    model = tiny_model("attention", dropout=0.1)
    weights = AuxLossWeights(AuxWeightsConfig(mode="uncertainty"), MODALITIES)
    model.attach_loss_weights(weights)
    data = TensorDataset(*random_data(48, seed=5))
    loader = DataLoader(data, batch_size=12)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    max_grad_norm = clip_group_norms(model, 1.0, ClipGroupsConfig().shares(three_modalities())) if clipping == "per_layer" else 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=max_grad_norm, clipping=clipping, poisson_sampling=True, grad_sample_mode="hooks")
    drop = ModalityDropout(rates(image=0.2, text=0.2, tabular=0.2), MODALITIES)
    steps = 0
    for image, text, tabular, mask, label in dp_loader:
        mask = drop(mask)
        out = dp_model(as_batch(image, text, tabular, mask))
        loss, _ = multimodal_loss(out, label, mask, weights)
        dp_opt.zero_grad()
        loss.mean().backward()
        dp_opt.step()
        steps += 1
    assert steps == 4
    eps = engine.get_epsilon(1e-5)
    assert math.isfinite(eps) and eps > 0
    after = model.state_dict()
    assert set(after) == set(before)  # no "_module." prefix in the inner model's keys
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "loss_weights.log_vars.weight" in changed and "fusion.attn.qlinear.weight" in changed
    assert len(changed) == len(params)  # noise reaches every trainable parameter


def test_dp_sgd_survives_empty_poisson_batches():
    """Poisson sampling yields empty batches now and then; a step must still add noise."""
    torch.manual_seed(1)
    model = tiny_model("lowrank")
    loader = DataLoader(TensorDataset(*random_data(3, seed=6)), batch_size=1)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.05), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    sizes = []
    for _ in range(6):
        for image, text, tabular, mask, label in dp_loader:
            sizes.append(len(label))
            before = model.head.weight.detach().clone()
            out = dp_model(as_batch(image, text, tabular, mask))
            loss, _ = multimodal_loss(out, label, mask, AuxLossWeights(modalities=MODALITIES))
            dp_opt.zero_grad()
            loss.mean().backward()  # NaN value on an empty batch, but a valid (empty) backward
            dp_opt.step()
            assert not torch.equal(before, model.head.weight)
            assert torch.isfinite(model.head.weight).all()
    assert 0 in sizes and max(sizes) > 0
