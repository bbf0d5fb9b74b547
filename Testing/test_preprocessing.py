"""Orientation, resampling and normalisation on small synthetic volumes."""

import numpy as np
import pytest
import SimpleITK as sitk

from UNetSegmentLib import preprocessing
from UNetSegmentLib.errors import GeometryError, InputError
from UNetSegmentLib.metadata import Normalization

OBLIQUE_FREE_DIRECTION = (0, -1, 0, 1, 0, 0, 0, 0, 1)  # axes swapped and one flipped


def _image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(d) for d in direction])
    return image


def _smooth_volume(shape, seed=0):
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1, 3, 3)
    return (np.sin(a * np.pi * x) * np.cos(b * np.pi * y) + c * z).astype(np.float32) * 100


def _sphere(shape, centre, radius):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2).astype(np.uint8)


def _same_grid(a, b):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)


def test_resampling_round_trip_keeps_geometry_and_content():
    original = _image(_smooth_volume((12, 20, 18)), spacing=(0.8, 0.9, 2.0), origin=(-12.5, 30.0, 7.25),
                      direction=OBLIQUE_FREE_DIRECTION)
    coarse = preprocessing.resample_image(original, (1.2, 1.2, 2.0))
    assert coarse.GetSize() == (round(18 * 0.8 / 1.2), round(20 * 0.9 / 1.2), 12)
    np.testing.assert_allclose(coarse.GetOrigin(), original.GetOrigin())
    np.testing.assert_allclose(coarse.GetDirection(), original.GetDirection())
    back = preprocessing.resample_image(coarse, None, reference=original)
    _same_grid(back, original)
    before, after = sitk.GetArrayFromImage(original), sitk.GetArrayFromImage(back)
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.98


def test_label_resampling_round_trip_keeps_labels_and_shape():
    array = _sphere((20, 24, 24), (10, 12, 12), 7) + 2 * _sphere((20, 24, 24), (10, 12, 12), 3)
    array[array == 3] = 2
    label = _image(array.astype(np.uint8), spacing=(1.0, 1.0, 1.5), origin=(4, 5, 6))
    coarse = preprocessing.resample_image(label, (2.0, 2.0, 2.0), is_label=True)
    back = preprocessing.resample_image(coarse, None, is_label=True, reference=label)
    _same_grid(back, label)
    result = sitk.GetArrayFromImage(back)
    assert set(np.unique(result)) == {0, 1, 2}
    for value in (1, 2):
        overlap = np.logical_and(result == value, array == value).sum()
        assert 2 * overlap / ((result == value).sum() + (array == value).sum()) > 0.75


def test_anisotropic_volume_uses_nearest_along_thick_axis():
    # every slice is constant (10 * slice index): only nearest-neighbour along z keeps values in that set
    slices = np.repeat(np.arange(6, dtype=np.float32)[:, None, None] * 10, 16, axis=1).repeat(16, axis=2)
    thick = _image(slices, spacing=(1.0, 1.0, 5.0))
    out = sitk.GetArrayFromImage(preprocessing.resample_image(thick, (1.0, 1.0, 2.5)))
    assert out.shape[0] == 12
    np.testing.assert_allclose(out, np.round(out / 10) * 10, atol=1e-3)
    thin = _image(slices, spacing=(1.0, 1.0, 2.0))  # isotropic enough: spline along z blends slices
    out_thin = sitk.GetArrayFromImage(preprocessing.resample_image(thin, (1.0, 1.0, 1.0)))
    assert np.abs(out_thin - np.round(out_thin / 10) * 10).max() > 1.0


def test_reorient_to_canonical_keeps_physical_positions():
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = _image(array, spacing=(0.5, 0.7, 2.0), origin=(10, -3, 2), direction=(0, 0, 1, -1, 0, 0, 0, 1, 0))
    canonical = preprocessing.reorient_to_canonical(image)
    np.testing.assert_allclose(canonical.GetDirection(), np.eye(3).ravel(), atol=1e-9)
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        point = image.TransformIndexToPhysicalPoint(index)
        moved = canonical.TransformPhysicalPointToIndex(point)
        assert canonical[moved] == image[index]


def test_compute_target_spacing_is_median_per_axis():
    spacings = [(0.7, 0.8, 5.0), (0.9, 0.8, 3.0), (0.8, 1.0, 2.5), (0.75, 0.6, 4.0)]
    expected = tuple(np.median(np.asarray(spacings), axis=0))
    assert preprocessing.compute_target_spacing(spacings) == pytest.approx(expected)
    with pytest.raises(GeometryError):
        preprocessing.compute_target_spacing([(1.0, 0.0, 1.0)])


def test_ct_normalization_uses_foreground_statistics_only():
    rng = np.random.default_rng(1)
    images, labels, foreground = [], [], []
    for _ in range(3):
        image = np.full((10, 12, 12), -1000.0, dtype=np.float32)  # air background, must not count
        image[0, 0, 0] = 3000.0
        label = _sphere(image.shape, (5, 6, 6), 4)
        values = rng.normal(60, 20, size=int(label.sum())).astype(np.float32)
        values[:2] = [900.0, -500.0]  # outliers the 0.5/99.5 percentiles clip
        image[label > 0] = values
        images.append(image)
        labels.append(label)
        foreground.append(values)
    norm = preprocessing.compute_ct_normalization(images, labels)
    everything = np.concatenate(foreground).astype(np.float64)
    low, high = np.percentile(everything, [0.5, 99.5])
    assert norm.scheme == "ct"
    assert norm.clip_low == pytest.approx(low) and norm.clip_high == pytest.approx(high)
    assert -500 < norm.clip_low < 20 and 100 < norm.clip_high < 900
    clipped = np.clip(everything, low, high)
    assert norm.mean == pytest.approx(clipped.mean()) and norm.std == pytest.approx(clipped.std())
    normalized = preprocessing.normalize(images[0], norm)
    assert normalized.dtype == np.float32
    assert normalized.min() == pytest.approx((low - norm.mean) / norm.std, rel=1e-4)  # air clipped up
    fg = np.concatenate([preprocessing.normalize(i, norm)[l > 0] for i, l in zip(images, labels)])
    assert abs(fg.mean()) < 0.05 and abs(fg.std() - 1) < 0.05
    with pytest.raises(InputError):
        preprocessing.compute_ct_normalization([images[0]], [np.zeros_like(labels[0])])


def test_zscore_is_per_volume():
    array = _smooth_volume((6, 8, 8)) * 3 + 40
    out = preprocessing.normalize(array, Normalization(scheme="zscore"))
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4
    with pytest.raises(InputError):
        preprocessing.normalize(array, Normalization(scheme="minmax"))


def test_validate_image_rejects_bad_volumes():
    good = _image(_smooth_volume((4, 5, 6)))
    preprocessing.validate_image(good)
    nan = sitk.GetArrayFromImage(good)
    nan[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        preprocessing.validate_image(_image(nan))
    with pytest.raises(InputError, match="constant"):
        preprocessing.validate_image(_image(np.zeros((4, 5, 6), np.float32)))
    with pytest.raises(GeometryError, match="3D"):
        preprocessing.validate_image(sitk.GetImageFromArray(np.random.rand(5, 6)))
    with pytest.raises(InputError, match="not a SimpleITK image"):
        preprocessing.validate_image(np.zeros((4, 5, 6)))
    with pytest.raises(InputError, match="components"):
        preprocessing.validate_image(sitk.GetImageFromArray(np.random.rand(4, 5, 6, 3), isVector=True))
