"""Deep Residual U-Net (Zhang et al. 2018; used for lung CT): residual blocks in encoder and decoder."""

from __future__ import annotations

from torch import nn

from ..errors import InputError
from .blocks import ResidualBlock
from .unet import UNet


class ResidualUNet(UNet):
    """U-Net whose every stage is a stack of `blocks_per_stage` residual blocks.

    Downsampling is the stride-2 first conv of a stage's first block (with a strided 1x1
    projection on its shortcut), as in ResUNet, so no pooling discards information. Decoder stages
    are residual too: after concatenating the upsampled features and the skip, a 1x1 projection
    shortcut carries the concatenation past the two 3x3 convs. Deep-supervision outputs (training
    only) are as in `UNet`: output k has scale 2**k, shape ceil(S / 2**k).
    """

    registry_name = "residual_unet"
    downsample = "stride"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 levels: int = 5, deep_supervision: bool = False, norm: str = "instance", act: str = "relu",
                 dropout: float = 0.0, blocks_per_stage: int = 1):
        if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise InputError(f"blocks_per_stage must be a positive integer, got {blocks_per_stage!r}.",
                             "Pass blocks_per_stage=1 (ResUNet) or 2 for a deeper encoder.")
        self.blocks_per_stage = blocks_per_stage
        self._init_unet(spatial_dims, in_channels, out_channels, features, levels, deep_supervision, norm,
                        {"act": act, "dropout": dropout, "blocks_per_stage": blocks_per_stage})

    def make_stage(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return nn.Sequential(*[
            ResidualBlock(self.spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                          stride=stride if i == 0 else 1, norm=self.norm_name, act=self.act, dropout=self.dropout)
            for i in range(self.blocks_per_stage)])
