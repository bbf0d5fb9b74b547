"""Image in, labelmap out: the one function every front end (CLI, Slicer panel, tests) calls.

validate -> canonical orientation -> resample to the model's spacing -> normalise -> inference ->
class probabilities back onto the input grid -> argmax. The labelmap therefore lies exactly on the
input's grid (size, origin, spacing, direction), whatever orientation or spacing the input had.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from . import preprocessing
from .applicability import check_input
from .checkpoint import LoadedModel, resolve_device
from .ensemble import LoadedEnsemble, load_model
from .errors import InputError
from .memory import check_segmentation as check_segmentation_memory
from .metadata import LabelInfo
from .postprocessing import normalised_entropy, scores_to_grid  # noqa: F401 - normalised_entropy re-exported
from .progress import CancelToken, Progress, ProgressCallback

SAMPLERS = ("auto", "sliding_window", "whole", "topk")


@dataclass
class SegmentationResult:
    labelmap: sitk.Image  # uint8, on the input grid
    labels: list[LabelInfo]
    probabilities: Optional[sitk.Image] = None  # float32 vector image (one component per label), input grid
    uncertainty: Optional[sitk.Image] = None  # float32 entropy / log(labels): 0 certain .. 1 uniform, input grid
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # e.g. a CT given to an MR model: shown before the result


def _choose_sampler(sampler: str, model: LoadedModel) -> str:
    if sampler not in SAMPLERS:
        raise InputError(f"Unknown sampler '{sampler}'.", f"Choose one of: {', '.join(SAMPLERS)}.")
    is_topk = model.metadata.sampler == "topk"
    if sampler == "auto":
        return "topk" if is_topk else "sliding_window"
    if sampler == "topk" and not is_topk:
        raise InputError(f"Sampler 'topk' needs a top-k model; {model.path.name} was trained for the sliding window.",
                         "Use --sampler auto or sliding_window, or a model trained with the top-k sampler.")
    if sampler == "whole" and is_topk:
        raise InputError(f"{model.path.name} is a top-k model; it cannot run whole-volume.",
                         "Use --sampler topk (default) or sliding_window (all windows).")
    return sampler


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    exponential = np.exp(shifted)
    return exponential / exponential.sum(axis=0, keepdims=True)


def _as_numpy(value) -> Optional[np.ndarray]:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def _infer(model: LoadedModel, array: np.ndarray, sampler: str, overlap: float, k: Optional[int], device,
           precision: str, mirror_axes: Sequence[int], memory_budget_mb: Optional[float], progress, cancel,
           backend: str = "torch", threads: Optional[int] = None):
    """Class probabilities (C, *spatial) and the engine's stats."""
    import torch

    from .runtime.int8 import model_runtime  # the engines run it; here only which backend/precision/INT8 model

    runtime, precision = model_runtime(model, backend, threads, precision, device)

    image = torch.from_numpy(np.ascontiguousarray(array[None], dtype=np.float32))
    if model.metadata.sampler == "topk":  # its network is a TopKSegmenter, whatever the sampler
        from .topk.inference import topk_inference

        topk_k = k if sampler == "topk" else 10 ** 9  # sliding window on a top-k model: every window
        result = topk_inference(model.network, image, topk_k, progress=progress, cancel=cancel, device=device,
                                return_probabilities=True, precision=precision, runtime=runtime)
    else:
        if k is not None:
            raise InputError("--k only applies to the top-k sampler.", "Drop --k or use a top-k model.")
        from .inference.sliding_window import InferenceOptions, sliding_window_inference

        options = InferenceOptions(
            patch_size=tuple(int(p) for p in model.metadata.patch_size), overlap=overlap,
            mode="whole" if sampler == "whole" else "sliding", device=device, precision=precision,
            mirror_axes=tuple(mirror_axes), memory_budget_mb=memory_budget_mb, output="probabilities",
            return_probabilities=True, runtime=runtime)
        result = sliding_window_inference(model.network, image, options, progress=progress, cancel=cancel)
    probabilities = _as_numpy(result.probabilities)
    if probabilities is None:
        logits = _as_numpy(result.logits)
        if logits is None:
            raise InputError("The inference engine returned neither probabilities nor logits.",
                             "Update UNetSegment; this is a bug.")
        probabilities = _softmax(logits.astype(np.float32))
    if probabilities.ndim == array.ndim + 2:  # a leading batch axis
        probabilities = probabilities[0]
    return probabilities.astype(np.float32, copy=False), dict(result.stats or {})


