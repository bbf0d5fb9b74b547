"""Reading/writing volumes in every supported format, clear errors for broken files, datasets."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from UNetSegmentLib import io
from UNetSegmentLib.errors import ImageReadError, InputError
from UNetSegmentLib.schema import MAX_INFO_CHARS

DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _volume(dtype=np.float32, seed=0):
    array = np.random.default_rng(seed).normal(size=(6, 7, 8)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.5, 3.0))
    image.SetDirection(DIRECTION)
    return image


@pytest.mark.parametrize("name", ["volume.nrrd", "volume.nii.gz", "volume.nii", "volume.mha"])
def test_write_read_round_trip_keeps_geometry(tmp_path, name):
    image = _volume()
    path = io.write_image(image, tmp_path / name)
    back = io.read_image(path)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    path = io.write_image(_volume(seed=0), tmp_path / "out.nrrd")
    with pytest.raises(InputError, match="already exists"):
        io.write_image(_volume(seed=1), path)
    assert sitk.GetArrayFromImage(io.read_image(path))[0, 0, 0] == sitk.GetArrayFromImage(_volume(seed=0))[0, 0, 0]
    io.write_image(_volume(seed=1), path, overwrite=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_image(path)),
                                  sitk.GetArrayFromImage(_volume(seed=1)))
    with pytest.raises(InputError, match="unsupported extension"):
        io.write_image(_volume(), tmp_path / "out.png.txt")


@pytest.mark.parametrize("name,compress", [("a.nrrd", False), ("b.nrrd", True), ("c.nii", False),
                                           ("d.nii.gz", True), ("e.mha", False)])
def test_truncated_files_give_clear_read_error(tmp_path, name, compress):
    path = tmp_path / name
    sitk.WriteImage(_volume(), str(path), compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError) as error:
        io.read_image(path)
    assert name in str(error.value) and "Fix:" in str(error.value)


def test_non_image_and_missing_files_give_clear_read_error(tmp_path):
    text = tmp_path / "notes.nrrd"
    text.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.nrrd"):
        io.read_image(text)
    with pytest.raises(ImageReadError, match="does not exist"):
        io.read_image(tmp_path / "missing.nii.gz")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        io.read_image(empty)
    with pytest.raises(ImageReadError, match="DICOM"):
        io.read_image(tmp_path)  # a folder without a DICOM series


def _write_slicer_segmentation(path, layers, segments):
    """A .seg.nrrd as Slicer writes it: 4D 'list' axis of layers, Segment<N>_* header fields."""
    layers = np.asarray(layers, dtype=np.uint8)  # (layers, z, y, x)
    n, z, y, x = layers.shape
    header = ["NRRD0004", "type: unsigned char", "dimension: 4", "space: left-posterior-superior",
              f"sizes: {n} {x} {y} {z}", "space directions: none (0.5,0,0) (0,0.5,0) (0,0,2)",
              "kinds: list domain domain domain", "encoding: raw", "space origin: (5,-6,7)"]
    for index, (segment_id, layer, value) in enumerate(segments):
        header += [f"Segment{index}_ID:={segment_id}", f"Segment{index}_Name:={segment_id}",
                   f"Segment{index}_Layer:={layer}", f"Segment{index}_LabelValue:={value}"]
    data = np.moveaxis(layers, 0, -1).tobytes()  # x fastest in file order is list axis first
    path.write_bytes(("\n".join(header) + "\n\n").encode() + data)


def test_slicer_multilayer_segmentation_becomes_labelmap(tmp_path):
    layer0 = np.zeros((3, 4, 5), np.uint8)
    layer0[0] = 1
    layer0[1] = 2
    layer1 = np.zeros((3, 4, 5), np.uint8)
    layer1[:, 0, :] = 1  # overlaps the first two segments
    path = tmp_path / "case.seg.nrrd"
    _write_slicer_segmentation(path, [layer0, layer1], [("liver", 0, 1), ("spleen", 0, 2), ("vessel", 1, 1)])
    labelmap = io.read_labelmap(path)
    array = sitk.GetArrayFromImage(labelmap)
    assert array.shape == (3, 4, 5) and labelmap.GetPixelID() == sitk.sitkUInt8
    assert np.all(array[:, 0, :] == 3)
    assert np.all(array[0, 1:] == 1) and np.all(array[1, 1:] == 2) and np.all(array[2, 1:] == 0)
    np.testing.assert_allclose(labelmap.GetSpacing(), (0.5, 0.5, 2.0))
    np.testing.assert_allclose(labelmap.GetOrigin(), (5, -6, 7))
    assert io.read_image(path).GetNumberOfComponentsPerPixel() == 1


def test_single_layer_segmentation_keeps_values(tmp_path):
    layer = np.zeros((3, 4, 5), np.uint8)
    layer[1, 1:3, 1:4] = 2
    layer[2, 0, 0] = 1
    path = tmp_path / "one.seg.nrrd"
    _write_slicer_segmentation(path, [layer], [("a", 0, 1), ("b", 0, 2)])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_labelmap(path)), layer)


def test_segmentation_written_for_slicer_round_trips(tmp_path):
    from UNetSegmentLib.metadata import LabelInfo

    labelmap = sitk.Cast(_volume() > 0.5, sitk.sitkUInt8) + 2 * sitk.Cast(_volume(seed=1) > 1.0, sitk.sitkUInt8)
    labelmap = sitk.Cast(sitk.Clamp(labelmap, upperBound=2), sitk.sitkUInt8)
    labels = [LabelInfo(0, "background", (0, 0, 0)), LabelInfo(1, "liver", (0.8, 0.5, 0.4)),
              LabelInfo(2, "spleen", (0.6, 0.4, 0.6)), LabelInfo(3, "absent", (0, 0, 1))]
    path = io.write_segmentation(labelmap, labels, tmp_path / "case.seg.nrrd")
    back = io.read_labelmap(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labelmap))
    np.testing.assert_allclose(back.GetDirection(), DIRECTION, atol=1e-12)
    raw = sitk.ReadImage(str(path))
    assert [raw.GetMetaData(f"Segment{i}_Name") for i in range(3)] == ["liver", "spleen", "absent"]
    assert raw.GetMetaData("Segment1_LabelValue") == "2"
    with pytest.raises(InputError, match="already exists"):
        io.write_segmentation(labelmap, labels, path)


def test_read_labelmap_rejects_fractional_values(tmp_path):
    path = io.write_image(_volume(), tmp_path / "float.nrrd")
    with pytest.raises(InputError, match="non-integer"):
        io.read_labelmap(path)


def _write_dicom_series(folder, array, spacing, origin, series_uid):
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(array.shape[0]):
        slice_image = sitk.GetImageFromArray(array[index])
        slice_image.SetSpacing((spacing[0], spacing[1]))
        position = (origin[0], origin[1], origin[2] + index * spacing[2])
        tags = {"0008|0060": "CT", "0020|000e": series_uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|0013": str(index + 1), "0020|0032": "\\".join(f"{v:.3f}" for v in position),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{spacing[1]}\\{spacing[0]}",
                "0018|0050": str(spacing[2]), "0008|0018": f"{series_uid}.{index + 1}"}
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{index:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_folder(tmp_path):
    array = np.random.default_rng(0).integers(-100, 100, size=(5, 6, 7)).astype(np.int16)
    _write_dicom_series(tmp_path / "series", array, (0.6, 0.6, 2.0), (1.0, 2.0, 3.0), "1.2.826.0.1.3680043.2.1125.7")
    image = io.read_image(tmp_path / "series")
    assert image.GetSize() == (7, 6, 5)
    np.testing.assert_allclose(image.GetSpacing(), (0.6, 0.6, 2.0), atol=1e-3)
    np.testing.assert_allclose(image.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    _write_dicom_series(tmp_path / "series", array[:2], (0.6, 0.6, 2.0), (1.0, 2.0, 50.0),
                        "1.2.826.0.1.3680043.2.1125.8")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        io.read_image(tmp_path / "series")


def _write_case(folder, name):
    image = _volume()
    io.write_image(image, folder / name)


def test_read_dataset_decathlon_and_nnunet_v2(tmp_path):
    msd = tmp_path / "Task01"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    for case in ("liver_1", "liver_2"):
        _write_case(msd / "imagesTr", f"{case}.nii.gz")
        _write_case(msd / "labelsTr", f"{case}.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
        "licence": "CC-BY-SA 4.0", "reference": "x" * 10_000,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("liver_1", "liver_2")]}))
    dataset = io.read_dataset(msd)
    assert dataset.modality == "CT" and dataset.labels == {0: "background", 1: "liver"}
    assert dataset.licence == "CC-BY-SA 4.0" and dataset.reference == "x" * MAX_INFO_CHARS  # bounded for cards
    assert [case.case_id for case in dataset.cases] == ["liver_1", "liver_2"]
    assert all(case.image_path.is_file() and case.label_path.is_file() for case in dataset.cases)

    v2 = tmp_path / "Dataset002"
    (v2 / "imagesTr").mkdir(parents=True)
    (v2 / "labelsTr").mkdir()
    _write_case(v2 / "imagesTr", "case_0000.nii.gz")
    _write_case(v2 / "labelsTr", "case.nii.gz")
    (v2 / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1}, "file_ending": ".nii.gz",
        "licence": {"not": "text"}, "license": "C\u202eC\x000", "reference": 7}))
    dataset = io.read_dataset(v2)
    assert dataset.modality == "T2" and dataset.labels == {0: "background", 1: "prostate"}
    # nnU-Net v2's spelling, with the characters that would show differently removed; non-text is no text
    assert dataset.licence == "CC0" and dataset.reference is None
    assert [(c.case_id, c.image_path.name) for c in dataset.cases] == [("case", "case_0000.nii.gz")]
    os.remove(v2 / "imagesTr" / "case_0000.nii.gz")
    with pytest.raises(InputError, match="missing"):
        io.read_dataset(v2)
    with pytest.raises(InputError, match="dataset.json"):
        io.read_dataset(tmp_path)
