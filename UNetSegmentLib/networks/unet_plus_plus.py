"""UNet++ (Zhou et al. 2018): nested dense skip pathways, deep supervision, prunable at inference."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .base import SegmentationNetwork
from .blocks import ConvStack, Encoder, SegmentationHead, UpSample


class UNetPlusPlus(SegmentationNetwork):
    """Nested U-Net: node X(i, j) convolves the concatenation of X(i, 0..j-1) and the upsampled
    X(i+1, j-1), so the skips are dense convolution blocks that close the semantic gap between
    encoder and decoder. Widths are `features * 2**i` (paper: 32..512).

    Every top node X(0, 1) .. X(0, levels-1) has a 1x1 head. Deep-supervision outputs (training
    only) are therefore all at full resolution (scale 1), ordered from the deepest head X(0, levels-1)
    (the main output) to X(0, 1): shape (N, out_channels, *S) each.

    `prune_depth` (1 .. levels-1, or None for the full network) prunes at inference: in eval mode
    only the sub-network below X(0, prune_depth) is evaluated and its head is the output, trading
    accuracy for speed and memory as in the paper.
    """

    registry_name = "unet_plus_plus"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 levels: int = 5, deep_supervision: bool = False, norm: str = "instance", act: str = "relu",
                 dropout: float = 0.0, prune_depth: int | None = None):
        super().__init__(spatial_dims, in_channels, out_channels, features=features, levels=levels,
                         deep_supervision=deep_supervision, norm=norm,
                         extra_config={"act": act, "dropout": dropout, "prune_depth": prune_depth})
        widths = self.widths()

        def make_stage(cin: int, cout: int, stride: int) -> nn.Module:
            return ConvStack(spatial_dims, cin, cout, 2, stride, norm, act, dropout)

        self.encoder = Encoder(spatial_dims, in_channels, widths, make_stage, "pool")
        self.upsamplers = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, levels):
            for i in range(levels - j):
                self.upsamplers[f"{i}_{j}"] = UpSample(spatial_dims, widths[i + 1], widths[i])
                self.nodes[f"{i}_{j}"] = make_stage((j + 1) * widths[i], widths[i], 1)
        self.heads = nn.ModuleList(SegmentationHead(spatial_dims, widths[0], out_channels) for _ in range(1, levels))
        self.prune_depth = prune_depth

    @property
    def prune_depth(self) -> int | None:
        return self._prune_depth

    @prune_depth.setter
    def prune_depth(self, depth: int | None) -> None:
        if depth is not None and (not isinstance(depth, int) or not 1 <= depth <= self.levels - 1):
            raise InputError(f"prune_depth must be None or 1..{self.levels - 1}, got {depth!r}.",
                             "Pass None for the full network or a smaller depth for faster inference.")
        self._prune_depth = depth

    def output_scales(self) -> list[int]:
        return [1] * (self.levels - 1)

    def forward_padded(self, x: torch.Tensor, deep: bool) -> list[torch.Tensor]:
        depth = self.levels - 1 if deep or self.training or self.prune_depth is None else self.prune_depth
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for k in range(depth + 1):
            x = self.encoder.stages[k](x)
            grid[k, 0] = x
            for j in range(1, k + 1):  # walk the new anti-diagonal up to the top row
                i = k - j
                key = f"{i}_{j}"
                dense = [grid[i, column] for column in range(j)]
                grid[i, j] = self.nodes[key](torch.cat(dense + [self.upsamplers[key](grid[i + 1, j - 1])], dim=1))
        if not deep:
            return [self.heads[depth - 1](grid[0, depth])]
        return [self.heads[j - 1](grid[0, j]) for j in range(depth, 0, -1)]
