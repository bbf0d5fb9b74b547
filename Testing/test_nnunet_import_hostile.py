"""nnU-Net results folders as hostile input: every field of plans.json, dataset.json and the fold
checkpoint that the importer reads is checked at the boundary, so a damaged or crafted folder is
refused with the file and the JSON path named, before a network is built, and nothing is written.

The folder is made in-process from nnU-Net's own network class (dynamic-network-architectures) with
the plans fields nnU-Net writes; the import of the unchanged folder must reproduce its outputs."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from UNetSegmentLib.checkpoint import load_checkpoint
from UNetSegmentLib.errors import CheckpointError, InputError
from UNetSegmentLib.interop import nnunet_import
from UNetSegmentLib.interop.nnunet_import import import_results_folder

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402

FEATURES = [4, 8, 8]


def _network():
    torch.manual_seed(0)
    return PlainConvUNet(
        input_channels=1, n_stages=3, features_per_stage=FEATURES, conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], num_classes=3, n_conv_per_stage=[2, 2, 2],
        n_conv_per_stage_decoder=[1, 1], conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True)


def _plans():
    arch_kwargs = {
        "n_stages": 3, "features_per_stage": FEATURES, "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}}
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 16, 16], "median_image_size_in_voxels": [20, 20, 20], "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": dict(resampling, order=1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": dict(resampling, order=1),
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    return {"dataset_name": "Dataset999_Hostile", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [20, 20, 20],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": config}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0, "std": 1.0, "percentile_00_5": 0.0,
                                                                  "percentile_99_5": 2.0}}}


DATASET = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
           "file_ending": ".nii.gz"}


def _payload(network):
    return {"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres", "fold": 0}, "inference_allowed_mirroring_axes": (0, 1, 2),
            "current_epoch": 1000}


def _folder(root: Path, plans=None, dataset=None, payload=None) -> Path:
    folder = root / "Dataset999_Hostile" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(_plans() if plans is None else plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET if dataset is None else dataset))
    torch.save(_payload(_network()) if payload is None else payload, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _set(document: dict, path: str, value):
    """`value` at the dotted path; `...` deletes the key."""
    keys = path.split(".")
    target = document
    for key in keys[:-1]:
        target = target[int(key) if isinstance(target, list) else key]
    if value is ...:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return document


CONFIG = "configurations.3d_fullres"
ARCH = f"{CONFIG}.architecture.arch_kwargs"

# (plans path, hostile value, the field the refusal must name). Each made the importer fail with a bare
# KeyError/TypeError/ValueError/AttributeError, allocate what the plans asked for, or import a wrong model.
HOSTILE_PLANS = [
    (f"{ARCH}.features_per_stage", [4, 8, 60000], f"{ARCH}.features_per_stage[2]"),   # a 400 GB allocation
    (f"{ARCH}.features_per_stage", [4, -8, 8], "features_per_stage[1]"),
    (f"{ARCH}.features_per_stage", [4, "8", 8], "features_per_stage[1]"),     # was read as 8
    (f"{ARCH}.features_per_stage", [4, 8.5, 8], "features_per_stage[1]"),    # was truncated to 8
    (f"{ARCH}.n_conv_per_stage", [2, 1000000, 2], "n_conv_per_stage[1]"),    # took the machine down (OOM)
    (f"{ARCH}.n_conv_per_stage", [2, 0, 2], "n_conv_per_stage[1]"),
    (f"{ARCH}.n_stages", 10 ** 9, "n_stages"),
    (f"{ARCH}.kernel_sizes", [[3, 3, 3], [2, 3, 3], [3, 3, 3]], "kernel_sizes[1]"),
    (f"{ARCH}.kernel_sizes", [[3, 3], [3, 3], [3, 3]], "kernel_sizes[0]"),
    (f"{ARCH}.strides", [[1, 1, 1], [0, 2, 2], [2, 2, 2]], "strides[1][0]"),
    (f"{ARCH}.conv_bias", "yes", "conv_bias"),
    (f"{ARCH}.nonlin_kwargs", "leaky", "nonlin_kwargs"),
    (f"{CONFIG}.architecture.arch_kwargs", [1], "arch_kwargs"),
    (f"{CONFIG}.patch_size", ..., "patch_size"),
    (f"{CONFIG}.patch_size", "big", "patch_size"),
    (f"{CONFIG}.patch_size", [16, 0, 16], "patch_size[1]"),
    (f"{CONFIG}.spacing", ..., "spacing"),
    (f"{CONFIG}.spacing", [1.0, float("nan"), 1.0], "spacing[1]"),
    (f"{CONFIG}.normalization_schemes", ..., "normalization_schemes"),
    (f"{CONFIG}.use_mask_for_norm", ["no"], "use_mask_for_norm[0]"),
    (f"{CONFIG}.resampling_fn_data_kwargs", [1], "resampling_fn_data_kwargs"),
    (f"{CONFIG}.resampling_fn_data_kwargs.order", "cubic", "resampling_fn_data_kwargs.order"),
    (CONFIG, [1, 2], "configurations.3d_fullres"),
    ("transpose_forward", "abc", "transpose_forward"),
    ("foreground_intensity_properties_per_channel", [1], "foreground_intensity_properties_per_channel"),
    ("foreground_intensity_properties_per_channel.0.mean", "x", "foreground_intensity_properties_per_channel.0.mean"),
    ("dataset_name", {"a": 1}, "dataset_name"),
]


@pytest.mark.parametrize("path,value,field", HOSTILE_PLANS, ids=[f"{p.rsplit('.', 1)[-1]}={v!r}"[:40]
                                                                  for p, v, _ in HOSTILE_PLANS])
def test_hostile_plans_are_refused_naming_the_field_and_nothing_is_written(tmp_path, path, value, field):
    folder = _folder(tmp_path / "in", plans=_set(_plans(), path, value))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError) as caught:
        import_results_folder(folder, out / "model.pt")
    assert f"{field}'" in caught.value.problem or f"{field} " in caught.value.problem, caught.value.problem
    assert str(folder / "plans.json") in caught.value.problem
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("change,field", [
    (lambda p: p.update(inference_allowed_mirroring_axes=(0, 1, 7)), "inference_allowed_mirroring_axes[2]"),
    (lambda p: p.update(inference_allowed_mirroring_axes="xyz"), "inference_allowed_mirroring_axes"),
    (lambda p: p.update(trainer_name=["nnUNetTrainer"]), "trainer_name"),
    (lambda p: p.update(current_epoch="last"), "current_epoch"),
    (lambda p: p["network_weights"].update({"encoder.stages.0.0.convs.0.conv.weight": [1.0, 2.0]}),
     "network_weights['encoder.stages.0.0.convs.0.conv.weight']"),
])
def test_hostile_checkpoint_fields_are_refused(tmp_path, change, field):
    payload = _payload(_network())
    change(payload)
    folder = _folder(tmp_path, payload=payload)
    with pytest.raises(CheckpointError) as caught:
        import_results_folder(folder, tmp_path / "model.pt")
    assert field in caught.value.problem and "checkpoint_final.pth" in caught.value.problem, caught.value.problem
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("dataset,match", [
    ({**DATASET, "channel_names": {"zero": "MRI"}}, "channel_names"),
    ({**DATASET, "channel_names": {"0": 5}}, "channel_names.0"),
    ({**DATASET, "channel_names": ["MRI"]}, "channel_names"),
])
def test_hostile_dataset_json_is_refused(tmp_path, dataset, match):
    folder = _folder(tmp_path, dataset=dataset)
    with pytest.raises(CheckpointError, match=match):
        import_results_folder(folder, tmp_path / "model.pt")


def test_an_oversized_json_file_is_not_read(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    monkeypatch.setattr(nnunet_import, "MAX_JSON_BYTES", 1000)
    (folder / "plans.json").write_text(json.dumps(_plans()) + " " * 2000)
    with pytest.raises(CheckpointError, match="plans.json is 0 MB"):
        import_results_folder(folder, tmp_path / "model.pt")


def test_the_unchanged_folder_imports_and_reproduces_nnunet(tmp_path):
    """The control for the refusals above: the same folder, untouched, gives nnU-Net's own outputs."""
    folder = _folder(tmp_path)
    model = load_checkpoint(import_results_folder(folder, tmp_path / "model.pt"))
    reference = _network().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.network(x), reference(x)[0], atol=1e-5)
    assert model.metadata.training["epochs"] == 1000
    assert model.metadata.preprocessing["mirror_axes"] == [0, 1, 2]


