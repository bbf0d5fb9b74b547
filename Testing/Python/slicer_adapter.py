"""Runs the unchanged module file `UNetSegment/UNetSegment.py` on Slicer's own Python base classes.

Test scaffolding only; the module never imports it. What runs is real:
- Slicer's pure-Python sources, unmodified, from `../shared/slicer-upstream/v5.10.0/` beside the
  repository: `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper`, `slicer.util`,
  `slicer.i18n`. They are put ahead of slicer-core on the `slicer` package path.
- slicer-core (Kitware's non-Qt build of Slicer's core): the MRML scene, nodes, segmentations logic.
Stand-ins exist only for what is compiled C++ in Slicer (each listed in docs/slicer.md with how it
differs): PythonQt's `qt` and `ctk` (pythonqt_standin.py), `slicer.app` with its module manager,
the module's widget representation (`qSlicerScriptedLoadableModuleWidget`), `slicer.qMRMLWidget`,
`slicer.qMRMLNodeComboBox`, the main window's module selector and the Segment Editor widget.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pythonqt_standin
from pythonqt_standin import PythonQtStyle, QtCore, QtWidgets, processEventsUntil  # noqa: F401

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE_FILE = REPOSITORY / "UNetSegment" / "UNetSegment.py"
UPSTREAM_VERSION = "v5.10.0"
UPSTREAM_MODULES = ("slicer.util", "slicer.i18n", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper")


def upstreamDir() -> Path:
    """`shared/slicer-upstream/<version>` beside the repository (CI clones it with shared/ beside)."""
    override = os.environ.get("UNETSEGMENT_SLICER_UPSTREAM")
    folder = Path(override) if override else REPOSITORY.parent / "shared" / "slicer-upstream" / UPSTREAM_VERSION
    if not (folder / "slicer" / "ScriptedLoadableModule.py").is_file():
        raise RuntimeError(
            f"Slicer's upstream Python sources are missing: {folder} has no slicer/ScriptedLoadableModule.py. "
            "The module tests run on them. Fix: place shared/ (with slicer-upstream/) beside the repository, "
            "or set UNETSEGMENT_SLICER_UPSTREAM to a folder holding Slicer's Base/Python/slicer sources.")
    return folder


qt, ctk = pythonqt_standin.install()
import slicer  # noqa: E402  (slicer-core's meta package; its own util is replaced below)
import vtk  # noqa: E402


# --- qMRML widgets ----------------------------------------------------------------------------------


class qMRMLWidget(PythonQtStyle, QtWidgets.QWidget):
    """A QWidget that holds a scene (`mrmlSceneChanged` signal, `setMRMLScene`, `mrmlScene()`)."""

    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class _SortFilterProxyModel(PythonQtStyle, QtCore.QObject):
    """qMRMLSortFilterProxyModel's filter properties that the module uses (hiddenNodeIDs)."""

    def __init__(self, comboBox):
        QtCore.QObject.__init__(self)
        self._comboBox = comboBox
        self._hiddenNodeIDs = []

    def _getHidden(self):
        return list(self._hiddenNodeIDs)

    def _setHidden(self, ids):
        self._hiddenNodeIDs = [str(i) for i in ids]
        self._comboBox._refresh()

    hiddenNodeIDs = QtCore.Property("QStringList", _getHidden, _setHidden)


