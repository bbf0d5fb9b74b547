"""`SegmentationNetwork`: the contract every architecture keeps with the rest of UNetSegment.

The inference engine, the training loss and the model store rely on exactly this:

* `forward(x)` takes (N, in_channels, *spatial) of any spatial size and returns logits
  (N, out_channels, *same spatial size). Inputs are padded internally (at the far end of each axis,
  with zeros) to `required_multiple` and the output is cropped back, so callers never pad.
* When `deep_supervision` is on *and* the module is training, `forward` returns a list instead:
  output k has scale `output_scales()[k]` and spatial size ceil(S / scale) per axis (nnU-Net
  convention), the full-resolution output first. Padding at the far end keeps every lower output
  aligned with the target downsampled by the same factor.
* `config` = {"name": registry name, "spatial_dims", "in_channels", "out_channels", "kwargs": every
  keyword argument of the constructor} in plain types; it is stored in checkpoints, and
  `build_network(name, spatial_dims, in_channels, out_channels, **config["kwargs"])` or
  `build_from_config(config)` rebuilds the same network.
* Deep-supervision heads are always built, so a checkpoint loads whether deep supervision is on.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import layers


class SegmentationNetwork(nn.Module):
    """Validation, padding, cropping and `config` shared by all architectures (see module docstring);
    a subclass builds its layers and implements `forward_padded` and `output_scales`."""

    registry_name: ClassVar[str] = ""
    min_levels: ClassVar[int] = 2

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, features: int, levels: int,
                 deep_supervision: bool, norm: str, extra_config: dict[str, Any] | None = None):
        super().__init__()
        _check_int("spatial_dims", spatial_dims, "Use 2 for slice-wise models and 3 for volumetric models.",
                   allowed=(2, 3))
        _check_int("in_channels", in_channels, "Pass the number of image channels (1 for a single CT/MR).")
        _check_int("out_channels", out_channels, "Pass the number of labels including background.")
        _check_int("features", features, "Pass the base width, e.g. features=32 (8 for quick tests).")
        _check_int("levels", levels, f"Pass levels >= {self.min_levels}, e.g. levels=5.", minimum=self.min_levels)
        layers.check_norm(norm)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.levels = levels
        self.norm_name = norm
        self.deep_supervision = bool(deep_supervision)
        self.required_multiple = 2 ** (levels - 1)
        kwargs = {"features": features, "levels": levels, "deep_supervision": bool(deep_supervision), "norm": norm}
        kwargs.update(extra_config or {})
        self.config = {"name": self.registry_name, "spatial_dims": spatial_dims, "in_channels": in_channels,
                       "out_channels": out_channels, "kwargs": kwargs}

    # --- to implement in subclasses -------------------------------------------------------------
    def forward_padded(self, x: torch.Tensor, deep: bool) -> list[torch.Tensor]:
        """Logits for an input whose size is a multiple of `required_multiple`.

        Returns [full-resolution logits] when `deep` is False, else every deep-supervision output
        in the order of `output_scales()`.
        """
        raise NotImplementedError

    def output_scales(self) -> list[int]:
        """Downsampling factor of each deep-supervision output, full resolution first."""
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        deep = self.deep_supervision and self.training
        padded = self.pad_to_multiple(x)
        outputs = self.forward_padded(padded, deep)
        outputs = [self.crop_to_input(output, padded.shape[2:], x.shape[2:]) for output in outputs]
        return outputs if deep else outputs[0]

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"Network input must be a torch.Tensor, got {type(x).__name__}.",
                             "Convert the image with torch.as_tensor(array, dtype=torch.float32).")
        expected = self.spatial_dims + 2
        if x.dim() != expected:
            axes = "(N, C, H, W)" if self.spatial_dims == 2 else "(N, C, D, H, W)"
            hints = []
            if x.dim() == expected - 1:
                hints.append("add the batch axis (x[None])")
            elif x.dim() == expected - 2:
                hints.append("add the batch and channel axes (x[None, None])")
            if x.dim() in (4, 5):
                hints.append(f"use a network built with spatial_dims={x.dim() - 2}")
            fix = " or ".join(hints) or f"reshape the input to {axes}"
            fix = fix[0].upper() + fix[1:] + "."
            raise InputError(f"This {self.spatial_dims}D network expects a {expected}-dimensional input {axes}, "
                             f"got shape {tuple(x.shape)}.", fix)
        if x.shape[1] != self.in_channels:
            raise InputError(
                f"The network expects {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}).",
                "Pass the image channels the model was trained with, in the same order.")
        if not torch.is_floating_point(x):
            raise InputError(f"Network input must be floating point, got {x.dtype}.",
                             "Convert it with x.float().")
        if min(x.shape[2:]) < 1 or x.shape[0] < 1:
            raise InputError(f"Network input is empty (shape {tuple(x.shape)}).", "Pass a non-empty image.")

    def pad_to_multiple(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size in reversed(x.shape[2:]):
            pads += [0, (-size) % self.required_multiple]
        return F.pad(x, pads) if any(pads) else x

    @staticmethod
    def crop_to_input(output: torch.Tensor, padded_size, input_size) -> torch.Tensor:
        slices = [slice(None), slice(None)]
        for padded, out, original in zip(padded_size, output.shape[2:], input_size):
            scale = padded // out
            slices.append(slice(0, math.ceil(original / scale)))
        return output[tuple(slices)]

    def deep_supervision_shapes(self, input_size) -> list[tuple[int, ...]]:
        """Spatial shape of each deep-supervision output for an input of `input_size`."""
        return [tuple(math.ceil(s / scale) for s in input_size) for scale in self.output_scales()]

    def widths(self, cap: int | None = None) -> list[int]:
        """Channel width per level: `features` doubling per level, optionally capped."""
        widths = [self.features * 2 ** level for level in range(self.levels)]
        return [min(w, cap) for w in widths] if cap else widths

    def extra_repr(self) -> str:
        return f"config={self.config}"


def _check_int(name: str, value: Any, fix: str, minimum: int = 1, allowed: tuple[int, ...] | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if allowed is not None:
        ok = ok and value in allowed
    if not ok:
        wanted = f"one of {allowed}" if allowed else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {wanted}, got {value!r}.", fix)


def build_from_config(config: dict[str, Any]) -> SegmentationNetwork:
    """Rebuild a network from its `config` (as stored in a checkpoint)."""
    from .registry import build_network  # registry imports nothing heavy; kept local to avoid a cycle

    try:
        positional = [config[key] for key in ("name", "spatial_dims", "in_channels", "out_channels")]
        kwargs = dict(config["kwargs"])
    except (KeyError, TypeError):
        raise InputError(f"Not a network config: {config!r}.",
                         "Pass a network's `config` dict (keys name, spatial_dims, in_channels, out_channels, "
                         "kwargs).") from None
    return build_network(*positional, **kwargs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
