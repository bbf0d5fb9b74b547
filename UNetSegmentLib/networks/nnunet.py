"""nnU-Net's plain-conv U-Net configuration (Isensee et al. 2021)."""

from __future__ import annotations

from .unet import UNet


class NNUNet(UNet):
    """nnU-Net defaults: instance norm, leaky ReLU (0.01), strided-conv downsampling (the first of
    each stage's two convs has stride 2), transposed-conv upsampling, `features` (32) doubling per
    level up to `max_features` (320 in 3D, 512 in 2D), and deep supervision (heads always built;
    nnU-Net trains with `deep_supervision=True`, the default here is False like every network).

    Deep-supervision outputs (training only) come from every decoder stage: output k has scale
    2**k, shape (N, out_channels, *ceil(S / 2**k)) for k = 0 .. levels-2, as nnU-Net's loss expects.
    nnU-Net's planner adapts kernel sizes and anisotropic strides per dataset; this network uses
    isotropic 3x3(x3) kernels and stride 2 on every axis.
    """

    registry_name = "nnunet"
    downsample = "stride"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 levels: int = 5, deep_supervision: bool = False, norm: str = "instance",
                 act: str = "leaky_relu", max_features: int | None = None):
        if max_features is None:
            max_features = 320 if spatial_dims == 3 else 512  # nnU-Net's caps for 3D and 2D
        self.max_features = int(max_features)
        self._init_unet(spatial_dims, in_channels, out_channels, features, levels, deep_supervision, norm,
                        {"act": act, "max_features": self.max_features})

    def stage_widths(self) -> list[int]:
        return self.widths(cap=self.max_features)
