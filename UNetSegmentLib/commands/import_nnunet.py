"""`import-nnunet`: turn an nnU-Net v2 results folder into an ordinary UNetSegment model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_folder",
                        help="nnU-Net v2 results folder: nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<config> "
                             "(holds dataset.json, plans.json and fold_*/checkpoint_final.pth); 2d and 3d_fullres")
    parser.add_argument("--output", "-o", required=True,
                        help="MODEL.pt (one fold: a checkpoint; several: one ensemble file) or a folder (fold_N.pt "
                             "per fold); use it with `segment --model`")
    parser.add_argument("--folds", nargs="+", default=None,
                        help="folds to import, e.g. 0 1 2 3 4 or all (default: every fold folder with a checkpoint)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="checkpoint_final.pth (default) or checkpoint_best.pth")
    parser.add_argument("--allow-trainer", action="append", default=[], metavar="NAME",
                        help="accept a trainer class that is not known to keep the plans' network (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    from ..interop.nnunet_import import import_results_folder
    from ..ensemble import load_model

    output = import_results_folder(Path(args.results_folder), Path(args.output), folds=args.folds,
                                   checkpoint=args.checkpoint, overwrite=args.overwrite,
                                   allow_trainers=tuple(args.allow_trainer))
    model = load_model(output)  # proves the written model loads as any UNetSegment model
    metadata = model.metadata
    folds = metadata.training.get("ensemble_folds") or [metadata.training.get("fold")]
    labels = ", ".join(label.name for label in metadata.labels[1:])
    print(f"imported {metadata.training.get('configuration')} model ({metadata.training.get('trainer')}, "
          f"folds {', '.join(str(f) for f in folds)}; labels: {labels}) -> {output}")
    return 0
