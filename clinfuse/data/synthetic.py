"""The embedded demo cohort: synthetic chest radiographs (real DICOM files), notes and tabular data.

``write_demo_cohort(out, sites=3, patients=200, seed=0)`` writes one folder per hospital site
(``ensure_demo_cohort`` with the same arguments writes it only where ``out`` does not already
hold it: its marker file ``out/cohort.json`` records the arguments)::

    out/site-0/manifest.csv              one row per image; columns below
    out/site-0/images/site0-0007-1.dcm   CR DICOM, ExplicitVRLittleEndian, 256x256 uint16, MONOCHROME2
    out/site-0/notes/site0-0007.txt      the patient's note, referenced by the ``note_path`` column
    out/site-1/...
    out/site-2/...                       the last site (when there are 2 or more) has no notes at all

``manifest.csv`` columns: ``patient_id,label,image,note_path,age,sex,temperature,spo2,wbc``, with
paths relative to the manifest and empty cells for absent values. There is no ``split`` column:
the split is made by patient downstream. Labels and tabular fields match ``configs/demo.yaml``.

Generative model
----------------
Each patient has a latent disease severity ``z ~ N(mu_site, 1)``; the label is ``positive`` when
``z > 0``, so the site's mean ``mu_site`` sets its prevalence while the link between latent and
label, and so between features and label, is the same at every site.
Each modality sees its own noisy view of the latent, ``v_m = z + sigma_m * e_m`` with independent
``e_m ~ N(0, 1)``. Every modality is therefore informative alone, and because their noises are
independent, a model that combines them averages the noise away and beats any single one:

- image: ``v_image`` sets how much of the lung fields is covered by opacities (a diffuse lower-zone
  ground-glass haze plus a number of denser blobs). The phantom has a soft-tissue body, two darker
  lung fields, heart, spine and ribs, and varies slightly per patient (position, size, exposure).
- text: ``v_text`` picks one of five report grades (clear ... extensive bilateral opacities) whose
  words carry the signal ("lungs are clear", "bilateral ground-glass opacities"), phrased in the
  site's own reporting style and synonyms, and mixed with label-independent sentences (indication,
  history, heart size).
- tabular: ``v_tabular`` raises temperature and white cell count and lowers SpO2; age is weakly
  related; sex is noise. Each field adds its own measurement noise.

Sites differ in prevalence, scanner (gain, offset, noise, stored rescale slope/intercept) and note
wording. About 15% of patients have no image and (outside the note-less last site) about 15% have no
note, both missing completely at random; each numeric tabular field is missing for a few percent.
About 10% of imaged patients have a second (follow-up) image: two manifest rows, same label.

``variant="rich"`` adds two modalities, for five in all (two of them imaging), read by
``configs/rich.yaml``: a small CT-like volume (``volumes/<patient>/``: a DICOM series of 16 axial
CT slices of 32x32 in Hounsfield units, rescale intercept -1024) whose label signal — lung nodules,
more and larger with ``v_volume`` — lies in the upper slices (4 to 7 of 16), never in the middle
slice (8), so a model of the middle slice alone sees anatomy and noise only; and a 2-lead
ECG-like signal (heart rate and an ST-like plateau rise with ``v_signal``), 5 s long, written as a
WFDB record at 200 Hz at site 0 (resampled to the declared 100 Hz) and as a ``[samples, 2]`` NPY
array at 100 Hz at site 1. Site 1 has no volumes, site 2 no signals (and, as the last site, no
notes). Its manifest columns are ``patient_id,label,chest,ct,note_path,ecg`` + the tabular fields.

``variant="text_dominant"`` keeps everything above but makes the note nearly determine the label
(``sigma_text`` tiny, the boundary between the equivocal and abnormal grades at the label's) and
the tabular view weak, while the image keeps the default variant's signal: a model can reach high
accuracy from text alone and neglect an image that is informative on its own, which is what
modality-balancing methods are meant to prevent (and what a patient without a note then loses).

Everything is derived from ``seed`` through per-site and per-patient random streams: the same seed
gives byte-identical manifests, notes and DICOM files (UIDs come from
``pydicom.uid.generate_uid(entropy_srcs=...)``), and a run with fewer patients writes the same first
patients. No real names, dates or identifiers appear anywhere: DICOM patient and study attributes
are present but empty, and ``PatientIdentityRemoved`` is ``YES``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

LABELS = ("negative", "positive")
MANIFEST_COLUMNS = ("patient_id", "label", "image", "note_path", "age", "sex", "temperature", "spo2", "wbc")
VARIANTS = ("default", "text_dominant", "rich")
RICH_COLUMNS = ("patient_id", "label", "chest", "ct", "note_path", "ecg", "age", "sex", "temperature", "spo2", "wbc")
CT_SLICES, CT_SIZE, CT_SPACING = 16, 32, 2.5
CT_NODULE_SLICES = (4, 7)  # nodules only here: the middle slice (8) carries no label signal
ECG_SECONDS, ECG_LEADS = 5.0, ("I", "II")
IMAGE_SIZE = 256

# CR Image Storage: unlike DX, its Modality LUT module allows a rescale slope/intercept, which
# lets sites store pixels differently and exercises the decoder's rescaling.
_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
# Type 2 attributes every file keeps, empty: a de-identified file, nothing for a PHI scan to find.
_EMPTY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class _Variant:
    sigma_image: float
    sigma_text: float
    sigma_tabular: float
    text_cuts: tuple[float, float, float, float]  # v_text thresholds between the five note grades
    sigma_volume: float = 1.0
    sigma_signal: float = 1.25


_VARIANTS = {
    "default": _Variant(sigma_image=1.25, sigma_text=1.15, sigma_tabular=1.5,
                        text_cuts=(-1.0, -0.35, 0.25, 0.9)),
    # the cut between grades 2 (equivocal) and 3 (bilateral opacities) sits at 0, where the label
    # flips: the note is almost the label. The image keeps the default signal: with an image too
    # weak to learn anyway, neglecting it would cost nothing and balancing would have nothing to save.
    "text_dominant": _Variant(sigma_image=1.25, sigma_text=0.08, sigma_tabular=3.0,
                              text_cuts=(-0.9, -0.3, 0.0, 0.7)),
    # the default's three views plus a volume and a signal view
    "rich": _Variant(sigma_image=1.25, sigma_text=1.15, sigma_tabular=1.5, text_cuts=(-1.0, -0.35, 0.25, 0.9),
                     sigma_volume=1.0, sigma_signal=1.25),
}


@dataclass(frozen=True)
class _Site:
    index: int
    prevalence: float
    gain: float
    offset: float
    noise: float
    slope: float
    intercept: float
    style: int
    has_notes: bool
    age_mean: float
    has_volume: bool = False
    has_signal: bool = False


# (prevalence, gain, offset, noise, stored slope, stored intercept) for the first sites; later
# sites get random profiles from the seed.
_SITE_PROFILES = (
    (0.40, 1.00, 0.0, 30.0, 1.0, 0.0),
    (0.55, 1.20, 150.0, 55.0, 0.5, -1024.0),
    (0.30, 0.85, -60.0, 20.0, 2.0, 100.0),
)


def _site(index: int, n_sites: int, seed: int, variant: str) -> _Site:
    if index < len(_SITE_PROFILES):
        prev, gain, offset, noise, slope, intercept = _SITE_PROFILES[index]
    else:
        rng = np.random.default_rng([seed, _variant_code(variant), index, 7])
        prev = float(rng.uniform(0.25, 0.6))
        gain = float(rng.uniform(0.8, 1.25))
        offset = float(rng.uniform(-80, 200))
        noise = float(rng.uniform(15, 60))
        slope, intercept = ((1.0, 0.0), (0.5, -1024.0), (2.0, 100.0))[index % 3]
    return _Site(index=index, prevalence=prev, gain=gain, offset=offset, noise=noise, slope=slope,
                 intercept=intercept, style=index % 3, has_notes=not (n_sites > 1 and index == n_sites - 1),
                 has_volume=variant == "rich" and (n_sites == 1 or index % 3 != 1),
                 has_signal=variant == "rich" and (n_sites == 1 or index % 3 != 2),
                 age_mean=52.0 + 4.0 * (index % 4))


def _variant_code(variant: str) -> int:
    return VARIANTS.index(variant)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

# Anatomy is smooth, so it is drawn on a half-resolution grid and upsampled (bilinear, elementwise:
# no BLAS threads to contend for); only the noise is drawn at full resolution.
_COARSE = IMAGE_SIZE // 2


def _grid(n: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0).astype(np.float32)


def _upsample2(a: np.ndarray, axis: int) -> np.ndarray:
    """Double ``a`` along ``axis`` by linear interpolation at pixel centres (edges replicated)."""
    a = np.moveaxis(a, axis, 0)
    prev = np.concatenate([a[:1], a[:-1]])
    nxt = np.concatenate([a[1:], a[-1:]])
    out = np.empty((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
    out[0::2] = 0.75 * a + 0.25 * prev
    out[1::2] = 0.75 * a + 0.25 * nxt
    return np.moveaxis(out, 0, axis)


_lin = _grid(_COARSE)
_Y, _X = np.meshgrid(_lin, _lin, indexing="ij")  # y grows downwards, like image rows


def _sigmoid(t):
    # clipped so far-away pixels do not overflow exp
    return 1.0 / (1.0 + np.exp(np.clip(-t, -50.0, 50.0)))


def _ellipse(cx, cy, ax, ay, edge=0.05):
    """Soft 0..1 mask of an ellipse (soft edges, like a real projection)."""
    d = np.sqrt(((_X - cx) / ax) ** 2 + ((_Y - cy) / ay) ** 2)
    return _sigmoid((1.0 - d) / edge)


def _blob(cx, cy, s):
    # separable Gaussian: an outer product is much cheaper than exp over the whole grid
    gx = np.exp(-((_lin - cx) ** 2) / (2.0 * s * s))
    gy = np.exp(-((_lin - cy) ** 2) / (2.0 * s * s))
    return np.outer(gy, gx)


def _severity(v: float) -> float:
    return float(_sigmoid(1.4 * (v - 0.2)))


def _phantom(rng: np.random.Generator, v_image: float, site: _Site) -> np.ndarray:
    """Physical-intensity image (float32): bright body, dark lungs, opacities set by ``v_image``."""
    dx, dy = (float(t) for t in rng.normal(0.0, 0.025, 2))
    sc = float(1.0 + rng.normal(0.0, 0.04))
    body = _ellipse(dx, 0.05 + dy, 0.88 * sc, 1.05 * sc, 0.03)
    lung = (_ellipse(-0.40 * sc + dx, -0.05 + dy, 0.27 * sc, 0.58 * sc, 0.06)
            + _ellipse(0.40 * sc + dx, -0.05 + dy, 0.27 * sc, 0.58 * sc, 0.06))
    heart = _ellipse(0.08 + dx, 0.22 + dy, 0.24 * sc, 0.28 * sc, 0.08)
    spine = _sigmoid((0.07 - np.abs(_X - dx)) / 0.015)
    # ribs: curved bright bands across the lung fields
    ribs = 0.5 + 0.5 * np.cos(2.0 * np.pi * ((_Y - dy) - 0.25 * (_X - dx) ** 2) / 0.17)

    img = 150.0 + 1550.0 * body
    img -= 1000.0 * lung * (1.0 - 0.85 * heart)
    img += 250.0 * heart + 600.0 * spine * body + 140.0 * ribs * lung

    sev = _severity(v_image)
    # ground-glass haze, heaviest in the lower zones
    lower = _sigmoid((_Y - dy - 0.05) / 0.15)
    opac = (380.0 * sev) * (0.35 + 0.65 * lower)
    n_blobs = int(rng.poisson(1.0 + 6.0 * sev))
    for _ in range(n_blobs):
        side = -1.0 if rng.random() < 0.5 else 1.0
        bx = side * 0.40 * sc + dx + rng.uniform(-0.17, 0.17)
        by = -0.05 + dy + 0.55 * (2.0 * rng.beta(2.5, 1.5) - 1.0)
        opac = opac + rng.uniform(120.0, 320.0) * _blob(bx, by, rng.uniform(0.05, 0.12))
    img += opac * lung
    gain = site.gain * float(1.0 + rng.normal(0.0, 0.04))  # exposure varies film to film
    full = _upsample2(_upsample2((gain * img).astype(np.float32), 0), 1)
    full += site.offset
    full += site.noise * rng.standard_normal(full.shape, dtype=np.float32)
    return full


def _dicom_template(site: _Site):
    """The attributes every image of a site shares; per-image ones are set in :func:`_dicom_bytes`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _CR_IMAGE_STORAGE
    ds.Modality = "CR"
    for keyword in _EMPTY_TYPE2:
        setattr(ds, keyword, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom (clinfuse demo cohort); no patient data"
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer = "clinfuse-synthetic"
    ds.ManufacturerModelName = f"phantom-scanner-{site.style}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = IMAGE_SIZE
    ds.PixelSpacing = [1.4, 1.4]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{site.intercept:g}"
    ds.RescaleSlope = f"{site.slope:g}"
    ds.RescaleType = "US"
    # a wide window, in rescaled units, that keeps lungs and mediastinum visible
    ds.WindowCenter = f"{site.gain * 1200.0 + site.offset:.0f}"
    ds.WindowWidth = f"{site.gain * 3000.0:.0f}"
    return ds


def _dicom_bytes(template, phys: np.ndarray, site: _Site, uids: tuple[str, str, str], series: int) -> bytes:
    # The template is reused and every per-image attribute is overwritten here: building a fresh
    # dataset per image costs more than drawing the image.
    study_uid, series_uid, sop_uid = uids
    stored = np.clip(np.rint((phys - site.intercept) / site.slope), 0, 65535).astype(np.uint16)
    ds = template
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Notes
# ----------------------------------------------------------------------------------------------

# _FINDINGS[style][grade]: synonyms for what the film shows, in three reporting styles
_FINDINGS = (
    (  # style 0: narrative
        ("the lungs are clear", "no focal consolidation", "clear lung fields bilaterally"),
        ("minor bibasal atelectasis", "subtle linear markings at the lung bases",
         "no convincing consolidation"),
        ("faint hazy opacity in the right lower zone", "possible early infiltrate at the left base",
         "ill-defined subtle opacity in one lower zone"),
        ("patchy ground-glass opacities in both lower zones", "bilateral patchy airspace opacities",
         "multifocal ground-glass opacities with peripheral distribution"),
        ("extensive bilateral ground-glass opacities with consolidation",
         "diffuse bilateral airspace opacification", "dense bilateral consolidation in all zones"),
    ),
    (  # style 1: terse, abbreviations
        ("lungs clear", "no consol", "NAD chest"),
        ("min basal atelectasis", "linear markings bases", "no definite consol"),
        ("faint RLZ haze", "?early infiltrate L base", "subtle LZ opacity"),
        ("bilat GGO lower zones", "patchy bilat opacities", "multifocal GGO periph"),
        ("extensive bilat GGO + consol", "diffuse bilat opacification", "dense bilat consol all zones"),
    ),
    (  # style 2: another vocabulary
        ("normal lung parenchyma", "no airspace disease", "lungs well expanded and clear"),
        ("minimal basal scarring", "plate-like atelectasis at the bases", "no significant airspace disease"),
        ("equivocal haze at one base", "early infiltrate not excluded", "slight increased basal density"),
        ("bilateral hazy airspace shadowing", "patchy infiltrates at both bases",
         "peripheral ground-glass shadowing bilaterally"),
        ("widespread bilateral consolidation", "diffuse airspace disease in both lungs",
         "white-out of both lower lobes with air bronchograms"),
    ),
)

_IMPRESSIONS = (
    ("no acute cardiopulmonary process", "normal chest radiograph", "no active disease"),
    ("no significant acute abnormality", "no acute process identified", "minor basal changes only"),
    ("equivocal findings, clinical correlation advised", "early infection cannot be excluded",
     "indeterminate appearance, suggest follow-up film"),
    ("appearances compatible with viral pneumonia", "findings suspicious for atypical infection",
     "in keeping with multifocal pneumonia"),
    ("appearances of severe multifocal pneumonia", "extensive infection, correlate with oxygen requirement",
     "severe bilateral pneumonia"),
)

_HEADINGS = (
    ("Indication", "Findings", "Impression"),
    ("Hx", "CXR", "IMP"),
    ("Clinical details", "Report", "Conclusion"),
)

# label-independent content: what any chest film request or report may say
_INDICATIONS = (
    "cough for {n} days", "shortness of breath", "fever and malaise", "pre-operative assessment",
    "chest pain, exclude pathology", "follow-up study", "fall, exclude rib fracture",
    "productive cough", "fatigue for {n} days", "routine screening",
)
_EXTRAS = (
    "Heart size normal.", "No pleural effusion.", "Mediastinum unremarkable.", "Portable AP film.",
    "Lines and tubes in satisfactory position.", "History of hypertension.", "Ex-smoker.",
    "Compared with no prior imaging.", "Degenerative changes of the thoracic spine.",
    "Costophrenic angles are sharp.", "Type 2 diabetes on metformin.", "No pneumothorax.",
)


def _note(rng: np.random.Generator, grade: int, style: int) -> str:
    head_ind, head_find, head_imp = _HEADINGS[style]
    indication = _INDICATIONS[int(rng.integers(len(_INDICATIONS)))].format(n=int(rng.integers(1, 11)))
    finding = _FINDINGS[style][grade][int(rng.integers(3))]
    impression = _IMPRESSIONS[grade][int(rng.integers(3))]
    n_extra = int(rng.integers(0, 3))
    extras = [_EXTRAS[i] for i in sorted(rng.choice(len(_EXTRAS), size=n_extra, replace=False))]
    body = " ".join([finding[0].upper() + finding[1:] + "."] + extras)
    return f"{head_ind}: {indication}.\n{head_find}: {body}\n{head_imp}: {impression}.\n"


# ----------------------------------------------------------------------------------------------
# Tabular
# ----------------------------------------------------------------------------------------------

def _tabular(rng: np.random.Generator, v: float, site: _Site) -> dict[str, str]:
    e = rng.normal(size=5)
    age = np.clip(site.age_mean + 5.0 * v + 14.0 * e[0], 18, 95)
    temperature = np.clip(37.1 + 0.55 * v + 0.45 * e[1], 35.0, 41.5)
    spo2 = np.clip(96.0 - 2.2 * v + 1.6 * e[2], 70, 100)
    wbc = np.clip(7.5 + 1.9 * v + 1.8 * e[3], 1.0, 30.0)
    row = {
        "age": f"{age:.0f}",
        "sex": "F" if rng.random() < 0.5 else "M",
        "temperature": f"{temperature:.1f}",
        "spo2": f"{spo2:.0f}",
        "wbc": f"{wbc:.1f}",
    }
    # a few measurements missing at random; sex (from registration) is always recorded, so no
    # patient loses the tabular modality entirely
    for key in ("age", "temperature", "spo2", "wbc"):
        if rng.random() < 0.05:
            row[key] = ""
    return row


# ----------------------------------------------------------------------------------------------
# Rich variant: CT-like volumes and ECG-like signals
# ----------------------------------------------------------------------------------------------

_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
_zc, _yc, _xc = np.meshgrid(np.arange(CT_SLICES, dtype=np.float32), _grid(CT_SIZE), _grid(CT_SIZE), indexing="ij")


def _ct_volume(rng: np.random.Generator, v_volume: float) -> np.ndarray:
    """Hounsfield units ``[slices, rows, columns]``: body, lungs, spine, and nodules set by ``v_volume``
    in slices ``CT_NODULE_SLICES`` only."""
    dx, dy = (float(t) for t in rng.normal(0.0, 0.03, 2))
    body = _sigmoid((1.0 - np.sqrt(((_xc - dx) / 0.9) ** 2 + ((_yc - dy) / 0.75) ** 2)) / 0.05)
    # lungs narrow towards the apex (slice 0) and the base (last slice)
    taper = 1.0 - 0.35 * np.abs(_zc / (CT_SLICES - 1) - 0.55)
    lungs = sum(_sigmoid((1.0 - np.sqrt(((_xc - side * 0.42 - dx) / (0.3 * taper)) ** 2
                                         + ((_yc - dy) / (0.5 * taper)) ** 2)) / 0.08) for side in (-1.0, 1.0))
    spine = _sigmoid((0.1 - np.sqrt((_xc - dx) ** 2 + (_yc - dy - 0.55) ** 2)) / 0.03)
    hu = -1000.0 + 1040.0 * body - 880.0 * lungs * body + 450.0 * spine * body
    sev = _severity(v_volume)
    first, last = CT_NODULE_SLICES
    for _ in range(int(rng.poisson(0.3 + 5.0 * sev))):
        side = -1.0 if rng.random() < 0.5 else 1.0
        cz = rng.uniform(first, last)
        cx, cy = side * 0.42 + dx + rng.uniform(-0.12, 0.12), dy + rng.uniform(-0.25, 0.25)
        r = rng.uniform(0.1, 0.14 + 0.12 * sev)  # 2 to 4 voxels
        blob = np.exp(-(((_xc - cx) ** 2 + (_yc - cy) ** 2) / (2 * r * r) + (_zc - cz) ** 2 / (2 * 1.0 ** 2)))
        blob[(_zc < first) | (_zc > last)] = 0.0  # kept off the middle slice by construction
        hu += 1000.0 * blob * lungs
    hu += rng.normal(0.0, 25.0, hu.shape)
    return hu.astype(np.float32)


def _ct_series_files(hu: np.ndarray, site: _Site, seed: int, pid: str) -> list[tuple[str, bytes]]:
    """One CT DICOM file per slice: ``(file name, bytes)``, with positions along z."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = ["clinfuse-synth", str(seed), "rich", pid, "ct"]
    study_uid = generate_uid(entropy_srcs=src + ["study"])
    series_uid = generate_uid(entropy_srcs=src + ["series"])
    stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
    out = []
    for k in range(hu.shape[0]):
        sop = generate_uid(entropy_srcs=src + [str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _CT_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = _CT_STORAGE, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "CT"
        for keyword in _EMPTY_TYPE2:
            setattr(ds, keyword, "")
        ds.PatientIdentityRemoved = "YES"
        ds.Manufacturer = "clinfuse-synthetic"
        ds.ManufacturerModelName = f"phantom-ct-{site.style}"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * CT_SPACING)]
        ds.SliceThickness = CT_SPACING
        ds.PixelSpacing = [10.0, 10.0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = CT_SIZE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.PixelData = stored[k].tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((f"slice-{k:03d}.dcm", buf.getvalue()))
    return out


def _ecg(rng: np.random.Generator, v_signal: float, fs: float) -> np.ndarray:
    """A 2-lead ECG-like series ``[samples, 2]`` in mV: heart rate and an ST-like plateau rise with
    ``v_signal``."""
    n = round(ECG_SECONDS * fs)
    t = np.arange(n) / fs
    hr = float(np.clip(68.0 + 10.0 * v_signal + rng.normal(0.0, 4.0), 40.0, 150.0))
    st = 0.25 * _severity(v_signal)
    beats = np.arange(rng.uniform(0.0, 60.0 / hr), ECG_SECONDS, 60.0 / hr)
    beats = beats + rng.normal(0.0, 0.01, beats.shape)
    lead = np.zeros(n)
    for b in beats:
        lead += 1.1 * np.exp(-((t - b) / 0.012) ** 2) - 0.15 * np.exp(-((t - b - 0.03) / 0.015) ** 2)
        lead += st * _sigmoid((t - b - 0.05) / 0.01) * _sigmoid((b + 0.22 - t) / 0.02)
        lead += 0.3 * np.exp(-((t - b - 0.3) / 0.05) ** 2)
    wander = 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t + rng.uniform(0, 2 * np.pi))
    two = np.stack([lead, 0.7 * lead], axis=1) + wander[:, None]
    return (two + rng.normal(0.0, 0.04, two.shape)).astype(np.float32)


def _write_ecg(site_dir: Path, pid: str, ecg: np.ndarray, fs: float, as_wfdb: bool) -> str:
    """Write one signal; returns its manifest path (relative to the site)."""
    (site_dir / "signals").mkdir(parents=True, exist_ok=True)
    if not as_wfdb:
        buf = io.BytesIO()
        np.save(buf, ecg, allow_pickle=False)
        atomic_write_bytes(site_dir / "signals" / f"{pid}.npy", buf.getvalue(), durable=False)
        return f"signals/{pid}.npy"
    from clinfuse.data.signals import wfdb_module

    wfdb_module().wrsamp(pid, fs=fs, units=["mV", "mV"], sig_name=list(ECG_LEADS), p_signal=ecg.astype(np.float64),
                fmt=["16", "16"], write_dir=str(site_dir / "signals"))
    return f"signals/{pid}.hea"


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------

def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"must be an integer >= {minimum}, got {value!r}", key=name)
    return int(value)


def write_demo_cohort(out: str | Path, *, sites: int = 3, patients: int = 200, seed: int = 0,
                      variant: str = "default") -> list[Path]:
    """Write the synthetic demo cohort under ``out`` and return the per-site manifest paths.

    Parameters
    ----------
    out:
        Directory to write into (created if needed); each site goes to ``out/site-<k>``.
        Files of an earlier run there are overwritten; nothing else is removed.
    sites:
        Number of sites (>= 1). With two or more, the last site has no notes.
    patients:
        Patients per site (>= 1); about 10% of those with an image get a second one.
    seed:
        Seed of everything written; equal seeds give byte-identical files.
    variant:
        ``"default"`` (every modality moderately informative, fusion best),
        ``"text_dominant"`` (notes nearly give the label away; the image as informative as in "default")
        or ``"rich"`` (five modalities: chest film, CT series, note, tabular, ECG; ``configs/rich.yaml``).

    Returns
    -------
    list[Path]
        ``out/site-<k>/manifest.csv`` for ``k = 0 .. sites-1``.
    """
    from pydicom.uid import generate_uid

    from clinfuse.progress import Progress

    sites = _check_int(sites, "sites", 1)
    patients = _check_int(patients, "patients", 1)
    seed = _check_int(seed, "seed", 0)
    if variant not in _VARIANTS:
        raise InputError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}",
                         key="variant")
    params = _VARIANTS[variant]
    vcode = _variant_code(variant)
    out = Path(out)
    manifests = []
    progress = Progress(sites * patients, "synthetic cohort", "patient")
    for s in range(sites):
        site = _site(s, sites, seed, variant)
        site_dir = out / f"site-{s}"
        (site_dir / "images").mkdir(parents=True, exist_ok=True)
        if site.has_notes:
            (site_dir / "notes").mkdir(parents=True, exist_ok=True)
        mu = NormalDist().inv_cdf(site.prevalence)
        template = _dicom_template(site)
        rows = []
        for i in range(patients):
            # one stream per patient: a smaller cohort is a prefix of a larger one
            rng = np.random.default_rng([seed, vcode, s, i])
            pid = f"site{s}-{i:04d}"
            z = rng.normal(mu, 1.0)
            label = LABELS[int(z > 0.0)]
            v_img, v_txt, v_tab = z + rng.normal(size=3) * (params.sigma_image, params.sigma_text,
                                                            params.sigma_tabular)
            has_image = rng.random() >= 0.15
            has_note = site.has_notes and rng.random() >= 0.15
            n_images = (2 if rng.random() < 0.10 else 1) if has_image else 0
            tab = _tabular(rng, v_tab, site)

            note_rel = ""
            if has_note:
                grade = int(np.searchsorted(params.text_cuts, v_txt))
                note_rel = f"notes/{pid}.txt"
                # Images and notes are not durable (an fsync each costs ~10x the write): the manifest,
                # written last and durably, is what makes a site usable.
                atomic_write_bytes(site_dir / note_rel, _note(rng, grade, site.style).encode("utf-8"),
                                   durable=False)

            images = []
            study_uid = generate_uid(entropy_srcs=["clinfuse-synth", str(seed), variant, pid, "study"])
            for k in range(1, n_images + 1):
                # a follow-up film sees the same disease, slightly progressed or resolved
                v = v_img + (rng.normal(0.0, 0.3) if k > 1 else 0.0)
                src = ["clinfuse-synth", str(seed), variant, pid, str(k)]
                uids = (study_uid, generate_uid(entropy_srcs=src + ["series"]),
                        generate_uid(entropy_srcs=src + ["instance"]))
                rel = f"images/{pid}-{k}.dcm"
                atomic_write_bytes(site_dir / rel, _dicom_bytes(template, _phantom(rng, v, site), site, uids, k),
                                   durable=False)
                images.append(rel)

            extra = {}
            if variant == "rich":
                v_vol, v_sig = z + rng.normal(size=2) * (params.sigma_volume, params.sigma_signal)
                extra = {"ct": "", "ecg": ""}
                if site.has_volume and rng.random() >= 0.15:
                    folder = site_dir / "volumes" / pid
                    folder.mkdir(parents=True, exist_ok=True)
                    for name, blob in _ct_series_files(_ct_volume(rng, v_vol), site, seed, pid):
                        atomic_write_bytes(folder / name, blob, durable=False)
                    extra["ct"] = f"volumes/{pid}"
                if site.has_signal and rng.random() >= 0.15:
                    fs = 200.0 if site.index % 3 == 0 else 100.0
                    extra["ecg"] = _write_ecg(site_dir, pid, _ecg(rng, v_sig, fs), fs, as_wfdb=site.index % 3 == 0)
            image_column = "chest" if variant == "rich" else "image"
            for rel in images or [""]:
                rows.append({"patient_id": pid, "label": label, image_column: rel, "note_path": note_rel,
                             **extra, **tab})
            progress.update(1)

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RICH_COLUMNS if variant == "rich" else MANIFEST_COLUMNS,
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        manifest = site_dir / "manifest.csv"
        atomic_write_text(manifest, buf.getvalue())
        manifests.append(manifest)
    progress.close()
    return manifests


COHORT_MARKER = "cohort.json"


def recorded_demo_cohort(out: str | Path) -> dict | None:
    """The arguments a complete demo cohort under ``out`` was written with (its marker), or ``None``."""
    try:
        recorded = json.loads((Path(out) / COHORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and recorded.get("complete") else None


def ensure_demo_cohort(out: str | Path, *, sites: int = 3, patients: int = 200, seed: int = 0,
                       variant: str = "default", log=None) -> list[Path]:
    """The per-site manifests of the demo cohort under ``out``, written only when needed.

    Used as it is: a cohort whose marker ``out/cohort.json`` records these arguments, or a
    complete one without a marker (written by ``clinfuse synth`` or by hand: its size is unknown,
    and it is not ours to replace). Written, over the old files: when a site's manifest is
    missing, or the marker records other arguments or a write cut short (it says ``complete:
    false`` until the last manifest is written). ``log(line)`` is told when the cohort is written.
    """
    out = Path(out)
    marker = out / COHORT_MARKER
    stamp = {"sites": sites, "patients": patients, "seed": seed, "variant": variant, "complete": True}
    manifests = [out / f"site-{k}" / "manifest.csv" for k in range(sites)]
    try:
        recorded = json.loads(marker.read_text())
    except FileNotFoundError:
        recorded = None
    except (OSError, ValueError):
        recorded = {}
    if recorded in (None, stamp) and all(m.is_file() for m in manifests):
        return manifests
    if log is not None:
        kind = "" if variant == "default" else f" ({variant})"
        log(f"writing the demo cohort{kind}: {sites} sites x {patients} patients -> {out}")
    atomic_write_json(marker, {**stamp, "complete": False})
    manifests = write_demo_cohort(out, sites=sites, patients=patients, seed=seed, variant=variant)
    atomic_write_json(marker, stamp)
    return manifests
