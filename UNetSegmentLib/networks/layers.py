"""The only place that turns (layer kind, spatial_dims) into a torch class.

Every network is written once for 2D and 3D; keeping the dimension switch here means no other
network file names nn.Conv2d / nn.Conv3d / nn.InstanceNorm3d, so adding a layer kind or changing
a default (e.g. norm affine) happens in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_MAX_POOL = {2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}

NORMS = ("instance", "batch", "group", "none")
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "gelu", "none")


def _dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.",
                         "Use 2 for slice-wise models and 3 for volumetric models.")
    return spatial_dims


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
         stride: int = 1, bias: bool = True) -> nn.Module:
    """'Same' padded convolution: the output size is the input size divided by `stride`.

    `kernel_size` and `stride` may be per-axis sequences (nnU-Net plans use anisotropic kernels)."""
    if isinstance(kernel_size, (tuple, list)):
        kernel_size = tuple(int(k) for k in kernel_size)
        padding = tuple((k - 1) // 2 for k in kernel_size)
    else:
        padding = (kernel_size - 1) // 2
    if isinstance(stride, (tuple, list)):
        stride = tuple(int(s) for s in stride)
    return _CONV[_dims(spatial_dims)](in_channels, out_channels, kernel_size, stride=stride,
                                      padding=padding, bias=bias)


def conv_transpose(spatial_dims: int, in_channels: int, out_channels: int, scale: int = 2,
                   bias: bool = True) -> nn.Module:
    """Learned upsampling by an exact integer factor (kernel = stride = scale, no overlap); per-axis allowed."""
    scale = tuple(int(s) for s in scale) if isinstance(scale, (tuple, list)) else scale
    return _CONV_TRANSPOSE[_dims(spatial_dims)](in_channels, out_channels, scale, stride=scale, bias=bias)


def norm(name: str, spatial_dims: int, channels: int) -> nn.Module:
    """Feature normalisation by name; instance and group norms are affine so they can learn a scale."""
    _dims(spatial_dims)
    if name == "instance":
        return _INSTANCE_NORM[spatial_dims](channels, affine=True)
    if name == "batch":
        return _BATCH_NORM[spatial_dims](channels)
    if name == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if name == "none":
        return nn.Identity()
    raise InputError(f"Unknown normalisation '{name}'.", f"Choose one of: {', '.join(NORMS)}.")


def check_norm(name: str) -> str:
    """Validate a norm name at construction time, before any layer is built."""
    if name not in NORMS:
        raise InputError(f"Unknown normalisation '{name}'.", f"Choose one of: {', '.join(NORMS)}.")
    return name


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":  # nnU-Net's slope
        return nn.LeakyReLU(0.01, inplace=True)
    if name == "prelu":
        return nn.PReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "none":
        return nn.Identity()
    raise InputError(f"Unknown activation '{name}'.", f"Choose one of: {', '.join(ACTIVATIONS)}.")


def max_pool(spatial_dims: int, scale: int = 2) -> nn.Module:
    return _MAX_POOL[_dims(spatial_dims)](scale, stride=scale)


def avg_pool(spatial_dims: int, scale=2) -> nn.Module:
    scale = tuple(int(s) for s in scale) if isinstance(scale, (tuple, list)) else scale
    return _AVG_POOL[_dims(spatial_dims)](scale, stride=scale)


def global_max_pool(spatial_dims: int) -> nn.Module:
    return _ADAPTIVE_MAX_POOL[_dims(spatial_dims)](1)


def dropout(spatial_dims: int, probability: float) -> nn.Module:
    """Channel dropout; an identity when `probability` is 0 so the module tree stays the same."""
    if not 0.0 <= probability < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {probability!r}.", "Pass e.g. dropout=0.1 or 0.")
    return _DROPOUT[_dims(spatial_dims)](probability) if probability > 0 else nn.Identity()


def resize(x: torch.Tensor, size: tuple[int, ...], mode: str = "linear") -> torch.Tensor:
    """Resample feature maps to `size`; 'linear' means bilinear in 2D and trilinear in 3D."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "linear":
        return F.interpolate(x, size=size, mode=_LINEAR_MODE[x.dim() - 2], align_corners=False)
    return F.interpolate(x, size=size, mode=mode)


def upsample(x: torch.Tensor, scale: int, mode: str = "linear") -> torch.Tensor:
    if scale == 1:
        return x
    return resize(x, tuple(s * scale for s in x.shape[2:]), mode)
