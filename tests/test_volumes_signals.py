"""Volumes (DICOM series, multi-frame DICOM, NIfTI) and signals (WFDB, CSV, NPY): decoding, bad
input naming the file, manifests of the new kinds, and their cache."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from clinfuse.config import SignalModality, VolumeModality, config_from_dict
from clinfuse.data.dataset import MultimodalDataset
from clinfuse.data.manifest import read_manifest
from clinfuse.data.signals import check_signal, decode_signal, read_signal
from clinfuse.data.volumes import check_volume, decode_volume, read_volume
from clinfuse.errors import InputError
from tests.conftest import write_dicom, write_manifest

VOLUME = VolumeModality(name="ct", kind="volume", size=(4, 8, 8))
SIGNAL = SignalModality(name="ecg", kind="signal", channels=2, sampling_rate=100, length=300)


def write_series(folder, n=5, size=(12, 12), *, spacing=2.0, skip=(), sizes=None, seed=0):
    """A CT-like series: one slice per file, positions along z (``skip`` leaves slices out)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        if k in skip:
            continue
        shape = (sizes or {}).get(k, size)
        write_dicom(folder / f"s{k:02d}.dcm", rng.integers(0, 2000, shape) + 100 * k,
                    ImagePositionPatient=[0.0, 0.0, k * spacing], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    InstanceNumber=k + 1, SeriesInstanceUID="1.2.3.4", RescaleIntercept="-1024",
                    RescaleSlope="1")
    return folder


def test_series_folder_decodes_in_slice_order_in_hounsfield_units(tmp_path):
    folder = write_series(tmp_path / "ct")
    # file names out of order: the slice position decides
    (folder / "s00.dcm").rename(folder / "z-last-name.dcm")
    vol = read_volume(folder)
    assert vol.shape == (5, 12, 12) and vol.dtype == np.float32
    assert np.all(np.diff(vol.mean(axis=(1, 2))) > 50)  # +100 per slice, in order
    assert vol.min() >= -1024  # rescale intercept applied
    out = decode_volume(folder, VOLUME)
    assert out.shape == (1, 4, 8, 8) and abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-3
    assert check_volume(folder, phi=True) == []


def test_pydicom_ct_and_multiframe_files_decode_as_volumes():
    ct = get_testdata_file("CT_small.dcm", download=False)
    frames = get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)
    dose = get_testdata_file("rtdose.dcm", download=False)
    if ct is None or frames is None or dose is None:
        pytest.skip("pydicom's CT_small.dcm / SC_rgb_rle_2frame.dcm / rtdose.dcm are not installed")
    assert read_volume(ct).shape == (1, 128, 128)  # a single CT slice is a volume of depth 1
    check_volume(ct)
    multi = read_volume(frames)
    assert multi.shape == (2, 100, 100)  # both frames, as luma
    assert np.isfinite(multi).all() and multi.std() > 0
    assert decode_volume(frames, VOLUME).shape == (1, 4, 8, 8)
    # An RT dose grid has 3-D pixel data but is not an image to learn from, as for 2-D images.
    for fn in (check_volume, read_volume):
        with pytest.raises(InputError, match="not an image object") as err:
            fn(dose)
        assert "rtdose.dcm" in str(err.value)


def test_nifti_written_here_decodes(tmp_path):
    import nibabel as nib

    arr = np.zeros((10, 9, 6), dtype=np.float32)  # (i, j, k) voxel axes
    arr[:, :, 4] = 7.0
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(arr, affine=np.eye(4)), str(path))
    check_volume(path)
    vol = read_volume(path)
    assert vol.shape == (6, 9, 10)  # depth (k), rows (j), columns (i)
    assert vol[4].min() == 7.0 and vol[3].max() == 0.0
    assert decode_volume(path, VOLUME).shape == (1, 4, 8, 8)
    (tmp_path / "bad.nii").write_bytes(b"not nifti at all" * 30)
    with pytest.raises(InputError, match="NIfTI") as err:
        check_volume(tmp_path / "bad.nii")
    assert "bad.nii" in str(err.value)


@pytest.mark.parametrize("case,match,culprit", [
    ("mixed", "mixed slice sizes", "s03.dcm"),
    ("missing", "missing slice", "s03.dcm"),
    ("two-series", "more than one series", "s02.dcm"),
    ("foreign", "not a DICOM slice", "notes.txt"),
])
def test_bad_series_get_one_clear_error_naming_the_file(tmp_path, case, match, culprit):
    folder = tmp_path / case
    if case == "mixed":
        write_series(folder, sizes={3: (10, 12)})
    elif case == "missing":
        write_series(folder, n=6, skip=(2,))
    elif case == "two-series":
        write_series(folder)
        write_dicom(folder / "s02.dcm", np.ones((12, 12)), ImagePositionPatient=[0.0, 0.0, 4.0],
                    ImageOrientationPatient=[1, 0, 0, 0, 1, 0], SeriesInstanceUID="9.9.9")
    else:
        write_series(folder)
        (folder / "notes.txt").write_text("scanner notes")
    for fn in (check_volume, read_volume):
        with pytest.raises(InputError, match=match) as err:
            fn(folder)
        assert culprit in str(err.value)


def write_wfdb(folder, name, signal, fs, names=("I", "II")):
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * signal.shape[1], sig_name=list(names), p_signal=signal,
                fmt=["16"] * signal.shape[1], write_dir=str(folder))
    return folder / f"{name}.hea"


