"""Window grid and importance map for sliding-window blending.

Both follow MONAI's `sliding_window_inference` (and nnU-Net's Gaussian, sigma = patch / 8) exactly,
so a model validated with either tool segments the same way here.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

BLEND_MODES = ("gaussian", "constant")
GRIDS = ("monai", "nnunet")  # window placement and Gaussian of MONAI, or exactly those of nnUNetPredictor


def scan_interval(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Step between window starts per axis: patch * (1 - overlap), at least 1 voxel."""
    steps = []
    for size, patch in zip(image_size, patch_size):
        if patch == size:
            steps.append(int(patch))
        else:
            steps.append(max(1, int(patch * (1 - overlap))))
    return tuple(steps)


def axis_starts(size: int, patch: int, step: int) -> list[int]:
    """Window starts along one axis; the last window is shifted back to end at the border."""
    if patch >= size:
        return [0]
    count = math.ceil((size - patch) / step) + 1
    return [min(index * step, size - patch) for index in range(count)]


def nnunet_axis_starts(size: int, patch: int, overlap: float) -> list[int]:
    """nnU-Net's starts along one axis: the fewest windows at step <= patch * (1 - overlap), spread evenly
    from 0 to size - patch (nnunetv2 compute_steps_for_sliding_window)."""
    if patch >= size:
        return [0]
    count = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    step = (size - patch) / (count - 1)
    return [int(round(step * index)) for index in range(count)]


def window_starts(image_size: Sequence[int], patch_size: Sequence[int], overlap: float,
                  grid: str = "monai") -> list[tuple[int, ...]]:
    """Every window's start corner, first axis slowest (the order MONAI uses)."""
    if grid == "nnunet":
        per_axis = [nnunet_axis_starts(int(s), int(p), overlap) for s, p in zip(image_size, patch_size)]
        return list(itertools.product(*per_axis))
    steps = scan_interval(image_size, patch_size, overlap)
    per_axis = [axis_starts(int(s), int(p), st) for s, p, st in zip(image_size, patch_size, steps)]
    return list(itertools.product(*per_axis))


def importance_map(patch_size: Sequence[int], blend: str = "gaussian", sigma_scale: float = 0.125,
                   device: torch.device | str = "cpu", grid: str = "monai") -> torch.Tensor:
    """Per-voxel blending weight of a window, float32, shaped `patch_size`.

    Gaussian weights favour the window centre, where the network saw the most context; the floor
    (smallest weight, at least 1e-3) keeps every voxel covered by some window. grid "nnunet": nnU-Net's
    map exactly (centre at patch // 2, scaled to 10, rounded to float16, zeros raised to the smallest weight).
    """
    if grid == "nnunet" and blend == "gaussian":
        return _nnunet_gaussian(tuple(int(p) for p in patch_size), sigma_scale).to(device)
    if blend == "constant":
        return torch.ones(tuple(int(p) for p in patch_size), dtype=torch.float32, device=device)
    if blend != "gaussian":
        raise ValueError(f"unknown blend mode {blend!r}")
    weights = None
    for axis, patch in enumerate(patch_size):
        sigma = patch * sigma_scale
        coordinates = torch.arange(-(patch - 1) / 2.0, (patch - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        profile = torch.exp(coordinates ** 2 / (-2 * sigma ** 2))
        weights = profile if axis == 0 else weights.unsqueeze(-1) * profile
    floor = max(float(weights.min()), 1e-3)
    return weights.clamp_(min=floor)


def _nnunet_gaussian(patch_size: tuple, sigma_scale: float) -> torch.Tensor:
    """nnunetv2 compute_gaussian(value_scaling_factor=10, dtype=float16), returned as float32."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    delta = np.zeros(patch_size)
    delta[tuple(p // 2 for p in patch_size)] = 1
    weights = gaussian_filter(delta, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    weights = torch.from_numpy(weights / (np.max(weights) / 10)).to(torch.float16)
    weights[weights == 0] = torch.min(weights[weights != 0])
    return weights.float()
