"""What a new user gets: the shipped models, their cards, and their accuracy on cases no fold trained on."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UNetSegmentLib import model_store
from UNetSegmentLib.cli import main as cli_main
from UNetSegmentLib.ensemble import load_model, read_set_metadata
from UNetSegmentLib.metrics import dice_per_label
from UNetSegmentLib.pipeline import segment_image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
# bench/train_hippocampus.py HOLDOUT_CASES: never in any fold's training or validation
HOLDOUT = ["hippocampus_008", "hippocampus_074", "hippocampus_165", "hippocampus_276", "hippocampus_340"]


@pytest.fixture(scope="module")
def hippocampus_model():
    folder = model_store.default_model_path("MR")
    assert folder.is_dir() and any(folder.glob("fold_*.pt")), f"the shipped MR model {folder} is missing"
    return load_model(folder, device="cpu")


def test_hippocampus_card_is_complete():
    card = read_set_metadata(model_store.default_model_path("MR"))
    assert card.modality == "MR"
    assert [label.name for label in card.labels] == ["background", "anterior hippocampus", "posterior hippocampus"]
    for label in card.labels[1:]:
        assert label.terminology["type"] == ["SCT", "5366008", "Hippocampus"]
        assert len(set(label.color)) > 1
    training = card.training
    assert set(training["excluded_cases"]) == set(HOLDOUT)
    assert not set(HOLDOUT) & set(training["training_case_ids"] + training["validation_case_ids"])
    assert training["ensemble_folds"] and all(0 <= fold < 5 for fold in training["ensemble_folds"])
    for fold, scores in training["validation_dice_per_fold"].items():
        assert min(scores.values()) > 0.8, f"fold {fold}: {scores}"
    intensity = training["intensity"]
    assert intensity["negative_fraction"][1] < 0.01 and intensity["z01"][0] < intensity["z01"][1]  # MR: ~no negatives
    assert (model_store.default_model_path("MR") / "README.md").is_file()


def test_hippocampus_model_on_held_out_real_cases(hippocampus_model):
    means = []
    for case in HOLDOUT:
        image = sitk.ReadImage(str(DATA / "imagesTr" / f"{case}_0000.nii.gz"))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labelsTr" / f"{case}.nii.gz")))
        result = segment_image(image, hippocampus_model, device="cpu")
        assert result.warnings == []
        scores = dice_per_label(sitk.GetArrayFromImage(result.labelmap), reference, [1, 2])
        means.append((scores[1] + scores[2]) / 2)
    assert np.mean(means) >= 0.85, means


def test_demo_runs_the_real_model_on_the_real_sample(tmp_path, capsys):
    assert cli_main(["demo", "--output", str(tmp_path / "demo"), "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"dice=([0-9.]+) seconds=([0-9.]+)", last)
    assert match, last
    assert float(match.group(1)) >= 0.85
    assert (tmp_path / "demo" / "report.txt").read_text().count("hippocampus") >= 2


def test_phantom_demo_stays_reachable_by_name(tmp_path, capsys):
    assert cli_main(["demo", "--sample", "phantom-ct", "--output", str(tmp_path / "demo"), "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(re.fullmatch(r"dice=([0-9.]+) seconds=[0-9.]+", last).group(1)) >= 0.85


def test_models_listing_names_the_phantom_model_as_a_demo(capsys):
    assert cli_main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "hippocampus_mr" in listing and "phantom_ct_demo" in listing


def test_smaller_windows_to_fit_memory_warn_that_the_result_can_be_much_worse():
    """The engine's last resort (trained windows do not fit the budget) costs far more than rounding:
    the user must be told before trusting the labels, not only in a progress note."""
    ct = sitk.ReadImage(str(model_store.sample_image_path("phantom-ct")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(model_store.sample_reference_path("phantom-ct"))))
    model = model_store.default_model_path("CT")
    roomy = segment_image(ct, model, device="cpu", precision="fp32", backend="torch")
    tight = segment_image(ct, model, device="cpu", precision="fp32", backend="torch", memory_budget_mb=64)
    assert tuple(tight.stats["patch_size"]) != tuple(roomy.stats["patch_size"])
    assert any("instead of the" in warning and "much worse" in warning for warning in tight.warnings)
    assert not any("instead of the" in warning for warning in roomy.warnings)

    def mean_dice(result):
        scores = dice_per_label(sitk.GetArrayFromImage(result.labelmap), reference, [1, 2, 3])
        return sum(scores.values()) / 3

    assert mean_dice(tight) < mean_dice(roomy) - 0.05  # why it is a warning: the drop is real
