"""Multimodal dataset: per-record tensors plus a modality mask, with a disk cache of decoded images.

Each item is the tuple ``(image, text, tabular, mask, label)``:

- ``image``   float32 ``[1, H, W]`` (zeros when absent)
- ``text``    int64 ``[max_tokens]`` hashed n-gram ids, 0 = padding (zeros when absent)
- ``tabular`` float32 ``[D]`` declared-range encoding with missing flags
- ``mask``    float32 ``[3]`` = (has_image, has_text, has_tabular)
- ``label``   int64 scalar

Absent modalities are placeholders that the model masks; nothing is imputed from other patients.

Images are decoded once. The decoded array is stored in the site's cache directory under a key
made of the image file's content hash and the preprocessing settings, so later epochs and later
processes (a Flower ClientApp is a new process every round) read it back instead of decoding.
Entries carry a checksum; a corrupt entry is detected, rebuilt and overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from clinfuse.config import Config
from clinfuse.data.manifest import Record
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
    """Content-addressed store of decoded images.

    An entry is ``sha256(payload) || payload`` where payload is the ``.npy`` bytes; reading checks
    the digest, so a truncated or altered entry is rebuilt instead of feeding garbage to training.
    """

    def __init__(self, root: str | Path, image_settings: dict):
        self.root = Path(root) / "images"
        self._settings = json.dumps({**image_settings, "decoder": DECODER_VERSION}, sort_keys=True)
        self._keys: dict[tuple, str] = {}
        self.hits = self.misses = self.rebuilt = 0

    def key(self, path: Path) -> str:
        stat = path.stat()
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in self._keys:
            digest = hashlib.sha256(self._settings.encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
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


class MultimodalDataset(Dataset):
    """Records of one site as model-ready tensors (see the module docstring for the item layout).

    Parameters
    ----------
    records: validated manifest records (``read_manifest(...).records``, possibly one split).
    cfg: the study configuration; preprocessing comes from ``cfg.data``.
    cache_dir: where decoded images are kept between processes; ``None`` keeps them in memory only.
    """

    def __init__(self, records: Sequence[Record], cfg: Config, cache_dir: str | Path | None = None):
        self.records = list(records)
        self.cfg = cfg
        self.cache = ImageCache(cache_dir, cfg.data.image.model_dump(mode="json")) if cache_dir else None
        self._memory: dict[int, np.ndarray] = {}
        size = tuple(cfg.data.image.size)
        self._blank_image = torch.zeros((1, *size), dtype=torch.float32)
        # Text and tabular encodings are cheap and small: compute them once, up front.
        self._text = [torch.from_numpy(tokenize(r.note, cfg.data.text)) for r in self.records]
        self._tabular = [torch.from_numpy(encode_tabular(r.tabular, cfg.data.tabular)) for r in self.records]
        self.tabular_dim = tabular_dim(cfg.data.tabular)

    def __len__(self) -> int:
        return len(self.records)

    def image_array(self, index: int) -> np.ndarray:
        """Decoded image of record ``index`` (memory, then disk cache, then decode)."""
        from clinfuse.data.images import decode_image

        if index in self._memory:
            return self._memory[index]
        path = self.records[index].image
        array = self.cache.get(path) if self.cache else None
        if array is None:
            try:
                array = np.ascontiguousarray(decode_image(path, self.cfg.data.image), dtype=np.float32)
            except InputError as exc:  # validation decoded it: the file changed since
                raise InputError(f"{exc.message} (it decoded when the manifest was read: did it change?)",
                                 file=path, row=self.records[index].row, key="image") from exc
            if self.cache:
                self.cache.put(path, array)
        self._memory[index] = array
        return array

    def __getitem__(self, index: int):
        record = self.records[index]
        image = (torch.from_numpy(self.image_array(index)) if record.image is not None
                 else self._blank_image)
        mask = torch.tensor(record.mask, dtype=torch.float32)
        label = -1 if record.label is None else record.label  # -1: a row read only to predict
        return image, self._text[index], self._tabular[index], mask, torch.tensor(label)

    def warm(self, progress: bool = True) -> None:
        """Decode every image now (fills the disk cache), with a progress bar (lines without a terminal)."""
        from clinfuse.progress import Progress

        indices = [i for i, r in enumerate(self.records) if r.image is not None]
        for i in Progress(len(indices), "decoding images", "image", enabled=progress).track(indices):
            self.image_array(i)


class PatientSampledDataset(Dataset):
    """One item per *patient*: the privacy unit of DP training.

    With several images per patient, sampling rows would let one patient contribute several
    clipped gradients to a step and break the patient-level guarantee. Here index ``j`` is patient
    ``j``; each access returns one of that patient's records chosen at random, so every patient
    contributes at most one clipped per-sample gradient per step and ``len()`` is the number of
    patients that the accountant's sample rate refers to.
    """

    def __init__(self, dataset: MultimodalDataset, seed: int = 0):
        self.dataset = dataset
        groups: dict[str, list[int]] = defaultdict(list)
        for i, record in enumerate(dataset.records):
            groups[record.patient_id].append(i)
        self.patients = sorted(groups)
        self._rows = [groups[p] for p in self.patients]
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int):
        rows = self._rows[index]
        return self.dataset[rows[0] if len(rows) == 1 else self._rng.choice(rows)]
