"""Training patch samplers: where in which case the next training patch comes from.

Small foreground structures would almost never be seen with uniform sampling, so the foreground
sampler (nnU-Net style) centres a fixed share of patches on a voxel of a randomly chosen foreground
class. Every sampler draws from its own seeded generator: the same seed gives the same patches.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError


def _as_channels_first(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    if image.ndim == label.ndim:
        image = image[None]
    if image.ndim != label.ndim + 1 or image.shape[1:] != label.shape:
        raise InputError(f"Image shape {image.shape} does not match label shape {label.shape}.",
                         "Resample the label onto the image grid before training.")
    return image


def _stack(patches) -> tuple[np.ndarray, np.ndarray]:
    """(images (B, C, *patch) float32, labels (B, *patch) int64) from `sample()` results."""
    images = np.stack([p[0] for p in patches]).astype(np.float32, copy=False)
    labels = np.stack([p[1] for p in patches]).astype(np.int64, copy=False)
    return images, labels


class PatchSampler:
    """Uniformly random patches. `cases` are (image (C, *spatial) or (*spatial), label (*spatial)).

    Volumes smaller than the patch are padded (image with its minimum, label with background), so
    every patch has exactly `patch_size`.
    """

    def __init__(self, cases: Sequence[tuple[np.ndarray, np.ndarray]], patch_size: Sequence[int], seed: int = 0):
        if not cases:
            raise InputError("No training cases to sample patches from.",
                             "Check that the dataset folder holds images and labels.")
        self.patch_size = tuple(int(p) for p in patch_size)
        if any(p < 1 for p in self.patch_size):
            raise InputError(f"Patch size {self.patch_size} must be positive.", "Pass e.g. --patch-size 32 64 64.")
        self.cases = []
        for image, label in cases:
            image = _as_channels_first(np.asarray(image), np.asarray(label))
            if label.ndim != len(self.patch_size):
                raise InputError(f"A {len(self.patch_size)}D patch size cannot sample a {label.ndim}D volume.",
                                 f"Pass a patch size with {label.ndim} numbers.")
            self.cases.append(self._pad(image, np.asarray(label)))
        self.rng = np.random.default_rng(seed)

    def _pad(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        missing = [max(0, p - s) for p, s in zip(self.patch_size, label.shape)]
        if not any(missing):
            return image, label
        widths = [(m // 2, m - m // 2) for m in missing]
        image = np.pad(image, [(0, 0)] + widths, mode="constant", constant_values=float(image.min()))
        return image, np.pad(label, widths, mode="constant", constant_values=0)

    def _random_corner(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(self.rng.integers(0, s - p + 1)) for s, p in zip(shape, self.patch_size))

    def _corner_centred_on(self, voxel: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
        """Corner of the patch centred on `voxel`, shifted inside the volume (the voxel stays in it)."""
        return tuple(int(np.clip(v - p // 2, 0, s - p)) for v, s, p in zip(voxel, shape, self.patch_size))

    def choose_corner(self, case_index: int) -> tuple[int, ...]:
        return self._random_corner(self.cases[case_index][1].shape)

    def sample(self) -> tuple[np.ndarray, np.ndarray, int, tuple[int, ...]]:
        """One patch: (image (C, *patch), label (*patch), case index, patch corner)."""
        case_index = int(self.rng.integers(len(self.cases)))
        corner = self.choose_corner(case_index)
        image, label = self.cases[case_index]
        window = tuple(slice(c, c + p) for c, p in zip(corner, self.patch_size))
        return image[(slice(None),) + window], label[window], case_index, corner

    def sample_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (B, C, *patch) float32, labels (B, *patch) int64)."""
        return _stack([self.sample() for _ in range(batch_size)])


class UniformPatchSampler(PatchSampler):
    """Every position equally likely."""


class ForegroundPatchSampler(PatchSampler):
    """A `foreground_fraction` share of patches is centred on a voxel of a random foreground class."""

    def __init__(self, cases, patch_size, seed: int = 0, foreground_fraction: float = 1 / 3,
                 max_voxels_per_class: int = 10000):
        super().__init__(cases, patch_size, seed)
        if not 0.0 <= foreground_fraction <= 1.0:
            raise InputError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}.",
                             "nnU-Net uses 1/3.")
        self.foreground_fraction = foreground_fraction
        # Voxel positions per class, subsampled: enough to pick centres from, cheap to keep in memory.
        self.class_voxels: list[dict[int, np.ndarray]] = []
        for _, label in self.cases:
            per_class = {}
            for value in np.unique(label):
                if value == 0:
                    continue
                voxels = np.argwhere(label == value)
                if len(voxels) > max_voxels_per_class:
                    voxels = voxels[self.rng.choice(len(voxels), max_voxels_per_class, replace=False)]
                per_class[int(value)] = voxels
            self.class_voxels.append(per_class)

    def choose_corner(self, case_index: int) -> tuple[int, ...]:
        shape = self.cases[case_index][1].shape
        per_class = self.class_voxels[case_index]
        if not per_class or self.rng.random() >= self.foreground_fraction:
            return self._random_corner(shape)
        voxels = per_class[list(per_class)[int(self.rng.integers(len(per_class)))]]
        return self._corner_centred_on(voxels[int(self.rng.integers(len(voxels)))], shape)


SAMPLERS = {"uniform": UniformPatchSampler, "foreground": ForegroundPatchSampler}


class MixedSampler:
    """Batches that mix two samplers: a `share` of each batch from `secondary` (stochastic rounding, so
    the share holds on average for any batch size), the rest, always at least one patch, from `primary`.
    Fine-tuning draws the user's cases from `primary` and the parent's rehearsal cases from `secondary`."""

    def __init__(self, primary: PatchSampler, secondary: PatchSampler, share: float, seed: int = 0):
        if not 0.0 <= share < 1.0:
            raise InputError(f"The share of the second sampler must be in [0, 1), got {share}.", "Pass e.g. 0.5.")
        if primary.patch_size != secondary.patch_size:
            raise InputError(f"Mixed samplers need one patch size, got {primary.patch_size} and "
                             f"{secondary.patch_size}.", "Build both with the same patch size.")
        self.primary, self.secondary, self.share = primary, secondary, float(share)
        self.patch_size = primary.patch_size
        self.rng = np.random.default_rng(seed)

    def sample_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        from_secondary = min(max(0, batch_size - 1), int(np.floor(self.share * batch_size + self.rng.random())))
        return _stack([self.secondary.sample() for _ in range(from_secondary)]
                      + [self.primary.sample() for _ in range(batch_size - from_secondary)])


def make_sampler(name: str, cases, patch_size, seed: int = 0) -> PatchSampler:
    try:
        sampler_class = SAMPLERS[name]
    except KeyError:
        raise InputError(f"Unknown patch sampler '{name}'.", f"Choose one of: {', '.join(SAMPLERS)}.") from None
    return sampler_class(cases, patch_size, seed)
