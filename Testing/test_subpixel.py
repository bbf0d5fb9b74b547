"""Transposed convolutions in sub-pixel form (runtime/subpixel.py): the same map as PyTorch's
nn.ConvTransposeNd for every configuration it accepts, a refusal for those it cannot express, and
OpenVINO IRs (fp32 and INT8) without ConvolutionBackpropData for every registered architecture,
the op the CPU plugin keeps in fp32 on AVX2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from UNetSegmentLib.networks import build_network, list_architectures
from UNetSegmentLib.runtime.subpixel import SubPixelConvTranspose, is_rewritable, rewrite_transposed_convolutions

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SIZES = {1: (7,), 2: (5, 9), 3: (5, 7, 3)}  # odd, unequal

REWRITABLE = [
    (3, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),  # MONAI UNet's up-convolution
    (3, dict(kernel_size=2, stride=2)),  # nnU-Net's
    (3, dict(kernel_size=(1, 2, 2), stride=(1, 2, 2))),  # anisotropic nnU-Net stage
    (2, dict(kernel_size=(3, 2), stride=2, padding=(1, 0), output_padding=(1, 0))),
    (2, dict(kernel_size=5, stride=3, padding=1)),
    (1, dict(kernel_size=4, stride=2, padding=1)),
    (2, dict(kernel_size=3, stride=1, padding=1)),
    (3, dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=False)),
]
NOT_REWRITABLE = [
    (2, dict(kernel_size=4, stride=2)),  # output 2L + 2, not a whole number of phases per input voxel
    (2, dict(kernel_size=3, stride=2, padding=1)),  # output 2L - 1
    (3, dict(kernel_size=3, stride=2, padding=1, output_padding=1, dilation=1, groups=2)),
    (2, dict(kernel_size=3, stride=1, padding=2, dilation=2)),
]


@pytest.mark.parametrize("dims,settings", REWRITABLE)
def test_sub_pixel_form_equals_the_transposed_convolution(dims, settings):
    torch.manual_seed(0)
    transposed = TRANSPOSED[dims](4, 6, **settings)
    x = torch.randn((2, 4) + SIZES[dims])
    assert is_rewritable(transposed)
    with torch.no_grad():
        expected = transposed(x)
        result = SubPixelConvTranspose(transposed)(x)
    assert result.shape == expected.shape
    assert float((result - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("dims,settings", NOT_REWRITABLE)
def test_configurations_without_a_sub_pixel_form_are_left_alone(dims, settings):
    transposed = TRANSPOSED[dims](4, 6, **settings)
    assert not is_rewritable(transposed)
    with pytest.raises(ValueError):
        SubPixelConvTranspose(transposed)
    network = nn.Sequential(nn.Conv2d(4, 4, 1) if dims == 2 else nn.Identity(), transposed)
    same, count = rewrite_transposed_convolutions(network)
    assert same is network and count == 0


@pytest.mark.parametrize("name", [spec.name for spec in list_architectures()])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rewritten_networks_compute_the_same_logits_and_leave_the_original_untouched(name, spatial_dims):
    torch.manual_seed(0)
    network = build_network(name, spatial_dims, 1, 3, features=4, levels=3).eval()
    before = {key: value.clone() for key, value in network.state_dict().items()}
    rewritten, count = rewrite_transposed_convolutions(network)
    x = torch.randn((2, 1) + ((20, 28) if spatial_dims == 2 else (12, 20, 16)))
    with torch.no_grad():
        expected, result = network(x), rewritten(x)
    expected = expected[0] if isinstance(expected, (list, tuple)) else expected
    result = result[0] if isinstance(result, (list, tuple)) else result
    assert float((result - expected).abs().max()) <= 1e-4
    transposed_left = [m for m in rewritten.modules() if isinstance(m, tuple(TRANSPOSED.values()))]
    assert count == 0 or rewritten is not network
    assert not any(is_rewritable(m) for m in transposed_left)
    assert all(torch.equal(before[key], value) for key, value in network.state_dict().items())
    assert any(isinstance(m, tuple(TRANSPOSED.values())) for m in network.modules()) == (count > 0)


def test_openvino_irs_have_no_transposed_convolution_and_int8_quantizes_the_upsampling():
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from UNetSegmentLib.runtime.int8 import quantize_network
    from UNetSegmentLib.runtime.openvino_backend import convert

    torch.manual_seed(0)
    network = build_network("unet", 3, 1, 2, features=4, levels=3).eval()
    assert any(isinstance(m, nn.ConvTranspose3d) for m in network.modules())
    shape = (1, 16, 16, 16)
    ops = {op.get_type_name() for op in convert(network, shape).get_ops()}
    assert "ConvolutionBackpropData" not in ops and "Convolution" in ops
    rng = np.random.default_rng(0)
    int8_model = quantize_network(network, shape, [rng.normal(0, 1, (2,) + shape).astype(np.float32)
                                                   for _ in range(2)])
    xml = bytes(int8_model["xml"])
    assert b"ConvolutionBackpropData" not in xml and b"FakeQuantize" in xml
    # every convolution reads a quantized input (FakeQuantize, directly or through padding/reshaping)
    assert xml.count(b'type="FakeQuantize"') >= xml.count(b'type="Convolution"')
