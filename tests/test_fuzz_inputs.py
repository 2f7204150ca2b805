"""Property-based: no manifest cell and no DICOM header value makes clinfuse raise anything but a clean error.

Random cells (paths, numbers, unicode, NaN, huge values, bytes that are not UTF-8) go into
manifests; random header values (NumberOfFrames, Rows/Columns, bits, sign, photometric
interpretation, transfer syntax, pixel data length) go into small DICOM files. Every reader must
either succeed or raise :class:`~clinfuse.errors.InputError`; ``clinfuse validate`` must exit 0
or 2, with one line on stderr and no traceback.
"""

from __future__ import annotations

import csv
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clinfuse.cli import main
from clinfuse.config import ImageConfig
from clinfuse.errors import InputError
from tests.conftest import HEADER, write_dicom, write_png

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---- manifest cells --------------------------------------------------------------------------------

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                    st.sampled_from(["NaN", "nan", "Infinity", "-inf", "1e999", "-1e-999", "0x10", "1_000",
                                     "9" * 400, " 37.5 ", "", "  "]))
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
paths = st.one_of(st.sampled_from(["good.dcm", "good.png", "missing.dcm", "../../../../etc/passwd", "/etc/passwd",
                                   "link.dcm", ".", "..", "folder", "a" * 300 + ".dcm", "good.dcm/x", "~/x.dcm",
                                   "IM0001", "note.txt", " good.png ", ""]), texts)
cells = st.fixed_dictionaries({
    "patient_id": st.one_of(st.sampled_from(["p1", "p2", "", "nan", "NULL"]), texts),
    "label": st.one_of(st.sampled_from(["negative", "positive", "0", "1.0", "", "maybe"]), texts, numbers),
    "image": paths,
    "note": st.one_of(texts, st.just("")),
    "age": numbers, "sex": st.one_of(st.sampled_from(["F", "M", "1", "1.0", ""]), texts),
    "temperature": numbers, "spo2": numbers, "wbc": numbers,
})
raw_bytes = st.binary(max_size=12)


def write_site(folder: Path) -> None:
    write_dicom(folder / "good.dcm", np.arange(64).reshape(8, 8))
    write_dicom(folder / "IM0001", np.arange(64).reshape(8, 8))
    write_png(folder / "good.png", size=8)
    (folder / "folder").mkdir()
    (folder / "note.txt").write_text("fever")
    (folder / "link.dcm").symlink_to("/etc/hostname")


@FAST
@given(rows=st.lists(cells, min_size=1, max_size=4), garbage=raw_bytes, where=st.integers(0, 10_000))
# found by this test: a row with one field more than the header made pandas take patient_id as the index
@example(rows=[{"patient_id": "p1", "image": "", "sex": "F", "note": "", "temperature": "0.0", "wbc": "0.0",
                "spo2": "0.0", "age": "0.0", "label": "negative"}], garbage=b",\x80", where=0)
def test_any_manifest_cells_give_a_clean_result(rows, garbage, where, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_site(folder)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
        data = buffer.getvalue().encode("utf-8")
        cut = len(data.split(b"\n", 1)[0]) + 1 + where % max(1, len(data))  # splice raw bytes after the header
        (folder / "manifest.csv").write_bytes(data[:cut] + garbage + data[cut:])
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a warning would be console noise
            code = main(["validate", str(folder / "manifest.csv"), "--json"])
        out, err = capsys.readouterr()
        assert code in (0, 2)
        assert "Traceback" not in out + err
        assert len(err.strip().splitlines()) == (0 if code == 0 else 1), err


# ---- DICOM header values ---------------------------------------------------------------------------

NATIVE = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]
ENCAPSULATED = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"]


def mostly(valid, *weird):
    """``valid`` two times in three, else one of the ``weird`` strategies."""
    return st.one_of(st.just(valid), st.just(valid), st.one_of(*weird))


