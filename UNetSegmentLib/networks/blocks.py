"""Building blocks shared by every architecture: each block exists once, here.

Blocks take `spatial_dims` first and build their layers through `layers`, so the same code serves
2D and 3D. `Encoder` and `Decoder` are the U-shaped skeleton (dynamic-network-architectures style)
that U-Net, Attention U-Net, Residual U-Net and nnU-Net differ from only in the stage block, the
downsampling and the skip gating.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from . import layers

# (in_channels, out_channels, stride) -> one encoder/decoder stage
StageFactory = Callable[[int, int, int], nn.Module]


class ConvNormAct(nn.Sequential):
    """conv -> norm -> (dropout) -> activation, the unit every convolutional stage is built from."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, norm: str = "instance", act: str = "relu", dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.conv = layers.conv(spatial_dims, in_channels, out_channels, kernel_size, stride, bias)
        self.norm = layers.norm(norm, spatial_dims, out_channels)
        self.drop = layers.dropout(spatial_dims, dropout)
        self.act = layers.activation(act)


class ConvStack(nn.Sequential):
    """`num_convs` ConvNormAct units; the first may be strided (nnU-Net's downsampling)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, num_convs: int = 2,
                 stride: int = 1, norm: str = "instance", act: str = "relu", dropout: float = 0.0):
        super().__init__(*[
            ConvNormAct(spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                        stride=stride if i == 0 else 1, norm=norm, act=act, dropout=dropout)
            for i in range(num_convs)])


class ResidualBlock(nn.Module):
    """Two 3x3 convs plus an identity (or 1x1 projection) shortcut, activation after the sum.

    The shortcut gives the gradient a direct path through deep encoders (He et al. 2016), which is
    what the residual U-Nets rely on.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride=1,
                 norm: str = "instance", act: str = "relu", dropout: float = 0.0, kernel_size=3,
                 bias: bool = True, pool_shortcut: bool = False):
        super().__init__()
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                                 norm=norm, act=act, dropout=dropout, bias=bias)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size=kernel_size, norm=norm,
                                 act="none", bias=bias)
        strided = any(s != 1 for s in stride) if isinstance(stride, (tuple, list)) else stride != 1
        if in_channels == out_channels and not strided:
            self.shortcut = nn.Identity()
        elif pool_shortcut:  # ResNet-D (He et al. 2019), as nnU-Net's residual encoders: avg-pool, then 1x1 conv
            shortcut = [layers.avg_pool(spatial_dims, stride)] if strided else []
            if in_channels != out_channels:
                shortcut.append(ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size=1, norm=norm,
                                            act="none", bias=False))
            self.shortcut = nn.Sequential(*shortcut)
        else:
            self.shortcut = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size=1, stride=stride,
                                        norm=norm, act="none")
        self.act = layers.activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) that filters a skip connection.

    The skip is brought to the gating signal's (coarser) grid by a strided projection, added to the
    projected gating signal, passed through ReLU, a 1x1 conv and a sigmoid, and the resulting
    coefficient map is resampled back to the skip's grid and multiplies the skip. The coefficients
    are returned too, so front ends can show where the network looks.
    """

    def __init__(self, spatial_dims: int, skip_channels: int, gating_channels: int, inter_channels: int,
                 norm: str = "instance"):
        super().__init__()
        self.skip_projection = layers.conv(spatial_dims, skip_channels, inter_channels, kernel_size=2, stride=2,
                                           bias=False)
        self.gating_projection = layers.conv(spatial_dims, gating_channels, inter_channels, kernel_size=1)
        self.coefficients = layers.conv(spatial_dims, inter_channels, 1, kernel_size=1)
        self.output = ConvNormAct(spatial_dims, skip_channels, skip_channels, kernel_size=1, norm=norm, act="none")

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected_skip = self.skip_projection(skip)
        projected_gating = layers.resize(self.gating_projection(gating), tuple(projected_skip.shape[2:]))
        alpha = torch.sigmoid(self.coefficients(torch.relu(projected_skip + projected_gating)))
        alpha = layers.resize(alpha, tuple(skip.shape[2:]))
        return self.output(skip * alpha), alpha


class Interpolate(nn.Module):
    """Fixed (non-learned) upsampling by an integer factor."""

    def __init__(self, scale: int, mode: str = "linear"):
        super().__init__()
        self.scale = scale
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layers.upsample(x, self.scale, self.mode)


class UpSample(nn.Sequential):
    """Doubles the grid: a transposed conv ('transpose') or interpolation + 1x1 conv ('linear')."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, mode: str = "transpose",
                 scale: int = 2):
        if mode == "transpose":
            super().__init__(layers.conv_transpose(spatial_dims, in_channels, out_channels, scale))
        elif mode in ("linear", "nearest"):
            super().__init__(Interpolate(scale, mode), layers.conv(spatial_dims, in_channels, out_channels, 1))
        else:
            raise InputError(f"Unknown upsampling mode {mode!r}.", "Use 'transpose', 'linear' or 'nearest'.")


class SegmentationHead(nn.Sequential):
    """1x1 conv from features to per-class logits."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__(layers.conv(spatial_dims, in_channels, out_channels, kernel_size=1))


class Encoder(nn.Module):
    """Stages of decreasing resolution; returns every stage's output, highest resolution first.

    `downsample` is 'pool' (max pooling before the stage, Ronneberger) or 'stride' (the stage's
    first conv has stride 2, nnU-Net / ResUNet).
    """

    def __init__(self, spatial_dims: int, in_channels: int, widths: list[int], make_stage: StageFactory,
                 downsample: str = "pool"):
        super().__init__()
        self.stages = nn.ModuleList()
        for level, width in enumerate(widths):
            previous = in_channels if level == 0 else widths[level - 1]
            if level == 0:
                self.stages.append(make_stage(previous, width, 1))
            elif downsample == "pool":
                self.stages.append(nn.Sequential(layers.max_pool(spatial_dims), make_stage(previous, width, 1)))
            else:
                self.stages.append(make_stage(previous, width, 2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class Decoder(nn.Module):
    """Upsample, optionally gate the skip, concatenate, convolve: one stage per skip.

    Returns each decoder stage's output, highest resolution first (level 0 .. levels-2), and the
    attention coefficient maps in the same order when `attention` is on.
    """

    def __init__(self, spatial_dims: int, widths: list[int], make_stage: StageFactory,
                 upsample: str = "transpose", attention: bool = False, norm: str = "instance",
                 scales: list | None = None):
        """`scales[level]`: upsampling factor from level + 1 to level (int or per axis; default 2)."""
        super().__init__()
        self.upsamplers = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.gates = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            self.upsamplers.append(UpSample(spatial_dims, widths[level + 1], widths[level], upsample,
                                            scale=scales[level] if scales else 2))
            if attention:
                self.gates.append(AttentionGate(spatial_dims, widths[level], widths[level + 1],
                                                max(widths[level] // 2, 1), norm))
            self.stages.append(make_stage(2 * widths[level], widths[level], 1))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = features[-1]
        outputs, gate_maps = [], []
        for index, (up, stage) in enumerate(zip(self.upsamplers, self.stages)):
            skip = features[-2 - index]
            if len(self.gates):
                skip, alpha = self.gates[index](skip, x)
                gate_maps.append(alpha)
            x = stage(torch.cat([skip, up(x)], dim=1))
            outputs.append(x)
        return outputs[::-1], gate_maps[::-1]
