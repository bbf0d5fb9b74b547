"""UNet 3+ (Huang et al. 2020): full-scale skips, full-scale deep supervision, classification guidance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .base import SegmentationNetwork
from .blocks import ConvNormAct, ConvStack, Encoder, Interpolate, SegmentationHead


class UNet3Plus(SegmentationNetwork):
    """Every decoder level fuses all encoder levels at or above it (max-pooled down) and all deeper
    decoder levels (bilinearly upsampled), each through a 3x3 conv to `skip_features` channels
    (default `features`: 64 in the paper), concatenated to `skip_features * levels` (320 at 5 levels)
    and fused by a 3x3 conv-norm-act.
    Encoder widths are `features * 2**i` (paper: 64..1024).

    Full-scale deep supervision: a head on every decoder level and on the bottleneck. Outputs
    (training only) keep their native grid, nnU-Net convention (the paper upsamples them instead):
    output k has scale 2**k, shape (N, out_channels, *ceil(S / 2**k)) for k = 0 .. levels-1.

    Classification-guided module (`classification_guided=True`): dropout, 1x1 conv and global max
    pooling on the bottleneck predict, per foreground class, whether it is present in the image.
    The paper multiplies the maps by the argmax of that prediction; here the gate is its
    differentiable relaxation -- log(sigmoid(presence)) is added to the class's logits, i.e. its
    softmax/sigmoid probability is scaled by the presence probability -- so the head trains from
    the segmentation loss alone and an absent class is suppressed everywhere.
    `forward_with_classification(x)` also returns the presence logits for an auxiliary BCE loss.
    """

    registry_name = "unet_3plus"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 64,
                 levels: int = 5, deep_supervision: bool = False, norm: str = "instance", act: str = "relu",
                 skip_features: int | None = None, classification_guided: bool = True, cgm_dropout: float = 0.5):
        skip_features = features if skip_features is None else skip_features
        super().__init__(spatial_dims, in_channels, out_channels, features=features, levels=levels,
                         deep_supervision=deep_supervision, norm=norm,
                         extra_config={"act": act, "skip_features": skip_features,
                                       "classification_guided": bool(classification_guided),
                                       "cgm_dropout": cgm_dropout})
        self.classification_guided = bool(classification_guided)
        widths = self.widths()
        fused = skip_features * levels
        bottom = levels - 1

        def make_stage(cin: int, cout: int, stride: int) -> nn.Module:
            return ConvStack(spatial_dims, cin, cout, 2, stride, norm, act)

        def branch(resample: nn.Module, cin: int) -> nn.Module:
            return nn.Sequential(resample, ConvNormAct(spatial_dims, cin, skip_features, norm=norm, act=act))

        self.encoder = Encoder(spatial_dims, in_channels, widths, make_stage, "pool")
        # branches[i][s]: source level s (encoder for s <= i, decoder for s > i) -> decoder level i
        self.branches = nn.ModuleList()
        self.fusions = nn.ModuleList()
        for level in range(bottom):
            sources = nn.ModuleList()
            for source in range(levels):
                if source <= level:
                    resample = layers.max_pool(spatial_dims, 2 ** (level - source)) if source < level else nn.Identity()
                    sources.append(branch(resample, widths[source]))
                else:
                    channels = widths[bottom] if source == bottom else fused
                    sources.append(branch(Interpolate(2 ** (source - level)), channels))
            self.branches.append(sources)
            self.fusions.append(ConvNormAct(spatial_dims, fused, fused, norm=norm, act=act))
        self.heads = nn.ModuleList(SegmentationHead(spatial_dims, fused, out_channels) for _ in range(bottom))
        self.heads.append(SegmentationHead(spatial_dims, widths[bottom], out_channels))
        self.presence_classes = max(out_channels - 1, 1)
        self.classifier = nn.Sequential(layers.dropout(spatial_dims, cgm_dropout),
                                        layers.conv(spatial_dims, widths[bottom], self.presence_classes, 1),
                                        layers.global_max_pool(spatial_dims), nn.Flatten())

    def output_scales(self) -> list[int]:
        return [2 ** level for level in range(self.levels)]

    def _forward(self, x: torch.Tensor, deep: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        encoded = self.encoder(x)
        bottom = self.levels - 1
        decoded: dict[int, torch.Tensor] = {bottom: encoded[bottom]}
        for level in reversed(range(bottom)):
            parts = [self.branches[level][source](encoded[source] if source <= level else decoded[source])
                     for source in range(self.levels)]
            decoded[level] = self.fusions[level](torch.cat(parts, dim=1))
        count = self.levels if deep else 1
        outputs = [self.heads[level](decoded[level]) for level in range(count)]
        presence = self.classifier(encoded[bottom]) if self.classification_guided else None
        if presence is not None:
            outputs = [self._gate(output, presence) for output in outputs]
        return outputs, presence

    def _gate(self, logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        gate = F.logsigmoid(presence).reshape(*presence.shape, *([1] * self.spatial_dims))
        if self.out_channels == 1:
            return logits + gate
        return torch.cat([logits[:, :1], logits[:, 1:] + gate], dim=1)

    def forward_padded(self, x: torch.Tensor, deep: bool) -> list[torch.Tensor]:
        return self._forward(x, deep)[0]

    def forward_with_classification(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, presence logits (N, max(out_channels-1, 1)) or None without the module)."""
        self.check_input(x)
        padded = self.pad_to_multiple(x)
        outputs, presence = self._forward(padded, deep=False)
        return self.crop_to_input(outputs[0], padded.shape[2:], x.shape[2:]), presence
