import numpy as np
import torch

from clinfuse.data.dataset import ImageCache, MultimodalDataset, PatientSampledDataset
from clinfuse.data.manifest import read_manifest
from clinfuse.data.tabular import tabular_dim


def test_items_follow_the_batch_contract(site, small_cfg, tmp_path):
    data = read_manifest(site, small_cfg)
    ds = MultimodalDataset(data.records, small_cfg, cache_dir=tmp_path / "cache")
    image, text, tab, mask, label = ds[3]  # row 4 has no image
    assert image.shape == (1, 32, 32) and not image.any() and mask[0] == 0
    image, text, tab, mask, label = ds[0]
    assert image.dtype == torch.float32 and text.dtype == torch.int64 and label.dtype == torch.int64
    assert tab.shape == (tabular_dim(small_cfg.data.tabular),)
    assert mask.tolist() == [1.0, 1.0, 1.0]
    assert torch.isfinite(image).all() and image.std() > 0


def test_cache_survives_new_process_and_rebuilds_corrupt_entries(site, small_cfg, tmp_path):
    records = read_manifest(site, small_cfg).records
    first = MultimodalDataset(records, small_cfg, cache_dir=tmp_path / "cache")
    first.warm(progress=False)
    assert first.cache.misses == 9 and first.cache.hits == 0
    # A new dataset object stands for a new process: everything comes from disk.
    second = MultimodalDataset(records, small_cfg, cache_dir=tmp_path / "cache")
    second.warm(progress=False)
    assert second.cache.hits == 9 and second.cache.misses == 0
    assert np.array_equal(first.image_array(0), second.image_array(0))
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
    record = next(r for r in read_manifest(site, small_cfg).records if r.image is not None)
    a = ImageCache(tmp_path, {"size": [32, 32]}).key(record.image)
    b = ImageCache(tmp_path, {"size": [64, 64]}).key(record.image)
    assert a != b


def test_patient_sampling_unit(tmp_path, small_cfg):
    from tests.conftest import good_rows, write_manifest

    rows = good_rows(tmp_path, 6)
    rows += [dict(r, note=f"follow-up {k}") for k in range(3) for r in rows[:2]]
    data = read_manifest(write_manifest(tmp_path, rows), small_cfg)
    ds = MultimodalDataset(data.records, small_cfg)
    patients = PatientSampledDataset(ds, seed=1)
    assert len(ds) == 12 and len(patients) == 6
    assert len(patients[0]) == 5
