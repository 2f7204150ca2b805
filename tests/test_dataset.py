import numpy as np
import torch

from clinfuse.config import config_from_dict
from clinfuse.data.dataset import ImageCache, MultimodalDataset, without_modalities
from clinfuse.data.manifest import read_manifest
from clinfuse.data.tabular import tabular_dim


def test_items_follow_the_batch_contract(site, small_cfg, tmp_path):
    data = read_manifest(site, small_cfg)
    ds = MultimodalDataset(data.records, small_cfg, cache_dir=tmp_path / "cache")
    item = ds[3]  # row 4 has no image
    assert set(item) == {"image", "text", "tabular", "mask", "instances", "label"}
    assert item["image"].shape == (1, 32, 32) and not item["image"].any() and item["mask"][0] == 0
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["text"].dtype == torch.int64
    assert item["label"].dtype == torch.int64 and item["instances"] == {}
    assert item["tabular"].shape == (tabular_dim(small_cfg.modality("tabular").columns),)
    assert item["mask"].tolist() == [1.0, 1.0, 1.0]
    assert torch.isfinite(item["image"]).all() and item["image"].std() > 0
    batch = ds.collate([ds[0], ds[3]])
    assert batch["image"].shape == (2, 1, 32, 32) and batch["mask"].shape == (2, 3)
    empty = ds.collate([])  # Poisson sampling draws empty batches
    assert empty["image"].shape == (0, 1, 32, 32) and empty["label"].shape == (0,)
    assert empty["text"].dtype == torch.int64 and empty["mask"].shape == (0, 3)
    # Removing a modality gives exactly what a patient without it gets.
    removed = without_modalities(ds[0], [0, 1, 1], small_cfg)
    assert removed["mask"].tolist() == [0.0, 1.0, 1.0] and not removed["image"].any()


def test_cache_survives_new_process_and_rebuilds_corrupt_entries(site, small_cfg, tmp_path):
    records = read_manifest(site, small_cfg).records
    first = MultimodalDataset(records, small_cfg, cache_dir=tmp_path / "cache")
    first.warm(progress=False)
    assert first.cache.misses == 9 and first.cache.hits == 0
    # A new dataset object stands for a new process: everything comes from disk.
    second = MultimodalDataset(records, small_cfg, cache_dir=tmp_path / "cache")
    second.warm(progress=False)
    assert second.cache.hits == 9 and second.cache.misses == 0
    path = records[0].inputs["image"][0]
    assert np.array_equal(first.decoded("image", path), second.decoded("image", path))
    # Corrupt one entry: it is detected, rebuilt and equal to the original decode.
    entries = sorted((tmp_path / "cache").rglob("*.npc"))
    entries[0].write_bytes(entries[0].read_bytes()[:-7] + b"garbage")
    third = MultimodalDataset(records, small_cfg, cache_dir=tmp_path / "cache")
    third.warm(progress=False)
    assert third.cache.rebuilt == 1 and third.cache.hits == 8
    fourth = MultimodalDataset(records, small_cfg, cache_dir=tmp_path / "cache")
    fourth.warm(progress=False)
    assert fourth.cache.hits == 9


def test_cache_key_depends_on_preprocessing(site, small_cfg, tmp_path):
    record = next(r for r in read_manifest(site, small_cfg).records if r.inputs["image"])
    a = ImageCache(tmp_path, {"size": [32, 32]}).key(record.inputs["image"][0])
    b = ImageCache(tmp_path, {"size": [64, 64]}).key(record.inputs["image"][0])
    assert a != b


def test_one_item_per_patient_rows_pooled(tmp_path, small_cfg):
    from tests.conftest import good_rows, write_manifest

    rows = good_rows(tmp_path, 6)
    rows += [dict(r, note=f"follow-up {k}") for k in range(3) for r in rows[:2]]
    data = read_manifest(write_manifest(tmp_path, rows), small_cfg)
    ds = MultimodalDataset(data.records, small_cfg)
    assert len(data.records) == 12 and len(ds) == 6  # the patient is the sample
    assert ds.samples[0].rows == (0, 6, 8, 10)
    # max_count 1: the first note is used, and validation counts the others
    assert ds.samples[0].inputs["text"] == [data.records[0].inputs["text"]]
    assert data.summary(small_cfg.data.labels)["unused_inputs"] == {"text": 6}


def test_several_images_per_patient_fill_instance_slots(tmp_path, small_cfg):
    from tests.conftest import good_rows, write_manifest, write_png

    raw = small_cfg.model_dump(mode="json")
    raw["data"].pop("image")
    raw["model"].pop("image_encoder")
    cfg = config_from_dict(raw | {"data": raw["data"], "model": raw["model"]})  # still three-slot
    mods = [m.model_dump(mode="json") for m in cfg.modalities]
    mods[0]["max_count"] = 3
    mods[0]["size"] = [32, 32]
    new = {k: v for k, v in raw.items() if k not in ("data", "model")}
    data_section = {k: v for k, v in raw["data"].items() if k not in ("tabular", "text")}
    model_section = {k: v for k, v in raw["model"].items() if not k.endswith("_encoder")}
    cfg3 = config_from_dict({**new, "data": data_section, "model": model_section, "modalities": mods})
    rows = good_rows(tmp_path, 4)
    for k in range(2):
        write_png(tmp_path / f"extra{k}.png", seed=50 + k)
    rows[0]["image"] = f"{rows[0]['image']};extra0.png"  # two in one cell ...
    rows.append(dict(rows[0], image="extra1.png"))        # ... and a third on another row
    data = read_manifest(write_manifest(tmp_path, rows), cfg3)
    ds = MultimodalDataset(data.records, cfg3)
    assert len(ds) == 4
    item = ds[0]
    assert item["image"].shape == (3, 1, 32, 32) and item["instances"]["image"].tolist() == [1, 1, 1]
    assert ds[3]["instances"]["image"].tolist() == [0, 0, 0] and ds[3]["mask"][0] == 0
    assert ds[1]["instances"]["image"].tolist() == [1, 0, 0]
    assert ds.collate([])["instances"]["image"].shape == (0, 3)
