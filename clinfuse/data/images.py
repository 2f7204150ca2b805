"""Decoding of DICOM, PNG and JPEG images into model-ready grayscale arrays.

Three entry points serve three callers:

* :func:`check_image` — a cheap, header-level check: the file exists, is what its name claims
  (or its content says), is an image object, carries pixel data that is complete and in a
  transfer syntax this installation can decode.
* :func:`read_pixels` — one 2-D float32 grayscale frame in the file's own intensity units
  (after the DICOM Modality LUT / rescale, the VOI LUT or window, and MONOCHROME1 inversion).
  It is the loader of the training transform, and what manifest validation runs on every row,
  so a file that validates is a file training can decode.
* :func:`decode_image` — the full MONAI dictionary pipeline (:func:`build_image_transform`):
  load, resize to ``ImageConfig.size`` and normalise each image on its own, giving float32
  ``[1, H, W]``. Its output is what the dataset caches.

:func:`phi_fields` lists identifying data (DICOM PS3.15 Annex E) in a file's header, and
burned-in text its kind makes likely, for ``data.require_deidentified``.

Every problem with a file raises :class:`clinfuse.errors.InputError` naming the file; pydicom
and Pillow exceptions, warnings and logged tracebacks never escape (:mod:`clinfuse.data.decoding`). Normalisation statistics come from the image alone, so no
statistic fitted on a site's data enters the model through this module.

MONAI is imported only when a transform is built: it costs seconds, and validation does not
need it.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydicom
import pydicom.datadict
import pydicom.tag
from PIL import Image, ImageOps
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, as_pixel_options, get_decoder
from pydicom.pixels.utils import get_expected_length, get_nr_frames
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from clinfuse.config import ImageConfig
from clinfuse.data.decoding import decoding, one_line
from clinfuse.errors import InputError

if TYPE_CHECKING:
    from monai.transforms import Compose

__all__ = [
    "IMAGE_SUFFIXES",
    "PHI_KEYWORDS",
    "build_image_transform",
    "check_image",
    "decode_image",
    "phi_fields",
    "read_pixels",
]

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
#: File name suffixes accepted in a manifest's ``image`` column (compared lower-cased). A file
#: with another or no suffix is still read as DICOM when it carries the Part 10 'DICM' marker.
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES

# MPO is how Pillow reports multi-picture JPEGs written by cameras; its first picture is a JPEG.
_RASTER_FORMATS = frozenset({"PNG", "JPEG", "MPO"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED_IMAGE_ELEMENTS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
_INSTALL_JPEG = "pip install 'clinfuse[jpeg]'"
# ITU-R BT.601 luma weights: the same grey that Pillow's convert("L") produces, kept in float.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_TEMPORAL = (
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "AdmittingDate", "AdmittingTime",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")
_CHARACTERISTICS = ("PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "Occupation")
_DEVICE = ("DeviceSerialNumber", "DetectorID", "GantryID", "PlateID", "CassetteID")

#: Header elements that identify a patient, a person involved in care, a device or an institution,
#: after DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile): names,
#: identifiers, birth data, addresses, phone numbers, free-text remarks and history, the dates and
#: times of the study, patient characteristics (age, size, weight), device serial numbers and
#: institution names. UIDs are not listed: the profile replaces them, but they identify no one
#: without the hospital's records. ``PatientSex`` is not listed either: it is a usual clinical input.
#: ``BurnedInAnnotation`` is reported when it says "YES": the identifiers are in the pixels (see
#: :func:`phi_fields` for images that are likely to carry burned-in text without saying so).
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "PatientInsurancePlanCodeSequence",
    "PatientComments",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "OperatorsName",
    "ResponsiblePerson",
    "ContentCreatorName",
    "VerifyingObserverName",
    "PersonName",
    "AdditionalPatientHistory",
    "ImageComments",
    "OperatorIdentificationSequence",
    "PersonIdentificationCodeSequence",
    "BurnedInAnnotation",
    *_TEMPORAL,
    *_CHARACTERISTICS,
    *_DEVICE,
)
_PHI_TAGS = {pydicom.datadict.tag_for_keyword(k): k for k in PHI_KEYWORDS}
# PS3.15 Annex E retention options (codes of DeidentificationMethodCodeSequence, scheme DCM) under
# which a de-identified file keeps these elements on purpose: they are then not reported.
_RETAINED_BY = {
    "113106": _TEMPORAL,  # Retain Longitudinal Temporal Information, Full Dates
    "113107": _TEMPORAL,  # ... Modified Dates (shifted)
    "113108": _CHARACTERISTICS,  # Retain Patient Characteristics
    "113109": (*_DEVICE, "StationName"),  # Retain Device Identity
    "113112": ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"),  # Institution Identity
}
_CLEAN_PIXEL_DATA = "113101"  # Clean Pixel Data Option: burned-in text was removed
# Images that usually carry burned-in text (patient name, hospital, date in the pixels) when
# they do not say otherwise: ultrasound, screen captures, photographs, scanned documents.
_BURNED_IN_MODALITIES = frozenset({"US", "IVUS", "ES", "XC", "GM", "OT", "DOC", "SC"})
_BURNED_IN_SOP_WORDS = ("Secondary Capture", "Ultrasound", "Video", "VL Photographic")

Frame = Literal["middle", "first", "last"] | int

#: Bump when what :func:`read_pixels` accepts or :func:`phi_fields` reports changes: stored
#: findings of earlier checks (a site's ``file-checks.json``) then no longer count.
CHECKS_VERSION = "1"


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def read_pixels(path: str | os.PathLike[str], *, frame: Frame = "middle",
                apply_voi_lut: bool = True) -> np.ndarray:
    """Read one image frame as a 2-D float32 grayscale array in the file's intensity units.

    Parameters
    ----------
    path:
        A DICOM file (``.dcm``/``.dicom``, or any file with the 'DICM' marker), or a PNG/JPEG.
    frame:
        For multi-frame DICOM: ``"middle"`` (index ``n // 2``), ``"first"``, ``"last"`` or a
        0-based index (negative counts from the end). Single-frame images, and PNG/JPEG, have one
        frame, which is used whatever ``frame`` says.
    apply_voi_lut:
        Apply the DICOM VOI LUT or window centre/width (the first one when several are given).

    Returns
    -------
    numpy.ndarray
        float32 ``[rows, columns]``, all finite. DICOM: stored values through the Modality LUT
        (or rescale slope/intercept), then the VOI LUT/window, then inverted when the image is
        MONOCHROME1 (or MONOCHROME2 with an INVERSE presentation LUT shape), so that bright
        always means high signal. Colour (RGB, YBR, PALETTE COLOR) becomes BT.601 luma.
        PNG/JPEG: modes L, I;16, I, F and 1 as stored; RGB/RGBA/P/LA/CMYK... as luma (alpha is
        dropped); EXIF orientation is applied.

    Raises
    ------
    InputError
        Missing or unreadable file, unsupported type, not really DICOM, no or truncated pixel
        data, a transfer syntax with no installed decoder, an out-of-range ``frame``, or pixel
        data that cannot be decoded.
    """
    p, head = _open(path)
    with decoding(p, "decode the image"):
        if _kind(p, head) == "raster":
            arr = _read_raster(p)
        else:
            arr = _read_dicom_pixels(p, head, frame=frame, voi=apply_voi_lut)
        if arr.ndim != 2 or arr.size == 0:
            raise InputError(f"decoded to an array of shape {arr.shape}, not one 2-D frame", file=p)
        if not np.isfinite(arr).all():
            raise InputError("pixel data contains NaN or infinite values", file=p)
        return np.ascontiguousarray(arr, dtype=np.float32)


def build_image_transform(image_cfg: ImageConfig) -> Compose:
    """Build the MONAI dictionary pipeline that turns ``{"image": path}`` into a model input.

    Steps, all on key ``"image"``: load ``read_pixels(path)`` as channel-first ``[1, h, w]``;
    resize to ``image_cfg.size`` (area averaging along axes that shrink, so no aliasing, then
    bilinear along axes that grow; aspect ratio is not kept); normalise this image alone —
    ``zscore`` with MONAI ``NormalizeIntensityd`` (a constant image becomes all zeros, never
    NaN) or ``minmax`` to [0, 1] with ``ScaleIntensityd`` (constant -> zeros); finally float32
    numpy.

    Note that MONAI's ``Compose`` wraps an exception raised inside a transform in a
    ``RuntimeError``; :func:`decode_image` unwraps it back to the :class:`InputError`.
    """
    if not isinstance(image_cfg, ImageConfig):
        raise TypeError(f"image_cfg must be a clinfuse.config.ImageConfig, not {type(image_cfg).__name__}")
    from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd, ScaleIntensityd

    load_cls, resize_cls = _monai_classes()
    key = "image"
    if image_cfg.normalize == "zscore":
        normalise = NormalizeIntensityd(keys=key, channel_wise=True)
    else:
        normalise = ScaleIntensityd(keys=key, minv=0.0, maxv=1.0)
    return Compose([
        load_cls(key, frame=image_cfg.frame, apply_voi_lut=image_cfg.apply_voi_lut),
        resize_cls(key, spatial_size=tuple(image_cfg.size)),
        normalise,
        EnsureTyped(keys=key, data_type="numpy", dtype=np.float32, track_meta=False),
    ])


def decode_image(path: str | os.PathLike[str], image_cfg: ImageConfig) -> np.ndarray:
    """Decode, resize and normalise one image file: float32 ``[1, H, W]``, H, W = ``image_cfg.size``.

    Runs :func:`build_image_transform` (built once per distinct ``image_cfg`` and reused).
    Raises :class:`InputError` for any problem with the file (see :func:`read_pixels`).
    """
    transform = _cached_transform(image_cfg)
    try:
        out = transform({"image": os.fspath(path)})["image"]
    except RuntimeError as exc:
        # MONAI re-raises every failure inside a transform as RuntimeError("applying transform").
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, InputError):
                raise cause from cause.__cause__
            cause = cause.__cause__
        raise
    return np.ascontiguousarray(out, dtype=np.float32)


def check_image(path: str | os.PathLike[str]) -> None:
    """Check cheaply that an image file can be decoded, without decoding DICOM pixel data.

    Checks that the file exists and is readable and has a supported type; for DICOM that it
    really is DICOM, has pixel data and the image elements (Rows, Columns...), that a decoder
    for its transfer syntax is installed, and that the pixel data is complete (native data: as
    long as Rows x Columns x frames x samples x bits needs and present in the file; encapsulated
    data: its end marker is present). For PNG/JPEG: Pillow's ``verify`` (PNG chunk checksums),
    plus a reduced-size decode of JPEGs, whose truncation ``verify`` does not see.

    Returns ``None``; raises :class:`InputError` naming the file on the first problem found.
    """
    p, head = _open(path)
    with decoding(p, "read the image"):
        if _kind(p, head) == "raster":
            _check_raster(p)
            return
        ds, truncated = _read_dicom(p, head, defer=True)
        ts = _transfer_syntax(ds)
        if ts.is_deflated:
            # Deferred offsets point into the inflated stream, not the file: read it whole instead.
            ds, truncated = _read_dicom(p, head, defer=False)
        _require_image_object(ds, p)
        keyword = _pixel_keyword(ds, p, truncated)
        _require_image_elements(ds, p)
        _require_decoder(ts, p)
        if ts.is_encapsulated:
            if truncated:
                raise InputError(
                    "DICOM file is truncated: the compressed pixel data ends before its end marker",
                    file=p)
            return
        elem = ds.get_item(keyword, keep_deferred=True)
        if elem.value is None and elem.value_tell is not None and not ts.is_deflated:
            present = max(0, min(elem.length, p.stat().st_size - elem.value_tell))
        else:
            present = len(ds[keyword].value or b"")
        _require_native_length(ds, p, present)


def phi_fields(path: str | os.PathLike[str]) -> list[str]:
    """Identifying data in a DICOM file (DICOM PS3.15 Annex E, Basic Application Level
    Confidentiality Profile): the :data:`PHI_KEYWORDS` that are filled in, and burned-in text.

    Reads the header only (stops before the pixel data). Elements nested in sequences count.
    Elements that the file's ``DeidentificationMethodCodeSequence`` declares as kept on purpose
    by a retention option of the profile (shifted dates under "Retain Longitudinal Temporal
    Information", age and weight under "Retain Patient Characteristics", device serial numbers
    under "Retain Device Identity", institution names under "Retain Institution Identity") are
    not reported.

    Burned-in text: ``"BurnedInAnnotation"`` when the file says "YES". A file that does not say
    "NO" is also reported (as ``"BurnedInAnnotation (...)"`` with the reason) when it is of a
    kind that usually carries text in its pixels: modality US, IVUS, ES, XC, GM, OT or DOC, or a
    Secondary Capture, ultrasound, video or VL photographic SOP class; unless it declares the
    profile's Clean Pixel Data option. This is a rule on the header, not OCR: a site confirms
    such images are clean by setting BurnedInAnnotation to "NO".

    Returns entries in file order without repeats, ``[]`` for PNG/JPEG and for files that are
    not DICOM (which :func:`check_image` reports). Raises :class:`InputError` when the file is
    missing or unreadable.
    """
    p, head = _open(path)
    try:
        if _kind(p, head) != "dicom":
            return []
    except InputError:
        return []
    with decoding(p, "read the DICOM header"):
        try:
            ds, _ = _read_dicom(p, head, header_only=True)
        except InputError:
            return []
        retained = _retention_options(ds)
        kept = {k for code in retained for k in _RETAINED_BY.get(code, ())}
        found: dict[str, None] = {}
        _collect_phi(ds, found, {t: k for t, k in _PHI_TAGS.items() if k not in kept})
        if "BurnedInAnnotation" not in found:
            reason = _burned_in_text_likely(ds, retained)
            if reason:
                found[f"BurnedInAnnotation ({reason})"] = None
        return list(found)


# --------------------------------------------------------------------------------------------
# file handling
# --------------------------------------------------------------------------------------------

def _open(path: str | os.PathLike[str]) -> tuple[Path, bytes]:
    """Resolve ``path`` and read the first 132 bytes (DICOM preamble + 'DICM' marker)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise InputError("image file not found", file=p)
    if p.is_dir():
        raise InputError("is a directory, not an image file", file=p)
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise InputError(f"cannot read image file: {exc.strerror or exc}", file=p) from exc
    return p, head


def _kind(p: Path, head: bytes) -> Literal["dicom", "raster"]:
    """DICOM or PNG/JPEG: by the 'DICM' marker, then the suffix; a file with another suffix or
    none (PACS exports often have none) by its content: PNG/JPEG magic bytes, or DICOM elements
    without the Part 10 preamble."""
    if head[128:132] == b"DICM":
        return "dicom"
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in RASTER_SUFFIXES or head.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        return "raster"
    try:
        _read_dicom(p, head, header_only=True)
        return "dicom"
    except InputError:
        pass
    raise InputError(
        f"unsupported image type '{suffix or '(no extension)'}'; supported: "
        f"{', '.join(sorted(IMAGE_SUFFIXES))} (or any DICOM file with the 'DICM' marker)", file=p)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def _sniff(head: bytes) -> str:
    if not head:
        return "the file is empty"
    if head.startswith(_PNG_MAGIC):
        return "it looks like a PNG image: rename it to .png"
    if head.startswith(_JPEG_MAGIC):
        return "it looks like a JPEG image: rename it to .jpg"
    return "no 'DICM' marker at byte 128 and no image elements found"


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

def _read_dicom(p: Path, head: bytes, *, defer: bool = False,
                header_only: bool = False) -> tuple[Dataset, bool]:
    """Read a DICOM dataset; with ``defer`` large values (pixel data) stay on disk, with
    ``header_only`` reading stops before the pixel data.

    Returns the dataset and whether pydicom met the end of the file inside an element (it then
    drops that element and only warns). Files without the Part 10 preamble are read with
    ``force`` and accepted only if they hold image elements, since ``force`` parses any bytes.
    """
    has_marker = head[128:132] == b"DICM"
    kwargs: dict[str, Any] = {"defer_size": "256 KB"} if defer else {}
    if header_only:
        kwargs["stop_before_pixels"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(p, force=not has_marker, **kwargs)
        except Exception as exc:
            if not has_marker:
                raise InputError(f"not a DICOM file ({_sniff(head)})", file=p) from exc
            raise InputError(f"cannot parse DICOM file (corrupt or truncated header): {one_line(exc)}",
                             file=p) from exc
    truncated = any("end of file" in str(w.message).lower() for w in caught)
    if not has_marker and not _looks_like_dicom(ds):
        raise InputError(f"not a DICOM file ({_sniff(head)})", file=p)
    return ds, truncated


def _looks_like_dicom(ds: Dataset) -> bool:
    """Whether a dataset read with ``force`` (no preamble) is DICOM rather than any bytes parsed
    as elements: it has image elements or a SOP Class UID that pydicom knows."""
    try:
        if "Rows" in ds or any(k in ds for k in _PIXEL_KEYWORDS):
            return True
        sop = ds.get("SOPClassUID")
        return bool(sop) and str(sop) in pydicom.uid.UID_dictionary
    except Exception:  # noqa: BLE001 - bytes that are not DICOM can fail any way when converted
        return False


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; files without file meta get the encoding they were read in."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(ts)
    implicit, little = ds.original_encoding
    if implicit:
        ts = ImplicitVRLittleEndian
    else:
        ts = ExplicitVRLittleEndian if little or little is None else ExplicitVRBigEndian
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _pixel_keyword(ds: Dataset, p: Path, truncated: bool) -> str:
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            return keyword
    if truncated:
        raise InputError("DICOM file is truncated: it ends inside its pixel data", file=p)
    sop = ds.get("SOPClassUID")
    what = f" (SOP class '{UID(sop).name}')" if sop else ""
    raise InputError(f"DICOM file has no pixel data{what}; is it an image object?", file=p)


def _require_image_object(ds: Dataset, p: Path) -> None:
    """Refuse DICOM objects that are not images although some carry pixel data: segmentations
    (1-bit masks), RT dose grids, structure sets, plans, reports, waveforms, presentation states.

    An object is an image when its SOP class is an "... Image Storage" (or "... Volume Storage")
    class; a SOP class pydicom does not know (private) is given the benefit of the doubt."""
    sop = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
    modality = str(ds.get("Modality", "") or "").strip().upper()
    name = UID(str(sop)).name if sop else ""
    known = bool(sop) and str(sop) in pydicom.uid.UID_dictionary
    if known and not ("Image Storage" in name or "Volume Storage" in name):
        raise InputError(f"not an image object (SOP class '{name}')", file=p)
    if modality in _NON_IMAGE_MODALITIES:
        what = f"SOP class '{name}', modality {modality}" if sop else f"modality {modality}"
        raise InputError(f"not an image object ({what})", file=p)


# Modality values of objects that are not images to learn from (PS3.3 C.7.3.1.1.1).
_NON_IMAGE_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO",
                                   "REG", "FID", "RWV", "ECG", "HD", "AU", "PLAN", "DOSE"})
