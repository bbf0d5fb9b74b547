"""The synthetic phantom: deterministic, CT-like, written in the Decathlon layout."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from UNetSegmentLib import phantom
from UNetSegmentLib.errors import InputError


@pytest.fixture(scope="module")
def case():
    return phantom.make_case(7)


def test_same_seed_same_case_and_different_seed_different_case(case):
    again = phantom.make_case(7)
    other = phantom.make_case(8)
    assert np.array_equal(case.image, again.image) and np.array_equal(case.label, again.label)
    assert case.label.shape != other.label.shape or not np.array_equal(case.label, other.label)


def test_case_has_three_organs_with_ct_contrast(case):
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert set(np.unique(case.label)) == {0, 1, 2, 3}
    assert case.spacing[0] == case.spacing[1] < case.spacing[2]  # anisotropic, thick slices
    assert case.image.min() <= -950  # air around the body
    medians = {value: float(np.median(case.image[case.label == value])) for value in (1, 2, 3)}
    assert 70 < medians[1] < medians[2] < medians[3] < 260  # liver < spleen < kidney (contrast phase)
    # organs are compact blobs: at least 0.5 % of the volume, never the whole body
    for value in (1, 2, 3):
        assert 0.002 < (case.label == value).mean() < 0.2
    # noise: the liver is not a flat value
    assert np.std(case.image[case.label == 1]) > 5


def test_liver_on_patient_right_spleen_on_left(case):
    """LPS: x grows towards the patient's left, so the liver sits at lower x than the spleen."""
    liver_x = np.argwhere(case.label == 1)[:, 2].mean()
    spleen_x = np.argwhere(case.label == 2)[:, 2].mean()
    assert liver_x < spleen_x


def test_write_dataset_layout(tmp_path):
    names = phantom.write_dataset(str(tmp_path), cases=2, seed=3)
    assert names == ["case_000", "case_001"]
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["modality"] == {"0": "CT"}
    assert manifest["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "kidney"}
    assert manifest["numTraining"] == 2
    image = sitk.ReadImage(str(tmp_path / "imagesTr" / "case_001_0000.nii.gz"))
    label = sitk.ReadImage(str(tmp_path / "labelsTr" / "case_001.nii.gz"))
    expected = phantom.make_case(phantom.case_seed(3, 1))
    assert np.array_equal(sitk.GetArrayFromImage(image), expected.image)
    assert np.array_equal(sitk.GetArrayFromImage(label), expected.label)
    assert image.GetSpacing() == pytest.approx(expected.spacing)
    assert not [name for name in os.listdir(tmp_path / "imagesTr") if name.startswith(".tmp")]


def test_command_line_and_bad_case_count(tmp_path):
    assert phantom.main(["--out", str(tmp_path), "--cases", "1", "--seed", "1"]) == 0
    assert (tmp_path / "labelsTr" / "case_000.nii.gz").is_file()
    with pytest.raises(InputError, match="--cases"):
        phantom.write_dataset(str(tmp_path), cases=0)
