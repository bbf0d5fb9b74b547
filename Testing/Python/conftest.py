"""Fixtures for the Slicer module tests: Slicer's own base classes, a clean real MRML scene, tiny checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import slicer_adapter  # noqa: E402

slicer_adapter.install()

import slicer  # noqa: E402
from scene_helpers import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny_unet.pt")


@pytest.fixture(scope="session")
def module():
    return slicer_adapter.registerModule()


@pytest.fixture()
def scene():
    scene = slicer.mrmlScene
    scene.Clear(0)
    scene.ClearUndoStack()
    yield scene
    scene.Clear(0)
    scene.ClearUndoStack()


@pytest.fixture()
def worker_temp(tmp_path, monkeypatch):
    """Worker jobs put their temporary folders here, so a test can see that none is left behind."""
    folder = tmp_path / "worker-temp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
