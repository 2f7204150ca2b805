"""Per-modality encoders, one builder per modality kind (:data:`ENCODERS`); each maps one
modality's batch tensor to features ``[B, dim]``."""

from __future__ import annotations

from clinfuse.models.encoders.image import build_image_encoder
from clinfuse.models.encoders.signal import build_signal_encoder
from clinfuse.models.encoders.tabular import build_tabular_encoder
from clinfuse.models.encoders.text import build_text_encoder, save_pretrained_text_encoder
from clinfuse.models.encoders.volume import build_volume_encoder


def _image(spec, dim, dropout, key):
    return build_image_encoder(spec.encoder, dim, tuple(spec.size))


def _volume(spec, dim, dropout, key):
    return build_volume_encoder(spec.encoder, dim, tuple(spec.size), key=key)


def _text(spec, dim, dropout, key):
    return build_text_encoder(spec.encoder, dim, buckets=spec.hash_buckets, text_len=spec.max_tokens,
                              dropout=dropout)


def _tabular(spec, dim, dropout, key):
    from clinfuse.data.tabular import tabular_dim

    return build_tabular_encoder(spec.encoder, dim, tabular_dim=tabular_dim(spec.columns), dropout=dropout)


def _signal(spec, dim, dropout, key):
    return build_signal_encoder(spec.encoder, dim, spec.channels, key=key)


#: Encoder builder per modality kind: ``(spec, dim, dropout, key) -> nn.Module`` mapping one input
#: of the modality (batched) to ``[B, dim]``. ``key`` names the encoder's config key in errors.
ENCODERS = {"image": _image, "volume": _volume, "text": _text, "tabular": _tabular, "signal": _signal}


def build_encoder(spec, dim: int, *, dropout: float = 0.0):
    """The encoder of one modality spec (a :data:`clinfuse.config.Modality`)."""
    return ENCODERS[spec.kind](spec, dim, dropout, f"modalities.{spec.name}.encoder")


__all__ = ["ENCODERS", "build_encoder", "build_image_encoder", "build_signal_encoder", "build_tabular_encoder",
           "build_text_encoder", "build_volume_encoder", "save_pretrained_text_encoder"]
