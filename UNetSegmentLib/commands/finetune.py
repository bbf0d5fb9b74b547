"""`finetune`: continue training a model on the user's corrected cases into a new model (finetune.py).

With `--json` it speaks the worker protocol of UNetSegmentLib.worker on stdout (hello, progress with
the loss, result, error), so the Slicer panel can run it in a worker process and cancel it.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..finetune import OPTIMIZERS  # torch-free module

    parser.add_argument("model", help="checkpoint (.pt), folder of fold checkpoints (its first fold is tuned) "
                                      "or model name")
    parser.add_argument("dataset", help="training set folder (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--output", "-o", default=None,
                        help="new checkpoint (default: <user models>/<model>-ft-<YYYYMMDD-HHMMSS>.pt)")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="wall-time budget in seconds, checks included (default 600)")
    parser.add_argument("--max-iterations", type=int, default=5000, help="iteration cap (default 5000)")
    parser.add_argument("--lr", type=float, default=3e-4, help="initial learning rate (default 3e-4)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="radam (default; rectified Adam: its first steps follow the gradient's size, not "
                             "its sign, so a converged model is moved less) or adam")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the parent's")
    parser.add_argument("--parent-weight", type=float, default=None,
                        help="share of the parent's weights in the written model, in [0, 1) (weight-space "
                             "ensembling of parent and tuned weights; default 0: the tuned weights)")
    parser.add_argument("--rehearsal", type=float, default=None,
                        help="share of each batch drawn from the parent's own training cases shipped beside it "
                             "(<checkpoint>.rehearsal.npz), in [0, 1); default 0.5 when the parent has them; "
                             "0 tunes on your cases alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="report JSON lines (worker protocol) on stdout")


def config_from_args(args: argparse.Namespace):
    from ..errors import InputError
    from ..finetune import FineTuneConfig

    if not args.budget_s > 0:
        raise InputError(f"--budget-s must be positive, got {args.budget_s}.", "Pass e.g. --budget-s 600.")
    for name in ("max_iterations", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be 1 or more, got {value}.",
                             f"Pass a positive --{name.replace('_', '-')}.")
    if not args.lr > 0:
        raise InputError(f"--lr must be positive, got {args.lr}.", "Use the default 3e-4.")
    extra = {name: getattr(args, name) for name in ("parent_weight", "optimizer", "rehearsal") if getattr(args, name) is not None}
    return FineTuneConfig(model=args.model, dataset_dir=args.dataset, output=args.output, budget_s=args.budget_s,
                          max_iterations=args.max_iterations, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                          device=args.device, threads=args.threads, overwrite=args.overwrite, **extra)


def run(args: argparse.Namespace) -> int:
    if args.json:
        return _run_json(args)
    from ..finetune import fine_tune
    from .terminal import ProgressBar, cancel_on_interrupt

    config = config_from_args(args)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    bar = ProgressBar(not args.quiet, unit="it", leave=True)

    def progress(report) -> None:  # N is re-estimated as the rate settles: update the bar, not a new one
        if bar.bar is not None and report.stage == bar.stage and report.total:
            bar.bar.total = report.total
        bar(report)
        if bar.bar is not None and getattr(report, "loss", None) is not None:
            bar.bar.set_postfix(loss=f"{report.loss:.4f}", refresh=False)

    try:
        with cancel_on_interrupt() as cancel:
            result = fine_tune(config, progress=progress, cancel=cancel)
    finally:
        bar.close()
    print(f"wrote {result.output}: {result.iterations} iterations in {result.seconds:.0f} s; {result.message}")
    return 0


def _run_json(args: argparse.Namespace) -> int:
    """Worker mode: every report is one JSON line; errors are reported as an event too (then exit 2)."""
    from ..finetune import fine_tune
    from ..worker import run_json_command

    return run_json_command("Fine-tuning failed",
                            lambda progress: fine_tune(config_from_args(args), progress=progress).to_dict())
