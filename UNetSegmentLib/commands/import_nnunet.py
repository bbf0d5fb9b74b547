"""`import-nnunet`: turn an nnU-Net v2 results folder into an ordinary UNetSegment model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_folder",
                        help="nnU-Net v2 results folder: nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<config> "
                             "(holds dataset.json, plans.json and fold_*/checkpoint_final.pth); 2d and 3d_fullres")
    parser.add_argument("--output", "-o", default=None,
                        help="MODEL.pt (one fold: a checkpoint; several: one ensemble file) or a folder (fold_N.pt "
                             "per fold); use it with `segment --model`. Default: <dataset>_<configuration>.pt in "
                             "the user models folder, where the Slicer panel lists it")
    parser.add_argument("--folds", nargs="+", default=None,
                        help="folds to import, e.g. 0 1 2 3 4 or all (default: every fold folder with a checkpoint)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="checkpoint_final.pth (default) or checkpoint_best.pth")
    parser.add_argument("--allow-trainer", action="append", default=[], metavar="NAME",
                        help="accept a trainer class that is not known to keep the plans' network (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--json", action="store_true",
                        help="report JSON lines (the worker protocol the Slicer panel reads) on stdout")


def run(args: argparse.Namespace) -> int:
    if args.json:
        from ..worker import run_json_command

        return run_json_command("Importing the nnU-Net model failed", lambda progress: import_model(args))
    result = import_model(args)
    print(f"imported {result['configuration']} model ({result['trainer']}, folds {', '.join(result['folds'])}; "
          f"labels: {', '.join(result['labels'])}) -> {result['output']}")
    return 0


def import_model(args: argparse.Namespace) -> dict:
    """Import, then reload the written model as any UNetSegment model (proof that it loads); its summary."""
    from ..ensemble import load_model
    from ..interop.nnunet_import import import_results_folder
    from ..interop.nnunet_plans import check_results_folder, default_model_name
    from ..model_store import user_model_target

    folder = Path(args.results_folder)
    output = (Path(args.output) if args.output
              else user_model_target(default_model_name(check_results_folder(folder)), args.overwrite))
    output = import_results_folder(folder, output, folds=args.folds, checkpoint=args.checkpoint,
                                   overwrite=args.overwrite, allow_trainers=tuple(args.allow_trainer))
    metadata = load_model(output, device="cpu").metadata
    folds = metadata.training.get("ensemble_folds") or [metadata.training.get("fold")]
    return {"output": str(output), "name": output.stem, "configuration": metadata.training.get("configuration"),
            "trainer": metadata.training.get("trainer"), "folds": [str(fold) for fold in folds],
            "labels": [label.name for label in metadata.labels[1:]]}
