"""UNetSegment: segment CT/MR volumes with U-Net family checkpoints, from inside 3D Slicer.

The module is deliberately thin: every computation (preprocessing, inference, resampling) lives in
the pure-Python backend `UNetSegmentLib`, and inference runs in a separate worker process
(`python -m UNetSegmentLib worker`, started with Slicer's own Python). Slicer's main thread holds
Python's GIL while its event loop idles, so a Python thread would only compute between timer ticks;
a process is not affected. The Logic converts MRML nodes to and from SimpleITK images and drives
the worker; the Widget collects settings and shows progress. Opening the panel never imports torch.
"""

import importlib.util
import logging
import os
import sys
import time
from typing import Annotated, Optional

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = [("sliding_window", "Sliding window"), ("topk", "Top-k patches"), ("whole", "Whole volume")]
DEVICES = [("auto", "Auto (GPU if available)"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)")]
RUNTIMES = [("auto", "Automatic (OpenVINO on CPU when installed)"), ("torch", "PyTorch"),
            ("openvino", "OpenVINO (CPU; installed on request)")]
SELF_TEST_DICE_THRESHOLD = 0.80
SELF_TEST_MODALITY, SELF_TEST_SAMPLE = "MR", "mr"  # the real hippocampus model on a real held-out MRI case
POLL_INTERVAL_MS = 100
OUTPUT_ROLE_ATTRIBUTE = "UNetSegment.Role"  # set on the volumes the module creates (uncertainty)
TORCH_MISSING = ("PyTorch is not installed.",
                 "Click Install PyTorch… (PyTorch Utils asks before installing), then Segment again.")


def ensureLibraryImportable():
    """Installed extensions have UNetSegmentLib beside the module; source checkouts one folder up."""
    if importlib.util.find_spec("UNetSegmentLib") is None and EXTENSION_ROOT not in sys.path:
        sys.path.insert(0, EXTENSION_ROOT)


def isTorchInstalled():
    """True when `import torch` would work; never imports it (the panel must open without it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


ensureLibraryImportable()
from UNetSegmentLib.errors import Cancelled, GeometryError, InputError, UNetSegmentError  # noqa: E402


#
# UNetSegment
#


class UNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UNetSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["UNetSegment developers"]
        self.parent.helpText = (
            "Segment a CT or MR volume with a U-Net family model (U-Net, Attention U-Net, UNet++, "
            "UNet 3+, nnU-Net style, ...). Pick a volume and a model, click Segment, then review the "
            "result in Segment Editor.")
        self.parent.acknowledgementText = (
            "Architectures follow their original papers; inference (sliding window with Gaussian "
            "blending, top-k patches) runs in the pure-Python backend UNetSegmentLib.")


#
# UNetSegmentParameterNode
#


@parameterNodeWrapper
class UNetSegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    roi: vtkMRMLMarkupsROINode
    modelPath: str = ""
    sampler: Annotated[str, Choice([key for key, _ in SAMPLERS])] = "sliding_window"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    topK: Annotated[int, WithinRange(0, 10000)] = 0
    device: Annotated[str, Choice([key for key, _ in DEVICES])] = "auto"
    runtime: Annotated[str, Choice([key for key, _ in RUNTIMES])] = "auto"
    threads: Annotated[int, WithinRange(0, 1024)] = 0  # 0: every physical core
    leaveOneCoreFree: bool = False
    replaceExistingSegments: bool = False
    addUncertaintyVolume: bool = False


#
# UNetSegmentWidget
#


_guiConnectedParameterNodes = []  # see setParameterNode


def _value(widgetAttribute):
    """PythonQt exposes Qt properties as attributes (`combo.currentData`); other bindings as methods."""
    return widgetAttribute() if callable(widgetAttribute) else widgetAttribute


class UNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._modelEntries = []
        self._timer = None
        self._lastRunSeconds = {}  # model path -> seconds of the last run, for the details line
        self._lastResult = None  # (segmentation, volume, uncertainty) for Review
        self._syncingCombos = False
        self._modalityInputId = None  # the input whose modality last chose the model
        self._fineTuneJob = None  # issue 17: (FineTuneJob, parent model path) while fine-tuning runs
        self._fineTuneTimer = None
        self._importJob = None  # issue 14: an nnU-Net results folder being imported (worker process)
        self._importTimer = None
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        for selector in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.roiSelector):
            selector.setMRMLScene(slicer.mrmlScene)
        self.ui.inputVolumeSelector.hideChildNodeTypes = ["vtkMRMLLabelMapVolumeNode"]

        self.logic = UNetSegmentLogic()
        for key, text in SAMPLERS:
            self.ui.samplerSelector.addItem(text, key)
        for key, text in DEVICES:
            self.ui.deviceSelector.addItem(text, key)
        for key, text in RUNTIMES:
            self.ui.runtimeSelector.addItem(text, key)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.ui.modelSelector.currentIndexChanged.connect(self.onModelChanged)
        self.ui.samplerSelector.currentIndexChanged.connect(self.onSamplerChanged)
        self.ui.deviceSelector.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.runtimeSelector.currentIndexChanged.connect(self.onRuntimeChanged)
        self.ui.addModelButton.clicked.connect(self.onAddModel)
        self.ui.importNnunetButton.clicked.connect(self.onImportNnunet)
        self._importTimer = qt.QTimer()
        self._importTimer.setInterval(POLL_INTERVAL_MS)
        self._importTimer.timeout.connect(self.pollImport)
        self.ui.installTorchButton.clicked.connect(self.offerTorchInstall)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.reviewButton.clicked.connect(self.onReview)
        self.ui.browseTrainingSetButton.clicked.connect(self.onBrowseTrainingSet)
        self.ui.addToTrainingSetButton.clicked.connect(self.onAddToTrainingSet)
        self.ui.fineTuneButton.clicked.connect(self.onFineTuneButton)
        self._fineTuneTimer = qt.QTimer()
        self._fineTuneTimer.setInterval(POLL_INTERVAL_MS)
        self._fineTuneTimer.timeout.connect(self.pollFineTune)

        self.ui.installTorchButton.setVisible(not isTorchInstalled())
        self.ui.progressBar.setVisible(False)
        self.ui.reviewButton.setEnabled(False)
        self.hideModuleOutputsFromInput()
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        self.cancelJob()
        self.cancelFineTune()
        self.cancelImport()
        self.exit()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onReload(self):
        """Reload also re-imports the backend, so edits to UNetSegmentLib take effect."""
        for name in [name for name in sys.modules if name == "UNetSegmentLib" or name.startswith("UNetSegmentLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # --- scene and parameter node ------------------------------------------------------------

    def onSceneStartClose(self, caller, event):
        """A run belongs to the scene being closed: stop it, so nothing lands in the next scene."""
        if self._job is not None:
            self.cancelJob()
            self.showStatus("Cancelled: the scene was closed.")
        self._lastResult = None
        if hasattr(self, "ui"):
            self.ui.reviewButton.setEnabled(False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onNodeAdded(self, caller, event):
        self.hideModuleOutputsFromInput()

    def hideModuleOutputsFromInput(self):
        """The input list offers scalar volumes only, not the uncertainty volumes this module made."""
        hidden = [node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                  if node.GetAttribute(OUTPUT_ROLE_ATTRIBUTE)]
        proxy = self.ui.inputVolumeSelector.sortFilterProxyModel()
        if list(_value(proxy.hiddenNodeIDs)) != hidden:
            proxy.hiddenNodeIDs = hidden

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = self.logic.firstInputCandidate()
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode:
            # connectGui leaves a lambda observer (holding this wrapper) on the node for good; with
            # VTK 9.6's Python wrapping the node fires it after the wrapper was freed (a crash when
            # the scene closes after the panel was unloaded), so connected wrappers are kept alive.
            _guiConnectedParameterNodes.append(parameterNode)
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            # after connectGui, which sets the box's range from the parameter's WithinRange: more threads
            # than logical CPUs only slow the worker down (and the worker refuses them)
            from UNetSegmentLib.runtime.options import logical_cpus
            self.ui.threadsSpinBox.maximum = logical_cpus()
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.showSettingsFromParameterNode()

    def onParameterNodeModified(self, caller=None, event=None):
        """Scripts and scene loads change the parameter node directly: the combo boxes follow."""
        if not self._syncingCombos:
            self.showSettingsFromParameterNode()

    def showSettingsFromParameterNode(self):
        """The model, sampler and device combo boxes show labels but store keys: synced by hand."""
        node = self._parameterNode
        if node is None:
            return
        self._syncingCombos = True
        try:
            listedPaths = [str(entry.path) for entry in self._modelEntries]
            self.followInputModality(node, listedPaths)
            if not node.modelPath and listedPaths:  # none chosen yet: the shipped MR model, else the first listed
                mrDefault = self.logic.shippedDefaultModelPaths()[0]
                node.modelPath = mrDefault if mrDefault in listedPaths else listedPaths[0]
            if node.modelPath in listedPaths:
                self._selectItemData(self.ui.modelSelector, node.modelPath)
            else:  # a script chose a file that is not listed: keep it, select nothing
                self.ui.modelSelector.setCurrentIndex(-1)
            self._selectItemData(self.ui.samplerSelector, node.sampler)
            self._selectItemData(self.ui.deviceSelector, node.device)
            self._selectItemData(self.ui.runtimeSelector, node.runtime)
        finally:
            self._syncingCombos = False
        self.updateModelDetails()
        self.updateButtons()

    def followInputModality(self, node, listedPaths):
        """A new input gets the shipped model for its modality (MR: hippocampus, CT: phantom demo) unless
        the user picked a model of their own; checked once per input volume."""
        inputId = node.inputVolume.GetID() if node.inputVolume else None
        if inputId is None or inputId == self._modalityInputId:
            return
        volume, event = node.inputVolume, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent
        if not hasVoxels(volume):  # not loaded yet, or being filled: ask again when the voxels arrive
            if not self.hasObserver(volume, event, self.onInputImageDataModified):
                self.addObserver(volume, event, self.onInputImageDataModified)
            return
        if self.hasObserver(volume, event, self.onInputImageDataModified):
            self.removeObserver(volume, event, self.onInputImageDataModified)
        self._modalityInputId = inputId
        if node.modelPath and node.modelPath not in self.logic.shippedDefaultModelPaths():
            return  # the user's own choice stays
        try:
            preferred = self.logic.defaultModelPathFor(node.inputVolume)
        except Exception:  # an unreadable volume must not break the panel; keep the current model
            logging.exception("UNetSegment: could not tell the input's modality")
            return
        if preferred in listedPaths and preferred != node.modelPath:
            node.modelPath = preferred

    def onInputImageDataModified(self, caller=None, event=None):
        self.showSettingsFromParameterNode()  # followInputModality stops observing once the voxels are there

    @staticmethod
    def _selectItemData(comboBox, data):
        index = comboBox.findData(data)
        if index >= 0 and index != _value(comboBox.currentIndex):
            comboBox.setCurrentIndex(index)

    # --- models ------------------------------------------------------------------------------

    def refreshModels(self, selectPath=None):
        """Reads only each checkpoint's small metadata record, without torch (safe before install)."""
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        try:
            from UNetSegmentLib.model_store import list_models
            self._modelEntries = list(list_models())
        except UNetSegmentError as error:
            self._modelEntries = []
            self.showStatus(str(error), isError=True)
        except Exception as error:  # a broken install must not take the panel down
            logging.exception("UNetSegment: listing models failed")
            self._modelEntries = []
            self.showStatus(f"Models could not be listed ({type(error).__name__}: {error}). Fix: reinstall the "
                            "UNetSegment extension; see the Python console.", isError=True)
        for entry in self._modelEntries:
            invalid = "" if entry.metadata is not None else ", invalid"
            self.ui.modelSelector.addItem(f"{entry.name} ({entry.source}{invalid})", str(entry.path))
        self.ui.modelSelector.blockSignals(False)
        if selectPath is not None and self._parameterNode:
            self._parameterNode.modelPath = str(selectPath)
        if self._parameterNode:
            self.showSettingsFromParameterNode()
        else:
            self.updateModelDetails()

    def selectedModelEntry(self):
        path = _value(self.ui.modelSelector.currentData)
        for entry in self._modelEntries:
            if str(entry.path) == path:
                return entry
        return None

    def onModelChanged(self, index=None):
        entry = self.selectedModelEntry()
        if self._parameterNode and entry is not None and not self._syncingCombos:
            self._parameterNode.modelPath = str(entry.path)
        self.updateModelDetails()

    def onSamplerChanged(self, index=None):
        if self._parameterNode and not self._syncingCombos:
            self._parameterNode.sampler = _value(self.ui.samplerSelector.currentData)
        self.updateModelDetails()

    def onDeviceChanged(self, index=None):
        if self._parameterNode and not self._syncingCombos:
            self._parameterNode.device = _value(self.ui.deviceSelector.currentData)

    def onRuntimeChanged(self, index=None):
        if self._parameterNode and not self._syncingCombos:
            self._parameterNode.runtime = _value(self.ui.runtimeSelector.currentData)

    def updateModelDetails(self):
        entry = self.selectedModelEntry()
        metadata = entry.metadata if entry is not None else None
        supportsTopK = metadata is not None and metadata.sampler == "topk"
        samplerModel = self.ui.samplerSelector.model()
        samplerModel.item(self.ui.samplerSelector.findData("topk")).setEnabled(supportsTopK)
        sampler = _value(self.ui.samplerSelector.currentData)
        if sampler == "topk" and not supportsTopK:
            self._selectItemData(self.ui.samplerSelector, "sliding_window")
            sampler = "sliding_window"
        self.ui.topKSpinBox.setEnabled(sampler == "topk")
        self.ui.overlapSpinBox.setEnabled(sampler == "sliding_window")
        if entry is None and self._parameterNode and self._parameterNode.modelPath:
            details = f"Model file {self._parameterNode.modelPath} (not in the list)."
        elif entry is None:
            details = "No model found: use Add model… to import a checkpoint."
        else:
            details = (describeModel(metadata, self._lastRunSeconds.get(str(entry.path))) if metadata is not None
                       else f"Unusable model: {entry.error}")
        self.ui.modelDetailsLabel.setText(details)

    def onAddModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Add UNetSegment model", "",
                                              "UNetSegment checkpoints (*.pt *.pth);;All files (*)")
        if isinstance(path, tuple):  # PySide returns (path, filter)
            path = path[0]
        if path:
            self.addModel(path)

    def addModel(self, path):
        """Validates the checkpoint at once (weights included), so a foreign file is refused before it is listed.
        A folder is an nnU-Net results folder: imported in a worker process (returns the job)."""
        if os.path.isdir(str(path)):
            return self.startImport(path)
        if not isTorchInstalled():
            self.showStatus("Adding a model checks its weights, which needs PyTorch. Fix: click Install PyTorch… "
                            "first.", isError=True)
            return None
        from UNetSegmentLib.model_store import add_user_model
        try:
            entry = add_user_model(path)
        except UNetSegmentError as error:
            self.showStatus(str(error), isError=True)
            return None
        self.refreshModels(selectPath=getattr(entry, "path", None))
        self.showStatus(f"Added model {getattr(entry, 'name', path)}.")
        return entry

    def onImportNnunet(self):
        folder = qt.QFileDialog.getExistingDirectory(
            self.parent, "Import nnU-Net v2 results folder (DatasetXXX_Name/<Trainer>__<Plans>__<configuration>)")
        if folder:
            self.startImport(folder)

    def startImport(self, folder):
        """Loading and converting every fold takes seconds to minutes: a worker process does it, the GUI polls."""
        if self._importJob is not None:
            self.showStatus("An nnU-Net import is already running; wait for it to finish.", isError=True)
            return None
        if not isTorchInstalled():
            self.showStatus("Importing an nnU-Net model converts its weights, which needs PyTorch. Fix: click "
                            "Install PyTorch… first.", isError=True)
            return None
        try:
            self._importJob = self.logic.startModelImport(folder)
        except UNetSegmentError as error:
            self.showStatus(str(error), isError=True)
            return None
        self.ui.importNnunetButton.setEnabled(False)
        self.showStatus(f"Importing nnU-Net model from {folder}…")
        self._importTimer.start()
        return self._importJob

    def pollImport(self):
        if self._importJob is None or not self._importJob.poll():
            return None
        job = self._importJob
        self._endImport()
        if job.error is not None:
            self.showStatus(str(job.error), isError=True)
            return None
        result = job.result
        self.refreshModels(selectPath=result["output"])
        self.showStatus(f"Imported nnU-Net model '{result['name']}' ({result['configuration']}, folds "
                        f"{', '.join(result['folds'])}; labels: {', '.join(result['labels'])}).")
        return result

    def cancelImport(self):
        if self._importJob is not None:
            self._importJob.cancel()
        self._endImport()

    def _endImport(self):
        self._importJob = None
        if self._importTimer is not None:
            self._importTimer.stop()
        if hasattr(self, "ui"):
            self.ui.importNnunetButton.setEnabled(True)

    def offerOpenVINOInstall(self):
        """Never installs silently: the user confirms; a failure or a refusal is a status line with a fix."""
        from UNetSegmentLib.runtime.options import OPENVINO_REQUIREMENT
        if not slicer.util.confirmOkCancelDisplay(
                f"The OpenVINO runtime is not installed. Install {OPENVINO_REQUIREMENT} into Slicer's Python now "
                "(about 100 MB download)?", "UNetSegment: install OpenVINO"):
            self.showStatus("OpenVINO was not installed. Fix: pick the Automatic or PyTorch runtime, or confirm "
                            "the installation.", isError=True)
            return False
        try:
            slicer.util.pip_install(OPENVINO_REQUIREMENT)
        except Exception as error:  # network or pip failures: say so, keep the panel alive
            logging.exception("UNetSegment: installing OpenVINO failed")
            self.showStatus(f"Installing OpenVINO failed ({type(error).__name__}: {error}). Fix: check the network "
                            "connection, or pick the PyTorch runtime.", isError=True)
            return False
        importlib.invalidate_caches()
        if not self.logic.openVINOInstalled():
            self.showStatus("OpenVINO is still not importable after the installation. Fix: restart Slicer, or "
                            "pick the PyTorch runtime.", isError=True)
            return False
        return True

    # --- PyTorch ----------------------------------------------------------------------------

    def offerTorchInstall(self):
        """Never installs silently: PyTorch Utils asks the user to confirm. Every failure is a status line."""
        if not hasattr(slicer.modules, "pytorchutils"):
            self.showStatus("PyTorch is not installed and the PyTorch extension is missing. Fix: install "
                            "the 'PyTorch' extension from the Extensions Manager, restart Slicer.", isError=True)
            return False
        try:
            import PyTorchUtils
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            installed = torchLogic.installTorch(askConfirmation=True)
        except Exception as error:  # network, pip or PyTorch Utils failures: say so, keep the panel alive
            logging.exception("UNetSegment: installing PyTorch failed")
            self.showStatus(f"Installing PyTorch failed ({type(error).__name__}: {error}). Fix: check the network "
                            "connection, or install it from the PyTorch Utils module.", isError=True)
            return False
        if not installed:
            self.showStatus("PyTorch was not installed. Fix: click Install PyTorch… and confirm.", isError=True)
            return False
        importlib.invalidate_caches()
        self.ui.installTorchButton.setVisible(False)
        self.refreshModels()  # no restart: the list and Segment work at once
        self.showStatus("PyTorch is installed.")
        return True

    # --- running -----------------------------------------------------------------------------

    def onSegmentButton(self):
        if self._job is not None:
            self.cancelJob()
            self.showStatus("Cancelled by the user.")
            return
        if not isTorchInstalled():
            self.ui.installTorchButton.setVisible(True)
            self.showStatus(f"{TORCH_MISSING[0]} Fix: {TORCH_MISSING[1]}", isError=True)
            return
        if self._parameterNode is None:
            self.initializeParameterNode()
        node = self._parameterNode
        if node.runtime == "openvino" and not self.logic.openVINOInstalled() and not self.offerOpenVINOInstall():
            return
        try:
            self._job = self.logic.startSegmentation(
                node.inputVolume, node.modelPath, sampler=node.sampler, overlap=node.overlap,
                topK=node.topK, device=node.device, returnUncertainty=node.addUncertaintyVolume, roiNode=node.roi,
                backend=node.runtime, threads=self.logic.cpuThreads(node.threads, node.leaveOneCoreFree))
        except UNetSegmentError as error:
            self.showStatus(str(error), isError=True)
            return
        self.ui.segmentButton.setText("Cancel")
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.showStatus("Segmenting…" + (f" ({self._job.roiDescription})" if self._job.roiDescription else ""))
        self._timer.start()

    def cancelJob(self):
        """Terminates the worker (killed after a grace period); its temporary files are removed."""
        job, self._job = self._job, None
        if self._timer is not None:
            self._timer.stop()
        if job is not None:
            job.cancel()
        if hasattr(self, "ui"):
            self.ui.segmentButton.setText("Segment")
            self.ui.progressBar.setVisible(False)

    def pollJob(self):
        """Runs on the main thread on a timer: reads the worker's progress, applies its result."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        finished = job.poll()
        progress = job.progress
        if progress is not None and progress.total > 0:
            self.ui.progressBar.setMaximum(progress.total)
            self.ui.progressBar.setValue(progress.done)
            self.ui.progressBar.setFormat(describeProgress(progress))
        elif job.stage:
            self.ui.progressBar.setFormat(job.stage)
        if not finished:
            return
        self._timer.stop()
        self._job = None
        self.ui.segmentButton.setText("Segment")
        self.ui.progressBar.setVisible(False)
        if job.error is not None:
            self.showStatus(str(job.error), isError=not isinstance(job.error, Cancelled))
            return
        node = self._parameterNode
        if node is None or job.inputVolume.GetScene() is None:  # the scene changed under the run
            self.showStatus("The result was discarded: its input volume is no longer in the scene.")
            return
        try:
            segmentation = self.logic.applyResult(
                job, outputSegmentation=node.outputSegmentation,
                replaceExisting=node.replaceExistingSegments, addUncertaintyVolume=node.addUncertaintyVolume)
        except UNetSegmentError as error:
            self.showStatus(str(error), isError=True)
            return
        node.outputSegmentation = segmentation
        result = job.result
        self._lastResult = (segmentation, job.inputVolume, job.uncertaintyVolume)
        self.ui.reviewButton.setEnabled(True)
        self._lastRunSeconds[str(node.modelPath)] = result.seconds
        self.updateModelDetails()
        notes = (result.stats or {}).get("fallbacks") or []
        # e.g. a CT given to an MR model: shown first, in the error colour, before the result is trusted
        warnings = (result.stats or {}).get("warnings") or []
        roi = f" {job.roiSavings()}" if job.roiDescription else ""
        self.showStatus("".join(f"Warning: {warning}\n" for warning in warnings)
                        + f"Done in {job.wallSeconds:.1f} s ({describeRuntime(result.stats)}): "
                        f"{len(result.labels) - 1} segment(s) in '{segmentation.GetName()}'.{roi}"
                        + "".join(f"\nNote: {note}" for note in notes),
                        isError=bool(warnings))

    def onReview(self):
        if self._lastResult is None:
            return
        segmentation, volume, uncertainty = self._lastResult
        try:
            self.logic.review(segmentation, volume, uncertainty)
        except Exception as error:  # e.g. no main window (headless): say so instead of a traceback
            self.showStatus(f"Segment Editor could not be opened ({error}).", isError=True)

    def updateButtons(self):
        self.ui.segmentButton.setEnabled(True)

    @property
    def isRunning(self):
        return self._job is not None

    def showStatus(self, text, isError=False):
        self.ui.statusLabel.setText(text)
        self.ui.statusLabel.setStyleSheet("color: red" if isError else "")
        (logging.error if isError else logging.info)(text)

    # --- the user's training set and fine-tuning (issue 17) ------------------------------------

    def trainingSetFolder(self):
        """The folder typed in, else one folder per model beside the user models."""
        text = str(_value(self.ui.trainingSetLineEdit.text) or "").strip()
        if text:
            return text
        from UNetSegmentLib.user_dataset import default_training_set_dir
        name = os.path.splitext(os.path.basename(os.path.normpath(str(self.currentModelPath() or "model"))))[0]
        return str(default_training_set_dir(name))

    def currentModelPath(self):
        return self._parameterNode.modelPath if self._parameterNode else _value(self.ui.modelSelector.currentData)

    def onBrowseTrainingSet(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Training set folder", self.trainingSetFolder())
        if folder:
            self.ui.trainingSetLineEdit.setText(folder)

    def showFineTuneStatus(self, text, isError=False):
        self.ui.fineTuneStatusLabel.setText(text)
        self.ui.fineTuneStatusLabel.setStyleSheet("color: red" if isError else "")
        (logging.error if isError else logging.info)(text)

    def onAddToTrainingSet(self, confirm=None):
        """Input volume + output segmentation (after review) -> a case; asks before replacing a case."""
        from UNetSegmentLib.user_dataset import DuplicateCaseError
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        if segmentation is None and self._lastResult is not None:
            segmentation = self._lastResult[0]
        modelPath = self.currentModelPath()
        folder = self.trainingSetFolder()
        confirm = confirm or (lambda text: slicer.util.confirmYesNoDisplay(text, windowTitle="UNetSegment"))
        try:
            try:
                added = self.logic.addToTrainingSet(volume, segmentation, modelPath, folder)
            except DuplicateCaseError as error:
                if not confirm(f"{error.problem} Replace it with this correction?"):
                    self.showFineTuneStatus(f"Not added: case '{error.case_id}' was kept.")
                    return None
                added = self.logic.addToTrainingSet(volume, segmentation, modelPath, folder, replace=True)
        except UNetSegmentError as error:
            self.showFineTuneStatus(str(error), isError=True)
            return None
        replaced = f" (replacing '{added.replaced}')" if added.replaced else ""
        self.showFineTuneStatus(f"Added case '{added.case_id}'{replaced}: {added.cases_in_set} case(s) in {folder}.")
        return added

    def onFineTuneButton(self):
        if self._fineTuneJob is not None:
            self.cancelFineTune()
            self.showFineTuneStatus("Fine-tuning cancelled; no model was written.")
            return
        modelPath = self.currentModelPath()
        budget = _value(self.ui.fineTuneBudgetSpinBox.value) * 60.0
        try:
            job = self.logic.startFineTuning(modelPath, self.trainingSetFolder(), budgetS=budget,
                                             device=self._parameterNode.device if self._parameterNode else "auto")
        except UNetSegmentError as error:
            self.showFineTuneStatus(str(error), isError=True)
            return
        self._fineTuneJob = (job, modelPath)
        self.ui.fineTuneButton.setText("Cancel fine-tuning")
        self.showFineTuneStatus("Fine-tuning: starting…")
        self._fineTuneTimer.start()

    def cancelFineTune(self):
        if self._fineTuneJob is not None:
            self._fineTuneJob[0].cancel()
        self._endFineTune()

    def _endFineTune(self):
        self._fineTuneJob = None
        if self._fineTuneTimer is not None:
            self._fineTuneTimer.stop()
        if hasattr(self, "ui"):
            self.ui.fineTuneButton.setText("Fine-tune")

    def pollFineTune(self):
        """Progress (iteration i/N, loss, ETA); at the end the tuned model is selected only if not worse."""
        if self._fineTuneJob is None:
            return
        job, parentPath = self._fineTuneJob
        if not job.poll():
            progress = job.progress
            if progress is not None:
                loss = f", loss {job.loss:.3f}" if job.loss is not None else ""
                left = f", about {progress.remaining_s:.0f} s left" if progress.remaining_s is not None else ""
                self.showFineTuneStatus(f"{progress.stage}: iteration {progress.done}/{progress.total}{loss}{left}"
                                        if progress.stage.startswith("fine-tuning") else
                                        f"Checking on held-out cases ({progress.done}/{progress.total})…")
            return
        self._endFineTune()
        if job.error is not None:
            self.showFineTuneStatus(str(job.error), isError=True)
            return
        result = job.result
        selected = self.logic.modelAfterFineTuning(result, parentPath)
        self.refreshModels(selectPath=selected)
        self.showFineTuneStatus(f"{result.get('message', '')} New model: {result.get('output')}.",
                                isError=not result.get("improved"))
        return result


def hasVoxels(volumeNode):
    """Voxels are there, not only an image object: slicer.util.updateVolumeFromArray first sets an empty
    vtkImageData on the node (ImageDataModifiedEvent fires then) and fills it afterwards."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        return False
    pointData = imageData.GetPointData()
    return pointData is not None and pointData.GetScalars() is not None


