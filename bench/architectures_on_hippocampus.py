"""The seven registered architectures on real scans: same fold, same recipe, same training-time budget.

    bash .ci/with-venv python bench/architectures_on_hippocampus.py --budget-s 300

Each architecture trains on fold 0 of the hippocampus MRI set (the shipped model's split and held-out
cases, bench/train_hippocampus.py) with the shipped recipe (patch 40x56x40, batch 2, Dice + CE, deep
supervision where the architecture has heads, augmentation, Adam with poly decay), but stops at the
same training budget in CPU seconds of the training process (so other work on the machine does not
shift the comparison; with --threads 1 it equals wall time on an idle core), the learning rate
annealing to zero by that budget. One row per architecture:
Dice anterior / posterior on the fold's 39 validation cases, parameters, training CPU seconds (data
loading included) and iterations reached, inference CPU seconds per case (whole pipeline from the image
on disk, --threads CPU threads). The last line is
machine-readable: `name=anterior/posterior ...` plus the budget.

It tests the seed papers' claims (UNet++ and UNet 3+ over U-Net, attention gates help) on real data
under an equal compute budget, which is what a CPU user has; with a short budget the bigger or slower
networks see fewer patches, which is part of what is measured.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from train_hippocampus import DATASET, config_for  # noqa: E402

from UNetSegmentLib.networks.registry import list_architectures  # noqa: E402


def per_case_inference_s(checkpoint: str, cases, device: str = "cpu") -> float:
    import SimpleITK as sitk

    from UNetSegmentLib.ensemble import load_model
    from UNetSegmentLib.pipeline import segment_image

    model = load_model(checkpoint, device=device)
    segment_image(sitk.ReadImage(str(cases[0].image_path)), model, device=device)  # warm-up
    started = time.process_time()  # CPU seconds: comparable when other work shares the machine
    for case in cases:
        segment_image(sitk.ReadImage(str(case.image_path)), model, device=device)
    return (time.process_time() - started) / len(cases)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="training budget per architecture, in CPU seconds of the training process")
    parser.add_argument("--architectures", nargs="+", default=[spec.name for spec in list_architectures()])
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--work", default=os.path.join(ROOT, "bench", "out", "architectures"))
    parser.add_argument("--timing-cases", type=int, default=5, help="validation cases timed for inference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    import torch

    from UNetSegmentLib.io import read_dataset
    from UNetSegmentLib.training import train

    os.makedirs(args.work, exist_ok=True)
    info = read_dataset(args.dataset)
    by_id = {case.case_id: case for case in info.cases}
    rows = []
    for name in args.architectures:
        output = os.path.join(args.work, f"{name}.pt")
        # epochs x iterations is a cap far above what the budget allows: the budget ends every run
        config = config_for(args.fold, output, epochs=1000, iterations=100, budget_s=args.budget_s,
                            dataset=args.dataset, threads=args.threads)
        config.architecture = name
        config.budget_clock = "cpu"
        cpu_started = time.process_time()
        result = train(config)
        training_cpu_s = time.process_time() - cpu_started
        parameters = sum(p.numel() for p in _network(output).parameters())
        timing_cases = [by_id[i] for i in result.metadata.training["validation_case_ids"][: args.timing_cases]]
        infer_s = per_case_inference_s(output, timing_cases)
        dice = list(result.validation_dice.values())
        rows.append((name, dice[0], dice[1], parameters, training_cpu_s, result.metadata.training["iterations"],
                     infer_s))
        print(f"{name:<16} anterior {dice[0]:.4f} posterior {dice[1]:.4f} mean {(dice[0] + dice[1]) / 2:.4f} "
              f"params {parameters / 1e6:.2f} M  train {training_cpu_s:.0f} CPU s, {result.seconds:.0f} s wall "
              f"({result.metadata.training['iterations']} it)  infer {infer_s:.2f} CPU s/case", flush=True)
    print()
    print(f"| architecture | Dice anterior | Dice posterior | mean | parameters | training CPU s (iterations) | "
          f"inference CPU s / case |")
    print("|---|---|---|---|---|---|---|")
    for name, anterior, posterior, parameters, seconds, iterations, infer_s in rows:
        print(f"| `{name}` | {anterior:.3f} | {posterior:.3f} | {(anterior + posterior) / 2:.3f} | "
              f"{parameters / 1e6:.2f} M | {seconds:.0f} ({iterations}) | {infer_s:.2f} |")
    print(f"budget_s={args.budget_s:.0f} budget_clock=cpu threads={torch.get_num_threads()} "
          + " ".join(f"{name}={anterior:.4f}/{posterior:.4f}" for name, anterior, posterior, *_ in rows))
    return 0


def _network(checkpoint: str):
    from UNetSegmentLib.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, device="cpu").network


if __name__ == "__main__":
    raise SystemExit(main())
