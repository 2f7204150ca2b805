"""Clinical note normalisation and data-independent tokenisation.

Notes become hashed word n-gram ids. The hash is fixed (blake2b of the n-gram), so no
vocabulary is ever fitted on a site's notes: a fitted vocabulary would carry rare words —
patient names, say — out of the site inside the model. Collisions are the price of that.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

from clinfuse.config import TextConfig

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
PAD_ID = 0


def normalize_note(text: object) -> str | None:
    """Return the note as normalised text, or ``None`` when it is missing or blank.

    Unicode is NFKC-folded and whitespace collapsed; an empty note counts as a missing note.
    """
    if text is None:
        return None
    if isinstance(text, float) and np.isnan(text):
        return None
    text = unicodedata.normalize("NFKC", str(text))
    text = " ".join(text.split())
    return text or None


def _bucket(token: str, buckets: int) -> int:
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    # id 0 is padding, so real tokens live in [1, buckets).
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def tokenize(note: str | None, cfg: TextConfig) -> np.ndarray:
    """Hash a note into ``cfg.max_tokens`` int64 ids (0 = padding; all zeros for no note).

    Word n-grams of length 1..``cfg.ngram_max`` are emitted position by position (the unigram
    at word i, then the bigram starting at i, ...), so truncation keeps the start of the note.
    """
    ids = np.zeros(cfg.max_tokens, dtype=np.int64)
    if not note:
        return ids
    words = _WORD.findall(note.lower() if cfg.lowercase else note)
    out = 0
    for i in range(len(words)):
        for n in range(1, cfg.ngram_max + 1):
            if i + n > len(words):
                break
            if out == cfg.max_tokens:
                return ids
            ids[out] = _bucket(" ".join(words[i:i + n]), cfg.hash_buckets)
            out += 1
    return ids
