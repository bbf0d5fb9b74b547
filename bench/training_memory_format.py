"""Seconds per training step with the default (NCDHW) layout against channels-last (NDHWC), same process.

    bash .ci/with-venv python bench/training_memory_format.py [--threads 2] [--steps 6] [--rounds 4]

The step is the hippocampus recipe's: the shipped model's architecture (deep supervision on), batch 2
of 40 x 56 x 40 patches, Dice + CE, backward, Adam. The two layouts alternate round by round in one
process, so load from elsewhere on the machine hits both alike; the fastest round of each is kept.
It also checks that both layouts compute the same thing: from identical weights and batch, each
layout's float32 gradients are compared with a float64 computation (relative L2 error), so the
layout's own error is seen next to the rounding float32 always has.

Last line (machine-readable): threads, seconds per step for each layout, their ratio, the gradient
errors of both layouts against float64.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = os.path.join(ROOT, "Resources", "Models", "hippocampus_mr", "fold_0.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per round and layout")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    import torch

    from UNetSegmentLib.checkpoint import build_model, read_checkpoint_metadata
    from UNetSegmentLib.losses import DeepSupervisionLoss, DiceCELoss

    torch.set_num_threads(args.threads)
    metadata = read_checkpoint_metadata(MODEL)
    metadata = replace(metadata, architecture_kwargs=dict(metadata.architecture_kwargs, deep_supervision=True))
    patch = tuple(int(p) for p in metadata.patch_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((args.batch_size, 1) + patch, generator=generator)
    labels = torch.randint(0, metadata.out_channels, (args.batch_size,) + patch, generator=generator)
    loss_function = DeepSupervisionLoss(DiceCELoss())
    torch.manual_seed(0)
    reference = build_model(metadata)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}

    def gradient(network, dtype, layout):
        loss_function(network(images.to(dtype).contiguous(memory_format=layout)), labels).backward()
        # the lowest deep-supervision head has loss weight 0, so it has no gradient
        return torch.cat([p.grad.double().flatten() for p in network.parameters() if p.grad is not None])

    exact = build_model(metadata)
    exact.load_state_dict(reference.state_dict())
    exact_gradient = gradient(exact.double(), torch.float64, torch.contiguous_format)
    steps, errors = {}, {}
    for name, layout in layouts.items():
        network = build_model(metadata)
        network.load_state_dict(reference.state_dict())
        network = network.to(memory_format=layout)
        batch = images.contiguous(memory_format=layout)
        errors[name] = float((gradient(network, torch.float32, layout) - exact_gradient).norm()
                             / exact_gradient.norm())
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)

        def step(network=network, batch=batch, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_function(network(batch), labels).backward()
            optimizer.step()

        steps[name] = step
    for step in steps.values():  # warm-up
        step()
    best = {name: float("inf") for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    ratio = best["contiguous"] / best["channels_last"]
    print(f"{metadata.architecture}, batch {args.batch_size} x {patch}, {args.threads} thread(s), torch "
          f"{torch.__version__}: contiguous {best['contiguous']:.3f} s/step, channels-last "
          f"{best['channels_last']:.3f} s/step ({ratio:.2f}x); gradient error against float64 "
          f"{errors['contiguous']:.1e} (contiguous), {errors['channels_last']:.1e} (channels-last)")
    print(f"threads={args.threads} contiguous_s={best['contiguous']:.4f} channels_last_s={best['channels_last']:.4f} "
          f"speedup={ratio:.3f} gradient_error_contiguous={errors['contiguous']:.2e} "
          f"gradient_error_channels_last={errors['channels_last']:.2e}")


if __name__ == "__main__":
    main()
