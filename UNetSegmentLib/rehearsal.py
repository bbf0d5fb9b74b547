"""Rehearsal sets: a few of a model's own training cases, kept next to its checkpoint for fine-tuning.

A model tuned on a handful of user cases drifts away from what its large training set taught it
(catastrophic forgetting): on cases like its training data it gets worse (docs/finetune.md). Mixing
some of the parent's own training cases into every fine-tuning batch ("rehearsal" or experience
replay, as in continual learning) anchors the network where the parent was right while the user's
cases teach what it got wrong. Users in the field do not have the parent's data, so the model ships
a small sample of it: `<checkpoint stem>.rehearsal.npz` beside the checkpoint (fold_0.pt ->
fold_0.rehearsal.npz).

The file is input like any other: numpy arrays only (no pickles), a JSON card checked field by
field, every array's header read and the total size bounded before anything is loaded, label values
and grid checked against the model's card.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError, SchemaError
from .schema import Checker

FORMAT = "unetsegment-rehearsal/1"
SUFFIX = ".rehearsal.npz"
MAX_CASES = 512
MAX_FILE_BYTES = 512 * 2 ** 20
MAX_TOTAL_VOXELS = 128 * 2 ** 20  # float32 in memory: 512 MiB
IMAGE_DTYPES = (np.dtype("float16"), np.dtype("float32"))
_FIX = "Regenerate the rehearsal set from the model's training data, or delete the file to tune without it."


@dataclass
class RehearsalSet:
    path: Path
    sha256: str
    images: list  # normalised as the model normalises, float32, (*spatial)
    labels: list  # uint8, same shapes
    card: dict  # format, case_ids, spacing, label_values, dataset, licence, reference, normalization

    @property
    def case_ids(self) -> list:
        return list(self.card["case_ids"])

    def record(self) -> dict:
        """What a fine-tuned model's card keeps about the rehearsal it used."""
        return {"file": str(self.path.resolve()), "sha256": self.sha256, "cases": len(self.images),
                "case_ids": self.case_ids, "dataset": self.card.get("dataset")}


def path_for(checkpoint) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIX)


def find_for(checkpoint) -> Optional[Path]:
    """The rehearsal file beside `checkpoint`, or None (a model without one tunes without rehearsal)."""
    path = path_for(checkpoint)
    return path if path.is_file() else None


def _array_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    with archive.open(name) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _validate_card(data: Any, source: str, count: int) -> dict:
    check = Checker(source, fix=_FIX)
    data = check.mapping("card", data)
    check.string("format", data.get("format"), choices=(FORMAT,))
    case_ids = check.sequence("case_ids", data.get("case_ids"), length=count)
    for index, case_id in enumerate(case_ids):
        check.string(f"case_ids[{index}]", case_id, non_empty=True)
    spacing = [check.number(f"spacing[{i}]", value, positive=True)
               for i, value in enumerate(check.sequence("spacing", data.get("spacing"), minimum=2, maximum=3))]
    values = [check.integer(f"label_values[{i}]", value, 1, 255)
              for i, value in enumerate(check.sequence("label_values", data.get("label_values"), minimum=1,
                                                      maximum=255))]
    card = dict(data, case_ids=list(case_ids), spacing=spacing, label_values=values)
    if data.get("seed") is not None:
        card["seed"] = check.integer("seed", data["seed"], 0)
    for key in ("dataset", "licence", "reference", "normalization", "source_checkpoint_sha256"):
        if key in data and data[key] is not None:
            card[key] = check.string(key, data[key], multiline=True)
    return card


