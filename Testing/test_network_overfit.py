"""Each 3D architecture can learn: it overfits a sphere-in-noise volume to Dice > 0.9 on CPU.

A network that is wired wrong (a skip that never arrives, a head on the wrong features, a crop
that shifts the output) fails here even when every shape test passes.
"""

import pytest
import torch
import torch.nn.functional as F

from UNetSegmentLib.networks import build_network, list_architectures

SIZE, RADIUS = 24, 7
MAX_STEPS, CHECK_EVERY = 150, 10


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny 3D convs gain little from threads, and on shared CI cores oversubscribed OpenMP threads
    made this file up to 10x slower; one thread keeps it at ~25 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sphere_in_noise(seed=0):
    generator = torch.Generator().manual_seed(seed)
    axis = torch.arange(SIZE, dtype=torch.float32)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    centre = torch.tensor([SIZE / 2 - 1, SIZE / 2 + 1, SIZE / 2])  # off-centre: catches flipped crops
    mask = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= RADIUS ** 2
    image = mask.float() + 0.35 * torch.randn(SIZE, SIZE, SIZE, generator=generator)
    return image[None, None], mask.long()[None]


def dice(prediction, target):
    intersection = ((prediction == 1) & (target == 1)).sum().item()
    return 2 * intersection / max((prediction == 1).sum().item() + (target == 1).sum().item(), 1)


def dice_ce(logits, target):
    foreground = logits.softmax(dim=1)[:, 1]
    truth = (target == 1).float()
    soft_dice = (2 * (foreground * truth).sum() + 1) / (foreground.sum() + truth.sum() + 1)
    return F.cross_entropy(logits, target) + 1 - soft_dice


@pytest.mark.parametrize("name", [spec.name for spec in list_architectures()])
def test_architecture_overfits_a_sphere(name):
    torch.manual_seed(0)
    image, target = sphere_in_noise()
    net = build_network(name, 3, 1, 2, features=4, levels=3)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.02)
    score = 0.0
    for step in range(1, MAX_STEPS + 1):
        net.train()
        loss = dice_ce(net(image), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % CHECK_EVERY == 0:
            net.eval()
            with torch.no_grad():
                score = dice(net(image).argmax(dim=1), target)
            if score > 0.95:
                break
    assert score > 0.9, f"{name}: Dice {score:.3f} after {step} steps"
