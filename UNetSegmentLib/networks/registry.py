"""Architecture registry: name -> constructor, description, paper, capabilities.

Kept free of torch imports (constructors are named by import path and resolved on first build) so
that the Slicer panel can fill its model list before PyTorch is installed.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, UnknownArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    description: str
    paper: str
    supports_deep_supervision: bool
    target: str  # "module:Class", relative to UNetSegmentLib.networks

    def constructor(self):
        module_name, class_name = self.target.split(":")
        module = importlib.import_module(f"{__package__}.{module_name}")
        return getattr(module, class_name)

    def build(self, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any):
        if spatial_dims not in (2, 3):
            raise InputError(
                f"spatial_dims must be 2 or 3, got {spatial_dims!r}.",
                "Use 2 for slice-wise models and 3 for volumetric models.")
        for what, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{what} must be a positive integer, got {value!r}.",
                                 f"Pass the number of {'image' if what == 'in_channels' else 'label'} channels.")
        if kwargs.get("deep_supervision") and not self.supports_deep_supervision:
            raise InputError(f"Architecture '{self.name}' has no deep supervision.",
                             "Drop deep_supervision=True or pick an architecture that supports it.")
        return self.constructor()(spatial_dims, in_channels, out_channels, **kwargs)


ARCHITECTURES: dict[str, ArchitectureSpec] = {spec.name: spec for spec in (
    ArchitectureSpec(
        "unet", "U-Net: padded conv-norm-act encoder/decoder with skip connections.",
        "Ronneberger, Fischer, Brox. U-Net. MICCAI 2015.", True, "unet:UNet"),
    ArchitectureSpec(
        "attention_unet", "Attention U-Net: additive attention gates filter every skip connection.",
        "Oktay et al. Attention U-Net: Learning Where to Look for the Pancreas. MIDL 2018.", True,
        "attention_unet:AttentionUNet"),
    ArchitectureSpec(
        "residual_unet", "Residual U-Net: residual blocks in encoder and decoder.",
        "Zhang, Liu, Wang. Road Extraction by Deep Residual U-Net. IEEE GRSL 2018; "
        "deep Residual U-Net for lung CT segmentation.", True, "residual_unet:ResidualUNet"),
    ArchitectureSpec(
        "unet_plus_plus", "UNet++: nested dense skip pathways, deep supervision, prunable at inference.",
        "Zhou et al. UNet++: A Nested U-Net Architecture for Medical Image Segmentation. DLMIA 2018.", True,
        "unet_plus_plus:UNetPlusPlus"),
    ArchitectureSpec(
        "unet_3plus", "UNet 3+: full-scale skips and deep supervision, classification-guided module.",
        "Huang et al. UNet 3+: A Full-Scale Connected UNet for Medical Image Segmentation. ICASSP 2020.", True,
        "unet_3plus:UNet3Plus"),
    ArchitectureSpec(
        "multires_unet", "MultiResUNet: MultiRes blocks (chained 3x3 convs) and Res paths on skips.",
        "Ibtehaz, Rahman. MultiResUNet. Neural Networks 121, 2020.", True, "multires_unet:MultiResUNet"),
    ArchitectureSpec(
        "nnunet", "nnU-Net configuration: instance norm, leaky ReLU, strided convs, 32..320 features.",
        "Isensee et al. nnU-Net: a self-configuring method for deep learning-based biomedical image "
        "segmentation. Nature Methods 2021.", True, "nnunet:NNUNet"),
)}


def list_architectures() -> list[ArchitectureSpec]:
    return list(ARCHITECTURES.values())


def get_architecture(name: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        valid = ", ".join(ARCHITECTURES)
        close = difflib.get_close_matches(str(name), ARCHITECTURES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownArchitectureError(
            f"Unknown architecture '{name}'.{hint}", f"Choose one of: {valid}.") from None


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any):
    """Build a registered network; `spatial_dims` first, as in MONAI."""
    return get_architecture(name).build(spatial_dims, in_channels, out_channels, **kwargs)
