"""`train`: train a segmentation model on a Decathlon / nnU-Net dataset folder and write a checkpoint."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys

from .terminal import ProgressBar, cancel_on_interrupt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder with imagesTr/, labelsTr/ and dataset.json")
    parser.add_argument("--output", "-o", required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--architecture", default="unet", help="registered architecture (default unet; "
                        "see `models`)")
    parser.add_argument("--features", type=int, default=16, help="base width of the network (default 16)")
    parser.add_argument("--levels", type=int, default=4, help="resolution levels (default 4)")
    parser.add_argument("--architecture-kwargs", default="{}", metavar="JSON",
                        help='further constructor arguments as JSON, e.g. \'{"norm": "batch"}\'')
    parser.add_argument("--patch-size", type=int, nargs="+", default=[32, 64, 64], metavar="N",
                        help="training patch in (z, y, x) voxels (default 32 64 64)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=50, help="epoch cap (default 50)")
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch (default 50)")
    parser.add_argument("--fold", type=int, default=0, help="held-out fold (default 0)")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default 5)")
    parser.add_argument("--sampler", default="foreground", choices=("uniform", "foreground", "topk"),
                        help="uniform or foreground-oversampled patches (default foreground), or topk: train a "
                             "No-More-Sliding-Window model (global branch + learned top-k patch selection)")
    parser.add_argument("--k", type=int, default=None,
                        help="with --sampler topk: patches evaluated at inference (default: the model's)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentation")
    parser.add_argument("--no-deep-supervision", dest="deep_supervision", action="store_false")
    parser.add_argument("--lr", type=float, default=3e-4, help="initial Adam learning rate (default 3e-4)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch log")
    parser.add_argument("--int8", choices=("auto", "yes", "no"), default="auto",
                        help="after training, calibrate INT8 (OpenVINO + NNCF) on the training patches and store "
                             "it with its Dice check, as `quantize` does: auto (default) when both are installed, "
                             "yes (fail without them), no")
    parser.add_argument("--resume", default=None, metavar="STATE",
                        help="continue from <output>.resume, the state written after every epoch (any number of "
                             "ranks; see docs/distributed.md)")
    parser.add_argument("--save-state", dest="save_state", action="store_true", default=None,
                        help="write <output>.resume after every epoch (always on under torchrun / srun)")


def config_from_args(args: argparse.Namespace):
    from ..errors import InputError
    from ..training import TrainingConfig

    try:
        extra = json.loads(args.architecture_kwargs)
    except ValueError as error:
        raise InputError(f"--architecture-kwargs is not valid JSON ({error}).",
                         'Quote it as a JSON object, e.g. \'{"norm": "batch"}\'.') from None
    if not isinstance(extra, dict):
        raise InputError("--architecture-kwargs must be a JSON object.", 'Use e.g. \'{"norm": "batch"}\'.')
    if not 0 <= args.seed < 2 ** 32:  # numpy's generators refuse a negative seed deep inside training
        raise InputError(f"--seed must be an integer in 0..4294967295, got {args.seed}.", "Pass e.g. --seed 0.")
    for name in ("features", "levels", "batch_size", "epochs", "iterations", "folds"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}.",
                             f"Pass a positive --{name.replace('_', '-')}.")
    architecture_kwargs = {"features": args.features, "levels": args.levels, **extra}
    return TrainingConfig(
        dataset_dir=args.dataset, output=args.output, architecture=args.architecture,
        architecture_kwargs=architecture_kwargs, patch_size=tuple(args.patch_size), batch_size=args.batch_size,
        epochs=args.epochs, iterations_per_epoch=args.iterations, fold=args.fold, folds=args.folds,
        seed=args.seed, sampler=args.sampler, augment=args.augment, deep_supervision=args.deep_supervision,
        device=args.device, lr=args.lr, overwrite=args.overwrite, resume=getattr(args, "resume", None),
        save_state=getattr(args, "save_state", None))


def run(args: argparse.Namespace) -> int:
    from ..training import train

    config = config_from_args(args)
    if args.sampler == "topk":
        from ..topk.training import train_topk

        settings = {"k": args.k} if args.k is not None else None
        trainer = functools.partial(train_topk, settings=settings)
    elif args.k is not None:
        from ..errors import InputError

        raise InputError("--k applies only to --sampler topk.", "Drop --k or add --sampler topk.")
    else:
        trainer = train
    from ..distributed import launched_rank

    if launched_rank() != 0:  # under torchrun / srun: rank 0 alone shows the bar, the log and the result
        args.quiet = True
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    bar = ProgressBar(not args.quiet, unit="it", leave=True)
    try:
        with cancel_on_interrupt() as cancel:  # Ctrl+C finishes the current step and writes nothing
            result = trainer(config, progress=bar, cancel=cancel)
    finally:
        bar.close()
    if launched_rank() != 0:
        return 0
    dice = ", ".join(f"{name} {score:.3f}" for name, score in result.validation_dice.items())
    print(f"wrote {result.checkpoint}: {result.epochs} epochs in {result.seconds:.0f} s"
          + (f"; validation Dice: {dice}" if dice else ""))
    _quantize_after_training(args, result.checkpoint)
    return 0


def _quantize_after_training(args: argparse.Namespace, checkpoint) -> None:
    """INT8 right after training, while the dataset is at hand (issue 13); never loses the trained model:
    a failure is a note, except with --int8 yes."""
    from ..errors import InputError, UNetSegmentError
    from ..runtime.int8 import int8_tools_available, quantize_checkpoint

    if args.int8 == "no":
        return
    if args.sampler == "topk" or not int8_tools_available():
        if args.int8 == "yes":
            raise InputError("--int8 yes needs a sliding-window model and the openvino and nncf packages.",
                             "Install the pinned openvino and nncf, or pass --int8 auto / no.")
        return
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    try:
        card = quantize_checkpoint(checkpoint, args.dataset, log=log)
    except UNetSegmentError as error:
        if args.int8 == "yes":
            raise
        print(f"note: INT8 calibration skipped ({error.problem}); the fp32 model is written. "
              f"Run `python -m UNetSegmentLib quantize {checkpoint} {args.dataset}` to retry.", file=sys.stderr)
        return
    verdict = "INT8-ready" if card["ready"] else "not INT8-ready"
    print(f"INT8: mean Dice {card['mean_dice_fp32']:.4f} fp32 -> {card['mean_dice_int8']:.4f} INT8 on "
          f"{card['validation_cases']} validation cases: {verdict}")
