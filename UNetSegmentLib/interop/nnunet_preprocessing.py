"""nnU-Net v2's preprocessing and export, replayed in numpy from the recipe record of a checkpoint.

Order of operations (nnunetv2 DefaultPreprocessor.run_case_npy and
convert_predicted_logits_to_segmentation_with_correct_shape): transpose_forward -> crop to the
non-zero region (holes filled) -> normalise per channel (before resampling) -> resample to the
plans' spacing (3rd order in-plane, nearest along z when anisotropic) -> network -> logits resampled
back (1st order, nearest along z) -> softmax -> argmax -> un-crop -> transpose_backward.

Resampling is nnU-Net's `resample_data_or_seg` with skimage's `resize(mode='edge',
anti_aliasing=False)` written out as what it is: `scipy.ndimage.zoom(grid_mode=True)` and a clip to
the input range, so scikit-image is not needed. Arrays are (C, *spatial) in the file's own array
order (SimpleITK: z, y, x); nothing is reoriented, as nnU-Net does not reorient either.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError


@dataclass
class CaseProperties:
    """What export needs to undo preprocessing (nnU-Net's properties dict)."""

    spacing: list  # original spacing in array order (z, y, x)
    shape_before_cropping: tuple
    bbox: list  # [[start, stop), ...] in transposed array order
    shape_after_cropping: tuple
    network_shape: tuple


def nonzero_bbox(data: np.ndarray) -> tuple[list, np.ndarray]:
    """nnU-Net's crop_to_nonzero: bounding box of the hole-filled non-zero mask over all channels."""
    mask = data[0] != 0
    for channel in range(1, data.shape[0]):
        mask |= data[channel] != 0
    mask = ndimage.binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        bbox.append([int(present[0]), int(present[-1]) + 1] if present.size else [0, mask.shape[axis]])
    return bbox, mask


def compute_new_shape(old_shape, old_spacing, new_spacing) -> np.ndarray:
    return np.array([int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)])


def _separate_z(force_separate_z, current_spacing, new_spacing, threshold: float):
    """(do_separate_z, axis) exactly as nnunetv2 determine_do_sep_z_and_axis."""
    def anisotropic(spacing):
        return (np.max(spacing) / np.min(spacing)) > threshold

    def lowres_axis(spacing):
        return np.where(max(spacing) / np.array(spacing) == 1)[0]

    if force_separate_z is not None:
        do_separate_z = bool(force_separate_z)
        axis = lowres_axis(current_spacing) if force_separate_z else None
    elif anisotropic(current_spacing):
        do_separate_z, axis = True, lowres_axis(current_spacing)
    elif anisotropic(new_spacing):
        do_separate_z, axis = True, lowres_axis(new_spacing)
    else:
        do_separate_z, axis = False, None
    if axis is not None:
        if len(axis) in (2, 3):
            return False, None
        axis = int(axis[0])
    return do_separate_z, axis


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage.transform.resize(image, shape, order, mode='edge', anti_aliasing=False) on float64 input."""
    factors = [int(o) / int(i) for o, i in zip(shape, image.shape)]
    out = ndimage.zoom(image, factors, order=order, mode="nearest", cval=0, grid_mode=True)
    if order > 0:
        np.clip(out, image.min(), image.max(), out=out)
    return out


def resample(data: np.ndarray, new_shape: Sequence[int], current_spacing, new_spacing, order: int = 3,
             order_z: int = 0, force_separate_z=None, threshold: float = 3.0) -> np.ndarray:
    """nnunetv2 resample_data_or_seg_to_shape for images and logits (is_seg=False); keeps data's dtype."""
    do_separate_z, axis = _separate_z(force_separate_z, current_spacing, new_spacing, threshold)
    shape = np.array(data[0].shape)
    new_shape = np.array([int(s) for s in new_shape])
    if not np.any(shape != new_shape):
        return data
    output = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    for channel in range(data.shape[0]):
        source = data[channel].astype(float, copy=False)
        if not do_separate_z:
            output[channel] = _resize(source, new_shape, order)
            continue
        in_plane = tuple(int(s) for a, s in enumerate(new_shape) if a != axis)
        intermediate_shape = deepcopy(new_shape)
        intermediate_shape[axis] = shape[axis]
        intermediate = np.zeros(intermediate_shape)
        for index in range(shape[axis]):
            where = tuple(index if a == axis else slice(None) for a in range(3))
            intermediate[where] = _resize(source[where], in_plane, order)
        if shape[axis] == new_shape[axis]:
            output[channel] = intermediate
            continue
        # along the thick axis: map_coordinates(order=order_z, mode='nearest') on nnU-Net's pixel-centre grid;
        # the other axes keep their size, so their coordinates are exact integers
        scale = float(shape[axis]) / new_shape[axis]
        if order_z == 0:
            positions = scale * (np.arange(new_shape[axis]) + 0.5) - 0.5
            picks = ndimage.map_coordinates(np.arange(shape[axis], dtype=float), positions[None], order=0,
                                            mode="nearest").astype(int)
            output[channel] = np.take(intermediate, picks, axis=axis)
        else:
            grids = np.mgrid[tuple(slice(0, int(n)) for n in new_shape)].astype(float)
            for a in range(3):
                grids[a] = (intermediate.shape[a] / new_shape[a]) * (grids[a] + 0.5) - 0.5
            output[channel] = ndimage.map_coordinates(intermediate, grids, order=order_z, mode="nearest")
    return output


