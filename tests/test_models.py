"""Encoders and fusion model: shapes, missing modalities, Opacus per-sample gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from clinfuse.config import ImageEncoderConfig, TextEncoderConfig
from clinfuse.errors import InputError
from clinfuse.models import parameter_groups
from clinfuse.models.encoders.image import build_image_encoder
from clinfuse.models.encoders.text import (
    BatchFirstDPMultiheadAttention,
    HashedBagEncoder,
    TransformerTextEncoder,
    build_text_encoder,
    save_pretrained_text_encoder,
)
from clinfuse.training.balance import AuxLossWeights, multimodal_loss
from clinfuse.training.dp_engine import ExpandedWeightsGradSampleModule
from tests.modelkit import BUCKETS, SIZE, TAB_DIM, TEXT_LEN, as_batch, tiny_model

# Opacus' full backward hooks warn when no module input requires grad (true for our data inputs).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")

MODALITIES = ("image", "text", "tabular")
FUSIONS = ("concat", "gated", "attention", "lowrank")
PATTERNS = [p for p in itertools.product((0, 1), repeat=3) if any(p)]
N_CLASSES = 3


def weights(cfg=None):
    return AuxLossWeights(cfg, MODALITIES)


def small_model(fusion="attention", **kw):
    return tiny_model(fusion, n_classes=N_CLASSES, rank=3, **kw)


def make_batch(mask_rows, *, size=SIZE, tabular_dim=TAB_DIM, seed=0):
    """A batch following the batch contract: absent modalities are zero placeholders."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(mask_rows, dtype=torch.float32)
    b = mask.shape[0]
    image = torch.randn(b, 1, size, size, generator=g) * mask[:, 0, None, None, None]
    text = torch.randint(1, BUCKETS, (b, TEXT_LEN), generator=g)
    text[:, TEXT_LEN // 2:] = 0
    text = text * mask[:, 1:2].long()
    tabular = torch.rand(b, tabular_dim, generator=g) * mask[:, 2:3]
    label = torch.randint(0, N_CLASSES, (b,), generator=g)
    return image, text, tabular, mask, label


def per_sample_vs_single(model, batch, weights=None, atol=1e-5, mode="hooks"):
    """Per-sample grads from Opacus (``mode``: "hooks", GradSampleModule, or "ew", the expanded
    weights wrapper the trainer picks by default) against one plain backward per sample."""
    image, text, tabular, mask, label = batch
    if mode == "hooks":
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    else:
        wrapped = ExpandedWeightsGradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        out = wrapped(as_batch(image, text, tabular, mask))
        multimodal_loss(out, label, mask, weights)[0].sum().backward()
        per_sample = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad}
        for i in range(mask.shape[0]):
            model.zero_grad(set_to_none=True)
            s = slice(i, i + 1)
            out = model(as_batch(image[s], text[s], tabular[s], mask[s]))
            multimodal_loss(out, label[s], mask[s], weights)[0].sum().backward()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(per_sample[n][i], p.grad, atol=atol, rtol=1e-4,
                                               msg=lambda m, n=n, i=i: f"{n}, sample {i}: {m}")
    finally:
        if mode == "hooks":
            wrapped._close()
    return per_sample


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_modality_pattern_forward_backward(fusion):
    model = small_model(fusion)
    assert ModuleValidator.validate(model, strict=False) == []
    batch = make_batch(PATTERNS)
    image, text, tabular, mask, label = batch
    out = model(as_batch(image, text, tabular, mask))
    assert out["logits"].shape == (len(PATTERNS), N_CLASSES)
    assert set(out["aux"]) == set(MODALITIES)
    assert all(a.shape == (len(PATTERNS), N_CLASSES) for a in out["aux"].values())
    loss, _ = multimodal_loss(out, label, mask, weights())
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # Each pattern alone predicts, and what sits in an absent slot does not change the prediction.
    model.eval()
    for pattern in PATTERNS:
        image, text, tabular, mask, _ = make_batch([pattern] * 2, seed=1)
        ref = model(as_batch(image, text, tabular, mask))["logits"]
        assert torch.isfinite(ref).all()
        noisy = (image + (1 - mask[:, 0, None, None, None]) * 5.0,
                 torch.where(mask[:, 1:2] > 0, text, torch.full_like(text, 7)),
                 tabular + (1 - mask[:, 2:3]) * 3.0)
        torch.testing.assert_close(model(as_batch(*noisy, mask))["logits"], ref)


