"""nnU-Net v2 import, the parts checked against nnU-Net's own code in-process (fast): network weights
mapped onto the project's `nnunet` architecture give nnU-Net's outputs, and the numpy replay of its
resampling equals its own function. nnunetv2 is in the test extra: a missing install fails here."""

import numpy as np
import pytest
import torch
from torch import nn

from UNetSegmentLib.errors import CheckpointError, InputError
from UNetSegmentLib.interop import nnunet_plans
from UNetSegmentLib.interop.nnunet_import import convert_weights
from UNetSegmentLib.interop.nnunet_preprocessing import resample
from UNetSegmentLib.networks import build_network

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402


def _dna_kwargs(spatial_dims):
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if spatial_dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    if spatial_dims == 3:  # an anisotropic first stage: no pooling and no 3x3 along z
        kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    else:
        kernels = [[3, 3]] * 4
        strides = [[1, 1], [2, 2], [2, 2], [2, 2]]
    return dict(input_channels=1, n_stages=4, features_per_stage=[8, 16, 24, 24], conv_op=conv,
                kernel_sizes=kernels, strides=strides, num_classes=3, n_conv_per_stage_decoder=[1, 2, 1],
                conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True})


def _randomise(network, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in network.state_dict().values():
            if value.dtype.is_floating_point:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("encoder,spatial_dims", [("plain", 3), ("plain", 2), ("residual", 3)])
def test_mapped_weights_reproduce_nnunet_network(encoder, spatial_dims):
    kwargs = _dna_kwargs(spatial_dims)
    if encoder == "plain":
        theirs = PlainConvUNet(n_conv_per_stage=[2, 2, 3, 2], deep_supervision=True, **kwargs)
        per_stage = [2, 2, 3, 2]
    else:
        theirs = ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2, 2], deep_supervision=True, **kwargs)
        per_stage = [1, 2, 2, 2]
    _randomise(theirs, 3)
    ours = build_network("nnunet", spatial_dims, 1, 3, features=8, levels=4, encoder=encoder,
                         kernel_sizes=kwargs["kernel_sizes"], strides=kwargs["strides"], n_conv_per_stage=per_stage,
                         n_conv_per_stage_decoder=[1, 2, 1], features_per_stage=[8, 16, 24, 24],
                         deep_supervision=True)
    ours.load_state_dict(convert_weights(theirs.state_dict(), ours, encoder, "test"), strict=True)
    size = (8, 16, 24) if spatial_dims == 3 else (16, 24)
    x = torch.randn(2, 1, *size)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        expected = theirs(x)
        assert torch.allclose(ours(x), expected[0], atol=1e-5)
        ours.train()
        theirs.decoder.deep_supervision = True
        for mine, reference in zip(ours(x), expected):  # deep-supervision heads, full resolution first
            assert mine.shape == reference.shape
    if spatial_dims == 3:
        assert ours.required_multiples == (4, 8, 8)
        assert ours.deep_supervision_shapes(size) == [tuple(o.shape[2:]) for o in expected]


def test_default_nnunet_is_unchanged():
    """Without plans the architecture is the isotropic default with the same parameter names as before."""
    network = build_network("nnunet", 3, 1, 2, features=4, levels=3)
    assert network.config["kwargs"] == {"features": 4, "levels": 3, "deep_supervision": False, "norm": "instance",
                                        "act": "leaky_relu", "max_features": 320}
    assert network.required_multiple == 4 and network.required_multiples == (4, 4, 4)
    names = list(network.state_dict())
    assert names[0] == "encoder.stages.0.0.conv.weight" and "decoder.upsamplers.0.0.weight" in names
    assert "heads.1.0.weight" in names


def test_mismatched_weights_are_refused_by_name():
    ours = build_network("nnunet", 3, 1, 3, features=8, levels=4, kernel_sizes=[[3, 3, 3]] * 4,
                         strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_conv_per_stage=[2, 2, 2, 2],
                         n_conv_per_stage_decoder=[2, 2, 2], features_per_stage=[8, 16, 24, 24])
    theirs = PlainConvUNet(n_conv_per_stage=[2, 2, 2, 2], **dict(_dna_kwargs(3), kernel_sizes=[[3, 3, 3]] * 4,
                                                                  strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
                                                                  n_conv_per_stage_decoder=[2, 2, 2]))
    weights = theirs.state_dict()
    weights["decoder.seg_layers.2.weight"] = torch.zeros(5, 8, 1, 1, 1)
    with pytest.raises(CheckpointError, match="do not match the network in plans.json"):
        convert_weights(weights, ours, "plain", "fold_0")
    weights["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="encoder.extra.weight"):
        convert_weights(weights, ours, "plain", "fold_0")


@pytest.mark.parametrize("shape,new_shape,current,new,order", [
    ((9, 20, 22), (12, 31, 17), [1.0, 1.0, 1.0], [0.8, 0.7, 1.3], 3),       # isotropic: 3rd order everywhere
    ((6, 20, 22), (14, 25, 27), [3.0, 0.9, 0.9], [1.3, 0.7, 0.7], 3),       # thick slices: in-plane + nearest z
    ((20, 7, 22), (25, 11, 27), [0.9, 3.5, 0.9], [0.7, 2.2, 0.7], 1),       # thick axis 1, logits order 1
])
def test_resampling_equals_nnunet(shape, new_shape, current, new, order):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    data = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    expected = resample_data_or_seg_to_shape(data, new_shape, current, new, False, order, 0, None)
    ours = resample(data, new_shape, current, new, order, 0, None, 3.0)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 1e-6


def test_plans_refusals_are_clear():
    config = {"architecture": {"network_class_name": "dynamic_network_architectures.architectures.primus.PrimusM",
                               "arch_kwargs": {}}}
    with pytest.raises(CheckpointError, match="PrimusM.*not supported"):
        nnunet_plans.network_kwargs(config, 3)
    with pytest.raises(CheckpointError, match="region"):
        nnunet_plans.labels_from_dataset({"labels": {"background": 0, "whole tumor": [1, 2, 3]}})
    with pytest.raises(CheckpointError, match="--allow-trainer MyTrainer"):
        nnunet_plans.check_trainer("MyTrainer")
    nnunet_plans.check_trainer("nnUNetTrainer_250epochs")
    nnunet_plans.check_trainer("MyTrainer", ("MyTrainer",))
    assert nnunet_plans.labels_from_dataset({"labels": {"background": 0, "a": 1, "ignore": 2}}) == [(0, "background"),
                                                                                                    (1, "a")]


def test_recipe_validation_names_the_field():
    def fail(problem, fix):
        raise InputError(problem, fix)

    good = {"kind": "nnunet", "version": 1, "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "foreground_intensity_properties": {"0": {"mean": 1.0, "std": 2.0, "percentile_00_5": -1.0,
                                                      "percentile_99_5": 5.0}},
            "resampling_data": {"order": 3, "order_z": 0, "force_separate_z": None,
                                "separate_z_anisotropy_threshold": 3.0},
            "resampling_probabilities": {"order": 1, "order_z": 0, "force_separate_z": None,
                                         "separate_z_anisotropy_threshold": 3.0},
            "mirror_axes": [0, 1, 2], "tile_step_size": 0.5}
    assert nnunet_plans.validate_recipe(good, fail) == good
    for field, value, match in (("transpose_forward", [0, 0, 2], "transpose_forward"),
                                ("normalization_schemes", ["Foo"], "normalization_schemes"),
                                ("foreground_intensity_properties", {}, "foreground intensity"),
                                ("mirror_axes", [3], "mirror_axes"), ("kind", "other", "kind")):
        with pytest.raises(InputError, match=match):
            nnunet_plans.validate_recipe(dict(good, **{field: value}), fail)


def test_checkpoint_loading_allows_numpy_scalars_and_refuses_other_objects(tmp_path):
    """A trained nnU-Net checkpoint logs numpy scalars (Dice, EMA): allowed; any other class: refused by name."""
    import argparse

    from UNetSegmentLib.interop.nnunet_import import load_nnunet_checkpoint

    payload = {"network_weights": {"w": torch.ones(2)}, "_best_ema": np.float64(0.61), "current_epoch": 3,
               "logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.25)], "epoch": [np.int64(2)]},
               "init_args": {"device": torch.device("cpu"), "fold": 0}, "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(payload, tmp_path / "ok.pth")
    loaded = load_nnunet_checkpoint(tmp_path / "ok.pth")
    assert float(loaded["_best_ema"]) == 0.61 and loaded["logging"]["epoch"] == [2]
    payload["init_args"]["namespace"] = argparse.Namespace(a=1)
    torch.save(payload, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="argparse.Namespace.*run code"):
        load_nnunet_checkpoint(tmp_path / "bad.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_nnunet_checkpoint(tmp_path / "broken.pth")


def test_front_doors_refuse_what_is_not_a_results_folder(tmp_path, capsys):
    """CLI (default output into the user models), library and panel share one check, before any work."""
    from UNetSegmentLib.cli import main as cli_main
    from UNetSegmentLib.errors import InputError
    from UNetSegmentLib.interop.nnunet_plans import check_results_folder

    (tmp_path / "plans.json").write_text("{}")  # half a results folder: dataset.json missing
    for path, expected in ((tmp_path, "no plans.json and dataset.json"), (tmp_path / "missing", "does not exist"),
                           (tmp_path / "plans.json", "is not a folder")):
        with pytest.raises(InputError, match=expected):
            check_results_folder(path)
        assert cli_main(["import-nnunet", str(path)]) == 2
        assert expected in capsys.readouterr().err
