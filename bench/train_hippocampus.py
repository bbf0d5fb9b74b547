"""Train one fold of the shipped hippocampus MRI model (seeded), on the 2-core CPU.

    bash .ci/with-venv python bench/train_hippocampus.py --fold 0

Data: ../shared/data/Task04_Hippocampus (Medical Segmentation Decathlon Task04, 200 T1 MRI cases,
CC-BY-SA 4.0). HOLDOUT_CASES never enter any fold: one is the shipped demo sample, the others are
test cases. The remaining 195 cases are split into 5 seeded folds; fold F trains on four fifths and
validates on the rest. Each fold writes Resources/Models/hippocampus_mr/fold_F.pt; the folder is the
ensemble that `segment` and the panel load (softmax averaged over the folds present).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from UNetSegmentLib.training import TrainingConfig, train  # noqa: E402

DATASET = os.path.join(os.path.dirname(ROOT), "shared", "data", "Task04_Hippocampus")
# Drawn once with numpy.random.default_rng(2026).choice(sorted case ids, 5, replace=False) and frozen: never trained on.
HOLDOUT_CASES = ("hippocampus_008", "hippocampus_074", "hippocampus_165", "hippocampus_276", "hippocampus_340")
SAMPLE_CASE = HOLDOUT_CASES[0]
MODEL_DIR = os.path.join(ROOT, "Resources", "Models", "hippocampus_mr")
DESCRIPTION = ("Left+right hippocampus (anterior, posterior) on T1-weighted MRI; trained on the Medical "
               "Segmentation Decathlon Task04 (Vanderbilt), CC-BY-SA 4.0. Research use, not for clinical use.")


def config_for(fold: int, output: str, epochs: int, iterations: int, budget_s: float, dataset: str,
               device: str = "auto", threads=None) -> TrainingConfig:
    return TrainingConfig(
        dataset_dir=dataset, output=output, architecture="unet",
        architecture_kwargs={"features": 16, "levels": 4}, patch_size=(40, 56, 40), batch_size=2,
        epochs=epochs, iterations_per_epoch=iterations, fold=fold, folds=5, seed=12345,
        sampler="foreground", augment=True, deep_supervision=True, device=device, lr=1e-3,
        lr_schedule="poly", time_budget_s=budget_s, target_spacing=(1.0, 1.0, 1.0), overwrite=True,
        exclude_cases=HOLDOUT_CASES, description=DESCRIPTION, threads=threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=5100.0,
                        help="safety stop for the training loop (s); the seeded recipe ends at its iteration "
                             "count well before it on an idle 2-core CPU")
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="default: Resources/Models/hippocampus_mr/fold_F.pt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    output = args.output or os.path.join(MODEL_DIR, f"fold_{args.fold}.pt")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    started = time.perf_counter()
    result = train(config_for(args.fold, output, args.epochs, args.iterations, args.budget_s, args.dataset,
                              args.device, args.threads))
    print(f"fold {args.fold}: {result.epochs} epochs, {result.metadata.training['iterations']} iterations in "
          f"{result.seconds:.0f} s (total {time.perf_counter() - started:.0f} s); validation Dice "
          f"{result.validation_dice}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
