"""nnU-Net style preprocessing replayed identically at training and inference time.

Orientation, resampling and intensity normalisation live here so that a checkpoint trained on
one orientation/spacing segments any other: the pipeline brings every input onto the grid and
intensity scale the network saw during training, and the result back onto the input's own grid.

Spacing is always SimpleITK (x, y, z); arrays are numpy (z, y, x).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import GeometryError, InputError
from .metadata import Normalization

CANONICAL_ORIENTATION = "LPS"  # identity direction in ITK terms: rows +x (L), columns +y (P), slices +z (S)
ANISOTROPY_RATIO = 3.0  # out-of-plane spacing above this multiple of in-plane spacing counts as anisotropic
IMAGE_INTERPOLATOR = sitk.sitkBSpline  # third order, as nnU-Net
FOREGROUND_PERCENTILES = (0.5, 99.5)
MAX_NORMALIZATION_SAMPLES_PER_CASE = 200_000  # bounds memory on large training sets; deterministic stride


def validate_image(image: sitk.Image, what: str = "input image", allow_constant: bool = False) -> None:
    """Refuse images that would make preprocessing or inference meaningless, naming the fix."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"The {what} is a {type(image).__name__}, not a SimpleITK image.",
                         "Read it with UNetSegmentLib.io.read_image.")
    if image.GetDimension() != 3:
        raise GeometryError(f"The {what} is {image.GetDimension()}D; UNetSegment segments 3D volumes.",
                            "Pass a 3D volume (a single 2D slice can be saved as a volume with one slice).")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel.",
                         "Pass a scalar (single-channel) volume, e.g. convert RGB to grayscale first.")
    size = image.GetSize()
    if min(size) < 1 or int(np.prod(size)) == 0:
        raise GeometryError(f"The {what} is empty (size {size}).", "Pass a volume with at least one voxel.")
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise GeometryError(f"The {what} has invalid spacing {tuple(spacing.tolist())} mm.",
                            "Fix the spacing in the file header (all values must be positive).")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise GeometryError(f"The {what} has a degenerate direction matrix.",
                            "Fix the orientation (direction cosines) in the file header.")
    shear = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if shear > 1e-3:  # sheared grids (e.g. gantry tilt) would be silently distorted by reorientation
        raise GeometryError(f"The {what} has a non-orthogonal (sheared) direction matrix (axes deviate by "
                            f"{np.degrees(np.arcsin(min(1.0, shear))):.1f} degrees from perpendicular).",
                            "Resample it onto an orthogonal grid first (e.g. harden the gantry-tilt "
                            "correction in Slicer, or Resample Scalar Volume).")
    if not np.all(np.isfinite(image.GetOrigin())):
        raise GeometryError(f"The {what} has a non-finite origin.", "Fix the origin in the file header.")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(f"The {what} contains NaN or infinite values.",
                         "Replace them (e.g. with the background value) before segmenting.")
    if not allow_constant and array.min() == array.max():
        raise InputError(f"The {what} is constant (every voxel is {array.flat[0]}); there is nothing to segment.",
                         "Check that the right volume was loaded.")


def validate_same_grid(image: sitk.Image, other: sitk.Image, what: str = "labelmap",
                       tolerance: float = 1e-4) -> None:
    """GeometryError unless `other` lies on exactly the grid of `image` (size, spacing, origin, direction)."""
    if image.GetSize() != other.GetSize():
        raise GeometryError(f"The {what} has size {other.GetSize()}, the image {image.GetSize()}.",
                            f"Use the {what} that belongs to this image.")
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        a, b = np.asarray(getattr(image, name)()), np.asarray(getattr(other, name)())
        if not np.allclose(a, b, atol=tolerance, rtol=tolerance):
            raise GeometryError(f"The {what} {name[3:].lower()} {tuple(b.tolist())} differs from the image's "
                                f"{tuple(a.tolist())}.",
                                f"Resample the {what} onto the image grid first.")


