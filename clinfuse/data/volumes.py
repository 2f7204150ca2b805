"""Decoding of 3-D volumes: a DICOM series folder, a multi-frame (or single) DICOM file, NIfTI.

Entry points, as for 2-D images (:mod:`clinfuse.data.images`):

* :func:`check_volume` — a cheap header-level check (``clinfuse validate`` goes further and decodes
  every volume with :func:`read_volume`, as training will): a series folder holds one series of equally sized slices with no slice missing; a DICOM file
  passes :func:`clinfuse.data.images.check_image`; a NIfTI header is readable and 3-D. With
  ``phi=True`` it returns the identifying DICOM tags that are filled in (:func:`volume_phi`:
  every slice is scanned).
* :func:`read_volume` — float32 ``[depth, rows, columns]`` in the file's units (DICOM: after the
  Modality LUT / rescale, so CT is in Hounsfield units; no VOI window).
* :func:`decode_volume` — the model input: clipped to ``intensity_range`` if declared, resized to
  ``size`` (area averaging along axes that shrink, trilinear along axes that grow) and normalised
  on its own: float32 ``[1, D, H, W]``. What the dataset caches.

Slices of a series are ordered by their position along the slice normal (``ImagePositionPatient``
on ``ImageOrientationPatient``), else by ``InstanceNumber``. NIfTI goes through MONAI's
``LoadImage`` (nibabel); its voxel axes (i, j, k) become (columns, rows, depth) as stored — no
reorientation, so a study mixing DICOM and NIfTI sites should convert to one of them.

Every problem raises :class:`clinfuse.errors.InputError` naming the file (for a series, the slice
at fault): the readers run inside :func:`clinfuse.data.decoding.decoding`, so whatever pydicom,
nibabel or MONAI raise on a bad file becomes that error, and their warnings stay off the console.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

from clinfuse.data.decoding import decoding
from clinfuse.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Files a DICOM series folder may hold besides its slices.
_IGNORED = frozenset({"DICOMDIR", "README", "readme.txt", "Thumbs.db"})
# A gap between neighbouring slices wider than this many median spacings is a missing slice.
_GAP_TOLERANCE = 1.5


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def check_volume(path: str | os.PathLike[str], *, phi: bool = False) -> list[str]:
    """Check a volume cheaply (headers only); returns the filled-in PHI tags when ``phi``.

    Raises :class:`InputError` naming the file at fault.
    """
    from clinfuse.data.images import check_image

    p = Path(path)
    if not p.exists():
        raise InputError("volume not found", file=p)
    with decoding(p, "read the volume"):
        if p.is_dir():
            _series_slices(p)
        elif is_nifti(p):
            _nifti_header(p)
        else:
            check_image(p)
    return volume_phi(p) if phi else []


def volume_phi(path: str | os.PathLike[str]) -> list[str]:
    """Identifying DICOM data in a volume (:func:`clinfuse.data.images.phi_fields`): of every slice
    of a series folder, in slice order without repeats; ``[]`` for NIfTI."""
    from clinfuse.data.images import phi_fields

    p = Path(path)
    if is_nifti(p):
        return []
    if not p.is_dir():
        return phi_fields(p)
    found: dict[str, None] = {}
    with decoding(p, "read the series"):
        slices = _series_slices(p)
    for s in slices:
        found.update(dict.fromkeys(phi_fields(s.path)))
    return list(found)


def read_volume(path: str | os.PathLike[str]) -> np.ndarray:
    """The volume at ``path`` as float32 ``[depth, rows, columns]`` in the file's units."""
    from clinfuse.data.images import read_frames, read_pixels

    p = Path(path)
    if not p.exists():
        raise InputError("volume not found", file=p)
    with decoding(p, "decode the volume"):
        if p.is_dir():
            slices = _series_slices(p)
            planes = [read_pixels(s.path, apply_voi_lut=False) for s in slices]
            shape = planes[0].shape
            for s, plane in zip(slices, planes):
                if plane.shape != shape:  # header Rows/Columns disagreed with the decoded pixels
                    raise InputError(f"slice is {plane.shape[0]}x{plane.shape[1]}, the series' first slice "
                                     f"{slices[0].path.name} is {shape[0]}x{shape[1]}", file=s.path)
            return np.ascontiguousarray(np.stack(planes), dtype=np.float32)
        if is_nifti(p):
            return _read_nifti(p)
        return read_frames(p, apply_voi_lut=False)


