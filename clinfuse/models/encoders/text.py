"""Text encoders: hashed n-gram ids ``int64 [B, L]`` (0 = padding) in, ``[B, dim]`` out.

* ``hashed_bag`` — token embeddings + masked mean + small MLP. By default the embedding table is a
  *fixed random projection* (``trainable_embedding: false``): drawn once from a dedicated seeded
  generator, so every site builds the same table without exchanging it, and not trained, so
  DP-SGD computes per-sample gradients only for the small MLP above it (a trainable
  ``buckets x dim`` table costs a dense ``[B, buckets, dim]`` per-sample gradient each step: about
  half of the DP step time of the demo model). ``nn.EmbeddingBag`` is avoided: Opacus supports it
  only in the 1-D + offsets form and not in the ew/functorch modes.
* ``transformer`` — a small pre-norm transformer on :class:`BatchFirstDPMultiheadAttention`
  (``opacus.layers.DPMultiheadAttention`` with a corrected batch-first forward) with a *bool*
  key-padding mask (``nn.TransformerEncoder`` turns masks into floats, which breaks
  DPMultiheadAttention), a learned positional embedding and a masked mean pool.
* ``pretrained`` — a frozen encoder of one of the two kinds above, trained elsewhere on the same
  hashing scheme (e.g. on public notes) and stored in a local directory by
  :func:`save_pretrained_text_encoder`, followed by a trainable linear projection. Its output
  depends on the input only, so embeddings may be cached (``frozen = True`` tells the trainer).

An all-padding row (absent note) gives finite features; the fusion model masks them out.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from opacus.layers import DPMultiheadAttention
from torch import nn

from clinfuse.config import TextEncoderConfig
from clinfuse.errors import InputError

PRETRAINED_META = "clinfuse-text-encoder.json"
PRETRAINED_WEIGHTS = "weights.pt"


class BatchFirstDPMultiheadAttention(DPMultiheadAttention):
    """``DPMultiheadAttention`` for ``[B, T, E]`` inputs, merging heads correctly.

    Opacus 1.6's ``DPMultiheadAttention(batch_first=True)`` reshapes its ``[B*H, T, d]`` output
    straight to ``[B, T, E]``, splicing heads into time positions whenever ``H > 1`` and
    ``T > 1`` (opacus PR #825). This subclass keeps its layers (``qlinear``, ``klinear``,
    ``vlinear``, ``out_proj``: plain ``nn.Linear``, so Opacus computes their per-sample
    gradients in every mode) and replaces the forward pass. Supported: a bool
    ``key_padding_mask [B, S]`` (True = ignore); no ``attn_mask``, bias_kv or zero_attn.
    ``state_dict``/``load_state_dict`` are ``nn.Module``'s (the parent's rename keys).
    """

    state_dict = nn.Module.state_dict
    load_state_dict = nn.Module.load_state_dict

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(embed_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                is_causal=False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attn_mask / is_causal are not supported")
        b, t, e = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.qlinear(query).view(b, t, h, d).transpose(1, 2) * float(d) ** -0.5
        k = self.klinear(key).view(b, s, h, d).transpose(1, 2)
        v = self.vlinear(value).view(b, s, h, d).transpose(1, 2)
        logits = q @ k.transpose(-2, -1)  # [B, H, T, S]
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (b, s):
                raise ValueError(f"key_padding_mask must be bool [{b}, {s}]")
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = self.dropout(torch.softmax(logits, dim=-1))
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, e))
        return out, (weights.mean(dim=1) if need_weights else None)


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, L, d]`` over positions where ``keep [B, L]`` is true; zeros for empty rows."""
    w = keep.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class HashedBagEncoder(nn.Module):
    """Bag of hashed n-grams: mean of token embeddings over non-padding positions, then an MLP.

    ``ids int64 [B, L]`` (0 = padding) in, ``[B, dim]`` out.

    ``trainable_embedding=True``: a learned ``nn.Embedding(buckets, dim)`` (``embed.weight``).
    ``trainable_embedding=False``: a frozen table ``[buckets, embedding_dim]`` (buffer ``table``,
    saved in the state dict) with entries ``N(0, 1/embedding_dim)`` drawn from
    ``torch.Generator().manual_seed(seed)`` -- independent of torch's global RNG, so every site
    and every rebuild gets the identical table -- with row 0 (padding) zero; then a trainable
    ``Linear(embedding_dim, dim)`` and the MLP. The mean of fixed random vectors is a random
    projection of the n-gram counts, which keeps the bag's information up to a small distortion
    when ``embedding_dim`` is a few hundred.
    """

    def __init__(self, buckets: int, dim: int, dropout: float = 0.0, *, trainable_embedding: bool = True,
                 embedding_dim: int | None = None, seed: int = 0):
        super().__init__()
        self.buckets = buckets
        self.trainable_embedding = bool(trainable_embedding)
        self.seed = int(seed)
        if self.trainable_embedding:
            self.embedding_dim = dim
            self.embed = nn.Embedding(buckets, dim, padding_idx=0)
            self.proj = nn.Identity()
        else:
            self.embedding_dim = int(embedding_dim or dim)
            g = torch.Generator().manual_seed(self.seed)
            table = torch.randn(buckets, self.embedding_dim, generator=g) / float(self.embedding_dim) ** 0.5
            table[0] = 0.0
            self.register_buffer("table", table)
            self.proj = nn.Linear(self.embedding_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.out_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != 0
        if self.trainable_embedding:
            return self.mlp(_masked_mean(self.embed(ids), keep))
        # The bag mean is a constant of the input (no parameter before it): Opacus sees only the
        # Linear layers. Scaling by sqrt(embedding_dim) gives unit-variance features per n-gram.
        bag = _masked_mean(self.table[ids], keep) * float(self.embedding_dim) ** 0.5
        return self.mlp(self.proj(bag))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = BatchFirstDPMultiheadAttention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerTextEncoder(nn.Module):
    """Small transformer over hashed ids with learned positions and a masked mean pool."""

    def __init__(self, buckets: int, dim: int, max_len: int, layers: int = 1, heads: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise InputError(f"model.dim ({dim}) must be divisible by the number of heads ({heads})",
                             key="model.text_encoder.heads")
        self.buckets = buckets
        self.max_len = max_len
        self.embed = nn.Embedding(buckets, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"text has {length} tokens, the encoder was built for {self.max_len}")
        keep = ids != 0
        pad = ~keep
        # A row of padding only would mask every key and softmax would return NaN; let such rows
        # attend to position 0. Their features are discarded by the fusion mask anyway.
        pad[:, 0] &= keep.any(dim=1)
        positions = torch.arange(length, device=ids.device).unsqueeze(0).expand(b, length)
        x = self.embed(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x, pad)
        return _masked_mean(self.norm(x), keep)


class PretrainedTextEncoder(nn.Module):
    """A frozen local encoder followed by a trainable ``Linear(encoder_dim, dim)``.

    The inner encoder runs in eval mode under ``no_grad`` and has ``requires_grad=False``, so
    Opacus ignores it and its output is a fixed function of the ids: the trainer may cache it.
    """

    frozen = True

    def __init__(self, encoder: nn.Module, dim: int):
        super().__init__()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.encoder = encoder.eval()
        self.proj = nn.Linear(encoder.out_dim, dim)
        self.out_dim = dim

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # dropout in a frozen encoder would only add noise to cached features
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The frozen features ``[B, encoder_dim]`` (what a cache would store)."""
        with torch.no_grad():
            return self.encoder(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def save_pretrained_text_encoder(encoder: nn.Module, path: str | Path) -> Path:
    """Store a :class:`HashedBagEncoder` or :class:`TransformerTextEncoder` in directory ``path``.

    Writes ``clinfuse-text-encoder.json`` (architecture) and ``weights.pt`` (state_dict), each
    atomically. Returns the directory. Only train such an encoder on data you may share.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(encoder, HashedBagEncoder):
        meta = {"name": "hashed_bag", "hash_buckets": encoder.buckets, "dim": encoder.out_dim,
                "trainable_embedding": encoder.trainable_embedding,
                "embedding_dim": encoder.embedding_dim, "seed": encoder.seed}
    elif isinstance(encoder, TransformerTextEncoder):
        meta = {"name": "transformer", "hash_buckets": encoder.buckets, "dim": encoder.out_dim,
                "max_len": encoder.max_len, "layers": len(encoder.blocks),
                "heads": encoder.blocks[0].attn.num_heads if len(encoder.blocks) else 1}
    else:
        raise TypeError(f"cannot save a {type(encoder).__name__} as a clinfuse text encoder")
    tmp = path / (PRETRAINED_WEIGHTS + ".tmp")
    torch.save(encoder.state_dict(), tmp)
    tmp.replace(path / PRETRAINED_WEIGHTS)
    tmp = path / (PRETRAINED_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp.replace(path / PRETRAINED_META)
    return path


def load_pretrained_text_encoder(path: str | Path, *, buckets: int, text_len: int) -> nn.Module:
    """Read an encoder written by :func:`save_pretrained_text_encoder` (not yet frozen).

    ``buckets`` and ``text_len`` are the ones the data pipeline produces; an encoder trained on
    another number of hash buckets would read unrelated ids, so that is refused.
    """
    key = "model.text_encoder.path"
    path = Path(path)
    if not path.is_dir():
        raise InputError("pretrained text encoder directory not found", file=path, key=key)
    meta_file = path / PRETRAINED_META
    if not meta_file.is_file():
        if (path / "config.json").is_file():
            raise InputError(
                "this looks like a HuggingFace model directory; those are not supported: they need "
                "their own tokenizer's ids, while clinfuse feeds hashed n-gram ids (and the optional "
                "'transformers' package is not a clinfuse dependency). Use a directory written by "
                "clinfuse.models.encoders.text.save_pretrained_text_encoder", file=path, key=key)
        raise InputError(f"no {PRETRAINED_META} in this directory (write one with "
                         "clinfuse.models.encoders.text.save_pretrained_text_encoder)", file=path, key=key)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        name = meta["name"]
        enc_buckets, enc_dim = int(meta["hash_buckets"]), int(meta["dim"])
        if name == "hashed_bag":
            # directories written before the frozen-table option hold a trained table
            enc: nn.Module = HashedBagEncoder(
                enc_buckets, enc_dim, trainable_embedding=bool(meta.get("trainable_embedding", True)),
                embedding_dim=int(meta.get("embedding_dim", enc_dim)), seed=int(meta.get("seed", 0)))
        elif name == "transformer":
            enc = TransformerTextEncoder(enc_buckets, enc_dim, int(meta["max_len"]),
                                         int(meta["layers"]), int(meta["heads"]))
        else:
            raise InputError(f"unknown encoder name '{name}'", file=meta_file, key="name")
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"unreadable encoder description: {exc!r}", file=meta_file) from None
    if enc_buckets != buckets:
        raise InputError(f"encoder was trained on {enc_buckets} hash buckets, the data pipeline "
                         f"uses {buckets} (data.text.hash_buckets)", file=meta_file, key="hash_buckets")
    if name == "transformer" and enc.max_len < text_len:
        raise InputError(f"encoder handles {enc.max_len} tokens, the data pipeline gives {text_len} "
                         "(data.text.max_tokens)", file=meta_file, key="max_len")
    weights = path / PRETRAINED_WEIGHTS
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        enc.load_state_dict(state, strict=True)
    except FileNotFoundError:
        raise InputError(f"{PRETRAINED_WEIGHTS} is missing", file=path, key=key) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise InputError(f"weights do not fit the described encoder: {exc}", file=weights,
                         key=key) from None
    return enc


def build_text_encoder(cfg: TextEncoderConfig, dim: int, *, buckets: int, text_len: int,
                       dropout: float = 0.0) -> nn.Module:
    """Build the configured text encoder: ``int64 [B, text_len] -> [B, dim]``."""
    if cfg.name == "hashed_bag":
        return HashedBagEncoder(buckets, dim, dropout, trainable_embedding=cfg.trainable_embedding,
                                embedding_dim=cfg.embedding_dim, seed=cfg.embedding_seed)
    if cfg.name == "transformer":
        return TransformerTextEncoder(buckets, dim, text_len, cfg.layers, cfg.heads, dropout)
    if cfg.name == "pretrained":
        if not cfg.path:
            raise InputError("text_encoder 'pretrained' needs a local directory in 'path'",
                             key="model.text_encoder.path")
        return PretrainedTextEncoder(load_pretrained_text_encoder(cfg.path, buckets=buckets,
                                                                  text_len=text_len), dim)
    raise InputError(f"unknown text encoder '{cfg.name}'", key="model.text_encoder.name")
