"""End-to-end training on a tiny phantom: checkpoint reloads and predicts; overwrite and cancel are safe."""

import pytest
import torch

from UNetSegmentLib import phantom
from UNetSegmentLib.checkpoint import load_checkpoint
from UNetSegmentLib.errors import Cancelled, CheckpointError, InputError
from UNetSegmentLib.progress import CancelToken
from UNetSegmentLib.training import TrainingConfig, split_folds, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    phantom.write_dataset(str(folder), cases=3, seed=11, spacing=(5.0, 5.0, 6.0))
    return folder


def tiny_config(dataset, output, **changes):
    options = dict(dataset_dir=str(dataset), output=str(output), architecture="unet",
                   architecture_kwargs={"features": 4, "levels": 3}, patch_size=(8, 16, 16), batch_size=2,
                   epochs=1, iterations_per_epoch=3, folds=3, fold=0, seed=0, device="cpu")
    options.update(changes)
    return TrainingConfig(**options)


def test_one_epoch_writes_a_checkpoint_that_reloads_and_predicts(dataset, tmp_path):
    output = tmp_path / "model.pt"
    reports = []
    result = train(tiny_config(dataset, output), progress=reports.append)
    assert output.is_file()
    assert [r.done for r in reports if r.stage == "training"] == [1, 2, 3]
    loaded = load_checkpoint(str(output), "cpu")
    metadata = loaded.metadata
    assert [label.name for label in metadata.labels] == ["background", "liver", "spleen", "kidney"]
    assert metadata.labels[1].color == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    assert metadata.modality == "CT" and metadata.normalization.scheme == "ct"
    assert metadata.target_spacing == pytest.approx([5.0, 5.0, 6.0])
    assert metadata.patch_size == [8, 16, 16]
    assert metadata.training["fold"] == 0 and metadata.training["training_cases"] == 2
    assert set(metadata.validation_dice) == {"liver", "spleen", "kidney"}
    assert all(0.0 <= d <= 1.0 for d in result.validation_dice.values())
    # the reloaded weights are the trained ones and give the same logits
    image = torch.randn(1, 1, 8, 16, 16)
    loaded.network.eval()
    with torch.no_grad():
        logits = loaded.network(image)
    assert logits.shape == (1, 4, 8, 16, 16) and torch.isfinite(logits).all()


def test_existing_checkpoint_is_not_overwritten_without_asking(dataset, tmp_path):
    output = tmp_path / "model.pt"
    output.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="--overwrite"):
        train(tiny_config(dataset, output))
    assert output.read_bytes() == b"precious"


def test_cancel_stops_training_and_writes_nothing(dataset, tmp_path):
    output = tmp_path / "model.pt"
    cancel = CancelToken()
    seen = []

    def cancel_after_first_step(report):
        seen.append(report.done)
        cancel.cancel()

    with pytest.raises(Cancelled):
        train(tiny_config(dataset, output, epochs=5), progress=cancel_after_first_step, cancel=cancel)
    assert seen == [1]
    assert list(tmp_path.iterdir()) == []


def test_cpu_budget_clock_ignores_time_the_process_does_not_compute(dataset, tmp_path):
    """A benchmark on a shared machine budgets CPU seconds: time spent waiting (here a slow progress
    consumer) stops a wall-clock budget but not a CPU one."""
    import time

    def slow_consumer(report):
        if report.stage == "training":
            time.sleep(0.5)

    runs = {}
    for clock in ("wall", "cpu"):
        result = train(tiny_config(dataset, tmp_path / f"{clock}.pt", iterations_per_epoch=4, time_budget_s=1.2,
                                   budget_clock=clock, lr_schedule="poly"), progress=slow_consumer)
        runs[clock] = result.metadata.training
    assert runs["wall"]["iterations"] == 3  # 3 x 0.5 s of waiting crosses 1.2 s
    assert runs["cpu"]["iterations"] == 4  # the waiting is not CPU time: the whole epoch runs
    assert runs["cpu"]["budget_clock"] == "cpu" and runs["cpu"]["time_budget_s"] == 1.2
    with pytest.raises(InputError, match="budget clock"):
        train(tiny_config(dataset, tmp_path / "bad.pt", time_budget_s=1.0, budget_clock="sundial"))


def test_fold_split_is_seeded_and_partitions_the_cases():
    folds = [split_folds(11, 5, fold, seed=3) for fold in range(5)]
    validation = sorted(i for _, held_out in folds for i in held_out)
    assert validation == list(range(11))
    for training, held_out in folds:
        assert not set(training) & set(held_out) and len(training) + len(held_out) == 11
    assert split_folds(11, 5, 2, seed=3) == folds[2]
    assert split_folds(11, 5, 2, seed=4) != folds[2]
    with pytest.raises(InputError, match="folds"):
        split_folds(3, 5, 0)
    with pytest.raises(InputError, match="fold 5"):
        split_folds(10, 5, 5)


