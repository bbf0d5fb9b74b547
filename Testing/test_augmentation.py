"""Augmentation keeps image and label aligned, labels integer, and respects thick slices."""

import numpy as np
import pytest
import torch

from UNetSegmentLib.augmentation import AugmentationConfig, Augmenter, center_crop, is_anisotropic

PATCH = (16, 32, 32)
NONE = dict(rotation_probability=0, scaling_probability=0, elastic_probability=0, gamma_probability=0,
            mirror_probability=0, noise_probability=0)


def blobs(shape, seed=0):
    """Label of random boxes and an image that encodes the label (100 per class) plus a gradient."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int64)
    for value in (1, 2, 3, 1, 2):
        start = [int(rng.integers(0, s - s // 3)) for s in shape]
        size = [int(rng.integers(s // 6, s // 3)) for s in shape]
        label[tuple(slice(a, a + b) for a, b in zip(start, size))] = value
    return label


def batch(augmenter, seed=0, batch_size=3):
    labels = np.stack([blobs(augmenter.input_size, seed + i) for i in range(batch_size)])
    images = labels[:, None].astype(np.float32) * 100.0
    return torch.from_numpy(images), torch.from_numpy(labels)


def agreement(image, label):
    """Share of voxels whose image value (label * 100, interpolated) rounds to the label."""
    return float((torch.round(image[:, 0] / 100).long() == label).float().mean())


@pytest.mark.parametrize("transform", ["rotation", "scaling", "elastic", "mirror"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 3.0)])
def test_spatial_transform_keeps_image_and_label_aligned(transform, spacing):
    options = dict(NONE)
    options[f"{transform}_probability"] = 1.0
    augmenter = Augmenter(PATCH, spacing, AugmentationConfig(**options), seed=1)
    images, labels = batch(augmenter)
    out_images, out_labels = augmenter(images, labels)
    crop_images, crop_labels = center_crop(images, labels, PATCH)
    assert out_images.shape == (3, 1) + PATCH and out_labels.shape == (3,) + PATCH
    assert out_labels.dtype == torch.int64
    assert set(out_labels.unique().tolist()) <= {0, 1, 2, 3}
    assert not torch.equal(out_labels, crop_labels)  # the transform did something
    # bilinear image and nearest label disagree only on a thin rim along boundaries
    assert agreement(out_images, out_labels) > 0.9


def test_without_transforms_the_centre_crop_is_returned_exactly():
    augmenter = Augmenter(PATCH, (1.0, 1.0, 1.0), AugmentationConfig(**NONE), seed=0)
    images, labels = batch(augmenter)
    out_images, out_labels = augmenter(images, labels)
    crop_images, crop_labels = center_crop(images, labels, PATCH)
    assert torch.allclose(out_images, crop_images, atol=1e-3)
    assert torch.equal(out_labels, crop_labels)


def test_thick_slices_keep_transforms_in_plane():
    """With 3 mm slices, every output slice is a transform of the same input slice."""
    assert is_anisotropic((0.8, 0.8, 3.0)) and not is_anisotropic((1.0, 1.0, 1.2))
    options = dict(NONE, rotation_probability=1.0, scaling_probability=1.0, elastic_probability=1.0)
    augmenter = Augmenter(PATCH, (0.8, 0.8, 3.0), AugmentationConfig(**options), seed=3)
    assert augmenter.input_size[0] == PATCH[0] and augmenter.input_size[1] > PATCH[1]
    images = torch.arange(PATCH[0], dtype=torch.float32).view(1, 1, -1, 1, 1).expand(
        2, 1, *augmenter.input_size).clone()
    labels = torch.zeros((2,) + augmenter.input_size, dtype=torch.int64)
    out_images, _ = augmenter(images, labels)
    expected = torch.arange(PATCH[0], dtype=torch.float32).view(1, 1, -1, 1, 1).expand_as(out_images)
    assert torch.allclose(out_images, expected, atol=1e-3)


def test_gamma_changes_intensities_but_keeps_statistics_and_labels():
    options = dict(NONE, gamma_probability=1.0)
    augmenter = Augmenter(PATCH, (1.0, 1.0, 1.0), AugmentationConfig(**options), seed=0)
    images = torch.rand((2, 1) + augmenter.input_size, generator=torch.Generator().manual_seed(0))
    labels = torch.from_numpy(np.stack([blobs(augmenter.input_size, i) for i in range(2)]))
    out_images, out_labels = augmenter(images, labels)
    crop_images, crop_labels = center_crop(images, labels, PATCH)
    assert torch.equal(out_labels, crop_labels)
    assert not torch.allclose(out_images, crop_images, atol=1e-3)
    for out, crop in zip(out_images, crop_images):
        assert float(out.mean()) == pytest.approx(float(crop.mean()), abs=1e-3)
        assert float(out.std()) == pytest.approx(float(crop.std()), rel=1e-3)
    # gamma is monotonic: the order of intensities is kept
    flat_out, flat_crop = out_images[0].flatten(), crop_images[0].flatten()
    assert torch.equal(torch.argsort(flat_out)[:100], torch.argsort(flat_crop)[:100])


def test_same_seed_same_augmentation():
    augmenter_a = Augmenter(PATCH, (1.0, 1.0, 2.5), seed=9)
    augmenter_b = Augmenter(PATCH, (1.0, 1.0, 2.5), seed=9)
    images, labels = batch(augmenter_a)
    for _ in range(3):
        a_images, a_labels = augmenter_a(images, labels)
        b_images, b_labels = augmenter_b(images, labels)
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
