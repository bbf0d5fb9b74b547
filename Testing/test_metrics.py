"""Dice and HD95 on cases small enough to compute by hand, and HD95 against MONAI as an oracle."""

import math

import numpy as np
import pytest

from UNetSegmentLib.errors import GeometryError
from UNetSegmentLib.metrics import dice_per_label, hd95_per_label, mean_foreground


def test_dice_of_shifted_cubes_by_hand():
    pred = np.zeros((4, 4, 6), np.uint8)
    ref = np.zeros_like(pred)
    pred[1:3, 1:3, 1:3] = 1  # 8 voxels
    ref[1:3, 1:3, 2:4] = 1  # 8 voxels, 4 shared
    pred[0, 0, 5] = 2  # label 2 only in the prediction
    scores = dice_per_label(pred, ref, [0, 1, 2, 3])
    assert scores[1] == pytest.approx(2 * 4 / 16)
    assert scores[2] == 0.0
    assert scores[3] == 1.0  # absent from both
    background_pred, background_ref = (pred == 0).sum(), (ref == 0).sum()
    shared = np.logical_and(pred == 0, ref == 0).sum()
    assert scores[0] == pytest.approx(2 * shared / (background_pred + background_ref))
    assert mean_foreground({0: 1.0, 1: 0.5, 2: 0.0}) == pytest.approx(0.25)
    with pytest.raises(GeometryError):
        dice_per_label(pred, ref[:-1], [1])


def test_hd95_respects_anisotropic_spacing_in_xyz_order():
    pred = np.zeros((8, 5, 5), np.uint8)
    ref = np.zeros_like(pred)
    pred[1, 2, 2] = 1
    ref[4, 2, 2] = 1  # three slices apart along array axis 0 (= z)
    assert hd95_per_label(pred, ref, [1], spacing=(0.5, 0.5, 2.0))[1] == pytest.approx(6.0)
    assert hd95_per_label(pred, ref, [1], spacing=(2.0, 0.5, 0.5))[1] == pytest.approx(1.5)


def test_hd95_of_shifted_block_and_empty_cases():
    pred = np.zeros((10, 10, 10), np.uint8)
    ref = np.zeros_like(pred)
    pred[2:7, 2:7, 2:7] = 1
    ref[2:7, 2:7, 4:9] = 1  # shifted by 2 voxels along x
    result = hd95_per_label(pred, ref, [1, 2], spacing=(1.5, 1.0, 1.0))
    assert result[1] == pytest.approx(3.0)  # the far faces are 2 voxels * 1.5 mm apart
    assert result[2] == 0.0
    only_pred = pred.copy()
    only_pred[0, 0, 0] = 3
    assert math.isinf(hd95_per_label(only_pred, ref, [3], spacing=(1, 1, 1))[3])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_matches_monai_on_random_blobs():
    monai_metrics = pytest.importorskip("monai.metrics")
    torch = pytest.importorskip("torch")
    from scipy import ndimage

    rng = np.random.default_rng(3)
    shape = (14, 16, 18)
    pred = (ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.02).astype(np.uint8)
    ref = (ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.02).astype(np.uint8)
    spacing_xyz = (0.8, 1.1, 2.5)
    ours = hd95_per_label(pred, ref, [1], spacing=spacing_xyz)[1]
    one_hot = lambda a: torch.from_numpy(np.stack([a == 0, a == 1])[None].astype(np.float32))  # noqa: E731
    theirs = monai_metrics.compute_hausdorff_distance(one_hot(pred), one_hot(ref), include_background=False,
                                                      percentile=95, spacing=list(spacing_xyz[::-1]))
    assert ours == pytest.approx(float(theirs[0, 0]), rel=1e-4)
