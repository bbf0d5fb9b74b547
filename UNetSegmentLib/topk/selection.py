"""Choosing k of n candidate patches from their scores.

Training needs a choice the loss can differentiate through; inference needs a choice that is the
same every run. Training uses sequential Gumbel-softmax top-k: k draws without replacement, each a
hard one-hot in the forward pass whose gradient is that of the relaxed softmax (straight-through).
Inference uses plain top-k, with ties broken by candidate index so results are reproducible.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

# Score given to candidates that must not be picked again; finite so softmax never yields NaN.
_EXCLUDED = -1e9


def check_k(k: int, candidates: int) -> int:
    """Validate k; a k above the number of candidates is clamped (every candidate is then used)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be a whole number of patches, got {k!r}.",
                         "Pass k as a positive integer, e.g. k=5.")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}.",
                         "Pass k >= 1; larger k evaluates more patches (slower, closer to sliding window).")
    return min(k, candidates)


def gumbel_noise(shape, generator: torch.Generator | None = None, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    # drawn where the generator lives (the trainers' is a CPU one), then moved: torch.rand refuses a
    # CPU generator for CUDA output, and the same seed then picks the same windows on every device
    where = generator.device if generator is not None else device
    uniform = torch.rand(shape, generator=generator, device=where, dtype=dtype).to(device)
    eps = torch.finfo(dtype).tiny
    return -torch.log((-torch.log(uniform.clamp_min(eps))).clamp_min(eps))


def gumbel_topk_straight_through(scores: torch.Tensor, k: int, temperature: float,
                                 generator: torch.Generator | None = None,
                                 noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential Gumbel-softmax top-k of a 1-D score vector.

    Returns (indices (k,), selection (k, n)): row i is exactly one-hot at indices[i] in the forward
    pass, and carries the gradient of softmax((scores + g) / temperature) over the candidates not yet
    chosen. Multiplying candidate inputs by `selection` therefore lets the loss reach the scorer.
    """
    if scores.dim() != 1:
        raise InputError(f"scores must be one score per candidate (1-D), got shape {tuple(scores.shape)}.",
                         "Flatten the candidate scores before selecting.")
    if temperature <= 0:
        raise InputError(f"temperature must be positive, got {temperature}.",
                         "Use a temperature such as 2/3 (the paper's value).")
    k = check_k(k, scores.numel())
    perturbed = scores
    if noise:
        perturbed = scores + gumbel_noise(scores.shape, generator, scores.device, scores.dtype)
    taken = torch.zeros_like(scores, dtype=torch.bool)
    rows, indices = [], []
    for _ in range(k):
        logits = perturbed.masked_fill(taken, _EXCLUDED) / temperature
        soft = torch.softmax(logits, dim=0)
        if not bool(torch.isfinite(soft).all()):
            raise InputError("Candidate scores are not finite.",
                             "Check the input image for NaN/inf values and lower the learning rate.")
        index = int(torch.argmax(soft.detach()))
        hard = torch.zeros_like(soft)
        hard[index] = 1.0
        rows.append(hard - soft.detach() + soft)
        indices.append(index)
        taken = taken.clone()
        taken[index] = True
    return torch.tensor(indices, dtype=torch.long, device=scores.device), torch.stack(rows)


def deterministic_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores; equal scores go to the lower candidate index."""
    if scores.dim() != 1:
        raise InputError(f"scores must be 1-D, got shape {tuple(scores.shape)}.",
                         "Flatten the candidate scores before selecting.")
    k = check_k(k, scores.numel())
    values = scores.detach().to(torch.float64).cpu()
    # stable descending sort keeps index order among ties, so every run picks the same patches
    order = torch.sort(-values, stable=True).indices
    return order[:k].to(scores.device)


def temperature_at(step: int, total_steps: int, start: float = 1.0, end: float = 2.0 / 3.0) -> float:
    """Exponential annealing from `start` to `end`: explore early, commit to the best patches late."""
    if total_steps <= 1:
        return end
    fraction = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start * math.exp(fraction * math.log(end / start))


def rank_target(error: torch.Tensor) -> torch.Tensor:
    """What the scorer learns to match: a softmax over the candidates' standardised coarse error.
    The spread is the population one: a volume that fits one window has a single candidate, whose
    sample std is NaN (no degrees of freedom); with std 0 the target is [1] and the rank loss is 0."""
    return torch.softmax((error - error.mean()) / (error.std(correction=0) + 1e-6), dim=0)


def score_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(scores); the training loss rewards it slightly to keep exploring."""
    log_p = torch.log_softmax(scores, dim=0)
    return -(log_p.exp() * log_p).sum()


class _GatherWindows(torch.autograd.Function):
    """patches[i] = sum_j selection[i, j] * image[window_j], computed without stacking every window:
    the forward reads only the chosen window (selection rows are one-hot in value), the backward
    gives d/d selection[i, j] = <grad patches[i], image[window_j]> one window at a time."""

    @staticmethod
    def forward(ctx, selection, image, indices, regions):
        ctx.save_for_backward(image)
        ctx.regions = regions
        rows = [image[(slice(None), *regions[int(i)])] * selection[r, int(i)]
                for r, i in enumerate(indices)]
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad_patches):
        (image,) = ctx.saved_tensors
        flat_grad = grad_patches.flatten(1)
        columns = [flat_grad @ image[(slice(None), *region)].reshape(-1) for region in ctx.regions]
        return torch.stack(columns, dim=1), None, None, None


def gather_windows(selection: torch.Tensor, image: torch.Tensor, indices: torch.Tensor,
                   regions) -> torch.Tensor:
    """Patches (k, C, *patch) of a (C, *S) image picked by straight-through one-hot `selection`
    (k, n) over the windows `regions`; the gradient reaches every score, memory stays O(k)."""
    return _GatherWindows.apply(selection, image, indices, tuple(regions))