# Allowed values of the integer image elements (PS3.3 C.7.6.3); pixel counts above the limit
# would make a decoder allocate gigabytes for one frame.
_ELEMENT_RANGES = {"Rows": (1, 65535), "Columns": (1, 65535), "SamplesPerPixel": (1, 4),
                   "BitsAllocated": (1, 64), "BitsStored": (1, 64), "HighBit": (0, 63),
                   "PixelRepresentation": (0, 1), "NumberOfFrames": (1, 1 << 20), "PlanarConfiguration": (0, 1)}
MAX_FRAME_PIXELS = 1 << 28
_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                          "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB",
                          "CMYK"})


def _int_element(ds: Dataset, keyword: str, p: Path) -> int | None:
    """An integer image element, checked against :data:`_ELEMENT_RANGES`; ``None`` when absent."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    # pydicom keeps a value it cannot convert (an IS of '1A') as the raw string.
    integral = ((isinstance(value, int) and not isinstance(value, bool))
                or (isinstance(value, float) and value.is_integer())
                or (isinstance(value, str) and value.strip().lstrip("+-").isdigit()))
    if not integral:
        raise InputError(f"DICOM element {keyword} is {str(value)!r}, not an integer", file=p)
    number = int(value)
    low, high = _ELEMENT_RANGES[keyword]
    if not low <= number <= high:
        raise InputError(f"DICOM element {keyword} is {number}, outside the allowed {low}..{high}", file=p)
    return number


def _require_image_elements(ds: Dataset, p: Path) -> None:
    missing = [k for k in _REQUIRED_IMAGE_ELEMENTS if ds.get(k) in (None, "")]
    if missing:
        raise InputError(f"DICOM file lacks required image element(s): {', '.join(missing)}", file=p)
    values = {k: _int_element(ds, k, p) for k in _ELEMENT_RANGES}
    if values["BitsStored"] is not None and values["BitsStored"] > values["BitsAllocated"]:
        raise InputError(f"DICOM element BitsStored ({values['BitsStored']}) exceeds BitsAllocated "
                         f"({values['BitsAllocated']})", file=p)
    if values["Rows"] * values["Columns"] > MAX_FRAME_PIXELS:
        raise InputError(f"DICOM image of {values['Rows']}x{values['Columns']} pixels is larger than "
                         f"clinfuse decodes ({MAX_FRAME_PIXELS} pixels per frame)", file=p)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in _PHOTOMETRIC:
        raise InputError(f"unsupported photometric interpretation {photometric!r}", file=p)


def _require_decoder(ts: UID, p: Path):
    """The pydicom decoder for ``ts``; InputError when none exists or none is installed."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InputError(
            f"pixel data in transfer syntax '{ts.name}' ({ts}) cannot be decoded by clinfuse; "
            "convert the file to an uncompressed or JPEG/JPEG 2000 transfer syntax", file=p) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin registered"
        raise InputError(
            f"no decoder is installed for transfer syntax '{ts.name}' ({ts}); install the JPEG extra "
            f"with: {_INSTALL_JPEG}  [pydicom plugins: {missing}]", file=p)
    return decoder