class qMRMLNodeComboBox(PythonQtStyle, QtWidgets.QComboBox):
    """Lists scene nodes by the real filter rules: nodeTypes, showChildNodeTypes, hideChildNodeTypes,
    HideFromEditors (unless showHidden), attribute filters, the proxy model's hiddenNodeIDs; with
    noneEnabled false it picks the first listed node, as qMRMLNodeComboBox does."""

    currentNodeChanged = QtCore.Signal(object)
    currentNodeIDChanged = QtCore.Signal(str)

    def __init__(self, parent=None):
        QtWidgets.QComboBox.__init__(self, parent)
        self._scene = None
        self._observerTags = []
        self._lastNodeId = None
        self._nodeTypes = []
        self._hideChildNodeTypes = []
        self._attributes = []
        self._flags = {"showChildNodeTypes": True, "noneEnabled": False, "addEnabled": True, "removeEnabled": True,
                       "renameEnabled": False, "editEnabled": False, "showHidden": False,
                       "selectNodeUponCreation": True}
        self._noneDisplay = "None"
        self._proxy = _SortFilterProxyModel(self)
        QtWidgets.QComboBox.currentIndexChanged.__get__(self).connect(self._emitIfChanged)

    # properties as in qMRMLNodeComboBox.h
    def _getNodeTypes(self):
        return list(self._nodeTypes)

    def _setNodeTypes(self, types_):
        self._nodeTypes = [str(t) for t in types_]
        self._refresh()

    def _getHideChild(self):
        return list(self._hideChildNodeTypes)

    def _setHideChild(self, types_):
        self._hideChildNodeTypes = [str(t) for t in types_]
        self._refresh()

    def _flagProperty(name):  # noqa: N805 - class-body helper
        def getter(self):
            return self._flags[name]

        def setter(self, value):
            self._flags[name] = bool(value)
            self._refresh()

        return QtCore.Property(bool, getter, setter)

    def _getNoneDisplay(self):
        return self._noneDisplay

    def _setNoneDisplay(self, text):
        self._noneDisplay = str(text)
        self._refresh()

    def _getCurrentNodeID(self):
        return QtWidgets.QComboBox.currentData(self) or ""

    def _setCurrentNodeID(self, nodeId):
        self.setCurrentNodeID(nodeId)

    nodeTypes = QtCore.Property("QStringList", _getNodeTypes, _setNodeTypes)
    hideChildNodeTypes = QtCore.Property("QStringList", _getHideChild, _setHideChild)
    showChildNodeTypes = _flagProperty("showChildNodeTypes")
    noneEnabled = _flagProperty("noneEnabled")
    addEnabled = _flagProperty("addEnabled")
    removeEnabled = _flagProperty("removeEnabled")
    renameEnabled = _flagProperty("renameEnabled")
    editEnabled = _flagProperty("editEnabled")
    showHidden = _flagProperty("showHidden")
    selectNodeUponCreation = _flagProperty("selectNodeUponCreation")
    noneDisplay = QtCore.Property(str, _getNoneDisplay, _setNoneDisplay)
    currentNodeID = QtCore.Property(str, _getCurrentNodeID, _setCurrentNodeID)
    del _flagProperty

    def sortFilterProxyModel(self):
        return self._proxy

    def addAttribute(self, nodeType, attributeName, attributeValue=None):
        self._attributes.append((nodeType, attributeName, attributeValue))
        self._refresh()

    def setMRMLScene(self, scene):
        if self._scene is not None:
            for tag in self._observerTags:
                self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observerTags = []
        if scene is not None:
            self._observerTags = [scene.AddObserver(event, lambda *args: self._refresh())
                                  for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node):
        if node.GetHideFromEditors() and not self._flags["showHidden"]:
            return False
        if node.GetID() in self._proxy._hiddenNodeIDs:
            return False
        if any(node.IsA(hidden) for hidden in self._hideChildNodeTypes):
            return False
        for nodeType, name, value in self._attributes:
            if node.IsA(nodeType) and (node.GetAttribute(name) is None
                                       or (value is not None and node.GetAttribute(name) != str(value))):
                return False
        return True

    def _listedNodes(self):
        nodes, seen = [], set()
        if self._scene is None:
            return nodes
        for className in self._nodeTypes:
            for index in range(self._scene.GetNumberOfNodesByClass(className)):
                node = self._scene.GetNthNodeByClass(index, className)
                if not self._flags["showChildNodeTypes"] and node.GetClassName() != className:
                    continue
                if node.GetID() not in seen and self._accepts(node):
                    seen.add(node.GetID())
                    nodes.append(node)
        return nodes

    def _refresh(self):
        currentId = QtWidgets.QComboBox.currentData(self)
        self.blockSignals(True)
        self.clear()
        if self._flags["noneEnabled"]:
            self.addItem(self._noneDisplay, "")
        for node in self._listedNodes():
            self.addItem(node.GetName(), node.GetID())
        index = self.findData(currentId) if currentId else -1
        if index < 0:
            index = 0 if QtWidgets.QComboBox.count(self) else -1
        self.setCurrentIndex(index)
        self.blockSignals(False)
        self._emitIfChanged()

    def _emitIfChanged(self, *args):
        nodeId = QtWidgets.QComboBox.currentData(self) or None
        if nodeId != self._lastNodeId:
            self._lastNodeId = nodeId
            self.currentNodeChanged.emit(self.currentNode())
            self.currentNodeIDChanged.emit(nodeId or "")

    def currentNode(self):
        nodeId = QtWidgets.QComboBox.currentData(self)
        return self._scene.GetNodeByID(nodeId) if (nodeId and self._scene) else None

    def setCurrentNode(self, node):
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeId):
        index = self.findData(nodeId or "")
        if index >= 0:
            self.setCurrentIndex(index)

    def nodeCount(self):
        return len(self._listedNodes())

    def nodeFromIndex(self, index):
        return self._listedNodes()[index]


