"""Is this model meant for this scan? Warnings before a result is trusted, from the model card.

A model trained on MR gives confident garbage on a CT (and the reverse), and a scan whose intensity
histogram looks nothing like the training scans' is outside what the model has seen. Two checks,
both on the raw input before any normalisation:
- modality: CT stores Hounsfield units, so air sits near -1000 and a large share of voxels is
  negative; magnitude MR images have no negative values.
- histogram shape: percentiles of the per-volume z-scored intensities (scale-free, so MR scans with
  maxima from 127 to 1e6 compare fairly) against the range the training cases spanned (the card's
  `training.intensity`, written by `train`), with a margin so unseen cases of the same kind stay silent.
Importable without torch.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

MAX_SAMPLES = 200_000  # a strided subsample: enough for percentiles, cheap for a 512^3 CT
CT_NEGATIVE_FRACTION = 0.05  # share of voxels below 0 from which a scan looks like CT ...
CT_AIR_PERCENTILE = -500.0  # ... when its 1st percentile is also air-like (HU)
HISTOGRAM_MARGIN = 0.5  # z-score units beyond the training range before the shape counts as foreign


def intensity_profile(array: np.ndarray) -> dict[str, float]:
    """Raw 1/50/99th percentiles, the same after z-scoring, and the share of negative voxels."""
    flat = np.asarray(array).ravel()
    if flat.size > MAX_SAMPLES:
        flat = flat[:: int(np.ceil(flat.size / MAX_SAMPLES))]
    flat = flat.astype(np.float64, copy=False)
    p01, p50, p99 = np.percentile(flat, (1, 50, 99))
    std = float(flat.std())
    z01, z50, z99 = ((np.array([p01, p50, p99]) - flat.mean()) / max(std, 1e-8)).tolist()
    return {"p01": float(p01), "p50": float(p50), "p99": float(p99), "z01": z01, "z50": z50, "z99": z99,
            "negative_fraction": float((flat < 0).mean())}


def looks_like_ct(profile: dict[str, float]) -> bool:
    return profile["negative_fraction"] >= CT_NEGATIVE_FRACTION and profile["p01"] <= CT_AIR_PERCENTILE


def modality_of(array: np.ndarray) -> str:
    """'CT' or 'MR' as far as intensities tell (used to pick a default model for an input)."""
    return "CT" if looks_like_ct(intensity_profile(array)) else "MR"


def check_input(array: np.ndarray, modality: str, intensity: Optional[dict[str, Any]] = None,
                profile: Optional[dict[str, float]] = None) -> list[str]:
    """Warnings (empty when the scan fits the model): `modality` and `intensity` come from the card."""
    profile = profile or intensity_profile(array)
    warnings = []
    modality = str(modality or "").upper()
    ct_like = looks_like_ct(profile)
    if modality == "MR" and ct_like:
        warnings.append(
            f"This looks like a CT scan ({profile['negative_fraction']:.0%} of voxels below 0, 1st percentile "
            f"{profile['p01']:.0f}, as in Hounsfield units), but the model was trained on MR: do not trust "
            "the result. Pick a CT model.")
    elif modality == "CT" and not ct_like and profile["negative_fraction"] < 0.001:
        warnings.append(
            f"This does not look like a CT scan in Hounsfield units (no air: 1st percentile "
            f"{profile['p01']:.0f}, {profile['negative_fraction']:.1%} of voxels below 0), but the model was "
            "trained on CT: do not trust the result. Pick an MR model, or convert the scan to HU.")
    if intensity and not warnings:
        outside = []
        for key, label in (("z01", "1st"), ("z50", "median"), ("z99", "99th")):
            span = intensity.get(key)
            if not (isinstance(span, (list, tuple)) and len(span) == 2):
                continue
            low, high = float(span[0]), float(span[1])
            if profile[key] < low - HISTOGRAM_MARGIN or profile[key] > high + HISTOGRAM_MARGIN:
                outside.append(f"{label} percentile at {profile[key]:+.2f} SD (training {low:+.2f}..{high:+.2f})")
        if outside:
            warnings.append("The intensity histogram is far outside what the model saw in training ("
                            + "; ".join(outside) + "): check the result carefully, or use a model trained on "
                            "scans like this one.")
    return warnings
