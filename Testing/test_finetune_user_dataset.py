"""The user training set (issue 17): cases added by segment name, label sets never mixed, replace only when
asked, and bad input refused with nothing written. Real hippocampus MRI cases; no torch needed."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UNetSegmentLib.errors import GeometryError, InputError, OutputError, UNetSegmentError
from UNetSegmentLib.io import read_dataset, read_image, read_labelmap
from UNetSegmentLib.metadata import LabelInfo, ModelMetadata
from UNetSegmentLib.user_dataset import DuplicateCaseError, add_case, read_user_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/Task04_Hippocampus is not available")


def model(names=("anterior hippocampus", "posterior hippocampus"), modality="MR") -> ModelMetadata:
    labels = [LabelInfo(0, "background", (0.0, 0.0, 0.0))]
    labels += [LabelInfo(value, name, (0.5, 0.5, 0.5)) for value, name in enumerate(names, start=1)]
    return ModelMetadata(architecture="unet", architecture_kwargs={"features": 4, "levels": 3}, spatial_dims=3,
                         in_channels=1, labels=labels, patch_size=[16, 16, 16], target_spacing=[1.0, 1.0, 1.0],
                         modality=modality)


def case(case_id: str):
    return (read_image(DATA / "imagesTr" / f"{case_id}_0000.nii.gz"),
            read_labelmap(DATA / "labelsTr" / f"{case_id}.nii.gz"))


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_cases_are_saved_in_decathlon_layout_with_segments_mapped_by_name(tmp_path):
    folder = tmp_path / "my cases"
    image, reference = case("hippocampus_001")
    # the correction's labelmap numbers its segments in another order than the model: 1 = posterior
    swapped = sitk.GetArrayFromImage(reference)
    swapped = np.where(swapped == 1, 2, np.where(swapped == 2, 1, 0)).astype(np.uint8)
    correction = sitk.GetImageFromArray(swapped)
    correction.CopyInformation(reference)
    added = add_case(folder, image, correction, model(), segment_names={1: "Posterior_Hippocampus",
                                                                        2: "anterior hippocampus"},
                     case_name="hippocampus_001", model_name="hippo")
    second = add_case(folder, *case("hippocampus_003"), model(), case_name="hippocampus_003", model_name="hippo")

    dataset = read_dataset(folder)  # the project's own reader (and nnU-Net's layout)
    assert [c.case_id for c in dataset.cases] == [added.case_id, second.case_id] == ["hippocampus_001",
                                                                                     "hippocampus_003"]
    assert dataset.labels == {0: "background", 1: "anterior hippocampus", 2: "posterior hippocampus"}
    saved_label = sitk.GetArrayFromImage(sitk.ReadImage(str(added.label_path)))
    np.testing.assert_array_equal(saved_label, sitk.GetArrayFromImage(reference))  # back to the model's values
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(added.image_path))),
                                  sitk.GetArrayFromImage(image))
    assert added.voxels_per_label == {"anterior hippocampus": int((saved_label == 1).sum()),
                                      "posterior hippocampus": int((saved_label == 2).sum())}
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["numTraining"] == 2
    assert manifest["unetsegment"]["label_set"] == {"0": "background", "1": "anterior hippocampus",
                                                    "2": "posterior hippocampus"}
    user = read_user_dataset(folder)
    assert set(user.cases) == {"hippocampus_001", "hippocampus_003"} and user.model == "hippo"
    assert not [p for p in folder.rglob(".*") if p.name != ".unetsegment.lock"]  # no temp files


def test_unknown_segment_is_refused_by_name_and_nothing_is_written(tmp_path):
    folder = tmp_path / "cases"
    image, reference = case("hippocampus_001")
    with pytest.raises(InputError) as raised:
        add_case(folder, image, reference, model(), segment_names={1: "anterior hippocampus", 2: "amygdala"})
    assert "'amygdala'" in str(raised.value) and "posterior hippocampus" in str(raised.value)
    assert "Fix:" in str(raised.value)
    assert not folder.exists()


def test_empty_segmentation_and_size_mismatch_are_refused(tmp_path):
    folder = tmp_path / "cases"
    add_case(folder, *case("hippocampus_001"), model())
    before = snapshot(folder)
    image, reference = case("hippocampus_003")
    empty = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(reference)
    with pytest.raises(InputError, match="empty"):
        add_case(folder, image, empty, model())
    cropped = reference[:, :, : reference.GetSize()[2] - 3]
    with pytest.raises(GeometryError) as raised:
        add_case(folder, image, cropped, model())
    assert str(cropped.GetSize()) in str(raised.value) and str(image.GetSize()) in str(raised.value)
    assert snapshot(folder) == before


def test_cases_of_another_label_set_never_mix(tmp_path):
    folder = tmp_path / "cases"
    add_case(folder, *case("hippocampus_001"), model(), model_name="hippo")
    before = snapshot(folder)
    other = model(names=("liver", "spleen"), modality="CT")
    image, reference = case("hippocampus_003")
    with pytest.raises(InputError) as raised:
        add_case(folder, image, reference, other, segment_names={1: "liver", 2: "spleen"}, model_name="abdomen")
    assert "anterior hippocampus" in str(raised.value) and "liver" in str(raised.value)
    assert "another training set folder" in str(raised.value)
    assert snapshot(folder) == before


@pytest.mark.parametrize("record, field", [
    ("not an object", "unetsegment"),
    ({"label_set": {"one": "anterior hippocampus"}}, "unetsegment.label_set.one"),
    ({"label_set": {"1": "anterior\u202ehippocampus"}}, "unetsegment.label_set.1"),
    ({"label_set": {"1": ["anterior hippocampus"]}}, "unetsegment.label_set.1"),
    ({"cases": ["hippocampus_001"]}, "unetsegment.cases"),
    ({"cases": {"hippocampus_001": 5}}, "unetsegment.cases.hippocampus_001"),
    ({"model": {"name": "hippo"}}, "unetsegment.model"),
])
def test_an_edited_unetsegment_record_is_refused_by_field_and_nothing_is_written(tmp_path, record, field):
    """dataset.json is the user's file: a record they (or a tool) damaged is named, never a crash."""
    folder = tmp_path / "cases"
    add_case(folder, *case("hippocampus_001"), model(), model_name="hippo")
    manifest = json.loads((folder / "dataset.json").read_text())
    manifest["unetsegment"] = record if not isinstance(record, dict) else dict(manifest["unetsegment"], **record)
    (folder / "dataset.json").write_text(json.dumps(manifest))
    before = snapshot(folder)
    for attempt in (lambda: read_user_dataset(folder),
                    lambda: add_case(folder, *case("hippocampus_003"), model(), model_name="hippo")):
        with pytest.raises(InputError) as refused:
            attempt()
        assert f"'{field}'" in str(refused.value) and "Fix:" in str(refused.value)
    assert snapshot(folder) == before


