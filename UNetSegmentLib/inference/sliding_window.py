"""Sliding-window inference with Gaussian blending, mirroring TTA and a whole-volume shortcut.

Same windows, weights and normalisation as MONAI's `sliding_window_inference` (so results agree to
float rounding), but faster on CPU: patches always go through the network at least two at a time
(a batch of one sends 3D convolutions to PyTorch's slow `slow_conv3d_forward` path), the
importance map and the weight sum are computed once per volume, and each window's prediction is
blended into preallocated buffers in place. When the caller only needs labels, the argmax is taken
slab by slab so no full-resolution float copy per class is made beyond the accumulation buffer.

How the network itself runs (PyTorch or OpenVINO, fp32 or INT8, threads) is the runtime layer's
business (`UNetSegmentLib.runtime`): the engine asks it for a runner per plan and feeds it batches.

Whole-volume mode runs the network once on the entire (padded) volume. It is chosen automatically
only when the plan fits the memory budget and the network has no normalisation that depends on
the input's extent (InstanceNorm, GroupNorm, LayerNorm): for those, a whole volume gives different
statistics than a window and the result would change.
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, OutOfMemoryError
from ..progress import CancelToken, Progress, ProgressCallback, ProgressTracker
from ..runtime import RuntimeOptions, prepare_runner, torch_threads
from .devices import available_memory_bytes, network_device, resolve_device, resolve_precision
from .gaussian import BLEND_MODES, GRIDS, importance_map, window_starts

MODES = ("sliding", "whole", "auto")
OUTPUTS = ("labels", "logits", "probabilities")
ACCUMULATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Modules whose output depends on statistics over the whole input extent.
EXTENT_DEPENDENT_MODULES = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.Linear,
                            nn.MultiheadAttention, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                            nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
CPU_MIN_BATCH = 2
CPU_BATCH_VOXELS = 1 << 22  # automatic CPU batch: four 96^3 patches (measured faster than two), more if small
CPU_MAX_BATCH = 16
SLAB_VOXELS = 1 << 22  # voxels per slab when finishing (argmax/softmax) to bound temporaries
AUTO_BUDGET_FRACTION = 0.5  # share of free memory the automatic budget may plan for


@dataclass
class InferenceOptions:
    patch_size: Sequence[int]
    overlap: float = 0.5
    blend: str = "gaussian"            # or "constant"
    sigma_scale: float = 0.125         # sigma = patch / 8, as nnU-Net and MONAI's gaussian mode
    batch_size: Optional[int] = None   # None: chosen automatically (>= 2 on CPU)
    mirror_axes: tuple = ()            # spatial axes for nnU-Net style mirroring TTA
    precision: str = "fp32"            # fp32 | bf16 | fp16 | auto | int8 (OpenVINO, from a carried calibration)
    accumulate_dtype: str = "float32"  # float32 | float16 | bfloat16
    mode: str = "sliding"              # sliding | whole | auto
    device: str = "auto"               # auto | cpu | cuda | mps (or a torch.device)
    memory_budget_mb: Optional[float] = None
    output: str = "labels"             # labels | logits | probabilities (what must be kept)
    return_probabilities: bool = False
    return_uncertainty: bool = False   # per-voxel entropy (nats) of the softmax
    runtime: Optional[RuntimeOptions] = None  # backend (torch by default here), threads, model cache, INT8 model
    grid: str = "monai"                # window starts + Gaussian: "monai", or "nnunet" (as nnUNetPredictor)
    # what fills a window beyond the volume: "minimum" (the volume's own minimum, as UNetSegment's
    # training sampler pads small cases, so the network sees at inference what it saw in training) or
    # a number (0.0 as MONAI and nnU-Net pad their normalised inputs)
    pad_value: object = "minimum"


@dataclass
class InferenceResult:
    labels: Optional[np.ndarray]           # (*spatial) uint8, or uint16 above 255 classes
    logits: Optional[torch.Tensor] = None  # (C, *spatial) float32 when output == "logits"
    probabilities: Optional[np.ndarray] = None  # (C, *spatial) float32 softmax when asked
    uncertainty: Optional[np.ndarray] = None    # (*spatial) float32 entropy when asked
    stats: dict = field(default_factory=dict)


# --- public entry points -------------------------------------------------------------------------

def sliding_window_inference(network: nn.Module, image, options: InferenceOptions,
                             progress: ProgressCallback | None = None,
                             cancel: CancelToken | None = None) -> InferenceResult:
    """Segment one image shaped (C, *spatial) (a leading batch axis of 1 is accepted)."""
    started = time.perf_counter()
    _check_options(options)
    spatial_dims = _spatial_dims(network, options.patch_size)
    volume = _as_volume(image, spatial_dims)
    _check_network_fit(network, volume, options.patch_size)
    needs_logits = options.output == "logits"
    needs_probabilities = options.output == "probabilities" or options.return_probabilities
    outputs = _Outputs(volume.shape[1:], needs_probabilities, options.return_uncertainty)
    plans = _plans(network, volume, options, rolling=not needs_logits)
    accumulated, stats = _run_with_fallbacks(network, volume[None], options, plans, progress, cancel,
                                             sink=None if needs_logits else outputs)
    scores, weight_sum = accumulated[0], stats.pop("_weight_sum")
    result = _finish(scores, weight_sum, options, needs_logits, outputs)
    stats["seconds"] = time.perf_counter() - started
    result.stats = stats
    return result


def predict_logits(network: nn.Module, batch, patch_size: Sequence[int], overlap: float = 0.5,
                   blend: str = "gaussian", batch_size: int | None = None, sigma_scale: float = 0.125,
                   mirror_axes: Sequence[int] = (), precision: str = "fp32", accumulate_dtype: str = "float32",
                   mode: str = "sliding", device: str | torch.device | None = None,
                   memory_budget_mb: float | None = None, progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None, runtime: RuntimeOptions | None = None,
                   pad_value: object = "minimum") -> torch.Tensor:
    """Blended logits (N, out_C, *spatial) float32 for a batch (N, C, *spatial), on the batch's
    device unless `device` says otherwise; the low-level counterpart of MONAI's function."""
    if device is None:
        device = batch.device if isinstance(batch, torch.Tensor) else "cpu"
    options = InferenceOptions(patch_size=patch_size, overlap=overlap, blend=blend, sigma_scale=sigma_scale,
                               batch_size=batch_size, mirror_axes=tuple(mirror_axes), precision=precision,
                               accumulate_dtype=accumulate_dtype, mode=mode, device=device,
                               memory_budget_mb=memory_budget_mb, output="logits", runtime=runtime,
                               pad_value=pad_value)
    _check_options(options)
    spatial_dims = _spatial_dims(network, patch_size)
    if not isinstance(batch, (torch.Tensor, np.ndarray)) or batch.ndim != spatial_dims + 2:
        shape = tuple(getattr(batch, "shape", ()))
        raise InputError(f"batch has shape {shape}; expected (N, C, {', '.join('XYZ'[:spatial_dims])}).",
                         "Stack the images along a leading batch axis.")
    volumes = torch.stack([_as_volume(item, spatial_dims) for item in batch]) if len(batch) else None
    if volumes is None:
        raise InputError("batch is empty.", "Pass at least one image.")
    _check_network_fit(network, volumes[0], patch_size)
    plans = _plans(network, volumes[0], options)
    accumulated, stats = _run_with_fallbacks(network, volumes, options, plans, progress, cancel)
    weight_sum = stats.pop("_weight_sum")
    out_device = batch.device if isinstance(batch, torch.Tensor) else torch.device("cpu")
    return torch.stack([(scores.float() / weight_sum).to(out_device) for scores in accumulated])