def _normalise(image: np.ndarray, scheme: str, use_mask: bool, mask: np.ndarray, properties: dict) -> np.ndarray:
    """One channel, float32, as nnunetv2's normalisation classes (eps 1e-8)."""
    image = image.astype(np.float32, copy=False)
    if scheme == "CTNormalization":
        np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
        image -= properties["mean"]
        image /= max(properties["std"], 1e-8)
        return image
    if scheme == "ZScoreNormalization":
        if use_mask:
            mean = image[mask].mean()
            std = image[mask].std()
            image[mask] = (image[mask] - mean) / max(std, 1e-8)
        else:
            mean = image.mean()
            std = image.std()
            image -= mean
            image /= max(std, 1e-8)
        return image
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=1e-8, a_max=None)
        return image
    raise InputError(f"nnU-Net normalisation '{scheme}' is not supported.",
                     "Use a model planned with CTNormalization, ZScoreNormalization, NoNormalization or "
                     "RescaleTo01Normalization.")


def target_spacing(recipe: dict, original_spacing: Sequence[float]) -> list:
    spacing = list(recipe["spacing"])
    if len(spacing) < len(original_spacing):  # 2D configurations keep the out-of-plane spacing
        spacing = [original_spacing[0]] + spacing
    return spacing


def preprocess(data: np.ndarray, spacing_zyx: Sequence[float], recipe: dict) -> tuple[np.ndarray, CaseProperties]:
    """(C, z, y, x) image in file array order -> (C, *network grid) float32 and what export needs."""
    transpose = list(recipe["transpose_forward"])
    data = data.astype(np.float32).transpose([0, *[a + 1 for a in transpose]])
    original_spacing = [float(spacing_zyx[a]) for a in transpose]
    shape_before = tuple(data.shape[1:])
    bbox, mask = nonzero_bbox(data)
    crop = tuple(slice(start, stop) for start, stop in bbox)
    data = data[(slice(None),) + crop]
    mask = mask[crop]
    shape_after = tuple(data.shape[1:])
    spacing = target_spacing(recipe, original_spacing)
    new_shape = compute_new_shape(shape_after, original_spacing, spacing)
    for channel in range(data.shape[0]):
        properties = recipe["foreground_intensity_properties"].get(str(channel), {})
        data[channel] = _normalise(data[channel], recipe["normalization_schemes"][channel],
                                   bool(recipe["use_mask_for_norm"][channel]), mask, properties)
    kwargs = recipe["resampling_data"]
    data = resample(data, new_shape, original_spacing, spacing, kwargs["order"], kwargs["order_z"],
                    kwargs["force_separate_z"], kwargs["separate_z_anisotropy_threshold"])
    return data, CaseProperties(list(spacing_zyx), shape_before, bbox, shape_after, tuple(data.shape[1:]))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    return shifted


def export(logits: np.ndarray, properties: CaseProperties, recipe: dict, need_probabilities: bool
           ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Network-grid logits (C, ...) -> labels (file array order) and, if asked, probabilities (C, ...).

    The logits keep their dtype through resampling (nnU-Net's are float16); the softmax is in float32."""
    transpose = list(recipe["transpose_forward"])
    backward = list(recipe["transpose_backward"])
    spacing_transposed = [properties.spacing[a] for a in transpose]
    current = target_spacing(recipe, spacing_transposed)
    kwargs = recipe["resampling_probabilities"]
    logits = resample(logits, properties.shape_after_cropping, current,
                      spacing_transposed, kwargs["order"], kwargs["order_z"], kwargs["force_separate_z"],
                      kwargs["separate_z_anisotropy_threshold"])
    probabilities = softmax(np.array(logits, dtype=np.float32, copy=True))
    del logits
    crop = tuple(slice(start, stop) for start, stop in properties.bbox)
    labels = np.zeros(properties.shape_before_cropping, dtype=np.uint8 if probabilities.shape[0] <= 255 else np.uint16)
    labels[crop] = probabilities.argmax(0)
    labels = np.ascontiguousarray(labels.transpose(backward))
    if not need_probabilities:
        return labels, None
    full = np.zeros((probabilities.shape[0], *properties.shape_before_cropping), dtype=np.float32)
    full[0] = 1
    full[(slice(None),) + crop] = probabilities
    return labels, np.ascontiguousarray(full.transpose([0, *[a + 1 for a in backward]]))