def read(path, metadata, max_voxels: int = MAX_TOTAL_VOXELS) -> RehearsalSet:
    """Read and check a rehearsal set against the model card `metadata` it is meant for."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError(f"{source}: {size / 2 ** 20:.0f} MiB is more than a rehearsal set may hold "
                             f"({MAX_FILE_BYTES // 2 ** 20} MiB).", _FIX)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "card.npy" not in names:
                raise SchemaError(f"{source}: no 'card' entry: not a UNetSegment rehearsal set.", _FIX, field="card")
            count = (len(names) - 1) // 2
            if count < 1 or count > MAX_CASES or names != {"card.npy"} | {
                    f"{kind}_{i}.npy" for i in range(count) for kind in ("image", "label")}:
                raise SchemaError(f"{source}: the entries must be 'card' and image_i/label_i pairs for i = 0..N-1 "
                                  f"(N <= {MAX_CASES}).", _FIX, field="entries")
            card_shape, card_dtype = _array_header(archive, "card.npy")
            if card_dtype.kind != "U" or card_shape != () or card_dtype.itemsize > 4 * 2 ** 20:
                raise SchemaError(f"{source}: 'card' must be one JSON text.", _FIX, field="card")
            spatial_dims = int(metadata.spatial_dims)
            total = 0
            for i in range(count):
                image_shape, image_dtype = _array_header(archive, f"image_{i}.npy")
                label_shape, label_dtype = _array_header(archive, f"label_{i}.npy")
                if image_dtype not in IMAGE_DTYPES or label_dtype != np.dtype("uint8"):
                    raise SchemaError(f"{source}: case {i} must be a float16/float32 image and a uint8 label, "
                                      f"got {image_dtype} and {label_dtype}.", _FIX, field=f"image_{i}")
                if len(image_shape) != spatial_dims or image_shape != label_shape or min(image_shape) < 1:
                    raise SchemaError(f"{source}: case {i} must be a {spatial_dims}D image and a label of the same "
                                      f"shape, got {image_shape} and {label_shape}.", _FIX, field=f"image_{i}")
                total += math.prod(image_shape)
            if total > max_voxels:
                raise InputError(f"{source}: {total} voxels in all, more than a rehearsal set may hold "
                                 f"({max_voxels}).", _FIX)
            with np.load(path, allow_pickle=False) as arrays:
                card = _validate_card(_json(arrays["card"], source), source, count)
                images = [np.asarray(arrays[f"image_{i}"], dtype=np.float32) for i in range(count)]
                labels = [np.asarray(arrays[f"label_{i}"]) for i in range(count)]
    except OSError as error:
        raise InputError(f"{source}: cannot be read ({error.strerror or error}).", _FIX) from None
    except (zipfile.BadZipFile, ValueError, EOFError) as error:
        if isinstance(error, InputError):
            raise
        raise SchemaError(f"{source}: not a readable rehearsal set ({error}).", _FIX, field="file") from None
    model_values = sorted(label.value for label in metadata.labels if label.value != 0)
    if sorted(card["label_values"]) != model_values:
        raise SchemaError(f"{source}: made for label values {card['label_values']}, the model has {model_values}.",
                          _FIX, field="label_values")
    if len(card["spacing"]) != len(metadata.target_spacing) or any(
            abs(a - float(b)) > 1e-3 * float(b) for a, b in zip(card["spacing"], metadata.target_spacing)):
        raise SchemaError(f"{source}: made at spacing {card['spacing']}, the model works at "
                          f"{list(metadata.target_spacing)}.", _FIX, field="spacing")
    allowed = set(model_values) | {0}
    for i, (image, label) in enumerate(zip(images, labels)):
        if not np.isfinite(image).all():
            raise SchemaError(f"{source}: image {i} ({card['case_ids'][i]}) holds NaN or infinite values.", _FIX,
                              field=f"image_{i}")
        stray = sorted(set(np.unique(label).tolist()) - allowed)
        if stray:
            raise SchemaError(f"{source}: label {i} ({card['case_ids'][i]}) holds values {stray} the model does not "
                              "have.", _FIX, field=f"label_{i}")
    return RehearsalSet(path, digest, images, labels, card)


def _json(array: np.ndarray, source: str) -> Any:
    try:
        return json.loads(str(array))
    except ValueError:
        raise SchemaError(f"{source}: 'card' is not valid JSON.", _FIX, field="card") from None


def write(path, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], card: dict,
          overwrite: bool = False) -> Path:
    """Publish a rehearsal set (no-overwrite unless asked; a failed write leaves nothing behind)."""
    from .publish import temporary_output

    if not images or len(images) != len(labels):
        raise InputError("A rehearsal set needs at least one image with its label.", "Choose at least one case.")
    arrays = {"card": np.array(json.dumps(dict(card, format=FORMAT), sort_keys=True))}
    for i, (image, label) in enumerate(zip(images, labels)):
        image = np.asarray(image)
        if image.shape != np.asarray(label).shape:
            raise InputError(f"Rehearsal case {i}: image {image.shape} and label {np.asarray(label).shape} differ.",
                             "Resample the label onto the image grid.")
        # normalised intensities: float16 keeps ~3 significant digits, plenty for z-scores, at half the size
        arrays[f"image_{i}"] = image.astype(np.float16)
        arrays[f"label_{i}"] = np.asarray(label).astype(np.uint8)
    with temporary_output(path, overwrite=overwrite, suffix=".npz") as temp:
        with open(temp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return Path(path)


def from_training_cases(checkpoint, dataset_dir, count: int, seed: int = 0, output=None,
                        overwrite: bool = False) -> Path:
    """Write a rehearsal set for `checkpoint` from `count` of its own training cases (never its validation
    cases), preprocessed exactly as training preprocessed them (canonical orientation, target spacing,
    the card's normalisation)."""
    from . import preprocessing
    from .checkpoint import read_checkpoint_metadata
    from .io import read_dataset
    from .training import TrainingConfig, load_training_cases, training_cases_of

    metadata = read_checkpoint_metadata(checkpoint)
    training_ids = list(metadata.training.get("training_case_ids") or [])
    if not training_ids:
        raise InputError(f"{checkpoint}: its card does not list the cases it was trained on.",
                         "Use a model trained with this version of UNetSegment.")
    if count < 1:
        raise InputError(f"A rehearsal set needs at least one case, got {count}.", "Pass e.g. 16.")
    chosen = sorted(np.random.default_rng(seed).choice(training_ids, min(count, len(training_ids)),
                                                       replace=False).tolist())
    info = read_dataset(dataset_dir)
    every = [case.case_id for case in info.cases]
    missing = sorted(set(chosen) - set(every))
    if missing:
        raise InputError(f"{dataset_dir} lacks training cases of the model: {', '.join(missing[:5])}.",
                         "Point to the dataset the model was trained on.")
    config = TrainingConfig(dataset_dir=str(dataset_dir), output=str(checkpoint),
                            target_spacing=list(metadata.target_spacing),
                            exclude_cases=tuple(case for case in every if case not in chosen))
    cases, spacing = load_training_cases(config, info)
    images = [preprocessing.normalize(case.image, metadata.normalization) for case in cases]
    card = {"case_ids": [case.case_id for case in training_cases_of(info, config)],
            "spacing": [float(s) for s in spacing],
            "label_values": sorted(label.value for label in metadata.labels if label.value != 0),
            "dataset": info.name, "licence": info.licence,
            "reference": info.reference, "normalization": metadata.normalization.scheme,
            "seed": int(seed), "source_checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()}
    return write(output or path_for(checkpoint), images, [case.label for case in cases], card, overwrite)

