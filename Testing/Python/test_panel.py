"""The panel on Slicer's own base classes (slicer-upstream), real Qt offscreen, a real MRML scene, and
an event loop that holds the GIL between ticks like PythonQt: pick a model, Segment, Cancel, errors."""

from __future__ import annotations

import os
import sys
import time

import pytest
import slicer
import vtk
import slicer_adapter
from scene_helpers import add_phantom_volume, make_tiny_checkpoint, segment_names

from UNetSegmentLib.errors import Cancelled


@pytest.fixture()
def model_dirs(tmp_path, monkeypatch):
    """Empty shipped and user model folders, so the panel lists only what the test adds."""
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(shipped))
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(user))
    return shipped, user


@pytest.fixture()
def panel(module, scene, model_dirs, worker_temp):
    widget = slicer_adapter.createPanel()
    yield widget
    slicer_adapter.closePanel(widget)


def node_ids(scene):
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def wait_until_idle(panel, timeout_s=180):
    assert slicer_adapter.processEventsUntil(lambda: not panel.isRunning, timeout_s), "segmentation did not end"


def process_gone(pid):
    return not os.path.exists(f"/proc/{pid}") if sys.platform.startswith("linux") else True


def test_panel_runs_on_slicer_upstream_base_classes(module, panel):
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget

    upstream = slicer_adapter.upstreamDir().resolve()
    assert os.path.realpath(sys.modules[ScriptedLoadableModuleWidget.__module__].__file__).startswith(str(upstream))
    assert os.path.realpath(slicer.parameterNodeWrapper.__file__).startswith(str(upstream))
    assert isinstance(panel, ScriptedLoadableModuleWidget)
    assert slicer.selfTests["UNetSegment"].__self__ is slicer.modules.unetsegment.instance
    assert slicer.modules.unetsegment.dependencies == ["Segmentations"]
    parameters = panel.logic.getParameterNode()
    with pytest.raises(ValueError):  # the real wrapper validates
        parameters.sampler = "not-a-sampler"
    with pytest.raises(ValueError):
        parameters.overlap = 0.95


def test_pick_model_click_segment_finds_segmentation(panel, scene, tiny_checkpoint, worker_temp):
    volume = add_phantom_volume(scene)
    assert panel.addModel(str(tiny_checkpoint)) is not None
    assert panel.ui.modelSelector.count == 1
    details = panel.ui.modelDetailsLabel.text
    assert "unet" in details and "liver, spleen" in details
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    parameters = panel.logic.getParameterNode()
    assert parameters.inputVolume is volume
    assert parameters.modelPath.endswith("tiny_unet.pt")

    panel.ui.segmentButton.click()
    assert panel.isRunning and panel.ui.segmentButton.text == "Cancel"
    wait_until_idle(panel)

    segmentations = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
    assert len(segmentations) == 1
    assert segment_names(segmentations[0]) == ["liver", "spleen"]
    assert parameters.outputSegmentation is segmentations[0]
    assert panel.ui.segmentButton.text == "Segment"
    assert panel.ui.statusLabel.text.startswith("Done in"), panel.ui.statusLabel.text
    assert "last run took" in panel.ui.modelDetailsLabel.text
    assert list(worker_temp.iterdir()) == []


def _start_long_run(panel, scene, tiny_checkpoint):
    volume = add_phantom_volume(scene, shape=(64, 64, 64))
    panel.addModel(str(tiny_checkpoint))
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.overlapSpinBox.value = 0.85  # many patches: a run long enough to interrupt
    before = node_ids(scene)
    panel.ui.segmentButton.click()
    job = panel._job
    assert slicer_adapter.processEventsUntil(lambda: panel.ui.progressBar.value > 0 or not panel.isRunning, 120)
    assert panel.isRunning, f"the run ended before it could be interrupted: {panel.ui.statusLabel.text}"
    return job, before