def describeRuntime(stats):
    """E.g. "openvino fp32, 2 threads": what actually ran (auto may pick PyTorch for a small volume)."""
    stats = stats or {}
    parts = [f"{stats.get('backend', 'torch')} {stats.get('precision', '')}".strip()]
    if stats.get("threads"):
        parts.append(f"{stats['threads']} thread{'s' if stats['threads'] != 1 else ''}")
    return ", ".join(parts)


def describeProgress(progress):
    """E.g. "patch 12/40, about 8 s left" for the progress bar."""
    unit = "patch" if progress.stage in ("inference", "sliding_window", "topk", "patches") else progress.stage
    remaining = "" if progress.remaining_s is None else f", about {progress.remaining_s:.0f} s left"
    return f"{unit} {progress.done}/{progress.total}{remaining}"


def describeModel(metadata, lastRunSeconds=None):
    """One line for the panel: what the model is, what it finds, and how long it should take."""
    labels = ", ".join(label.name for label in metadata.labels if label.value != 0)
    spacing = " x ".join(f"{value:g}" for value in metadata.target_spacing)
    line = f"{metadata.architecture} ({metadata.spatial_dims}D), labels: {labels}; spacing {spacing} mm"
    expected = (metadata.training or {}).get("inference_seconds")
    if lastRunSeconds is not None:
        line += f"; last run took {lastRunSeconds:.1f} s"
    elif expected:
        line += f"; expected time: about {float(expected):.0f} s on CPU"
    else:
        line += "; expected time: shown after the first run"
    if metadata.sampler == "topk":
        line += "; supports top-k"
    return line


