"""Image encoders: a 2-D image ``[B, 1, H, W]`` in, a feature vector ``[B, dim]`` out.

Every encoder here is built DP-valid from the start (no BatchNorm, no in-place activation, no
in-place residual add), so Opacus can compute per-sample gradients with its hooks without
``ModuleValidator.fix`` renaming parameters afterwards:

* ``small_cnn`` — strided 3x3 convolutions with GroupNorm, global average pooling and a linear
  projection; the fast CPU default (64x64 images).
* ``densenet121`` — MONAI ``DenseNet121`` with GroupNorm(8) and non-in-place ReLU.
* ``resnet10`` / ``resnet18`` — MONAI ``ResNet`` with :class:`DPResNetBlock`: MONAI's own blocks
  keep BatchNorm, an in-place ReLU and ``out += residual`` whatever ``norm``/``act`` the network
  is given, which Opacus' backward hooks reject.

``pretrained`` loads a local ``state_dict`` file into the backbone; nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from clinfuse.config import ImageEncoderConfig
from clinfuse.errors import InputError

_PRETRAINED_KEY = "model.image_encoder.pretrained"
# The final projection of each backbone maps to cfg.model.dim; a checkpoint trained for another
# width or task may differ there only, and that layer then keeps its fresh initialisation.
_HEAD_PREFIXES = {
    "small_cnn": ("proj.",),
    "densenet121": ("class_layers.out.",),
    "resnet10": ("fc.",),
    "resnet18": ("fc.",),
}
# Overall downsampling factor of the MONAI backbones (stem /4, then three /2 stages).
_MIN_SIDE = {"small_cnn": 1, "densenet121": 32, "resnet10": 32, "resnet18": 32}


def _group_count(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` (GroupNorm needs one)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class SmallCNN(nn.Module):
    """Strided-conv encoder: ``[B, in_channels, *spatial] -> [B, dim]``, for images (2-D, the
    default), volumes (``spatial_dims=3``) and signals (``spatial_dims=1``).

    One stage per entry of ``channels``: a ``kernel_size`` conv with stride 2, GroupNorm, ReLU.
    Then a global average pool and a linear projection to ``dim``. GroupNorm normalises each
    sample on its own, so per-sample gradients stay per-sample (BatchNorm would mix samples).
    """

    def __init__(self, channels: Sequence[int], dim: int, in_channels: int = 1, *, spatial_dims: int = 2,
                 kernel_size: int = 3, key: str = "model.image_encoder.channels"):
        super().__init__()
        if not channels:
            raise InputError("needs at least one channel count", key=key)
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            if c < 1:
                raise InputError(f"channel counts must be positive, got {c}", key=key)
            layers += [_CONV[spatial_dims](prev, c, kernel_size=kernel_size, stride=2, padding=kernel_size // 2,
                                           bias=False),
                       nn.GroupNorm(_group_count(c), c),
                       nn.ReLU(inplace=False)]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = _POOL[spatial_dims](1)
        self.proj = nn.Linear(prev, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.features(x)).flatten(1))


class DPResNetBlock(nn.Module):
    """Basic ResNet block for ``monai.networks.nets.ResNet(block=DPResNetBlock)``.

    Same constructor signature and parameter names as MONAI's ``ResNetBlock`` (so MONAI
    checkpoints of the GroupNorm variant load), but: GroupNorm instead of the ``norm`` argument
    (MONAI's ``_make_layer`` always passes ``"batch"``), a non-in-place ReLU instead of ``act``,
    ``out + residual`` instead of ``out += residual``, and the BatchNorm in a type-B shortcut
    replaced by GroupNorm.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 2, stride: int = 1,
                 downsample: nn.Module | None = None, act=None, norm=None):
        super().__init__()
        del act, norm  # see the class docstring: both are overridden on purpose
        if spatial_dims not in _CONV:
            raise ValueError(f"DPResNetBlock supports 1, 2 or 3 spatial dims, not {spatial_dims}")
        conv = _CONV[spatial_dims]
        self.conv1 = conv(in_planes, planes, kernel_size=3, padding=1, stride=stride, bias=False)
        self.bn1 = nn.GroupNorm(_group_count(planes), planes)
        self.act = nn.ReLU(inplace=False)
        self.conv2 = conv(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.GroupNorm(_group_count(planes), planes)
        if isinstance(downsample, nn.Sequential):
            for i, layer in enumerate(downsample):
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    downsample[i] = nn.GroupNorm(_group_count(layer.num_features), layer.num_features)
        elif downsample is not None and not isinstance(downsample, nn.Module):
            # Shortcut type "A" is a function built on ``tensor.data``, which would cut the
            # gradient path; only type "B" is used here.
            raise ValueError("DPResNetBlock needs shortcut_type='B'")
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


def monai_resnet(layers: list[int], dim: int, spatial_dims: int = 2) -> nn.Module:
    """MONAI ``ResNet`` with :class:`DPResNetBlock` (2-D images or, ``spatial_dims=3``, volumes)."""
    from monai.networks.nets import ResNet

    return ResNet(
        block=DPResNetBlock, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=spatial_dims,
        n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, no_max_pool=False,
        shortcut_type="B", num_classes=dim, feed_forward=True,
        act=("relu", {"inplace": False}), norm=("group", {"num_groups": 8}),
    )


def monai_densenet121(dim: int, spatial_dims: int = 2) -> nn.Module:
    """MONAI ``DenseNet121`` built DP-valid: GroupNorm(8), non-in-place ReLU."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=dim,
                       norm=("group", {"num_groups": 8}), act=("relu", {"inplace": False}))


def _read_state_dict(path: Path, key: str = _PRETRAINED_KEY) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError("pretrained image weights not found (a local state_dict file is needed; "
                         "nothing is downloaded)", file=path, key=key)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise InputError(f"cannot read a state_dict from this file: {exc}", file=path,
                         key=key) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError("expected a state_dict (a mapping of parameter names to tensors)",
                         file=path, key=key)
    out = {}
    for k, v in obj.items():
        # Opacus and DataParallel wrappers prefix names; the bare backbone has none.
        for prefix in ("_module.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_pretrained(backbone: nn.Module, path: str | Path, head_prefixes: Sequence[str] = (), *,
                    key: str = _PRETRAINED_KEY) -> None:
    """Load a local ``state_dict`` file into ``backbone`` in place.

    Keys must match the backbone's exactly (after dropping ``_module.``/``module.`` prefixes);
    tensors under ``head_prefixes`` may differ in shape, and are then left as initialised.
    Raises :class:`InputError` naming the file and the first mismatching keys otherwise.
    """
    path = Path(path)
    state = _read_state_dict(path, key)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise InputError("weights do not fit the configured encoder: " + "; ".join(parts),
                         file=path, key=key)
    for k, v in list(state.items()):
        if v.shape != own[k].shape:
            if k.startswith(tuple(head_prefixes)):
                state[k] = own[k]
            else:
                raise InputError(f"shape mismatch for '{k}': file has {tuple(v.shape)}, "
                                 f"encoder needs {tuple(own[k].shape)}", file=path, key=key)
    backbone.load_state_dict(state, strict=True)


def build_image_encoder(cfg: ImageEncoderConfig, dim: int,
                        image_size: tuple[int, int] | None = None) -> nn.Module:
    """Build the configured image encoder: ``[B, 1, H, W] float32 -> [B, dim]``.

    ``image_size`` (H, W), when given, is checked against the backbone's minimum input side.
    ``cfg.pretrained`` (local path) is loaded with :func:`load_pretrained`.
    """
    name = cfg.name
    if image_size is not None:
        h, w = image_size
        if min(h, w) < _MIN_SIDE[name]:
            raise InputError(f"{name} needs images of at least {_MIN_SIDE[name]}x{_MIN_SIDE[name]} "
                             f"pixels, configured size is {h}x{w}", key="data.image.size")
    if name == "small_cnn":
        net = SmallCNN(cfg.channels, dim)
    elif name == "densenet121":
        net = monai_densenet121(dim)
    elif name == "resnet10":
        net = monai_resnet([1, 1, 1, 1], dim)
    elif name == "resnet18":
        net = monai_resnet([2, 2, 2, 2], dim)
    else:  # the config's Literal makes this unreachable from YAML
        raise InputError(f"unknown image encoder '{name}'", key="model.image_encoder.name")
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained, _HEAD_PREFIXES[name])
    net.out_dim = dim
    return net
