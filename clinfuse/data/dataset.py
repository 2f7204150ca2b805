"""Multimodal dataset: one item per patient, a dict keyed by modality name, with a disk cache.

The batch contract. Item ``i`` is patient ``i`` (their rows pooled), a dict:

- ``<modality name>``: the modality's input, zeros when absent. Its shape by kind:
  ``image`` float32 ``[1, H, W]``; ``volume`` float32 ``[1, D, H, W]``; ``text`` int64
  ``[max_tokens]`` hashed n-gram ids (0 = padding); ``tabular`` float32 ``[D]`` (declared-range
  encoding with missing flags); ``signal`` float32 ``[channels, length]``. A modality with
  ``max_count`` K > 1 has a leading instance axis: ``[K, ...]``, zero-padded.
- ``"mask"``: float32 ``[M]``, 1 where the modality is present, in declared order.
- ``"instances"``: ``{name: float32 [K]}`` for each modality with ``max_count`` > 1, 1 for each
  filled instance slot (the slots are filled in row order).
- ``"label"``: int64 scalar.

:meth:`MultimodalDataset.collate` stacks items into the same dict with a leading batch axis, and
builds an empty batch of the right shapes for the empty batches Poisson sampling draws.
Absent modalities are placeholders that the model masks; nothing is imputed from other patients.

One item per patient is what DP training needs (the patient is the privacy unit: one prediction
and one clipped gradient per patient per step) and what evaluation scores (one prediction per
patient). A patient's inputs of a modality are the distinct values of their rows, in row order,
at most ``max_count`` (:func:`clinfuse.data.manifest.patient_inputs`).

Images, volumes and signals are decoded once. The decoded array is stored in the site's cache
directory under a key made of the file's content hash (a series folder: every file in it) and the
modality's preprocessing settings, so later epochs and later processes (a Flower ClientApp is a
new process every round) read it back instead of decoding. Entries carry a checksum; a corrupt
entry is detected, rebuilt and overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from clinfuse.config import Config
from clinfuse.data.manifest import PATH_KINDS, Record, patient_inputs
from clinfuse.data.paths import input_files
from clinfuse.data.tabular import encode_tabular, tabular_dim
from clinfuse.data.text import tokenize
from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_bytes

# Bump when decoding changes in a way that alters pixels, so old cache entries are not reused.
DECODER_VERSION = "1"


def default_cache_dir(manifest: str | Path, cfg: Config) -> Path:
    """The site's cache directory: ``data.cache_dir`` if set, else ``<manifest dir>/.clinfuse-cache``."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return Path(manifest).resolve().parent / ".clinfuse-cache"