def decode_volume(path: str | os.PathLike[str], spec) -> np.ndarray:
    """Decode, clip, resize and normalise one volume: float32 ``[1, *spec.size]``.

    ``spec`` is a :class:`clinfuse.config.VolumeModality`.
    """
    import torch
    from monai.transforms import NormalizeIntensity, Resize, ScaleIntensity

    arr = read_volume(path)
    with decoding(path, "resize the volume"):
        if spec.intensity_range is not None:
            arr = np.clip(arr, *spec.intensity_range)
        img = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
        target = tuple(int(s) for s in spec.size)
        shrunk = tuple(min(s, t) for s, t in zip(img.shape[1:], target))
        if shrunk != tuple(img.shape[1:]):
            img = Resize(shrunk, mode="area")(img)
        if shrunk != target:
            img = Resize(target, mode="trilinear", align_corners=False)(img)
        if spec.normalize == "zscore":
            img = NormalizeIntensity(channel_wise=True)(img)
        else:
            img = ScaleIntensity(minv=0.0, maxv=1.0)(img)
        out = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
    return np.ascontiguousarray(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0))


# --------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------

class _Slice:
    __slots__ = ("columns", "number", "path", "position", "rows", "series")

    def __init__(self, path, rows, columns, series, position, number):
        self.path, self.rows, self.columns = path, rows, columns
        self.series, self.position, self.number = series, position, number


def _series_slices(folder: Path) -> list[_Slice]:
    """The slices of the one series in ``folder``, ordered, after the consistency checks."""
    import pydicom

    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.name not in _IGNORED)
    if not files:
        raise InputError("DICOM series folder holds no files", file=folder)
    slices = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a foreign file
            raise InputError(f"not a DICOM slice ({type(exc).__name__}); a series folder holds only the "
                             "series' DICOM files", file=f) from None
        if ds.get("Rows") in (None, "") or ds.get("Columns") in (None, ""):
            raise InputError("DICOM file in the series folder is not an image (no Rows/Columns)", file=f)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InputError(f"a series folder holds single-frame slices; this file has {frames} frames "
                             "(name the multi-frame file itself in the manifest)", file=f)
        slices.append(_Slice(f, int(ds.Rows), int(ds.Columns), str(ds.get("SeriesInstanceUID", "")),
                             _position_along_normal(ds), ds.get("InstanceNumber")))
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(f"mixed slice sizes in the series: this slice is {s.rows}x{s.columns}, "
                             f"{first.path.name} is {first.rows}x{first.columns}", file=s.path)
        if s.series != first.series:
            raise InputError(f"the folder holds more than one series (SeriesInstanceUID {s.series} here, "
                             f"{first.series} in {first.path.name}); give each series its own folder",
                             file=s.path)
    if all(s.position is not None for s in slices):
        slices.sort(key=lambda s: s.position)
        _check_spacing(slices)
    elif all(s.number not in (None, "") for s in slices):
        slices.sort(key=lambda s: int(s.number))
        numbers = [int(s.number) for s in slices]
        for a, b, s in zip(numbers, numbers[1:], slices[1:]):
            if b == a:
                raise InputError(f"two slices have InstanceNumber {b}", file=s.path)
            if b != a + 1:
                raise InputError(f"missing slice(s): InstanceNumber jumps from {a} to {b} before this slice",
                                 file=s.path)
    return slices


def _position_along_normal(ds) -> float | None:
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if not position or not orientation or len(position) != 3 or len(orientation) != 6:
        return None
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    return float(np.dot(np.asarray(position, dtype=float), np.cross(row, col)))


def _check_spacing(slices: list[_Slice]) -> None:
    if len(slices) < 2:
        return
    positions = np.array([s.position for s in slices])
    gaps = np.diff(positions)
    for gap, s in zip(gaps, slices[1:]):
        if gap < 1e-6:
            raise InputError(f"two slices share the position {s.position:.3f} mm along the slice normal",
                             file=s.path)
    spacing = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if gap > _GAP_TOLERANCE * spacing:
            missing = round(float(gap) / spacing) - 1
            raise InputError(f"missing slice(s): a gap of {gap:.2f} mm (about {missing} slice(s) at the "
                             f"series' {spacing:.2f} mm spacing) after {slices[i].path.name}",
                             file=slices[i + 1].path)


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------

def _nifti_header(p: Path):
    try:
        import nibabel as nib

        img = nib.load(str(p))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a bad file
        raise InputError(f"not a readable NIfTI file: {type(exc).__name__}: {exc}", file=p) from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2:
        raise InputError(f"NIfTI image has shape {shape}; a volume needs 3 dimensions", file=p)
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise InputError(f"NIfTI image has shape {shape}: a time series or multi-channel image, not one "
                         "volume", file=p)
    return img


@functools.cache
def _nifti_loader():
    from monai.transforms import LoadImage

    return LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)


def _read_nifti(p: Path) -> np.ndarray:
    _nifti_header(p)
    try:
        arr = np.asarray(_nifti_loader()(str(p)))
    except Exception as exc:  # noqa: BLE001 - truncated data, bad compression...
        raise InputError(f"cannot read the NIfTI voxel data: {type(exc).__name__}: {exc}", file=p) from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if not np.isfinite(arr).all():
        raise InputError("voxel data contains NaN or infinite values", file=p)
    # (i, j, k) voxel axes -> (depth, rows, columns) = (k, j, i)
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0)), dtype=np.float32)
