"""The multimodal model: encoders (``clinfuse.models.encoders``) and fusion (``clinfuse.models.fusion``)."""

from clinfuse.models.fusion import FusionModel, build_model, group_of, parameter_counts, parameter_groups

__all__ = ["FusionModel", "build_model", "group_of", "parameter_counts", "parameter_groups"]