def test_cancel_mid_run_stops_worker_and_leaves_nothing(panel, scene, tiny_checkpoint, worker_temp):
    job, before = _start_long_run(panel, scene, tiny_checkpoint)
    assert f"{panel.ui.progressBar.value}/{panel.ui.progressBar.maximum}" in panel.ui.progressBar.format
    assert list(worker_temp.iterdir()), "the job's temporary folder should exist while it runs"
    pid = job.pid
    clicked = time.monotonic()
    panel.ui.segmentButton.click()  # now labelled Cancel
    assert slicer_adapter.processEventsUntil(lambda: process_gone(pid), 5.0), "worker still alive after 5 s"
    assert time.monotonic() - clicked < 5.0 and job.worker.process.returncode is not None

    assert isinstance(job.error, Cancelled)
    assert panel.ui.statusLabel.text.startswith("Cancelled"), panel.ui.statusLabel.text
    assert node_ids(scene) == before and not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
    assert panel.ui.segmentButton.text == "Segment"
    assert list(worker_temp.iterdir()) == []


def test_worker_crash_gives_status_not_exception(panel, scene, tiny_checkpoint, worker_temp):
    import signal

    job, before = _start_long_run(panel, scene, tiny_checkpoint)
    pid = job.pid
    os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    wait_until_idle(panel, 30)
    assert process_gone(pid)
    status = panel.ui.statusLabel.text
    assert "stopped unexpectedly" in status and "SIGKILL" in status and "Fix:" in status, status
    assert node_ids(scene) == before and not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
    assert list(worker_temp.iterdir()) == []


def test_scene_close_during_run_cancels_and_pushes_nothing(panel, scene, tiny_checkpoint, worker_temp):
    job, _ = _start_long_run(panel, scene, tiny_checkpoint)
    pid = job.pid
    panel.parent.exit()  # the panel is not shown when the scene closes
    scene.Clear(0)
    assert slicer_adapter.processEventsUntil(lambda: process_gone(pid), 5.0)
    assert not panel.isRunning and isinstance(job.error, Cancelled)
    slicer_adapter.processEventsUntil(lambda: False, 0.5)  # timers keep running: nothing may arrive
    assert not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
    assert "scene was closed" in panel.ui.statusLabel.text
    assert list(worker_temp.iterdir()) == []


def test_bad_model_shows_error_text_not_traceback(panel, scene, model_dirs, tmp_path):
    volume = add_phantom_volume(scene)
    not_ours = tmp_path / "weights.pt"
    not_ours.write_bytes(b"\x00" * 64)
    assert panel.addModel(str(not_ours)) is None
    status = panel.ui.statusLabel.text
    assert "weights.pt" in status and "Fix:" in status and "Traceback" not in status
    assert panel.ui.modelSelector.count == 0

    _, user = model_dirs  # a broken file already in the user folder is listed, marked, and refused
    user.mkdir(exist_ok=True)
    (user / "broken.pt").write_bytes(b"not a checkpoint")
    panel.refreshModels()
    assert "invalid" in panel.ui.modelSelector.currentText
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    status = panel.ui.statusLabel.text
    assert "broken.pt" in status and "Fix:" in status and "Traceback" not in status
    assert not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")


def test_settings_persist_and_combos_follow_the_parameter_node(module, panel, scene, tmp_path, tiny_checkpoint):
    topk_model = make_tiny_checkpoint(tmp_path / "topk_unet.pt", sampler="topk")
    panel.addModel(str(topk_model))
    sampler = panel.ui.samplerSelector
    sampler.setCurrentIndex(sampler.findData("topk"))  # enabled: the model was trained for top-k
    panel.ui.deviceSelector.setCurrentIndex(panel.ui.deviceSelector.findData("cpu"))
    panel.ui.topKSpinBox.value = 7
    panel.ui.replaceExistingCheckBox.checked = True
    parameters = panel.logic.getParameterNode()
    assert (parameters.sampler, parameters.device, parameters.topK, parameters.replaceExistingSegments) == \
        ("topk", "cpu", 7, True)
    assert panel.ui.topKSpinBox.enabled and not panel.ui.overlapSpinBox.enabled

    again = slicer_adapter.createPanel()  # a new panel on the same scene shows the stored settings
    try:
        assert again.ui.samplerSelector.currentData == "topk"
        assert again.ui.deviceSelector.currentData == "cpu"
        assert again.ui.topKSpinBox.value == 7 and again.ui.replaceExistingCheckBox.checked
        # a script (or a loaded scene) changes the parameter node: the combo boxes follow
        panel.addModel(str(tiny_checkpoint))
        parameters.sampler = "whole"
        parameters.device = "auto"
        missing = str(topk_model.parent / "elsewhere.pt")
        parameters.modelPath = missing  # not listed: kept as chosen, nothing selected in the list
        for shown in (again, panel):
            assert shown.ui.samplerSelector.currentData == "whole"
            assert shown.ui.deviceSelector.currentData == "auto"
            assert shown.ui.modelSelector.currentIndex == -1 and "not in the list" in shown.ui.modelDetailsLabel.text
        assert parameters.modelPath == missing
        parameters.modelPath = next(str(e.path) for e in panel._modelEntries if e.name == "tiny_unet")
        assert panel.ui.modelSelector.currentData == parameters.modelPath
    finally:
        slicer_adapter.closePanel(again)


