"""The panel with the models a user gets: the MR model is picked for an MR scan, the phantom demo for a
CT, and a scan the model was not made for gets a warning in the status line (real worker, real models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk
import slicer
import slicer_adapter

from UNetSegmentLib.model_store import default_model_path, sample_image_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def panel(module, scene, worker_temp, tmp_path, monkeypatch):
    monkeypatch.delenv("UNETSEGMENT_MODELS_DIR", raising=False)  # the shipped models
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(tmp_path / "user"))
    widget = slicer_adapter.createPanel()
    yield widget
    slicer_adapter.closePanel(widget)


def _load(panel, kind: str, name: str):
    return panel.logic.addVolumeFromImage(sitk.ReadImage(str(sample_image_path(kind))), name)


def test_the_input_modality_picks_the_shipped_model_until_the_user_chooses(panel, scene):
    parameters = panel.logic.getParameterNode()
    listed = [str(entry.path) for entry in panel._modelEntries]
    assert str(default_model_path("MR")) in listed and str(default_model_path("CT")) in listed
    names = [panel.ui.modelSelector.itemText(i) for i in range(panel.ui.modelSelector.count)]
    assert any("phantom_ct_demo" in name for name in names)

    mr = _load(panel, "mr", "mr scan")
    panel.ui.inputVolumeSelector.setCurrentNode(mr)
    assert parameters.modelPath == str(default_model_path("MR"))
    ct = _load(panel, "phantom-ct", "ct scan")
    panel.ui.inputVolumeSelector.setCurrentNode(ct)
    assert parameters.modelPath == str(default_model_path("CT"))
    # a model the user picked stays when the input changes
    parameters.modelPath = str(default_model_path("MR"))
    user_pick = [path for path in listed if path not in panel.logic.shippedDefaultModelPaths()]
    if user_pick:
        parameters.modelPath = user_pick[0]
        panel.ui.inputVolumeSelector.setCurrentNode(mr)
        assert parameters.modelPath == user_pick[0]


def test_ct_given_to_the_mr_model_warns_in_the_status_line(panel, scene):
    ct = _load(panel, "phantom-ct", "ct scan")
    panel.ui.inputVolumeSelector.setCurrentNode(ct)
    parameters = panel.logic.getParameterNode()
    parameters.modelPath = str(default_model_path("MR"))  # the wrong model for this scan, on purpose
    panel.ui.segmentButton.click()
    assert slicer_adapter.processEventsUntil(lambda: not panel.isRunning, 300)
    status = panel.ui.statusLabel.text
    assert status.startswith("Warning: This looks like a CT scan"), status
    assert "Done in" in status and "red" in panel.ui.statusLabel.styleSheet

    mr = _load(panel, "mr", "mr scan")
    panel.ui.inputVolumeSelector.setCurrentNode(mr)
    assert parameters.modelPath == str(default_model_path("MR"))
    panel.ui.segmentButton.click()
    assert slicer_adapter.processEventsUntil(lambda: not panel.isRunning, 300)
    status = panel.ui.statusLabel.text
    assert status.startswith("Done in") and "Warning" not in status, status
