"""Compute device choice and reduced-precision support.

Kept apart from the engine so the CLI and the Slicer panel can list what a machine offers (and
explain a missing GPU) without running a network.
"""

from __future__ import annotations

import os

import torch

from ..errors import DeviceError, InputError
from ..runtime.cpu import cpu_supports_bf16  # noqa: F401 - re-exported (bench, panel)

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16", "auto", "int8")  # int8: OpenVINO only (runtime/)


def resolve_device(device: str | torch.device | None = "auto", network: torch.nn.Module | None = None) -> torch.device:
    """The torch.device to run on; `auto` keeps a network already placed on an accelerator there,
    else prefers CUDA, then MPS, then CPU. An explicit device that is missing raises DeviceError."""
    if device is None or (isinstance(device, str) and device == "auto"):
        current = network_device(network)
        if current is not None and current.type != "cpu":
            return current
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"'{device}' is not a device name.",
                          "Use one of auto, cpu, cuda, cuda:N or mps.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but PyTorch sees no CUDA GPU on this machine.",
                              "Use device 'cpu' (or 'auto'), or install a CUDA build of PyTorch on a GPU machine.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"CUDA device {resolved.index} was requested but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible.",
                              f"Use cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or 'auto'.")
    elif resolved.type == "mps":
        if not mps_available():
            raise DeviceError("Apple MPS was requested but is not available on this machine.",
                              "Use device 'cpu' (or 'auto').")
    elif resolved.type != "cpu":
        raise DeviceError(f"Device type '{resolved.type}' is not supported.", "Use one of auto, cpu, cuda or mps.")
    return resolved


def network_device(network: torch.nn.Module | None) -> torch.device | None:
    if network is None:
        return None
    for parameter in network.parameters():
        return parameter.device
    for buffer in network.buffers():
        return buffer.device
    return None


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype for `precision` on `device` (None: plain fp32) and, when the request
    cannot be honoured, a note explaining the fallback for the run's stats."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.",
                         "Use fp32 (exact), auto (fastest the device supports), bf16, fp16 or int8 (OpenVINO).")
    if precision in ("fp32", "int8"):  # int8 is the OpenVINO runtime's; PyTorch runs it as fp32
        return None, None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return torch.float16, "bf16 is not supported by this GPU; used fp16"
        return (torch.bfloat16 if precision == "bf16" else torch.float16), None
    if device.type == "mps":
        if precision == "bf16":
            return None, "bf16 autocast is not used on MPS; used fp32"
        return torch.float16, None
    # CPU: only bf16 has a fast path; fp16 autocast on CPU is emulated and slow.
    if precision == "fp16":
        return None, "fp16 is not accelerated on CPU; used fp32 (ask for bf16 on a CPU with AMX/AVX512-BF16)"
    if not cpu_supports_bf16():
        if precision == "auto":
            return None, None
        return None, "this CPU lacks bf16 units (AVX512-BF16/AMX); used fp32"
    return torch.bfloat16, None


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (None when unknown), used for the automatic memory budget."""
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None
