"""`segment FOLDER` under torchrun (2 gloo ranks on the CPU): every case exactly once, the same files as
one process writes, one summary from rank 0, and a failing case that does not stop the other ranks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_launch import report, torchrun  # noqa: E402

CASES = 5


def _image(seed: int) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 10, (10, 20, 18)).astype(np.float32)
    array[3:7, 5:15, 4:12] += 100 + 10 * seed
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.1, 0.9, 2.0))
    image.SetOrigin((3.0, -4.0, 12.0 + seed))
    return image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder of 5 images, tiny checkpoint)."""
    import torch

    from UNetSegmentLib.checkpoint import save_checkpoint
    from UNetSegmentLib.io import write_image
    from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization
    from UNetSegmentLib.networks import build_network

    work = tmp_path_factory.mktemp("segment")
    for seed in range(CASES):
        write_image(_image(seed), work / "images" / f"case{seed}.nrrd")
    torch.manual_seed(0)
    metadata = ModelMetadata(
        architecture="unet", architecture_kwargs={"features": 4, "levels": 2}, spatial_dims=3, in_channels=1,
        labels=[LabelInfo(0, "background", (0, 0, 0)), LabelInfo(1, "box", (1, 0, 0))], patch_size=[16, 16, 16],
        target_spacing=[1.5, 1.5, 2.0], normalization=Normalization("zscore"), modality="MR")
    checkpoint = save_checkpoint(work / "tiny.pt", build_network("unet", 3, 1, 2, features=4, levels=2), metadata)
    return work / "images", checkpoint


def _segment_here(argv) -> int:
    from UNetSegmentLib.commands import segment

    parser = argparse.ArgumentParser()
    segment.add_arguments(parser)
    return segment.run(parser.parse_args([str(a) for a in argv]))


def test_two_ranks_write_the_files_one_process_writes(setup, tmp_path):
    import torch

    images, checkpoint = setup
    options = ["--model", checkpoint, "--device", "cpu", "--quiet", "--probabilities"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same arithmetic
    try:
        assert _segment_here([images, "--output", tmp_path / "single"] + options) == 0
    finally:
        torch.set_num_threads(threads)
    result = torchrun(["-m", "UNetSegmentLib", "segment", images, "--output", tmp_path / "ranks"] + options,
                      timeout=600)
    assert result.returncode == 0, report(result)
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(single) == 2 * CASES  # labelmap + probabilities per case
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == single
    for name in single:
        assert (tmp_path / "ranks" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    # each case was segmented exactly once, and rank 0 alone printed the summary
    wrote = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert sorted(Path(line.split()[1]).name for line in wrote) == sorted(f"case{i}.nrrd" for i in range(CASES)), \
        report(result)
    assert result.stdout.count("segmented 5 cases on 2 ranks") == 1
    assert "5 written, 0 failed" in result.stdout


def test_a_failing_case_is_reported_and_the_other_ranks_go_on(setup, tmp_path):
    import shutil

    images, checkpoint = setup
    inputs = tmp_path / "inputs"
    shutil.copytree(images, inputs)
    (inputs / "case2.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 9 9\n")  # broken header
    result = torchrun(["-m", "UNetSegmentLib", "segment", inputs, "--output", tmp_path / "out", "--model",
                       checkpoint, "--device", "cpu", "--quiet"], timeout=600)
    assert result.returncode != 0, report(result)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"case{i}.nrrd" for i in (0, 1, 3, 4)]
    assert result.stdout.count("segmented 5 cases on 2 ranks") == 1, report(result)
    assert "4 written, 1 failed" in result.stdout
    assert "case2.nrrd (rank 0) failed" in result.stderr  # shard of rank 0: cases 1, 3, 5 (case0, case2, case4)
