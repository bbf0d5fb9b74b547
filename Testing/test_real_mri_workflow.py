"""The real-scan workflow: Decathlon folders through `segment` and `evaluate`, modality warnings, QC pictures.

Uses the real hippocampus MRI cases of ../shared/data/Task04_Hippocampus where a test needs real
intensities, and the shipped models/samples where it checks what a user gets.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from UNetSegmentLib import model_store
from UNetSegmentLib.applicability import check_input, intensity_profile, modality_of
from UNetSegmentLib.checkpoint import save_checkpoint
from UNetSegmentLib.cli import main as cli_main
from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization
from UNetSegmentLib.networks import build_network
from UNetSegmentLib.qc import encode_png, segmentation_png
from UNetSegmentLib.training import intensity_statistics

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
TRAINING_LIKE = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007"]
HOLDOUT = ["hippocampus_008", "hippocampus_074", "hippocampus_165", "hippocampus_276", "hippocampus_340"]
LABELS = [LabelInfo(0, "background", (0, 0, 0)), LabelInfo(1, "Anterior", (0.86, 0.85, 0.08)),
          LabelInfo(2, "Posterior", (0.2, 0.6, 1.0))]


def _real(case: str):
    if not DATA.is_dir():
        pytest.fail(f"{DATA} is missing: the shared real data must sit beside the repository")
    return (sitk.ReadImage(str(DATA / "imagesTr" / f"{case}_0000.nii.gz")),
            sitk.ReadImage(str(DATA / "labelsTr" / f"{case}.nii.gz")))


@pytest.fixture(scope="module")
def tiny_mr_model(tmp_path_factory):
    """An untrained small network with a real MR card (intensity statistics of real cases)."""
    images = [sitk.GetArrayFromImage(_real(case)[0]).astype(np.float32) for case in TRAINING_LIKE]
    metadata = ModelMetadata(
        architecture="unet", architecture_kwargs={"features": 4, "levels": 2}, spatial_dims=3, in_channels=1,
        labels=list(LABELS), patch_size=[16, 24, 16], target_spacing=[1.0, 1.0, 1.0],
        normalization=Normalization("zscore"), modality="MR",
        training={"fold": 0, "intensity": intensity_statistics(images)})
    torch.manual_seed(0)
    network = build_network("unet", 3, 1, 3, features=4, levels=2)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny_mr.pt", network, metadata)


@pytest.fixture
def decathlon_folder(tmp_path):
    """imagesTs/<case>_0000.nii.gz + labelsTs/<case>.nii.gz + dataset.json, as the Decathlon ships them."""
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    for case in HOLDOUT[:3]:
        shutil.copyfile(DATA / "imagesTr" / f"{case}_0000.nii.gz", images / f"{case}_0000.nii.gz")
        shutil.copyfile(DATA / "labelsTr" / f"{case}.nii.gz", labels / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text('{"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}')
    return tmp_path


def test_decathlon_folder_round_trip_through_segment_and_evaluate(decathlon_folder, tiny_mr_model, capsys):
    predictions = decathlon_folder / "predictions"
    assert cli_main(["segment", str(decathlon_folder / "imagesTs"), "-o", str(predictions), "--model",
                     str(tiny_mr_model), "--quiet"]) == 0
    assert sorted(p.name for p in predictions.iterdir()) == [f"{case}.nii.gz" for case in HOLDOUT[:3]]
    for case in HOLDOUT[:3]:  # each prediction lies on its own image's grid
        image = sitk.ReadImage(str(decathlon_folder / "imagesTs" / f"{case}_0000.nii.gz"))
        prediction = sitk.ReadImage(str(predictions / f"{case}.nii.gz"))
        assert prediction.GetSize() == image.GetSize()
        assert np.allclose(prediction.GetOrigin(), image.GetOrigin())
    capsys.readouterr()
    metrics = decathlon_folder / "metrics.csv"
    assert cli_main(["evaluate", str(predictions), str(decathlon_folder / "labelsTs"), "-o", str(metrics)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(metrics.open()))
    assert sorted({row["case"] for row in rows}) == HOLDOUT[:3]
    assert {row["label"] for row in rows} >= {"1", "2"}
    for label, name in ((1, "Anterior"), (2, "Posterior")):
        scores = [float(row["dice"]) for row in rows if row["label"] == str(label)]
        assert f"label {label} ({name}): mean Dice {np.mean(scores):.4f}" in printed
    plot = decathlon_folder / "metrics_dice.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 2000


def test_other_channels_are_refused_before_any_work(decathlon_folder, tiny_mr_model, capsys):
    images = decathlon_folder / "imagesTs"
    shutil.copyfile(images / f"{HOLDOUT[0]}_0000.nii.gz", images / f"{HOLDOUT[0]}_0001.nii.gz")
    output = decathlon_folder / "predictions"
    assert cli_main(["segment", str(images), "-o", str(output), "--model", str(tiny_mr_model), "--quiet"]) == 2
    assert "_0001" in capsys.readouterr().err
    assert not output.exists()


def test_real_mr_cases_are_silent_and_ct_warns_for_the_mr_card(tiny_mr_model):
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata

    card = read_checkpoint_metadata(tiny_mr_model)
    for case in HOLDOUT:  # unseen real MR scans of the kind the card describes
        array = sitk.GetArrayFromImage(_real(case)[0])
        assert check_input(array, card.modality, card.training["intensity"]) == []
        assert modality_of(array) == "MR"
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(REPO / "Resources" / "Samples" / "sample_ct.nrrd")))
    warnings = check_input(ct, card.modality, card.training["intensity"])
    assert len(warnings) == 1 and "looks like a CT" in warnings[0]
    assert modality_of(ct) == "CT"
    # an MR model's card also flags an MR-valued scan whose histogram is foreign (here: squared intensities)
    squared = sitk.GetArrayFromImage(_real(HOLDOUT[1])[0]).astype(np.float64) ** 3
    shape_warnings = check_input(squared, card.modality, card.training["intensity"])
    assert len(shape_warnings) == 1 and "intensity histogram" in shape_warnings[0]
    # and a CT model warns for an MR scan
    assert "does not look like a CT" in check_input(sitk.GetArrayFromImage(_real(HOLDOUT[2])[0]), "CT")[0]


def test_cli_warns_for_a_ct_given_to_the_mr_model_and_not_for_mr(tmp_path, tiny_mr_model, capsys):
    ct = REPO / "Resources" / "Samples" / "sample_ct.nrrd"
    assert cli_main(["segment", str(ct), "-o", str(tmp_path / "ct.nrrd"), "--model", str(tiny_mr_model),
                     "--quiet"]) == 0
    assert "warning: sample_ct.nrrd: This looks like a CT scan" in capsys.readouterr().err
    mr = DATA / "imagesTr" / f"{HOLDOUT[3]}_0000.nii.gz"
    assert cli_main(["segment", str(mr), "-o", str(tmp_path / "mr.nii.gz"), "--model", str(tiny_mr_model),
                     "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


def _decode_png(data: bytes) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype(np.uint8)


def test_qc_png_shows_the_outlines_in_label_colours(tmp_path, tiny_mr_model):
    image, reference = _real(HOLDOUT[0])
    colors = {label.value: label.color for label in LABELS}
    picture = _decode_png(segmentation_png(image, reference, colors))
    assert picture.shape[0] >= 60 and picture.shape[1] > 3 * 60  # three panels at 2 px/mm
    for value in (1, 2):
        rgb = np.array([round(255 * c) for c in colors[value]], dtype=np.uint8)
        assert (picture == rgb).all(axis=-1).sum() >= 20, f"no outline pixels of label {value}"
    empty = _decode_png(segmentation_png(image, sitk.Image(reference.GetSize(), sitk.sitkUInt8) + 0, colors))
    assert empty.std() > 10  # grey anatomy, no outlines
    # and through the CLI: one non-empty PNG per case
    folder = tmp_path / "in"
    folder.mkdir()
    for case in HOLDOUT[:2]:
        shutil.copyfile(DATA / "imagesTr" / f"{case}_0000.nii.gz", folder / f"{case}_0000.nii.gz")
    assert cli_main(["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_mr_model),
                     "--qc", "--quiet"]) == 0
    pngs = sorted((tmp_path / "out").glob("*_qc.png"))
    assert [p.name for p in pngs] == [f"{case}_qc.png" for case in HOLDOUT[:2]]
    assert all(_decode_png(p.read_bytes()).std() > 10 for p in pngs)


def test_encode_png_round_trips():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(encode_png(rgb)), rgb)


def test_default_model_follows_the_input_modality():
    assert model_store.default_model_path("MR").name == "hippocampus_mr"
    assert model_store.default_model_path("CT").name == "phantom_ct_demo.pt"
    profile = intensity_profile(sitk.GetArrayFromImage(_real(HOLDOUT[0])[0]))
    assert profile["negative_fraction"] == 0.0
