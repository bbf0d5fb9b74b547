"""Slicer 5.6/5.8 embed Python 3.9, Slicer 5.10 Python 3.12: every backend file (and the module file)
must compile with both, and what the panel imports before PyTorch exists must import and list the
shipped models with both, without numpy or torch (the bare interpreters here have neither)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TORCH_FREE = ["UNetSegmentLib", "UNetSegmentLib.errors", "UNetSegmentLib.metadata", "UNetSegmentLib.progress",
              "UNetSegmentLib.checkpoint_record", "UNetSegmentLib.checkpoint", "UNetSegmentLib.model_store",
              "UNetSegmentLib.ensemble", "UNetSegmentLib.worker", "UNetSegmentLib.networks.registry",
              "UNetSegmentLib.cli"]

CHECK = r'''
import importlib, json, pathlib, sys
repository = pathlib.Path(sys.argv[1])
files = sorted(repository.glob("UNetSegmentLib/**/*.py")) + [repository / "UNetSegment" / "UNetSegment.py"]
errors = []
for path in files:
    try:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    except SyntaxError as error:
        errors.append(f"{path}: {error}")
imported = []
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
    imported.append(name)
from UNetSegmentLib.model_store import list_models
models = [(entry.name, entry.error) for entry in list_models()]
print(json.dumps({"version": list(sys.version_info[:2]), "files": len(files), "syntax_errors": errors,
                  "imported": imported, "models": models, "torch": "torch" in sys.modules}))
'''


def _interpreter(version: str):
    override = os.environ.get(f"UNETSEGMENT_PYTHON{version.replace('.', '')}")
    if override:
        return override
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")))
    return found[-1] if found else None


@pytest.mark.parametrize("version", ["3.9", "3.12"])
def test_backend_compiles_and_torch_free_part_imports(version, tmp_path):
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here (set UNETSEGMENT_PYTHON{version.replace('.', '')})")
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY), PYTHONDONTWRITEBYTECODE="1")
    process = subprocess.run([python, "-c", CHECK, str(REPOSITORY), json.dumps(TORCH_FREE)], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["version"] == [int(part) for part in version.split(".")]
    assert result["files"] > 20 and result["syntax_errors"] == []
    assert result["imported"] == TORCH_FREE and not result["torch"]

    from UNetSegmentLib.model_store import list_models  # the same listing as in this (3.11) interpreter
    assert result["models"] == [[entry.name, entry.error] for entry in list_models()]
    assert result["models"] and all(error is None for _, error in result["models"])
