"""Runtime settings shared by the engines, the pipeline, the CLI and the panel (importable without torch).

`backend`: how one network is executed. `auto` = OpenVINO on CPU when the package is importable,
PyTorch on a GPU and wherever OpenVINO is missing; `torch` and `openvino` force one. `precision`
(kept on the engine's own options) adds `int8` to PyTorch's fp32/bf16/fp16/auto: INT8 runs only on
OpenVINO, from a calibration the model carries (see `runtime.int8`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import InputError

BACKENDS = ("auto", "torch", "openvino")
# what Slicer installs on demand for the OpenVINO runtime (the project's own pin, pyproject.toml)
OPENVINO_REQUIREMENT = "openvino==2026.4.1"
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DEFAULT_CACHE_MB = 2048.0


@dataclass
class RuntimeOptions:
    """How the engines execute networks. The engine-level default is PyTorch (exact, no conversion);
    the front doors (CLI, pipeline, panel) default to `auto`."""

    backend: str = "torch"                 # auto | torch | openvino
    threads: Optional[int] = None          # None: physical cores (OpenVINO); torch keeps its own setting
    cache_dir: Optional[str] = None        # None: user cache folder (see runtime.cache.default_cache_dir)
    cache_max_mb: float = DEFAULT_CACHE_MB  # compiled-model cache size cap; oldest entries are evicted
    int8_model: Optional[dict] = None      # {"xml": bytes, "bin": bytes, ...}: a calibrated INT8 IR


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.",
                         "Use auto (OpenVINO on CPU when installed, else PyTorch), torch or openvino.")
    return backend


def check_threads(threads) -> Optional[int]:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}.",
                         f"Use e.g. {physical_cores()} (this machine's physical cores) or leave it unset.")
    logical = logical_cpus()
    if threads > logical:  # PyTorch/OpenVINO would start that many threads (100000 crashed the process)
        raise InputError(f"threads is {threads}, more than this machine's {logical} logical CPUs.",
                         f"Use at most {logical}, e.g. {physical_cores()} (the physical cores), or leave it unset.")
    return threads


@functools.lru_cache(maxsize=None)
def openvino_available() -> bool:
    """True when `import openvino` works. Its absence (e.g. in Slicer before the on-demand install)
    only means every network runs on PyTorch."""
    if importlib.util.find_spec("openvino") is None:
        return False
    try:
        import openvino  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is the same as none
        return False
    return True


def openvino_version() -> Optional[str]:
    if not openvino_available():
        return None
    import openvino

    return str(openvino.__version__)


def logical_cpus() -> int:
    """The most threads worth starting: more only time-slice (and 100000 crashed PyTorch)."""
    return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyper-threads share a core's arithmetic units, so
    more threads than cores rarely helps convolution; a CPU affinity mask or container limit caps it)."""
    cores = _physical_cores()
    try:
        cores = min(cores, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        pass
    return max(1, cores)


@functools.lru_cache(maxsize=None)
def _physical_cores() -> int:
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
        if count:
            return int(count)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        cores = set()
        physical = core = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("physical id"):
                    physical = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((physical, core))
                    physical = core = None
        if core is not None:
            cores.add((physical, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return logical_cpus()


def suggested_threads(leave_one_core_free: bool = False) -> int:
    """Default thread count: every physical core, or all but one (the panel's option, so Slicer stays
    responsive while a volume is segmented)."""
    cores = physical_cores()
    return max(1, cores - 1) if leave_one_core_free else cores
