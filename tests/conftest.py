"""Shared fixtures: tiny sites written as real files (PNG images, DICOM, notes, manifests)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clinfuse.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_clinfuse_logging():
    """Each test starts with the "clinfuse" logger unconfigured and leaves it as it found it: CLI
    calls run clinfuse.cli.configure_logging, and a level left at WARNING (``-q``) silences the
    progress lines later tests check."""
    logger = logging.getLogger("clinfuse")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    logger.setLevel(logging.NOTSET)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate


def write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """Write a minimal valid, de-identified MONOCHROME2 DICOM file (``tags`` set or override elements)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"  # a secondary capture must say so, or it may carry burned-in text
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, seed: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


HEADER = ["patient_id", "label", "image", "note", "age", "sex", "temperature", "spo2", "wbc"]


def good_rows(folder: Path, n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        image = ""
        if i % 4 != 3:
            name = f"img{i}.dcm" if i % 2 else f"img{i}.png"
            if i % 2:
                rng = np.random.default_rng(i)
                write_dicom(folder / name, rng.integers(0, 4000, (40, 40)))
            else:
                write_png(folder / name, seed=i)
            image = name
        rows.append({"patient_id": f"p{i:03d}", "label": "positive" if i % 3 == 0 else "negative",
                     "image": image, "note": "  " if i % 5 == 4 else f"cough and fever day {i}",
                     "age": str(30 + i), "sex": "F" if i % 2 else "M", "temperature": "37.5",
                     "spo2": "" if i % 6 == 5 else "95", "wbc": "7.2"})
    return rows


def write_manifest(folder: Path, rows: list[dict], name: str = "manifest.csv", header=None) -> Path:
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    header = header or HEADER
    path = folder / name
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def tiny_config(folder: Path, name: str = "study.yaml", **privacy) -> Path:
    """The demo config shrunk for tests: 32x32 images, batches of 8, the (fast) RDP accountant."""
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["data"]["image"]["size"] = [32, 32]
    data["data"]["text"]["max_tokens"] = 37
    data["train"]["batch_size"] = 8
    data["model"]["dim"] = 32
    data["privacy"].update({"accountant": "rdp", **privacy})
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def demo_cfg():
    return load_config(REPO / "configs" / "demo.yaml")


@pytest.fixture
def small_cfg(demo_cfg):
    """The demo config with tiny images, for fast tests."""
    data = demo_cfg.model_dump(mode="json")
    data["data"]["image"]["size"] = [32, 32]
    data["data"]["require_deidentified"] = False
    data["train"]["batch_size"] = 8
    return config_from_dict(data, source="small_cfg")


@pytest.fixture
def site(tmp_path):
    """A 12-row site with PNG and DICOM images, inline notes, tabular fields; returns the manifest."""
    folder = tmp_path / "site-a"
    folder.mkdir()
    return write_manifest(folder, good_rows(folder))


@pytest.fixture(scope="session")
def federation_cohort(tmp_path_factory) -> Path:
    """Root of the 3-site, 40-patient demo cohort (seed 0) the federation tests share; written once."""
    from clinfuse.data.synthetic import write_demo_cohort

    root = tmp_path_factory.mktemp("federation-cohort")
    write_demo_cohort(root, sites=3, patients=40, seed=0)
    return root


@pytest.fixture(scope="session")
def rich_cohort(tmp_path_factory) -> Path:
    """3 sites x 24 patients of the rich synthetic cohort; site 1 has no volumes, site 2 no signals."""
    from clinfuse.data.synthetic import write_demo_cohort

    root = tmp_path_factory.mktemp("rich-cohort")
    write_demo_cohort(root, sites=3, patients=24, seed=0, variant="rich")
    return root


def rich_config(folder: Path, **changes) -> Path:
    """configs/rich.yaml shrunk for tests (the RDP accountant is the fast one)."""
    data = yaml.safe_load((REPO / "configs" / "rich.yaml").read_text())
    sizes = {"chest": {"size": [32, 32]}, "ct": {"size": [8, 16, 16]}, "note": {"max_tokens": 37},
             "ecg": {"encoder": {"name": "cnn1d", "channels": [8, 8], "kernel_size": 5}}}
    for m in data["modalities"]:
        m.update(sizes.get(m["name"], {}))
    data["model"]["dim"] = 24
    data["train"]["batch_size"] = 8
    data["privacy"]["accountant"] = "rdp"
    for key, value in changes.items():
        data[key] = value
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
