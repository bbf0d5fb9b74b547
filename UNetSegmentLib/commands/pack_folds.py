"""`pack-folds`: one file holding every fold of a model, for sharing an ensemble as a single download."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folds", nargs="+", help="a folder of fold checkpoints, or two or more .pt files")
    parser.add_argument("--output", "-o", required=True, help="ensemble file to write (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")


def run(args: argparse.Namespace) -> int:
    from ..ensemble import member_paths, save_ensemble

    inputs = [Path(p) for p in args.folds]
    files = member_paths(inputs[0]) if len(inputs) == 1 and inputs[0].is_dir() else inputs
    output = save_ensemble(files, args.output, overwrite=args.overwrite)
    print(f"wrote {output}: {len(files)} folds ({', '.join(f.name for f in files)})")
    return 0
