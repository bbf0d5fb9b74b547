"""`segment`, `evaluate` and `demo` commands on tiny volumes and a tiny checkpoint."""

import argparse
import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from UNetSegmentLib.checkpoint import save_checkpoint
from UNetSegmentLib.commands import demo, evaluate, segment
from UNetSegmentLib.errors import InputError
from UNetSegmentLib.io import read_image, write_image
from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization
from UNetSegmentLib.metrics import dice_per_label
from UNetSegmentLib.networks import build_network


def _run(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


def _image(seed=0, spacing=(1.1, 0.9, 2.0)):
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 10, (10, 20, 18)).astype(np.float32)
    array[3:7, 5:15, 4:12] += 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((3.0, -4.0, 12.0))
    return image


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    metadata = ModelMetadata(
        architecture="unet", architecture_kwargs={"features": 4, "levels": 2}, spatial_dims=3, in_channels=1,
        labels=[LabelInfo(0, "background", (0, 0, 0)), LabelInfo(1, "box", (1, 0, 0))], patch_size=[16, 16, 16],
        target_spacing=[1.5, 1.5, 2.0], normalization=Normalization("zscore"), modality="MR")
    return save_checkpoint(tmp_path / "models" / "tiny.pt", build_network("unet", 3, 1, 2, features=4, levels=2),
                           metadata)


def test_segment_file_writes_labelmap_on_input_grid_and_refuses_overwrite(tmp_path, checkpoint, capsys):
    source = write_image(_image(), tmp_path / "case.nii.gz")
    output = tmp_path / "out" / "case_seg.nrrd"
    assert _run(segment, [source, "--output", output, "--model", checkpoint, "--device", "cpu", "--quiet",
                          "--probabilities", "--uncertainty"]) == 0
    labelmap, image = read_image(output), read_image(source)
    assert labelmap.GetSize() == image.GetSize()
    for geometry in ("GetSpacing", "GetOrigin", "GetDirection"):  # NRRD keeps doubles to the last digit or so
        np.testing.assert_allclose(getattr(labelmap, geometry)(), getattr(image, geometry)(), rtol=0, atol=1e-12)
    probabilities = read_image(tmp_path / "out" / "case_seg_probabilities.nrrd")
    assert probabilities.GetNumberOfComponentsPerPixel() == 2
    assert read_image(tmp_path / "out" / "case_seg_uncertainty.nrrd").GetSize() == image.GetSize()
    assert "wrote" in capsys.readouterr().out
    before = output.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        _run(segment, [source, "--output", output, "--model", checkpoint, "--device", "cpu", "--quiet"])
    assert output.read_bytes() == before
    assert _run(segment, [source, "--output", output, "--model", checkpoint, "--device", "cpu", "--quiet",
                          "--overwrite"]) == 0


def test_segment_folder_and_evaluate_csv(tmp_path, checkpoint):
    inputs = tmp_path / "images"
    for seed in (1, 2):
        write_image(_image(seed), inputs / f"case{seed}.nrrd")
    (inputs / "notes.txt").write_text("ignored")
    predictions = tmp_path / "predictions"
    assert _run(segment, [inputs, "--output", predictions, "--model", checkpoint, "--device", "cpu", "--quiet",
                          "--format", "nii.gz"]) == 0
    assert sorted(p.name for p in predictions.iterdir()) == ["case1.nii.gz", "case2.nii.gz"]

    references = tmp_path / "references"
    for seed in (1, 2):
        reference = sitk.GetImageFromArray((sitk.GetArrayFromImage(_image(seed)) > 50).astype(np.uint8))
        reference.CopyInformation(_image(seed))
        write_image(reference, references / f"case{seed}.nrrd")
    table = tmp_path / "metrics.csv"
    assert _run(evaluate, [predictions, references, "--output", table, "--labels", 1]) == 0
    rows = list(csv.DictReader(table.open()))
    assert [(row["case"], row["label"]) for row in rows] == [("case1", "1"), ("case2", "1")]
    for row in rows:
        prediction = sitk.GetArrayFromImage(read_image(predictions / f"{row['case']}.nii.gz"))
        truth = sitk.GetArrayFromImage(read_image(references / f"{row['case']}.nrrd"))
        assert float(row["dice"]) == pytest.approx(dice_per_label(prediction, truth, [1])[1], abs=1e-6)
        assert int(row["reference_voxels"]) == int((truth == 1).sum())
    with pytest.raises(InputError, match="already exists"):
        _run(evaluate, [predictions, references, "--output", table])