def _require_native_length(ds: Dataset, p: Path, present: int) -> None:
    try:
        expected = get_expected_length(ds, "bytes")
    except Exception as exc:
        raise InputError(f"DICOM image elements are inconsistent: {one_line(exc)}", file=p) from exc
    if present < expected:
        frames = get_nr_frames(ds, warn=False)
        raise InputError(
            f"DICOM pixel data is truncated: {present} bytes present, {expected} expected for "
            f"{frames} frame(s) of {ds.Rows}x{ds.Columns}x{ds.SamplesPerPixel} samples at "
            f"{ds.BitsAllocated} bits; the file is incomplete or its image elements are wrong", file=p)


def _frame_index(frame: Frame, n_frames: int, p: Path) -> int:
    if n_frames <= 1:
        return 0
    if frame == "middle":
        return n_frames // 2
    if frame == "first":
        return 0
    if frame == "last":
        return n_frames - 1
    if isinstance(frame, (int, np.integer)) and not isinstance(frame, bool):
        index = int(frame) + n_frames if frame < 0 else int(frame)
        if 0 <= index < n_frames:
            return index
        raise InputError(f"frame {frame} is out of range: the file has {n_frames} frames",
                         file=p, key="data.image.frame")
    raise InputError(f"frame must be 'middle', 'first', 'last' or an integer index, not {frame!r}",
                     key="data.image.frame")