@pytest.mark.parametrize("mode", ["hooks", "ew"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_per_sample_gradients_match_single_sample_backward(fusion, mode):
    torch.manual_seed(0)
    model = small_model(fusion)
    batch = make_batch([(1, 1, 1), (0, 1, 1), (1, 0, 0), (1, 1, 0)])
    per_sample = per_sample_vs_single(model, batch, weights(), mode=mode)
    mask = batch[3]
    groups = parameter_groups(model)
    # An absent modality gets an exactly-zero per-sample gradient in its encoder and aux head.
    for i, m in enumerate(MODALITIES):
        absent = (mask[:, i] == 0).nonzero().flatten().tolist()
        present = (mask[:, i] == 1).nonzero().flatten().tolist()
        assert absent and present
        for name in groups[m]:
            for s in absent:
                assert torch.count_nonzero(per_sample[name][s]) == 0, (name, s)
        # A present modality does train its encoder (the test would pass vacuously otherwise).
        enc = [n for n in groups[m] if n.startswith(f"encoders.{m}.")]
        assert any(per_sample[n][present].abs().sum() > 0 for n in enc)
        # ... and its missing token gets nothing from samples where the modality is present.
        for s in present:
            assert torch.count_nonzero(per_sample[f"missing.{m}.weight"][s]) == 0


def test_transformer_text_encoder_under_grad_sample_module():
    torch.manual_seed(0)
    model = small_model("lowrank", text_encoder={"name": "transformer", "layers": 2, "heads": 2})
    assert ModuleValidator.validate(model, strict=False) == []
    batch = make_batch([(1, 1, 1), (1, 0, 1), (0, 1, 0)])
    per_sample = per_sample_vs_single(model, batch, weights())
    for name in parameter_groups(model)["text"]:
        assert torch.count_nonzero(per_sample[name][1]) == 0, name


@pytest.mark.parametrize("kind", ["bag-trainable", "bag-frozen", "transformer"])
def test_text_encoders_handle_all_padding_rows(kind):
    if kind == "transformer":
        enc = TransformerTextEncoder(BUCKETS, 16, TEXT_LEN)
    else:
        enc = HashedBagEncoder(BUCKETS, 16, trainable_embedding=kind == "bag-trainable", embedding_dim=32)
    ids = torch.randint(1, BUCKETS, (3, TEXT_LEN))
    ids[1] = 0
    ids[2, 3:] = 0
    out = enc(ids)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())
    # Dropping a token changes a row's features; a row's features do not depend on other rows.
    shorter = ids.clone()
    shorter[0, -1] = 0
    assert not torch.allclose(enc(shorter)[0], out[0])
    torch.testing.assert_close(enc(ids[2:3]), out[2:3].detach())


def test_frozen_hashed_bag_table_is_seeded_fixed_and_not_trained():
    """The default bag's table: same at every site (own seed, not the global RNG), never trained."""
    torch.manual_seed(1)
    a = small_model("attention")
    torch.manual_seed(2)
    b = small_model("attention")
    table = a.encoders["text"].table
    assert table.shape == (BUCKETS, 256) and torch.count_nonzero(table[0]) == 0
    torch.testing.assert_close(table, b.encoders["text"].table, rtol=0, atol=0)
    other = small_model("attention", text_encoder={"embedding_seed": 1})
    assert not torch.equal(table, other.encoders["text"].table)
    assert "encoders.text.table" in a.state_dict()  # travels with checkpoints
    assert all(".table" not in n and ".embed." not in n for n, _ in a.named_parameters())
    # Per-sample gradients exist for the Linear layers above the table, and match single-sample
    # ones; the table itself stays unchanged by a DP step.
    image, text, tabular, mask, label = make_batch([(1, 1, 1), (0, 1, 0), (1, 0, 1)])
    per_sample = per_sample_vs_single(a, (image, text, tabular, mask, label), weights())
    assert per_sample["encoders.text.proj.weight"][0].abs().sum() > 0
    assert torch.count_nonzero(per_sample["encoders.text.proj.weight"][2]) == 0
    # The trainable variant keeps its learned table as a parameter.
    trainable = small_model("attention", text_encoder={"trainable_embedding": True})
    assert "encoders.text.embed.weight" in dict(trainable.named_parameters())


def test_only_declared_modalities_exist():
    """A study without tabular fields has no tabular encoder, token, head or group."""
    from tests.modelkit import three_modalities

    image, text, _ = three_modalities()
    model = small_model("gated", modalities=(image, text))
    groups = parameter_groups(model)
    assert list(groups) == ["image", "text", "fusion"]
    assert not any("tabular" in n for n in model.state_dict())
    img, txt, _, mask, _ = make_batch([(1, 1, 0), (1, 0, 0)])
    out = model({"image": img, "text": txt, "mask": mask[:, :2], "instances": {}})
    assert list(out["aux"]) == ["image", "text"]
    with pytest.raises(ValueError, match="mask"):
        model({"image": img, "text": txt, "mask": mask, "instances": {}})


def test_parameter_groups_cover_every_parameter_once():
    model = small_model("attention")
    groups = parameter_groups(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for names_ in groups.values() for n in names_) == sorted(names)
    assert "aux_heads.image.weight" in groups["image"]
    assert "missing.text.weight" in groups["fusion"]
    assert all(n.startswith(("encoders.image.", "aux_heads.image.")) for n in groups["image"])
    assert all(n.startswith(("fusion.", "head.", "missing.")) for n in groups["fusion"])
    wrapped = GradSampleModule(model)
    try:
        wg = parameter_groups(wrapped)
        assert wg["text"] == ["_module." + n for n in groups["text"]]
    finally:
        wrapped._close()
    assert not any(k.startswith("_module.") for k in model.state_dict())


@pytest.mark.parametrize("name", ["densenet121", "resnet10", "resnet18"])
def test_monai_image_encoders_are_built_dp_valid(name):
    enc = build_image_encoder(ImageEncoderConfig(name=name), 16, (64, 64))
    ModuleValidator.validate(enc, strict=True)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    assert not any(getattr(m, "inplace", False) for m in enc.modules())


@pytest.mark.parametrize("name,size", [
    ("resnet10", 32),
    pytest.param("resnet18", 32, marks=pytest.mark.slow),
    pytest.param("densenet121", 32, marks=pytest.mark.slow),
])
def test_monai_image_encoders_give_per_sample_gradients(name, size):
    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(name=name), 16, (size, size))
    gsm = GradSampleModule(enc, batch_first=True, loss_reduction="sum")
    try:
        x = torch.randn(2, 1, size, size)
        x[1] = 0  # an absent image placeholder
        out = gsm(x)
        assert out.shape == (2, 16)
        (out * torch.tensor([[1.0], [0.0]])).sum().backward()
        for n, p in enc.named_parameters():
            assert p.grad_sample.shape[0] == 2, n
            assert torch.count_nonzero(p.grad_sample[1]) == 0, n
        assert any(p.grad_sample[0].abs().sum() > 0 for p in enc.parameters())
    finally:
        gsm._close()


