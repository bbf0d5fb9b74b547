"""Issue 17 through the module's Logic with slicer-core's real MRML scene: corrected segmentations become
training cases (segments mapped by name, bad input refused), fine-tuning runs in a worker process, and
the end-to-end loop with the shipped real MRI model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from UNetSegmentLib.errors import GeometryError, InputError
from UNetSegmentLib.user_dataset import DuplicateCaseError

REPOSITORY = Path(__file__).resolve().parents[2]
DATA = REPOSITORY.parent / "shared" / "data" / "Task04_Hippocampus"
SHIPPED_MR = Path(os.environ.get("UNETSEGMENT_MODELS_DIR") or REPOSITORY / "Resources" / "Models") / "hippocampus_mr"
# never trained on by any fold of the shipped model (bench/train_hippocampus.py HOLDOUT_CASES)
HOLDOUT_CASES = ("hippocampus_008", "hippocampus_074", "hippocampus_165", "hippocampus_276", "hippocampus_340")
NAMES = ("anterior hippocampus", "posterior hippocampus")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/Task04_Hippocampus is not available")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hippocampus_checkpoint(path: Path) -> Path:
    """An untrained small unet with the shipped model's label names (enough for the mechanics)."""
    import torch

    from UNetSegmentLib.checkpoint import build_model, save_checkpoint
    from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization

    torch.manual_seed(0)
    metadata = ModelMetadata(
        architecture="unet", architecture_kwargs={"features": 4, "levels": 3}, spatial_dims=3, in_channels=1,
        labels=[LabelInfo(0, "background", (0.0, 0.0, 0.0)), LabelInfo(1, NAMES[0], (0.86, 0.85, 0.08)),
                LabelInfo(2, NAMES[1], (0.25, 0.63, 0.9))],
        patch_size=[32, 32, 32], target_spacing=[1.0, 1.0, 1.0], normalization=Normalization("zscore"),
        training={"validation_dice": None, "batch_size": 2}, validation_dice={NAMES[0]: 0.1, NAMES[1]: 0.1})
    return save_checkpoint(path, build_model(metadata), metadata)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return hippocampus_checkpoint(tmp_path_factory.mktemp("models") / "hippo_tiny.pt")


def volume_node(scene, case_id: str):
    """A real MRI case as a scalar volume node (geometry from the file, LPS -> RAS)."""
    from UNetSegmentLib.io import read_image

    image = read_image(DATA / "imagesTr" / f"{case_id}_0000.nii.gz")
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", case_id)
    matrix = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0])
    matrix[:3, :3] = flip @ np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = flip @ np.array(image.GetOrigin())
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(volume, sitk.GetArrayFromImage(image))
    volume.CreateDefaultDisplayNodes()
    return volume


