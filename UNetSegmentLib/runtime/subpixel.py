"""Transposed convolutions rewritten as ordinary convolutions, one per output phase (sub-pixel form).

Why: OpenVINO's CPU plugin runs INT8 convolutions on AVX2 but keeps transposed convolutions
(ConvolutionBackpropData) in fp32 there; in a U-Net decoder they are then a third of the INT8 time.
A stride-s transposed convolution equals s^D small convolutions, each producing the outputs of one
phase (output index = s * m + r), interleaved: the same multiply-adds, and every one of them an
ordinary convolution that the INT8 path quantizes. Only the network handed to the converter is
rewritten (a copy); PyTorch keeps running the original.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _as_tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _phase_taps(kernel: int, stride: int, padding: int, phase: int) -> tuple[int, list[int]]:
    """(first input offset, kernel taps ordered by offset) for the outputs s * m + phase of one axis.

    Output o = s * i - p + k, so the outputs of this phase read x[m + d] with d = (phase + p - k) / s
    for each tap k with (phase + p - k) divisible by s; successive taps step d by -1.
    """
    taps = [k for k in range(kernel) if (phase + padding - k) % stride == 0]
    offsets = [(phase + padding - k) // stride for k in taps]
    order = sorted(range(len(taps)), key=lambda index: offsets[index])
    return (offsets[order[0]] if taps else 0), [taps[index] for index in order]


def is_rewritable(module: nn.Module) -> bool:
    """A transposed convolution whose output is exactly stride x input on every axis (U-Net upsampling)."""
    if not isinstance(module, _TRANSPOSED):
        return False
    dims = len(module.kernel_size)
    if module.groups != 1 or any(d != 1 for d in _as_tuple(module.dilation, dims)) or \
            module.padding_mode != "zeros" or isinstance(module.padding, str):
        return False
    for k, s, p, op in zip(module.kernel_size, module.stride, _as_tuple(module.padding, dims),
                           _as_tuple(module.output_padding, dims)):
        if k - 2 * p + op != s or s < 1:  # (L - 1) * s - 2p + k + op == s * L
            return False
        if any(not _phase_taps(k, s, p, r)[1] for r in range(s)):  # a phase no tap reaches
            return False
    return True


class SubPixelConvTranspose(nn.Module):
    """The same map as a rewritable nn.ConvTransposeNd, as one convolution per output phase."""

    def __init__(self, transposed: nn.Module):
        super().__init__()
        if not is_rewritable(transposed):
            raise ValueError(f"{type(transposed).__name__} cannot be rewritten in sub-pixel form")
        self.dims = len(transposed.kernel_size)
        self.strides = tuple(int(s) for s in transposed.stride)
        weight = transposed.weight.detach()  # (C_in, C_out, *kernel)
        paddings = _as_tuple(transposed.padding, self.dims)
        self.phases = []
        for index, phase in enumerate(itertools.product(*(range(s) for s in self.strides))):
            phase_weight, pads = weight, []
            for axis, (k, s, p, r) in enumerate(zip(transposed.kernel_size, self.strides, paddings, phase)):
                first, taps = _phase_taps(k, s, p, r)
                phase_weight = phase_weight.index_select(2 + axis, torch.tensor(taps))
                last = first + len(taps) - 1
                pads.append((max(0, -first), max(0, last), first + max(0, -first)))  # left, right, crop start
            # conv weight (C_out, C_in, taps...): taps ordered by offset, i.e. ascending input index
            self.register_buffer(f"weight_{index}", phase_weight.transpose(0, 1).contiguous())
            self.phases.append(tuple(pads))
        bias = transposed.bias.detach().clone() if transposed.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        outputs = []
        for index, pads in enumerate(self.phases):
            flat_pad = []
            for left, right, _ in reversed(pads):  # F.pad lists the last axis first
                flat_pad += [left, right]
            y = _CONVOLUTIONS[self.dims](F.pad(x, flat_pad), getattr(self, f"weight_{index}"), self.bias)
            for axis, (_, _, start) in enumerate(pads):
                if start or y.shape[2 + axis] != spatial[axis]:
                    y = y.narrow(2 + axis, start, spatial[axis])
            outputs.append(y)
        n, c = outputs[0].shape[:2]
        stacked = torch.stack(outputs, dim=2).reshape(n, c, *self.strides, *spatial)
        # (N, C, s_0..s_D, L_0..L_D) -> (N, C, L_0, s_0, ..., L_D, s_D): output index L * s + phase
        order = [0, 1] + [axis for d in range(self.dims) for axis in (2 + self.dims + d, 2 + d)]
        return stacked.permute(*order).reshape(n, c, *(length * s for length, s in zip(spatial, self.strides)))


def rewrite_transposed_convolutions(network: nn.Module) -> tuple[nn.Module, int]:
    """(a copy of `network` with every rewritable transposed convolution in sub-pixel form, count);
    the network itself when there is nothing to rewrite."""
    if not any(is_rewritable(module) for module in network.modules()):
        return network, 0
    rewritten = copy.deepcopy(network)
    count = 0
    for module in list(rewritten.modules()):
        for child_name, child in list(module.named_children()):
            if is_rewritable(child):
                setattr(module, child_name, SubPixelConvTranspose(child))
                count += 1
    return rewritten, count
