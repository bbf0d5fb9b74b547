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
    return 0
