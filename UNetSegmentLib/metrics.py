"""Overlap (Dice) and boundary (HD95) metrics per label, in physical units.

Conventions for empty structures, chosen so a mean over cases stays finite where it can:
Dice is 1.0 when a label is absent from both prediction and reference, 0.0 when absent from one.
HD95 is 0.0 when absent from both and inf when absent from exactly one (no boundary to measure).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import GeometryError, InputError


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise GeometryError(f"Prediction shape {pred.shape} differs from reference shape {ref.shape}.",
                            "Compare a prediction with the reference of the same image (same grid).")
    return pred, ref


def dice_per_label(pred, ref, labels: Iterable[int]) -> dict[int, float]:
    """Dice 2|P∩R| / (|P|+|R|) for each label value."""
    pred, ref = _check_pair(pred, ref)
    scores = {}
    for label in labels:
        p, r = pred == label, ref == label
        total = int(p.sum()) + int(r.sum())
        scores[int(label)] = 1.0 if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total
    return scores


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its erosion (face connectivity), as MONAI's edge extraction."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _surface_distances(from_surface: np.ndarray, to_surface: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    distance_to = ndimage.distance_transform_edt(~to_surface, sampling=sampling)
    return distance_to[from_surface]


def hd95_per_label(pred, ref, labels: Iterable[int], spacing: Sequence[float]) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance (mm) between label boundaries.

    `spacing` is SimpleITK (x, y, z) order, arrays are (z, y, x); the larger of the two directed
    95th percentiles is reported (as MONAI's compute_hausdorff_distance with percentile=95).
    """
    pred, ref = _check_pair(pred, ref)
    spacing = [float(s) for s in spacing]
    if len(spacing) != pred.ndim or any(s <= 0 for s in spacing):
        raise InputError(f"Spacing {spacing} does not fit a {pred.ndim}D array.",
                         "Pass the image spacing in (x, y, z) order, all values positive.")
    sampling = spacing[::-1]
    scores = {}
    for label in labels:
        p, r = pred == label, ref == label
        if not p.any() and not r.any():
            scores[int(label)] = 0.0
            continue
        if not p.any() or not r.any():
            scores[int(label)] = float("inf")
            continue
        surface_p, surface_r = _surface(p), _surface(r)
        forward = _surface_distances(surface_p, surface_r, sampling)
        backward = _surface_distances(surface_r, surface_p, sampling)
        scores[int(label)] = float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
    return scores


def mean_foreground(scores: dict[int, float]) -> float:
    """Mean over labels other than background (0); nan if there are none."""
    values = [value for label, value in scores.items() if label != 0]
    return float(np.mean(values)) if values else float("nan")
