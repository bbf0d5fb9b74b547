"""UNetSegment: segment CT/MR volumes with U-Net family checkpoints, from inside 3D Slicer.

The module is deliberately thin: every computation (preprocessing, inference, resampling) lives in
the pure-Python backend `UNetSegmentLib`. The Logic only converts MRML nodes to and from SimpleITK
images and drives the backend; the Widget only collects settings and shows progress.
"""

import importlib.util
import logging
import os
import sys
import threading
import time
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = [("sliding_window", "Sliding window"), ("topk", "Top-k patches"), ("whole", "Whole volume")]
DEVICES = [("auto", "Auto (GPU if available)"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)")]
SELF_TEST_DICE_THRESHOLD = 0.80
POLL_INTERVAL_MS = 100


def ensureLibraryImportable():
    """Installed extensions have UNetSegmentLib beside the module; source checkouts one folder up."""
    if importlib.util.find_spec("UNetSegmentLib") is None and EXTENSION_ROOT not in sys.path:
        sys.path.insert(0, EXTENSION_ROOT)


def isTorchInstalled():
    return importlib.util.find_spec("torch") is not None


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
        self.parent.dependencies = []
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
    modelPath: str = ""
    sampler: Annotated[str, Choice([key for key, _ in SAMPLERS])] = "sliding_window"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    topK: Annotated[int, WithinRange(0, 10000)] = 0
    device: Annotated[str, Choice([key for key, _ in DEVICES])] = "auto"
    replaceExistingSegments: bool = False
    addUncertaintyVolume: bool = False


#
# UNetSegmentWidget
#


class UNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._modelEntries = []
        self._timer = None
        self._lastRunSeconds = {}  # model path -> seconds of the last run, for the details line

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        for selector in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector):
            selector.setMRMLScene(slicer.mrmlScene)

        self.logic = UNetSegmentLogic()
        for key, text in SAMPLERS:
            self.ui.samplerSelector.addItem(text, key)
        for key, text in DEVICES:
            self.ui.deviceSelector.addItem(text, key)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelSelector.currentIndexChanged.connect(self.onModelChanged)
        self.ui.samplerSelector.currentIndexChanged.connect(self.onSamplerChanged)
        self.ui.deviceSelector.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.addModelButton.clicked.connect(self.onAddModel)
        self.ui.installTorchButton.clicked.connect(self.offerTorchInstall)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)

        self.ui.installTorchButton.setVisible(not isTorchInstalled())
        self.ui.progressBar.setVisible(False)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
            self._job.wait()
        self.exit()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if parameterNode:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.showSettingsFromParameterNode()

    def showSettingsFromParameterNode(self):
        """The model, sampler and device combo boxes show labels but store keys: synced by hand."""
        node = self._parameterNode
        listedPaths = [str(entry.path) for entry in self._modelEntries]
        if node.modelPath not in listedPaths and listedPaths:  # none chosen yet, or the file was removed
            node.modelPath = listedPaths[0]
        self._selectItemData(self.ui.modelSelector, node.modelPath)
        self._selectItemData(self.ui.samplerSelector, node.sampler)
        self._selectItemData(self.ui.deviceSelector, node.device)
        self.updateModelDetails()

    @staticmethod
    def _selectItemData(comboBox, data):
        index = comboBox.findData(data)
        if index >= 0 and index != comboBox.currentIndex:
            comboBox.setCurrentIndex(index)

    def refreshModels(self, selectPath=None):
        from UNetSegmentLib.model_store import list_models
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        try:
            self._modelEntries = list(list_models())
        except UNetSegmentError as error:
            self._modelEntries = []
            self.showStatus(str(error), isError=True)
        for entry in self._modelEntries:
            invalid = "" if entry.metadata is not None else ", invalid"
            self.ui.modelSelector.addItem(f"{entry.name} ({entry.source}{invalid})", str(entry.path))
        self.ui.modelSelector.blockSignals(False)
        if selectPath is not None and self._parameterNode:
            self._parameterNode.modelPath = str(selectPath)
        if self._parameterNode:
            self.showSettingsFromParameterNode()

    def selectedModelEntry(self):
        path = self.ui.modelSelector.currentData
        path = path() if callable(path) else path
        for entry in self._modelEntries:
            if str(entry.path) == path:
                return entry
        return None

    def onModelChanged(self, index=None):
        entry = self.selectedModelEntry()
        if self._parameterNode and entry is not None:
            self._parameterNode.modelPath = str(entry.path)
        self.updateModelDetails()

    def onSamplerChanged(self, index=None):
        if self._parameterNode:
            self._parameterNode.sampler = self._currentData(self.ui.samplerSelector)
        self.updateModelDetails()

    def onDeviceChanged(self, index=None):
        if self._parameterNode:
            self._parameterNode.device = self._currentData(self.ui.deviceSelector)

    @staticmethod
    def _currentData(comboBox):
        data = comboBox.currentData
        return data() if callable(data) else data

    def updateModelDetails(self):
        entry = self.selectedModelEntry()
        metadata = entry.metadata if entry is not None else None
        supportsTopK = metadata is not None and metadata.sampler == "topk"
        samplerModel = self.ui.samplerSelector.model()
        topKIndex = self.ui.samplerSelector.findData("topk")
        samplerModel.item(topKIndex).setEnabled(supportsTopK)
        sampler = self._currentData(self.ui.samplerSelector)
        if sampler == "topk" and not supportsTopK:
            self._selectItemData(self.ui.samplerSelector, "sliding_window")
            sampler = "sliding_window"
        self.ui.topKSpinBox.setEnabled(sampler == "topk")
        self.ui.overlapSpinBox.setEnabled(sampler == "sliding_window")
        if entry is None:
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
        """Validates the checkpoint at once, so a foreign file is refused before it is listed."""
        from UNetSegmentLib.model_store import add_user_model
        try:
            entry = add_user_model(path)
        except UNetSegmentError as error:
            self.showStatus(str(error), isError=True)
            return None
        self.refreshModels(selectPath=getattr(entry, "path", None))
        self.showStatus(f"Added model {getattr(entry, 'name', path)}.")
        return entry

    def offerTorchInstall(self):
        """Never installs silently: PyTorch Utils asks the user to confirm."""
        if not hasattr(slicer.modules, "pytorchutils"):
            self.showStatus("PyTorch is not installed and the PyTorch extension is missing. Fix: install "
                            "the 'PyTorch' extension from the Extensions Manager, restart Slicer.", isError=True)
            return False
        import PyTorchUtils
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.installTorch(askConfirmation=True):
            self.showStatus("PyTorch was not installed. Fix: click Install PyTorch… and confirm.", isError=True)
            return False
        self.ui.installTorchButton.setVisible(False)
        return True

    def onSegmentButton(self):
        if self._job is not None:
            self._job.cancel()
            self.showStatus("Cancelling…")
            return
        if not isTorchInstalled() and not self.offerTorchInstall():
            return
        node = self._parameterNode
        try:
            self._job = self.logic.startSegmentation(
                node.inputVolume, node.modelPath, sampler=node.sampler, overlap=node.overlap,
                topK=node.topK, device=node.device, returnUncertainty=node.addUncertaintyVolume)
        except UNetSegmentError as error:
            self.showStatus(str(error), isError=True)
            return
        self.ui.segmentButton.setText("Cancel")
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.showStatus("Segmenting…")
        self._timer.start()

    def pollJob(self):
        """Runs on the main thread, so the scene is only ever touched here."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        progress = job.progress
        if progress is not None and progress.total > 0:
            self.ui.progressBar.setMaximum(progress.total)
            self.ui.progressBar.setValue(progress.done)
            self.ui.progressBar.setFormat(describeProgress(progress))
        if not job.finished:
            return
        self._timer.stop()
        self._job = None
        self.ui.segmentButton.setText("Segment")
        self.ui.progressBar.setVisible(False)
        if job.error is not None:
            self.showStatus(str(job.error), isError=not isinstance(job.error, Cancelled))
            return
        node = self._parameterNode
        try:
            segmentation = self.logic.applyResult(
                job, outputSegmentation=node.outputSegmentation,
                replaceExisting=node.replaceExistingSegments, addUncertaintyVolume=node.addUncertaintyVolume)
        except UNetSegmentError as error:
            self.showStatus(str(error), isError=True)
            return
        node.outputSegmentation = segmentation
        self._lastRunSeconds[str(node.modelPath)] = job.result.seconds
        self.updateModelDetails()
        notes = (job.result.stats or {}).get("fallbacks") or []
        self.showStatus(f"Done in {job.result.seconds:.1f} s: {len(job.result.labels) - 1} segment(s) in "
                        f"'{segmentation.GetName()}'." + "".join(f"\nNote: {note}" for note in notes))

    @property
    def isRunning(self):
        return self._job is not None

    def showStatus(self, text, isError=False):
        self.ui.statusLabel.setText(text)
        self.ui.statusLabel.setStyleSheet("color: red" if isError else "")
        (logging.error if isError else logging.info)(text)


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


class SegmentationJob:
    """Backend run in a worker thread; torch releases the GIL, so the GUI keeps responding.

    The worker never touches the MRML scene: it only fills `progress`, then `result` or `error`.
    """

    def __init__(self, image, inputVolume, run):
        from UNetSegmentLib.progress import CancelToken
        self.image = image
        self.inputVolume = inputVolume
        self.cancelToken = CancelToken()
        self.progress = None
        self.result = None
        self.error = None
        self._finished = threading.Event()
        self._run = run
        self._thread = threading.Thread(target=self._work, name="UNetSegment worker", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _work(self):
        try:
            self.result = self._run(self.image, progress=self._onProgress, cancel=self.cancelToken)
        except UNetSegmentError as error:
            self.error = error
        except Exception as error:  # keep the GUI alive; the status line shows what failed
            logging.exception("UNetSegment inference failed")
            self.error = UNetSegmentError(f"Inference failed: {error}",
                                          "See the Python console for details and report the problem.")
        finally:
            self._finished.set()

    def _onProgress(self, progress):
        self.progress = progress

    def cancel(self):
        self.cancelToken.cancel()

    @property
    def finished(self):
        return self._finished.is_set()

    def wait(self, timeout=None):
        return self._finished.wait(timeout)


class UNetSegmentLogic(ScriptedLoadableModuleLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return UNetSegmentParameterNode(super().getParameterNode())

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

    def addVolumeFromImage(self, image, name, className="vtkMRMLScalarVolumeNode"):
        """SimpleITK image -> new volume node (the self-test uses this to load the sample)."""
        import SimpleITK as sitk
        volumeNode = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GetUniqueNameByString(name))
        volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(self.ijkToRasFromImage(image)))
        slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
        volumeNode.CreateDefaultDisplayNodes()
        return volumeNode

    # --- running the backend -------------------------------------------------------------------

    def startSegmentation(self, inputVolume, modelPath, sampler="sliding_window", overlap=0.5, topK=0,
                          device="auto", returnUncertainty=False):
        """Reads the scene now (main thread), then runs inference in a worker thread."""
        from UNetSegmentLib.pipeline import segment_image
        if not modelPath:
            raise InputError("No model is selected.", "Pick a model or use Add model… to import one.")
        image = self.imageFromVolumeNode(inputVolume)
        k = (int(topK) or None) if sampler == "topk" else None  # 0: the k stored in the model

        def run(image, progress, cancel):
            return segment_image(image, str(modelPath), sampler=sampler, overlap=float(overlap), k=k,
                                 device=device, return_uncertainty=bool(returnUncertainty),
                                 progress=progress, cancel=cancel)

        return SegmentationJob(image, inputVolume, run).start()

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
            self.addVolumeFromImage(result.uncertainty, f"{volumeNode.GetName()} uncertainty")
        for index in range(scene.GetNumberOfNodes()):  # so that one undo also removes what was added
            node = scene.GetNthNode(index)
            if node.GetID() not in nodesBefore:
                node.SetUndoEnabled(True)
        return outputSegmentation

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


#
# UNetSegmentTest
#


class UNetSegmentTest(ScriptedLoadableModuleTest):
    """Real inference with the shipped model on the shipped sample, checked against its reference."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ShippedModelOnSample()

    def test_ShippedModelOnSample(self):
        import SimpleITK as sitk
        from UNetSegmentLib.checkpoint import read_checkpoint_metadata
        from UNetSegmentLib.metrics import dice_per_label
        from UNetSegmentLib.model_store import default_model_path, sample_image_path, sample_reference_path

        paths = [default_model_path(), sample_image_path(), sample_reference_path()]
        missing = [str(path) for path in paths if not os.path.isfile(path)]
        if missing:  # fail, never skip: an extension without its model cannot be used
            raise AssertionError(f"Shipped file(s) missing: {', '.join(missing)}. The extension is incomplete.")
        modelPath, samplePath, referencePath = (str(path) for path in paths)

        self.delayDisplay("Segmenting the shipped sample with the shipped model")
        logic = UNetSegmentLogic()
        volumeNode = logic.addVolumeFromImage(sitk.ReadImage(samplePath), "sample_ct")
        started = time.perf_counter()
        segmentationNode = logic.segment(volumeNode, modelPath)
        seconds = time.perf_counter() - started

        labels = [label for label in read_checkpoint_metadata(modelPath).labels if label.value != 0]
        predicted = logic.labelmapArrayFromSegments(segmentationNode, [label.name for label in labels], volumeNode)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(referencePath))
        dice = dice_per_label(predicted, reference, [label.value for label in labels])
        self.dice, self.seconds = dice, seconds
        self.delayDisplay(f"Dice per label {dice} in {seconds:.1f} s")
        for value, score in dice.items():
            self.assertGreaterEqual(score, SELF_TEST_DICE_THRESHOLD,
                                    f"Dice of label {value} is {score:.3f} < {SELF_TEST_DICE_THRESHOLD}")
        self.delayDisplay("Self-test passed")
