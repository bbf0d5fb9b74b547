"""Stand-ins for what is compiled C++ in Slicer's Python: PythonQt's `qt` and CTK's `ctk` modules.

Test scaffolding only (documented in docs/slicer.md, "Stand-ins"). Built on PySide6 (offscreen),
with PythonQt's conventions, because Slicer's real Python base classes (slicer-upstream) rely on them:

- Qt properties are Python attributes (`spinBox.value = 3`, `checkBox.checked`, `label.text`), and
  shadow the getter methods of the same name, as in PythonQt; `obj.name` is the objectName and
  `obj.className()` exists; `obj.connect("signal(args)", slot)` connects by signature.
- Widgets created by `qt.QUiLoader` (and by the module) are these PythonQt-style classes, so that
  `type(widget) == qt.QCheckBox` holds as the parameter node wrapper's GUI connectors expect.
- The event loop holds the GIL between ticks, like PythonQt: `processEventsUntil` calls Qt's
  QCoreApplication::processEvents (timers fire, their Python slots run) and then waits for the next
  tick (100 ms) inside C calls made through `ctypes.PyDLL`, which does NOT release the GIL (PySide
  would release it around processEvents, and `time.sleep` releases it). A Python thread therefore
  only gets the GIL when the main thread returns to Python bytecode, about ten times a second: on
  this project's machine a spinning thread gets ~25 % of its free-running CPU, the same share as the
  issue-12 measurement in Slicer (4.5 s of inference took 20.2 s in a thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
import types

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader as _PySideUiLoader  # noqa: E402

_READING = set()  # (object id, property) being read right now
TICK_S = 0.1  # idle wait between event passes: Python runs (and threads get the GIL) ~10x per second
SWITCH_INTERVAL_S = 0.0005


class PythonQtStyle:
    """Mixin: Qt properties as attributes, `name`, `className()`, connect by signature."""

    def __getattribute__(self, name):
        if name[:1] != "_":
            metaObject = type(self).staticMetaObject  # static: no per-call wrapper that shiboken may free
            index = metaObject.indexOfProperty(name)
            key = (id(self), name)
            if index >= 0 and key not in _READING:
                # reading a property can call a virtual getter (QProgressBar.text), and shiboken looks
                # for a Python override by attribute name: that lookup must find the method, not recurse
                _READING.add(key)
                try:
                    return metaObject.property(index).read(self)
                finally:
                    _READING.discard(key)
            if name == "name":
                return QtCore.QObject.objectName(self)
            if name in _OWN_METHODS:  # PySide resolves its own connect/disconnect first otherwise
                return types.MethodType(_OWN_METHODS[name], self)
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name[:1] != "_":
            metaObject = type(self).staticMetaObject  # static: no per-call wrapper that shiboken may free
            index = metaObject.indexOfProperty(name)
            if index >= 0:
                if isinstance(value, tuple):  # PythonQt converts any sequence to a QStringList / QVariantList
                    value = list(value)
                if not metaObject.property(index).write(self, value):
                    raise AttributeError(f"Property '{name}' of {type(self).__name__} cannot be set to {value!r}")
                return
            if name == "name":
                QtCore.QObject.setObjectName(self, value)
                return
        super().__setattr__(name, value)

    def className(self):
        return type(self).__name__

    def connect(self, signature, slot):
        """PythonQt: `obj.connect("clicked()", slot)`."""
        return getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature, slot=None):
        signal = getattr(self, signature.split("(")[0])
        return signal.disconnect(slot) if slot is not None else signal.disconnect()


_OWN_METHODS = {name: PythonQtStyle.__dict__[name] for name in ("connect", "disconnect", "className")}

_WIDGET_CLASSES = ("QWidget", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QSpinBox",
                   "QDoubleSpinBox", "QComboBox", "QLabel", "QProgressBar", "QGroupBox", "QLineEdit", "QTextEdit",
                   "QPlainTextEdit", "QSlider", "QDialog", "QFrame", "QMenu", "QMainWindow", "QScrollArea",
                   "QTabWidget", "QStackedWidget", "QSplitter", "QListWidget", "QTreeWidget", "QTableWidget",
                   "QMessageBox", "QFileDialog")
_OBJECT_CLASSES = ("QTimer", "QAction", "QSettings", "QProcess")


def _pythonQtClass(base):
    return type(base.__name__, (PythonQtStyle, base), {"__module__": "qt"})


class ctkCollapsibleButton(PythonQtStyle, QtWidgets.QGroupBox):
    """CTK's collapsible section: a container with `text` and `collapsed` properties."""

    def __init__(self, parent=None):
        QtWidgets.QGroupBox.__init__(self, parent)
        self._collapsed = False

    def _getText(self):
        return QtWidgets.QGroupBox.title(self)

    def _setText(self, text):
        QtWidgets.QGroupBox.setTitle(self, text)

    def _getCollapsed(self):
        return self._collapsed

    def _setCollapsed(self, value):
        self._collapsed = bool(value)

    text = QtCore.Property(str, _getText, _setText)
    collapsed = QtCore.Property(bool, _getCollapsed, _setCollapsed)


