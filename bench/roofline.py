"""How close a runtime is to this CPU's fp32 limit: a network's FLOPs per patch and the dense fp32
matmul rate (the best the machine's vector units reach in practice). Shared by the benchmarks that
compare runtimes, so their speed-up claims come with the ceiling they are measured against."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def network_gflop(network: torch.nn.Module, input_shape) -> float:
    """GFLOP (2 per multiply-add) of one forward pass on one input (C, *spatial)."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network(torch.zeros((1,) + tuple(int(s) for s in input_shape)))
    finally:
        network.train(was_training)
    return counter.get_total_flops() / 1e9


def dense_fp32_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Best of PyTorch's and NumPy's fp32 matmul rate, in CPU time (independent of other load on the machine);
    uses the current thread settings."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    an, bn = a.numpy(), b.numpy()
    best = float("inf")
    for multiply in (lambda: torch.mm(a, b), lambda: np.matmul(an, bn)):
        multiply()
        started = time.process_time()
        for _ in range(repeats):
            multiply()
        best = min(best, (time.process_time() - started) / repeats)
    return 2 * size ** 3 / best / 1e9
