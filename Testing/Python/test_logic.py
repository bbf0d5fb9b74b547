"""UNetSegmentLogic (inference in a worker process) against slicer-core's real MRML scene, segmentation
nodes and .seg.nrrd storage."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from scene_helpers import LABELS, add_phantom_volume, make_tiny_checkpoint, oblique_ijk_to_ras, segment_names

from UNetSegmentLib.errors import Cancelled, InputError


def image_from_matrix(voxels: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """Independent oracle for the node -> image conversion: RAS to LPS negates x and y."""
    image = sitk.GetImageFromArray(voxels)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    flip = np.diag([-1.0, -1.0, 1.0])
    image.SetSpacing(spacing.tolist())
    image.SetDirection((flip @ ijk_to_ras[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((flip @ ijk_to_ras[:3, 3]).tolist())
    return image


def segment_arrays(segmentation_node, reference_volume) -> dict[str, np.ndarray]:
    segmentation = segmentation_node.GetSegmentation()
    arrays = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        name = segmentation.GetSegment(segment_id).GetName()
        arrays[name] = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_volume)
    return arrays


def test_volume_node_becomes_lps_image_with_same_voxels_and_points(module, scene):
    volume = add_phantom_volume(scene)
    image = module.UNetSegmentLogic.imageFromVolumeNode(volume)
    voxels = slicer.util.arrayFromVolume(volume)
    matrix = oblique_ijk_to_ras()
    for index in [(0, 0, 0), (17, 3, 11), (5, 21, 19)]:  # (i, j, k)
        ras = matrix @ np.array([*index, 1.0])
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)
        assert image[index] == voxels[index[2], index[1], index[0]]
    np.testing.assert_allclose(module.UNetSegmentLogic.ijkToRasFromImage(image), matrix, atol=1e-9)


def test_segmentation_node_matches_backend_run_on_equivalent_image(module, scene, tiny_checkpoint):
    from UNetSegmentLib.pipeline import segment_image

    volume = add_phantom_volume(scene)
    logic = module.UNetSegmentLogic()
    segmentation_node = logic.segment(volume, str(tiny_checkpoint), sampler="sliding_window", overlap=0.5)

    assert segmentation_node.IsA("vtkMRMLSegmentationNode") and segmentation_node.GetScene() is scene
    assert segment_names(segmentation_node) == ["liver", "spleen"]
    segmentation = segmentation_node.GetSegmentation()
    for value, name, color in LABELS[1:]:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        np.testing.assert_allclose(segment.GetColor(), color, atol=1e-6)

    expected = segment_image(image_from_matrix(slicer.util.arrayFromVolume(volume).copy(), oblique_ijk_to_ras()),
                             tiny_checkpoint, sampler="sliding_window", overlap=0.5, device="cpu")
    expected_labels = sitk.GetArrayFromImage(expected.labelmap)
    assert 0 < np.count_nonzero(expected_labels) < expected_labels.size, "oracle must be non-trivial"
    arrays = segment_arrays(segmentation_node, volume)
    for value, name, _ in LABELS[1:]:
        np.testing.assert_array_equal(arrays[name] > 0, expected_labels == value, err_msg=name)


def test_topk_model_with_chosen_k_matches_backend(module, scene, tmp_path):
    from UNetSegmentLib.pipeline import segment_image

    checkpoint = make_tiny_checkpoint(tmp_path / "topk.pt", sampler="topk")
    volume = add_phantom_volume(scene)
    segmentation_node = module.UNetSegmentLogic().segment(volume, str(checkpoint), sampler="topk", topK=3)
    expected = segment_image(image_from_matrix(slicer.util.arrayFromVolume(volume).copy(), oblique_ijk_to_ras()),
                             checkpoint, sampler="topk", k=3, device="cpu")
    expected_labels = sitk.GetArrayFromImage(expected.labelmap)
    assert expected.stats.get("k", 3) == 3 and np.count_nonzero(expected_labels) > 0
    arrays = segment_arrays(segmentation_node, volume)
    for value, name, _ in LABELS[1:]:
        np.testing.assert_array_equal(arrays[name] > 0, expected_labels == value, err_msg=name)


def test_seg_nrrd_written_by_storage_node_reads_back_identical(module, scene, tiny_checkpoint, tmp_path):
    volume = add_phantom_volume(scene)
    segmentation_node = module.UNetSegmentLogic().segment(volume, str(tiny_checkpoint))
    path = str(tmp_path / "result.seg.nrrd")
    writer = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(writer)
    writer.SetFileName(path)
    assert writer.WriteData(segmentation_node) == 1

    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(path)
    assert reader.ReadData(loaded) == 1

    assert segment_names(loaded) == segment_names(segmentation_node)
    for name in segment_names(loaded):
        original = segmentation_node.GetSegmentation().GetSegment(
            segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name))
        copy = loaded.GetSegmentation().GetSegment(loaded.GetSegmentation().GetSegmentIdBySegmentName(name))
        np.testing.assert_allclose(copy.GetColor(), original.GetColor(), atol=1e-6)
    before, after = segment_arrays(segmentation_node, volume), segment_arrays(loaded, volume)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def _existing_segmentation(scene, volume):
    """A user's segmentation with a hand-made 'liver' and an unrelated 'notes' segment."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = node.GetSegmentation()
    for name, color in (("liver", (1.0, 1.0, 0.0)), ("notes", (0.0, 1.0, 0.0))):
        segmentId = segmentation.AddEmptySegment("", name, color)
        mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
        mask[2:5, 3:6, 4:8] = 1 if name == "liver" else 0
        mask[10:12, 1:3, 1:3] = 1 if name == "notes" else mask[10:12, 1:3, 1:3]
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, segmentId, volume)
    return node


