"""Lets the unchanged module file `UNetSegment/UNetSegment.py` run outside the Slicer application.

Test scaffolding only; the module never imports it. Everything that slicer-core (Kitware's non-Qt
build of Slicer's core) provides is used as is: the MRML scene, volume and segmentation nodes, the
segmentations logic, `slicer.util`. Only what lives in the Slicer *application* is stood in for,
each piece as small as the module needs:

- `qt`: PySide6 (offscreen) under PythonQt's module name, plus `QUiLoader` that knows the stand-ins.
- `ctk.ctkCollapsibleButton`: a QGroupBox with a `collapsed` property.
- `qMRMLNodeComboBox`: a QComboBox listing scene nodes of its `nodeTypes`, kept in sync by observing
  the real scene.
- `slicer.ScriptedLoadableModule`: the four base classes, with Slicer's parameter-node convention
  (a singleton `vtkMRMLScriptedModuleNode` tagged with the module name).
- `slicer.parameterNodeWrapper`: typed properties stored as strings / node references in that real
  node, and `connectGui` binding widgets by their `SlicerParameterName` dynamic property.
- `slicer.mrmlScene`, `slicer.app.processEvents`, `slicer.modules.segmentations.logic()`.
- `slicer.util.childWidgetVariables`: PythonQt exposes `objectName` as `.name`; PySide6 does not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
import typing
import unittest
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402

MODULE_FILE = Path(__file__).resolve().parents[2] / "UNetSegment" / "UNetSegment.py"


# --- qt and ctk ------------------------------------------------------------------------------------


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.collapsed = False


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Lists the scene's nodes of `nodeTypes` (set from the .ui as a dynamic property)."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observerTags = []
        self._lastNodeId = None
        self.currentIndexChanged.connect(self._emitIfChanged)

    def setMRMLScene(self, scene):
        for tag in self._observerTags:
            self._scene.RemoveObserver(tag)
        self._scene = scene
        if scene is None:
            self._observerTags = []
            return
        self._observerTags = [scene.AddObserver(event, lambda *args: self._refresh())
                              for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self._refresh()

    def _refresh(self):
        currentId = self.currentData()
        self.blockSignals(True)
        self.clear()
        if self.property("noneEnabled"):
            self.addItem(self.property("noneDisplay") or "None", "")
        for className in self.property("nodeTypes") or []:
            for index in range(self._scene.GetNumberOfNodesByClass(className)):
                node = self._scene.GetNthNodeByClass(index, className)
                if not node.GetHideFromEditors():
                    self.addItem(node.GetName(), node.GetID())
        index = self.findData(currentId) if currentId else -1
        self.setCurrentIndex(index if index >= 0 else (0 if self.count() else -1))
        self.blockSignals(False)
        self._emitIfChanged()

    def _emitIfChanged(self, *args):
        nodeId = self.currentData() or None
        if nodeId != self._lastNodeId:
            self._lastNodeId = nodeId
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        nodeId = self.currentData()
        return self._scene.GetNodeByID(nodeId) if (nodeId and self._scene) else None

    def setCurrentNode(self, node):
        index = self.findData(node.GetID() if node is not None else "")
        if index >= 0:
            self.setCurrentIndex(index)


class _StandInUiLoader(QUiLoader):
    def __init__(self, parent=None):
        super().__init__(parent)
        for widgetClass in (ctkCollapsibleButton, qMRMLNodeComboBox):
            self.registerCustomWidget(widgetClass)


def _makeQtModule():
    qt = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if not name.startswith("_"):
                setattr(qt, name, getattr(source, name))
    qt.QUiLoader = _StandInUiLoader
    return qt


def _makeCtkModule():
    ctk = types.ModuleType("ctk")
    ctk.ctkCollapsibleButton = ctkCollapsibleButton
    return ctk


def childWidgetVariables(widget):
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        if child.objectName():
            setattr(ui, child.objectName(), child)
    return ui


# --- parameterNodeWrapper --------------------------------------------------------------------------


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, name, value):
        if value not in self.choices:
            raise ValueError(f"{name}={value!r} is not one of {self.choices}")


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, name, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{name}={value!r} is outside [{self.minimum}, {self.maximum}]")


def _isNodeType(valueType):
    return isinstance(valueType, type) and issubclass(valueType, slicer.vtkMRMLNode)


def _parse(valueType, text):
    if valueType is bool:
        return text == "True"
    return valueType(text)


def parameterNodeWrapper(cls):
    """Typed attributes stored in a real vtkMRMLScriptedModuleNode, like Slicer's wrapper."""
    fields = {}
    for name, annotation in typing.get_type_hints(cls, include_extras=True).items():
        validators = []
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *validators = typing.get_args(annotation)
        fields[name] = (annotation, getattr(cls, name, None), validators)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._guiBindings = {}
        for name, (valueType, default, _) in fields.items():
            if not _isNodeType(valueType) and not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, str(default))

    def makeProperty(name, valueType, validators):
        def getter(self):
            if _isNodeType(valueType):
                return self.parameterNode.GetNodeReference(name)
            return _parse(valueType, self.parameterNode.GetParameter(name))

        def setter(self, value):
            if _isNodeType(valueType):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                return
            value = valueType(value)
            for validator in validators:
                validator.validate(name, value)
            self.parameterNode.SetParameter(name, str(value))

        return property(getter, setter)

    def connectGui(self, ui):
        """Binds widgets whose `SlicerParameterName` names a field; returns a tag for disconnectGui."""
        bindings = []
        for widget in vars(ui).values():
            name = widget.property("SlicerParameterName") if isinstance(widget, QtCore.QObject) else None
            if name not in fields:
                continue
            if isinstance(widget, qMRMLNodeComboBox):
                signal, push = widget.currentNodeChanged, widget.setCurrentNode
                pull = widget.currentNode
            elif isinstance(widget, QtWidgets.QAbstractButton):
                signal, push, pull = widget.toggled, widget.setChecked, widget.isChecked
            else:  # spin boxes
                signal, push, pull = widget.valueChanged, widget.setValue, widget.value

            def toNode(*args, name=name, pull=pull):
                setattr(self, name, pull())

            signal.connect(toNode)
            bindings.append((widget, signal, toNode, name, push))

        def toWidgets(*args):
            for widget, _, _, name, push in bindings:
                widget.blockSignals(True)
                push(getattr(self, name))
                widget.blockSignals(False)

        toWidgets()
        for widget, _, _, name, _ in bindings:  # like Slicer: an empty node reference takes the combo's pick
            if isinstance(widget, qMRMLNodeComboBox) and getattr(self, name) is None and widget.currentNode():
                setattr(self, name, widget.currentNode())
        observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, toWidgets)
        tag = object()
        self._guiBindings[tag] = (bindings, observer)
        return tag

    def disconnectGui(self, tag):
        bindings, observer = self._guiBindings.pop(tag)
        self.parameterNode.RemoveObserver(observer)
        for _, signal, toNode, _, _ in bindings:
            signal.disconnect(toNode)

    namespace = {"__init__": __init__, "connectGui": connectGui, "disconnectGui": disconnectGui,
                 "__bool__": lambda self: True}
    for name, (valueType, _, validators) in fields.items():
        namespace[name] = makeProperty(name, valueType, validators)
    return type(cls.__name__, (), namespace)


