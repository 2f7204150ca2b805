"""The DP training recipe in the plan, the linear head, and collapse detection (issue #12 items 2, 3, 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from clinfuse.cli import main
from clinfuse.config import config_from_dict
from clinfuse.privacy.accountant import compute_epsilon
from clinfuse.privacy.plan import PrivacyPlan, plan_privacy
from clinfuse.privacy.recipe import NOISE_RATIO_WARN, resolve_head


def _cfg(small_cfg, **sections):
    data = small_cfg.model_dump(mode="json")
    data["privacy"]["accountant"] = "rdp"
    for key in ("batch_size", "lr"):
        data["train"].pop(key, None)
    data["privacy"].pop("max_grad_norm", None)
    for section, values in sections.items():
        data[section].update(values)
    return config_from_dict(data, source="test")


def test_plan_is_deterministic_and_round_trips(small_cfg):
    cfg = _cfg(small_cfg, federation={"min_site_patients": 30})
    a = plan_privacy(cfg, 137, 5, rounds=5)
    b = plan_privacy(cfg, 137, 5, rounds=5)
    assert a.to_dict() == b.to_dict()
    assert PrivacyPlan.from_dict(a.to_dict()).to_dict() == a.to_dict()
    assert a.head == "linear" and a.optimizer == "sgd" and a.ema_decay > 0
    assert all(a.sources[k] == "plan" for k in ("lr", "optimizer", "momentum", "ema_decay", "batch_size",
                                                 "max_grad_norm", "head"))


def test_learning_rate_follows_the_noise(small_cfg):
    cfg = _cfg(small_cfg, federation={"min_site_patients": 30})
    loud = plan_privacy(cfg, 30, 5, rounds=5, tabulate=False)
    quiet = plan_privacy(_cfg(small_cfg, federation={"min_site_patients": 30}, privacy={"target_epsilon": 1.0}),
                         30, 5, rounds=5, tabulate=False)
    assert quiet.noise_multiplier > loud.noise_multiplier and quiet.lr < loud.lr


def test_user_settings_win(small_cfg):
    cfg = _cfg(small_cfg, federation={"min_site_patients": 30},
               train={"lr": 0.05, "batch_size": 8, "optimizer": "adam", "momentum": 0.5, "ema_decay": 0.0},
               privacy={"max_grad_norm": 0.5}, model={"head": "fusion"})
    plan = plan_privacy(cfg, 40, 3, tabulate=False)
    assert (plan.lr, plan.optimizer, plan.momentum, plan.ema_decay, plan.max_grad_norm) == (0.05, "adam", 0.5, 0.0, 0.5)
    assert plan.batch_size == 8 and plan.steps_per_epoch == 5 and plan.head == "fusion"
    assert all(plan.sources[k] == "config" for k in ("lr", "optimizer", "momentum", "ema_decay", "batch_size",
                                                      "max_grad_norm", "head"))


def test_tabulated_epsilon_equals_a_fresh_accountant(small_cfg):
    cfg = _cfg(small_cfg, federation={"min_site_patients": 30})
    plan = plan_privacy(cfg, 300, 4, rounds=4)
    assert plan.steps_per_epoch == 2  # the recipe's expected batch, not the old 32
    for k, eps in enumerate(plan.epsilon_table, start=1):
        fresh = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_epoch * k)],
                                plan.delta, mechanism="rdp")[0]
        assert eps == pytest.approx(fresh, abs=1e-6)
    assert plan.epsilon_table[-1] <= plan.target_epsilon


def test_head_auto_is_a_study_level_choice(small_cfg):
    assert resolve_head(_cfg(small_cfg)) == "fusion"  # nothing declared: the fusion model
    assert resolve_head(_cfg(small_cfg, federation={"min_site_patients": 100})) == "linear"
    assert resolve_head(_cfg(small_cfg, federation={"min_site_patients": 100}, privacy={"enabled": False})) == "linear"
    assert resolve_head(_cfg(small_cfg, federation={"min_site_patients": 20000})) == "fusion"
    assert resolve_head(_cfg(small_cfg, model={"head": "linear"})) == "linear"


# -- the linear head ---------------------------------------------------------------------------

def _batch(cfg, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in cfg.modalities:
        if spec.kind == "image":
            out[spec.name] = torch.randn(n, 1, *spec.size, generator=g)
        elif spec.kind == "text":
            out[spec.name] = torch.randint(0, spec.hash_buckets, (n, spec.max_tokens), generator=g)
        else:
            from clinfuse.data.tabular import tabular_dim

            out[spec.name] = torch.rand(n, tabular_dim(spec.columns), generator=g)
    mask = torch.ones(n, len(cfg.modalities))
    mask[0, 1] = 0.0  # one patient without a note
    out["mask"] = mask
    out["label"] = torch.arange(n) % 2
    return out


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_linear_head_per_sample_grads_equal_one_at_a_time(small_cfg, mode):
    from opacus import GradSampleModule

    from clinfuse.models.linear import build_linear_model
    from clinfuse.training.balance import AuxLossWeights, multimodal_loss
    from clinfuse.training.dp_engine import ExpandedWeightsGradSampleModule

    cfg = _cfg(small_cfg, model={"head": "linear"})
    torch.manual_seed(0)
    model = build_linear_model(cfg.modalities, n_classes=cfg.n_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    weights = AuxLossWeights(cfg.balance.aux_weights, cfg.modality_names)
    batch = _batch(cfg)

    def loss_of(m, b):
        return multimodal_loss(m(b), b["label"], b["mask"], weights)[0]

    expected = []
    for i in range(len(batch["label"])):
        model.zero_grad()
        loss_of(model, {k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
    wrapped = (GradSampleModule(model, loss_reduction="sum") if mode == "hooks"
               else ExpandedWeightsGradSampleModule(model, loss_reduction="sum"))
    loss_of(wrapped, batch).sum().backward()
    for name, p in model.named_parameters():
        for i, e in enumerate(expected):
            torch.testing.assert_close(p.grad_sample[i], e[name], atol=1e-6, rtol=1e-5)
    # the absent note gives an exactly-zero gradient in the note's weights
    assert torch.count_nonzero(dict(model.named_parameters())["encoders.text.weight"].grad_sample[0]) == 0


def test_linear_head_trains_under_dp(federation_cohort, small_cfg, tmp_path):
    from clinfuse.federation.site_runtime import SiteRuntime, state_to_numpy
    from clinfuse.training.checkpoint import build_model_for

    cfg = _cfg(small_cfg, federation={"min_site_patients": 20})
    site = SiteRuntime(cfg, federation_cohort / "site-0" / "manifest.csv", site_id="s0", state_dir=tmp_path / "s",
                       max_epsilon=100)
    model = build_model_for(cfg)
    assert type(model).__name__ == "LinearHeadModel"
    start = state_to_numpy(model.state_dict())
    result = site.train_round(start, server_round=1, rounds=3, local_epochs=1)
    assert not result.declined and result.metrics["epsilon"] > 0
    moved = sum(float(np.abs(result.state[k] - start[k]).sum()) for k in start)
    assert moved > 0
    assert site.plan(3, 1).head == "linear"


# -- the forecast and the warning --------------------------------------------------------------

def test_site_check_warns_a_site_too_small_for_its_epsilon(tmp_path, small_cfg, capsys):
    from clinfuse.data.synthetic import write_demo_cohort

    (manifest,) = write_demo_cohort(tmp_path / "cohort", sites=1, patients=30)
    data = _cfg(small_cfg, federation={"min_site_patients": 20, "rounds": 20},
                privacy={"target_epsilon": 0.5}).model_dump(mode="json")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    code = main(["site", "check", "--manifest", str(manifest), "--config", str(config),
                 "--state-dir", str(tmp_path / "state"), "--max-epsilon", "1"])
    out = capsys.readouterr().out
    assert "utility forecast" in out, out
    assert "too small for its epsilon" in out and "merge with another site" in out and "evaluation only" in out
    assert "[WARN] cap" in out, out
    assert code == 0  # a warning, not a failure

    # A big budget over few rounds: a forecast without the warning.
    data["privacy"]["target_epsilon"] = 50.0
    data["federation"]["rounds"] = 1
    config.write_text(yaml.safe_dump(data))
    main(["site", "check", "--manifest", str(manifest), "--config", str(config),
          "--state-dir", str(tmp_path / "state2"), "--max-epsilon", "60"])
    out = capsys.readouterr().out
    assert "utility forecast" in out and "too small" not in out, out


def test_forecast_threshold_is_the_noise_ratio(small_cfg):
    from clinfuse.privacy.recipe import forecast_lines

    plan = plan_privacy(_cfg(small_cfg, federation={"min_site_patients": 20}), 200, 1, tabulate=False)
    lines = forecast_lines(plan)
    assert (plan.noise_ratio > NOISE_RATIO_WARN) == any("WARNING" in line for line in lines)


# -- collapse ----------------------------------------------------------------------------------

def test_collapse_flags():
    from clinfuse.training.trainer import collapse_flags

    assert collapse_flags(math.log(2), 2, 2) == {"val_single_class": 0, "loss_at_chance": 1, "collapsed": 1}
    assert collapse_flags(0.3, 1, 2, 0.5) == {"val_single_class": 1, "loss_at_chance": 0, "collapsed": 1}
    assert collapse_flags(0.3, 1, 2)["collapsed"] == 0  # validation rows of one label: cannot tell
    assert collapse_flags(0.3, 2, 2, 0.5)["collapsed"] == 0
    assert collapse_flags(None, None, 2)["collapsed"] == 0
    # a model that ranks the validation rows well is slow, not collapsed
    assert collapse_flags(math.log(2), 1, 2, 0.8) == {"val_single_class": 1, "loss_at_chance": 1, "collapsed": 0}
    assert collapse_flags(math.log(2), 1, 2, 0.5)["collapsed"] == 1


def test_a_round_forced_to_one_class_is_flagged(federation_cohort, small_cfg, tmp_path, caplog):
    """A linear head whose bias says class 0 by a mile, trained with a negligible step, predicts one
    class on every validation row: the round's metrics say so, and a warning is logged."""
    from clinfuse.federation.protocol import train_metrics
    from clinfuse.federation.site_runtime import SiteRuntime, state_to_numpy
    from clinfuse.training.checkpoint import build_model_for

    cfg = _cfg(small_cfg, federation={"min_site_patients": 20}, train={"lr": 1e-12})
    def open_site(k):
        return SiteRuntime(cfg, federation_cohort / f"site-{k}" / "manifest.csv", site_id=f"s{k}",
                           state_dir=tmp_path / f"s{k}", max_epsilon=100)

    # a site whose validation rows hold both classes (one predicted class is then a sign)
    site = next(s for s in map(open_site, range(3))
                if len({int(s.val_set[i]["label"]) for i in range(len(s.val_set))}) == 2)
    model = build_model_for(cfg)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[20.0], [-20.0]]))
    result = site.train_round(state_to_numpy(model.state_dict()), server_round=1, rounds=2, local_epochs=1)
    assert result.metrics["val_single_class"] == 1 and result.metrics["collapsed"] == 1
    assert train_metrics(result)["collapsed"] == 1  # what the reply, and history.json, carry
    assert "collapsed" in caplog.text

    # An untrained (all-zero) linear head sits exactly at chance: flagged by its loss.
    zero = build_model_for(cfg)
    again = site.train_round(state_to_numpy(zero.state_dict()), server_round=2, rounds=2, local_epochs=1)
    assert again.metrics["loss_at_chance"] == 1 and again.metrics["collapsed"] == 1


def test_collapse_shows_in_the_round_line():
    from federated.rounds import format_round

    record = {"round": 1, "sites": {"a": {"status": "trained", "epsilon": 1.0, "collapsed": 1}}, "aggregated": True}
    assert "COLLAPSED" in format_round(record)
