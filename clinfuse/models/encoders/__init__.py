"""Per-modality encoders; each maps one modality's batch tensor to features ``[B, dim]``."""

from clinfuse.models.encoders.image import build_image_encoder
from clinfuse.models.encoders.tabular import build_tabular_encoder
from clinfuse.models.encoders.text import build_text_encoder, save_pretrained_text_encoder

__all__ = ["build_image_encoder", "build_tabular_encoder", "build_text_encoder",
           "save_pretrained_text_encoder"]