def is_window_equivalent(network: nn.Module) -> bool:
    """True when running the network on a whole volume equals running it on any window of it up to
    boundary context: no module normalises or pools over the input's extent."""
    return not any(isinstance(module, EXTENT_DEPENDENT_MODULES) for module in network.modules())


# --- validation ----------------------------------------------------------------------------------

def _check_options(options: InferenceOptions) -> None:
    def choice(name, value, allowed, fix):
        if value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}.", fix)

    choice("blend", options.blend, BLEND_MODES, "Use 'gaussian' (default, as nnU-Net) or 'constant'.")
    choice("grid", options.grid, GRIDS, "Use 'monai' (default) or 'nnunet'.")
    choice("mode", options.mode, MODES, "Use 'sliding', 'whole' or 'auto'.")
    choice("output", options.output, OUTPUTS, "Use 'labels', 'logits' or 'probabilities'.")
    choice("accumulate_dtype", options.accumulate_dtype, tuple(ACCUMULATE_DTYPES),
           "Use 'float32' (exact) or 'float16'/'bfloat16' to halve the accumulation memory.")
    if options.pad_value != "minimum" and (isinstance(options.pad_value, bool) or not isinstance(
            options.pad_value, (int, float)) or not math.isfinite(options.pad_value)):
        raise InputError(f"pad_value must be 'minimum' or a finite number, got {options.pad_value!r}.",
                         "Use 'minimum' (UNetSegment-trained models) or 0.0 (MONAI / nnU-Net models).")
    if not isinstance(options.overlap, (int, float)) or not 0 <= options.overlap < 1:
        raise InputError(f"overlap must be in [0, 1), got {options.overlap!r}.",
                         "Use 0.5 (nnU-Net default) or 0.25 for speed.")
    if not isinstance(options.sigma_scale, (int, float)) or options.sigma_scale <= 0:
        raise InputError(f"sigma_scale must be positive, got {options.sigma_scale!r}.", "Use 0.125 (patch / 8).")
    if options.batch_size is not None and (not isinstance(options.batch_size, int) or options.batch_size < 1):
        raise InputError(f"batch_size must be a positive integer or None, got {options.batch_size!r}.",
                         "Leave it None to choose automatically.")
    if options.memory_budget_mb is not None and not options.memory_budget_mb > 0:
        raise InputError(f"memory_budget_mb must be positive, got {options.memory_budget_mb!r}.",
                         "Leave it None to plan for half of the free memory.")
    try:
        patch = tuple(options.patch_size)
    except TypeError:
        patch = ()
    if not patch or not all(isinstance(p, (int, np.integer)) and p > 0 for p in patch):
        raise InputError(f"patch_size must be a sequence of positive integers, got {patch!r}.",
                         "Pass e.g. (96, 96, 96) for a 3D model or (256, 256) for a 2D model.")