def test_image_size_too_small_for_monai_backbone():
    with pytest.raises(InputError, match="at least 32x32"):
        build_image_encoder(ImageEncoderConfig(name="resnet10"), 16, (16, 16))


def test_image_pretrained_weights_load_and_mismatches_are_refused(tmp_path):
    cfg = ImageEncoderConfig(name="small_cnn", channels=[4, 8])
    src = build_image_encoder(cfg, 16)
    path = tmp_path / "cnn.pt"
    torch.save({"_module." + k: v for k, v in src.state_dict().items()}, path)
    loaded = build_image_encoder(cfg.model_copy(update={"pretrained": str(path)}), 16)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    # A different projection width is allowed: the head keeps its fresh initialisation.
    other = build_image_encoder(cfg.model_copy(update={"pretrained": str(path)}), 32)
    torch.testing.assert_close(other.state_dict()["features.0.weight"], src.state_dict()["features.0.weight"])

    with pytest.raises(InputError, match="not found") as err:
        build_image_encoder(cfg.model_copy(update={"pretrained": str(tmp_path / "nope.pt")}), 16)
    assert err.value.key == "model.image_encoder.pretrained"
    wrong = cfg.model_copy(update={"channels": [4, 8, 8], "pretrained": str(path)})
    with pytest.raises(InputError, match="missing keys"):
        build_image_encoder(wrong, 16)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        build_image_encoder(cfg.model_copy(update={"pretrained": str(tmp_path / "junk.pt")}), 16)