pythonqt_standin.QUiLoader.customWidgets.update(qMRMLNodeComboBox=qMRMLNodeComboBox, qMRMLWidget=qMRMLWidget)


# --- the application: slicer.app, module manager, main window -----------------------------------------


class _ModuleManager(PythonQtStyle, QtCore.QObject):
    moduleAboutToBeUnloaded = QtCore.Signal(str)

    def __init__(self):
        QtCore.QObject.__init__(self)
        self._modules = {}

    def module(self, name):
        return self._modules.get(name)

    def factoryManager(self):
        manager = types.SimpleNamespace(loadedModuleNames=lambda: list(self._modules))
        return manager


class _ModuleSelector(PythonQtStyle, QtCore.QObject):
    def __init__(self):
        QtCore.QObject.__init__(self)
        self.selected = []

    def selectModule(self, name):
        self.selected.append(name)
        module = slicer.app.moduleManager().module(name)
        if module is not None and hasattr(module, "widgetRepresentation"):
            module.widgetRepresentation()


class qSlicerMainWindow(PythonQtStyle, QtWidgets.QWidget):
    def __init__(self):
        QtWidgets.QWidget.__init__(self)
        QtCore.QObject.setObjectName(self, "qSlicerMainWindow")
        self._selector = _ModuleSelector()

    def moduleSelector(self):
        return self._selector

    def statusBar(self):
        return None


class _CommandOptions:
    runPythonAndExit = False
    noMainWindow = True


class qSlicerApplication(PythonQtStyle, QtWidgets.QApplication):
    def __init__(self, argv):
        QtWidgets.QApplication.__init__(self, argv)
        self._moduleManager = _ModuleManager()
        self._options = _CommandOptions()
        self.mainWindowStandIn = qSlicerMainWindow()
        self.exitCodes = []

    def moduleManager(self):
        return self._moduleManager

    def commandOptions(self):
        return self._options

    def userSettings(self):
        return qt.QSettings()

    def settings(self):
        return qt.QSettings()

    def layoutManager(self):
        return None

    def translate(self, context, text):
        return QtCore.QCoreApplication.translate(context, text)

    def exit(self, status=0):
        self.exitCodes.append(status)


# --- Slicer's module machinery: registration and widget representation --------------------------------


class qSlicerScriptedLoadableModule(PythonQtStyle, QtCore.QObject):
    """What Slicer passes as `parent` to the module class: a C++ module with settable metadata."""

    def __init__(self, name, path):
        QtCore.QObject.__init__(self)
        self.name = name
        self.path = str(path)
        self.title = ""
        self.categories = []
        self.dependencies = []
        self.contributors = []
        self.helpText = ""
        self.acknowledgementText = ""
        self.icon = None
        self.instance = None
        self._widget = None

    def widgetRepresentation(self):
        """Created on first use, like Slicer: widget class(parent=representation), then setup()."""
        if self._widget is None:
            pythonModule = sys.modules[self.name]
            representation = qSlicerScriptedLoadableModuleWidget()
            widget = getattr(pythonModule, self.name + "Widget")(representation)
            representation._self = widget
            setattr(slicer.modules, self.name + "Widget", widget)
            widget.setup()
            self._widget = representation
        return self._widget

    def logic(self):
        return None


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The module panel's C++ side: `isEntered`, `self()` returning the Python widget, enter/exit."""

    def __init__(self):
        qMRMLWidget.__init__(self)
        QtWidgets.QVBoxLayout(self)
        self.setMRMLScene(slicer.mrmlScene)
        self._self = None
        self._entered = False

    def _getEntered(self):
        return self._entered

    isEntered = QtCore.Property(bool, _getEntered)

    def self(self):
        return self._self

    def reload(self):
        """After slicer.util.reloadScriptedModule re-imported the file: a new widget from the new module."""
        name = self._self.moduleName
        widget = getattr(sys.modules[name], name + "Widget")(self)
        self._self = widget
        setattr(slicer.modules, name + "Widget", widget)
        widget.setup()
        if self._entered:
            widget.enter()

    def enter(self):
        self._entered = True
        self._self.enter()

    def exit(self):
        self._entered = False
        self._self.exit()


