"""`models`: list registered architectures (no torch needed) and available checkpoints."""

from __future__ import annotations

import argparse

from ..networks.registry import list_architectures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="also print each architecture's paper")


def run(args: argparse.Namespace) -> int:
    print("Architectures:")
    for spec in list_architectures():
        ds = " [deep supervision]" if spec.supports_deep_supervision else ""
        print(f"  {spec.name:<16} {spec.description}{ds}")
        if args.verbose:
            print(f"  {'':<16} paper: {spec.paper}")
    print_checkpoints(args.verbose)
    return 0


def print_checkpoints(verbose: bool = False) -> None:
    """Shipped and user checkpoints; reading their metadata needs torch, so say so if it is missing."""
    from ..model_store import list_models, shipped_models_dir, user_models_dir

    print("Checkpoints:")
    try:
        entries = list_models()
    except ImportError as error:
        print(f"  (cannot read checkpoints: {error}; install PyTorch)")
        return
    if not entries:
        print(f"  none in {shipped_models_dir()} or {user_models_dir()}")
    for entry in entries:
        if entry.metadata is None:
            print(f"  {entry.name:<16} [{entry.source}] INVALID: {entry.error}")
            continue
        meta = entry.metadata
        labels = ", ".join(label.name for label in meta.labels[1:])
        dice = ", ".join(f"{name} {score:.3f}" for name, score in meta.validation_dice.items())
        folds = meta.training.get("ensemble_folds") if isinstance(meta.training, dict) else None
        kind = f"ensemble of folds {', '.join(str(f) for f in folds)}, " if folds else ""
        print(f"  {entry.name:<16} [{entry.source}] {kind}{meta.architecture} ({meta.sampler}), {meta.modality}, "
              f"labels: {labels}" + (f"; validation Dice: {dice}" if dice else ""))
        if meta.description:  # e.g. "Demo model trained on the synthetic phantom ...; not for clinical use."
            print(f"  {'':<16} {meta.description}")
        if verbose:
            print(f"  {'':<16} {entry.path}")