def test_wfdb_record_written_here_decodes_and_is_resampled(tmp_path):
    t = np.arange(400) / 200.0  # 2 s at 200 Hz
    sig = np.stack([np.sin(2 * np.pi * 2 * t), np.cos(2 * np.pi * 2 * t)], axis=1)
    hea = write_wfdb(tmp_path / "ecg", "rec1", sig, 200)
    check_signal(hea, SIGNAL)
    got = read_signal(hea, SIGNAL)
    assert got.shape == (2, 200)  # resampled to the declared 100 Hz
    np.testing.assert_allclose(got[0, 20:180], np.sin(2 * np.pi * 2 * np.arange(20, 180) / 100), atol=0.02)
    out = decode_signal(hea, SIGNAL)
    assert out.shape == (2, 300) and np.all(out[:, 200:] == 0)  # zero-padded to the declared length
    # the record name without the suffix works too; picking channels by name
    picked = SIGNAL.model_copy(update={"channel_names": ["II", "I"]})
    np.testing.assert_allclose(read_signal(tmp_path / "ecg" / "rec1", picked)[1], got[0], atol=1e-6)


def test_csv_and_npy_signals_and_wrong_channel_counts(tmp_path):
    arr = np.random.default_rng(0).normal(size=(120, 2)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_allclose(read_signal(tmp_path / "a.npy", SIGNAL), arr.T, rtol=1e-6)
    (tmp_path / "a.csv").write_text("I,II\n" + "\n".join(f"{x},{y}" for x, y in arr))
    np.testing.assert_allclose(read_signal(tmp_path / "a.csv", SIGNAL), arr.T, rtol=1e-5)
    np.save(tmp_path / "three.npy", np.zeros((50, 3)))
    np.save(tmp_path / "transposed.npy", np.zeros((2, 50)))
    hea = write_wfdb(tmp_path / "w", "three", np.zeros((50, 3)), 100, names=("I", "II", "III"))
    for bad, match in ((tmp_path / "three.npy", "3 channels, the study declares 2"),
                       (tmp_path / "transposed.npy", r"\[samples, channels\]"),
                       (hea, "3 channels, the study declares 2")):
        with pytest.raises(InputError, match=match) as err:
            check_signal(bad, SIGNAL)
        assert bad.name in str(err.value)
    with pytest.raises(InputError, match="lacks channel"):
        check_signal(hea, SIGNAL.model_copy(update={"channel_names": ["V1", "I"]}))


def study(tmp_path):
    return config_from_dict({
        "data": {"labels": ["negative", "positive"], "cache_dir": str(tmp_path / "cache")},
        "modalities": [VOLUME.model_dump(mode="json"), SIGNAL.model_dump(mode="json")]}, source="test")


def test_manifest_of_volumes_and_signals_bad_files_are_row_errors_and_decodes_are_cached(tmp_path):
    cfg = study(tmp_path)
    site = tmp_path / "site"
    write_series(site / "ct" / "p0")
    write_series(site / "ct" / "p1", n=6, skip=(3,))  # a missing slice: this row is skipped
    rng = np.random.default_rng(1)
    for k in range(3):
        np.save(site / f"e{k}.npy", rng.normal(size=(150, 2 if k != 2 else 4)))
    rows = [{"patient_id": "p0", "label": "negative", "ct": "ct/p0", "ecg": "e0.npy"},
            {"patient_id": "p1", "label": "positive", "ct": "ct/p1", "ecg": "e1.npy"},
            {"patient_id": "p2", "label": "positive", "ct": "", "ecg": "e2.npy"},
            {"patient_id": "p3", "label": "negative", "ct": "", "ecg": "e1.npy"}]
    data = read_manifest(write_manifest(site, rows, header=["patient_id", "label", "ct", "ecg"]), cfg)
    errors = {p.row: p for p in data.problems if p.severity == "error"}
    assert set(errors) == {2, 3}
    assert errors[2].column == "ct" and "missing slice" in errors[2].message and "s04.dcm" in errors[2].message
    assert errors[3].column == "ecg" and "4 channels" in errors[3].message and "e2.npy" in errors[3].message
    assert [r.patient_id for r in data.records] == ["p0", "p3"]
    ds = MultimodalDataset(data.records, cfg, cache_dir=tmp_path / "cache")
    item = ds[0]
    assert item["ct"].shape == (1, 4, 8, 8) and item["ecg"].shape == (2, 300)
    assert item["mask"].tolist() == [1.0, 1.0] and ds[1]["mask"].tolist() == [0.0, 1.0]
    ds.warm(progress=False)
    again = MultimodalDataset(data.records, cfg, cache_dir=tmp_path / "cache")
    again.warm(progress=False)
    assert again.caches["ct"].hits == 1 and again.caches["ecg"].hits == 2
    assert again.caches["ct"].misses == again.caches["ecg"].misses == 0
    # A changed slice changes the series' cache key.
    key = again.caches["ct"].key(site / "ct" / "p0")
    write_dicom(site / "ct" / "p0" / "s01.dcm", np.zeros((12, 12)), ImagePositionPatient=[0.0, 0.0, 2.0],
                ImageOrientationPatient=[1, 0, 0, 0, 1, 0], SeriesInstanceUID="1.2.3.4")
    assert MultimodalDataset(data.records, cfg, cache_dir=tmp_path / "cache").caches["ct"].key(
        site / "ct" / "p0") != key