def test_existing_segments_are_kept_unless_replace_is_chosen_and_change_is_undoable(module, scene,
                                                                                      tiny_checkpoint):
    volume = add_phantom_volume(scene)
    manual = _existing_segmentation(scene, volume)
    manual_arrays = segment_arrays(manual, volume)
    logic = module.UNetSegmentLogic()

    logic.segment(volume, str(tiny_checkpoint), outputSegmentation=manual, replaceExisting=False)
    assert segment_names(manual) == ["liver", "notes", "liver (UNetSegment 2)", "spleen"]
    kept = segment_arrays(manual, volume)
    for name in ("liver", "notes"):
        np.testing.assert_array_equal(kept[name], manual_arrays[name], err_msg=name)
    predicted_liver = kept["liver (UNetSegment 2)"]

    scene.Undo()  # one step back: the user's segmentation exactly as it was
    assert segment_names(manual) == ["liver", "notes"]
    undone = segment_arrays(manual, volume)
    for name in ("liver", "notes"):
        np.testing.assert_array_equal(undone[name], manual_arrays[name], err_msg=name)

    liver_id = manual.GetSegmentation().GetSegmentIdBySegmentName("liver")
    logic.segment(volume, str(tiny_checkpoint), outputSegmentation=manual, replaceExisting=True)
    assert segment_names(manual) == ["notes", "liver", "spleen"]
    assert manual.GetSegmentation().GetSegmentIdBySegmentName("liver") == liver_id  # editor references stay valid
    replaced = segment_arrays(manual, volume)
    np.testing.assert_array_equal(replaced["liver"], predicted_liver)
    np.testing.assert_array_equal(replaced["notes"], manual_arrays["notes"])


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def test_uncertainty_volume_is_added_on_the_input_grid_and_undo_removes_all(module, scene, tiny_checkpoint):
    volume = add_phantom_volume(scene)
    before = node_ids(scene)
    module.UNetSegmentLogic().segment(volume, str(tiny_checkpoint), addUncertaintyVolume=True)
    uncertainty = slicer.util.getFirstNodeByName("phantom uncertainty")
    assert uncertainty is not None and uncertainty.IsA("vtkMRMLScalarVolumeNode")
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(uncertainty)),
                               oblique_ijk_to_ras(), atol=1e-6)
    values = slicer.util.arrayFromVolume(uncertainty)
    assert values.shape == slicer.util.arrayFromVolume(volume).shape and np.isfinite(values).all()
    assert len(node_ids(scene)) > len(before)

    scene.Undo()  # one step removes the new segmentation and the uncertainty volume
    assert node_ids(scene) == before


def _ijk_to_ras(node):
    import vtk
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_cancel_leaves_scene_unchanged(module, scene, tiny_checkpoint, worker_temp):
    import os
    import time

    volume = add_phantom_volume(scene, shape=(48, 48, 48))
    manual = _existing_segmentation(scene, volume)
    manual_arrays = segment_arrays(manual, volume)
    ids_before = node_ids(scene)
    manual_mtime = manual.GetSegmentation().GetMTime()

    job = module.UNetSegmentLogic().startSegmentation(volume, str(tiny_checkpoint), sampler="sliding_window",
                                                      overlap=0.75)
    pid = job.pid
    assert list(worker_temp.iterdir()), "the input is written to the job's temporary folder"
    started = time.monotonic()
    job.cancel()  # terminate, then kill after the grace period: blocks until the process is gone
    assert time.monotonic() - started < 5.0 and job.worker.process.returncode is not None
    assert not os.path.exists(f"/proc/{pid}")
    assert job.wait(timeout=1)
    assert isinstance(job.error, Cancelled) and job.result is None
    assert list(worker_temp.iterdir()) == []
    assert node_ids(scene) == ids_before
    assert manual.GetSegmentation().GetMTime() == manual_mtime
    assert segment_names(manual) == ["liver", "notes"]
    for name, array in segment_arrays(manual, volume).items():
        np.testing.assert_array_equal(array, manual_arrays[name])


def test_bad_inputs_raise_clear_errors(module, scene, tmp_path):
    logic = module.UNetSegmentLogic()
    volume = add_phantom_volume(scene)
    with pytest.raises(InputError, match="No model is selected"):
        logic.startSegmentation(volume, "")
    with pytest.raises(InputError, match="no voxels"):
        logic.startSegmentation(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), "model.pt")
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a checkpoint")
    job = logic.startSegmentation(volume, str(not_a_model))
    job.wait(timeout=60)
    assert job.error is not None and "Fix:" in str(job.error)