def test_the_same_volume_is_replaced_only_when_asked(tmp_path):
    folder = tmp_path / "cases"
    image, reference = case("hippocampus_001")
    first = add_case(folder, image, reference, model(), case_name="scan")
    add_case(folder, *case("hippocampus_003"), model(), case_name="other")
    before = snapshot(folder)
    corrected = sitk.BinaryDilate(reference == 1, [1, 1, 1]) * 1 + (reference == 2) * 2 * (reference != 1)
    corrected = sitk.Cast(sitk.Mask(corrected, corrected < 3), sitk.sitkUInt8)
    with pytest.raises(DuplicateCaseError) as raised:
        add_case(folder, image, corrected, model(), case_name="scan")
    assert raised.value.case_id == first.case_id and "replace" in str(raised.value).lower()
    assert snapshot(folder) == before

    again = add_case(folder, image, corrected, model(), case_name="scan", replace=True)
    assert again.replaced == first.case_id and again.cases_in_set == 2
    assert not first.image_path.exists() and not first.label_path.exists()
    dataset = read_dataset(folder)
    assert sorted(c.case_id for c in dataset.cases) == sorted(["other", again.case_id])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(again.label_path))),
                                  sitk.GetArrayFromImage(corrected))
    assert read_user_dataset(folder).cases[again.case_id]["replaces"] == first.case_id


def _fail_temp_files_in(monkeypatch, folder: Path, code: int) -> None:
    """The kernel refusing new files in `folder` (root ignores chmod, so the refusal is injected)."""
    import tempfile

    from UNetSegmentLib import publish

    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
            raise OSError(code, os.strerror(code), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(publish.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("where", ["imagesTr", "labelsTr", "."])
def test_an_unwritable_folder_is_a_clear_error_and_leaves_the_set_as_it_was(tmp_path, monkeypatch, where):
    folder = tmp_path / "cases"
    add_case(folder, *case("hippocampus_001"), model())
    before = snapshot(folder)
    _fail_temp_files_in(monkeypatch, folder / where, errno.EACCES)  # "." fails dataset.json after both images
    with pytest.raises(OutputError) as raised:
        add_case(folder, *case("hippocampus_003"), model())
    assert "permission denied" in str(raised.value) and "Fix:" in str(raised.value)
    assert snapshot(folder) == before


def test_a_new_set_in_an_unwritable_place_leaves_no_folder(tmp_path, monkeypatch):
    folder = tmp_path / "new set"
    _fail_temp_files_in(monkeypatch, folder / "imagesTr", errno.EROFS)
    with pytest.raises(UNetSegmentError, match="read-only"):
        add_case(folder, *case("hippocampus_001"), model())
    assert not folder.exists()
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with pytest.raises(UNetSegmentError, match="file"):
        add_case(blocker / "cases", *case("hippocampus_001"), model())