def _use_frame_functional_groups(ds: Dataset, index: int) -> None:
    """Copy the rescale and window of frame ``index`` of an enhanced multi-frame object to the top
    level, where pydicom's LUT functions look (per-frame values override shared ones)."""
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for seq, keywords in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
                              ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
            items = group.get(seq)
            if items:
                for keyword in keywords:
                    if keyword in items[0]:
                        setattr(ds, keyword, items[0][keyword].value)


def _read_dicom_pixels(p: Path, head: bytes, *, frame: Frame, voi: bool) -> np.ndarray:
    with warnings.catch_warnings():
        # pydicom warns per file about benign header oddities; in a data loader that is noise.
        warnings.simplefilter("ignore")
        ds, truncated = _read_dicom(p, head, defer=False)
        _require_image_object(ds, p)
        keyword = _pixel_keyword(ds, p, truncated)
        _require_image_elements(ds, p)
        ts = _transfer_syntax(ds)
        decoder = _require_decoder(ts, p)
        if not ts.is_encapsulated:
            _require_native_length(ds, p, len(ds[keyword].value or b""))
        elif truncated:
            raise InputError("DICOM file is truncated: the compressed pixel data ends before its end marker",
                             file=p)
        index = _frame_index(frame, get_nr_frames(ds, warn=False), p)
        try:
            arr, props = decoder.as_array(ds, index=index, validate=True, raw=False, **as_pixel_options(ds))
        except Exception as exc:
            raise InputError(f"cannot decode pixel data in transfer syntax '{ts.name}' ({ts}): "
                             f"{one_line(exc)}", file=p) from exc
        photometric = str(props.get("photometric_interpretation", ds.PhotometricInterpretation)).upper()
        try:
            return _dicom_to_gray(arr, ds, photometric, index, voi)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot apply the DICOM LUTs ({photometric}): {one_line(exc)}", file=p) from exc


