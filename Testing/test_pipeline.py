"""The segmentation pipeline end to end: grid fidelity, orientation invariance, samplers, errors."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from UNetSegmentLib.checkpoint import LoadedModel, save_checkpoint
from UNetSegmentLib.errors import Cancelled, InputError
from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization
from UNetSegmentLib.metrics import dice_per_label
from UNetSegmentLib.networks import build_network
from UNetSegmentLib.pipeline import segment_image
from UNetSegmentLib.progress import CancelToken

LABELS = [LabelInfo(0, "background", (0, 0, 0)), LabelInfo(1, "blob", (1, 0, 0)), LabelInfo(2, "floor", (0, 1, 0))]


class BrightAndFloorNet(nn.Module):
    """Label 1 where the (z-scored) image is bright; label 2 where it is bright and rises towards +z.

    Label 2 depends on which way the z axis points, so it exposes any orientation mistake.
    """

    def __init__(self):
        super().__init__()
        kernel = torch.zeros(1, 1, 3, 1, 1)
        kernel[0, 0, 0, 0, 0], kernel[0, 0, 2, 0, 0] = -1.0, 1.0  # x[z+1] - x[z-1]
        self.register_buffer("kernel", kernel)

    def forward(self, x):
        rise = nn.functional.conv3d(x, self.kernel, padding=(1, 0, 0))
        return torch.cat([torch.zeros_like(x), 4 * x, 4 * x + 2 * torch.relu(x) * rise], dim=1)


def _metadata(**changes):
    data = dict(architecture="unet", architecture_kwargs={"features": 4, "levels": 2}, spatial_dims=3,
                in_channels=1, labels=list(LABELS), patch_size=[16, 16, 16], target_spacing=[1.2, 1.2, 1.6],
                normalization=Normalization("zscore"), modality="MR")
    data.update(changes)
    return ModelMetadata(**data)


def _blob_image(spacing=(0.9, 1.1, 2.0), origin=(-20.0, 13.0, 5.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    """A bright ellipsoid in a noisy volume; returns (image, blob mask) with the same geometry."""
    shape = (14, 26, 30)  # z, y, x
    z, y, x = np.indices(shape)
    physical = [(x - 15) * spacing[0], (y - 12) * spacing[1], (z - 6) * spacing[2]]
    mask = ((physical[0] / 10) ** 2 + (physical[1] / 8) ** 2 + (physical[2] / 7) ** 2) <= 1
    rng = np.random.default_rng(0)
    array = np.where(mask, 100.0, 0.0) + rng.normal(0, 5, shape)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    reference = sitk.GetImageFromArray(mask.astype(np.uint8))
    for item in (image, reference):
        item.SetSpacing(spacing)
        item.SetOrigin(origin)
        item.SetDirection([float(d) for d in direction])
    return image, reference


def _model():
    return LoadedModel(network=BrightAndFloorNet().eval(), metadata=_metadata(), path=Path("bright_and_floor"))


def _assert_exact_grid(result_image, image):
    assert result_image.GetSize() == image.GetSize()
    assert result_image.GetSpacing() == image.GetSpacing()
    assert result_image.GetOrigin() == image.GetOrigin()
    assert result_image.GetDirection() == image.GetDirection()


def test_labelmap_lies_exactly_on_the_input_grid_and_finds_the_structure():
    image, reference = _blob_image(direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    result = segment_image(image, _model(), device="cpu", return_probabilities=True, return_uncertainty=True)
    _assert_exact_grid(result.labelmap, image)
    assert result.labelmap.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(result.labelmap)
    truth = sitk.GetArrayFromImage(reference)
    found = np.isin(labels, (1, 2)).astype(np.uint8)  # both labels lie on the bright blob
    assert dice_per_label(found, truth, [1])[1] > 0.85
    assert set(np.unique(labels)) == {0, 1, 2}
    _assert_exact_grid(result.probabilities, image)
    probabilities = sitk.GetArrayFromImage(result.probabilities)
    assert probabilities.shape == labels.shape + (3,)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probabilities.argmax(axis=-1), labels)
    _assert_exact_grid(result.uncertainty, image)
    uncertainty = sitk.GetArrayFromImage(result.uncertainty)
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(axis=-1) / np.log(3)
    np.testing.assert_allclose(uncertainty, entropy, atol=1e-5)
    assert 0.0 <= uncertainty.min() and uncertainty.max() <= 1.0 and uncertainty.max() > 0.1
    assert result.seconds > 0 and result.stats["sampler"] == "sliding_window"
    assert [label.name for label in result.labels] == ["background", "blob", "floor"]


def _permute_and_flip(image, order, flips):
    """Same physical volume, voxel axes permuted (x, y, z order) and flipped; geometry kept consistent."""
    permuted = sitk.PermuteAxes(image, order)
    return sitk.Flip(permuted, flips)


def test_orientation_does_not_change_the_segmentation_in_physical_space():
    image, _ = _blob_image()
    reordered = _permute_and_flip(image, [2, 0, 1], [True, False, True])
    assert reordered.GetSize() != image.GetSize() and reordered.GetDirection() != image.GetDirection()
    original = segment_image(image, _model(), device="cpu").labelmap
    moved = segment_image(reordered, _model(), device="cpu").labelmap
    _assert_exact_grid(moved, reordered)
    back = sitk.Resample(moved, image, sitk.Transform(), sitk.sitkNearestNeighbor, 255)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
    # label 2 ("rises towards +z") really depends on orientation: a z-flipped input without
    # reorientation would put it on the opposite face of the blob
    labels = sitk.GetArrayFromImage(original)
    floor_z = np.nonzero(labels == 2)[0].mean()
    blob_z = np.nonzero(np.isin(labels, (1, 2)))[0].mean()
    assert floor_z < blob_z


def test_checkpoint_path_and_registered_network(tmp_path):
    torch.manual_seed(0)
    network = build_network("unet", 3, 1, 3, features=4, levels=2)
    path = save_checkpoint(tmp_path / "tiny.pt", network, _metadata())
    image, _ = _blob_image()
    result = segment_image(image, path, device="cpu", sampler="sliding_window", overlap=0.25)
    _assert_exact_grid(result.labelmap, image)
    assert result.stats["model"] == str(path)
    assert sitk.GetArrayFromImage(result.labelmap).max() <= 2


def test_bad_requests_are_refused_with_clear_errors():
    image, _ = _blob_image()
    with pytest.raises(InputError, match="needs a top-k model"):
        segment_image(image, _model(), sampler="topk", device="cpu")
    with pytest.raises(InputError, match="Unknown sampler"):
        segment_image(image, _model(), sampler="random", device="cpu")
    with pytest.raises(InputError, match="--k only applies"):
        segment_image(image, _model(), k=3, device="cpu")
    with pytest.raises(InputError, match="Overlap"):
        segment_image(image, _model(), overlap=1.0, device="cpu")
    with pytest.raises(InputError, match="constant"):
        segment_image(sitk.Image(8, 8, 8, sitk.sitkFloat32), _model(), device="cpu")
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        segment_image(image, _model(), device="cpu", cancel=cancel)


def test_topk_checkpoint_runs_its_own_sampler(tmp_path):
    from UNetSegmentLib.topk.model import TopKSettings, build_topk_model

    settings = TopKSettings(k=2, patch_size=[16, 16, 16], coarse_size=[16, 16, 16], scorer_channels=4,
                            refine_channels=4, global_kwargs={"features": 4, "levels": 2})
    metadata = _metadata(sampler="topk", topk=settings.to_dict(), target_spacing=[1.0, 1.0, 1.5])
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "topk.pt", build_topk_model(metadata), metadata)
    image, _ = _blob_image()
    result = segment_image(image, path, device="cpu")
    _assert_exact_grid(result.labelmap, image)
    assert result.stats["sampler"] == "topk" and result.stats["patches_evaluated"] == 2
    one = segment_image(image, path, device="cpu", sampler="topk", k=1)
    assert one.stats["patches_evaluated"] == 1
    every = segment_image(image, path, device="cpu", sampler="sliding_window")
    assert every.stats["patches_evaluated"] == every.stats["candidates"] > 2
    with pytest.raises(InputError, match="top-k model"):
        segment_image(image, path, device="cpu", sampler="whole")
