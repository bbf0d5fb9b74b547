"""Fold ensembles: the mean of the folds' softmax, folder and single-file forms, disagreeing folds refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from UNetSegmentLib.checkpoint import save_checkpoint
from UNetSegmentLib.cli import main as cli_main
from UNetSegmentLib.ensemble import LoadedEnsemble, load_model, read_set_metadata, save_ensemble
from UNetSegmentLib.errors import CheckpointError
from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization
from UNetSegmentLib.networks import build_network
from UNetSegmentLib.pipeline import segment_image

LABELS = [LabelInfo(0, "background", (0, 0, 0)), LabelInfo(1, "Anterior", (1, 0, 0)),
          LabelInfo(2, "Posterior", (0, 1, 0))]


def _metadata(fold: int, **changes) -> ModelMetadata:
    data = dict(architecture="unet", architecture_kwargs={"features": 4, "levels": 2}, spatial_dims=3,
                in_channels=1, labels=list(LABELS), patch_size=[12, 16, 12], target_spacing=[1.0, 1.0, 1.0],
                normalization=Normalization("zscore"), modality="MR",
                training={"fold": fold}, validation_dice={"Anterior": 0.5 + 0.1 * fold, "Posterior": 0.6})
    data.update(changes)
    return ModelMetadata(**data)


def _fold(path, fold: int, **changes):
    metadata = _metadata(fold, **changes)
    torch.manual_seed(100 + fold)
    network = build_network(metadata.architecture, 3, 1, metadata.out_channels, **metadata.architecture_kwargs)
    with torch.no_grad():  # distinct, non-trivial weights per fold so their softmax outputs differ
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return save_checkpoint(path, network, metadata)


def _image():
    rng = np.random.default_rng(3)
    array = rng.normal(0, 1, (15, 19, 13)).astype(np.float32)
    array[4:10, 6:14, 3:9] += 3
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    return image


@pytest.fixture
def fold_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for fold in range(3):
        _fold(folder / f"fold_{fold}.pt", fold)
    return folder


def _probabilities(model):
    result = segment_image(_image(), model, device="cpu", return_probabilities=True)
    return sitk.GetArrayFromImage(result.probabilities), sitk.GetArrayFromImage(result.labelmap)


def test_ensemble_is_the_mean_of_the_folds_softmax(fold_folder):
    singles = [_probabilities(str(path))[0] for path in sorted(fold_folder.glob("fold_*.pt"))]
    assert max(np.abs(singles[0] - other).max() for other in singles[1:]) > 0.05  # folds really differ
    ensemble, labels = _probabilities(str(fold_folder))
    np.testing.assert_allclose(ensemble, np.mean(singles, axis=0), atol=1e-5)
    np.testing.assert_array_equal(labels, ensemble.argmax(axis=-1))


def test_single_file_ensemble_equals_the_folder(fold_folder, tmp_path):
    packed = save_ensemble(sorted(fold_folder.glob("fold_*.pt")), tmp_path / "all_folds.pt")
    model = load_model(packed)
    assert isinstance(model, LoadedEnsemble) and model.folds == [0, 1, 2]
    np.testing.assert_allclose(_probabilities(model)[0], _probabilities(str(fold_folder))[0], atol=1e-6)


def test_pack_folds_command_writes_one_loadable_file(fold_folder, tmp_path, capsys):
    output = tmp_path / "packed.pt"
    assert cli_main(["pack-folds", str(fold_folder), "-o", str(output)]) == 0
    assert "3 folds" in capsys.readouterr().out
    np.testing.assert_allclose(_probabilities(str(output))[0], _probabilities(str(fold_folder))[0], atol=1e-6)
    assert cli_main(["pack-folds", str(fold_folder), "-o", str(output)]) == 2  # no silent overwrite


def test_set_card_lists_folds_and_mean_dice(fold_folder):
    card = read_set_metadata(fold_folder)
    assert card.training["ensemble_folds"] == [0, 1, 2]
    assert card.validation_dice["Anterior"] == pytest.approx((0.5 + 0.6 + 0.7) / 3, abs=1e-4)
    assert set(card.training["validation_dice_per_fold"]) == {"0", "1", "2"}


@pytest.mark.parametrize("change, what", [
    ({"labels": [LABELS[0], LabelInfo(1, "Head", (1, 0, 0)), LABELS[2]]}, "labels"),
    ({"target_spacing": [1.0, 1.0, 1.5]}, "target spacing"),
    ({"architecture_kwargs": {"features": 6, "levels": 2}}, "architecture"),
])
def test_disagreeing_fold_is_refused_by_name_and_nothing_written(fold_folder, tmp_path, change, what, capsys):
    _fold(fold_folder / "fold_3.pt", 3, **change)
    with pytest.raises(CheckpointError, match=f"fold_3.pt disagrees with fold_0.pt on its {what}"):
        load_model(fold_folder)
    with pytest.raises(CheckpointError, match="fold_3.pt"):
        save_ensemble(sorted(fold_folder.glob("fold_*.pt")), tmp_path / "packed.pt")
    assert not (tmp_path / "packed.pt").exists()
    image_path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(_image(), str(image_path))
    output = tmp_path / "out.nii.gz"
    assert cli_main(["segment", str(image_path), "--model", str(fold_folder), "-o", str(output), "--quiet"]) == 2
    assert "fold_3.pt" in capsys.readouterr().err
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_0000.nii.gz", "model"]


def test_ensemble_metadata_is_the_first_fold_card_with_folds(fold_folder):
    model = load_model(fold_folder)
    assert replace(model.metadata, training={}, validation_dice={}) == replace(
        _metadata(0), training={}, validation_dice={})


def test_model_lists_read_an_all_folds_file_without_torch(tmp_path, monkeypatch):
    """The panel and `models` list an all-folds file (pack-folds, import-nnunet) with its card, read from the
    small record only."""
    from UNetSegmentLib.model_store import list_models

    folds = [_fold(tmp_path / f"fold_{i}.pt", fold=i) for i in range(2)]
    packed = save_ensemble(folds, tmp_path / "user" / "packed.pt")
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(tmp_path / "user"))
    entry = next(e for e in list_models() if e.path == packed)
    assert entry.error is None and entry.metadata.training["ensemble_folds"] == [0, 1]
    assert read_set_metadata(folds[0]).training["fold"] == 0  # one checkpoint: its own card