class SegmentEditorWidgetStandIn:
    """qMRMLSegmentEditorWidget's selection calls, recorded (the Segment Editor module is compiled)."""

    def __init__(self):
        self.segmentationNode = None
        self.sourceVolumeNode = None

    def setSegmentationNode(self, node):
        self.segmentationNode = node

    def setSourceVolumeNode(self, node):
        self.sourceVolumeNode = node


class _SegmentEditorModule(qSlicerScriptedLoadableModule):
    def __init__(self):
        super().__init__("SegmentEditor", "")
        self.editorStandIn = SegmentEditorWidgetStandIn()

    def widgetRepresentation(self):
        holder = types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=self.editorStandIn))
        return holder


# --- installing it all ----------------------------------------------------------------------------------


def _useUpstreamSources():
    folder = upstreamDir() / "slicer"
    if str(folder) not in slicer.__path__:
        slicer.__path__.insert(0, str(folder))
    for name in UPSTREAM_MODULES:
        sys.modules.pop(name, None)
    for name in UPSTREAM_MODULES:
        module = importlib.import_module(name)
        setattr(slicer, name.split(".")[1], module)
        assert Path(module.__file__).resolve().is_relative_to(folder.resolve()), module.__file__


def install():
    """Idempotent: the application as Slicer would provide it, then Slicer's own Python sources."""
    if getattr(slicer, "mrmlScene", None) is not None:
        return
    app = QtWidgets.QApplication.instance() or qSlicerApplication([])
    QtCore.QCoreApplication.setOrganizationName("UNetSegmentTests")  # QSettings never touch real settings
    scene = slicer.vtkMRMLScene()
    scene.SetUndoOn()  # Slicer's "enable undo" application setting
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentationsLogic.SetMRMLScene(scene)  # registers the representation converters, as Slicer does
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLScene(scene)

    slicer.mrmlScene = scene
    slicer.app = app
    slicer.qMRMLWidget = qMRMLWidget
    slicer.qSlicerWidget = qMRMLWidget
    slicer.qMRMLNodeComboBox = qMRMLNodeComboBox
    slicer.qSlicerScriptedLoadableModule = qSlicerScriptedLoadableModule
    for name in ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLScreenShotDialog", "qMRMLUtils",
                 "qMRMLSubjectHierarchyTreeView", "qMRMLSegmentSelectorWidget"):
        setattr(slicer, name, type(name, (pythonqt_standin._Missing,), {}))
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentationsLogic),
        volumes=types.SimpleNamespace(logic=lambda: volumesLogic),
        segmenteditor=_SegmentEditorModule())
    app._moduleManager._modules["SegmentEditor"] = slicer.modules.segmenteditor
    _useUpstreamSources()


def registerModule():
    """What Slicer does at startup for a scripted module: import the file, create the module object."""
    install()
    if "UNetSegment" in sys.modules:
        return sys.modules["UNetSegment"]
    moduleObject = qSlicerScriptedLoadableModule("UNetSegment", MODULE_FILE)
    spec = importlib.util.spec_from_file_location("UNetSegment", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["UNetSegment"] = module
    spec.loader.exec_module(module)
    moduleObject.instance = module.UNetSegment(moduleObject)
    slicer.modules.unetsegment = moduleObject
    slicer.app.moduleManager()._modules["UNetSegment"] = moduleObject
    return module


def loadModule():
    return registerModule()


def createPanel():
    """A fresh module panel as Slicer builds it (representation -> Widget(parent) -> setup -> enter)."""
    module = registerModule()
    moduleObject = slicer.modules.unetsegment
    moduleObject._widget = None
    representation = moduleObject.widgetRepresentation()
    representation.enter()
    return representation.self()


def closePanel(widget):
    """Leave and unload the panel as Slicer does (exit, then moduleAboutToBeUnloaded -> cleanup)."""
    representation = widget.parent
    if representation.isEntered:
        representation.exit()
    slicer.app.moduleManager().moduleAboutToBeUnloaded.emit(widget.moduleName)
    for selector in ("inputVolumeSelector", "outputSegmentationSelector", "roiSelector"):
        comboBox = getattr(widget.ui, selector, None)
        if comboBox is not None:
            comboBox.setMRMLScene(None)
