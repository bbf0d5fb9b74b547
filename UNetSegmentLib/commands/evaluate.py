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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CSV")


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


def _format(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else f"{value:.6f}")
    return str(value)


def run(args: argparse.Namespace) -> int:
    from ..io import write_text

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise InputError(f"{output} already exists; it was not overwritten.", "Choose another --output or pass "
                         "--overwrite.")
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
    for label in sorted({row["label"] for row in rows}):
        scores = [row["dice"] for row in rows if row["label"] == label]
        distances = [row["hd95_mm"] for row in rows if row["label"] == label]
        finite = [d for d in distances if math.isfinite(d)]
        hd = f"{sum(finite) / len(finite):.2f} mm" if finite else "n/a"
        print(f"label {label}: mean Dice {sum(scores) / len(scores):.4f}, mean HD95 {hd} over {len(scores)} case(s)")
    print(f"wrote {output}")
    return 0
