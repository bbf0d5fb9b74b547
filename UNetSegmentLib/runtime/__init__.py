"""How one network is executed: PyTorch or OpenVINO, precision, threads, compiled-model cache.

The engines (`inference/`, `topk/`) ask `prepare_runner` for a callable that maps a batch
(N, C, *shape) to logits (N, out_C, *shape); window planning, blending and TTA stay in the engines,
only this call differs between backends. Nothing above the engines calls OpenVINO.

Importable without torch or OpenVINO (the Slicer panel reads BACKENDS and thread defaults from it);
`prepare_runner` needs torch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

from .options import (BACKENDS, DEFAULT_CACHE_MB, PRECISIONS, RuntimeOptions, check_backend, check_threads,
                      openvino_available, openvino_version, physical_cores, suggested_threads)

# `auto` converts a model only for runs big enough to pay the conversion back (a few seconds on a
# laptop CPU): about 19 windows of 96^3 through the network, or when the model is already converted.
AUTO_MIN_VOXELS = 1 << 24

__all__ = ["AUTO_MIN_VOXELS", "BACKENDS", "PRECISIONS", "DEFAULT_CACHE_MB", "RuntimeOptions", "TorchRunner",
           "check_backend", "check_threads", "openvino_available", "openvino_version", "physical_cores",
           "suggested_threads", "prepare_runner", "resolve_backend", "torch_threads"]


@contextlib.contextmanager
def ieee_fp32(device):
    """fp32 that is fp32 on CUDA too: PyTorch runs cuDNN convolutions in TF32 by default on Ampere and
    later (10-bit mantissa; measured on an H200: probabilities off by 1.5e-3 from the CPU's), which
    `--precision fp32` promises not to do. Restores the caller's settings; nothing changes elsewhere."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32, matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


class TorchRunner:
    """network(batch) in eval mode, under autocast when asked; the first output of list-returning networks."""

    backend = "torch"

    def __init__(self, network, device, autocast_dtype=None, precision: str = "fp32", notes: Optional[list] = None):
        self.network = network
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.precision = precision
        self.notes = list(notes or [])
        self.convert_s = 0.0
        self.cache_hit = None

    def __call__(self, batch):
        import torch

        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                output = self.network(batch)
        else:
            with ieee_fp32(self.device):
                output = self.network(batch)
        if isinstance(output, (list, tuple)):
            output = output[0]
        return output


def resolve_backend(backend: str, device) -> tuple[str, Optional[str]]:
    """('torch' | 'openvino', note or None) for `backend` on a torch `device`."""
    check_backend(backend)
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    if backend == "torch":
        return "torch", None
    if backend == "auto":
        return ("openvino" if on_cpu and openvino_available() else "torch"), None
    if not openvino_available():
        return "torch", "OpenVINO is not installed; used PyTorch"
    if not on_cpu:
        return "torch", f"OpenVINO runs on the CPU only; used PyTorch on {device}"
    return "openvino", None


def _openvino_precision(precision: str, int8_model, input_shape) -> tuple[str, Optional[str]]:
    from .cpu import cpu_supports_bf16

    if precision == "int8":
        if int8_model is None:
            return "fp32", ("INT8 was asked but the model carries no INT8 calibration; used fp32 (create one with "
                            "`python -m UNetSegmentLib quantize`)")
        calibrated = tuple(int(s) for s in int8_model.get("input_shape") or ())
        if calibrated and calibrated != tuple(int(s) for s in input_shape):
            return "fp32", (f"the INT8 model is calibrated for inputs {calibrated}, not {tuple(input_shape)} "
                            "(e.g. whole-volume mode); used fp32")
        return "int8", None
    if precision == "bf16" or (precision == "auto" and cpu_supports_bf16()):
        if cpu_supports_bf16():
            return "bf16", None
        return "fp32", "this CPU lacks bf16 units (AVX512-BF16/AMX); used fp32"
    return "fp32", None


def prepare_runner(network, input_shape: Sequence[int], device, autocast_dtype=None, torch_precision: str = "fp32",
                   precision: str = "fp32", options: Optional[RuntimeOptions] = None,
                   on_convert: Optional[Callable] = None, work_voxels: Optional[int] = None):
    """A runner for batches (N, *input_shape) of `network` on `device`.

    `autocast_dtype`/`torch_precision`: what the PyTorch path runs with (the engine's plan).
    `precision`: the request (fp32 | bf16 | fp16 | int8 | auto) the OpenVINO path interprets.
    `work_voxels`: voxels the run will push through the network; with `auto`, a run smaller than
    AUTO_MIN_VOXELS stays on PyTorch unless the model is already converted (cache or memory).
    Any failure to convert or compile falls back to PyTorch; `runner.notes` says why in one line.
    """
    options = options or RuntimeOptions()
    backend, note = resolve_backend(options.backend, device)
    notes = [note] if note else []
    if backend == "openvino":
        ov_precision, precision_note = _openvino_precision(precision, options.int8_model, input_shape)
        if options.backend == "auto" and work_voxels is not None and work_voxels < AUTO_MIN_VOXELS:
            try:
                from .openvino_backend import is_converted

                small_and_new = not is_converted(network, input_shape, ov_precision, options)
            except Exception:  # noqa: BLE001 - cannot tell: treat as not converted
                small_and_new = True
            if small_and_new:
                return TorchRunner(network, device, autocast_dtype, torch_precision, notes)
    if backend == "openvino":
        try:
            from .openvino_backend import create_runner

            runner = create_runner(network, input_shape, ov_precision, options.threads or physical_cores(),
                                   options.cache_dir, options.cache_max_mb,
                                   options.int8_model if ov_precision == "int8" else None, on_convert)
        except Exception as error:  # noqa: BLE001 - any conversion/compile failure: PyTorch, with a note
            message = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            notes.append(f"OpenVINO conversion failed ({type(error).__name__}: {message}); used PyTorch")
        else:
            runner.notes = notes + ([precision_note] if precision_note else []) + runner.notes
            return runner
    elif precision == "int8":
        notes.append("INT8 runs on OpenVINO only; used PyTorch " + torch_precision)
    return TorchRunner(network, device, autocast_dtype, torch_precision, notes)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """Run a block with torch's intra-op thread count set to `threads` (unchanged when None)."""
    if not threads:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