class _Missing:
    """A compiled class this stand-in does not provide: nothing is ever an instance of it."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no stand-in; see docs/slicer.md")


def _missingModuleAttribute(moduleName):
    cache = {}

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in cache:
            cache[name] = type(name, (_Missing,), {"__module__": moduleName})
        return cache[name]

    return __getattr__


class QUiLoader(_PySideUiLoader):
    """Creates the PythonQt-style classes (and the registered custom widgets) for a .ui file."""

    customWidgets: dict = {}

    def createWidget(self, className, parent=None, name=""):
        widgetClass = self.customWidgets.get(className) or getattr(qt, className, None)
        if isinstance(widgetClass, type) and issubclass(widgetClass, PythonQtStyle):
            widget = widgetClass(parent)
            QtCore.QObject.setObjectName(widget, name)
            return widget
        return super().createWidget(className, parent, name)


def _makeQtModule():
    module = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if not name.startswith("_"):
                setattr(module, name, getattr(source, name))
    for name in _WIDGET_CLASSES + _OBJECT_CLASSES:
        base = getattr(QtWidgets, name, None) or getattr(QtCore, name, None) or getattr(QtGui, name)
        setattr(module, name, _pythonQtClass(base))
    module.QUiLoader = QUiLoader
    module.Widget = module.QWidget  # referenced by slicer's parameterNodeWrapper docs
    return module


def _makeCtkModule():
    module = types.ModuleType("ctk")
    module.ctkCollapsibleButton = ctkCollapsibleButton
    module.__getattr__ = _missingModuleAttribute("ctk")
    return module


qt = _makeQtModule()
ctk = _makeCtkModule()
QUiLoader.customWidgets["ctkCollapsibleButton"] = ctkCollapsibleButton


def install():
    sys.modules["qt"] = qt
    sys.modules["ctk"] = ctk
    return qt, ctk


# --- the event loop ---------------------------------------------------------------------------------


def _gilHoldingSleep():
    """A C sleep called through ctypes.PyDLL: the GIL stays held while it waits (like PythonQt)."""
    if sys.platform.startswith("win"):
        kernel32 = ctypes.PyDLL("kernel32")
        return lambda seconds: kernel32.Sleep(int(seconds * 1000))
    libc = ctypes.PyDLL(ctypes.util.find_library("c") or None)
    libc.usleep.argtypes = [ctypes.c_uint]
    return lambda seconds: libc.usleep(int(seconds * 1e6))


holdGilAndSleep = _gilHoldingSleep()


def _gilHoldingProcessEvents():
    """QCoreApplication::processEvents called through ctypes.PyDLL: Qt runs its events (timers fire,
    their Python slots run) without PySide releasing the GIL around the call, as in PythonQt."""
    import PySide6

    library = os.path.join(os.path.dirname(PySide6.__file__), "Qt", "lib", "libQt6Core.so.6")
    symbol = "_ZN16QCoreApplication13processEventsE6QFlagsIN10QEventLoop17ProcessEventsFlagEE"
    try:
        function = getattr(ctypes.PyDLL(library), symbol)
    except (OSError, AttributeError):  # other platforms: PySide's call (it releases the GIL briefly)
        return lambda: QtWidgets.QApplication.processEvents(QtCore.QEventLoop.AllEvents)
    function.argtypes, function.restype = [ctypes.c_int], None
    return lambda: function(0)  # QEventLoop::AllEvents


processEventsHoldingGil = _gilHoldingProcessEvents()


def processEventsUntil(condition, timeout_s=60.0, tick_s=TICK_S):
    """Slicer's event loop: Qt events (timers fire here) and the idle wait, both holding the GIL.

    Between the two C calls a little Python runs (the loop itself); the switch interval is made
    short meanwhile, so a waiting thread gets the GIL for about as long as that Python runs, the
    same share it gets in Slicer while the main thread runs Python slots.
    """
    deadline = time.monotonic() + timeout_s
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        while not condition():
            if time.monotonic() > deadline:
                return False
            processEventsHoldingGil()
            holdGilAndSleep(tick_s)
        return True
    finally:
        sys.setswitchinterval(previous)