def reorient_to_canonical(image: sitk.Image) -> sitk.Image:
    """Permute/flip voxel axes so the direction is as close to identity as a permutation allows.

    Physical geometry is unchanged; only the voxel order changes. The network then always sees
    the same anatomical axis order, whatever order the scanner or file stored.
    """
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def compute_target_spacing(spacings: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """Median spacing per axis of a training set (nnU-Net's default target spacing)."""
    if len(spacings) == 0:
        raise InputError("No spacings were given to compute a target spacing from.",
                         "Pass the spacing of every training image.")
    array = np.asarray(spacings, dtype=float)
    if array.ndim != 2 or array.shape[1] != 3 or np.any(array <= 0) or not np.all(np.isfinite(array)):
        raise GeometryError(f"Spacings must be positive (x, y, z) triples, got {spacings!r}.",
                            "Fix the spacing in the image headers.")
    return tuple(float(value) for value in np.median(array, axis=0))


def _anisotropic_axis(spacing: Sequence[float]) -> Optional[int]:
    """Index (x, y, z order) of the out-of-plane axis if spacing is anisotropic, else None."""
    spacing = np.asarray(spacing, dtype=float)
    axis = int(np.argmax(spacing))
    in_plane = np.delete(spacing, axis)
    return axis if spacing[axis] > ANISOTROPY_RATIO * in_plane.max() else None


def _grid_like(size, spacing, origin, direction, pixel_id=sitk.sitkUInt8) -> sitk.Image:
    grid = sitk.Image([int(s) for s in size], pixel_id)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection([float(d) for d in direction])
    return grid


def _target_grid(image: sitk.Image, target_spacing: Sequence[float]) -> sitk.Image:
    """Grid covering the same physical extent as `image` with the target spacing, same direction and origin."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    target = np.asarray(target_spacing, dtype=float)
    if target.shape != (3,) or np.any(target <= 0) or not np.all(np.isfinite(target)):
        raise GeometryError(f"Target spacing must be three positive numbers (x, y, z), got {target_spacing!r}.",
                            "Pass e.g. (1.0, 1.0, 2.5).")
    size = np.maximum(1, np.round(np.asarray(image.GetSize()) * spacing / target)).astype(int)
    return _grid_like(size, target, image.GetOrigin(), image.GetDirection())


def _resample(image: sitk.Image, grid: sitk.Image, interpolator, default_value: float = 0.0) -> sitk.Image:
    """Resample onto `grid`; points just outside the source (rounded grid sizes) take the nearest edge value."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(grid)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetOutputPixelType(image.GetPixelID())
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(image)


def _resample_two_stage(image: sitk.Image, grid: sitk.Image, interpolator, default_value: float = 0.0
                        ) -> sitk.Image:
    """Resample at `interpolator` order in-plane and nearest-neighbour along an anisotropic axis.

    Falls back to one full 3D resampling when source and target are isotropic or the grids are not aligned
    (different directions), where the in-plane/out-of-plane split is not defined.
    """
    axis = _anisotropic_axis(image.GetSpacing())
    if axis is None:  # as nnU-Net: a thick-slice target counts too
        axis = _anisotropic_axis(grid.GetSpacing())
    aligned = np.allclose(image.GetDirection(), grid.GetDirection(), atol=1e-6)
    if axis is None or not aligned or interpolator == sitk.sitkNearestNeighbor:
        return _resample(image, grid, interpolator, default_value)
    # Stage 1: in-plane onto the target grid, keeping the source sampling along the out-of-plane axis.
    direction = np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3)
    axis_vector = direction[:, axis]
    shift = float(np.dot(axis_vector, np.asarray(image.GetOrigin()) - np.asarray(grid.GetOrigin())))
    size = list(grid.GetSize())
    size[axis] = image.GetSize()[axis]
    spacing = list(grid.GetSpacing())
    spacing[axis] = image.GetSpacing()[axis]
    origin = np.asarray(grid.GetOrigin()) + axis_vector * shift
    intermediate_grid = _grid_like(size, spacing, origin, grid.GetDirection())
    intermediate = _resample(image, intermediate_grid, interpolator, default_value)
    # Stage 2: only the out-of-plane axis changes, by nearest neighbour (no blur across thick slices).
    return _resample(intermediate, grid, sitk.sitkNearestNeighbor, default_value)


def _label_values(label: sitk.Image) -> list[int]:
    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label))]


def resample_image(image: sitk.Image, target_spacing: Optional[Sequence[float]] = None, is_label: bool = False,
                   reference: Optional[sitk.Image] = None) -> sitk.Image:
    """Resample an image (3rd-order B-spline) or labelmap (linear one-hot, argmax back).

    `reference` resamples onto that image's exact grid (size, spacing, origin, direction) instead
    of a grid at `target_spacing`; it wins when both are given.
    """
    if reference is not None:
        grid = _grid_like(reference.GetSize(), reference.GetSpacing(), reference.GetOrigin(),
                          reference.GetDirection())
    elif target_spacing is not None:
        grid = _target_grid(image, target_spacing)
    else:
        raise InputError("resample_image needs a target spacing or a reference image.",
                         "Pass target_spacing=(x, y, z) or reference=<image>.")
    if not is_label:
        source = sitk.Cast(image, sitk.sitkFloat32)
        return _resample_two_stage(source, grid, IMAGE_INTERPOLATOR)
    return _resample_labels(image, grid)