# --- ScriptedLoadableModule base classes -----------------------------------------------------------


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len("Widget")]
        self.parent = parent if parent is not None else QtWidgets.QWidget()
        self.parent.isEntered = False
        if self.parent.layout() is None:
            QtWidgets.QVBoxLayout(self.parent)
        self.layout = self.parent.layout()

    def setup(self):
        pass

    def resourcePath(self, filename):
        moduleDir = os.path.dirname(sys.modules[type(self).__module__].__file__)
        return os.path.join(moduleDir, "Resources", filename)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len("Logic")]

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetSingletonTag(self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages = []

    def delayDisplay(self, message, msec=None):
        self.messages.append(message)
        logging.info(message)


# --- installing it all -----------------------------------------------------------------------------


def install():
    """Idempotent: a real scene and the stand-ins, as the Slicer application would provide them."""
    if getattr(slicer, "mrmlScene", None) is not None:
        return
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    scene = slicer.vtkMRMLScene()
    scene.SetUndoOn()  # Slicer's "enable undo" application setting
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentationsLogic.SetMRMLScene(scene)  # registers the representation converters, as Slicer does

    slicer.mrmlScene = scene
    slicer.app = app
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLScene(scene)
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentationsLogic),
                              volumes=types.SimpleNamespace(logic=lambda: volumesLogic))
    slicer.util.childWidgetVariables = childWidgetVariables
    sys.modules["qt"] = _makeQtModule()
    sys.modules["ctk"] = _makeCtkModule()

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for item in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                 ScriptedLoadableModuleTest):
        setattr(scripted, item.__name__, item)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.Choice, wrapper.WithinRange = parameterNodeWrapper, Choice, WithinRange
    for module in (scripted, wrapper):
        sys.modules[module.__name__] = module
        setattr(slicer, module.__name__.split(".")[1], module)


def loadModule():
    """Imports UNetSegment/UNetSegment.py as Slicer would (by file), after `install()`."""
    install()
    if "UNetSegment" in sys.modules:
        return sys.modules["UNetSegment"]
    spec = importlib.util.spec_from_file_location("UNetSegment", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["UNetSegment"] = module
    spec.loader.exec_module(module)
    slicer.modules.unetsegment = types.SimpleNamespace(path=str(MODULE_FILE))
    return module


def processEventsUntil(condition, timeout_s=60.0):
    """The Slicer event loop, in small steps, until `condition()` or the timeout."""
    import time
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        QtWidgets.QApplication.processEvents(QtCore.QEventLoop.AllEvents, 20)
        time.sleep(0.01)
    return True