def test_top_k_is_disabled_for_sliding_window_models(panel, scene, tiny_checkpoint):
    panel.addModel(str(tiny_checkpoint))
    item = panel.ui.samplerSelector.model().item(panel.ui.samplerSelector.findData("topk"))
    assert not item.isEnabled()
    assert panel.ui.samplerSelector.currentData != "topk"


def test_input_selector_offers_scalar_volumes_only(module, panel, scene):
    import numpy as np
    import SimpleITK as sitk

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a labelmap")
    slicer.util.updateVolumeFromArray(labelmap, np.zeros((4, 4, 4), np.uint8))
    uncertainty = panel.logic.addVolumeFromImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), "x uncertainty",
                                                 role="uncertainty")
    assert panel.logic.getParameterNode().inputVolume is None, "neither may be picked automatically"
    volume = add_phantom_volume(scene)
    listed = [panel.ui.inputVolumeSelector.nodeFromIndex(i).GetID()
              for i in range(panel.ui.inputVolumeSelector.nodeCount())]
    assert listed == [volume.GetID()] and uncertainty.GetID() not in listed and labelmap.GetID() not in listed
    assert panel.logic.firstInputCandidate() is volume


def test_review_opens_segment_editor_with_result_and_overlay(panel, scene, tiny_checkpoint):
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # one slice view's layers
    volume = add_phantom_volume(scene)
    panel.addModel(str(tiny_checkpoint))
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.uncertaintyCheckBox.checked = True
    assert not panel.ui.reviewButton.enabled
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    assert panel.ui.reviewButton.enabled, panel.ui.statusLabel.text

    panel.ui.reviewButton.click()
    segmentation = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")[0]
    uncertainty = slicer.util.getFirstNodeByName("phantom uncertainty")
    editor = slicer.modules.segmenteditor.editorStandIn
    assert slicer.app.mainWindowStandIn.moduleSelector().selected[-1] == "SegmentEditor"
    assert editor.segmentationNode is segmentation and editor.sourceVolumeNode is volume
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    assert segmentation.GetDisplayNode().GetVisibility3D()
    assert composite.GetBackgroundVolumeID() == volume.GetID()
    assert composite.GetForegroundVolumeID() == uncertainty.GetID() and composite.GetForegroundOpacity() > 0
    assert uncertainty.GetAttribute("UNetSegment.Role") == "uncertainty"


def test_roi_sends_only_the_box_and_places_result_on_full_grid(module, panel, scene, tiny_checkpoint, monkeypatch):
    import numpy as np

    volume = add_phantom_volume(scene, shape=(40, 40, 40))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    center = slicer.util.arrayFromVTKMatrix(ijk_to_ras) @ np.array([20.0, 20.0, 20.0, 1.0])
    roi.SetXYZ(*center[:3])
    roi.SetRadiusXYZ(4.0, 4.0, 4.0)
    sent = []
    real_start = module.UNetSegmentLogic.startSegmentation

    def recording_start(self, *args, **kwargs):
        job = real_start(self, *args, **kwargs)
        sent.append(job.worker.image.GetSize())
        return job

    monkeypatch.setattr(module.UNetSegmentLogic, "startSegmentation", recording_start)
    panel.addModel(str(tiny_checkpoint))
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.roiSelector.setCurrentNode(roi)
    assert panel.logic.getParameterNode().roi is roi
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    status = panel.ui.statusLabel.text
    assert status.startswith("Done in") and "ROI:" in status and "saved" in status, status
    assert np.prod(sent[0]) < 0.8 * 40 ** 3, sent
    segmentation = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")[0]
    labelmap = panel.logic.labelmapArrayFromSegments(segmentation, ["liver", "spleen"], volume)
    assert labelmap.shape == (40, 40, 40)
    start, size = panel.logic.roiBox(volume, roi, panel.logic.contextMarginMm(str(tiny_checkpoint)))
    outside = np.ones(labelmap.shape, bool)
    outside[start[2]:start[2] + size[2], start[1]:start[1] + size[1], start[0]:start[0] + size[0]] = False
    assert labelmap[outside].max() == 0 and labelmap[~outside].max() > 0


