"""Inference for imported nnU-Net v2 models, the way nnUNetPredictor does it, on the project's engine.

The pipeline hands over here when a checkpoint carries an nnU-Net recipe (metadata.preprocessing).
Differences from the project's own recipe that matter for agreement with nnU-Net: no reorientation
(the file's array order, transposed by the plans), crop to the non-zero region, normalisation before
resampling, nnU-Net's window grid and Gaussian, folds averaged as logits (not probabilities) and the
logits resampled back before the softmax. The network runs in float32 as nnU-Net's does on CPU, and
the blending, the fold average and the resampled logits are rounded to float16 where nnU-Net rounds
them: where every window covering a voxel has a near-zero Gaussian weight (volume corners), nnU-Net's
float16 sums are coarse, and matching it there needs the same rounding.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, Progress, ProgressCallback
from .nnunet_preprocessing import export, preprocess


def _labelled(progress: Optional[ProgressCallback], what: str) -> Optional[ProgressCallback]:
    if progress is None or not what:
        return progress

    def report(update: Progress) -> None:
        progress(replace(update, stage=f"{update.stage} ({what})"))

    return report


def _logits(network, data: np.ndarray, patch_size: Sequence[int], options_kwargs: dict, progress, cancel):
    """(blended logits (C, *spatial) of one member, float16 as nnUNetPredictor's; the engine's stats).
    2D networks run slice by slice along axis 0."""
    import torch

    from ..inference.sliding_window import InferenceOptions, sliding_window_inference

    options = InferenceOptions(patch_size=tuple(int(p) for p in patch_size), output="logits", grid="nnunet",
                               pad_value=0.0,  # nnU-Net pads its normalised input with zeros
                               accumulate_dtype="float16", **options_kwargs)
    if len(patch_size) == data.ndim - 1:
        result = sliding_window_inference(network, data, options, progress=progress, cancel=cancel)
        return result.logits.half(), result.stats
    slices, started, stats = [], time.perf_counter(), {}
    for index in range(data.shape[1]):
        if cancel is not None:
            cancel.raise_if_cancelled()
        result = sliding_window_inference(network, data[:, index], options, cancel=cancel)
        slices.append(result.logits.half())
        stats = result.stats
        if progress is not None:
            elapsed = time.perf_counter() - started
            remaining = elapsed / (index + 1) * (data.shape[1] - index - 1)
            progress(Progress(index + 1, data.shape[1], elapsed, remaining, "slices"))
    return torch.stack(slices, dim=1), stats


def predict(image, members: list, *, device, precision: str = "fp32", overlap: float = 0.5, mode: str = "sliding",
            mirror: bool = False, memory_budget_mb: Optional[float] = None, backend: str = "torch",
            threads: Optional[int] = None, need_probabilities: bool = False,
            progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None):
    """(labels in the image's array order, probabilities (C, ...) or None, stats) for a SimpleITK image."""
    import SimpleITK as sitk

    from ..runtime.int8 import model_runtime  # which backend (torch / OpenVINO) and precision run each fold

    recipe = members[0].metadata.preprocessing
    if any(member.metadata.preprocessing != recipe for member in members[1:]):
        raise InputError("The folds of this nnU-Net model carry different recipes (plans).",
                         "Re-import the results folder; all folds must come from one plans.json.")
    timings = {}
    step = time.perf_counter()
    array = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    spacing_zyx = list(reversed(image.GetSpacing()))
    data, properties = preprocess(array, spacing_zyx, recipe)
    del array
    timings["preprocess_s"] = time.perf_counter() - step
    if cancel is not None:
        cancel.raise_if_cancelled()

    step = time.perf_counter()
    mirror_axes = tuple(recipe["mirror_axes"]) if mirror else ()
    options_kwargs = dict(overlap=float(overlap), mode=mode, device=device, precision=precision,
                          mirror_axes=mirror_axes, memory_budget_mb=memory_budget_mb)
    logits, engine_stats = None, {}
    for index, member in enumerate(members):
        what = f"fold {index + 1}/{len(members)}" if len(members) > 1 else ""
        runtime, member_precision = model_runtime(member, backend, threads, precision, device)
        member_logits, engine_stats = _logits(member.network, data, member.metadata.patch_size,
                                dict(options_kwargs, precision=member_precision, runtime=runtime),
                                _labelled(progress, what), cancel)
        logits = member_logits if logits is None else logits.add_(member_logits)
    if len(members) > 1:
        logits /= len(members)  # nnUNetPredictor averages the folds' logits (in float16)
    timings["inference_s"] = time.perf_counter() - step
    if cancel is not None:
        cancel.raise_if_cancelled()

    step = time.perf_counter()
    labels, probabilities = export(logits.numpy(), properties, recipe, need_probabilities)
    timings["postprocess_s"] = time.perf_counter() - step
    # which runtime ran the network, and any fallback taken (the CLI prints both)
    stats = {key: engine_stats[key] for key in ("backend", "precision", "fallbacks", "windows", "patches")
             if key in engine_stats}
    stats.update(timings, sampler="sliding_window" if mode == "sliding" else mode, recipe="nnunet",
                 configuration=recipe.get("configuration"), mirror_axes=list(mirror_axes),
                 network_grid_size=list(properties.network_shape), cropped_bbox=properties.bbox,
                 ensemble_members=len(members), input_size=list(image.GetSize()),
                 input_spacing=list(image.GetSpacing()), device=str(device))
    return labels, probabilities, stats
