"""Whole-volume inference with a top-k model: one coarse pass, then only k full-resolution patches.

Returns the same `InferenceResult` as the sliding-window engine, so callers need not care which
sampler a checkpoint uses. Unlike the paper's code, selection here is plain top-k without Gumbel
noise, so two runs on the same input give identical output.

Both stages run through the runtime layer (`UNetSegmentLib.runtime`): the global network at the
coarse size and the backbone at the patch size each get a runner (PyTorch or OpenVINO); the
scorer, the selection and the small refiner stay in PyTorch.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

from ..errors import DeviceError, InputError
# the sliding-window engine owns the result type and the channel argmax
from ..inference.sliding_window import InferenceResult, channel_argmax  # noqa: F401 - re-exported
from ..progress import CancelToken, ProgressCallback, ProgressTracker
from ..runtime import RuntimeOptions, prepare_runner, torch_threads
from .model import TopKSegmenter, pad_to_patch

def _resolve_device(device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"'{device}' is not a device name.", "Use 'cpu', 'cuda' or 'cuda:0'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA GPU is available to PyTorch.",
                          "Use device='cpu', or install a CUDA build of PyTorch on a GPU machine.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("Apple MPS was requested but is not available.", "Use device='cpu'.")
    return resolved


def _as_image_tensor(image, model: TopKSegmenter) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if not np.issubdtype(image.dtype, np.number):
            raise InputError(f"image has non-numeric dtype {image.dtype}.", "Pass a numeric array.")
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().to(torch.float32)
    else:
        raise InputError(f"image must be a numpy array or torch tensor, got {type(image).__name__}.",
                         "Convert the volume to a (channels, *spatial) array.")
    expected = model.spatial_dims + 1
    if tensor.dim() != expected:
        raise InputError(f"image has shape {tuple(tensor.shape)}; a {model.spatial_dims}D model needs "
                         f"(channels, {', '.join('zyx'[-model.spatial_dims:])}).",
                         "Add the channel axis, e.g. image[None].")
    if tensor.shape[0] != model.in_channels:
        raise InputError(f"image has {tensor.shape[0]} channels; the model expects {model.in_channels}.",
                         "Pass the modalities the model was trained with, channel first.")
    if any(size < 1 for size in tensor.shape[1:]):
        raise InputError(f"image has an empty axis: {tuple(tensor.shape)}.", "Pass a non-empty volume.")
    if not bool(torch.isfinite(tensor).all()):
        raise InputError("image contains NaN or infinite values.", "Replace them (e.g. with 0) before inference.")
    return tensor


class _RunnerModule(torch.nn.Module):
    """Stands in for a sub-network during one inference call: forwards batches to a runtime runner."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.runner(batch)


def _swap_in_runners(model: TopKSegmenter, target: torch.device, precision: str, runtime: RuntimeOptions,
                     tracker: ProgressTracker, k: int) -> tuple[dict, list, dict]:
    """Replace the global network and the backbone by runners; returns (originals, notes, stats)."""
    settings = model.settings
    shapes = {"global_network": (model.in_channels,) + tuple(int(s) for s in settings.coarse_size),
              "backbone": (model.in_channels,) + tuple(int(s) for s in settings.patch_size)}
    originals, notes, stats = {}, [], {}
    for name, shape in shapes.items():
        network = getattr(model, name)
        options, stage_precision = runtime, precision
        if name == "global_network":  # an INT8 calibration is the backbone's (patch-sized inputs)
            options = RuntimeOptions(runtime.backend, runtime.threads, runtime.cache_dir, runtime.cache_max_mb)
            stage_precision = "fp32" if precision == "int8" else precision
        calls = 1 if name == "global_network" else k
        runner = prepare_runner(network, shape, target, None, "fp32", stage_precision, options,
                                work_voxels=calls * math.prod(shape[1:]))
        notes.extend(note for note in runner.notes if note not in notes)
        stats[f"{name}_backend"] = runner.backend
        stats[f"{name}_precision"] = runner.precision
        if runner.backend == "openvino":
            stats[f"{name}_convert_s"] = round(runner.convert_s, 3)
        originals[name] = network
        setattr(model, name, _RunnerModule(runner).eval())
    tracker.check_cancel()
    return originals, notes, stats


def topk_inference(model: TopKSegmenter, image, k: Optional[int] = None,
                   progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                   device="cpu", return_probabilities: bool = False, return_uncertainty: bool = False,
                   use_coarse: bool = True, patch_batch_size: int = 2, precision: str = "fp32",
                   runtime: Optional[RuntimeOptions] = None) -> InferenceResult:
    """Segment a normalised (C, *spatial) volume evaluating only k patches (default: the model's k).

    k above the number of candidate windows is clamped to all of them (stats["k"] says what ran);
    k < 1 raises InputError. use_coarse=False ignores the global branch (k = all then equals the
    sliding window); it exists for testing and comparison. Patches run in batches of about
    `patch_batch_size` (default 2: on CPU a batch of one takes PyTorch's slow conv3d path).
    `runtime` picks the backend of both stages (default PyTorch); `precision` "int8" runs the backbone
    from the INT8 model in `runtime.int8_model` (the global network stays fp32).
    """
    if not isinstance(model, TopKSegmenter):
        raise InputError(f"topk_inference needs a top-k model, got {type(model).__name__}.",
                         "Use the sliding-window engine for models trained with --sampler sliding_window.")
    if isinstance(patch_batch_size, bool) or not isinstance(patch_batch_size, int) or patch_batch_size < 1:
        raise InputError(f"patch_batch_size must be a positive integer, got {patch_batch_size!r}.",
                         "Use 1 (lowest memory) or a few patches per batch.")
    started = time.perf_counter()
    tensor = _as_image_tensor(image, model)
    target = _resolve_device(device)
    spatial = tuple(tensor.shape[1:])
    padded, crop = pad_to_patch(tensor[None], model.settings.patch_size)
    tracker = ProgressTracker(total=0, callback=progress, cancel=cancel, stage="inference")
    tracker.check_cancel()
    was_training = model.training
    original = next(model.parameters()).device
    runtime = runtime or RuntimeOptions()
    model.eval().to(target)
    originals = {}
    try:
        with torch.no_grad(), torch_threads(runtime.threads):
            originals, notes, runtime_stats = _swap_in_runners(model, target, precision, runtime, tracker,
                                                               min(int(k or model.settings.k), 10 ** 6))
            logits, stats = model.predict(padded.to(target), k=k, use_coarse=use_coarse,
                                          patch_batch_size=patch_batch_size, tracker=tracker)
    finally:
        for name, network in originals.items():
            setattr(model, name, network)
        model.train(was_training)
        model.to(original)
    stats.update(runtime_stats, fallbacks=notes)
    logits = logits[(slice(None), *crop)].float().cpu()
    labels = channel_argmax(logits).numpy()
    probabilities = uncertainty = None
    if return_probabilities or return_uncertainty:
        probs = torch.softmax(logits, dim=0)
        if return_probabilities:
            probabilities = probs.numpy()
        if return_uncertainty:
            # normalised entropy: 0 = certain, 1 = uniform over all labels
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=0)
            uncertainty = (entropy / math.log(model.out_channels)).numpy()
    stats.update(seconds=time.perf_counter() - started, device=str(target), image_shape=list(spatial),
                 sampler="topk")
    return InferenceResult(labels=labels, logits=logits.numpy(), probabilities=probabilities,
                           uncertainty=uncertainty, stats=stats)
