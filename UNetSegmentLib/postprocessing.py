"""Class scores from the network grid back onto the input grid, slab by slab.

Resampling every class at full resolution first (C float32 copies of a CT-sized volume, then an
int64 argmax) is what made a 512x512x600 CT peak at 7 GB. Here the input grid is walked in slabs of
planes along its first array axis: each slab's scores are resampled from the few network-grid planes
around it (same interpolation as `preprocessing.resample_scores`, so the values are the same), and
the argmax, the entropy and the probabilities are written into preallocated outputs. Peak memory is
the outputs asked for plus one slab.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import SimpleITK as sitk

from . import preprocessing

SLAB_VOXELS = 1 << 22  # input-grid voxels per slab (x classes float32): ~16 MB per class
MARGIN_PLANES = 2      # network-grid planes kept around a slab: linear and nearest need at most one


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Voxel-wise entropy / log(C): 0 where one label is certain, 1 where all are equally likely.

    Computed from the final (input-grid) probabilities so every engine gives the same measure.
    """
    clipped = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(clipped * np.log(clipped)).sum(axis=0)
    return np.clip(entropy / np.log(probabilities.shape[0]), 0.0, 1.0).astype(np.float32)


def _source_planes(source: sitk.Image, reference: sitk.Image, start: int, stop: int) -> tuple[int, int]:
    """Network-grid planes (array axis 0 = index axis 2) that input-grid planes [start, stop) fall between."""
    size_x, size_y = reference.GetSize()[0] - 1, reference.GetSize()[1] - 1
    positions = []
    for z in (start, stop - 1):
        for x in (0, size_x):
            for y in (0, size_y):
                point = reference.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
                positions.append(source.TransformPhysicalPointToContinuousIndex(point)[2])
    low = max(0, int(math.floor(min(positions))) - MARGIN_PLANES)
    high = min(source.GetSize()[2], int(math.ceil(max(positions))) + MARGIN_PLANES + 1)
    return low, max(high, low + 1)


def scores_to_grid(scores: np.ndarray, source: sitk.Image, reference: sitk.Image, *,
                   probabilities: bool = False, uncertainty: bool = False, cancel=None
                   ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(labels uint8 (z, y, x), probabilities float32 (z, y, x, C) or None, normalised entropy (z, y, x) or None)
    on `reference`'s grid, from class scores (C, z, y, x) on `source`'s grid (same direction)."""
    scores = np.asarray(scores)
    channels = scores.shape[0]
    shape = tuple(reversed(reference.GetSize()))
    labels = np.empty(shape, dtype=np.uint8)
    probability_out = np.empty(shape + (channels,), dtype=np.float32) if probabilities else None
    uncertainty_out = np.empty(shape, dtype=np.float32) if uncertainty else None
    plane = shape[1] * shape[2]
    step = max(1, SLAB_VOXELS // max(1, plane))
    for start in range(0, shape[0], step):
        if cancel is not None:
            cancel.raise_if_cancelled()
        stop = min(start + step, shape[0])
        slab_grid = reference[:, :, start:stop]
        low, high = _source_planes(source, reference, start, stop)
        slab = preprocessing.resample_scores(scores[:, low:high], source[:, :, low:high], slab_grid)
        labels[start:stop] = np.argmax(slab, axis=0)
        if uncertainty_out is not None:
            uncertainty_out[start:stop] = normalised_entropy(slab)
        if probability_out is not None:
            probability_out[start:stop] = np.moveaxis(slab, 0, -1)
    return labels, probability_out, uncertainty_out
