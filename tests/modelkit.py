"""Small fusion models and batches for the model, balance and DP tests (the batch contract of
clinfuse.data.dataset, built from tensors)."""

from __future__ import annotations

import torch

from clinfuse.config import ImageModality, ModelConfig, TabularModality, TextModality
from clinfuse.models import build_model

BUCKETS, TEXT_LEN, SIZE = 64, 8, 16
# one numeric field (value, missing flag) and one categorical of two (one-hot, missing flag): width 5
TAB_COLUMNS = [{"name": "x", "type": "numeric", "min": 0, "max": 1},
               {"name": "c", "type": "categorical", "categories": ["a", "b"]}]
TAB_DIM = 5


def three_modalities(*, size=SIZE, image_encoder=None, text_encoder=None, tabular_hidden=8, image_count=1):
    """The three-slot study's modalities at test size: image, text, tabular."""
    return (ImageModality(name="image", kind="image", size=(size, size), max_count=image_count,
                          encoder=image_encoder or {"name": "small_cnn", "channels": [4, 8]}),
            TextModality(name="text", kind="text", max_tokens=TEXT_LEN, hash_buckets=BUCKETS,
                         encoder=text_encoder or {}),
            TabularModality(name="tabular", kind="tabular", columns=TAB_COLUMNS, encoder={"hidden": tabular_hidden}))


def tiny_model(fusion="attention", *, n_classes=2, dim=16, dropout=0.0, residual_aux=False, rank=2,
               modalities=None, **encoders):
    cfg = ModelConfig(dim=dim, dropout=dropout, fusion={"name": fusion, "rank": rank, "residual_aux": residual_aux})
    return build_model(modalities or three_modalities(**encoders), cfg, n_classes=n_classes)


def as_batch(image, text, tabular, mask, label=None) -> dict:
    """The three-slot tensors as a batch dict."""
    batch = {"image": image, "text": text, "tabular": tabular, "mask": mask, "instances": {}}
    if label is not None:
        batch["label"] = label
    return batch


def random_data(n, seed=0, n_classes=2):
    """``(image, text, tabular, mask, label)`` tensors of ``n`` samples with random patterns."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, 3, generator=g) < 0.7).float()
    mask[mask.sum(1) == 0, 0] = 1.0
    image = torch.randn(n, 1, SIZE, SIZE, generator=g) * mask[:, 0, None, None, None]
    text = torch.randint(1, BUCKETS, (n, TEXT_LEN), generator=g) * mask[:, 1:2].long()
    tabular = torch.rand(n, TAB_DIM, generator=g) * mask[:, 2:3]
    label = torch.randint(0, n_classes, (n,), generator=g)
    return image, text, tabular, mask, label