def _dicom_to_gray(arr: np.ndarray, ds: Dataset, photometric: str, index: int, voi: bool) -> np.ndarray:
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        _use_frame_functional_groups(ds, index)
        out = apply_modality_lut(arr, ds)
        if voi:
            out = apply_voi_lut(out, ds)
        out = np.asarray(out, dtype=np.float64)
        shape = str(ds.get("PresentationLUTShape", "")).upper()
        if photometric == "MONOCHROME1" or shape == "INVERSE":
            # Reflect within the image's own range: bright means high signal, values stay positive.
            out = (out.min() + out.max()) - out
        return out
    if photometric == "PALETTE COLOR":
        return _luma(apply_color_lut(arr, ds))
    if photometric == "RGB":
        return _luma(arr)
    if photometric.startswith("YBR") and arr.ndim == 3:
        # Still in a YCbCr space pydicom does not convert: Y already is the luma.
        return np.asarray(arr[..., 0], dtype=np.float64)
    raise InputError(f"unsupported photometric interpretation '{photometric}'", file=ds.filename)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb[..., :3], dtype=np.float64) @ _LUMA


def _collect_phi(ds: Dataset, found: dict[str, None], tags: dict[int, str]) -> None:
    """Add to ``found`` the keywords of ``tags`` filled in ``ds`` and its sequences, in tag order.

    Only PHI elements and sequences are converted from their raw form: converting every element
    (as ``Dataset.iterall`` does) made this ten times slower than reading the header.
    """
    for tag in sorted(ds.keys()):  # tags, not elements: iterating a Dataset converts them all
        keyword = tags.get(tag)
        if keyword is None and not _is_sequence_tag(tag):
            continue
        elem = ds[tag]
        if keyword is not None and keyword not in found and _is_identifying(elem):
            found[keyword] = None
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                _collect_phi(item, found, tags)