def test_pytorch_install_is_guarded_and_confirmed(module, panel, scene, tiny_checkpoint, monkeypatch):
    """Stands in for Slicer's PyTorch Utils module only to record how the panel calls it."""
    import types

    calls = []

    class PyTorchUtilsLogic:
        outcome = False

        def installTorch(self, askConfirmation=False):
            calls.append(askConfirmation)
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome

    volume = add_phantom_volume(scene)
    panel.addModel(str(tiny_checkpoint))
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    monkeypatch.setattr(module, "isTorchInstalled", lambda: False)

    panel.ui.segmentButton.click()
    assert "PyTorch is not installed" in panel.ui.statusLabel.text and "Fix:" in panel.ui.statusLabel.text
    assert not panel.ui.installTorchButton.isHidden() and not panel.isRunning

    panel.ui.installTorchButton.click()  # no PyTorch extension either: say what to install
    assert "Extensions Manager" in panel.ui.statusLabel.text

    monkeypatch.setattr(slicer.modules, "pytorchutils", types.SimpleNamespace(), raising=False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    panel.ui.installTorchButton.click()
    assert calls == [True], "installation must ask the user first"
    assert "not installed" in panel.ui.statusLabel.text

    PyTorchUtilsLogic.outcome = RuntimeError("pip failed: no network")
    panel.ui.installTorchButton.click()
    assert "Installing PyTorch failed" in panel.ui.statusLabel.text and "no network" in panel.ui.statusLabel.text
    assert not panel.isRunning and not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")


def test_out_of_memory_note_is_reported_in_the_status_line(panel, scene, tiny_checkpoint, monkeypatch):
    """A note the worker sends (e.g. an out-of-memory fallback it took) reaches the status line."""
    from UNetSegmentLib import worker

    real_finish = worker.WorkerJob._finish

    def with_note(self, exit_code):
        self.notes.append("simulated: the first plan ran out of memory; used batch 1")
        return real_finish(self, exit_code)

    monkeypatch.setattr(worker.WorkerJob, "_finish", with_note)
    panel.ui.inputVolumeSelector.setCurrentNode(add_phantom_volume(scene))
    panel.addModel(str(tiny_checkpoint))
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    status = panel.ui.statusLabel.text
    assert status.startswith("Done in") and "Note: simulated" in status, status


def test_import_nnunet_results_folder_then_segment_with_it(panel, scene, model_dirs, nnunet_ct_models, tmp_path,
                                                           monkeypatch):
    """Import nnU-Net… picks a results folder; a worker process converts it (the event loop keeps running:
    the panel is polled, not blocked); the new model is listed, selected, and segments a volume."""
    import qt

    _, folders = nnunet_ct_models
    _, user = model_dirs
    not_results = tmp_path / "just a folder"
    not_results.mkdir()
    monkeypatch.setattr(qt.QFileDialog, "getExistingDirectory", staticmethod(lambda *args: str(not_results)))
    panel.ui.importNnunetButton.click()
    assert panel._importJob is None and "not an nnU-Net v2 results folder" in panel.ui.statusLabel.text

    monkeypatch.setattr(qt.QFileDialog, "getExistingDirectory", staticmethod(lambda *args: str(folders[0])))
    panel.ui.importNnunetButton.click()
    assert panel._importJob is not None and not panel.ui.importNnunetButton.enabled
    ticks = []
    assert slicer_adapter.processEventsUntil(lambda: ticks.append(1) or panel._importJob is None, 300)
    assert len(ticks) > 1  # the GUI loop ran while the worker imported
    status = panel.ui.statusLabel.text
    assert "Imported nnU-Net model 'Dataset901_CT_3d_fullres'" in status, status
    entry = panel.selectedModelEntry()
    assert entry is not None and entry.path == user / "Dataset901_CT_3d_fullres.pt" and entry.error is None
    assert panel.ui.importNnunetButton.enabled

    volume = add_phantom_volume(scene)
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    segmentations = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
    assert len(segmentations) == 1, panel.ui.statusLabel.text
    names = [label.name for label in entry.metadata.labels[1:]]
    assert set(segment_names(segmentations[0])) <= set(names)


def test_runtime_and_threads_reach_the_worker_and_openvino_is_installed_only_when_confirmed(
        panel, scene, tiny_checkpoint, monkeypatch):
    """Issue 13 in the panel: the runtime and thread settings persist in the parameter node and decide what
    the worker runs (the status line names it); OpenVINO missing + runtime OpenVINO -> an install offer
    that does nothing unless the user confirms, then pip-installs the project's pin."""
    from UNetSegmentLib.runtime import options as runtime_options

    panel.addModel(str(tiny_checkpoint))
    volume = add_phantom_volume(scene)
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    parameters = panel.logic.getParameterNode()
    panel.ui.runtimeSelector.setCurrentIndex(panel.ui.runtimeSelector.findData("torch"))
    assert panel.ui.threadsSpinBox.maximum == (os.cpu_count() or 1)  # never more than the worker accepts
    panel.ui.threadsSpinBox.value = 100000
    assert parameters.threads == (os.cpu_count() or 1)
    assert panel.logic.cpuThreads(100000) == (os.cpu_count() or 1)  # e.g. a scene saved on a larger machine
    panel.ui.threadsSpinBox.value = 1
    assert (parameters.runtime, parameters.threads) == ("torch", 1)
    panel.ui.segmentButton.click()
    wait_until_idle(panel)
    from UNetSegmentLib.runtime.cpu import cpu_supports_bf16

    precision = "bf16" if cpu_supports_bf16() else "fp32"  # precision auto: bf16 only on CPUs with bf16 units
    assert f"(torch {precision}, 1 thread)" in panel.ui.statusLabel.text, panel.ui.statusLabel.text

    parameters.threads = 0
    parameters.leaveOneCoreFree = True  # every physical core but one (at least one)
    assert panel.logic.cpuThreads(parameters.threads, parameters.leaveOneCoreFree) == \
        max(1, runtime_options.physical_cores() - 1)
    parameters.runtime = "openvino"
    assert panel.ui.runtimeSelector.currentData == "openvino"  # the combo follows the parameter node

    # Slicer without OpenVINO: what the panel sees before an install
    installed = {"now": False}
    real_available = runtime_options.openvino_available.__wrapped__
    fake = lambda: installed["now"] and real_available()  # noqa: E731
    fake.cache_clear = lambda: None
    monkeypatch.setattr(runtime_options, "openvino_available", fake)
    asked, pip_calls = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kw: asked.append(text) or False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirement, *a, **kw: pip_calls.append(requirement))
    panel.ui.segmentButton.click()
    assert asked and runtime_options.OPENVINO_REQUIREMENT in asked[0] and not pip_calls
    assert not panel.isRunning and "OpenVINO was not installed" in panel.ui.statusLabel.text

    def install(requirement, *args, **kwargs):
        pip_calls.append(requirement)
        installed["now"] = True

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kw: True)
    monkeypatch.setattr(slicer.util, "pip_install", install)
    panel.ui.segmentButton.click()
    assert pip_calls == [runtime_options.OPENVINO_REQUIREMENT]
    wait_until_idle(panel)
    threads = max(1, runtime_options.physical_cores() - 1)
    assert f"(openvino {precision}, {threads} thread" in panel.ui.statusLabel.text, panel.ui.statusLabel.text


def test_openvino_pin_matches_the_project_environment():
    from pathlib import Path

    from UNetSegmentLib.runtime.options import OPENVINO_REQUIREMENT

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"{OPENVINO_REQUIREMENT}"' in pyproject