def test_bad_sampler_is_explained(dataset, tmp_path):
    with pytest.raises(InputError, match="sampler"):
        train(tiny_config(dataset, tmp_path / "m.pt", sampler="random"))


def test_train_command(dataset, tmp_path, capsys):
    import argparse

    from UNetSegmentLib.commands import train as train_command

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    output = tmp_path / "cli.pt"
    args = parser.parse_args([str(dataset), "--output", str(output), "--features", "4", "--levels", "3",
                              "--patch-size", "8", "16", "16", "--epochs", "1", "--iterations", "2",
                              "--folds", "3", "--device", "cpu", "--sampler", "uniform", "--quiet"])
    assert train_command.run(args) == 0
    printed = capsys.readouterr().out
    assert output.is_file() and "validation Dice" in printed
    training = load_checkpoint(str(output)).metadata.training
    assert training["sampler"] == "uniform"
    # issue 13: INT8 calibrated right after training (OpenVINO + NNCF are pinned dependencies), with its check
    assert "INT8: mean Dice" in printed
    assert training["int8"]["validation_cases"] == 1 and training["int8"]["calibration_patches"] > 0
    assert training["int8"]["ready"] == (training["int8"]["mean_dice_change"] >= -0.005)
    # the calibrated file is still an ordinary model: its card reads without torch, INT8 runs from it
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata
    from UNetSegmentLib.pipeline import segment_image
    from UNetSegmentLib.runtime.int8 import read_int8_model

    assert read_checkpoint_metadata(output).training["int8"] == training["int8"]
    assert isinstance(read_int8_model(output)["xml"], bytes)
    image, _ = phantom.make_case(seed=3, spacing=(5.0, 5.0, 6.0)).to_sitk()
    result = segment_image(image, load_checkpoint(str(output)), device="cpu", backend="openvino", precision="int8")
    assert (result.stats["backend"], result.stats["precision"]) == ("openvino", "int8")
    skipped = tmp_path / "no_int8.pt"
    args = parser.parse_args([str(dataset), "--output", str(skipped), "--features", "4", "--levels", "3",
                              "--patch-size", "8", "16", "16", "--epochs", "1", "--iterations", "1",
                              "--folds", "3", "--device", "cpu", "--quiet", "--int8", "no"])
    assert train_command.run(args) == 0
    assert "int8" not in load_checkpoint(str(skipped)).metadata.training


def test_3d_training_steps_run_channels_last_and_the_checkpoint_keeps_the_default_layout(dataset, tmp_path,
                                                                                           monkeypatch):
    from UNetSegmentLib import training
    from UNetSegmentLib.checkpoint import load_payload_safely

    layouts = []
    real_step = training.train_step

    def watching_step(model, network, *args, **kwargs):
        weights = [p for p in network.parameters() if p.dim() == 5]
        # (a 1x1x1 or single-input-channel kernel is both layouts at once)
        layouts.append(all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
                       and not all(p.is_contiguous() for p in weights))
        return real_step(model, network, *args, **kwargs)

    monkeypatch.setattr(training, "train_step", watching_step)
    output = tmp_path / "model.pt"
    train(tiny_config(dataset, output))
    assert layouts == [True, True, True]
    state = load_payload_safely(output)["state_dict"]
    assert all(tensor.is_contiguous() for tensor in state.values())


def test_training_layout_leaves_2d_networks_and_gpus_alone_and_converts_back():
    from UNetSegmentLib.networks import build_network
    from UNetSegmentLib.training import set_training_layout

    flat = build_network("unet", 2, 1, 2, features=4, levels=2)
    assert set_training_layout(flat, "cpu", training=True) is flat
    assert all(p.is_contiguous() for p in flat.parameters())
    volume = build_network("unet", 3, 1, 2, features=4, levels=2)
    kernels = [p for p in volume.parameters() if p.dim() == 5]
    before = [p.detach().clone() for p in kernels]
    set_training_layout(volume, "meta", training=True)  # not the CPU: untouched
    assert all(p.is_contiguous() for p in kernels)
    set_training_layout(volume, "cpu", training=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in kernels)
    assert not all(p.is_contiguous() for p in kernels)
    set_training_layout(volume, "cpu", training=False)
    assert all(p.is_contiguous() for p in kernels)
    assert all(torch.equal(p, q) for p, q in zip(kernels, before))
