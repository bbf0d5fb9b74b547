"""Patch samplers: exact patch size, seeded, and the foreground share nnU-Net asks for."""

import numpy as np
import pytest

from UNetSegmentLib.errors import InputError
from UNetSegmentLib.sampling import ForegroundPatchSampler, UniformPatchSampler, make_sampler

PATCH = (8, 8, 8)


def tiny_foreground_case(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((40, 40, 40)).astype(np.float32)
    label = np.zeros((40, 40, 40), dtype=np.uint8)
    label[30:32, 5:7, 20:22] = 1  # 8 voxels of class 1
    label[10, 33, 33] = 2  # a single voxel of class 2
    return image, label


def contains_foreground_share(sampler, draws):
    return np.mean([sampler.sample()[1].any() for _ in range(draws)])


def test_same_seed_same_patches_different_seed_different_patches():
    case = tiny_foreground_case()
    a, b, c = (ForegroundPatchSampler([case], PATCH, seed=s) for s in (5, 5, 6))
    corners_a = [a.sample()[3] for _ in range(50)]
    assert corners_a == [b.sample()[3] for _ in range(50)]
    assert corners_a != [c.sample()[3] for _ in range(50)]


def test_foreground_share_matches_one_third_plus_chance():
    case = tiny_foreground_case()
    draws = 1500
    uniform = contains_foreground_share(UniformPatchSampler([case], PATCH, seed=1), draws)
    foreground = contains_foreground_share(ForegroundPatchSampler([case], PATCH, seed=1), draws)
    # A uniform patch contains foreground by chance only; the foreground sampler adds a forced third.
    expected = 1 / 3 + (2 / 3) * uniform
    assert uniform < 0.1
    assert abs(foreground - expected) < 0.05


def test_every_foreground_class_gets_centred_patches():
    """Classes are drawn first, so the single-voxel class is sampled as often as the larger one."""
    image, label = tiny_foreground_case()
    sampler = ForegroundPatchSampler([(image, label)], PATCH, seed=2, foreground_fraction=1.0)
    seen = [set(np.unique(sampler.sample()[1])) - {0} for _ in range(200)]
    assert all(seen_classes for seen_classes in seen)
    share_of_class_2 = np.mean([2 in s for s in seen])
    assert 0.35 < share_of_class_2 < 0.65


def test_patch_matches_its_position_and_batch_shapes():
    image, label = tiny_foreground_case()
    sampler = UniformPatchSampler([(image, label)], PATCH, seed=3)
    patch_image, patch_label, index, corner = sampler.sample()
    window = tuple(slice(c, c + p) for c, p in zip(corner, PATCH))
    assert index == 0
    assert np.array_equal(patch_image[0], image[window]) and np.array_equal(patch_label, label[window])
    images, labels = sampler.sample_batch(4)
    assert images.shape == (4, 1) + PATCH and images.dtype == np.float32
    assert labels.shape == (4,) + PATCH and labels.dtype == np.int64


def test_small_volume_is_padded_to_patch_size():
    image = np.full((4, 10, 6), 7.0, dtype=np.float32)
    label = np.ones((4, 10, 6), dtype=np.uint8)
    patch_image, patch_label, _, _ = ForegroundPatchSampler([(image, label)], PATCH, seed=0).sample()
    assert patch_image.shape == (1,) + PATCH and patch_label.shape == PATCH
    assert patch_label.sum() == 4 * 8 * 6  # the real voxels, the padding is background
    assert np.all(patch_image == 7.0)  # image padded with its minimum


def test_bad_input_is_explained():
    image, label = tiny_foreground_case()
    with pytest.raises(InputError, match="does not match"):
        UniformPatchSampler([(image[:-1], label)], PATCH)
    with pytest.raises(InputError, match="Unknown patch sampler"):
        make_sampler("random", [(image, label)], PATCH)
    with pytest.raises(InputError, match="No training cases"):
        UniformPatchSampler([], PATCH)