def test_a_plans_file_describing_a_bigger_network_than_its_weights_allocates_nothing(tmp_path):
    """Within the bounds (features <= 4096) a plans file can still ask for gigabytes: the network is built
    on the meta device and matched against the checkpoint first (peak 0.2 GB); the old code built it
    for real (peak 1.9 GB)."""
    folder = _folder(tmp_path, plans=_set(_plans(), f"{ARCH}.features_per_stage", [4, 8, 4000]))
    if not Path("/proc/self/status").exists():
        pytest.skip("the process's own peak memory is read from /proc/self/status (Linux)")
    script = textwrap.dedent(f"""
        from UNetSegmentLib.errors import CheckpointError
        from UNetSegmentLib.memory import own_peak_rss_mb
        from UNetSegmentLib.interop.nnunet_import import import_results_folder
        try:
            import_results_folder({str(folder)!r}, {str(tmp_path / 'model.pt')!r})
        except CheckpointError as error:
            print("refused:", error.problem)
        print("peak_mb", int(own_peak_rss_mb()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "do not match the network in plans.json" in result.stdout, result.stdout
    peak = int(result.stdout.split("peak_mb")[-1])
    assert peak < 1000, f"peak memory {peak} MB: the network was allocated before the weights were matched"


def test_an_output_that_appears_during_the_import_is_not_replaced(tmp_path, monkeypatch):
    """The no-overwrite promise holds at the rename, for a single file and for a folder of folds."""
    folder = _folder(tmp_path / "in")
    real_build = nnunet_import.build_members

    def build_then_race(*args, **kwargs):
        members = real_build(*args, **kwargs)
        for target in (tmp_path / "model.pt", tmp_path / "model_folder"):
            if target.suffix:
                target.write_text("someone else's file")
            else:
                target.mkdir()
                (target / "keep.txt").write_text("someone else's folder")
        return members

    monkeypatch.setattr(nnunet_import, "build_members", build_then_race)
    with pytest.raises(InputError, match="already exists"):
        import_results_folder(folder, tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_text() == "someone else's file"
    (tmp_path / "model.pt").unlink()
    shutil.rmtree(tmp_path / "model_folder")
    with pytest.raises(InputError, match="already exists"):
        import_results_folder(folder, tmp_path / "model_folder")
    assert (tmp_path / "model_folder" / "keep.txt").read_text() == "someone else's folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "model.pt", "model_folder"]  # no staging left


def test_an_empty_folder_that_appears_is_kept_too(tmp_path, monkeypatch):
    """rename() would silently replace an empty folder; the publish must not."""
    folder = _folder(tmp_path / "in")
    real_build = nnunet_import.build_members

    def build_then_race(*args, **kwargs):
        members = real_build(*args, **kwargs)
        (tmp_path / "fold_models").mkdir()
        return members

    monkeypatch.setattr(nnunet_import, "build_members", build_then_race)
    with pytest.raises(InputError, match="already exists"):
        import_results_folder(folder, tmp_path / "fold_models")
    assert list((tmp_path / "fold_models").iterdir()) == []



def test_own_peak_memory_is_the_childs_not_the_parents():
    """The measurement the test above relies on: a child started by a process holding 600 MB reports
    its own peak (getrusage's ru_maxrss reported the parent's)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("the process's own peak memory is read from /proc/self/status (Linux)")
    ballast = bytearray(600 * 2 ** 20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    result = subprocess.run([sys.executable, "-c", "from UNetSegmentLib.memory import own_peak_rss_mb; "
                             "print(own_peak_rss_mb())"], capture_output=True, text=True, timeout=120)
    del ballast
    assert result.returncode == 0, result.stderr[-2000:]
    assert 1 < float(result.stdout) < 300


def test_folder_publish_without_rename_noreplace_keeps_the_promise(tmp_path, monkeypatch):
    """Systems without renameat2(RENAME_NOREPLACE): an exclusive mkdir claims the name, then the rename."""
    from UNetSegmentLib import publish

    monkeypatch.setattr(publish, "_renameat2", None)
    for name in ("new", "raced"):
        staging = tmp_path / f".staging_{name}"
        staging.mkdir()
        (staging / "fold_0.pt").write_text("model")
    assert publish.publish_folder(tmp_path / ".staging_new", tmp_path / "new") == tmp_path / "new"
    assert (tmp_path / "new" / "fold_0.pt").read_text() == "model"
    (tmp_path / "raced").mkdir()  # an empty folder appeared: a bare rename() would replace it
    with pytest.raises(InputError, match="already exists"):
        publish.publish_folder(tmp_path / ".staging_raced", tmp_path / "raced")
    assert list((tmp_path / "raced").iterdir()) == []