def _member_progress(progress: ProgressCallback | None, index: int, count: int):
    """Reports of fold `index` of `count`, labelled so a bar shows which fold is running."""
    if progress is None or count == 1:
        return progress

    def report(update: Progress) -> None:
        progress(replace(update, stage=f"{update.stage} (fold {index + 1}/{count})"))

    return report


def _infer_slices(model: LoadedModel, array: np.ndarray, infer_kwargs: dict):
    """2D models: segment each axial slice (array axis 0) on its own and stack."""
    probabilities, stats = [], {}
    for index in range(array.shape[0]):
        slice_probabilities, stats = _infer(model, array[index], **infer_kwargs)
        probabilities.append(slice_probabilities)
    return np.stack(probabilities, axis=1), dict(stats, slices=array.shape[0])




def _on_grid(array: np.ndarray, grid: sitk.Image, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(grid)
    return image


def _back_to_input_order(image: sitk.Image, original: sitk.Image) -> sitk.Image:
    """Undo the canonical reorientation: same physical voxels, the input's axis order (exact, nearest)."""
    resampled = sitk.Resample(image, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                              image.GetPixelID())
    resampled.CopyInformation(original)  # identical up to float rounding; make it bit-exact
    return resampled


def _check_cancel(cancel: CancelToken | None) -> None:
    """Between every stage (issue 16): a cancel is honoured within one stage step, not at the end."""
    if cancel is not None:
        cancel.raise_if_cancelled()


def segment_image(image: sitk.Image, model: Union[LoadedModel, LoadedEnsemble, str, Path], *, sampler: str = "auto",
                  overlap: float = 0.5, k: Optional[int] = None, device="auto", precision: str = "auto",
                  mirror_axes: Sequence[int] = (), memory_budget_mb: Optional[float] = None,
                  backend: str = "auto", threads: Optional[int] = None,
                  return_probabilities: bool = False, return_uncertainty: bool = False,
                  progress: ProgressCallback | None = None, cancel: CancelToken | None = None
                  ) -> SegmentationResult:
    """Segment one volume with a checkpoint or a fold ensemble; the labelmap lies exactly on the input grid."""
    started = time.perf_counter()
    preprocessing.validate_image(image)
    if not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"Overlap must be in [0, 1), got {overlap}.", "Use e.g. 0.5 (default) or 0.25 for speed.")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"k must be a positive integer, got {k!r}.", "Use e.g. --k 8.")
    from .runtime import check_backend, check_threads  # issue 13: auto | torch | openvino; threads >= 1

    check_backend(backend)
    check_threads(threads)
    target_device = resolve_device(device)
    if not isinstance(model, (LoadedModel, LoadedEnsemble)):
        model = load_model(model, device=target_device)
    members = list(model.members) if isinstance(model, LoadedEnsemble) else [model]
    metadata = model.metadata
    chosen = _choose_sampler(sampler, members[0])
    if metadata.in_channels != 1:
        raise InputError(f"{model.path.name} expects {metadata.in_channels} image channels; one volume was given.",
                         "Use a single-channel model.")
    if cancel is not None:
        cancel.raise_if_cancelled()
    if metadata.preprocessing is not None:  # issue 14: an imported model replays its own recipe (nnU-Net v2)
        from .interop.nnunet_inference import predict

        labels, scores, stats = predict(
            image, members, device=target_device, precision=precision, overlap=float(overlap),
            mode="whole" if chosen == "whole" else "sliding", mirror=bool(mirror_axes),
            memory_budget_mb=memory_budget_mb, backend=backend, threads=threads,
            need_probabilities=return_probabilities or return_uncertainty, progress=progress, cancel=cancel)
        return SegmentationResult(
            labelmap=_on_grid(labels, image), labels=list(metadata.labels),
            probabilities=_on_grid(np.moveaxis(scores, 0, -1), image, True) if return_probabilities else None,
            uncertainty=_on_grid(normalised_entropy(scores), image) if return_uncertainty else None,
            seconds=time.perf_counter() - started, stats=dict(stats, model=str(model.path)))

    timings = {}
    step = time.perf_counter()
    canonical = preprocessing.reorient_to_canonical(sitk.Cast(image, sitk.sitkFloat32))
    check_segmentation_memory(canonical.GetSize(), canonical.GetSpacing(), metadata.target_spacing,  # issue 16
                              metadata.out_channels, int(return_probabilities) + int(return_uncertainty))
    warnings = check_input(sitk.GetArrayViewFromImage(canonical), metadata.modality,
                           metadata.training.get("intensity") if isinstance(metadata.training, dict) else None)
    _check_cancel(cancel)
    resampled = preprocessing.resample_image(canonical, metadata.target_spacing)
    _check_cancel(cancel)
    raw = sitk.GetArrayFromImage(resampled)
    timings["preprocess_s"] = time.perf_counter() - step
    if cancel is not None:
        cancel.raise_if_cancelled()

    step = time.perf_counter()
    probabilities, engine_stats, normalized = None, {}, {}
    for index, member in enumerate(members):
        # folds agree on spacing and labels (checked at load); CT statistics may differ per fold
        key = repr(member.metadata.normalization)
        if key not in normalized:
            normalized = {key: preprocessing.normalize(raw, member.metadata.normalization)}
        infer_kwargs = dict(sampler=chosen, overlap=float(overlap), k=k, device=target_device,
                            precision=precision, mirror_axes=mirror_axes, memory_budget_mb=memory_budget_mb,
                            backend=backend, threads=threads,
                            progress=_member_progress(progress, index, len(members)), cancel=cancel)
        if metadata.spatial_dims == 2:
            member_probabilities, engine_stats = _infer_slices(member, normalized[key], infer_kwargs)
        else:
            member_probabilities, engine_stats = _infer(member, normalized[key], **infer_kwargs)
        if probabilities is None:
            probabilities = member_probabilities
        else:
            probabilities += member_probabilities
        del member_probabilities
    if len(members) > 1:
        probabilities /= len(members)  # nnU-Net: the mean of the folds' softmax
        engine_stats = dict(engine_stats, ensemble_members=len(members))
    del normalized, raw
    timings["inference_s"] = time.perf_counter() - step
    used_patch = engine_stats.get("patch_size")
    if used_patch is not None and tuple(used_patch) != tuple(int(p) for p in metadata.patch_size):
        # the engine's last resort when not even a batch of the trained windows fits memory: less context
        # per window than the network learnt with (phantom CT sample at half the patch: Dice 0.93 -> 0.35)
        warnings.append(f"The network ran on {tuple(used_patch)} windows instead of the {tuple(metadata.patch_size)} "
                        "it was trained on, to fit the memory budget: the segmentation can be much worse. Give it "
                        "more memory (a larger --memory-budget-mb, a GPU with more free memory) and check it.")
    if cancel is not None:
        cancel.raise_if_cancelled()

    step = time.perf_counter()
    # issue 13: slab by slab onto the input grid (no full-resolution float copy per class)
    labels_array, vector, entropy = scores_to_grid(probabilities, resampled, canonical, cancel=cancel,
                                                   probabilities=return_probabilities, uncertainty=return_uncertainty)
    del probabilities
    _check_cancel(cancel)
    labelmap = _back_to_input_order(_on_grid(labels_array, canonical), image)
    del labels_array
    probability_image = uncertainty_image = None
    if return_uncertainty:
        _check_cancel(cancel)
        uncertainty_image = _back_to_input_order(_on_grid(entropy, canonical), image)
    del entropy
    if return_probabilities:
        _check_cancel(cancel)
        probability_image = _back_to_input_order(_on_grid(vector, canonical, is_vector=True), image)
    del vector
    _check_cancel(cancel)
    timings["postprocess_s"] = time.perf_counter() - step

    seconds = time.perf_counter() - started
    stats = dict(engine_stats)
    stats.update(timings, sampler=chosen, device=str(target_device), input_size=list(image.GetSize()),
                 input_spacing=list(image.GetSpacing()), network_grid_size=list(resampled.GetSize()),
                 target_spacing=list(metadata.target_spacing), model=str(model.path))
    if threads:
        stats["threads"] = int(threads)
    stats["warnings"] = list(warnings)
    return SegmentationResult(labelmap=labelmap, labels=list(metadata.labels), probabilities=probability_image,
                              uncertainty=uncertainty_image, seconds=seconds, stats=stats, warnings=warnings)


def segment_file(input_path, model, **options) -> tuple[sitk.Image, SegmentationResult]:
    """Read an image file (or DICOM folder) and segment it: (input image, result)."""
    from .io import read_image

    image = read_image(input_path)
    return image, segment_image(image, model, **options)
