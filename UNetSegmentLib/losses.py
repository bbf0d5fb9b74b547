"""Dice + cross-entropy loss, and its deep-supervision wrapper (nnU-Net's training objective).

Dice counters class imbalance (small organs count as much as large ones); cross-entropy gives
well-behaved gradients early in training, when Dice is flat.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    """Soft Dice over foreground classes (per sample, then averaged) plus cross-entropy.

    `logits` (B, N, *spatial), `target` (B, *spatial) integer labels 0..N-1.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, smooth: float = 1e-5,
                 include_background: bool = False):
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.smooth = smooth
        self.include_background = include_background

    def soft_dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits, dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
        if not self.include_background:
            probabilities, one_hot = probabilities[:, 1:], one_hot[:, 1:]
        axes = tuple(range(2, logits.ndim))
        overlap = (probabilities * one_hot).sum(axes)
        total = probabilities.sum(axes) + one_hot.sum(axes)
        dice = (2 * overlap + self.smooth) / (total + self.smooth)
        return 1 - dice.mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        loss = self.ce_weight * F.cross_entropy(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.soft_dice_loss(logits, target)
        return loss


def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net: weight 1/2^i for head i (highest resolution first), lowest resolution dropped, sum 1."""
    if heads == 1:
        return [1.0]
    weights = [1 / 2 ** i for i in range(heads)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """Applies `loss` to every head against the target downsampled (nearest) to that head's size."""

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = list(weights) if weights is not None else None

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.weights or deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros(())
        for logits, weight in zip(outputs, weights):
            if weight == 0:
                continue
            head_target = target
            if logits.shape[2:] != target.shape[1:]:
                head_target = F.interpolate(target[:, None].float(), size=logits.shape[2:],
                                            mode="nearest")[:, 0].long()
            total = total + weight * self.loss(logits, head_target)
        return total
