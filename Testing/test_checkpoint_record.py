"""Checkpoint metadata without torch: the same card as a full load, without reading the weights, and
listing models in an interpreter where `import torch` fails."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from UNetSegmentLib.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from UNetSegmentLib.checkpoint_record import TensorStub, read_record
from UNetSegmentLib.errors import CheckpointError
from UNetSegmentLib.metadata import LabelInfo, ModelMetadata
from UNetSegmentLib.model_store import list_models, shipped_models_dir
from UNetSegmentLib.networks import build_network

REPOSITORY = Path(__file__).resolve().parents[1]


def _saved(path):
    metadata = ModelMetadata(architecture="unet", architecture_kwargs={"features": 4, "levels": 2}, spatial_dims=3,
                             in_channels=1, labels=[LabelInfo(0, "background", (0, 0, 0)),
                                                    LabelInfo(1, "organ", (1, 0, 0))],
                             patch_size=[16, 16, 16], target_spacing=[1.0, 1.0, 1.0], training={"epochs": 3})
    network = build_network("unet", 3, 1, 2, features=4, levels=2)
    return save_checkpoint(path, network, metadata), network


def test_record_matches_full_load_and_knows_tensor_shapes(tmp_path):
    path, network = _saved(tmp_path / "m.pt")
    assert read_checkpoint_metadata(path) == load_checkpoint(path).metadata
    record = read_record(path)
    shapes = {key: value.shape for key, value in record["state_dict"].items()}
    assert all(isinstance(value, TensorStub) for value in record["state_dict"].values())
    assert shapes == {key: tuple(value.shape) for key, value in network.state_dict().items()}
    for shipped in shipped_models_dir().glob("*.pt"):  # the shipped models read the same both ways
        assert read_checkpoint_metadata(shipped) == load_checkpoint(shipped).metadata


def test_weights_are_not_read(tmp_path):
    """Damaged tensor data: the card still reads (the weights were never opened); a full load fails."""
    path, _ = _saved(tmp_path / "m.pt")
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if "/data/" in info.filename:
                data = data[: len(data) // 2]  # every tensor truncated
            target.writestr(info, data)
    assert read_checkpoint_metadata(damaged).labels[1].name == "organ"
    with pytest.raises(CheckpointError):
        load_checkpoint(damaged)


def test_foreign_records_are_refused_with_a_fix(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "x", "model": torch.nn.Linear(2, 2)}, foreign)  # a pickled module: code to call
    with pytest.raises(CheckpointError, match="refused.*execute code"):
        read_checkpoint_metadata(foreign)
    not_zip = tmp_path / "bytes.pt"
    not_zip.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint.*Fix:"):
        read_checkpoint_metadata(not_zip)


def test_models_list_in_an_interpreter_without_torch(tmp_path):
    code = r'''
import json, sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
sys.meta_path.insert(0, BlockTorch())
from UNetSegmentLib.model_store import list_models
entries = list_models()
print(json.dumps({"models": [[e.name, [l.name for l in e.metadata.labels] if e.metadata else None, e.error]
                             for e in entries], "torch": "torch" in sys.modules}))
'''
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                             env={"PYTHONPATH": str(REPOSITORY), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    out = json.loads(process.stdout.strip().splitlines()[-1])
    expected = [[e.name, [l.name for l in e.metadata.labels] if e.metadata else None, e.error] for e in list_models()]
    assert out == {"models": expected, "torch": False} and expected