#
# UNetSegmentLogic
#


ROI_CONTEXT_FRACTION = 0.25  # margin around an ROI: this fraction of the model's smallest patch extent (mm)


class SegmentationJob:
    """One run in a worker process (UNetSegmentLib.worker.WorkerJob) plus its scene-side facts.

    Never touches the MRML scene: the Widget's timer (or `wait`) polls it on the main thread, and
    the Logic's applyResult imports the result there. With an ROI only the cropped box (plus the
    model's context margin) is sent; the result is placed back on the full volume's grid.
    """

    def __init__(self, workerJob, inputVolume, fullImage, cropIndex=None, cropSize=None):
        self.worker = workerJob
        self.inputVolume = inputVolume
        self.fullImage = fullImage
        self.cropIndex, self.cropSize = cropIndex, cropSize
        self.result = None
        self.uncertaintyVolume = None
        self._started = time.perf_counter()
        self.wallSeconds = 0.0

    @property
    def roiDescription(self):
        if self.cropSize is None:
            return ""
        fraction = float(np.prod(self.cropSize)) / float(np.prod(self.fullImage.GetSize()))
        return f"ROI: {100 * fraction:.0f} % of the volume sent"

    def roiSavings(self):
        """E.g. "ROI: 23 % of the volume sent, about 9 s saved (estimate)"."""
        fraction = float(np.prod(self.cropSize)) / float(np.prod(self.fullImage.GetSize()))
        seconds = self.result.seconds if self.result is not None else 0.0
        saved = seconds * (1.0 / max(fraction, 1e-6) - 1.0)
        return f"{self.roiDescription}, about {saved:.0f} s saved (estimate)."

    @property
    def progress(self):
        return self.worker.progress

    @property
    def stage(self):
        return self.worker.stage

    @property
    def error(self):
        return self.worker.error

    @property
    def finished(self):
        return self.worker.finished

    @property
    def pid(self):
        return self.worker.pid

    @property
    def folder(self):
        return self.worker.folder

    def poll(self):
        if not self.worker.poll():
            return False
        if self.result is None and self.worker.result is not None:
            self.wallSeconds = time.perf_counter() - self._started
            self.result = self._onFullGrid(self.worker.result)
        return True

    def wait(self, timeout=None):
        """Blocking variant for scripts and the self-test."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def cancel(self):
        self.worker.cancel()

    def _onFullGrid(self, result):
        if self.cropIndex is None:
            return result
        import SimpleITK as sitk
        result.labelmap = pasteIntoFullGrid(result.labelmap, self.fullImage, self.cropIndex, sitk.sitkUInt8)
        if result.uncertainty is not None:
            result.uncertainty = pasteIntoFullGrid(result.uncertainty, self.fullImage, self.cropIndex,
                                                   sitk.sitkFloat32)
        return result


def pasteIntoFullGrid(cropped, fullImage, cropIndex, pixelType):
    """A cropped result back on the full grid (zero outside the box), same geometry as `fullImage`."""
    import SimpleITK as sitk
    full = sitk.Image(fullImage.GetSize(), pixelType)
    full.CopyInformation(fullImage)
    return sitk.Paste(full, sitk.Cast(cropped, pixelType), cropped.GetSize(), [0, 0, 0], [int(i) for i in cropIndex])


class UNetSegmentLogic(ScriptedLoadableModuleLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return UNetSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def isInputCandidate(node):
        """Scalar volumes the user loaded: not labelmaps, not this module's own outputs."""
        return (node is not None and node.GetClassName() == "vtkMRMLScalarVolumeNode"
                and not node.GetAttribute(OUTPUT_ROLE_ATTRIBUTE) and not node.GetHideFromEditors())

    def firstInputCandidate(self):
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if self.isInputCandidate(node):
                return node
        return None

    # --- geometry conversion -------------------------------------------------------------------

    @staticmethod
    def imageFromVolumeNode(volumeNode):
        """Voxels and IJK-to-RAS -> SimpleITK image (LPS): flip the x and y axes of RAS."""
        import SimpleITK as sitk
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise InputError("No input volume is selected or it has no voxels.", "Select a loaded volume.")
        if volumeNode.GetParentTransformNode() is not None:
            raise InputError(f"Volume '{volumeNode.GetName()}' is under a transform.",
                             "Harden the transform (Data module) before segmenting.")
        voxels = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        if voxels.ndim == 4:
            raise InputError(f"Volume '{volumeNode.GetName()}' has {voxels.shape[-1]} components per voxel "
                             "(e.g. RGB or a vector field).", "Use a single-component scalar volume, e.g. "
                             "convert it to grayscale (Vector to Scalar Volume module).")
        if voxels.ndim != 3:
            raise InputError(f"Volume '{volumeNode.GetName()}' has {voxels.ndim}-D voxels.",
                             "Use a single-component scalar volume.")
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        matrix = slicer.util.arrayFromVTKMatrix(ijkToRas)
        rasToLps = np.diag([-1.0, -1.0, 1.0])
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        if not np.all(np.isfinite(matrix)) or np.any(spacing <= 1e-9):
            raise GeometryError(f"Volume '{volumeNode.GetName()}' has a zero or invalid spacing "
                                f"{tuple(round(float(value), 6) for value in volumeNode.GetSpacing())} mm.",
                                "Set a positive spacing for every axis (Volumes module, Volume Information).")
        direction = rasToLps @ (matrix[:3, :3] / spacing)
        image = sitk.GetImageFromArray(voxels)
        image.SetSpacing([float(value) for value in spacing])
        image.SetOrigin([float(value) for value in rasToLps @ matrix[:3, 3]])
        image.SetDirection([float(value) for value in direction.ravel()])
        return image

    @staticmethod
    def ijkToRasFromImage(image):
        rasToLps = np.diag([-1.0, -1.0, 1.0])
        matrix = np.eye(4)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        matrix[:3, :3] = rasToLps @ direction * np.array(image.GetSpacing())
        matrix[:3, 3] = rasToLps @ np.array(image.GetOrigin())
        return matrix

    @staticmethod
    def roiBox(volumeNode, roiNode, marginMm=0.0):
        """(start, size) in (i, j, k) voxels: the ROI's RAS bounds plus `marginMm`, clipped to the volume."""
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)
        if not np.all(np.isfinite(bounds)) or bounds[1] < bounds[0]:
            raise InputError(f"ROI '{roiNode.GetName()}' is empty.", "Place the ROI on the volume, or clear it.")
        rasToIjk = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(rasToIjk)
        matrix = slicer.util.arrayFromVTKMatrix(rasToIjk)
        corners = np.array([[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
        ijk = (matrix @ corners.T).T[:, :3]
        spacing = np.array(volumeNode.GetSpacing())
        margin = marginMm / spacing
        low = np.floor(ijk.min(axis=0) - margin).astype(int)
        high = np.ceil(ijk.max(axis=0) + margin).astype(int) + 1
        dims = np.array(volumeNode.GetImageData().GetDimensions())
        low, high = np.clip(low, 0, dims), np.clip(high, 0, dims)
        if np.any(high - low < 1):
            raise InputError(f"ROI '{roiNode.GetName()}' does not overlap volume '{volumeNode.GetName()}'.",
                             "Move the ROI onto the volume, or clear the ROI selector.")
        return [int(v) for v in low], [int(v) for v in high - low]

    @staticmethod
    def inputModality(volumeNode):
        """'CT' or 'MR' as far as the voxel values tell (Hounsfield air), without torch."""
        from UNetSegmentLib.applicability import modality_of

        return modality_of(slicer.util.arrayFromVolume(volumeNode))

    @staticmethod
    def openVINOInstalled():
        """Asked afresh each time: an on-demand install must count without a restart."""
        from UNetSegmentLib.runtime.options import openvino_available
        openvino_available.cache_clear()
        return openvino_available()

    @staticmethod
    def cpuThreads(threads=0, leaveOneCoreFree=False):
        """The worker's thread count: the user's number, else every physical core (or all but one)."""
        from UNetSegmentLib.runtime.options import logical_cpus, suggested_threads
        if threads:  # a scene saved on a larger machine may ask for more CPUs than this one has
            return max(1, min(int(threads), logical_cpus()))
        return suggested_threads(leave_one_core_free=bool(leaveOneCoreFree))

    @staticmethod
    def shippedDefaultModelPaths():
        from UNetSegmentLib.model_store import DEFAULT_MODEL_NAMES, default_model_path

        return [str(default_model_path(modality)) for modality in DEFAULT_MODEL_NAMES]

    def defaultModelPathFor(self, volumeNode):
        from UNetSegmentLib.model_store import default_model_path

        return str(default_model_path(self.inputModality(volumeNode)))

    @staticmethod
    def contextMarginMm(modelPath):
        """A quarter of the model's smallest patch extent in mm, read without torch."""
        from UNetSegmentLib.model_store import read_model_metadata
        metadata = read_model_metadata(modelPath)
        extents = [size * spacing for size, spacing in zip(reversed(metadata.patch_size), metadata.target_spacing)]
        return ROI_CONTEXT_FRACTION * min(extents)

    def addVolumeFromImage(self, image, name, className="vtkMRMLScalarVolumeNode", role=None):
        """SimpleITK image -> new volume node; `role` marks the module's own outputs before they are added."""
        import SimpleITK as sitk
        scene = slicer.mrmlScene
        volumeNode = scene.CreateNodeByClass(className)
        volumeNode.UnRegister(None)
        volumeNode.SetName(scene.GetUniqueNameByString(name))
        if role:
            volumeNode.SetAttribute(OUTPUT_ROLE_ATTRIBUTE, role)
        scene.AddNode(volumeNode)
        volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(self.ijkToRasFromImage(image)))
        slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
        volumeNode.CreateDefaultDisplayNodes()
        return volumeNode

    # --- running the backend -------------------------------------------------------------------

    def startSegmentation(self, inputVolume, modelPath, sampler="sliding_window", overlap=0.5, topK=0,
                          device="auto", returnUncertainty=False, roiNode=None, python=None, backend="auto",
                          threads=None):
        """Reads the scene now (main thread), then runs inference in a worker process."""
        from UNetSegmentLib.worker import WorkerJob
        if not modelPath:
            raise InputError("No model is selected.", "Pick a model or use Add model… to import one.")
        fullImage = self.imageFromVolumeNode(inputVolume)
        image, cropIndex, cropSize = fullImage, None, None
        if roiNode is not None:
            cropIndex, cropSize = self.roiBox(inputVolume, roiNode, self.contextMarginMm(modelPath))
            image = fullImage[cropIndex[0]:cropIndex[0] + cropSize[0], cropIndex[1]:cropIndex[1] + cropSize[1],
                              cropIndex[2]:cropIndex[2] + cropSize[2]]
        k = (int(topK) or None) if sampler == "topk" else None  # 0: the k stored in the model
        worker = WorkerJob(image, str(modelPath), sampler=sampler, overlap=float(overlap), k=k, device=device,
                           return_uncertainty=bool(returnUncertainty), python=python, backend=backend,
                           threads=threads)
        job = SegmentationJob(worker, inputVolume, fullImage, cropIndex, cropSize)
        worker.start()
        return job

    def segment(self, inputVolume, modelPath, outputSegmentation=None, replaceExisting=False,
                addUncertaintyVolume=False, **options):
        """Blocking variant for scripts and the self-test."""
        job = self.startSegmentation(inputVolume, modelPath, returnUncertainty=addUncertaintyVolume, **options)
        job.wait()
        if job.error is not None:
            raise job.error
        return self.applyResult(job, outputSegmentation, replaceExisting, addUncertaintyVolume)

    # --- writing into the scene (main thread only) ---------------------------------------------

    def applyResult(self, job, outputSegmentation=None, replaceExisting=False, addUncertaintyVolume=False):
        """Imports the labelmap as segments; one undo step reverts the whole change."""
        import SimpleITK as sitk
        result, volumeNode = job.result, job.inputVolume
        scene = slicer.mrmlScene
        if outputSegmentation is not None:
            outputSegmentation.SetUndoEnabled(True)
        scene.SaveStateForUndo()
        nodesBefore = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
        if outputSegmentation is None:
            outputSegmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GetUniqueNameByString(f"{volumeNode.GetName()} segmentation"))
            outputSegmentation.CreateDefaultDisplayNodes()
        if outputSegmentation.GetSegmentation().GetNumberOfSegments() == 0:
            outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)

        segmentIds = self._prepareSegments(outputSegmentation, result.labels, replaceExisting)
        labelmapNode = slicer.vtkMRMLLabelMapVolumeNode()  # temporary, never added to the scene
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        labelmapNode.SetIJKToRASMatrix(ijkToRas)
        slicer.util.updateVolumeFromArray(labelmapNode, sitk.GetArrayFromImage(result.labelmap).astype(np.uint8))
        idArray = vtk.vtkStringArray()
        for segmentId in segmentIds:
            idArray.InsertNextValue(segmentId)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmapNode, outputSegmentation, idArray):
            raise UNetSegmentError("Slicer could not import the labelmap into the segmentation.",
                                   "Check the Error Log; try a new output segmentation.")

        if addUncertaintyVolume and result.uncertainty is not None:
            job.uncertaintyVolume = self.addVolumeFromImage(result.uncertainty, f"{volumeNode.GetName()} uncertainty",
                                                            role="uncertainty")
            self._useColorMap(job.uncertaintyVolume)
        for index in range(scene.GetNumberOfNodes()):  # so that one undo also removes what was added
            node = scene.GetNthNode(index)
            if node.GetID() not in nodesBefore:
                node.SetUndoEnabled(True)
        return outputSegmentation

    @staticmethod
    def _useColorMap(volumeNode):
        """Uncertainty 0..1 shown with a perceptual colour map where Slicer provides one."""
        displayNode = volumeNode.GetDisplayNode()
        if displayNode is None:
            return
        for colorId in ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow"):
            if slicer.mrmlScene.GetNodeByID(colorId) is not None:
                displayNode.SetAndObserveColorNodeID(colorId)
                break
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0.0, 1.0)

    def review(self, segmentationNode, volumeNode, uncertaintyNode=None):
        """Segment Editor with the result and its source volume; 3D surfaces; uncertainty as overlay."""
        segmentationNode.CreateClosedSurfaceRepresentation()
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility3D(True)
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=uncertaintyNode or "keep-current",
                                         foregroundOpacity=0.4 if uncertaintyNode is not None else None)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volumeNode)
        else:  # Slicer before 5.2
            editor.setMasterVolumeNode(volumeNode)
        return editor

    @staticmethod
    def _prepareSegments(segmentationNode, labels, replaceExisting):
        """Creates one empty segment per foreground label, in label-value order.

        A segment of the same name is replaced (keeping its ID) only when asked; otherwise the new
        segment gets a distinct name, so earlier work is never silently overwritten.
        """
        segmentation = segmentationNode.GetSegmentation()
        segmentIds = []
        for label in sorted(labels, key=lambda item: item.value):
            if label.value == 0:
                continue
            name, segmentId = label.name, ""
            existingId = segmentation.GetSegmentIdBySegmentName(name)
            if existingId and replaceExisting:
                segmentation.RemoveSegment(existingId)
                segmentId = existingId
            elif existingId:
                copy = 2
                while segmentation.GetSegmentIdBySegmentName(f"{label.name} (UNetSegment {copy})"):
                    copy += 1
                name = f"{label.name} (UNetSegment {copy})"
            segmentIds.append(segmentation.AddEmptySegment(segmentId, name, list(label.color)))
        return segmentIds

    @staticmethod
    def labelmapArrayFromSegments(segmentationNode, segmentNames, referenceVolume):
        """Segments -> one (k, j, i) uint8 array with value i+1 for segmentNames[i]."""
        segmentation = segmentationNode.GetSegmentation()
        labelmap = None
        for value, name in enumerate(segmentNames, start=1):
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            if not segmentId:
                raise InputError(f"Segment '{name}' is missing.", "Run the segmentation again.")
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolume)
            labelmap = np.zeros(mask.shape, np.uint8) if labelmap is None else labelmap
            labelmap[mask > 0] = value
        return labelmap

    # --- the user's training set and fine-tuning (issue 17; UNetSegmentLib.user_dataset, .finetune) ----

    def correctedLabelmap(self, segmentationNode, volumeNode):
        """(volume as SimpleITK image, labelmap of every segment on its grid, {value: segment name}); value
        i+1 is the i-th segment, and the library maps the names to the model's label values."""
        import SimpleITK as sitk
        if segmentationNode is None:
            raise InputError("No segmentation is selected.", "Select the corrected segmentation.")
        image = self.imageFromVolumeNode(volumeNode)
        reference = segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if reference is not None and reference is not volumeNode and reference.GetImageData() is not None:
            made, used = reference.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions()
            if tuple(made) != tuple(used):
                raise GeometryError(f"The segmentation was made on '{reference.GetName()}' (size {tuple(made)}), "
                                    f"not on '{volumeNode.GetName()}' (size {tuple(used)}).",
                                    "Select the volume the segmentation belongs to.")
        segmentation = segmentationNode.GetSegmentation()
        voxels = np.zeros(slicer.util.arrayFromVolume(volumeNode).shape[:3], np.uint8)
        names = {}
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            names[index + 1] = segmentation.GetSegment(segmentId).GetName()
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            voxels[mask > 0] = index + 1
        labelmap = sitk.GetImageFromArray(voxels)
        labelmap.CopyInformation(image)
        return image, labelmap, names

    def addToTrainingSet(self, volumeNode, segmentationNode, modelPath, datasetFolder, replace=False):
        """Saves the volume and its corrected segmentation as a case for the model's label set.

        Raises DuplicateCaseError (with .case_id) when the volume is already a case: the panel asks,
        then calls again with replace=True."""
        from UNetSegmentLib.user_dataset import add_case
        if not modelPath:
            raise InputError("No model is selected.", "Pick the model the correction was made for.")
        if not datasetFolder:
            raise InputError("No training set folder is chosen.", "Choose a folder for your training cases.")
        image, labelmap, names = self.correctedLabelmap(segmentationNode, volumeNode)
        return add_case(datasetFolder, image, labelmap, modelPath, segment_names=names,
                        case_name=volumeNode.GetName(), replace=bool(replace),
                        model_name=os.path.splitext(os.path.basename(os.path.normpath(str(modelPath))))[0])

    def startModelImport(self, folder, python=None):
        """Imports an nnU-Net v2 results folder into the user models folder in a worker process; poll the job."""
        from UNetSegmentLib.interop.nnunet_plans import check_results_folder
        from UNetSegmentLib.worker import CommandJob
        check_results_folder(folder)  # refused here, before a worker starts
        return CommandJob(["import-nnunet", str(folder)], python=python).start()

    def startFineTuning(self, modelPath, datasetFolder, outputPath=None, budgetS=600.0, device="auto",
                        maxIterations=None, python=None):
        """Fine-tunes in a worker process; poll the returned job (progress, loss, result, error, cancel())."""
        from UNetSegmentLib.finetune_worker import FineTuneJob
        if not modelPath:
            raise InputError("No model is selected.", "Pick the model to fine-tune.")
        job = FineTuneJob(str(modelPath), str(datasetFolder), outputPath, budgetS, device=device,
                          max_iterations=maxIterations, python=python)
        return job.start()

    def fineTune(self, modelPath, datasetFolder, outputPath=None, budgetS=600.0, device="auto",
                 maxIterations=None, python=None, timeout=None):
        """Blocking variant for scripts and tests: the worker's result (output, improved, dice_before, ...)."""
        job = self.startFineTuning(modelPath, datasetFolder, outputPath, budgetS, device, maxIterations, python)
        if not job.wait(timeout):
            job.cancel()
        if job.error is not None:
            raise job.error
        return job.result

    @staticmethod
    def modelAfterFineTuning(result, parentPath):
        """The tuned model if it is not worse on the held-out cases; otherwise the parent stays selected."""
        from UNetSegmentLib.finetune_worker import model_to_select
        return model_to_select(result, parentPath)