def test_evaluate_refuses_mismatched_grids(tmp_path):
    first = write_image(sitk.Cast(_image() > 50, sitk.sitkUInt8), tmp_path / "a.nrrd")
    shifted = _image()
    shifted.SetOrigin((0.0, 0.0, 0.0))
    second = write_image(sitk.Cast(shifted > 50, sitk.sitkUInt8), tmp_path / "b.nrrd")
    with pytest.raises(InputError, match="origin"):
        _run(evaluate, [first, second, "--output", tmp_path / "m.csv"])


def test_demo_scores_the_shipped_sample_and_never_overwrites(tmp_path, checkpoint, monkeypatch, capsys):
    models, samples = checkpoint.parent, tmp_path / "samples"
    checkpoint.rename(models / "phantom_ct_demo.pt")
    image = _image(5)
    write_image(image, samples / "sample_ct.nrrd")
    reference = sitk.Cast(image > 50, sitk.sitkUInt8)
    write_image(reference, samples / "sample_ct_reference.nrrd")
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(models))
    monkeypatch.setenv("UNETSEGMENT_SAMPLES_DIR", str(samples))
    output = tmp_path / "demo"
    assert _run(demo, ["--sample", "phantom-ct", "--output", output, "--device", "cpu", "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("dice=") and " seconds=" in last
    labelmap = read_image(output / demo.LABELMAP_NAME)
    assert labelmap.GetSize() == image.GetSize()
    expected = dice_per_label(sitk.GetArrayFromImage(labelmap), sitk.GetArrayFromImage(reference), [1])[1]
    assert float(last.split()[0].split("=")[1]) == pytest.approx(expected, abs=1e-4)
    assert "UNTRAINED" not in (output / demo.REPORT_NAME).read_text()
    assert _run(demo, ["--sample", "phantom-ct", "--output", output, "--device", "cpu", "--quiet"]) == 0  # new sub-folder
    runs = [p for p in output.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert len(runs) == 1 and (runs[0] / demo.LABELMAP_NAME).exists()


def test_models_command_lists_checkpoints(tmp_path, checkpoint, monkeypatch, capsys):
    from UNetSegmentLib.commands import models

    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(checkpoint.parent))
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(tmp_path / "user"))
    (checkpoint.parent / "broken.pt").write_bytes(b"junk")
    assert _run(models, []) == 0
    out = capsys.readouterr().out
    checkpoints = out.split("Checkpoints:")[1]
    assert "tiny" in checkpoints and "[shipped] unet (sliding_window), MR, labels: box" in checkpoints
    assert "broken" in checkpoints and "INVALID" in checkpoints


def test_segment_to_slicer_segmentation_keeps_label_names(tmp_path, checkpoint):
    source = write_image(_image(), tmp_path / "case.mha")
    output = tmp_path / "case.seg.nrrd"
    assert _run(segment, [source, "--output", output, "--model", checkpoint, "--device", "cpu", "--quiet"]) == 0
    raw = sitk.ReadImage(str(output))
    assert raw.GetMetaData("Segment0_Name") == "box" and raw.GetMetaData("Segment0_LabelValue") == "1"
    assert read_image(output).GetSize() == read_image(source).GetSize()


def test_demo_without_shipped_model_says_so_loudly(tmp_path, monkeypatch, capsys):
    samples = tmp_path / "samples"
    image = _image(6)
    write_image(image, samples / "sample_ct.nrrd")
    write_image(sitk.Cast(image > 50, sitk.sitkUInt8), samples / "sample_ct_reference.nrrd")
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(tmp_path / "no_models"))
    monkeypatch.setenv("UNETSEGMENT_SAMPLES_DIR", str(samples))
    assert _run(demo, ["--sample", "phantom-ct", "--output", tmp_path / "demo", "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "FRESHLY INITIALISED" in captured.err
    assert "UNTRAINED" in (tmp_path / "demo" / demo.REPORT_NAME).read_text()
    assert captured.out.strip().splitlines()[-1].startswith("dice=")
