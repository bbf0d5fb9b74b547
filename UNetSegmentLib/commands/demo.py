"""`demo`: segment a shipped sample with the shipped model for it and score it against its reference.

The README's one-command check that everything works: by default the real hippocampus MRI model
(fold ensemble) on a real T1 MRI case that no fold trained on; `--sample phantom-ct` runs the
synthetic-phantom CT demo model on its phantom case. Writes the labelmap (on the sample's grid) and
a short report, and ends with `dice=<mean foreground Dice> seconds=<inference wall time>`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

DEFAULT_OUTPUT = "unetsegment_demo_output"
LABELMAP_NAME = "sample_segmentation.nrrd"
SAMPLE_MODALITY = {"mr": "MR", "phantom-ct": "CT"}
REPORT_NAME = "report.txt"
WARNING_BAR = "!" * 78


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", default=DEFAULT_OUTPUT,
                        help=f"output folder (default ./{DEFAULT_OUTPUT}/; a timestamped sub-folder is used "
                             "when it already holds a demo result, unless --overwrite)")
    parser.add_argument("--sample", default="mr", choices=tuple(SAMPLE_MODALITY),
                        help="mr (default): a real T1 MRI hippocampus case with the real model; phantom-ct: the "
                             "synthetic CT phantom case with the phantom demo model")
    parser.add_argument("--model", "-m", default=None,
                        help="checkpoint, fold folder or model name (default: the shipped model for the sample)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--sampler", default="auto", choices=("auto", "sliding_window", "whole", "topk"))
    parser.add_argument("--overwrite", action="store_true", help="replace a previous demo result in --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _warn(lines: list[str]) -> None:
    print(WARNING_BAR, *(f"!! {line}" for line in lines), WARNING_BAR, sep="\n", file=sys.stderr)


def _output_folder(folder: Path, overwrite: bool) -> Path:
    if overwrite or not ((folder / LABELMAP_NAME).exists() or (folder / REPORT_NAME).exists()):
        return folder
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return folder / f"run-{stamp}"


def _untrained_model(reference_image):
    """A freshly initialised network: the pipeline runs end to end, the Dice is meaningless."""
    import torch

    from ..checkpoint import LoadedModel
    from ..metadata import LabelInfo, ModelMetadata, Normalization
    from ..networks import build_network
    from ..phantom import LABEL_COLORS, LABEL_NAMES

    labels = [LabelInfo(value, LABEL_NAMES[value], LABEL_COLORS[value]) for value in sorted(LABEL_NAMES)]
    metadata = ModelMetadata(
        architecture="unet", architecture_kwargs={"features": 8, "levels": 3}, spatial_dims=3, in_channels=1,
        labels=labels, patch_size=[32, 64, 64], target_spacing=[float(s) for s in reference_image.GetSpacing()],
        normalization=Normalization("ct", -200.0, 300.0, 50.0, 100.0), modality="CT",
        description="UNTRAINED placeholder (random weights)")
    torch.manual_seed(0)
    network = build_network(metadata.architecture, 3, 1, metadata.out_channels, **metadata.architecture_kwargs)
    return LoadedModel(network=network.eval(), metadata=metadata, path=Path("<untrained network>"))


def _sample(kind: str = "mr"):
    """(image, reference, description); the phantom generator stands in while no phantom sample is shipped."""
    from ..errors import InputError
    from ..io import read_image, read_labelmap
    from ..model_store import sample_image_path, sample_reference_path

    image_path, reference_path = sample_image_path(kind), sample_reference_path(kind)
    if image_path.exists() and reference_path.exists():
        return read_image(image_path), read_labelmap(reference_path), str(image_path)
    if kind != "phantom-ct":
        raise InputError(f"The shipped sample {image_path} or its reference is missing.",
                         "Restore Resources/Samples from the repository, or run `demo --sample phantom-ct`.")
    from ..phantom import make_case

    _warn([f"The shipped sample {image_path} is missing.",
           "Using a generated phantom case (seed 2024) instead."])
    image, reference = make_case(2024).to_sitk()
    return image, reference, "generated phantom case (seed 2024)"


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import SimpleITK as sitk

    from ..checkpoint import resolve_device
    from ..ensemble import load_model
    from ..io import write_image, write_text
    from ..metrics import dice_per_label
    from ..model_store import default_model_path, find_model
    from ..pipeline import segment_image
    from .terminal import ProgressBar, cancel_on_interrupt

    image, reference, sample_description = _sample(args.sample)
    device = resolve_device(args.device)
    model_path = find_model(args.model) if args.model else default_model_path(SAMPLE_MODALITY[args.sample])
    untrained = not model_path.exists() and not args.model
    if untrained:
        _warn([f"The shipped default model {model_path} is missing.",
               "Segmenting with a FRESHLY INITIALISED (untrained) network: the result and Dice are meaningless.",
               "Train one with `python -m UNetSegmentLib train` or pass --model."])
        model = _untrained_model(image)
    else:
        model = load_model(model_path, device=device)
    folder = _output_folder(Path(args.output), args.overwrite)
    with cancel_on_interrupt() as cancel:
        bar = ProgressBar(not args.quiet, "demo")
        try:
            result = segment_image(image, model, sampler=args.sampler, device=device, progress=bar, cancel=cancel)
        finally:
            bar.close()
    labelmap_path = write_image(result.labelmap, folder / LABELMAP_NAME, overwrite=args.overwrite)
    prediction = sitk.GetArrayViewFromImage(result.labelmap)
    truth = sitk.GetArrayViewFromImage(reference)
    foreground = [label for label in result.labels if label.value != 0]
    scores = dice_per_label(prediction, truth, [label.value for label in foreground])
    mean_dice = float(np.mean(list(scores.values())))
    lines = [f"UNetSegment demo, {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"input: {sample_description} (size {image.GetSize()}, spacing "
             f"{tuple(round(s, 3) for s in image.GetSpacing())} mm)",
             f"model: {model.path}{'  (UNTRAINED: random weights)' if untrained else ''}",
             f"device: {device}; sampler: {result.stats.get('sampler')}; "
             f"inference wall time {result.seconds:.2f} s", f"labelmap: {labelmap_path}",
             "Dice vs the shipped reference:"]
    lines[3:3] = [f"warning: {warning}" for warning in result.warnings]
    lines += [f"  {label.name:<12} {scores[label.value]:.4f}" for label in foreground]
    lines.append(f"  {'mean':<12} {mean_dice:.4f}")
    write_text("\n".join(lines) + "\n", folder / REPORT_NAME, overwrite=args.overwrite)
    print("\n".join(lines))
    print(f"report: {folder / REPORT_NAME}")
    print(f"dice={mean_dice:.4f} seconds={result.seconds:.2f}")
    return 0
