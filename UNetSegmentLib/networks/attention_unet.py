"""Attention U-Net (Oktay et al. 2018): additive attention gates on every skip connection."""

from __future__ import annotations

import torch

from . import layers
from .unet import UNet


class AttentionUNet(UNet):
    """U-Net whose skips pass through an `AttentionGate` before concatenation.

    Each gate takes its gating signal from the coarser decoder level (the features about to be
    upsampled), so the decoder decides which encoder voxels reach it. Deep-supervision outputs
    (training only) are as in `UNet`: output k has scale 2**k, shape ceil(S / 2**k).
    `forward_with_attention(x)` also returns the gate coefficient maps for display.
    """

    registry_name = "attention_unet"
    attention = True

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, gate maps): one (N, 1, *S) map in [0, 1] per skip, highest resolution first,
        each resampled to the input's grid so it overlays the image."""
        self.check_input(x)
        padded = self.pad_to_multiple(x)
        decoded, gate_maps = self.decode(padded)
        logits = self.crop_to_input(self.heads[0](decoded[0]), padded.shape[2:], x.shape[2:])
        maps = [self.crop_to_input(layers.resize(alpha, tuple(padded.shape[2:])), padded.shape[2:], x.shape[2:])
                for alpha in gate_maps]
        return logits, maps
