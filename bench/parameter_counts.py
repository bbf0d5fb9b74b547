"""Parameter counts of the reference configurations: ours vs the papers vs MONAI.

Run: `.venv/bin/python bench/parameter_counts.py`. Networks are built on the meta device, so this
takes seconds and no memory even at the papers' widths. MONAI (a test dependency) is only used for
the comparison column and is skipped when it is not installed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNetSegmentLib.networks import build_network  # noqa: E402
from UNetSegmentLib.networks.base import count_parameters  # noqa: E402


@dataclass(frozen=True)
class Reference:
    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    kwargs: dict = field(default_factory=dict)
    paper_millions: float | None = None
    source: str = ""

    @property
    def label(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name} {self.spatial_dims}D ({settings})"

    def build(self):
        return build_network(self.name, self.spatial_dims, self.in_channels, self.out_channels, **self.kwargs)


# The papers' own configurations (2D papers: 3 input channels, 1 output, as in their tables).
REFERENCES = [
    Reference("unet", 2, 3, 1, {"features": 64, "levels": 5}, 31.0,
              "Ronneberger 2015 (64..1024); UNet 3+ Table 1 reports 39.39M for its U-Net baseline"),
    Reference("unet_plus_plus", 2, 3, 1, {"features": 64, "levels": 5}, 47.18,
              "UNet 3+ Table 1 (widths 64..1024, its own UNet++ variant)"),
    Reference("unet_3plus", 2, 3, 1, {"features": 64, "levels": 5}, 26.97, "UNet 3+ Table 1 (64..1024)"),
    Reference("unet_plus_plus", 2, 3, 1, {"features": 32, "levels": 5}, 9.04, "Zhou 2018 Table (32..512)"),
    Reference("multires_unet", 2, 3, 1, {"features": 32, "levels": 5}, 7.26, "Ibtehaz 2020 (32..512, alpha 1.67)"),
    Reference("attention_unet", 3, 1, 2, {"features": 16, "levels": 5}, 6.40,
              "Oktay 2018 Table (16..256, 3D); its plain U-Net: 5.88M"),
    Reference("residual_unet", 2, 3, 1, {"features": 64, "levels": 4}, 7.8,
              "Zhang 2018 ResUNet (64..512, pre-activation units)"),
    Reference("nnunet", 3, 1, 2, {"features": 32, "levels": 6}, None,
              "nnU-Net 3d_fullres plain U-Net, 6 stages 32..320"),
]

# The three ordering claims of UNet 3+ Table 1, at the papers' widths (64..1024, 2D).
ORDERING = ("unet_3plus", "unet", "unet_plus_plus")


def monai_equivalent(name: str, spatial_dims: int, in_channels: int, out_channels: int, features: int,
                     levels: int):
    """The MONAI network built at matching settings, or None where MONAI has no equivalent.

    U-Net is compared with MONAI's BasicUNet (the classic two-conv-per-level U-Net); MONAI's `UNet`
    is a different design (one strided conv per level, optional residual units) and is not
    comparable. BasicUNet / BasicUNetPlusPlus need exactly 5 levels.
    """
    from monai.networks import nets

    widths = [features * 2 ** level for level in range(levels)]
    if name == "attention_unet":
        return nets.AttentionUnet(spatial_dims, in_channels, out_channels, channels=widths,
                                  strides=[2] * (levels - 1))
    if levels != 5:
        return None
    basic = tuple(widths) + (features,)
    if name == "unet":
        return nets.BasicUNet(spatial_dims, in_channels, out_channels, features=basic)
    if name == "unet_plus_plus":
        return nets.BasicUNetPlusPlus(spatial_dims, in_channels, out_channels, features=basic)
    return None


def measure(reference: Reference) -> tuple[int, int | None]:
    with torch.device("meta"):
        ours = count_parameters(reference.build())
        try:
            monai_model = monai_equivalent(reference.name, reference.spatial_dims, reference.in_channels,
                                           reference.out_channels, reference.kwargs.get("features", 32),
                                           reference.kwargs.get("levels", 5))
        except ImportError:
            monai_model = None
        return ours, count_parameters(monai_model) if monai_model is not None else None


def main() -> int:
    print(f"{'configuration':<52} {'ours':>9} {'paper':>8} {'MONAI':>8}  source")
    for reference in REFERENCES:
        ours, monai_count = measure(reference)
        paper = f"{reference.paper_millions:.2f}M" if reference.paper_millions else "-"
        monai_text = f"{monai_count / 1e6:.2f}M" if monai_count else "-"
        print(f"{reference.label:<52} {ours / 1e6:>8.2f}M {paper:>8} {monai_text:>8}  {reference.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
