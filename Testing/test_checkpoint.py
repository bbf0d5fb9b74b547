"""Checkpoints: round trip, refusal of code-carrying pickles and of inconsistent files; model store."""

import os

import numpy as np
import pytest
import torch

from UNetSegmentLib import model_store
from UNetSegmentLib.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from UNetSegmentLib.errors import CheckpointError, InputError
from UNetSegmentLib.metadata import CHECKPOINT_FORMAT, LabelInfo, ModelMetadata, Normalization
from UNetSegmentLib.networks import build_network

KWARGS = {"features": 4, "levels": 2}


def _metadata(labels=3, **changes):
    names = ["background", "liver", "spleen", "kidney"][:labels]
    data = dict(architecture="unet", architecture_kwargs=dict(KWARGS), spatial_dims=3, in_channels=1,
                labels=[LabelInfo(i, name, (i / 4, 0.5, 1 - i / 4)) for i, name in enumerate(names)],
                patch_size=[16, 16, 16], target_spacing=[1.0, 1.0, 2.0],
                normalization=Normalization("ct", -100.0, 300.0, 50.0, 80.0), modality="CT",
                training={"cases": 4}, validation_dice={"liver": 0.9})
    data.update(changes)
    return ModelMetadata(**data)


def _network(out_channels=3, **kwargs):
    torch.manual_seed(0)
    return build_network("unet", 3, 1, out_channels, **{**KWARGS, **kwargs})


def _raw_save(path, metadata_dict, state_dict, fmt=CHECKPOINT_FORMAT):
    torch.save({"format": fmt, "format_version": 1, "metadata": metadata_dict, "state_dict": state_dict}, path)


def test_round_trip_restores_weights_and_metadata(tmp_path):
    network, metadata = _network(), _metadata()
    path = save_checkpoint(tmp_path / "model.pt", network, metadata)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    loaded = load_checkpoint(path)
    assert loaded.metadata == metadata and loaded.path == path
    assert not loaded.network.training
    x = torch.randn(1, 1, 16, 16, 16)
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), network(x))
    assert read_checkpoint_metadata(path).normalization == metadata.normalization
    with pytest.raises(InputError, match="already exists"):
        save_checkpoint(path, network, metadata)
    save_checkpoint(path, network, metadata, overwrite=True)


class _WritesMarkerOnLoad:
    """Unpickling this object runs a command: exactly what weights_only=True must prevent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker_created_by_pickle"
    path = tmp_path / "evil.pt"
    payload = {"format": CHECKPOINT_FORMAT, "format_version": 1, "metadata": _metadata().to_dict(),
               "state_dict": _network().state_dict(), "payload": _WritesMarkerOnLoad(marker)}
    torch.save(payload, path)
    for reader in (load_checkpoint, read_checkpoint_metadata):
        with pytest.raises(CheckpointError, match="refused.*execute code"):
            reader(path)
    assert not marker.exists()


def test_foreign_and_broken_files_are_refused(tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(random_bytes)
    plain_state_dict = tmp_path / "plain.pt"
    torch.save(_network().state_dict(), plain_state_dict)
    with pytest.raises(CheckpointError, match="not a UNetSegment checkpoint"):
        read_checkpoint_metadata(plain_state_dict)
    good = save_checkpoint(tmp_path / "good.pt", _network(), _metadata())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated/corrupt"):
        load_checkpoint(truncated)
    incomplete = _metadata().to_dict()
    del incomplete["patch_size"]
    _raw_save(tmp_path / "incomplete.pt", incomplete, _network().state_dict())
    with pytest.raises(CheckpointError, match="lacks patch_size"):
        load_checkpoint(tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_inconsistent_checkpoints_are_refused(tmp_path):
    unknown = _metadata(architecture="vnet").to_dict()
    _raw_save(tmp_path / "unknown.pt", unknown, _network().state_dict())
    with pytest.raises(CheckpointError, match="architecture 'vnet'"):
        read_checkpoint_metadata(tmp_path / "unknown.pt")
    wider = _metadata(architecture_kwargs={"features": 8, "levels": 2}).to_dict()
    _raw_save(tmp_path / "wider.pt", wider, _network().state_dict())
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "wider.pt")
    _raw_save(tmp_path / "labels.pt", _metadata(labels=4).to_dict(), _network(out_channels=3).state_dict())
    with pytest.raises(CheckpointError, match="lists 4 labels.*predict 3 classes"):
        load_checkpoint(tmp_path / "labels.pt")


def test_model_store_lists_and_adds_models(tmp_path, monkeypatch):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(shipped))
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(user))
    save_checkpoint(shipped / "phantom_ct_demo.pt", _network(), _metadata())
    (shipped / "broken.pt").write_bytes(b"not a model")
    assert model_store.default_model_path("CT") == shipped / "phantom_ct_demo.pt"
    assert model_store.default_model_path() == model_store.default_model_path("MR") == shipped / "hippocampus_mr"
    candidate = save_checkpoint(tmp_path / "mine.pt", _network(), _metadata(description="mine"))
    entry = model_store.add_user_model(candidate)
    assert entry.path == user / "mine.pt" and entry.path.read_bytes() == candidate.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        model_store.add_user_model(candidate)
    with pytest.raises(CheckpointError):
        model_store.add_user_model(shipped / "broken.pt")
    listed = {(e.name, e.source): e for e in model_store.list_models()}
    assert set(listed) == {("broken", "shipped"), ("phantom_ct_demo", "shipped"), ("mine", "user")}
    assert listed[("broken", "shipped")].metadata is None and "not a PyTorch" in listed[("broken", "shipped")].error
    assert listed[("mine", "user")].metadata.description == "mine"
    assert model_store.find_model("mine") == user / "mine.pt"
    with pytest.raises(InputError, match="No model named"):
        model_store.find_model("nonexistent")