def _resample_labels(label: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """Linear interpolation of each label's one-hot mask, argmax kept running to bound memory."""
    values = _label_values(label)
    array = sitk.GetArrayViewFromImage(label)
    best_score = None
    best_value = None
    for value in values:
        mask = sitk.GetImageFromArray((array == value).astype(np.float32))
        mask.CopyInformation(label)
        score = sitk.GetArrayFromImage(_resample_two_stage(mask, grid, sitk.sitkLinear, 0.0))
        if best_score is None:
            best_score = score
            best_value = np.full(score.shape, value, dtype=np.int64)
        else:
            better = score > best_score
            best_score = np.where(better, score, best_score)
            best_value[better] = value
    output_type = np.uint8 if max(values) <= 255 and min(values) >= 0 else np.int32
    result = sitk.GetImageFromArray(best_value.astype(output_type))
    result.CopyInformation(grid)
    return result


def resample_scores(scores: np.ndarray, source_grid: sitk.Image, reference: sitk.Image, cancel=None) -> np.ndarray:
    """Resample per-class scores (C, z, y, x) from `source_grid` onto `reference`'s grid (linear).

    Argmax after resampling scores gives smoother borders than resampling labels.
    """
    scores = np.asarray(scores)
    expected = tuple(reversed(source_grid.GetSize()))
    if scores.ndim != 4 or scores.shape[1:] != expected:
        raise GeometryError(f"Class scores of shape {scores.shape} do not fit the grid {expected}.",
                            "Pass (channels, z, y, x) scores computed on that grid.")
    grid = _grid_like(reference.GetSize(), reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection())
    output = np.empty((scores.shape[0],) + tuple(reversed(reference.GetSize())), dtype=np.float32)
    for channel in range(scores.shape[0]):
        if cancel is not None:  # one check per class: cancel is not held up by the whole post-processing
            cancel.raise_if_cancelled()
        channel_image = sitk.GetImageFromArray(np.ascontiguousarray(scores[channel], dtype=np.float32))
        channel_image.CopyInformation(source_grid)
        output[channel] = sitk.GetArrayFromImage(_resample_two_stage(channel_image, grid, sitk.sitkLinear))
    return output


def _foreground_samples(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    label = np.asarray(label)
    if image.shape != label.shape:
        raise GeometryError(f"Image shape {image.shape} and label shape {label.shape} differ.",
                            "Resample each labelmap onto its image grid first.")
    values = image[label > 0].astype(np.float64)
    if values.size > MAX_NORMALIZATION_SAMPLES_PER_CASE:
        stride = int(np.ceil(values.size / MAX_NORMALIZATION_SAMPLES_PER_CASE))
        values = values[::stride]
    return values


def compute_ct_normalization(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Normalization:
    """CT statistics of a training set: foreground 0.5/99.5 percentiles, then mean/std of the clipped values."""
    if len(images) == 0 or len(images) != len(labels):
        raise InputError(f"Got {len(images)} images and {len(labels)} labelmaps for CT normalisation.",
                         "Pass one labelmap per training image.")
    values = np.concatenate([_foreground_samples(image, label) for image, label in zip(images, labels)])
    if values.size == 0:
        raise InputError("The training labelmaps contain no foreground voxels; CT statistics are undefined.",
                         "Check the labelmaps (label values above 0 mark the structures to learn).")
    if not np.all(np.isfinite(values)):
        raise InputError("The training images contain NaN or infinite values.", "Replace them before training.")
    low, high = np.percentile(values, FOREGROUND_PERCENTILES)
    clipped = np.clip(values, low, high)
    return Normalization(scheme="ct", clip_low=float(low), clip_high=float(high),
                         mean=float(clipped.mean()), std=float(clipped.std()))


def normalize(array: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Apply the checkpoint's normalisation: "ct" (clip + fixed statistics) or per-volume "zscore"."""
    array = np.asarray(array, dtype=np.float32)
    scheme = normalization.scheme
    if scheme == "ct":
        missing = [name for name in ("clip_low", "clip_high", "mean", "std")
                   if getattr(normalization, name) is None]
        if missing:
            raise InputError(f"CT normalisation lacks {', '.join(missing)}.",
                             "Use a checkpoint trained by UNetSegment on a CT dataset.")
        clipped = np.clip(array, normalization.clip_low, normalization.clip_high)
        return ((clipped - normalization.mean) / max(float(normalization.std), 1e-8)).astype(np.float32)
    if scheme == "zscore":
        mean = float(array.mean(dtype=np.float64))
        std = float(array.std(dtype=np.float64))
        return ((array - mean) / max(std, 1e-8)).astype(np.float32)
    raise InputError(f"Unknown normalisation scheme '{scheme}'.", "Use 'ct' or 'zscore'.")