header = st.fixed_dictionaries({
    "NumberOfFrames": mostly(None, st.integers(-3, 70_000).map(str),
                             st.sampled_from(["1", "1A", "", " 2", "1.5", "-0", "+3", "9" * 12])),
    "Rows": mostly(8, st.integers(0, 70_000)),
    "Columns": mostly(8, st.integers(0, 70_000)),
    "BitsAllocated": mostly(16, st.sampled_from([0, 1, 7, 8, 12, 32, 64, 99])),
    "BitsStored": mostly(16, st.sampled_from([0, 1, 8, 12, 40])),
    "PixelRepresentation": mostly(0, st.sampled_from([1, 2])),
    "SamplesPerPixel": mostly(1, st.sampled_from([0, 3, 5])),
    "PhotometricInterpretation": mostly("MONOCHROME2", st.sampled_from(
        ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "", "MONOCHROME3"]), texts),
    "transfer_syntax": mostly("1.2.840.10008.1.2.1", st.sampled_from(NATIVE + ENCAPSULATED + ["1.2.3.4.5"])),
    "pixel_bytes": mostly(128, st.sampled_from([0, 1, 63, 129, 512, 4096])),
    "RescaleSlope": mostly(None, st.sampled_from(["1", "2.5", "NaN", "inf", "1e400", "abc"])),
    "WindowWidth": mostly(None, st.sampled_from(["100", "0", "-5", "NaN"])),
})


# Placeholders written by pydicom, then overwritten in the file's bytes with the value under test
# (pydicom will not write an IS of '1A'): each as long as the element's maximum length.
_PLACEHOLDERS = {"NumberOfFrames": "777777777777", "RescaleSlope": "8888888888888888",
                 "WindowWidth": "6666666666666666", "PhotometricInterpretation": "QQQQQQQQQQQQQQQQ"}


def write_strange_dicom(path: Path, h: dict) -> Path:
    """A small DICOM with the header values ``h`` written as they are, however wrong."""
    from pydicom import dcmread, dcmwrite
    from pydicom.dataelem import DataElement
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    ts = h["transfer_syntax"]
    payload = bytes(range(256)) * (h["pixel_bytes"] // 256) + bytes(h["pixel_bytes"] % 256)
    ds = dcmread(write_dicom(path, np.zeros((8, 8))))
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel"):
        ds[keyword] = DataElement(ds[keyword].tag, "US", h[keyword] & 0xFFFF)
    ds.PhotometricInterpretation = _PLACEHOLDERS["PhotometricInterpretation"]
    for keyword in ("NumberOfFrames", "RescaleSlope", "WindowWidth"):
        if h[keyword] is not None:
            setattr(ds, keyword, _PLACEHOLDERS[keyword])
    if h["WindowWidth"] is not None:
        ds.WindowCenter = "50"
    encapsulated = ts in ENCAPSULATED
    ds.PixelData = encapsulate([payload or b"\xff\xd8"]) if encapsulated else payload
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown transfer syntax: pydicom warns, and writes it
        dcmwrite(path, ds, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=ts != ExplicitVRBigEndian,
                 enforce_file_format=False, force_encoding=True)
    data = path.read_bytes()
    for keyword, placeholder in _PLACEHOLDERS.items():
        value = h[keyword]
        if value is not None:
            raw = str(value).encode("latin-1", "replace")[:len(placeholder)].ljust(len(placeholder))
            data = data.replace(placeholder.encode(), raw)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def image_cfg():
    return ImageConfig(size=(8, 8))


@FAST
@given(h=header)
def test_any_dicom_header_values_give_a_clean_result(h, image_cfg):
    from clinfuse.data.images import check_image, decode_image, phi_fields, read_pixels

    with tempfile.TemporaryDirectory() as tmp:
        path = write_strange_dicom(Path(tmp) / "strange.dcm", h)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            for reader in (check_image, phi_fields):
                try:
                    reader(path)
                except InputError as exc:
                    assert exc.file == str(path)
            try:
                pixels = read_pixels(path)
            except InputError as exc:
                assert exc.file == str(path)
            else:
                assert pixels.ndim == 2 and np.isfinite(pixels).all()
                out = decode_image(path, image_cfg)  # what a pixel array that reads must also do
                assert out.shape == (1, 8, 8) and np.isfinite(out).all()
