"""`segment`: segment an image file, a DICOM series folder, or every image in a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError
from .terminal import ProgressBar, cancel_on_interrupt

OUTPUT_EXTENSIONS = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="image file (NRRD, NIfTI, MHA), DICOM series folder, or folder of images")
    parser.add_argument("--output", "-o", required=True,
                        help="labelmap file for one input, or folder for a folder of inputs")
    parser.add_argument("--model", "-m", default=None,
                        help="checkpoint file, folder of fold checkpoints (their softmax is averaged), or "
                             "model name (default: the shipped model for the input's modality; see `models`)")
    parser.add_argument("--sampler", default="auto", choices=("auto", "sliding_window", "whole", "topk"),
                        help="auto (the model's own, default), sliding_window, whole (one pass) or topk")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--k", type=int, default=None, help="patches evaluated by a top-k model (default: its own)")
    parser.add_argument("--precision", default="auto", help="auto (default: bf16/fp16 where fast and safe), fp32, bf16 or fp16")
    parser.add_argument("--mirror", action="store_true", help="test-time mirroring along all axes (8x slower)")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write class probabilities (<name>_probabilities.nrrd, one component per label)")
    parser.add_argument("--uncertainty", action="store_true",
                        help="also write a voxel-wise uncertainty map (<name>_uncertainty.nrrd, entropy 0..1)")
    parser.add_argument("--format", dest="output_format", default=None, choices=("nrrd", "seg.nrrd", "nii.gz", "nii", "mha"),
                        help="file type for folder outputs (default: as the input; nrrd for DICOM); seg.nrrd "
                             "keeps label names and colours for Slicer")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="memory the inference may plan for (default: half of the free memory); a smaller "
                             "budget makes it fall back to smaller batches, or stop with a clear error")


def _is_dicom_folder(folder: Path) -> bool:
    import SimpleITK as sitk

    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def plan_outputs(input_path: Path, output: Path, output_format: str | None) -> list[tuple[Path, Path]]:
    """(input, labelmap path) pairs: one file or DICOM folder -> file; a folder of images -> folder."""
    from ..io import find_images, image_extension, strip_extension

    if not input_path.exists():
        raise InputError(f"{input_path} does not exist.", "Check the input path.")
    if input_path.is_file() or _is_dicom_folder(input_path):
        if image_extension(output) not in OUTPUT_EXTENSIONS:
            raise InputError(f"--output {output} is not an image file name.",
                             "Give a file name ending in .nrrd, .seg.nrrd, .nii.gz, .nii or .mha.")
        return [(input_path, output)]
    inputs = find_images(input_path)
    if not inputs:
        raise InputError(f"{input_path} holds no images.", "Point to an image file or a folder of images.")
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file, but the input is a folder of images.",
                         "Give an output folder.")
    pairs = []
    for path in inputs:
        extension = f".{output_format}" if output_format else (
            image_extension(path) if path.is_file() and image_extension(path) in OUTPUT_EXTENSIONS else ".nrrd")
        pairs.append((path, output / f"{strip_extension(path)}{extension}"))
    return pairs


def extra_output(labelmap_path: Path, kind: str) -> Path:
    from ..io import strip_extension

    return labelmap_path.with_name(f"{strip_extension(labelmap_path)}_{kind}.nrrd")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import resolve_device
    from ..ensemble import load_model
    from ..io import SEGMENTATION_SUFFIX, read_image, write_image, write_segmentation
    from ..model_store import default_model_path, find_model
    from ..pipeline import segment_image

    pairs = plan_outputs(Path(args.input), Path(args.output), args.output_format)
    planned = [path for _, path in pairs]
    planned += [extra_output(path, "probabilities") for _, path in pairs if args.probabilities]
    planned += [extra_output(path, "uncertainty") for _, path in pairs if args.uncertainty]
    folders = [path for path in planned if path.is_dir()]
    if folders:  # refuse before inference, not after it
        raise InputError(f"--output {folders[0]} is a folder; the labelmap needs a file name.",
                         "Give a file name such as segmentation.nrrd.")
    existing = [path for path in planned if path.exists()]
    if existing and not args.overwrite:  # refuse before spending minutes on inference
        raise InputError(f"{existing[0]} already exists ({len(existing)} output file(s) would be overwritten).",
                         "Choose another --output or pass --overwrite.")
    model_path = find_model(args.model) if args.model else default_model_path()
    if not model_path.exists() and not args.model:
        raise InputError(f"The shipped default model {model_path} is missing.",
                         "Pass --model with a checkpoint (train one with `python -m UNetSegmentLib train`).")
    from .. import distributed

    context = distributed.setup(resolve_device(args.device), backend="gloo")  # under torchrun: one shard per rank
    device, args.quiet = context.device, args.quiet or not context.is_main
    model = load_model(model_path, device=device)  # one checkpoint, or a fold ensemble (folder / file)
    names = ", ".join(label.name for label in model.metadata.labels[1:])
    print(f"model {model_path.name} ({model.metadata.architecture}; labels: {names}) on {device}", file=sys.stderr)
    mirror_axes = tuple(range(model.metadata.spatial_dims)) if args.mirror else ()
    with cancel_on_interrupt() as cancel:
        def segment_case(index, input_path, output_path):  # distributed.run_cases: in order, or sharded
            bar = ProgressBar(not args.quiet, f"[{index}/{len(pairs)}] {input_path.name}")
            try:
                result = segment_image(read_image(input_path), model, sampler=args.sampler, overlap=args.overlap,
                                       k=args.k, device=device, precision=args.precision, mirror_axes=mirror_axes,
                                       return_probabilities=args.probabilities,
                                       return_uncertainty=args.uncertainty, progress=bar, cancel=cancel,
                                       memory_budget_mb=args.memory_budget_mb)
            finally:
                bar.close()
            if output_path.name.lower().endswith(SEGMENTATION_SUFFIX):
                write_segmentation(result.labelmap, result.labels, output_path, overwrite=args.overwrite)
            else:
                write_image(result.labelmap, output_path, overwrite=args.overwrite)
            if result.probabilities is not None:
                write_image(result.probabilities, extra_output(output_path, "probabilities"),
                            overwrite=args.overwrite)
            if result.uncertainty is not None:
                write_image(result.uncertainty, extra_output(output_path, "uncertainty"), overwrite=args.overwrite)
            for note in result.stats.get("fallbacks") or []:  # e.g. a smaller batch or CPU to fit memory
                print(f"note: {note}", file=sys.stderr)
            print(f"wrote {output_path} ({result.seconds:.1f} s, sampler {result.stats.get('sampler')})")
        status = distributed.run_cases(pairs, segment_case, context)
    distributed.teardown(context)
    return status
