"""`worker`: one inference for the Slicer panel, reporting JSON lines on stdout (see worker.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="image file to segment (the panel writes it)")
    parser.add_argument("--model", required=True, help="checkpoint file or folder of fold checkpoints")
    parser.add_argument("--output", required=True, help="labelmap file to write (.nrrd)")
    parser.add_argument("--uncertainty-output", default=None, help="also write the uncertainty map here")
    parser.add_argument("--sampler", default="auto", choices=("auto", "sliding_window", "whole", "topk"))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--memory-budget-mb", type=float, default=None)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores)")


def run(args: argparse.Namespace) -> int:
    from ..worker import run_worker

    return run_worker(args.input, args.model, args.output, uncertainty_path=args.uncertainty_output,
                      sampler=args.sampler, overlap=args.overlap, k=args.k, device=args.device,
                      precision=args.precision, memory_budget_mb=args.memory_budget_mb, backend=args.backend,
                      threads=args.threads)