def test_pretrained_text_encoder_is_frozen_and_validated(tmp_path):
    torch.manual_seed(0)
    src = TransformerTextEncoder(BUCKETS, 8, TEXT_LEN, layers=1, heads=2)
    save_pretrained_text_encoder(src, tmp_path / "enc")
    text_cfg = TextEncoderConfig(name="pretrained", path=str(tmp_path / "enc"))
    model = small_model("concat", text_encoder=text_cfg)
    text_enc = model.encoders["text"]
    assert text_enc.frozen is True
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("encoders.text.encoder.") for n in frozen)
    assert parameter_groups(model, trainable_only=True)["text"] == [
        "encoders.text.proj.weight", "encoders.text.proj.bias", "aux_heads.text.weight", "aux_heads.text.bias"]
    ids = torch.randint(1, BUCKETS, (2, TEXT_LEN))
    torch.testing.assert_close(text_enc.embed(ids), src.eval()(ids))
    model.train()
    assert not text_enc.encoder.training
    per_sample_vs_single(model, make_batch([(1, 1, 1), (1, 0, 1)]), weights())

    with pytest.raises(InputError, match="hash buckets"):
        build_text_encoder(text_cfg, 16, buckets=128, text_len=TEXT_LEN)
    with pytest.raises(InputError, match="not found"):
        build_text_encoder(text_cfg.model_copy(update={"path": str(tmp_path / "x")}), 16,
                           buckets=BUCKETS, text_len=TEXT_LEN)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(InputError, match="HuggingFace"):
        build_text_encoder(text_cfg.model_copy(update={"path": str(hf)}), 16,
                           buckets=BUCKETS, text_len=TEXT_LEN)
    with pytest.raises(InputError, match="needs a local directory"):
        build_text_encoder(text_cfg.model_copy(update={"path": None}), 16,
                           buckets=BUCKETS, text_len=TEXT_LEN)


def test_transformer_heads_must_divide_dim():
    with pytest.raises(InputError) as err:
        small_model("concat", text_encoder={"name": "transformer", "heads": 3})
    assert err.value.key == "model.text_encoder.heads"


def test_demo_sized_model_builds_and_runs():
    from clinfuse.config import load_config
    from clinfuse.training.checkpoint import build_model_for

    model = build_model_for(load_config())  # the demo: dim 64, small_cnn [16, 32, 64], attention fusion
    out = model(as_batch(torch.zeros(2, 1, 64, 64), torch.zeros(2, 64, dtype=torch.long), torch.zeros(2, 11),
                         torch.tensor([[1.0, 0, 0], [0, 0, 1]])))
    assert out["logits"].shape == (2, 2)
    assert math.isfinite(float(out["logits"].detach().sum()))