def _spatial_dims(network: nn.Module, patch_size: Sequence[int]) -> int:
    dims = getattr(network, "spatial_dims", None)
    if dims is not None and len(patch_size) != dims:
        raise InputError(f"patch_size {tuple(patch_size)} has {len(patch_size)} axes but the network is {dims}D.",
                         f"Pass a patch size with {dims} values.")
    return len(patch_size)


def _as_volume(image, spatial_dims: int) -> torch.Tensor:
    """The image as a float32 tensor (C, *spatial), validated; no copy when it already is one."""
    if isinstance(image, np.ndarray):
        if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
            raise InputError(f"image has non-numeric dtype {image.dtype}.", "Pass a numeric array.")
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.dtype != torch.float32:
            tensor = tensor.to(torch.float32)
    else:
        raise InputError(f"image must be a numpy array or torch tensor, got {type(image).__name__}.",
                         "Convert the volume to a (channels, *spatial) array.")
    if tensor.dim() == spatial_dims + 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != spatial_dims + 1:
        raise InputError(f"image has shape {tuple(tensor.shape)}; a {spatial_dims}D model needs "
                         f"(channels, {', '.join('XYZ'[:spatial_dims])}).",
                         "Add a leading channel axis, e.g. image[None] for a single-channel volume.")
    if tensor.numel() == 0:
        raise InputError(f"image is empty (shape {tuple(tensor.shape)}).", "Pass a volume with at least one voxel.")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(f"image contains {bad} NaN or infinite voxel(s).",
                         "Replace them (e.g. with 0 or the background intensity) before inference.")
    return tensor


def _check_network_fit(network: nn.Module, volume: torch.Tensor, patch_size: Sequence[int]) -> None:
    in_channels = getattr(network, "in_channels", None)
    if in_channels is not None and volume.shape[0] != in_channels:
        raise InputError(f"image has {volume.shape[0]} channel(s) but the network expects {in_channels}.",
                         f"Pass an image with {in_channels} channel(s) (channels first), or the matching model.")
    multiple = int(getattr(network, "required_multiple", 1) or 1)
    multiples = getattr(network, "required_multiples", None)  # per axis (nnU-Net plans with anisotropic strides)
    if multiples is not None and len(multiples) == len(patch_size) and all(p % m == 0 for p, m in zip(patch_size, multiples)):
        return
    bad = [p for p in patch_size if p % multiple]
    if bad:
        nearest = tuple(max(multiple, int(p / multiple + 0.5) * multiple) for p in patch_size)  # ties round up
        raise InputError(f"patch_size {tuple(patch_size)} is not a multiple of {multiple}, which the network "
                         f"needs (it downsamples {int(math.log2(multiple)) if multiple > 1 else 0} times).",
                         f"Use patch_size {nearest}.")


# --- planning ------------------------------------------------------------------------------------

@dataclass
class _Plan:
    mode: str
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    precision: str
    batch_size: int
    notes: list
    reason: str = ""
    patch: tuple = ()  # empty: the requested patch size; else a smaller one taken to fit memory