#
# UNetSegmentTest
#


class UNetSegmentTest(ScriptedLoadableModuleTest):
    """Real inference with the shipped model on the shipped sample, checked against its reference."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if not isTorchInstalled():  # a build machine without PyTorch: report, do not fail the build
            self.skipped = "skipped: PyTorch not installed"
            logging.warning(self.skipped)
            self.delayDisplay(self.skipped)
            return
        self.setUp()
        self.test_ShippedModelOnSample()

    def test_ShippedModelOnSample(self):
        import SimpleITK as sitk
        from UNetSegmentLib.metrics import dice_per_label
        from UNetSegmentLib.model_store import (default_model_path, read_model_metadata, sample_image_path,
                                                sample_reference_path)

        paths = [default_model_path(SELF_TEST_MODALITY), sample_image_path(SELF_TEST_SAMPLE),
                 sample_reference_path(SELF_TEST_SAMPLE)]
        missing = [str(path) for path in paths if not os.path.exists(path)]
        if missing:  # fail, never skip: an extension without its model cannot be used
            raise AssertionError(f"Shipped file(s) missing: {', '.join(missing)}. The extension is incomplete.")
        modelPath, samplePath, referencePath = (str(path) for path in paths)

        self.delayDisplay("Segmenting the shipped sample with the shipped model")
        logic = UNetSegmentLogic()
        volumeNode = logic.addVolumeFromImage(sitk.ReadImage(samplePath), "sample")
        started = time.perf_counter()
        segmentationNode = logic.segment(volumeNode, modelPath)
        seconds = time.perf_counter() - started

        labels = [label for label in read_model_metadata(modelPath).labels if label.value != 0]
        predicted = logic.labelmapArrayFromSegments(segmentationNode, [label.name for label in labels], volumeNode)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(referencePath))
        dice = dice_per_label(predicted, reference, [label.value for label in labels])
        self.dice, self.seconds = dice, seconds
        self.delayDisplay(f"Dice per label {dice} in {seconds:.1f} s")
        for value, score in dice.items():
            self.assertGreaterEqual(score, SELF_TEST_DICE_THRESHOLD,
                                    f"Dice of label {value} is {score:.3f} < {SELF_TEST_DICE_THRESHOLD}")
        self.delayDisplay("Self-test passed")