def test_batch_first_dp_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    e, h = 16, 4
    ref = torch.nn.MultiheadAttention(e, h, batch_first=True)
    ours = BatchFirstDPMultiheadAttention(e, h)
    qw, kw, vw = ref.in_proj_weight.detach().chunk(3)
    qb, kb, vb = ref.in_proj_bias.detach().chunk(3)
    ours.load_state_dict({"qlinear.weight": qw, "qlinear.bias": qb, "klinear.weight": kw,
                          "klinear.bias": kb, "vlinear.weight": vw, "vlinear.bias": vb,
                          "out_proj.weight": ref.out_proj.weight.detach(),
                          "out_proj.bias": ref.out_proj.bias.detach()})
    x, kv = torch.randn(3, 5, e), torch.randn(3, 7, e)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    expected, _ = ref(x, kv, kv, key_padding_mask=pad)
    got, _ = ours(x, kv, kv, key_padding_mask=pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert set(ours.state_dict()) == {n for n, _ in ours.named_parameters()}


def test_state_dict_keys_are_the_parameter_names():
    model = small_model("attention", text_encoder={"name": "transformer"})
    names = {n for n, _ in model.named_parameters()}
    assert set(model.state_dict()) == names
    clone = small_model("attention", text_encoder={"name": "transformer"})
    clone.load_state_dict(model.state_dict())


@pytest.mark.parametrize("text_encoder", [{"name": "hashed_bag"},
                                          {"name": "hashed_bag", "trainable_embedding": True},
                                          {"name": "transformer"}])
def test_expanded_weights_mode_agrees_with_hooks(text_encoder):
    from clinfuse.config import AuxWeightsConfig

    torch.manual_seed(0)
    model = small_model("attention", text_encoder=text_encoder)
    learned = AuxLossWeights(AuxWeightsConfig(mode="uncertainty"), MODALITIES)
    model.attach_loss_weights(learned)
    image, text, tabular, mask, label = make_batch(PATTERNS)
    grads = []
    for wrapper in (GradSampleModule(model, loss_reduction="sum"),
                    ExpandedWeightsGradSampleModule(model, loss_reduction="sum")):
        out = wrapper(as_batch(image, text, tabular, mask))
        multimodal_loss(out, label, mask, learned)[0].sum().backward()
        grads.append({n: p.grad_sample.clone() for n, p in model.named_parameters()})
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        if isinstance(wrapper, GradSampleModule):
            wrapper._close()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_frozen_hashed_bag_round_trips_as_pretrained_directory(tmp_path):
    from clinfuse.models.encoders.text import load_pretrained_text_encoder

    src = HashedBagEncoder(BUCKETS, 16, trainable_embedding=False, embedding_dim=32, seed=3)
    save_pretrained_text_encoder(src, tmp_path / "enc")
    back = load_pretrained_text_encoder(tmp_path / "enc", buckets=BUCKETS, text_len=TEXT_LEN)
    assert (back.trainable_embedding, back.embedding_dim, back.seed) == (False, 32, 3)
    ids = torch.randint(0, BUCKETS, (3, TEXT_LEN))
    torch.testing.assert_close(back(ids), src(ids), rtol=0, atol=0)


def test_residual_aux_fusion_starts_as_product_of_experts_and_stays_dp_exact():
    model = small_model("attention", residual_aux=True).eval()
    batch = make_batch([(1, 0, 1), (0, 1, 0), (1, 1, 1)])
    image, text, tabular, mask, _ = batch
    with torch.no_grad():
        out = model(as_batch(image, text, tabular, mask))
    expected = sum(mask[:, i:i + 1] * out["aux"][m] for i, m in enumerate(MODALITIES))
    torch.testing.assert_close(out["logits"], expected)  # zero-initialised fusion head
    per_sample = per_sample_vs_single(model.train(), batch)
    for name, grads in per_sample.items():
        for i, m in enumerate(MODALITIES):
            if name.startswith(f"encoders.{m}."):
                for row in range(3):
                    if mask[row, i] == 0:
                        assert torch.count_nonzero(grads[row]) == 0, (name, row)