_PROBE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _activation_bytes_per_voxel(network: nn.Module, in_channels: int, spatial_dims: int, multiple: int,
                                element_size: int) -> float:
    """Bytes of layer outputs per input voxel, measured once per network on a tiny probe input
    (in eval mode, on the network's own device) and scaled to the run's element size.

    The sum of every leaf module's output is an upper bound of what a forward pass holds at once,
    so plans made with it err on the safe side.
    """
    key = (in_channels, spatial_dims)
    cache = _PROBE_CACHE.setdefault(network, {})
    if key not in cache:
        side = max(16, multiple)
        probe = torch.zeros((1, in_channels) + (side,) * spatial_dims, device=network_device(network) or "cpu")
        total = [0]

        def count(_module, _inputs, output):
            for item in output if isinstance(output, (list, tuple)) else [output]:
                if isinstance(item, torch.Tensor):
                    total[0] += item.numel()

        hooks = [module.register_forward_hook(count) for module in network.modules() if not list(module.children())]
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                network(probe)
        except Exception:  # noqa: BLE001 - a failed probe only means no estimate; the real run reports errors
            total[0] = 0
        finally:
            network.train(was_training)
            for hook in hooks:
                hook.remove()
        cache[key] = total[0] / side ** spatial_dims if total[0] else 256.0  # elements per voxel
    return cache[key] * element_size


def _whole_multiple(network: nn.Module, patch_size: Sequence[int]) -> int:
    """Size multiple for a whole-volume pass: the network's own, else the largest power of two
    dividing every patch axis (the patch is known to work with the network)."""
    multiple = getattr(network, "required_multiple", None)
    if multiple:
        return int(multiple)
    common = math.gcd(*[int(p) for p in patch_size]) if len(patch_size) > 1 else int(patch_size[0])
    return common & -common


