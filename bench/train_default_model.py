"""Reproduce the shipped default model and sample (seeded): phantom dataset -> train -> Resources/.

    .venv/bin/python bench/train_default_model.py [--epochs 80] [--iterations 40] [--device auto]

Writes Resources/Models/phantom_ct_demo.pt, Resources/Samples/sample_ct.nrrd and
Resources/Samples/sample_ct_reference.nrrd. The training data is the synthetic phantom of
UNetSegmentLib.phantom (no real patient data). To fit a 2-core CPU budget the model is small and
trains at a coarse 3 mm isotropic spacing; inference resamples any input to that spacing and back.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from UNetSegmentLib import phantom  # noqa: E402
from UNetSegmentLib.training import TrainingConfig, train  # noqa: E402

DATASET_SEED = 2024
SAMPLE_CASE_INDEX = 1000  # never part of the training dataset


def write_sample(out_dir: str) -> None:
    """A held-out phantom case as int16 gzip NRRD plus its reference labelmap."""
    os.makedirs(out_dir, exist_ok=True)
    image, label = phantom.make_case(phantom.case_seed(DATASET_SEED, SAMPLE_CASE_INDEX)).to_sitk()
    phantom.write_sitk_atomic(image, os.path.join(out_dir, "sample_ct.nrrd"))
    phantom.write_sitk_atomic(label, os.path.join(out_dir, "sample_ct_reference.nrrd"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default=os.path.join(ROOT, "bench", "out", "default_model"))
    parser.add_argument("--output", default=os.path.join(ROOT, "Resources", "Models", "phantom_ct_demo.pt"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    dataset = os.path.join(args.work, "phantom")
    phantom.write_dataset(dataset, args.cases, seed=DATASET_SEED)
    write_sample(os.path.join(ROOT, "Resources", "Samples"))
    config = TrainingConfig(
        dataset_dir=dataset, output=args.output, architecture="unet",
        architecture_kwargs={"features": 8, "levels": 4}, patch_size=(32, 48, 64), batch_size=2,
        epochs=args.epochs, iterations_per_epoch=args.iterations, fold=0, folds=5, seed=0,
        sampler="foreground", augment=True, deep_supervision=True, device=args.device,
        target_spacing=(3.0, 3.0, 3.0), overwrite=True,
        description="Demo model trained on the synthetic UNetSegment phantom (liver, spleen, kidney); "
                    "not for clinical use.")
    result = train(config)
    print(f"trained {result.epochs} epochs in {result.seconds:.0f} s (total {time.perf_counter() - started:.0f} s); "
          f"validation Dice {result.validation_dice}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
