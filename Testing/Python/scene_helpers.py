"""Scene and checkpoint helpers shared by the Slicer module tests (kept out of conftest.py so
that test files import them by a unique module name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer


LABELS = [(0, "background", (0.0, 0.0, 0.0)), (1, "liver", (0.9, 0.4, 0.3)), (2, "spleen", (0.2, 0.5, 0.9))]


def make_tiny_checkpoint(path: Path, seed: int = 0, patch_size=(16, 16, 16), sampler="sliding_window") -> Path:
    """A real, untrained but deterministic 3-label U-Net (features 4, levels 3): fast to run."""
    import torch
    from UNetSegmentLib.checkpoint import build_model, save_checkpoint
    from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization

    torch.manual_seed(seed)
    kwargs = {"features": 4, "levels": 3}
    metadata = ModelMetadata(
        architecture="unet", architecture_kwargs=kwargs, spatial_dims=3, in_channels=1,
        labels=[LabelInfo(value, name, color) for value, name, color in LABELS],
        patch_size=list(patch_size), target_spacing=[1.0, 1.0, 1.0],
        normalization=Normalization("zscore"), sampler=sampler,
        topk={"k": 4, "patch_size": list(patch_size), "coarse_size": [16, 16, 16],
              "global_kwargs": {"features": 4, "levels": 2}} if sampler == "topk" else None,
        description="tiny test model")
    network = build_model(metadata)
    with torch.no_grad():  # larger weights than the default init, so that every label occurs
        for parameter in network.parameters():
            parameter.mul_(3.0)
    return save_checkpoint(path, network, metadata)


def oblique_ijk_to_ras() -> np.ndarray:
    """Axes permuted, one flipped, a small rotation and anisotropic spacing: nothing is identity."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]])
    permuted = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ permuted @ np.diag([1.2, 0.9, 1.5])
    matrix[:3, 3] = [12.5, -40.0, 7.25]
    return matrix


def add_phantom_volume(scene, shape=(20, 22, 18), name="phantom", ijk_to_ras=None):
    """A bright ellipsoid and a smaller dark-ish blob on a noisy background, as a scalar volume node."""
    rng = np.random.default_rng(1)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij")
    voxels = rng.normal(0.0, 10.0, shape)
    voxels[(k / 0.7) ** 2 + (j / 0.5) ** 2 + (i / 0.6) ** 2 < 1] += 200.0
    voxels[(k - 0.5) ** 2 + (j + 0.5) ** 2 + (i - 0.4) ** 2 < 0.08] += 100.0
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = oblique_ijk_to_ras() if ijk_to_ras is None else ijk_to_ras
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(volume, voxels.astype(np.float32))
    volume.CreateDefaultDisplayNodes()
    return volume


def segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
