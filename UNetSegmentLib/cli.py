"""Command line: `python -m UNetSegmentLib {models,train,segment,evaluate,demo}`.

Each subcommand lives in its own module under `UNetSegmentLib.commands`; this file parses and is the
one error boundary: known failures become `error: <what> Fix: <what to do>` with exit status 2, and
only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from .errors import translate

log = logging.getLogger(__name__)
cancelled = False  # the last main() ended by a cancel or signal: `__main__` then exits without teardown

# subcommand -> (module in UNetSegmentLib.commands, one-line help)
COMMANDS = {
    "models": ("models", "List registered architectures and available checkpoints."),
    "train": ("train", "Train a model on a Decathlon / nnU-Net dataset folder into a checkpoint."),
    "segment": ("segment", "Segment an image file, DICOM folder or folder of images with a checkpoint."),
    "evaluate": ("evaluate", "Dice and HD95 per label of predictions vs references, written to a CSV."),
    "demo": ("demo", "Segment the shipped sample with the default model; report Dice and time."),
    "import-nnunet": ("import_nnunet", "Import an nnU-Net v2 results folder (2d / 3d_fullres) as a model or fold ensemble."),
    "pack-folds": ("pack_folds", "Pack fold checkpoints (a folder or files) into one ensemble file."),
    "quantize": ("quantize", "INT8-quantize a checkpoint (OpenVINO + NNCF) and store its Dice check in the card."),
    "worker": ("worker", "Run one inference for the Slicer panel, reporting JSON lines on stdout."),
    "finetune": ("finetune", "Fine-tune a model on corrected cases into a new model (parent kept; Dice before/after)."),
}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error form: `error: <what> Fix: <what to do>`, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        command = self.prog
        fix = f"Run `{command} --help` for the valid arguments."
        if "invalid choice" in message or "required" in message or "expected" in message:
            fix = f"Check the arguments against `{command} --help`."
        self.exit(2, f"error: {command}: {message}. Fix: {fix}\n")


def _positive_mb(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MB (or inf), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m UNetSegmentLib", description="U-Net family segmentation for CT/MR volumes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"{__package__}.commands.{module_name}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        if not any("--memory-limit-mb" in action.option_strings for action in command_parser._actions):
            command_parser.add_argument(
                "--memory-limit-mb", type=_positive_mb, default=None, metavar="MB",
                help="refuse steps estimated to need more memory than this (default: 80 %% of the available RAM, "
                     "or $UNETSEGMENT_MEMORY_LIMIT_MB; 'inf' switches the guard off)")
        command_parser.set_defaults(run=module.run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """UNetSegment's own warnings as one `warning: ...` line; others as Python prints them."""
    from .errors import UNetSegmentWarning

    if issubclass(category, UNetSegmentWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _check_device(args: argparse.Namespace) -> None:
    """An unsupported --device (e.g. xpu) is refused before any work, with the supported names."""
    device = getattr(args, "device", None)
    if device in (None, "auto", "cpu"):
        return
    from .inference.devices import resolve_device

    resolve_device(device)


def main(argv: list[str] | None = None) -> int:
    """The error boundary of every command: known failure classes (UNetSegmentError, OSError by errno,
    out of memory, SimpleITK errors) print one `error: ... Fix: ...` line and exit 2; Ctrl+C / SIGTERM exit
    130 / 143 after removing temp files; anything else is a bug and keeps its traceback (logged)."""
    global cancelled
    from . import memory
    from .errors import Cancelled
    from .publish import Terminated, install_signal_cleanup

    cancelled = False

    args = build_parser().parse_args(argv)
    install_signal_cleanup()
    previous_showwarning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        memory.set_limit_mb(getattr(args, "memory_limit_mb", None))
        _check_device(args)
        return int(args.run(args) or 0)
    except Terminated:
        cancelled = True
        print("error: Stopped by SIGTERM; nothing was written.", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        cancelled = True
        print("error: Cancelled by the user (interrupted); nothing was written.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into known failures and bugs just below
        known = translate(error)
        if known is None:  # a bug: its traceback is the report, on stderr and in the log
            import traceback

            traceback.print_exc(file=sys.stderr)
            print(f"Unexpected error in `{getattr(args, 'command', '?')}`: this is a bug in UNetSegment; please "
                  "report it with the traceback above.", file=sys.stderr)
            log.debug("unexpected error", exc_info=True)
            return 1
        cancelled = isinstance(known, Cancelled)
        print(f"error: {_one_line(str(known))}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous_showwarning
        memory.set_limit_mb(None)


def _one_line(text: str) -> str:
    return " ".join(text.split())