def reference_array(case_id: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labelsTr" / f"{case_id}.nii.gz")))


def paint_reference(segmentation_node, volume, case_id: str, names=NAMES) -> None:
    """The scripted 'correction': every segment's voxels become the reference label's (Segment Editor's job)."""
    reference = reference_array(case_id)
    segmentation = segmentation_node.GetSegmentation()
    for value, name in enumerate(names, start=1):
        segment_id = segmentation.GetSegmentIdBySegmentName(name) or segmentation.AddEmptySegment("", name)
        slicer.util.updateSegmentBinaryLabelmapFromArray((reference == value).astype(np.uint8), segmentation_node,
                                                         segment_id, volume)


def new_segmentation(scene, volume):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} segmentation")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def test_a_corrected_segmentation_becomes_a_case_with_the_models_label_values(module, scene, small_model,
                                                                              tmp_path):
    logic = module.UNetSegmentLogic()
    volume = volume_node(scene, "hippocampus_001")
    segmentation = new_segmentation(scene, volume)
    paint_reference(segmentation, volume, "hippocampus_001", names=NAMES[::-1])  # segment order != label order
    # the segment named "posterior hippocampus" holds reference value 1 here: remap it back by name
    segmentation.GetSegmentation().GetNthSegment(0).SetName("Anterior_Hippocampus")
    segmentation.GetSegmentation().GetNthSegment(1).SetName("posterior hippocampus")
    folder = tmp_path / "cases"
    added = logic.addToTrainingSet(volume, segmentation, str(small_model), str(folder))
    assert added.case_id == "hippocampus_001"
    saved = sitk.ReadImage(str(added.label_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(saved), reference_array("hippocampus_001"))
    source = sitk.ReadImage(str(DATA / "imagesTr" / "hippocampus_001_0000.nii.gz"))
    np.testing.assert_allclose(saved.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(saved.GetDirection(), source.GetDirection(), atol=1e-6)

    with pytest.raises(DuplicateCaseError) as raised:  # the panel asks before replacing
        logic.addToTrainingSet(volume, segmentation, str(small_model), str(folder))
    assert raised.value.case_id == "hippocampus_001"
    again = logic.addToTrainingSet(volume, segmentation, str(small_model), str(folder), replace=True)
    assert again.replaced == "hippocampus_001" and again.cases_in_set == 1


def test_bad_corrections_are_refused_with_nothing_written(module, scene, small_model, tmp_path):
    logic = module.UNetSegmentLogic()
    folder = tmp_path / "cases"
    volume = volume_node(scene, "hippocampus_003")
    unknown = new_segmentation(scene, volume)
    paint_reference(unknown, volume, "hippocampus_003", names=(NAMES[0], "amygdala"))
    with pytest.raises(InputError, match="'amygdala'"):
        logic.addToTrainingSet(volume, unknown, str(small_model), str(folder))
    empty = new_segmentation(scene, volume)
    empty.GetSegmentation().AddEmptySegment("", NAMES[0])
    with pytest.raises(InputError, match="empty"):
        logic.addToTrainingSet(volume, empty, str(small_model), str(folder))
    other = volume_node(scene, "hippocampus_004")  # another size than hippocampus_003
    elsewhere = new_segmentation(scene, other)
    paint_reference(elsewhere, other, "hippocampus_004")
    with pytest.raises(GeometryError, match="hippocampus_004"):
        logic.addToTrainingSet(volume, elsewhere, str(small_model), str(folder))
    assert not folder.exists()


def test_fine_tuning_runs_in_a_worker_and_keeps_the_parent(module, scene, small_model, tmp_path, worker_temp):
    logic = module.UNetSegmentLogic()
    folder = tmp_path / "cases"
    for case_id in ("hippocampus_001", "hippocampus_003"):
        volume = volume_node(scene, case_id)
        segmentation = new_segmentation(scene, volume)
        paint_reference(segmentation, volume, case_id)
        logic.addToTrainingSet(volume, segmentation, str(small_model), str(folder))
    before = sha256(small_model)
    job = logic.startFineTuning(str(small_model), str(folder), str(tmp_path / "tuned.pt"), budgetS=300,
                                device="cpu", maxIterations=2)
    job.wait(600)
    assert job.error is None, job.error
    result = job.result
    assert result["output"] == str(tmp_path / "tuned.pt") and Path(result["output"]).is_file()
    assert result["scheme"] == "leave-one-out" and sorted(result["tuned_on"]) == ["hippocampus_001",
                                                                                 "hippocampus_003"]
    assert job.loss is not None and job.progress is not None
    assert sha256(small_model) == before
    expected = result["output"] if result["improved"] else str(small_model)
    assert logic.modelAfterFineTuning(result, str(small_model)) == expected
    assert logic.modelAfterFineTuning(dict(result, improved=False), str(small_model)) == str(small_model)
    assert not list(worker_temp.glob("unetsegment-job-*"))  # the job's temporary folder is gone


@pytest.fixture()
def panel(module, scene, small_model, tmp_path, monkeypatch, worker_temp):
    """The module panel with the small model as the only (user) model."""
    import slicer_adapter

    shipped, user = tmp_path / "shipped", tmp_path / "user models"
    shipped.mkdir()
    user.mkdir()
    shutil.copy(small_model, user / small_model.name)
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(shipped))
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(user))
    widget = slicer_adapter.createPanel()
    yield widget
    slicer_adapter.closePanel(widget)


def test_panel_adds_the_reviewed_correction_and_asks_before_replacing(panel, scene, tmp_path):
    volume = volume_node(scene, "hippocampus_001")
    segmentation = new_segmentation(scene, volume)
    paint_reference(segmentation, volume, "hippocampus_001")
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.outputSegmentationSelector.setCurrentNode(segmentation)
    assert panel.logic.getParameterNode().modelPath.endswith("hippo_tiny.pt")
    assert panel.trainingSetFolder().endswith("training-cases/hippo_tiny")  # the default: one set per model
    panel.ui.trainingSetLineEdit.setText(str(tmp_path / "my cases"))

    panel.ui.addToTrainingSetButton.click()
    assert "Added case 'hippocampus_001'" in panel.ui.fineTuneStatusLabel.text
    questions = []
    assert panel.onAddToTrainingSet(confirm=lambda text: questions.append(text) or False) is None
    assert "already case 'hippocampus_001'" in questions[0] and "kept" in panel.ui.fineTuneStatusLabel.text
    added = panel.onAddToTrainingSet(confirm=lambda text: True)
    assert added.replaced == "hippocampus_001" and "replacing" in panel.ui.fineTuneStatusLabel.text

    segmentation.GetSegmentation().GetNthSegment(0).SetName("amygdala")
    panel.ui.addToTrainingSetButton.click()
    assert "'amygdala'" in panel.ui.fineTuneStatusLabel.text and "Fix:" in panel.ui.fineTuneStatusLabel.text


