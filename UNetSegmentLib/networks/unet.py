"""U-Net (Ronneberger et al. 2015) with padded convolutions and conv-norm-act stages.

`UNet` is also the encoder/decoder skeleton that Attention U-Net, Residual U-Net and nnU-Net
specialise: they change the stage block, the downsampling or the skip gating, nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SegmentationNetwork
from .blocks import ConvStack, Decoder, Encoder, SegmentationHead


class UNet(SegmentationNetwork):
    """Classic U-Net: two 3x3 conv-norm-act per level, max-pool down, transposed-conv up.

    Widths are `features * 2**level` (paper: 64..1024 at 5 levels). Deep-supervision outputs
    (training only) are the 1x1-conv heads on every decoder level: output k has scale 2**k, i.e.
    shape (N, out_channels, *ceil(S / 2**k)) for k = 0 .. levels-2.
    """

    registry_name = "unet"
    downsample = "pool"  # 'pool' (max pooling) or 'stride' (strided first conv)
    attention = False

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 levels: int = 5, deep_supervision: bool = False, norm: str = "instance", act: str = "relu",
                 dropout: float = 0.0):
        self._init_unet(spatial_dims, in_channels, out_channels, features, levels, deep_supervision, norm,
                        {"act": act, "dropout": dropout})

    def _init_unet(self, spatial_dims: int, in_channels: int, out_channels: int, features: int, levels: int,
                   deep_supervision: bool, norm: str, extra_config: dict[str, Any]) -> None:
        """Builds encoder, decoder and heads; subclasses call it with their own extra arguments so
        that `config` records exactly what each constructor accepts."""
        super().__init__(spatial_dims, in_channels, out_channels, features=features, levels=levels,
                         deep_supervision=deep_supervision, norm=norm, extra_config=extra_config)
        self.act = extra_config.get("act", "relu")
        self.dropout = float(extra_config.get("dropout", 0.0))
        widths = self.stage_widths()
        self.encoder = Encoder(spatial_dims, in_channels, widths, self.make_stage, self.downsample)
        self.decoder = Decoder(spatial_dims, widths, self.make_stage, attention=self.attention, norm=norm)
        self.heads = nn.ModuleList(SegmentationHead(spatial_dims, width, out_channels) for width in widths[:-1])

    def stage_widths(self) -> list[int]:
        return self.widths()

    def make_stage(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return ConvStack(self.spatial_dims, in_channels, out_channels, num_convs=2, stride=stride,
                         norm=self.norm_name, act=self.act, dropout=self.dropout)

    def output_scales(self) -> list[int]:
        return [2 ** level for level in range(self.levels - 1)]

    def decode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.decoder(self.encoder(x))

    def forward_padded(self, x: torch.Tensor, deep: bool) -> list[torch.Tensor]:
        decoded, _ = self.decode(x)
        if not deep:
            return [self.heads[0](decoded[0])]
        return [head(features) for head, features in zip(self.heads, decoded)]
