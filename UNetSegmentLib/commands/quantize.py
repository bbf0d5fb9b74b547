"""`quantize`: INT8 post-training quantization (OpenVINO + NNCF) of a checkpoint, with its accuracy check.

Calibrates on the model's own training patches from DATASET_DIR (the cases its card lists), checks
Dice of fp32 vs INT8 on its validation cases, and writes the INT8 model and the check into the
checkpoint. A model losing more than 0.005 mean Dice is not marked INT8-ready (segment's
`--precision auto` then keeps it on fp32; `--precision int8` still uses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint file (.pt) to quantize; rewritten in place (atomically)")
    parser.add_argument("dataset", help="the dataset folder the model was trained on (imagesTr/, labelsTr/, "
                                        "dataset.json)")
    parser.add_argument("--calibration-patches", type=int, default=64,
                        help="training patches used to calibrate (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores)")
    parser.add_argument("--validation-cases", nargs="+", default=None,
                        help="case ids for the accuracy check (default: the card's validation_case_ids)")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..runtime.int8 import quantize_checkpoint

    if args.calibration_patches < 1:
        raise InputError(f"--calibration-patches must be positive, got {args.calibration_patches}.",
                         "Use e.g. 64.")
    path = Path(args.model)
    card = quantize_checkpoint(path, args.dataset, calibration_patches=args.calibration_patches,
                               threads=args.threads, validation_case_ids=args.validation_cases,
                               log=lambda text: print(text, file=sys.stderr))
    verdict = "INT8-ready" if card["ready"] else f"NOT INT8-ready (loses more than {card['tolerance']} mean Dice)"
    print(f"{path.name}: mean Dice fp32 {card['mean_dice_fp32']:.4f}, INT8 {card['mean_dice_int8']:.4f} "
          f"(change {card['mean_dice_change']:+.4f}) on {card['validation_cases']} validation cases: {verdict}")
    return 0
