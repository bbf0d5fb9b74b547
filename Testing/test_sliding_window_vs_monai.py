"""Our sliding-window engine against MONAI's `sliding_window_inference` (the oracle) on real networks."""

import numpy as np
import pytest
import torch

from UNetSegmentLib.inference.gaussian import importance_map, window_starts
from UNetSegmentLib.inference.sliding_window import InferenceOptions, predict_logits, sliding_window_inference

monai_inferers = pytest.importorskip("monai.inferers")
monai_nets = pytest.importorskip("monai.networks.nets")
monai_data_utils = pytest.importorskip("monai.data.utils")


def monai_unet(spatial_dims, out_channels=3, norm="instance", seed=0):
    torch.manual_seed(seed)
    return monai_nets.UNet(spatial_dims, 1, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
                           norm=norm).eval()


def monai_result(network, batch, patch, overlap=0.5, mode="gaussian", sw_batch_size=4):
    with torch.no_grad():
        return monai_inferers.sliding_window_inference(batch, patch, sw_batch_size, network, overlap=overlap,
                                                       mode=mode, sigma_scale=0.125)


@pytest.mark.parametrize("shape, patch, overlap, mode", [
    ((23, 19, 13), (8, 8, 8), 0.5, "gaussian"),      # odd sizes, several windows per axis
    ((6, 21, 5), (8, 8, 8), 0.5, "gaussian"),        # smaller than the patch along two axes
    ((1, 17, 12), (8, 8, 8), 0.25, "gaussian"),      # a single slice
    ((15, 11, 9), (8, 8, 8), 0.5, "constant"),
])
def test_matches_monai_3d(shape, patch, overlap, mode):
    network = monai_unet(3)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn((1, 1) + shape, generator=generator)
    expected = monai_result(network, batch, patch, overlap, mode)
    ours = predict_logits(network, batch, patch, overlap=overlap, blend=mode, pad_value=0.0)  # MONAI pads zeros
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_matches_monai_2d_batch_of_two():
    network = monai_unet(2, out_channels=4, norm="batch")
    batch = torch.randn((2, 1, 29, 45), generator=torch.Generator().manual_seed(2))
    expected = monai_result(network, batch, (16, 16), 0.5, "gaussian", sw_batch_size=3)
    torch.testing.assert_close(predict_logits(network, batch, (16, 16), batch_size=3), expected, atol=1e-4, rtol=0)


def test_labels_and_probabilities_match_monai_softmax():
    network = monai_unet(3)
    image = torch.randn((1, 13, 17, 11), generator=torch.Generator().manual_seed(3))
    expected = monai_result(network, image[None], (8, 8, 8))[0]
    result = sliding_window_inference(network, image.numpy(), InferenceOptions(
        patch_size=(8, 8, 8), output="probabilities", return_probabilities=True))
    np.testing.assert_allclose(result.probabilities, torch.softmax(expected, 0).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(result.labels, expected.argmax(0).numpy())


@pytest.mark.parametrize("shape, patch", [((13, 20, 17), (8, 8, 8)), ((64, 80, 80), (48, 48, 48)),
                                          ((8, 9, 30), (8, 8, 8)), ((100, 7), (32, 7))])
def test_window_grid_matches_monai(shape, patch):
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(shape, patch, len(shape), (0.5,) * len(shape))
    slices = monai_data_utils.dense_patch_slices(shape, patch, interval)
    expected = [tuple(s.start for s in window) for window in slices]
    assert window_starts(shape, patch, 0.5) == expected


@pytest.mark.parametrize("patch", [(8, 6, 10), (96, 96, 96), (5, 64)])
def test_importance_map_matches_monai(patch):
    expected = monai_data_utils.compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
    torch.testing.assert_close(importance_map(patch, "gaussian", 0.125), expected, atol=1e-7, rtol=0)
