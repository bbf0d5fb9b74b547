"""The panel with PyTorch made unimportable (as in a fresh Slicer): it opens, lists the shipped models
with their labels, offers Install PyTorch, and Segment says what to do; after an install (PyTorch
Utils stood in) the list and Segment work without a restart. Runs in a fresh interpreter, because
torch is already imported in the test process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]

SCRIPT = r'''
import json, sys, types
sys.path[:0] = [HERE, REPOSITORY]

class BlockTorch:
    """What a Slicer without the PyTorch extension's install looks like to `import torch`."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None

blocker = BlockTorch()
sys.meta_path.insert(0, blocker)

import SimpleITK as sitk
import slicer
import slicer_adapter
slicer_adapter.install()
module = slicer_adapter.registerModule()
panel = slicer_adapter.createPanel()
out = {"models": [panel.ui.modelSelector.itemText(i) for i in range(panel.ui.modelSelector.count)],
       "details": panel.ui.modelDetailsLabel.text,
       "installShown": not panel.ui.installTorchButton.isHidden(),
       "parameterNode": panel._parameterNode is not None}
from UNetSegmentLib.model_store import sample_image_path
volume = panel.logic.addVolumeFromImage(sitk.ReadImage(str(sample_image_path("phantom-ct"))), "sample")
panel.ui.inputVolumeSelector.setCurrentNode(volume)
out["modelForCt"] = panel.logic.getParameterNode().modelPath  # chosen from the voxels, without torch
panel.ui.segmentButton.click()
out["segmentStatus"] = panel.ui.statusLabel.text
out["runningWithoutTorch"] = panel.isRunning
out["torchImported"] = "torch" in sys.modules

class PyTorchUtilsLogic:  # stands in for Slicer's PyTorch Utils: the "install" makes torch importable
    def installTorch(self, askConfirmation=False):
        sys.meta_path.remove(blocker)
        return askConfirmation

slicer.modules.pytorchutils = types.SimpleNamespace()
sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
panel.ui.installTorchButton.click()
out["installStatus"] = panel.ui.statusLabel.text
out["installHidden"] = panel.ui.installTorchButton.isHidden()
out["modelsAfter"] = [panel.ui.modelSelector.itemText(i) for i in range(panel.ui.modelSelector.count)]
panel.logic.getParameterNode().device = "cpu"
out["modelAfterInstall"] = panel.logic.getParameterNode().modelPath
panel.ui.segmentButton.click()
slicer_adapter.processEventsUntil(lambda: not panel.isRunning, 300)
out["afterInstallStatus"] = panel.ui.statusLabel.text
out["segmentations"] = len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))
print("RESULT " + json.dumps(out))
'''


def test_panel_without_torch_lists_models_offers_install_and_segments_after_it(tmp_path):
    from UNetSegmentLib.model_store import default_model_path, read_model_metadata, shipped_models_dir

    code = SCRIPT.replace("HERE", repr(str(HERE))).replace("REPOSITORY", repr(str(REPOSITORY)))
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stdout[-3000:] + process.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])

    shipped = sorted(p for p in shipped_models_dir().iterdir() if p.suffix == ".pt" or p.is_dir())
    assert len(out["models"]) == len(shipped) >= 1
    assert all("invalid" not in text for text in out["models"]), out["models"]
    first = read_model_metadata(shipped[0])
    assert all(label.name in out["details"] for label in first.labels[1:]), out["details"]
    assert out["installShown"] and out["parameterNode"]
    assert "PyTorch is not installed" in out["segmentStatus"] and "Fix:" in out["segmentStatus"]
    assert not out["runningWithoutTorch"] and not out["torchImported"]
    # the CT sample gets the CT model from its voxels (the volume was added empty and filled afterwards,
    # as slicer.util.updateVolumeFromArray does), and keeps it through the install
    assert out["modelForCt"] == str(default_model_path("CT")) == out["modelAfterInstall"], out

    assert out["installHidden"] and "PyTorch is installed" in out["installStatus"]
    assert out["modelsAfter"] == out["models"]
    assert out["afterInstallStatus"].startswith("Done in"), out["afterInstallStatus"]
    assert out["segmentations"] == 1
