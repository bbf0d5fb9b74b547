"""The panel with real Qt (offscreen) on a real MRML scene: pick a model, Segment, Cancel, errors."""

from __future__ import annotations

import pytest
import torch
import slicer
import slicer_adapter
from scene_helpers import add_phantom_volume, make_tiny_checkpoint, segment_names


@pytest.fixture()
def model_dirs(tmp_path, monkeypatch):
    """Empty shipped and user model folders, so the panel lists only what the test adds."""
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(shipped))
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(user))
    return shipped, user


@pytest.fixture()
def panel(module, scene, model_dirs):
    widget = module.UNetSegmentWidget()
    widget.setup()
    yield widget
    widget.cleanup()
    for selector in (widget.ui.inputVolumeSelector, widget.ui.outputSegmentationSelector):
        selector.setMRMLScene(None)


def node_ids(scene):
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def wait_until_idle(panel, timeout_s=120):
    assert slicer_adapter.processEventsUntil(lambda: not panel.isRunning, timeout_s), "segmentation did not end"


def test_pick_model_click_segment_finds_segmentation(panel, scene, tiny_checkpoint):
    volume = add_phantom_volume(scene)
    assert panel.addModel(str(tiny_checkpoint)) is not None
    assert panel.ui.modelSelector.count() == 1
    details = panel.ui.modelDetailsLabel.text()
    assert "unet" in details and "liver, spleen" in details
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    parameters = panel.logic.getParameterNode()
    assert parameters.inputVolume is volume
    assert parameters.modelPath.endswith("tiny_unet.pt")

    panel.ui.segmentButton.click()
    assert panel.isRunning and panel.ui.segmentButton.text() == "Cancel"
    wait_until_idle(panel)

    segmentations = [node for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")]
    assert len(segmentations) == 1
    assert segment_names(segmentations[0]) == ["liver", "spleen"]
    assert parameters.outputSegmentation is segmentations[0]
    assert panel.ui.segmentButton.text() == "Segment"
    assert panel.ui.statusLabel.text().startswith("Done in"), panel.ui.statusLabel.text()
    assert "last run took" in panel.ui.modelDetailsLabel.text()


def test_cancel_mid_run_leaves_scene_unchanged(panel, scene, tiny_checkpoint):
    volume = add_phantom_volume(scene, shape=(48, 48, 48))
    panel.addModel(str(tiny_checkpoint))
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.overlapSpinBox.setValue(0.75)  # many patches: a run long enough to cancel
    before = node_ids(scene)

    panel.ui.segmentButton.click()
    assert slicer_adapter.processEventsUntil(lambda: panel.ui.progressBar.value() > 0, 120)
    assert not panel.ui.progressBar.isHidden()
    assert f"{panel.ui.progressBar.value()}/{panel.ui.progressBar.maximum()}" in panel.ui.progressBar.format()
    assert panel.isRunning, "the run ended before it could be cancelled"
    panel.ui.segmentButton.click()  # now labelled Cancel
    wait_until_idle(panel)

    assert panel.ui.statusLabel.text().startswith("Cancelled"), panel.ui.statusLabel.text()
    assert node_ids(scene) == before
    assert not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
    assert panel.ui.segmentButton.text() == "Segment"


def test_bad_model_shows_error_text_not_traceback(panel, scene, model_dirs, tmp_path):
    volume = add_phantom_volume(scene)
    not_ours = tmp_path / "weights.pt"
    not_ours.write_bytes(b"\x00" * 64)
    assert panel.addModel(str(not_ours)) is None
    status = panel.ui.statusLabel.text()
    assert "weights.pt" in status and "Fix:" in status and "Traceback" not in status
    assert panel.ui.modelSelector.count() == 0

    _, user = model_dirs  # a broken file already in the user folder is listed, marked, and refused
    user.mkdir(exist_ok=True)
    (user / "broken.pt").write_bytes(b"not a checkpoint")
    panel.refreshModels()
    assert "invalid" in panel.ui.modelSelector.currentText()
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    status = panel.ui.statusLabel.text()
    assert "broken.pt" in status and "Fix:" in status and "Traceback" not in status
    assert not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")


def test_settings_persist_in_parameter_node(module, panel, scene, tmp_path):
    topk_model = make_tiny_checkpoint(tmp_path / "topk_unet.pt", sampler="topk")
    panel.addModel(str(topk_model))
    sampler = panel.ui.samplerSelector
    sampler.setCurrentIndex(sampler.findData("topk"))  # enabled: the model was trained for top-k
    panel.ui.deviceSelector.setCurrentIndex(panel.ui.deviceSelector.findData("cpu"))
    panel.ui.topKSpinBox.setValue(7)
    panel.ui.replaceExistingCheckBox.setChecked(True)
    parameters = panel.logic.getParameterNode()
    assert (parameters.sampler, parameters.device, parameters.topK, parameters.replaceExistingSegments) == \
        ("topk", "cpu", 7, True)
    assert panel.ui.topKSpinBox.isEnabled() and not panel.ui.overlapSpinBox.isEnabled()

    again = module.UNetSegmentWidget()  # a new panel on the same scene shows the stored settings
    again.setup()
    try:
        assert again.ui.samplerSelector.currentData() == "topk"
        assert again.ui.deviceSelector.currentData() == "cpu"
        assert again.ui.topKSpinBox.value() == 7 and again.ui.replaceExistingCheckBox.isChecked()
    finally:
        again.cleanup()
        for selector in (again.ui.inputVolumeSelector, again.ui.outputSegmentationSelector):
            selector.setMRMLScene(None)


def test_top_k_is_disabled_for_sliding_window_models(panel, scene, tiny_checkpoint):
    panel.addModel(str(tiny_checkpoint))
    item = panel.ui.samplerSelector.model().item(panel.ui.samplerSelector.findData("topk"))
    assert not item.isEnabled()
    assert panel.ui.samplerSelector.currentData() != "topk"


def test_missing_torch_is_offered_through_pytorch_utils_with_confirmation(module, panel, scene, tiny_checkpoint,
                                                                           monkeypatch):
    """Stands in for Slicer's PyTorch Utils module only to record how the panel calls it."""
    import sys
    import types

    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False):
            calls.append(askConfirmation)
            return False  # the user declined

    volume = add_phantom_volume(scene)
    panel.addModel(str(tiny_checkpoint))
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    monkeypatch.setattr(module, "isTorchInstalled", lambda: False)

    panel.ui.segmentButton.click()  # no PyTorch extension either: say what to install
    assert "PyTorch" in panel.ui.statusLabel.text() and "Extensions Manager" in panel.ui.statusLabel.text()
    assert not panel.isRunning

    monkeypatch.setattr(slicer.modules, "pytorchutils", types.SimpleNamespace(), raising=False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    panel.ui.segmentButton.click()
    assert calls == [True], "installation must ask the user first"
    assert not panel.isRunning and "not installed" in panel.ui.statusLabel.text()
    assert not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")


def test_out_of_memory_fallback_is_reported_in_the_status_line(panel, scene, tiny_checkpoint, monkeypatch):
    """The first inference plan runs out of memory (as a full GPU does); the panel says what it did instead."""
    from UNetSegmentLib.inference import sliding_window

    real_execute, attempts = sliding_window._execute, []

    def first_attempt_runs_out_of_memory(network, volumes, options, plan, *args, **kwargs):
        attempts.append(plan.batch_size)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return real_execute(network, volumes, options, plan, *args, **kwargs)

    monkeypatch.setattr(sliding_window, "_execute", first_attempt_runs_out_of_memory)
    panel.ui.inputVolumeSelector.setCurrentNode(add_phantom_volume(scene))
    panel.addModel(str(tiny_checkpoint))
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    status = panel.ui.statusLabel.text()
    assert status.startswith("Done in") and "Note: " in status and "ran out of memory" in status, status
    assert len(attempts) == 2 and len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1
