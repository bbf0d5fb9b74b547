"""Dice + cross-entropy against MONAI's implementation, and nnU-Net's deep-supervision weights."""

import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCELoss

from UNetSegmentLib.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights


def random_problem(seed, classes=4, shape=(2, 8, 12, 10)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], classes) + shape[1:], generator=generator)
    target = torch.randint(0, classes, shape, generator=generator)
    return logits, target


@pytest.mark.parametrize("seed", [0, 1])
def test_dice_ce_matches_monai(seed):
    logits, target = random_problem(seed)
    oracle = MonaiDiceCELoss(include_background=False, to_onehot_y=True, softmax=True,
                             smooth_nr=1e-5, smooth_dr=1e-5)
    expected = oracle(logits, target[:, None])
    assert float(DiceCELoss()(logits, target)) == pytest.approx(float(expected), rel=1e-5)


def test_perfect_prediction_has_lowest_loss_and_gradients_flow():
    _, target = random_problem(2)
    perfect = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).float() * 20
    wrong = torch.roll(perfect, shifts=1, dims=1)
    loss = DiceCELoss()
    assert float(loss(perfect, target)) < 1e-3
    assert float(loss(wrong, target)) > 1.9
    logits = torch.zeros_like(perfect, requires_grad=True)
    loss(logits, target).backward()
    assert logits.grad.abs().sum() > 0


def test_deep_supervision_weights_follow_nnunet():
    assert deep_supervision_weights(1) == [1.0]
    weights = deep_supervision_weights(4)
    assert weights[-1] == 0.0
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0) and weights[1] / weights[2] == pytest.approx(2.0)


def test_deep_supervision_loss_is_weighted_sum_over_downsampled_targets():
    logits, target = random_problem(3, shape=(2, 8, 16, 16))
    heads = [logits, torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 2, 4, 4)]
    base = DiceCELoss()
    weights = deep_supervision_weights(3)
    expected = weights[0] * base(heads[0], target) + weights[1] * base(heads[1], target[:, ::2, ::2, ::2])
    assert float(DeepSupervisionLoss(base)(heads, target)) == pytest.approx(float(expected), rel=1e-6)
    # a single tensor is passed straight through
    assert float(DeepSupervisionLoss(base)(logits, target)) == pytest.approx(float(base(logits, target)))
