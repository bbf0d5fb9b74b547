"""Every registered architecture, 2D and 3D, odd and even sizes: shapes, gradients, deep supervision,
config round trip, architecture-specific extras, and clear errors for bad input."""

import subprocess
import sys

import pytest
import torch

from UNetSegmentLib.errors import InputError, UnknownArchitectureError
from UNetSegmentLib.networks import build_network, list_architectures
from UNetSegmentLib.networks.base import SegmentationNetwork, build_from_config

NAMES = [spec.name for spec in list_architectures()]
TINY = {"features": 4, "levels": 3}
SIZES = {2: [(16, 24), (37, 53)], 3: [(16, 8, 16), (13, 18, 11)]}  # even (already a multiple) and odd


def tiny(name, spatial_dims, in_channels=2, out_channels=3, **kwargs):
    torch.manual_seed(0)
    return build_network(name, spatial_dims, in_channels, out_channels, **{**TINY, **kwargs})


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_output_has_input_size_and_is_finite(name, spatial_dims):
    net = tiny(name, spatial_dims).eval()
    assert isinstance(net, SegmentationNetwork)
    assert net.required_multiple == 4
    for size in SIZES[spatial_dims]:
        x = torch.randn(2, 2, *size)
        with torch.no_grad():
            y = net(x)
        assert isinstance(y, torch.Tensor)
        assert y.shape == (2, 3, *size)
        assert torch.isfinite(y).all()
        # each image in the batch is segmented on its own (no cross-talk through padding or norms)
        with torch.no_grad():
            assert torch.allclose(net(x[1:]), y[1:], atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_finite_gradient(name, spatial_dims):
    net = tiny(name, spatial_dims, deep_supervision=True).train()
    size = SIZES[spatial_dims][1]
    outputs = net(torch.randn(2, 2, *size))
    loss = sum(output.square().mean() for output in outputs)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached: {missing}"
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient: {bad}"
    first = next(p for p in net.parameters() if p.dim() > 1)
    assert first.grad.abs().sum() > 0  # the signal reaches the first convolution


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_deep_supervision_outputs_have_documented_shapes(name, spatial_dims):
    net = tiny(name, spatial_dims, deep_supervision=True).train()
    size = SIZES[spatial_dims][1]
    x = torch.randn(1, 2, *size)
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == len(net.output_scales()) >= 2
    assert [tuple(o.shape[2:]) for o in outputs] == net.deep_supervision_shapes(size)
    assert tuple(outputs[0].shape) == (1, 3, *size)
    assert all(o.shape[:2] == (1, 3) and torch.isfinite(o).all() for o in outputs)
    # switchable at run time; eval mode always returns the single full-resolution tensor
    net.deep_supervision = False
    assert isinstance(net(x), torch.Tensor)
    net.deep_supervision = True
    assert isinstance(net.eval()(x), torch.Tensor)


@pytest.mark.parametrize("name", NAMES)
def test_config_rebuilds_the_same_network_and_heads_load_either_way(name):
    net = tiny(name, 3, deep_supervision=False).eval()
    config = net.config
    assert (config["name"], config["spatial_dims"], config["in_channels"], config["out_channels"]) == (name, 3, 2, 3)
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in config["kwargs"].values())
    rebuilt = build_from_config(config).eval()
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(1, 2, 9, 10, 11)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    # deep-supervision heads always exist, so a checkpoint trained with DS loads without it
    with_ds = build_network(name, 3, 2, 3, **{**config["kwargs"], "deep_supervision": True})
    with_ds.load_state_dict(net.state_dict())


def test_attention_maps_are_returned_on_the_input_grid():
    net = tiny("attention_unet", 3).eval()
    x = torch.randn(1, 2, 13, 18, 11)
    with torch.no_grad():
        logits, maps = net.forward_with_attention(x)
        assert torch.allclose(logits, net(x))
    assert len(maps) == net.levels - 1
    for alpha in maps:
        assert alpha.shape == (1, 1, 13, 18, 11)
        assert alpha.min() >= 0 and alpha.max() <= 1


def test_unet_plus_plus_pruned_inference_equals_its_supervised_head():
    net = tiny("unet_plus_plus", 2, levels=4, deep_supervision=True)
    x = torch.randn(1, 2, 20, 28)
    with torch.no_grad():
        heads = net.train()(x)  # X(0,3), X(0,2), X(0,1); instance norm behaves alike in both modes
        net.eval()
        assert torch.allclose(net(x), heads[0], atol=1e-6)
        for depth in (1, 2):
            net.prune_depth = depth
            pruned = net(x)
            assert pruned.shape == (1, 3, 20, 28)
            assert torch.allclose(pruned, heads[3 - depth], atol=1e-6)
    with pytest.raises(InputError, match="prune_depth"):
        net.prune_depth = 4


def test_unet_3plus_classification_gate_suppresses_absent_classes():
    net = tiny("unet_3plus", 3, out_channels=3).eval()
    x = torch.randn(1, 2, 12, 12, 12)
    with torch.no_grad():
        logits, presence = net.forward_with_classification(x)
        assert presence.shape == (1, 2)
        assert torch.allclose(logits, net(x))
        net.classifier[1].bias.fill_(-40.0)  # the classifier says: no foreground class present
        probabilities = net(x).softmax(dim=1)
    assert probabilities[:, 1:].max() < 1e-6
    plain = tiny("unet_3plus", 3, classification_guided=False).eval()
    assert plain.forward_with_classification(x)[1] is None


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_dimensions_and_channels_are_clear_errors(name):
    net = tiny(name, 3).eval()
    with pytest.raises(InputError, match="5-dimensional input") as error:
        net(torch.randn(1, 2, 16, 16))
    assert "spatial_dims=2" in str(error.value)
    with pytest.raises(InputError, match=r"Add the batch axis"):
        net(torch.randn(2, 16, 16, 16))
    with pytest.raises(InputError, match="expects 2 input channel"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(InputError, match="floating point"):
        net(torch.zeros(1, 2, 8, 8, 8, dtype=torch.int64))


def test_bad_constructor_arguments_are_clear_errors():
    with pytest.raises(UnknownArchitectureError, match="Did you mean 'unet_3plus'") as error:
        build_network("unet3plus", 3, 1, 2)
    assert "Choose one of" in str(error.value) and all(name in str(error.value) for name in NAMES)
    with pytest.raises(InputError, match="spatial_dims"):
        build_network("unet", 4, 1, 2)
    with pytest.raises(InputError, match="normalisation"):
        build_network("nnunet", 3, 1, 2, norm="layer")
    with pytest.raises(InputError, match="levels"):
        build_network("unet", 3, 1, 2, levels=1)
    with pytest.raises(InputError, match="features"):
        build_network("residual_unet", 3, 1, 2, features=0)


def test_models_command_lists_every_architecture():
    result = subprocess.run([sys.executable, "-m", "UNetSegmentLib", "models"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert set(NAMES) <= listed
