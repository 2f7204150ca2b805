"""Volume encoders: a 3-D volume ``[B, 1, D, H, W]`` in, a feature vector ``[B, dim]`` out.

Built DP-valid from the start, as the 2-D encoders (:mod:`clinfuse.models.encoders.image`):

* ``small_cnn3d`` — strided 3x3x3 convolutions with GroupNorm, global average pooling and a
  linear projection; the fast CPU default (a 32x64x64 volume).
* ``densenet121`` — MONAI ``DenseNet121`` with ``spatial_dims=3``, GroupNorm(8), non-in-place ReLU.
* ``resnet10`` / ``resnet18`` — MONAI ``ResNet`` with ``spatial_dims=3`` and the DP-valid block.

``pretrained`` loads a local ``state_dict`` file; nothing is ever downloaded.
"""

from __future__ import annotations

from torch import nn

from clinfuse.config import VolumeEncoderConfig
from clinfuse.errors import InputError
from clinfuse.models.encoders.image import SmallCNN, load_pretrained, monai_densenet121, monai_resnet

_HEAD_PREFIXES = {"small_cnn3d": ("proj.",), "densenet121": ("class_layers.out.",), "resnet10": ("fc.",),
                  "resnet18": ("fc.",)}
# smallest side the MONAI backbones take (stem /4 then three /2 stages)
_MIN_SIDE = {"small_cnn3d": 1, "densenet121": 32, "resnet10": 16, "resnet18": 16}


def build_volume_encoder(cfg: VolumeEncoderConfig, dim: int, size: tuple[int, int, int] | None = None, *,
                         key: str = "encoder") -> nn.Module:
    """Build the configured volume encoder: ``[B, 1, D, H, W] float32 -> [B, dim]``.

    ``size`` (D, H, W), when given, is checked against the backbone's smallest input side.
    """
    name = cfg.name
    if size is not None and min(size) < _MIN_SIDE[name]:
        raise InputError(f"{name} needs volumes of at least {_MIN_SIDE[name]} voxels per side, configured "
                         f"size is {'x'.join(str(s) for s in size)}", key=key.rsplit(".", 1)[0] + ".size")
    if name == "small_cnn3d":
        net = SmallCNN(cfg.channels, dim, spatial_dims=3, key=f"{key}.channels")
    elif name == "densenet121":
        net = monai_densenet121(dim, spatial_dims=3)
    elif name == "resnet10":
        net = monai_resnet([1, 1, 1, 1], dim, spatial_dims=3)
    else:
        net = monai_resnet([2, 2, 2, 2], dim, spatial_dims=3)
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained, _HEAD_PREFIXES[name], key=f"{key}.pretrained")
    net.out_dim = dim
    return net
