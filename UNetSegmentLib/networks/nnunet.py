"""nnU-Net's U-Net (Isensee et al. 2021), by default or exactly as an nnU-Net v2 plans file describes it."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import InputError
from .base import SegmentationNetwork
from .blocks import ConvNormAct, Decoder, Encoder, ResidualBlock, SegmentationHead
from .unet import UNet

ENCODERS = ("plain", "residual")


def _per_axis(value: Any, spatial_dims: int, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (int(value),) * spatial_dims
    values = tuple(value)
    if len(values) != spatial_dims or not all(isinstance(v, (int, float)) and int(v) >= 1 for v in values):
        raise InputError(f"{what} {value!r} must be {spatial_dims} positive integers.",
                         "Use the per-stage lists of the nnU-Net plans (one entry per axis).")
    return tuple(int(v) for v in values)


def _per_stage(value: Any, levels: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise InputError(f"{what} has {len(values)} entries for {levels} stages.",
                         "Give one entry per resolution stage, as the nnU-Net plans do.")
    return values


class NNUNet(UNet):
    """nnU-Net: instance norm, leaky ReLU (0.01), strided-conv downsampling (the first conv of each
    stage is strided), transposed-conv upsampling, `features` (32) doubling per stage up to
    `max_features` (320 in 3D, 512 in 2D), deep-supervision heads on every decoder stage.

    With only the classic arguments it is the isotropic default (3x3(x3) kernels, stride 2, two
    convs per stage). nnU-Net's planner adapts the topology per dataset; the plans' values can be
    given instead (all per stage, first stage stride 1): `kernel_sizes`, `strides` (per axis, so
    anisotropic first stages that do not pool along z are expressed), `n_conv_per_stage`,
    `n_conv_per_stage_decoder`, `features_per_stage`, `conv_bias`, and `encoder="residual"` for the
    residual-encoder presets (ResNet-D blocks, a stem conv; `n_conv_per_stage` then counts blocks).
    The module tree is the same in both cases, so default checkpoints load unchanged.

    Deep-supervision output k (training only) comes from decoder stage k, full resolution first;
    its scale is the product of the strides above it (per axis when strides are anisotropic).
    """

    registry_name = "nnunet"
    downsample = "stride"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 levels: int = 5, deep_supervision: bool = False, norm: str = "instance",
                 act: str = "leaky_relu", max_features: int | None = None,
                 kernel_sizes: Optional[Sequence] = None, strides: Optional[Sequence] = None,
                 n_conv_per_stage: Optional[Sequence[int]] = None,
                 n_conv_per_stage_decoder: Optional[Sequence[int]] = None,
                 features_per_stage: Optional[Sequence[int]] = None, encoder: str = "plain",
                 conv_bias: bool = True):
        if max_features is None:
            max_features = 320 if spatial_dims == 3 else 512  # nnU-Net's caps for 3D and 2D
        self.max_features = int(max_features)
        planned = {"kernel_sizes": kernel_sizes, "strides": strides, "n_conv_per_stage": n_conv_per_stage,
                   "n_conv_per_stage_decoder": n_conv_per_stage_decoder, "features_per_stage": features_per_stage}
        if encoder not in ENCODERS:
            raise InputError(f"Unknown nnU-Net encoder {encoder!r}.", f"Choose one of: {', '.join(ENCODERS)}.")
        for key, value in planned.items():  # per-stage lists fix the number of stages
            if isinstance(value, (list, tuple)):
                levels = len(value) + (1 if key == "n_conv_per_stage_decoder" else 0)
                break
        extra: dict[str, Any] = {"act": act, "max_features": self.max_features}
        # Only non-default topology is recorded, so configs (and checkpoints) of default networks stay as they were.
        extra.update({key: _plain(value) for key, value in planned.items() if value is not None})
        if encoder != "plain":
            extra["encoder"] = encoder
        if not conv_bias:
            extra["conv_bias"] = False
        SegmentationNetwork.__init__(self, spatial_dims, in_channels, out_channels, features=features, levels=levels,
                                     deep_supervision=deep_supervision, norm=norm, extra_config=extra)
        self.act = act
        self.dropout = 0.0
        self.encoder_kind = encoder
        self.conv_bias = bool(conv_bias)
        self.kernel_sizes = [_per_axis(k, spatial_dims, "kernel size")
                             for k in _per_stage(3 if kernel_sizes is None else kernel_sizes, levels, "kernel_sizes")]
        default_strides = [1] + [2] * (levels - 1)
        self.strides = [_per_axis(s, spatial_dims, "stride")
                        for s in _per_stage(default_strides if strides is None else strides, levels, "strides")]
        self.convs_per_stage = [int(n) for n in _per_stage(2 if n_conv_per_stage is None else n_conv_per_stage,
                                                           levels, "n_conv_per_stage")]
        self.convs_per_decoder_stage = [int(n) for n in _per_stage(
            2 if n_conv_per_stage_decoder is None else n_conv_per_stage_decoder, levels - 1,
            "n_conv_per_stage_decoder")]
        self.widths_per_stage = ([int(f) for f in _per_stage(features_per_stage, levels, "features_per_stage")]
                                 if features_per_stage is not None else self.widths(cap=self.max_features))
        self.required_multiples = tuple(math.prod(s[axis] for s in self.strides) for axis in range(spatial_dims))
        self.required_multiple = math.lcm(*self.required_multiples)
        widths = self.widths_per_stage
        encoder_levels = iter(range(levels))
        decoder_levels = iter(reversed(range(levels - 1)))  # Decoder builds its stages deepest first
        self.encoder = Encoder(spatial_dims, in_channels, widths,
                               lambda i, o, _stride: self._encoder_stage(next(encoder_levels), i, o), "stride")
        self.decoder = Decoder(spatial_dims, widths, lambda i, o, _stride: self._decoder_stage(next(decoder_levels), i, o),
                               norm=norm, scales=[self.strides[level + 1] for level in range(levels - 1)])
        if not self.conv_bias:  # nnU-Net ties the transposed convs' bias to conv_bias
            for up in self.decoder.upsamplers:
                up[0].bias = None
        self.heads = nn.ModuleList(SegmentationHead(spatial_dims, width, out_channels) for width in widths[:-1])

    def stage_widths(self) -> list[int]:
        return list(self.widths_per_stage)

    def _unit(self, in_channels: int, out_channels: int, level: int, stride=1) -> ConvNormAct:
        return ConvNormAct(self.spatial_dims, in_channels, out_channels, kernel_size=self.kernel_sizes[level],
                           stride=stride, norm=self.norm_name, act=self.act, bias=self.conv_bias)

    def _encoder_stage(self, level: int, in_channels: int, out_channels: int) -> nn.Module:
        stride = self.strides[level]
        count = self.convs_per_stage[level]
        if self.encoder_kind == "plain":
            return nn.Sequential(*[self._unit(in_channels if i == 0 else out_channels, out_channels, level,
                                              stride if i == 0 else 1) for i in range(count)])
        units: list[nn.Module] = []
        if level == 0:  # the residual encoder's stem: one plain conv before the first stage's blocks
            units.append(self._unit(in_channels, out_channels, 0))
            in_channels = out_channels
        for i in range(count):
            units.append(ResidualBlock(self.spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                                       stride=stride if i == 0 else 1, norm=self.norm_name, act=self.act,
                                       kernel_size=self.kernel_sizes[level], bias=self.conv_bias,
                                       pool_shortcut=True))
        return nn.Sequential(*units)

    def _decoder_stage(self, level: int, in_channels: int, out_channels: int) -> nn.Module:
        count = self.convs_per_decoder_stage[level]
        return nn.Sequential(*[self._unit(in_channels if i == 0 else out_channels, out_channels, level)
                               for i in range(count)])

    def output_scales(self) -> list:
        scales = [tuple(math.prod(s[axis] for s in self.strides[:level + 1]) for axis in range(self.spatial_dims))
                  for level in range(self.levels - 1)]
        if all(len(set(scale)) == 1 for scale in scales):
            return [scale[0] for scale in scales]
        return scales

    def deep_supervision_shapes(self, input_size) -> list[tuple[int, ...]]:
        shapes = []
        for scale in self.output_scales():
            per_axis = scale if isinstance(scale, tuple) else (scale,) * len(input_size)
            shapes.append(tuple(math.ceil(s / f) for s, f in zip(input_size, per_axis)))
        return shapes

    def pad_to_multiple(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, multiple in zip(reversed(x.shape[2:]), reversed(self.required_multiples)):
            pads += [0, (-size) % multiple]
        return nn.functional.pad(x, pads) if any(pads) else x


def _plain(value: Any) -> Any:
    """Nested lists of ints (config values must be plain types for weights-only checkpoints)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return int(value)
