"""Training augmentation on batches of patches, in torch so that it stays cheap on a few CPU cores.

Spatial transforms (rotation, scaling, elastic deformation) are folded into one resampling grid and
applied with a single `grid_sample`: images bilinearly, labels with nearest neighbour so they stay
integer. The sampler hands in patches larger than the training patch (`input_size`), so rotated
and zoomed-out patches are filled with real anatomy instead of padding. For anisotropic data
(thick slices) the spatial transforms stay in the axial plane, as nnU-Net does: rotating across
thick slices would invent structure between them.

Probabilities and ranges follow nnU-Net's defaults where it has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

ANISOTROPY_THRESHOLD = 2.0  # largest / smallest spacing from which spatial transforms stay in-plane


def is_anisotropic(spacing_xyz: Sequence[float]) -> bool:
    return max(spacing_xyz) / min(spacing_xyz) >= ANISOTROPY_THRESHOLD


@dataclass
class AugmentationConfig:
    rotation_probability: float = 0.2
    rotation_degrees: float = 30.0
    scaling_probability: float = 0.2
    scaling_range: tuple[float, float] = (0.7, 1.4)  # > 1 zooms in
    elastic_probability: float = 0.2
    elastic_magnitude_mm: float = 6.0  # largest displacement of the coarse control grid
    elastic_control_points: int = 4
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    mirror_probability: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes (z, y, x) that may be mirrored
    noise_probability: float = 0.1
    noise_std: float = 0.1
    input_margin: float = 1.25  # in-plane size of the sampled patch relative to the training patch


class Augmenter:
    """Augments (images (B, C, *patch_in), labels (B, *patch_in)) into (B, C, *patch), (B, *patch)."""

    def __init__(self, patch_size: Sequence[int], spacing_xyz: Sequence[float],
                 config: AugmentationConfig | None = None, seed: int = 0):
        self.patch_size = tuple(int(p) for p in patch_size)
        self.config = config or AugmentationConfig()
        self.spatial_dims = len(self.patch_size)
        # spacing in array order (z, y, x) for 3D, (y, x) for 2D
        self.spacing = tuple(float(s) for s in spacing_xyz[::-1][-self.spatial_dims:])
        self.in_plane_only = self.spatial_dims == 3 and is_anisotropic(spacing_xyz)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def input_size(self) -> tuple[int, ...]:
        """Patch size to sample so that transforms have real anatomy around the training patch."""
        margin = self.config.input_margin
        sizes = []
        for axis, size in enumerate(self.patch_size):
            through_plane = self.in_plane_only and axis == 0
            grown = size if through_plane else int(math.ceil(size * margin))
            sizes.append(grown + (grown - size) % 2)  # even growth keeps the unaugmented crop exact
        return tuple(sizes)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _chance(self, probability: float) -> bool:
        return float(torch.rand((), generator=self.generator)) < probability

    def _rotation(self) -> torch.Tensor:
        """Rotation in (z, y, x) physical coordinates; only about z when in-plane."""
        limit = math.radians(self.config.rotation_degrees)
        if self.spatial_dims == 2:
            angle = self._uniform(-limit, limit)
            c, s = math.cos(angle), math.sin(angle)
            return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        matrix = torch.eye(3, dtype=torch.float64)
        planes = [(1, 2)] if self.in_plane_only else [(1, 2), (0, 2), (0, 1)]
        for first, second in planes:
            angle = self._uniform(-limit, limit)
            step = torch.eye(3, dtype=torch.float64)
            c, s = math.cos(angle), math.sin(angle)
            step[first, first], step[first, second], step[second, first], step[second, second] = c, -s, s, c
            matrix = step @ matrix
        return matrix

    def _sampling_matrix(self) -> torch.Tensor | None:
        """Voxel-space map from training-patch offsets to input-patch offsets, or None for identity."""
        config = self.config
        dims = self.spatial_dims
        physical = torch.eye(dims, dtype=torch.float64)
        changed = False
        if self._chance(config.rotation_probability):
            physical = self._rotation() @ physical
            changed = True
        if self._chance(config.scaling_probability):
            zoom = self._uniform(*config.scaling_range)
            scale = torch.full((dims,), 1.0 / zoom, dtype=torch.float64)
            if self.in_plane_only:
                scale[0] = 1.0
            physical = torch.diag(scale) @ physical
            changed = True
        if not changed:
            return None
        spacing = torch.tensor(self.spacing, dtype=torch.float64)
        return torch.diag(1.0 / spacing) @ physical @ torch.diag(spacing)

    def _elastic_offsets(self, device) -> torch.Tensor:
        """Smooth displacement field, in output voxels, shape (dims, *patch), array axis order."""
        config = self.config
        dims = self.spatial_dims
        points = (config.elastic_control_points,) * dims
        coarse = torch.rand((1, dims) + points, generator=self.generator, dtype=torch.float32) * 2 - 1
        spacing = torch.tensor(self.spacing, dtype=torch.float32).view(1, dims, *([1] * dims))
        coarse = coarse * config.elastic_magnitude_mm / spacing
        if self.in_plane_only:
            coarse[:, 0] = 0
        mode = "trilinear" if dims == 3 else "bilinear"
        field = F.interpolate(coarse, size=self.patch_size, mode=mode, align_corners=True)
        return field[0].to(device)

    def _spatial(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, dims = image.shape[0], self.spatial_dims
        in_size = torch.tensor(image.shape[2:], dtype=torch.float64)
        out_size = torch.tensor(self.patch_size, dtype=torch.float64)
        grids = []
        for _ in range(batch):
            matrix = self._sampling_matrix()
            if matrix is None:
                matrix = torch.eye(dims, dtype=torch.float64)
            # normalised output coords u (align_corners=False) -> voxel offsets u * out/2 -> matrix ->
            # normalised input coords: divide by in/2. affine_grid wants (x, y, z) order, so flip.
            theta = matrix * out_size[None, :] / in_size[:, None]
            theta = torch.flip(theta, dims=(0, 1))
            theta = torch.cat([theta, torch.zeros(dims, 1, dtype=torch.float64)], dim=1)
            grid = F.affine_grid(theta[None].float(), [1, 1, *self.patch_size], align_corners=False)[0]
            if self._chance(self.config.elastic_probability):
                offsets = self._elastic_offsets(image.device)  # (dims, *patch) in (z, y, x)
                normalised = offsets * 2 / in_size.float().view(dims, *([1] * dims)).to(image.device)
                grid = grid + torch.flip(normalised, dims=(0,)).movedim(0, -1)
            grids.append(grid)
        grid = torch.stack(grids).to(image.dtype)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        label = F.grid_sample(label[:, None].to(image.dtype), grid, mode="nearest", padding_mode="border",
                              align_corners=False)[:, 0]
        return image, label.round().long()

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        config = self.config
        out = []
        for sample in image:
            if self._chance(config.gamma_probability):
                mean, std = sample.mean(), sample.std()
                low, high = sample.min(), sample.max()
                gamma = self._uniform(*config.gamma_range)
                sample = ((sample - low) / (high - low + 1e-7)) ** gamma * (high - low + 1e-7) + low
                sample = (sample - sample.mean()) / (sample.std() + 1e-7) * std + mean  # keep statistics
            if self._chance(config.noise_probability):
                noise = torch.randn(sample.shape, generator=self.generator, dtype=sample.dtype)
                sample = sample + noise.to(sample.device) * config.noise_std * self._uniform(0, 1)
            out.append(sample)
        return torch.stack(out)

    def _mirror(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for sample_image, sample_label in zip(image, label):
            axes = [axis for axis in self.config.mirror_axes
                    if axis < self.spatial_dims and self._chance(self.config.mirror_probability)]
            if axes:
                sample_image = torch.flip(sample_image, dims=[a + 1 for a in axes])
                sample_label = torch.flip(sample_label, dims=axes)
            images.append(sample_image)
            labels.append(sample_label)
        return torch.stack(images), torch.stack(labels)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self._spatial(image.float(), label)
        image = self._intensity(image)
        return self._mirror(image, label)


def center_crop(image: torch.Tensor, label: torch.Tensor, patch_size: Sequence[int]):
    """The unaugmented training patch from the centre of a larger sampled patch."""
    window = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(label.shape[1:], patch_size))
    return image[(slice(None), slice(None)) + window], label[(slice(None),) + window]
