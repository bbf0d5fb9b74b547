"""What this CPU offers the runtimes (kept here, below the engines, so both backends can ask)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix units (AVX512-BF16 or AMX).

    Without them bf16 is emulated and slower than fp32, so both backends fall back to fp32.
    """
    try:
        import torch

        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True
    except (AttributeError, RuntimeError, ImportError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
