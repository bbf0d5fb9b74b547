"""Command line: `python -m UNetSegmentLib {models,train,segment,evaluate,demo}`.

Each subcommand lives in its own module under `UNetSegmentLib.commands`; this file only parses.
User-facing errors (`UNetSegmentError`) are printed as one clear message with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UNetSegmentError

# subcommand -> (module in UNetSegmentLib.commands, one-line help)
COMMANDS = {
    "models": ("models", "List registered architectures and available checkpoints."),
    "train": ("train", "Train a model on a Decathlon / nnU-Net dataset folder into a checkpoint."),
    "segment": ("segment", "Segment an image file, DICOM folder or folder of images with a checkpoint."),
    "evaluate": ("evaluate", "Dice and HD95 per label of predictions vs references, written to a CSV."),
    "demo": ("demo", "Segment the shipped sample with the default model; report Dice and time."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m UNetSegmentLib",
                                     description="U-Net family segmentation for CT/MR volumes.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"{__package__}.commands.{module_name}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UNetSegmentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