def _retention_options(ds: Dataset) -> set[str]:
    """PS3.15 Annex E option codes (scheme DCM) the file's DeidentificationMethodCodeSequence declares."""
    codes = set()
    for item in ds.get("DeidentificationMethodCodeSequence") or ():
        if str(item.get("CodingSchemeDesignator", "")).strip() == "DCM":
            codes.add(str(item.get("CodeValue", "")).strip())
    return codes


def _burned_in_text_likely(ds: Dataset, retained: set[str]) -> str | None:
    """Why this image probably has text in its pixels, or ``None`` (see :func:`phi_fields`)."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "NO" or _CLEAN_PIXEL_DATA in retained:
        return None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop = ds.get("SOPClassUID")
    sop_name = UID(str(sop)).name if sop else ""
    if modality in _BURNED_IN_MODALITIES:
        kind = f"a {modality} image"
    elif any(word in sop_name for word in _BURNED_IN_SOP_WORDS):
        kind = f"a {sop_name} object"
    else:
        return None
    return (f"not 'NO' on {kind}, a kind that usually carries burned-in text; set it to NO once "
            "the pixels are checked")


@functools.cache
def _is_sequence_tag(tag: int) -> bool:
    tag = pydicom.tag.Tag(tag)
    if tag.is_private:
        return False
    try:
        return pydicom.datadict.dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _is_identifying(elem) -> bool:
    if elem.keyword == "BurnedInAnnotation":
        return str(elem.value).strip().upper() == "YES"
    value = elem.value
    if value is None:
        return False
    if elem.VR == "SQ":
        return len(value) > 0
    if isinstance(value, (bytes, bytearray)):
        return bool(value.strip(b"\x00 "))
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return any(str(v).strip(" ^=\x00") for v in value)
    # PersonName renders empty components as '^' and '='.
    return bool(str(value).strip(" ^=\x00"))


# --------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------

def _open_raster(p: Path) -> Image.Image:
    img = Image.open(p)
    if img.format not in _RASTER_FORMATS:
        fmt = img.format
        img.close()
        raise InputError(f"unsupported image format {fmt}; supported: PNG and JPEG", file=p)
    return img


def _read_raster(p: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_raster(p) as img:
                img = ImageOps.exif_transpose(img)
                mode = img.mode
                if mode in ("L", "I", "F", "1") or mode.startswith("I;16"):
                    return np.asarray(img, dtype=np.float64)
                if mode == "LA":
                    return np.asarray(img.getchannel("L"), dtype=np.float64)
                if mode not in ("RGB", "RGBA", "RGBX"):
                    img = img.convert("RGB")  # P, PA, CMYK, YCbCr, LAB, HSV...
                return _luma(np.asarray(img))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not a readable PNG/JPEG image: {one_line(exc)}", file=p) from exc


def _check_raster(p: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_raster(p) as img:
                fmt = img.format
                img.verify()
            if fmt in ("JPEG", "MPO"):
                # verify() does not read JPEG scans; a 1/8-scale decode does, cheaply.
                with Image.open(p) as img:
                    img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not a readable PNG/JPEG image: {one_line(exc)}", file=p) from exc


# --------------------------------------------------------------------------------------------
# MONAI transforms (built lazily: importing MONAI costs seconds)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _cached_transform(image_cfg: ImageConfig) -> Compose:
    return build_image_transform(image_cfg)


@functools.cache
def _monai_classes():
    from monai.transforms import MapTransform, Resize

    class LoadPixelsd(MapTransform):
        """Replace each path under ``keys`` by ``read_pixels(path)[None]``: float32 ``[1, h, w]``."""

        def __init__(self, keys, *, frame: Frame = "middle", apply_voi_lut: bool = True,
                     allow_missing_keys: bool = False):
            super().__init__(keys, allow_missing_keys)
            self.frame = frame
            self.apply_voi_lut = apply_voi_lut

        def __call__(self, data):
            d = dict(data)
            for key in self.key_iterator(d):
                d[key] = read_pixels(d[key], frame=self.frame, apply_voi_lut=self.apply_voi_lut)[None]
            return d

    class ResizeToSized(MapTransform):
        """Resize channel-first 2-D images to ``spatial_size``: area averaging along the axes that
        shrink (anti-aliased, and cheap), then bilinear along the axes that grow."""

        def __init__(self, keys, spatial_size: tuple[int, int], allow_missing_keys: bool = False):
            super().__init__(keys, allow_missing_keys)
            self.spatial_size = tuple(int(s) for s in spatial_size)
            self._grow = Resize(self.spatial_size, mode="bilinear", align_corners=False)

        def __call__(self, data):
            d = dict(data)
            for key in self.key_iterator(d):
                img = d[key]
                size = tuple(int(s) for s in img.shape[-2:])
                if size == self.spatial_size:
                    continue
                shrunk = tuple(min(s, t) for s, t in zip(size, self.spatial_size))
                if shrunk != size:
                    img = Resize(shrunk, mode="area")(img)
                if shrunk != self.spatial_size:
                    img = self._grow(img)
                d[key] = img
            return d

    return LoadPixelsd, ResizeToSized
