"""`segment`: segment an image file, a DICOM series folder, or every image in a folder."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..errors import ConfirmationRequired, InputError
from .terminal import ProgressBar, cancel_on_interrupt, run_cancellable

OUTPUT_EXTENSIONS = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")
WINDOW_CONFIRM_FACTOR = 50  # issue 16: more windows than this times the default overlap's asks for --yes


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
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8"),
                        help="auto (default: bf16/fp16 where fast and safe; INT8 when the model carries a "
                             "calibration that passed its check), fp32, bf16, fp16 or int8 (OpenVINO)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"),
                        help="auto (default: OpenVINO on CPU when installed, PyTorch on a GPU), torch or openvino")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for inference (default: the physical cores)")
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
    parser.add_argument("--qc", action="store_true",
                        help="also write <name>_qc.png per case: axial, coronal and sagittal slices through the "
                             "segments' centroid with their outlines in the label colours")
    parser.add_argument("--yes", action="store_true",
                        help=f"run even when the settings plan more than {WINDOW_CONFIRM_FACTOR}x the windows of the "
                             "default overlap")
    parser.add_argument("--accept-irregular-series", action="store_true",
                        help="segment a DICOM series with missing, duplicated or unevenly spaced slices anyway "
                             "(a warning names the gap)")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="memory the inference may plan for (default: half of the free memory); a smaller "
                             "budget makes it fall back to smaller batches, or stop with a clear error")


def _is_dicom_folder(folder: Path) -> bool:
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # a folder of NIfTI files is no DICOM series: no ITK noise
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def plan_outputs(input_path: Path, output: Path, output_format: str | None) -> list[tuple[Path, Path]]:
    """(input, labelmap path) pairs: one file or DICOM folder -> file; a folder of images -> folder."""
    from ..io import find_images, image_extension, strip_extension

    if not input_path.exists():
        raise InputError(f"{input_path} does not exist.", "Check the input path.")
    if not input_path.is_dir() or _is_dicom_folder(input_path):  # a FIFO or device: read_image names it
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
    decathlon = decathlon_channels(inputs)
    pairs = []
    for path in inputs:
        extension = f".{output_format}" if output_format else (
            image_extension(path) if path.is_file() and image_extension(path) in OUTPUT_EXTENSIONS else ".nrrd")
        name = strip_extension(path)
        if decathlon:  # imagesTs/<case>_0000.nii.gz -> <case>.nii.gz, named like labelsTs/<case>.nii.gz
            name = DECATHLON_CHANNEL.fullmatch(name).group(1)
        pairs.append((path, output / f"{name}{extension}"))
    return pairs


DECATHLON_CHANNEL = re.compile(r"(.+)_(\d{4})")


def decathlon_channels(inputs) -> bool:
    """True when every input is `<case>_0000.<ext>` (Decathlon / nnU-Net channel naming).

    Other channels (`_0001`, ...) belong to multi-channel models; they are refused rather than
    segmented as separate cases.
    """
    from ..io import strip_extension

    matches = [DECATHLON_CHANNEL.fullmatch(strip_extension(path)) for path in inputs]
    if not matches or not all(matches):
        return False
    others = [path.name for path, match in zip(inputs, matches) if match.group(2) != "0000"]
    if others:
        raise InputError(f"The folder holds channel files other than _0000 (e.g. {others[0]}); UNetSegment models "
                         "take one channel.", "Keep only the <case>_0000 files of the channel the model was "
                         "trained on in the input folder.")
    return True


def planned_windows(grid_zyx, patch, overlap: float) -> int:
    """Sliding windows the engine plans over a grid (array order), as its window grid counts them."""
    import math

    total = 1
    for size, length in zip(list(grid_zyx)[-len(patch):], patch):
        step = max(int(length * (1.0 - overlap)), 1)
        total *= 1 if length >= size else math.ceil((size - length) / step) + 1
    return total


def confirm_window_count(image, metadata, sampler: str, overlap: float, yes: bool) -> None:
    """An overlap near 1 (0.99: 1089 windows instead of 8) needs --yes: refused before inference."""
    from ..memory import resampled_size

    if sampler == "whole" or getattr(metadata, "sampler", "") == "topk" or yes or not 0.0 <= overlap < 1.0:
        return
    grid = list(reversed(resampled_size(image.GetSize(), image.GetSpacing(), metadata.target_spacing)))
    patch = [int(p) for p in metadata.patch_size]
    planned, default = planned_windows(grid, patch, overlap), planned_windows(grid, patch, 0.5)
    if planned > WINDOW_CONFIRM_FACTOR * default:
        raise ConfirmationRequired(
            f"--overlap {overlap:g} plans {planned} windows, {planned / default:.0f}x the {default} of the default "
            f"overlap 0.5 (more than {WINDOW_CONFIRM_FACTOR}x).",
            "Pass --yes to run it anyway, or use an overlap of 0.5-0.75.")


def qc_output(labelmap_path: Path) -> Path:
    from ..io import strip_extension

    return labelmap_path.with_name(f"{strip_extension(labelmap_path)}_qc.png")


def write_qc(image, result, path: Path, overwrite: bool, cancel) -> None:
    from ..qc import segmentation_png, write_png

    colors = {label.value: label.color for label in result.labels}
    write_png(segmentation_png(image, result.labelmap, colors), path, overwrite=overwrite, cancel=cancel)


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
    planned += [qc_output(path) for _, path in pairs if args.qc]
    from ..publish import check_writable_folder, refuse_colliding_outputs, refuse_outputs_over_inputs

    refuse_colliding_outputs(pairs)  # a.nrrd and a.nii.gz -> out/a.nrrd: refused before any work
    refuse_outputs_over_inputs(planned, [path for path, _ in pairs])
    for folder in sorted({path.parent for path in planned}):
        check_writable_folder(folder)
    folders = [path for path in planned if path.is_dir()]
    if folders:  # refuse before inference, not after it
        raise InputError(f"--output {folders[0]} is a folder; the labelmap needs a file name.",
                         "Give a file name such as segmentation.nrrd.")
    existing = [path for path in planned if os.path.lexists(path)]  # a dangling symlink counts
    if existing and not args.overwrite:  # refuse before spending minutes on inference
        raise InputError(f"{existing[0]} already exists ({len(existing)} output file(s) would be overwritten).",
                         "Choose another --output or pass --overwrite.")
    if args.model:
        model_path = find_model(args.model)
    else:  # the shipped model for the first input's modality (MR: hippocampus; CT: phantom demo)
        from ..applicability import modality_of
        import SimpleITK as sitk

        first = read_image(pairs[0][0], accept_irregular_series=args.accept_irregular_series)
        model_path = default_model_path(modality_of(sitk.GetArrayViewFromImage(first)))
        del first
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
                image = run_cancellable(  # issue 16: Ctrl+C answered within 0.1 s, whatever stage runs
                    lambda path=input_path: read_image(path, accept_irregular_series=args.accept_irregular_series),
                    cancel)
                confirm_window_count(image, model.metadata, args.sampler, args.overlap, args.yes)
                result = run_cancellable(lambda image=image: segment_image(
                    image, model, sampler=args.sampler, overlap=args.overlap, k=args.k, device=device,
                    precision=args.precision, mirror_axes=mirror_axes, return_probabilities=args.probabilities,
                    backend=args.backend, threads=args.threads,
                    return_uncertainty=args.uncertainty, progress=bar, cancel=cancel,
                    memory_budget_mb=args.memory_budget_mb), cancel)
            finally:
                bar.close()
            if output_path.name.lower().endswith(SEGMENTATION_SUFFIX):
                write_segmentation(result.labelmap, result.labels, output_path, overwrite=args.overwrite,
                                   cancel=cancel)
            else:
                write_image(result.labelmap, output_path, overwrite=args.overwrite, cancel=cancel)
            if result.probabilities is not None:
                write_image(result.probabilities, extra_output(output_path, "probabilities"),
                            overwrite=args.overwrite, cancel=cancel)
            if result.uncertainty is not None:
                write_image(result.uncertainty, extra_output(output_path, "uncertainty"), overwrite=args.overwrite,
                            cancel=cancel)
            if args.qc:
                write_qc(image, result, qc_output(output_path), args.overwrite, cancel)
            for note in result.stats.get("fallbacks") or []:  # e.g. a smaller batch or CPU to fit memory
                print(f"note: {note}", file=sys.stderr)
            for warning in result.warnings:  # e.g. a CT given to an MR model
                print(f"warning: {input_path.name}: {warning}", file=sys.stderr)
            print(f"wrote {output_path} ({result.seconds:.1f} s, sampler {result.stats.get('sampler')}, "
                  f"{result.stats.get('backend', 'torch')} {result.stats.get('precision', '')})")
        status = distributed.run_cases(pairs, segment_case, context)
    distributed.teardown(context)
    return status
