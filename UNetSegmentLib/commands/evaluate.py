"""`evaluate`: Dice and HD95 per label of predictions against references, written as a CSV."""

from __future__ import annotations

import argparse
import csv
import io as text_io
import math
from pathlib import Path

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prediction", help="predicted labelmap file, or folder of them")
    parser.add_argument("reference", help="reference labelmap file, or folder (matched by file name)")
    parser.add_argument("--output", "-o", required=True, help="CSV file to write")
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="label values to score (default: every non-zero value in either labelmap)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CSV (and its box plot)")
    parser.add_argument("--no-plot", dest="plot", action="store_false",
                        help="skip the Dice box plot (<output>_dice.png, written next to the CSV by default)")


def match_cases(prediction: Path, reference: Path) -> list[tuple[str, Path, Path]]:
    """(case id, prediction, reference): files pair up by name without extension."""
    from ..io import find_images, strip_extension

    for path in (prediction, reference):
        if not path.exists():
            raise InputError(f"{path} does not exist.", "Check the path.")
    if prediction.is_file() and reference.is_file():
        return [(strip_extension(prediction), prediction, reference)]
    if prediction.is_file() or reference.is_file():
        raise InputError("Pass two files or two folders.", "Give prediction and reference of the same kind.")
    references = {strip_extension(path): path for path in find_images(reference)}
    cases = [(strip_extension(path), path, references.get(strip_extension(path))) for path in find_images(prediction)]
    unmatched = [case for case, _, ref in cases if ref is None]
    if unmatched:
        raise InputError(f"No reference for {len(unmatched)} prediction(s), e.g. '{unmatched[0]}'.",
                         f"Name each reference in {reference} like its prediction.")
    if not cases:
        raise InputError(f"{prediction} holds no labelmaps.", "Point to a folder of predicted labelmaps.")
    return cases


def evaluate_pair(prediction_path: Path, reference_path: Path, labels=None) -> list[dict]:
    """One row per label: dice and hd95 (mm)."""
    import numpy as np
    import SimpleITK as sitk

    from ..io import read_labelmap
    from ..metrics import dice_per_label, hd95_per_label
    from ..preprocessing import validate_same_grid

    prediction, reference = read_labelmap(prediction_path), read_labelmap(reference_path)
    validate_same_grid(reference, prediction, what=f"prediction {prediction_path.name}")
    pred, ref = sitk.GetArrayViewFromImage(prediction), sitk.GetArrayViewFromImage(reference)
    if labels is None:
        labels = sorted(int(v) for v in set(np.unique(pred)) | set(np.unique(ref)) if v != 0)
    dice = dice_per_label(pred, ref, labels)
    hd95 = hd95_per_label(pred, ref, labels, reference.GetSpacing())
    return [{"label": label, "dice": dice[label], "hd95_mm": hd95[label],
             "reference_voxels": int((ref == label).sum()), "predicted_voxels": int((pred == label).sum())}
            for label in labels]


def label_names_near(reference: Path) -> dict[int, str]:
    """Label names from a dataset.json in the reference folder or its parent (Decathlon layout), if any.

    Names only decorate the printout, so a file that is not the expected shape is ignored, not an error.
    """
    import json

    folder = reference if reference.is_dir() else reference.parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        try:
            if not candidate.is_file() or candidate.stat().st_size > 2 ** 20:
                continue
            labels = json.loads(candidate.read_text(encoding="utf-8")).get("labels")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if not isinstance(labels, dict):
            continue
        names = {}
        for key, value in labels.items():
            if isinstance(key, str) and key.isdigit() and isinstance(value, str):  # Decathlon {"1": "liver"}
                names[int(key)] = value[:64]
            elif isinstance(value, int) and not isinstance(value, bool) and isinstance(key, str):  # nnU-Net v2
                names[value] = key[:64]
        return names
    return {}


def plot_path(csv_path: Path) -> Path:
    name = csv_path.name[:-4] if csv_path.name.lower().endswith(".csv") else csv_path.name
    return csv_path.with_name(f"{name}_dice.png")


def _format(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else f"{value:.6f}")
    return str(value)


def run(args: argparse.Namespace) -> int:
    from ..io import write_text

    output = Path(args.output)
    from ..publish import check_writable_folder, exists_or_link, refuse_outputs_over_inputs

    # issue 16: never over an input (even with --overwrite), folder checked before the work
    refuse_outputs_over_inputs([output], [Path(args.prediction), Path(args.reference)])
    check_writable_folder(output.parent)
    if output.is_dir():
        raise InputError(f"--output {output} is a folder.", "Give a CSV file name such as metrics.csv.")
    if exists_or_link(output) and not args.overwrite:
        raise InputError(f"{output} already exists; it was not overwritten.", "Choose another --output or pass "
                         "--overwrite.")
    plot = plot_path(output) if args.plot else None
    if plot is not None and plot.exists() and not args.overwrite:
        raise InputError(f"{plot} already exists; it was not overwritten.", "Choose another --output, pass "
                         "--overwrite, or --no-plot.")
    names = label_names_near(Path(args.reference))
    rows = []
    for case, prediction, reference in match_cases(Path(args.prediction), Path(args.reference)):
        for row in evaluate_pair(prediction, reference, args.labels):
            rows.append({"case": case, **row})
    buffer = text_io.StringIO()
    fields = ["case", "label", "dice", "hd95_mm", "reference_voxels", "predicted_voxels"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(row[key]) for key in fields})
    write_text(buffer.getvalue(), output, overwrite=args.overwrite)
    per_label, means = {}, []
    for label in sorted({row["label"] for row in rows}):
        scores = [row["dice"] for row in rows if row["label"] == label]
        distances = [row["hd95_mm"] for row in rows if row["label"] == label]
        finite = [d for d in distances if math.isfinite(d)]
        hd = f"{sum(finite) / len(finite):.2f} mm" if finite else "n/a"
        name = names.get(label, "")
        title = f"label {label}" + (f" ({name})" if name else "")
        per_label[f"{label} {name}".strip()] = scores
        means.append(sum(scores) / len(scores))
        print(f"{title}: mean Dice {means[-1]:.4f}, mean HD95 {hd} over {len(scores)} case(s)")
    if means:
        print(f"mean Dice over labels: {sum(means) / len(means):.4f}")
    print(f"wrote {output}")
    if plot is not None and per_label:
        from ..qc import dice_boxplot_png, write_png

        write_png(dice_boxplot_png(per_label), plot, overwrite=args.overwrite)
        print(f"wrote {plot}")
    return 0
