"""MultiResUNet (Ibtehaz & Rahman 2020): MultiRes blocks and Res paths."""

from __future__ import annotations

import torch
from torch import nn

from . import layers
from .base import SegmentationNetwork
from .blocks import ConvNormAct, SegmentationHead, UpSample


def multires_widths(width: int, alpha: float = 1.67) -> tuple[int, int, int]:
    """Channels of the three chained 3x3 convs: W/6, W/3, W/2 of W = alpha * width (paper's split)."""
    scaled = alpha * width
    return max(int(scaled * 0.167), 1), max(int(scaled * 0.333), 1), max(int(scaled * 0.5), 1)


class MultiResBlock(nn.Module):
    """Three chained 3x3 convs (receptive fields 3, 5, 7) concatenated, plus a 1x1 residual.

    Chaining 3x3 convs approximates parallel 3x3/5x5/7x7 filters at a fraction of their cost, so
    each level sees several scales.
    """

    def __init__(self, spatial_dims: int, in_channels: int, width: int, norm: str, act: str, alpha: float = 1.67):
        super().__init__()
        c3, c5, c7 = multires_widths(width, alpha)
        self.out_channels = c3 + c5 + c7
        self.conv3 = ConvNormAct(spatial_dims, in_channels, c3, norm=norm, act=act)
        self.conv5 = ConvNormAct(spatial_dims, c3, c5, norm=norm, act=act)
        self.conv7 = ConvNormAct(spatial_dims, c5, c7, norm=norm, act=act)
        self.concat_norm = layers.norm(norm, spatial_dims, self.out_channels)
        self.shortcut = ConvNormAct(spatial_dims, in_channels, self.out_channels, kernel_size=1, norm=norm,
                                    act="none")
        self.act = layers.activation(act)
        self.out_norm = layers.norm(norm, spatial_dims, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv3(x)
        b = self.conv5(a)
        c = self.conv7(b)
        return self.out_norm(self.act(self.concat_norm(torch.cat([a, b, c], dim=1)) + self.shortcut(x)))


class ResPathUnit(nn.Module):
    """3x3 conv with a 1x1 residual: one step of a Res path."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str, act: str):
        super().__init__()
        self.conv = ConvNormAct(spatial_dims, in_channels, out_channels, norm=norm, act=act)
        self.shortcut = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size=1, norm=norm, act="none")
        self.act = layers.activation(act)
        self.norm = layers.norm(norm, spatial_dims, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.conv(x) + self.shortcut(x)))


class MultiResUNet(SegmentationNetwork):
    """U-Net with MultiRes blocks for its stages and Res paths (chains of residual convs, longer
    for shallower levels) on its skips, to narrow the semantic gap between encoder and decoder
    features. Level widths are `features * 2**i` (paper: 32..512, alpha 1.67).

    Deep-supervision outputs (training only): 1x1 heads on every decoder level; output k has scale
    2**k, shape (N, out_channels, *ceil(S / 2**k)) for k = 0 .. levels-2 (the paper has none).
    """

    registry_name = "multires_unet"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 levels: int = 5, deep_supervision: bool = False, norm: str = "instance", act: str = "relu",
                 alpha: float = 1.67):
        super().__init__(spatial_dims, in_channels, out_channels, features=features, levels=levels,
                         deep_supervision=deep_supervision, norm=norm, extra_config={"act": act, "alpha": alpha})
        widths = self.widths()
        block_out = [sum(multires_widths(width, alpha)) for width in widths]

        self.encoder_blocks = nn.ModuleList(
            MultiResBlock(spatial_dims, in_channels if level == 0 else block_out[level - 1], widths[level], norm, act,
                          alpha) for level in range(levels))
        self.pool = layers.max_pool(spatial_dims)
        self.res_paths = nn.ModuleList(
            nn.Sequential(*[ResPathUnit(spatial_dims, block_out[level] if step == 0 else widths[level], widths[level],
                                        norm, act) for step in range(levels - 1 - level)])
            for level in range(levels - 1))
        self.upsamplers = nn.ModuleList(UpSample(spatial_dims, block_out[level + 1], widths[level])
                                        for level in range(levels - 1))
        self.decoder_blocks = nn.ModuleList(MultiResBlock(spatial_dims, 2 * widths[level], widths[level], norm, act,
                                                          alpha) for level in range(levels - 1))
        self.heads = nn.ModuleList(SegmentationHead(spatial_dims, block_out[level], out_channels)
                                   for level in range(levels - 1))

    def output_scales(self) -> list[int]:
        return [2 ** level for level in range(self.levels - 1)]

    def forward_padded(self, x: torch.Tensor, deep: bool) -> list[torch.Tensor]:
        encoded = []
        for level, block in enumerate(self.encoder_blocks):
            x = block(self.pool(x) if level else x)
            encoded.append(x)
        decoded = [None] * (self.levels - 1)
        for level in reversed(range(self.levels - 1)):
            skip = self.res_paths[level](encoded[level])
            x = self.decoder_blocks[level](torch.cat([self.upsamplers[level](x), skip], dim=1))
            decoded[level] = x
        if not deep:
            return [self.heads[0](decoded[0])]
        return [head(features) for head, features in zip(self.heads, decoded)]