def _plans(network: nn.Module, volume: torch.Tensor, options: InferenceOptions, rolling: bool = False) -> list[_Plan]:
    """Plans to try in order: the requested one first, then the fallbacks (smaller batch, CPU,
    and last smaller patches, which may change the result slightly)."""
    device = resolve_device(options.device, network)
    devices = [device] + ([torch.device("cpu")] if device.type != "cpu" else [])
    spatial = tuple(volume.shape[1:])
    patch = tuple(int(p) for p in options.patch_size)
    spatial_dims = len(patch)
    multiple = _whole_multiple(network, patch)
    whole_shape = tuple(math.ceil(s / multiple) * multiple for s in spatial)
    out_channels = int(getattr(network, "out_channels", 0) or 0) or 2
    accumulate_bytes = torch.empty((), dtype=ACCUMULATE_DTYPES[options.accumulate_dtype]).element_size()
    input_bytes = volume.numel() * 4
    plans: list[_Plan] = []
    smallest_need, smallest_budget = math.inf, math.inf  # for the error when nothing fits

    def sliding_bytes(window: tuple, batch: int, per_voxel: float) -> float:
        padded = tuple(max(s, p) for s, p in zip(spatial, window))
        band = window[0] if rolling else padded[0]  # a rolling band keeps only window[0] planes of scores
        buffers = (out_channels * accumulate_bytes * band / padded[0] + 4) * math.prod(padded) + input_bytes
        return buffers + per_voxel * math.prod(window) * batch * (2 if options.mirror_axes else 1)

    for device_index, candidate in enumerate(devices):
        autocast_dtype, precision_note = resolve_precision(options.precision, candidate)
        element_size = 2 if autocast_dtype is not None else 4
        precision_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
        notes = [precision_note] if precision_note else []
        if device_index:
            notes.append(f"fell back from {device} to cpu")
        if options.memory_budget_mb is not None:
            budget = options.memory_budget_mb * 2 ** 20
        else:
            free = available_memory_bytes(candidate)
            budget = free * AUTO_BUDGET_FRACTION if free else float("inf")
        with torch_threads(options.runtime.threads if options.runtime is not None else None):  # the probe too
            per_voxel = _activation_bytes_per_voxel(network, volume.shape[0], spatial_dims, multiple, element_size)
        whole_bytes = per_voxel * math.prod(whole_shape) + input_bytes + out_channels * 4 * math.prod(spatial)
        equivalent = is_window_equivalent(network)
        want_whole = options.mode == "whole" or (options.mode == "auto" and equivalent and whole_bytes <= budget)
        if options.mode != "auto":
            reason = f"{options.mode} asked"
        elif not equivalent:
            reason = "sliding: the network normalises over the input extent (e.g. InstanceNorm), so a whole volume " \
                     "would change the result"
        elif not want_whole:
            reason = (f"sliding: whole volume needs about {whole_bytes / 2 ** 20:.0f} MB, over the "
                      f"{budget / 2 ** 20:.0f} MB budget")
        else:
            reason = f"whole: about {whole_bytes / 2 ** 20:.0f} MB fits the {budget / 2 ** 20:.0f} MB budget"
        if want_whole:
            whole_notes = list(notes)
            if options.mode == "whole" and whole_bytes > budget:
                whole_notes.append(f"whole volume needs about {whole_bytes / 2 ** 20:.0f} MB, over the "
                                   f"{budget / 2 ** 20:.0f} MB budget; tried anyway as asked")
            plans.append(_Plan("whole", candidate, autocast_dtype, precision_name, 1, whole_notes, reason))
            notes = notes + ["whole volume did not fit; used sliding windows"]
        minimum = CPU_MIN_BATCH if candidate.type == "cpu" else 1
        if options.batch_size is not None:
            first = options.batch_size
        elif candidate.type == "cpu":
            first = min(CPU_MAX_BATCH, max(CPU_MIN_BATCH, CPU_BATCH_VOXELS // math.prod(patch)))
        else:
            first = 4
        batches = []
        batch = first
        while batch >= 1:
            batches.append(batch)
            batch //= 2
        if minimum == 2 and 1 in batches and len(batches) > 1:
            batches.remove(1)  # a batch of one is slower on CPU and saves little memory
        fitting = [b for b in batches if sliding_bytes(patch, b, per_voxel) <= budget]
        # equal batches (8 windows at most 5 a batch: 4 + 4, not 5 + 3): the same number of calls, and
        # each splits evenly over the runtime's parallel streams
        window_count = len(window_starts(tuple(max(s, p) for s, p in zip(spatial, patch)), patch, options.overlap,
                                         options.grid))

        def equal(batch: int) -> int:
            return math.ceil(window_count / math.ceil(window_count / batch)) if window_count else batch

        first = equal(first)
        fitting = list(dict.fromkeys(equal(b) for b in fitting))
        if not fitting:
            smallest_need = min(smallest_need, sliding_bytes(patch, batches[-1], per_voxel))
            smallest_budget = min(smallest_budget, budget)
        for batch in fitting:
            batch_notes = list(notes)
            if batch != first:
                batch_notes.append(f"batch size {first} -> {batch} to fit memory")
            plans.append(_Plan("sliding", candidate, autocast_dtype, precision_name, batch, batch_notes, reason))
    # Last resort, on the last device tried: smaller windows (same network, less context per window).
    if options.mode != "whole":
        batch = options.batch_size or minimum
        for window in _smaller_patches(patch, int(getattr(network, "required_multiple", 1) or 1), _fallback_patch_floor(network)):
            if sliding_bytes(window, batch, per_voxel) > budget:
                continue
            plans.append(_Plan("sliding", candidate, autocast_dtype, precision_name, batch,
                               notes + [f"patch size {patch} -> {window} to fit memory (less context per window; "
                                        "the result can be much worse than with the trained patch size)"],
                               reason, window))
    if not plans:
        need = smallest_need / 2 ** 20 if math.isfinite(smallest_need) else \
            (out_channels * accumulate_bytes + 4) * math.prod(spatial) / 2 ** 20
        raise OutOfMemoryError(
            f"Sliding-window inference needs at least {need:.3g} MB for its buffers plus one batch of patches, "
            f"more than the memory budget of {smallest_budget / 2 ** 20:.3g} MB allows.",
            "Raise memory_budget_mb, use a smaller patch size, accumulate in float16, or crop the volume.")
    return plans


def _fallback_patch_floor(network: nn.Module) -> int:
    """Smallest multiple a fallback patch may shrink to: normalising layers need more than one voxel at
    the coarsest level, so 2x the network's multiple unless it has none."""
    multiple = int(getattr(network, "required_multiple", 1) or 1)
    return 2 * multiple if multiple > 1 else 1


def _smaller_patches(patch: tuple, multiple: int, floor: int, steps: int = 2) -> list[tuple]:
    """Patch sizes halved per step, kept multiples of what the network needs and at least `floor`
    (unless the requested patch is already smaller); at most `steps`."""
    smaller, current = [], patch
    for _ in range(steps):
        halved = tuple(max(min(p, floor), (p // 2) // multiple * multiple) for p in current)
        if halved == current:
            break
        smaller.append(halved)
        current = halved
    return smaller


# --- execution -----------------------------------------------------------------------------------

def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message
                                                or "failed to allocate" in message)


def _run_with_fallbacks(network, volumes, options, plans, progress, cancel, sink=None):
    """Run the first plan that does not run out of memory; restore the network's device and mode."""
    original_device = None
    for parameter in network.parameters():
        original_device = parameter.device
        break
    was_training = network.training
    network.eval()
    failures = []
    try:
        for plan in plans:
            try:
                accumulated, stats = _execute(network, volumes, options, plan, progress, cancel, sink)
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
                if not _is_out_of_memory(error):
                    raise
                failures.append(f"{plan.mode} on {plan.device} with batch {plan.batch_size} ran out of memory")
                if plan.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            stats["fallbacks"] = failures + plan.notes + stats.pop("_runtime_notes", [])
            stats["mode_reason"] = plan.reason
            return accumulated, stats
    finally:
        network.train(was_training)
        if original_device is not None:
            network.to(original_device)
    raise OutOfMemoryError("Inference ran out of memory with every plan tried (" + "; ".join(failures) + ").",
                           "Close other programs, use a smaller patch size or batch size, accumulate in float16, "
                           "or run on a machine with more memory.")


def _predict(runner, batch, mirror_axes) -> torch.Tensor:
    """Logits for a batch, averaged over every mirrored copy (nnU-Net's TTA) when axes are given."""
    prediction = runner(batch).float()
    if not mirror_axes:
        return prediction
    combos = [c for size in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, size)]
    for combo in combos:
        dims = [axis + 2 for axis in combo]
        prediction += torch.flip(runner(torch.flip(batch, dims)), dims)
    return prediction.div_(len(combos) + 1)


def _runner(network, input_shape, options: InferenceOptions, plan: _Plan, progress, calls: int):
    """The runtime's runner for this plan; conversion (a cache miss) is reported as its own stage.
    `calls`: inputs of `input_shape` the run will push through the network (windows x mirrored copies)."""
    started = time.perf_counter()

    def on_convert(seconds):
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress(Progress(0 if seconds is None else 1, 1, elapsed, None, "converting to OpenVINO"))

    mirrored = 2 ** len(tuple(options.mirror_axes))
    return prepare_runner(network, input_shape, plan.device, plan.autocast_dtype, plan.precision,
                          options.precision, options.runtime, on_convert,
                          work_voxels=calls * mirrored * math.prod(input_shape[1:]))


def _runner_stats(runner) -> dict:
    stats = {"backend": runner.backend, "precision": runner.precision}
    if runner.backend == "openvino":
        stats.update(runtime_convert_s=round(runner.convert_s, 3), runtime_cache="hit" if runner.cache_hit else "miss")
    return stats


def _check_mirror_axes(mirror_axes, spatial_dims: int) -> tuple:
    axes = tuple(int(a) for a in mirror_axes)
    if len(set(axes)) != len(axes) or any(a < 0 or a >= spatial_dims for a in axes):
        raise InputError(f"mirror_axes {tuple(mirror_axes)} must be distinct spatial axes in 0..{spatial_dims - 1}.",
                         f"Use e.g. {tuple(range(spatial_dims))} for all axes, or () for no mirroring.")
    return axes


def _execute(network, volumes: torch.Tensor, options: InferenceOptions, plan: _Plan, progress, cancel, sink=None):
    """Accumulated (unnormalised) scores per image and the shared weight sum, on the plan's device."""
    patch = tuple(int(p) for p in (plan.patch or options.patch_size))
    spatial_dims = len(patch)
    mirror_axes = _check_mirror_axes(options.mirror_axes, spatial_dims)
    network.to(plan.device)
    accumulate_dtype = ACCUMULATE_DTYPES[options.accumulate_dtype]
    spatial = tuple(volumes.shape[2:])
    stats = {"mode": plan.mode, "device": str(plan.device), "precision": plan.precision,
             "batch_size": plan.batch_size, "accumulate_dtype": options.accumulate_dtype,
             "patch_size": patch, "overlap": options.overlap, "mirror_axes": mirror_axes}
    threads = options.runtime.threads if options.runtime is not None else None
    # no_grad rather than inference_mode: results stay ordinary tensors callers may edit in place.
    with torch.no_grad(), torch_threads(threads):
        if plan.mode == "whole":
            tracker = ProgressTracker(len(volumes), progress, cancel)
            multiple = _whole_multiple(network, patch)
            whole_shape = tuple(math.ceil(size / multiple) * multiple for size in spatial)
            runner = _runner(network, (volumes.shape[1],) + whole_shape, options, plan, progress, len(volumes))
            stats.update(_runner_stats(runner), _runtime_notes=list(runner.notes))
            accumulated = []
            for volume in volumes:
                tracker.check_cancel()
                padding = []
                for size, target in zip(reversed(spatial), reversed(whole_shape)):
                    padding.extend([0, target - size])
                batch = F.pad(volume.to(plan.device)[None], padding, value=pad_value(volume, options))
                scores = _predict(runner, batch, mirror_axes)[0]
                crop = (slice(None),) + tuple(slice(0, s) for s in spatial)
                accumulated.append(scores[crop].to(accumulate_dtype))
                tracker.advance()
            stats.update(patches=len(volumes), windows=1,
                         _weight_sum=torch.ones((1,) + spatial, device=plan.device))
            return accumulated, stats
        padded = tuple(max(s, p) for s, p in zip(spatial, patch))
        windows = len(window_starts(padded, patch, options.overlap)) * len(volumes)
        runner = _runner(network, (volumes.shape[1],) + patch, options, plan, progress, windows)
        stats.update(_runner_stats(runner), _runtime_notes=list(runner.notes))
        return _slide(runner, volumes, options, plan, patch, mirror_axes, accumulate_dtype, stats, progress, cancel,
                      sink)


def pad_value(volume: torch.Tensor, options: InferenceOptions) -> float:
    """The fill for the part of a window outside the volume (see InferenceOptions.pad_value)."""
    if options.pad_value == "minimum":
        return float(volume.min())
    return float(options.pad_value)


def _slide(runner, volumes, options, plan, patch, mirror_axes, accumulate_dtype, stats, progress, cancel,
           sink=None):
    """Blend every window's prediction. With a `sink`, only a band of `patch[0]` planes is kept:
    planes no later window touches are handed to the sink (argmax/softmax) and the band moves on."""
    spatial = tuple(volumes.shape[2:])
    # Pad symmetrically up to the patch where the volume is smaller (as MONAI), crop back at the end.
    pad_before = [max(p - s, 0) // 2 for s, p in zip(spatial, patch)]
    padded = tuple(max(s, p) for s, p in zip(spatial, patch))
    starts = window_starts(padded, patch, options.overlap, options.grid)
    weights = importance_map(patch, options.blend, options.sigma_scale, plan.device, options.grid)
    constant = options.blend == "constant"
    # grid "nnunet" sums the weights in the accumulation dtype too (nnUNetPredictor: both in float16)
    weight_sum = torch.zeros((1,) + padded, device=plan.device,
                             dtype=accumulate_dtype if options.grid == "nnunet" else torch.float32)
    windows = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in starts]
    for window in windows:
        weight_sum[(slice(None),) + window] += weights
    tracker = ProgressTracker(len(volumes) * len(windows), progress, cancel)
    in_channels = volumes.shape[1]
    minimum = CPU_MIN_BATCH if plan.device.type == "cpu" else 1
    batch_buffer = torch.zeros((max(plan.batch_size, minimum), in_channels) + patch, device=plan.device)
    crop = (slice(None),) + tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    band = patch[0] if sink is not None else padded[0]
    accumulated = []
    for volume in volumes:
        volume = volume.to(plan.device)
        if padded != spatial:
            padding = []
            for before, s, p in reversed(list(zip(pad_before, spatial, patch))):
                padding.extend([before, max(p - s, 0) - before])
            volume = F.pad(volume, padding, value=pad_value(volume, options))
        scores = None
        band_start = 0  # first padded plane held in `scores`

        def flush(until):
            """Hand planes [band_start, until) to the sink and shift the band to start at `until`."""
            nonlocal band_start
            count = until - band_start
            if count <= 0:
                return
            lo, hi = max(band_start, pad_before[0]), min(until, pad_before[0] + spatial[0])
            if hi > lo:
                others = crop[2:]  # the unpadded extent of the other axes
                sink(scores[(slice(None), slice(lo - band_start, hi - band_start)) + others],
                     weight_sum[(slice(None), slice(lo, hi)) + others], lo - pad_before[0])
            kept = band - count
            if kept > 0:
                scores[:, :kept] = scores[:, count:].clone()
            scores[:, max(kept, 0):].zero_()
            band_start = until

        for first in range(0, len(windows), plan.batch_size):
            tracker.check_cancel()
            chunk = windows[first:first + plan.batch_size]
            for slot, window in enumerate(chunk):
                batch_buffer[slot].copy_(volume[(slice(None),) + window])
            # Unused slots keep earlier patches: running them keeps the batch >= 2 on CPU.
            prediction = _predict(runner, batch_buffer[:max(len(chunk), minimum)], mirror_axes)
            if prediction.shape[2:] != patch:
                raise InputError(f"The network returned spatial size {tuple(prediction.shape[2:])} for a patch of "
                                 f"{patch}.", "Use a network whose output has the size of its input.")
            if scores is None:
                scores = torch.zeros((prediction.shape[1], band) + padded[1:], dtype=accumulate_dtype,
                                     device=plan.device)
            for slot, window in enumerate(chunk):
                if sink is not None and window[0].start > band_start:
                    flush(window[0].start)  # windows come first axis slowest: earlier planes are final
                local = (slice(None), slice(window[0].start - band_start, window[0].stop - band_start)) + window[1:]
                target = scores[local]
                if constant:
                    target.add_(prediction[slot])
                elif options.grid == "nnunet":  # as nnUNetPredictor: product in float32, then one rounded add
                    target.add_(prediction[slot] * weights)
                else:
                    target.addcmul_(prediction[slot], weights)
            tracker.advance(len(chunk))
        if sink is not None:
            flush(padded[0])
            accumulated.append(None)
        else:
            accumulated.append(scores[crop] if padded != spatial else scores)
    stats.update(patches=len(volumes) * len(windows), windows=len(windows),
                 _weight_sum=weight_sum[crop] if padded != spatial else weight_sum)
    return accumulated, stats


# --- finishing -----------------------------------------------------------------------------------

def channel_argmax(scores: torch.Tensor) -> torch.Tensor:
    """argmax over the channel axis of (C, *S) scores, first maximum on ties (as torch.argmax), as uint8
    (int32 above 256 classes). A running comparison per channel: argmax(dim=0) reduces over a strided
    axis and measured ~10x slower on CPU, the largest cost of the engine outside the network."""
    dtype = torch.uint8 if scores.shape[0] <= 256 else torch.int32
    labels = torch.zeros(scores.shape[1:], dtype=dtype, device=scores.device)
    best = scores[0].clone()
    for channel in range(1, scores.shape[0]):
        better = scores[channel] > best
        labels.masked_fill_(better, channel)
        torch.maximum(best, scores[channel], out=best)
    return labels


def _slabs(spatial: Sequence[int], channels: int):
    """Slices along the first spatial axis holding about SLAB_VOXELS * channels values each."""
    plane = max(1, math.prod(spatial[1:]))
    step = max(1, SLAB_VOXELS // (plane * max(1, channels)))
    for start in range(0, spatial[0], step):
        yield slice(start, min(start + step, spatial[0]))


class _Outputs:
    """Labels, probabilities and entropy filled slab by slab from unnormalised blended scores."""

    def __init__(self, spatial: Sequence[int], needs_probabilities: bool, needs_uncertainty: bool):
        self.spatial = tuple(spatial)
        self.needs_probabilities = needs_probabilities
        self.needs_uncertainty = needs_uncertainty
        self.labels = self.probabilities = self.uncertainty = None

    def _allocate(self, channels: int) -> None:
        self.labels = np.empty(self.spatial, dtype=np.uint8 if channels <= 256 else np.uint16)
        if self.needs_probabilities:
            self.probabilities = np.empty((channels,) + self.spatial, dtype=np.float32)
        if self.needs_uncertainty:
            self.uncertainty = np.empty(self.spatial, dtype=np.float32)

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, weight_sum: torch.Tensor | None, start: int) -> None:
        """Write planes [start, start + len) from `scores` (C, planes, ...); `weight_sum` None: normalised."""
        if self.labels is None:
            self._allocate(scores.shape[0])
        for slab in _slabs(scores.shape[1:], scores.shape[0]):
            part = scores[:, slab]
            target = slice(start + slab.start, start + slab.stop)
            # Weights are positive, so the argmax of the unnormalised sum is the argmax of the mean.
            self.labels[target] = channel_argmax(part).cpu().numpy()
            if not (self.needs_probabilities or self.needs_uncertainty):
                continue
            normalised = part.float() if weight_sum is None else part.float() / weight_sum[:, slab]
            log_probabilities = torch.log_softmax(normalised, dim=0)
            probabilities = log_probabilities.exp()
            if self.probabilities is not None:
                self.probabilities[:, target] = probabilities.cpu().numpy()
            if self.uncertainty is not None:
                self.uncertainty[target] = (-(probabilities * log_probabilities).sum(0)).cpu().numpy()


@torch.no_grad()
def _finish(scores: torch.Tensor | None, weight_sum: torch.Tensor, options: InferenceOptions, needs_logits: bool,
            outputs: _Outputs) -> InferenceResult:
    """The result from the full blended scores, or from what the rolling sink already wrote."""
    logits = None
    if scores is not None:
        if needs_logits:
            logits = scores.float().div_(weight_sum) if scores.dtype != torch.float32 else scores.div_(weight_sum)
            logits = logits.cpu()
            outputs(logits, None, 0)
        else:
            outputs(scores, weight_sum, 0)
    return InferenceResult(labels=outputs.labels, logits=logits, probabilities=outputs.probabilities,
                           uncertainty=outputs.uncertainty)
