"""Memory guard: estimate what a step will allocate and refuse it before it starts.

A 16^3 image at 400 mm resampled to 3 mm, a checkpoint asking for 4096 features or a small gzip
file whose header claims 1600^3 voxels would each try to allocate tens of GB and take the machine
down with them. Every such step first asks `check(bytes, what)`; above the budget (a share of the
available RAM, or the user's `--memory-limit-mb`) it stops with the size it would have needed.

Importable without torch (the network estimate imports it lazily).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from .errors import MemoryBudgetError

DEFAULT_SHARE = 0.8  # of the RAM available when the run starts
ENVIRONMENT_VARIABLE = "UNETSEGMENT_MEMORY_LIMIT_MB"
FLAG = "--memory-limit-mb"

_limit_mb: Optional[float] = None  # set by the front end (flag); None: environment, then share of RAM


def available_bytes() -> Optional[int]:
    """RAM available to a new allocation (Linux MemAvailable, else the free pages); None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def own_peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory in MB. Linux VmHWM belongs to the process's own address space;
    getrusage's ru_maxrss is not used because Linux carries the parent's peak into a child at fork + exec
    (a child of a 1.5 GB pytest run reports 1.5 GB). None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def set_limit_mb(limit_mb: Optional[float]) -> None:
    """Process-wide budget in MB (the front end's flag); `inf` switches the guard off, None restores the default."""
    global _limit_mb
    if limit_mb is not None and not (limit_mb > 0):
        from .errors import InputError

        raise InputError(f"{FLAG} must be a positive number of MB, got {limit_mb!r}.",
                         f"Pass e.g. {FLAG} 16000, or {FLAG} inf to switch the guard off.")
    _limit_mb = limit_mb


def budget_bytes() -> float:
    """The budget: the flag, else the environment variable, else DEFAULT_SHARE of the available RAM."""
    if _limit_mb is not None:
        return _limit_mb * 2 ** 20
    text = os.environ.get(ENVIRONMENT_VARIABLE)
    if text:
        try:
            value = float(text)
            if value > 0:
                return value * 2 ** 20
        except ValueError:
            pass
    available = available_bytes()
    return math.inf if available is None else available * DEFAULT_SHARE


def format_bytes(count: float) -> str:
    for unit, size in (("TB", 2 ** 40), ("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def check(needed_bytes: float, what: str, fix: str = "") -> None:
    """MemoryBudgetError naming `what`, the size it needs and the budget, when it does not fit."""
    budget = budget_bytes()
    if needed_bytes <= budget:
        return
    source = (f"{FLAG} {_limit_mb:g}" if _limit_mb is not None else
              f"{ENVIRONMENT_VARIABLE}" if os.environ.get(ENVIRONMENT_VARIABLE) else
              f"{int(DEFAULT_SHARE * 100)} % of the available RAM")
    raise MemoryBudgetError(
        f"{what} would need about {format_bytes(needed_bytes)} of memory, more than the budget of "
        f"{format_bytes(budget)} ({source}).",
        (fix + " " if fix else "") + f"If the machine really has the memory, raise the budget with {FLAG} "
        f"(e.g. {FLAG} {math.ceil(needed_bytes / 2 ** 20 * 1.1)}).")


def voxel_count(size: Sequence[float]) -> float:
    return float(math.prod(float(s) for s in size))


def resampled_size(size: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> list[int]:
    """Voxels per axis after resampling `size` at `spacing` to `target_spacing` (as preprocessing rounds)."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(size, spacing, target_spacing)]


def check_segmentation(size: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float],
                       classes: int, extra_outputs: int = 0, what: str = "Segmenting this image") -> None:
    """Before resampling: the network grid (image, normalised copy, class scores and blending weights)
    plus the class scores resampled back onto the input grid, all float32."""
    network_voxels = voxel_count(resampled_size(size, spacing, target_spacing))
    input_voxels = voxel_count(size)
    needed = 4.0 * (network_voxels * (3 + 2 * classes) + input_voxels * (2 + classes * (1 + extra_outputs)))
    grid = "x".join(str(n) for n in resampled_size(size, spacing, target_spacing))
    check(needed, f"{what} (network grid {grid} voxels at {tuple(round(float(t), 3) for t in target_spacing)} mm, "
                  f"{classes} classes)",
          "Crop the image, or use a model whose spacing is closer to the image's.")


def check_image_header(size: Sequence[int], components: int, bytes_per_component: int, path) -> None:
    """Before decompressing: the voxel data a header declares (and one float32 working copy)."""
    needed = voxel_count(size) * max(1, components) * (max(1, bytes_per_component) + 4)
    check(needed, f"{path} declares {'x'.join(str(n) for n in size)} voxels and",
          "Check the file header (a damaged header can claim a huge size), or crop the image.")


def network_parameter_bytes(build) -> Optional[int]:
    """Bytes of the parameters and buffers of the network `build()` makes, built on torch's meta device
    (no memory is allocated); None when the architecture cannot be built that way."""
    try:
        import torch

        with torch.device("meta"):
            network = build()
        return int(sum(t.numel() * t.element_size() for t in list(network.parameters()) + list(network.buffers())))
    except Exception:  # noqa: BLE001 - the real build reports the actual error with its own message
        return None


def check_network(build, what: str, training: bool = False) -> None:
    """Before building a network: its weights (x4 when training: gradients and two Adam moments)."""
    count = network_parameter_bytes(build)
    if count is None:
        return
    check(count * (4 if training else 1.2), f"{what} (a network of {count / 4 / 1e6:.1f} M parameters)",
          "Use fewer features or levels in the architecture.")