class FinishedJob:
    """A fine-tuning job that has ended (the worker itself is tested above): what the panel reads."""

    def __init__(self, result=None, error=None):
        self.result, self.error, self.progress, self.loss = result, error, None, None
        self.cancelled = False

    def poll(self):
        return True

    def cancel(self):
        self.cancelled = True


@pytest.mark.parametrize("improved", [True, False])
def test_panel_selects_the_tuned_model_only_if_it_is_not_worse(panel, small_model, tmp_path, improved):
    from UNetSegmentLib.model_store import user_models_dir

    parent_path = panel.logic.getParameterNode().modelPath
    tuned = user_models_dir() / "hippo_tiny-ft-20261126-230000.pt"
    shutil.copy(small_model, tuned)
    message = "not worse" if improved else "WORSE than 'hippo_tiny'"
    panel._fineTuneJob = (FinishedJob({"output": str(tuned), "improved": improved, "message": message}), parent_path)
    panel.pollFineTune()
    selected = panel.logic.getParameterNode().modelPath
    assert selected == (str(tuned) if improved else parent_path)
    assert message in panel.ui.fineTuneStatusLabel.text and panel.ui.fineTuneButton.text == "Fine-tune"
    assert panel._fineTuneJob is None


@pytest.mark.skipif(not (SHIPPED_MR / "fold_0.pt").is_file(), reason="the shipped MRI model is not trained yet")
def test_end_to_end_with_the_shipped_mri_model(module, scene, tmp_path, worker_temp):
    """Segment never-trained-on cases with the shipped model, replace the prediction with the reference
    (the clinician's correction), add them, fine-tune briefly, and compare on the held-out case."""
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata

    logic = module.UNetSegmentLogic()
    parent_files = {path: sha256(path) for path in SHIPPED_MR.glob("*.pt")}
    folder = tmp_path / "my hippocampus cases"
    for case_id in HOLDOUT_CASES[:4]:
        volume = volume_node(scene, case_id)
        segmentation = logic.segment(volume, str(SHIPPED_MR), sampler="sliding_window")
        paint_reference(segmentation, volume, case_id)  # the names are the model's own segment names
        logic.addToTrainingSet(volume, segmentation, str(SHIPPED_MR), str(folder))
    output = tmp_path / "hippocampus_mr-ft.pt"
    result = logic.fineTune(str(SHIPPED_MR), str(folder), str(output), budgetS=60, device="cpu", maxIterations=4,
                            timeout=600)
    # Measured (2026-11-28): 0.8770 -> 0.8770 on hippocampus_165 after 4 RAdam steps with the 15000-iteration
    # folds 0-1; 0.8943 -> 0.8943 with the 7500-iteration folds 0-2; 0.8806 -> 0.8806 with the 4500-iteration folds; 0.8956 -> 0.8956 with the 3000-iteration folds, with and without the shipped rehearsal set
    # (Adam: -> 0.8858). Not lower here, but in-distribution tuning does not reliably
    # give "not lower" (docs/finetune.md: 30 steps lose 0.0024 Dice on 15 cases with rehearsal, 0.0033
    # without, 0.021 with Adam). What holds: the verdict follows the numbers, the panel keeps the parent
    # when the tuned model is worse, and a short tune on correct cases costs at most a little Dice.
    print(f"fine-tuning end to end: held-out {result['held_out']} mean Dice {result['mean_before']:.4f} -> "
          f"{result['mean_after']:.4f} after {result['iterations']} iterations")
    assert result["mean_after"] >= result["mean_before"] - 0.005, result  # float noise across machines, no more
    assert result["improved"] == (result["mean_after"] >= result["mean_before"])
    expected = str(output) if result["improved"] else str(SHIPPED_MR)
    assert logic.modelAfterFineTuning(result, str(SHIPPED_MR)) == expected
    assert ("WORSE" in result["message"]) != result["improved"]
    card = read_checkpoint_metadata(output).training["fine_tuning"]
    assert card["rehearsal"]["sha256"] == sha256(SHIPPED_MR / "fold_0.rehearsal.npz")  # the shipped set was used
    assert card["rehearsal"]["share"] == 0.5 and card["rehearsal"]["cases"] == 24
    assert card["parent"]["path"] == str(SHIPPED_MR.resolve())
    assert card["parent"]["sha256"] == parent_files[SHIPPED_MR / "fold_0.pt"]
    assert card["parent"]["validation_dice"] == read_checkpoint_metadata(SHIPPED_MR / "fold_0.pt").validation_dice
    assert sorted(card["tuned_on"] + card["held_out"]) == sorted(HOLDOUT_CASES[:4])
    assert {path: sha256(path) for path in SHIPPED_MR.glob("*.pt")} == parent_files  # byte-identical
    assert json.loads((folder / "dataset.json").read_text())["unetsegment"]["model"] == "hippocampus_mr"