class ImageCache:
    """Content-addressed store of decoded inputs (images, volumes, signals).

    An entry is ``sha256(payload) || payload`` where payload is the ``.npy`` bytes; reading checks
    the digest, so a truncated or altered entry is rebuilt instead of feeding garbage to training.
    ``settings`` (the modality's kind and preprocessing) enter every key; ``subdir`` names the
    store under ``root``.
    """

    def __init__(self, root: str | Path, image_settings: dict, subdir: str = "images"):
        self.root = Path(root) / subdir
        self._settings = json.dumps({**image_settings, "decoder": DECODER_VERSION}, sort_keys=True)
        self._keys: dict[tuple, str] = {}
        self.hits = self.misses = self.rebuilt = 0

    def key(self, path: Path) -> str:
        files = input_files(path)
        stats = [f.stat() for f in files]
        memo = (str(path), tuple((str(f), st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)))
        if memo not in self._keys:
            digest = hashlib.sha256(self._settings.encode())
            for f in files:
                digest.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        digest.update(chunk)
            self._keys[memo] = digest.hexdigest()
        return self._keys[memo]

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npc"

    def get(self, path: Path) -> np.ndarray | None:
        entry = self._entry(self.key(path))
        try:
            blob = entry.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        digest, payload = blob[:32], blob[32:]
        if hashlib.sha256(payload).digest() != digest:
            self.rebuilt += 1
            return None
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except ValueError:
            self.rebuilt += 1
            return None
        self.hits += 1
        return array

    def put(self, path: Path, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        payload = buffer.getvalue()
        # Not durable: an entry lost in a power cut is decoded again, one cut short fails its digest.
        atomic_write_bytes(self._entry(self.key(path)), hashlib.sha256(payload).digest() + payload,
                           durable=False)


@dataclass(frozen=True)
class PatientSample:
    """One patient of a dataset: their rows pooled. ``inputs[name]`` lists the patient's inputs of
    that modality (paths, notes or tabular value dicts), at most its ``max_count``."""
    site: str
    patient_id: str
    label: int | None  # None only for rows read to predict
    split: str
    rows: tuple[int, ...]  # indices into ``MultimodalDataset.records``
    inputs: dict
    mask: tuple[bool, ...]


def group_patients(records: Sequence[Record], cfg: Config) -> list[PatientSample]:
    """Pool records by (site, patient), in order of each patient's first row."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.site, r.patient_id), []).append(i)
    out = []
    for (site, patient), rows in groups.items():
        first = records[rows[0]]
        inputs = {spec.name: patient_inputs(spec, [records[i].inputs[spec.name] for i in rows])
                  for spec in cfg.modalities}
        out.append(PatientSample(site=site, patient_id=patient, label=first.label, split=first.split,
                                 rows=tuple(rows), inputs=inputs,
                                 mask=tuple(bool(inputs[spec.name]) for spec in cfg.modalities)))
    return out


def input_shape(spec) -> tuple[int, ...]:
    """Shape of one input of a modality (without the instance axis)."""
    if spec.kind == "image":
        return (1, *spec.size)
    if spec.kind == "volume":
        return (1, *spec.size)
    if spec.kind == "signal":
        return (spec.channels, spec.length)
    if spec.kind == "text":
        return (spec.max_tokens,)
    return (tabular_dim(spec.columns),)


def absent_input(spec) -> torch.Tensor:
    """What an item holds for a modality the patient lacks (zeros; text: all padding)."""
    dtype = torch.int64 if spec.kind == "text" else torch.float32
    shape = input_shape(spec)
    return torch.zeros((spec.max_count, *shape) if spec.max_count > 1 else shape, dtype=dtype)


def without_modalities(item: dict, keep, cfg: Config) -> dict:
    """``item`` with the modalities whose ``keep`` entry is 0 removed: mask 0 and the absent input,
    exactly what the dataset gives a patient who lacks them."""
    out = dict(item)
    keep = torch.as_tensor(np.asarray(keep, dtype=np.float32))
    out["mask"] = item["mask"] * keep
    instances = dict(item["instances"])
    for i, spec in enumerate(cfg.modalities):
        if keep[i] < 0.5:
            out[spec.name] = absent_input(spec)
            if spec.name in instances:
                instances[spec.name] = torch.zeros_like(instances[spec.name])
    out["instances"] = instances
    return out


class MultimodalDataset(Dataset):
    """Records of one site as model-ready patient items (see the module docstring for the layout).

    Parameters
    ----------
    records: validated manifest records (``read_manifest(...).records``, possibly one split).
    cfg: the study configuration; the modalities and their preprocessing come from ``cfg.modalities``.
    cache_dir: where decoded inputs are kept between processes; ``None`` keeps them in memory only.

    ``samples`` lists the patients (``len(dataset)`` of them), ``records`` the rows.
    """

    def __init__(self, records: Sequence[Record], cfg: Config, cache_dir: str | Path | None = None):
        self.records = list(records)
        self.cfg = cfg
        self.samples = group_patients(self.records, cfg)
        self.caches = {spec.name: ImageCache(cache_dir, {"kind": spec.kind, **spec.preprocessing()},
                                             subdir="images" if spec.kind == "image" else spec.kind + "s")
                       for spec in cfg.modalities if spec.kind in PATH_KINDS} if cache_dir else {}
        self._memory: dict[tuple[str, Path], np.ndarray] = {}
        self._absent = {spec.name: absent_input(spec) for spec in cfg.modalities}
        # Text and tabular encodings are cheap and small: compute them once, up front.
        self._encoded: dict[str, list[list[torch.Tensor]]] = {}
        for spec in cfg.modalities:
            if spec.kind == "text":
                self._encoded[spec.name] = [[torch.from_numpy(tokenize(v, spec)) for v in p.inputs[spec.name]]
                                            for p in self.samples]
            elif spec.kind == "tabular":
                self._encoded[spec.name] = [[torch.from_numpy(encode_tabular(v, spec.columns))
                                             for v in p.inputs[spec.name]] for p in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def cache(self) -> ImageCache | None:
        """The cache of the first imaging modality (hit/miss counts for reports), or ``None``."""
        return next(iter(self.caches.values()), None)

    def decoded(self, name: str, path: Path) -> np.ndarray:
        """Decoded input of modality ``name`` from ``path`` (memory, then disk cache, then decode)."""
        key = (name, path)
        if key in self._memory:
            return self._memory[key]
        spec = self.cfg.modality(name)
        cache = self.caches.get(name)
        array = cache.get(path) if cache else None
        if array is None:
            try:
                array = np.ascontiguousarray(_decode(spec, path), dtype=np.float32)
            except InputError as exc:  # validation decoded it: the file changed since
                row = next((r.row for r in self.records if path in r.inputs.get(name, ())), None)
                raise InputError(f"{exc.message} (it decoded when the manifest was read: did it change?)",
                                 file=path, row=row, key=spec.column or spec.name) from exc
            if cache:
                cache.put(path, array)
        self._memory[key] = array
        return array

    def _inputs(self, spec, index: int) -> list[torch.Tensor]:
        if spec.kind in PATH_KINDS:
            return [torch.from_numpy(self.decoded(spec.name, p)) for p in self.samples[index].inputs[spec.name]]
        return self._encoded[spec.name][index]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        item: dict = {}
        instances = {}
        for spec in self.cfg.modalities:
            values = self._inputs(spec, index)
            if spec.max_count == 1:
                item[spec.name] = values[0] if values else self._absent[spec.name]
            else:
                stacked = self._absent[spec.name].clone()
                for k, v in enumerate(values):
                    stacked[k] = v
                item[spec.name] = stacked
                filled = torch.zeros(spec.max_count, dtype=torch.float32)
                filled[:len(values)] = 1.0
                instances[spec.name] = filled
        item["mask"] = torch.tensor(sample.mask, dtype=torch.float32)
        item["instances"] = instances
        item["label"] = torch.tensor(-1 if sample.label is None else sample.label)  # -1: read only to predict
        return item

    def collate(self, items: list[dict]) -> dict:
        """Stack items into a batch; an empty list gives an empty batch of the right shapes."""
        if items:
            return default_collate(items)
        empty = {spec.name: self._absent[spec.name].new_zeros((0, *self._absent[spec.name].shape))
                 for spec in self.cfg.modalities}
        empty["mask"] = torch.zeros((0, len(self.cfg.modalities)))
        empty["instances"] = {spec.name: torch.zeros((0, spec.max_count))
                              for spec in self.cfg.modalities if spec.max_count > 1}
        empty["label"] = torch.zeros((0,), dtype=torch.int64)
        return empty

    def warm(self, progress: bool = True) -> None:
        """Decode every image, volume and signal now (fills the disk cache), with a progress bar
        (lines without a terminal)."""
        from clinfuse.progress import Progress

        todo = [(spec.name, p) for spec in self.cfg.modalities if spec.kind in PATH_KINDS
                for sample in self.samples for p in sample.inputs[spec.name]]
        for name, path in Progress(len(todo), "decoding inputs", "file", enabled=progress).track(todo):
            self.decoded(name, path)


def _decode(spec, path: Path) -> np.ndarray:
    if spec.kind == "image":
        from clinfuse.config import ImageConfig
        from clinfuse.data.images import decode_image

        # the preprocessing part only: the transform is cached per distinct ImageConfig
        return decode_image(path, ImageConfig(**{k: getattr(spec, k) for k in ImageConfig.model_fields}))
    if spec.kind == "volume":
        from clinfuse.data.volumes import decode_volume

        return decode_volume(path, spec)
    from clinfuse.data.signals import decode_signal

    return decode_signal(path, spec)


def move_batch(batch, device):
    """A batch (nested dicts of tensors) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch
