"""Behaviour of the sliding-window engine: stitching, progress, cancel, TTA, modes, precision, errors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from UNetSegmentLib.errors import Cancelled, DeviceError, InputError, OutOfMemoryError
from UNetSegmentLib.inference import devices
from UNetSegmentLib.inference.sliding_window import (InferenceOptions, is_window_equivalent, predict_logits,
                                                     sliding_window_inference)
from UNetSegmentLib.progress import CancelToken


class AddOne(nn.Module):
    """MONAI's stitching check: a predictor whose output is its input + 1."""

    def forward(self, x):
        return x + 1


class TinyConvNet(nn.Module):
    """A small fully convolutional network with the attributes the engine reads."""

    def __init__(self, spatial_dims=3, in_channels=1, out_channels=3, norm=None, multiple=1, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        layers = [conv(in_channels, 4, 3, padding=1)]
        if norm is not None:
            layers.append(norm(4))
        layers += [nn.ReLU(), conv(4, out_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.required_multiple = multiple

    def forward(self, x):
        return self.body(x)


def random_image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("shape, patch", [
    ((1, 23, 17, 9), (8, 8, 8)),      # odd sizes
    ((1, 5, 6, 7), (8, 8, 8)),        # smaller than the patch everywhere
    ((1, 1, 20, 13), (8, 8, 8)),      # a single-slice 3D volume
    ((2, 31, 18), (16, 16)),          # 2D, two channels
])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_add_one_predictor_stitches_back_exactly(shape, patch, blend):
    image = random_image(shape)
    logits = predict_logits(AddOne(), torch.from_numpy(image)[None], patch, overlap=0.5, blend=blend)
    np.testing.assert_allclose(logits[0].numpy(), image + 1, atol=1e-5, rtol=0)


def test_progress_reaches_total_exactly_and_counts_every_window():
    reports = []
    result = sliding_window_inference(TinyConvNet(), random_image((1, 20, 20, 12)),
                                      InferenceOptions(patch_size=(8, 8, 8), batch_size=3), progress=reports.append)
    windows = 4 * 4 * 2  # per axis: ceil((size - 8) / 4) + 1
    assert result.stats["patches"] == windows
    assert [r.done for r in reports] == sorted({min(windows, 3 * i) for i in range(1, 12)})
    assert all(r.total == windows for r in reports) and reports[-1].done == windows
    assert reports[-1].remaining_s == 0


def test_cancel_after_first_batch_raises_within_one_batch():
    token = CancelToken()
    reports = []

    def cancel_on_first(report):
        reports.append(report)
        token.cancel()

    with pytest.raises(Cancelled):
        sliding_window_inference(TinyConvNet(), random_image((1, 24, 24, 24)),
                                 InferenceOptions(patch_size=(8, 8, 8), batch_size=2), progress=cancel_on_first,
                                 cancel=token)
    assert [r.done for r in reports] == [2]


def symmetric_network():
    """Kernels equal to their own mirror image along every axis: flipping commutes with the network."""
    network = TinyConvNet(seed=4)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv3d):
                weight = module.weight
                module.weight.copy_(sum(weight.flip(dims) for dims in
                                        [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]) / 8)
    return network


def test_mirroring_tta_of_symmetric_network_equals_no_tta():
    batch = torch.from_numpy(random_image((1, 1, 19, 14, 11)))
    plain = predict_logits(symmetric_network(), batch, (8, 8, 8))
    mirrored = predict_logits(symmetric_network(), batch, (8, 8, 8), mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=0)


def test_mirroring_tta_averages_flipped_predictions():
    network = TinyConvNet(seed=5)
    batch = torch.from_numpy(random_image((1, 1, 19, 16, 11)))  # axis 1: windows at 0, 4, 8 are mirror-symmetric
    mirrored = predict_logits(network, batch, (8, 8, 8), mirror_axes=(1,))
    by_hand = (predict_logits(network, batch, (8, 8, 8))
               + predict_logits(network, batch.flip(3), (8, 8, 8)).flip(3)) / 2
    assert not torch.allclose(mirrored, predict_logits(network, batch, (8, 8, 8)), atol=1e-3)
    torch.testing.assert_close(mirrored, by_hand, atol=1e-5, rtol=0)


def test_probabilities_uncertainty_and_labels_are_consistent():
    network = TinyConvNet(out_channels=4)
    image = random_image((1, 13, 11, 9))
    options = InferenceOptions(patch_size=(8, 8, 8), output="logits", return_probabilities=True,
                               return_uncertainty=True)
    result = sliding_window_inference(network, image, options)
    probabilities = torch.softmax(result.logits, 0).numpy()
    np.testing.assert_allclose(result.probabilities, probabilities, atol=1e-6)
    entropy = -(probabilities * np.log(probabilities)).sum(0)
    np.testing.assert_allclose(result.uncertainty, entropy, atol=1e-5)
    np.testing.assert_array_equal(result.labels, result.logits.argmax(0).numpy())
    assert result.labels.dtype == np.uint8 and result.logits.dtype == torch.float32
    labels_only = sliding_window_inference(network, image, InferenceOptions(patch_size=(8, 8, 8)))
    assert labels_only.logits is None and labels_only.probabilities is None
    np.testing.assert_array_equal(labels_only.labels, result.labels)


@pytest.mark.parametrize("shape, blend", [((1, 23, 10, 9), "gaussian"), ((1, 5, 17, 9), "gaussian"),
                                          ((1, 30, 9, 8), "constant")])
def test_rolling_band_for_labels_equals_full_buffer(shape, blend):
    network = TinyConvNet(out_channels=3, seed=7)
    image = random_image(shape, seed=8)
    options = dict(patch_size=(8, 8, 8), blend=blend, return_uncertainty=True)
    full = sliding_window_inference(network, image, InferenceOptions(output="logits", **options))
    rolling = sliding_window_inference(network, image, InferenceOptions(output="probabilities", **options))
    labels_only = sliding_window_inference(network, image, InferenceOptions(output="labels", **options))
    np.testing.assert_allclose(rolling.probabilities, torch.softmax(full.logits, 0).numpy(), atol=1e-6)
    np.testing.assert_allclose(rolling.uncertainty, full.uncertainty, atol=1e-5)
    np.testing.assert_array_equal(rolling.labels, full.labels)
    np.testing.assert_array_equal(labels_only.labels, full.labels)


def test_more_than_255_classes_gives_uint16_labels():
    network = nn.Conv3d(1, 300, 1)  # pointwise: the stitched result is the network applied to the volume
    image = random_image((1, 6, 5, 4))
    result = sliding_window_inference(network, image, InferenceOptions(patch_size=(4, 4, 4)))
    assert result.labels.dtype == np.uint16
    with torch.no_grad():
        expected = network(torch.from_numpy(image)[None])[0].argmax(0).numpy()
    np.testing.assert_array_equal(result.labels, expected)


def test_half_precision_accumulation_stays_close_to_float32():
    network = TinyConvNet()
    batch = torch.from_numpy(random_image((1, 1, 21, 17, 9)))
    exact = predict_logits(network, batch, (8, 8, 8))
    half = predict_logits(network, batch, (8, 8, 8), accumulate_dtype="float16")
    torch.testing.assert_close(half, exact, atol=2e-2, rtol=1e-2)


def test_whole_volume_equals_windows_for_a_pointwise_network():
    network = nn.Sequential(nn.Conv3d(1, 3, 1), nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 2, 1)).eval()
    image = random_image((1, 21, 13, 10))
    options = dict(patch_size=(8, 8, 8), output="logits")
    whole = sliding_window_inference(network, image, InferenceOptions(mode="whole", **options))
    windows = sliding_window_inference(network, image, InferenceOptions(mode="sliding", **options))
    assert whole.stats["mode"] == "whole" and windows.stats["mode"] == "sliding"
    assert whole.stats["patches"] == 1
    torch.testing.assert_close(whole.logits, windows.logits, atol=1e-5, rtol=0)


def test_auto_mode_picks_whole_only_for_equivalent_networks_within_budget():
    image = random_image((1, 16, 16, 16))
    options = dict(patch_size=(8, 8, 8), mode="auto")
    batch_norm = TinyConvNet(norm=nn.BatchNorm3d).eval()
    instance_norm = TinyConvNet(norm=nn.InstanceNorm3d)
    assert is_window_equivalent(batch_norm) and not is_window_equivalent(instance_norm)
    assert sliding_window_inference(batch_norm, image, InferenceOptions(**options)).stats["mode"] == "whole"
    assert sliding_window_inference(instance_norm, image, InferenceOptions(**options)).stats["mode"] == "sliding"
    larger = random_image((1, 32, 32, 32))
    tight = InferenceOptions(memory_budget_mb=1.5, **options)  # windows fit (~1.3 MB), the whole volume (~2.5) not
    assert sliding_window_inference(batch_norm, larger, tight).stats["mode"] == "sliding"
    assert sliding_window_inference(batch_norm, larger, InferenceOptions(**options)).stats["mode"] == "whole"


def test_network_left_in_its_training_mode():
    network = TinyConvNet(norm=nn.BatchNorm3d).train()
    statistics = [tensor.clone() for tensor in network.body[1].buffers()]
    sliding_window_inference(network, random_image((1, 8, 8, 8)) + 3, InferenceOptions(patch_size=(8, 8, 8)))
    assert network.training
    for before, after in zip(statistics, network.body[1].buffers()):  # ran in eval: statistics untouched
        torch.testing.assert_close(after, before, atol=0, rtol=0)


class FailsAboveBatch(TinyConvNet):
    def __init__(self, largest_batch):
        super().__init__()
        self.largest_batch = largest_batch

    def forward(self, x):
        if x.shape[0] > self.largest_batch:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate; out of memory")
        return super().forward(x)


def test_out_of_memory_falls_back_to_a_smaller_batch():
    image = random_image((1, 16, 16, 8))
    expected = sliding_window_inference(TinyConvNet(), image, InferenceOptions(patch_size=(8, 8, 8), output="logits"))
    result = sliding_window_inference(FailsAboveBatch(2), image,
                                      InferenceOptions(patch_size=(8, 8, 8), batch_size=8, output="logits"))
    assert result.stats["batch_size"] == 2
    assert any("out of memory" in note for note in result.stats["fallbacks"])
    torch.testing.assert_close(result.logits, expected.logits, atol=1e-6, rtol=0)
    with pytest.raises(OutOfMemoryError, match="Fix:"):
        sliding_window_inference(FailsAboveBatch(0), image, InferenceOptions(patch_size=(8, 8, 8)))


class AddOneFailsAbovePatch(AddOne):
    """x + 1 that runs out of memory on windows larger than `largest_voxels` (as a small GPU would)."""

    def __init__(self, largest_voxels):
        super().__init__()
        self.largest_voxels = largest_voxels

    def forward(self, x):
        if math.prod(x.shape[2:]) > self.largest_voxels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def test_out_of_memory_at_every_batch_falls_back_to_smaller_patches_and_says_so():
    image = random_image((1, 20, 18, 17))
    result = sliding_window_inference(AddOneFailsAbovePatch(8 * 8 * 8), image,
                                      InferenceOptions(patch_size=(16, 16, 16), output="logits"))
    assert result.stats["patch_size"] == (8, 8, 8)
    assert any("patch size (16, 16, 16) -> (8, 8, 8)" in note for note in result.stats["fallbacks"])
    torch.testing.assert_close(result.logits, torch.from_numpy(image) + 1, atol=1e-5, rtol=0)


def test_budget_that_fits_only_a_smaller_patch_takes_it():
    image = random_image((1, 64, 64, 64))
    options = InferenceOptions(patch_size=(64, 64, 64), memory_budget_mb=4.5, output="logits")
    result = sliding_window_inference(AddOne(), image, options)
    assert result.stats["patch_size"] == (32, 32, 32)
    assert any("to fit memory" in note for note in result.stats["fallbacks"])
    torch.testing.assert_close(result.logits, torch.from_numpy(image) + 1, atol=1e-5, rtol=0)


def test_budget_too_small_for_any_plan_raises_out_of_memory():
    with pytest.raises(OutOfMemoryError, match="memory_budget_mb"):
        sliding_window_inference(TinyConvNet(), random_image((1, 64, 64, 64)),
                                 InferenceOptions(patch_size=(8, 8, 8), memory_budget_mb=0.01))


@pytest.mark.parametrize("image, network, options, words", [
    (np.full((1, 8, 8, 8), np.nan, np.float32), TinyConvNet(), {}, "NaN"),
    (np.array([[[[1.0, np.inf]]]], np.float32), TinyConvNet(), {}, "infinite"),
    (np.zeros((1, 0, 8, 8), np.float32), TinyConvNet(), {}, "empty"),
    (np.zeros((2, 8, 8, 8), np.float32), TinyConvNet(), {}, "expects 1"),
    (np.zeros((8, 8, 8), np.float32), TinyConvNet(), {}, "channel axis"),
    (np.zeros((1, 8, 8, 8), np.float32), TinyConvNet(multiple=16), {"patch_size": (40, 24, 8)}, "(48, 32, 16)"),
    (np.zeros((1, 8, 8, 8), np.float32), TinyConvNet(), {"overlap": 1.0}, "overlap"),
    (np.zeros((1, 8, 8, 8), np.float32), TinyConvNet(), {"mirror_axes": (3,)}, "mirror_axes"),
    (np.zeros((1, 8, 8, 8), np.float32), TinyConvNet(), {"patch_size": (8, 8)}, "2 axes"),
    (np.zeros((1, 8, 8, 8), np.float32), TinyConvNet(), {"precision": "fp64"}, "precision"),
])
def test_bad_input_raises_input_error_naming_problem_and_fix(image, network, options, words):
    options = {"patch_size": (8, 8, 8), **options}
    with pytest.raises(InputError, match="Fix:") as error:
        sliding_window_inference(network, image, InferenceOptions(**options))
    assert words in str(error.value)


def test_required_multiple_error_names_the_multiple():
    with pytest.raises(InputError) as error:
        sliding_window_inference(TinyConvNet(multiple=16), np.zeros((1, 8, 8, 8), np.float32),
                                 InferenceOptions(patch_size=(40, 24, 8)))
    assert "multiple of 16" in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_raises_device_error():
    with pytest.raises(DeviceError, match="CUDA"):
        sliding_window_inference(TinyConvNet(), random_image((1, 8, 8, 8)),
                                 InferenceOptions(patch_size=(8, 8, 8), device="cuda"))
    with pytest.raises(DeviceError):
        devices.resolve_device("tpu")


def test_bf16_runs_or_falls_back_by_cpu_support():
    network = TinyConvNet()
    image = random_image((1, 12, 12, 12))
    exact = sliding_window_inference(network, image, InferenceOptions(patch_size=(8, 8, 8), output="logits"))
    fast = sliding_window_inference(network, image, InferenceOptions(patch_size=(8, 8, 8), output="logits",
                                                                     precision="bf16", device="cpu"))
    if devices.cpu_supports_bf16():
        assert fast.stats["precision"] == "bf16" and not fast.stats["fallbacks"]
        torch.testing.assert_close(fast.logits, exact.logits, atol=5e-2, rtol=5e-2)
    else:
        assert fast.stats["precision"] == "fp32"
        assert any("bf16" in note for note in fast.stats["fallbacks"])
        torch.testing.assert_close(fast.logits, exact.logits, atol=0, rtol=0)


def test_project_unet_segments_through_the_engine():
    registry = pytest.importorskip("UNetSegmentLib.networks.registry")
    network = registry.build_network("unet", 3, 1, 2, features=4, levels=3)
    image = random_image((1, 11, 20, 7))
    result = sliding_window_inference(network, image, InferenceOptions(patch_size=(8, 8, 8), mode="auto",
                                                                       output="probabilities"))
    assert result.stats["mode"] == "sliding"  # instance norm: whole volume is not equivalent
    assert result.labels.shape == (11, 20, 7)
    np.testing.assert_allclose(result.probabilities.sum(0), 1, atol=1e-5)
    assert math.isclose(float(result.stats["seconds"]), result.stats["seconds"]) and result.stats["seconds"] > 0


class _RecordsWindows(torch.nn.Module):
    """Two constant logit channels; keeps every window it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros((x.shape[0], 2) + tuple(x.shape[2:]))


@pytest.mark.parametrize("pad_value, expected", [("minimum", -3.5), (0.0, 0.0)])
@pytest.mark.parametrize("mode", ["sliding", "whole"])
def test_windows_beyond_a_small_volume_are_filled_as_in_training(pad_value, expected, mode):
    """The trainer pads cases smaller than its patch with their minimum; inference must show the network
    the same fill (a zero fill cost the real hippocampus model 0.2 Dice), or the asked number."""
    image = np.full((1, 5, 6, 7), 2.0, dtype=np.float32)
    image[0, 0, 0, 0] = -3.5
    network = _RecordsWindows()
    sliding_window_inference(network, image, InferenceOptions(patch_size=(8, 8, 8), pad_value=pad_value, mode=mode))
    window = network.seen[-1][0, 0]  # the last call: a real window (earlier ones may be shape probes)
    assert window.shape[-1] >= 8 and float(window[-1, -1, -1]) == expected
    inside = window == 2.0
    assert int(inside.sum()) == 5 * 6 * 7 - 1  # the volume itself is passed unchanged


def test_pad_value_is_validated():
    with pytest.raises(InputError, match="pad_value"):
        sliding_window_inference(_RecordsWindows(), np.zeros((1, 4, 4, 4), np.float32),
                                 InferenceOptions(patch_size=(8, 8, 8), pad_value="edge"))
