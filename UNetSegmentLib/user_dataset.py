"""The user's own training set: corrected segmentations saved as cases for fine-tuning (issue 17).

Layout is the Medical Segmentation Decathlon's, so `train`, `finetune` and nnU-Net read it as is:
`imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz` and `dataset.json`. dataset.json also
records, under "unetsegment", the label set of the model the cases were made for: a case for a
model with another label set is refused, because label value 2 would mean two different things.

Adding is all-or-nothing: every check runs before anything is written; the case files get fresh
names (an existing file is never overwritten) and are published before dataset.json, which is
replaced atomically; a failure removes what this call wrote. A volume already in the set (same
voxels and geometry) is refused unless `replace=True`; its old files go only after the new
dataset.json is in place. Importable without torch (the Slicer panel calls it in the GUI process).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from .errors import GeometryError, InputError, OutputError, from_os_error
from .metadata import ModelMetadata

RECORD_KEY = "unetsegment"
RECORD_FORMAT = 1
FILE_ENDING = ".nii.gz"
LOCK_NAME = ".unetsegment.lock"


class DuplicateCaseError(InputError):
    """The volume is already a case of the set; adding it again needs an explicit replace (confirmation)."""

    def __init__(self, problem: str, fix: Optional[str] = None, case_id: str = ""):
        self.case_id = case_id
        super().__init__(problem, fix)


@dataclass
class AddedCase:
    case_id: str
    image_path: Path
    label_path: Path
    voxels_per_label: dict[str, int]  # model label name -> voxel count in the saved labelmap
    replaced: Optional[str] = None  # the case id this one replaced
    cases_in_set: int = 0


@dataclass
class UserDataset:
    folder: Path
    labels: dict[int, str]  # value -> name, background included
    modality: str
    model: str
    cases: dict[str, dict] = field(default_factory=dict)  # case id -> record (source hash, added, segments)


def default_training_set_dir(model_name: str) -> Path:
    """<user data>/UNetSegment/training-cases/<model>: beside the user models, one set per model."""
    from .model_store import user_models_dir

    return user_models_dir().parent / "training-cases" / _slug(model_name)


def normalize_name(name: str) -> str:
    """'Anterior_Hippocampus ' -> 'anterior hippocampus': segment names match model labels this way."""
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).casefold().split())


def model_labels(metadata: ModelMetadata) -> dict[int, str]:
    return {int(label.value): str(label.name) for label in metadata.labels}


def _same_label_set(a: Mapping[int, str], b: Mapping[int, str]) -> bool:
    """Same values with the same names (background's name does not matter)."""
    if set(a) != set(b):
        return False
    return all(normalize_name(a[value]) == normalize_name(b[value]) for value in a if value != 0)


def _describe(labels: Mapping[int, str]) -> str:
    return ", ".join(f"{value} {labels[value]}" for value in sorted(labels) if value != 0)


def source_hash(image) -> str:
    """Identity of a source volume: its voxels and geometry (the same scan added twice has the same hash)."""
    import SimpleITK as sitk

    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    digest = hashlib.sha256()
    digest.update(str(array.dtype).encode())
    digest.update(repr(tuple(image.GetSize())).encode())
    for values in (image.GetSpacing(), image.GetOrigin(), image.GetDirection()):
        digest.update(repr(tuple(round(float(v), 4) for v in values)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def read_user_dataset(folder) -> Optional[UserDataset]:
    """The set in `folder`, or None when the folder has no dataset.json yet."""
    from .io import read_dataset

    folder = Path(folder)
    manifest = folder / "dataset.json"
    if not manifest.is_file():
        return None
    from .schema import validate_dataset, validate_user_record

    dataset = read_dataset(folder) if (folder / "labelsTr").is_dir() else None  # validates the manifest
    data = _read_manifest(manifest)
    record = validate_user_record(data, str(manifest), RECORD_KEY)
    if dataset is not None:
        labels = dict(dataset.labels)
        modality = dataset.modality
    else:
        fields = validate_dataset(data, str(manifest))
        labels, modality = fields["labels"], fields["channels"][min(fields["channels"])]
    if record["label_set"] is not None:  # the model's own names (dataset.json may be edited)
        labels = record["label_set"]
    return UserDataset(folder, labels, record["modality"] or modality, record["model"] or "", record["cases"])


def _read_manifest(manifest: Path) -> dict:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as error:
        raise from_os_error(error, "read", manifest, InputError) from None
    except ValueError as error:
        raise InputError(f"{manifest} is not valid JSON ({str(error)[:200]}).",
                         "Fix it, or choose an empty folder for a new training set.") from None
    if not isinstance(data, dict):
        raise InputError(f"{manifest} does not hold a JSON object.", "Choose an empty folder for a new training set.")
    return data


def _map_segments(array: np.ndarray, segment_names: Optional[Mapping[int, str]],
                  labels: Mapping[int, str]) -> np.ndarray:
    """Labelmap values -> the model's label values, by segment name; unknown names refused, all named."""
    present = sorted(int(v) for v in np.unique(array) if int(v) != 0)
    if segment_names is None:  # the values already are the model's
        unknown = [value for value in present if value not in labels]
        if unknown:
            raise InputError(f"The labelmap holds values {unknown} that the model does not have (its labels: "
                             f"{_describe(labels)}).", "Renumber the labelmap to the model's label values.")
        return array.astype(np.uint8)
    by_name = {normalize_name(name): value for value, name in labels.items() if value != 0}
    unknown = sorted({str(segment_names[value]) for value in segment_names
                      if normalize_name(segment_names[value]) not in by_name})
    if unknown:
        raise InputError(f"Segment(s) {', '.join(repr(name) for name in unknown)} are not labels of the model "
                         f"(it knows: {', '.join(labels[v] for v in sorted(labels) if v != 0)}).",
                         "Rename the segment(s) to one of the model's label names in Segment Editor, or delete them.")
    unnamed = [value for value in present if value not in segment_names]
    if unnamed:
        raise InputError(f"Labelmap values {unnamed} have no segment name.", "Name every segment of the correction.")
    mapped = np.zeros(array.shape, dtype=np.uint8)
    for value, name in segment_names.items():
        mapped[array == value] = by_name[normalize_name(name)]
    return mapped


def _slug(name: Optional[str]) -> str:
    text = re.sub(r"[^A-Za-z0-9]+", "_", str(name or "")).strip("_")[:40]
    return text or "case"


def _next_case_id(name: Optional[str], dataset_cases: list[str], folder: Path) -> str:
    """The volume's name when free, else name_2, name_3, ...; unnamed volumes are case_001, case_002, ..."""
    slug = _slug(name)
    taken = set(dataset_cases)

    def free(case_id: str) -> bool:
        return case_id not in taken and not any(os.path.lexists(path) for path in _case_paths(folder, case_id))

    if name and free(slug):
        return slug
    number = 2 if name else 1
    while not free(f"{slug}_{number}" if name else f"{slug}_{number:03d}"):
        number += 1
    return f"{slug}_{number}" if name else f"{slug}_{number:03d}"


def _case_paths(folder: Path, case_id: str) -> tuple[Path, Path]:
    return folder / "imagesTr" / f"{case_id}_0000{FILE_ENDING}", folder / "labelsTr" / f"{case_id}{FILE_ENDING}"


@contextlib.contextmanager
def _locked(folder: Path):
    """One writer at a time (the panel and a script may add at once); no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic publish still keeps every file whole
        yield
        return
    try:
        handle = os.open(folder / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as error:
        raise from_os_error(error, "write", folder) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


def _check_writable(folder: Path) -> None:
    from .publish import check_writable_folder

    check_writable_folder(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"The training set folder {folder} is a file.", "Choose a folder.")


def add_case(dataset_dir, image, labelmap, model: Union[str, Path, ModelMetadata],
             segment_names: Optional[Mapping[int, str]] = None, case_name: Optional[str] = None,
             replace: bool = False, model_name: Optional[str] = None) -> AddedCase:
    """Save `image` and its corrected `labelmap` (SimpleITK images on one grid) as a case of the set.

    segment_names: labelmap value -> segment name, matched to the model's label names (case and
    '_'/'-' insensitive); None when the labelmap already holds the model's label values.
    model: the model's checkpoint path (file or fold folder) or its metadata.
    """
    import SimpleITK as sitk

    from .preprocessing import validate_same_grid

    folder = Path(dataset_dir).absolute()
    if isinstance(model, ModelMetadata):
        metadata, model_name = model, model_name or "model"
    else:
        from .model_store import read_model_metadata

        metadata = read_model_metadata(model)
        model_name = model_name or Path(model).stem
    labels = model_labels(metadata)
    # the checks, all before anything is written
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("The source volume has several components per voxel (e.g. RGB).",
                         "Use a single-component scalar volume.")
    if labelmap.GetSize() != image.GetSize():
        raise GeometryError(f"The segmentation has size {labelmap.GetSize()}, the volume {image.GetSize()}: "
                            "they do not belong together.",
                            "Pick the volume the segmentation was made on (or export the segmentation on its grid).")
    validate_same_grid(image, labelmap, what="segmentation")
    array = sitk.GetArrayFromImage(labelmap)
    mapped = _map_segments(array, segment_names, labels)
    counts = {labels[value]: int((mapped == value).sum()) for value in sorted(labels) if value != 0}
    if not any(counts.values()):
        raise InputError("The segmentation is empty: no voxel belongs to any of the model's labels.",
                         "Correct the segmentation in Segment Editor (paint the structures), then add it.")
    _check_writable(folder)
    identity = source_hash(image)
    label_image = sitk.GetImageFromArray(mapped)
    label_image.CopyInformation(image)

    created = [path for path in (folder, folder / "imagesTr", folder / "labelsTr") if not path.exists()]
    try:
        for path in created:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_empty(created)
        raise from_os_error(error, "write", folder) from None
    written: list[Path] = []
    lock_existed = os.path.lexists(folder / LOCK_NAME)
    try:
        with _locked(folder):
            existing = read_user_dataset(folder)
            data = _read_manifest(folder / "dataset.json") if existing is not None else None
            if existing is not None and not _same_label_set(existing.labels, labels):
                raise InputError(
                    f"The training set {folder} holds cases for other labels ({_describe(existing.labels)}"
                    f"{', model ' + existing.model if existing.model else ''}); this model has "
                    f"{_describe(labels)}. Cases of different label sets never mix.",
                    "Choose another training set folder for this model.")
            previous = None
            if existing is not None:
                previous = next((case for case, record in existing.cases.items()
                                 if isinstance(record, dict) and record.get("source_hash") == identity), None)
            if previous is not None and not replace:
                raise DuplicateCaseError(f"This volume is already case '{previous}' of the training set {folder}.",
                                         "Confirm to replace that case with this correction (replace=True).",
                                         case_id=previous)
            data = data or _new_manifest(metadata, model_name, labels)
            entries = [entry for entry in data.get("training") or [] if isinstance(entry, dict)]
            known_ids = [_entry_case_id(entry) for entry in entries]
            case_id = _next_case_id(case_name, known_ids, folder)
            image_path, label_path = _case_paths(folder, case_id)
            from .io import write_image

            write_image(image, image_path)
            written.append(image_path)
            write_image(label_image, label_path)
            written.append(label_path)
            if previous is not None:
                entries = [entry for entry in entries if _entry_case_id(entry) != previous]
            entries.append({"image": f"./imagesTr/{image_path.name}", "label": f"./labelsTr/{label_path.name}"})
            record = data.setdefault(RECORD_KEY, {})
            record.setdefault("format", RECORD_FORMAT)
            record.setdefault("label_set", {str(v): labels[v] for v in sorted(labels)})
            record.setdefault("modality", metadata.modality)
            record.setdefault("model", model_name)
            cases = record.setdefault("cases", {})
            if previous is not None:
                cases.pop(previous, None)
            cases[case_id] = {"source_hash": identity, "name": str(case_name or ""),
                              "added": datetime.datetime.now().isoformat(timespec="seconds"),
                              "model": model_name, "voxels_per_label": counts}
            if previous is not None:
                cases[case_id]["replaces"] = previous
            data["training"] = entries
            data["numTraining"] = len(entries)
            _write_manifest(folder / "dataset.json", data)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        _remove_empty([] if lock_existed else [folder / LOCK_NAME])
        _remove_empty(created)
        raise
    if previous is not None:  # the new manifest is in place: the replaced case's files can go
        for path in _case_paths(folder, previous):
            with contextlib.suppress(OSError):
                path.unlink()
    return AddedCase(case_id, image_path, label_path, counts, previous, len(entries))


def _entry_case_id(entry: dict) -> str:
    from .io import strip_extension

    return strip_extension(str(entry.get("label", "")))


def _new_manifest(metadata: ModelMetadata, model_name: str, labels: Mapping[int, str]) -> dict:
    return {
        "name": f"UNetSegment user cases ({model_name})",
        "description": f"Corrected segmentations saved from UNetSegment for fine-tuning '{model_name}'.",
        "tensorImageSize": "3D",
        "channel_names": {"0": metadata.modality},
        "labels": {str(value): ("background" if value == 0 else labels[value]) for value in sorted(labels)},
        "file_ending": FILE_ENDING,
        "numTraining": 0,
        "training": [],
    }


def _write_manifest(path: Path, data: dict) -> None:
    from .publish import temporary_output

    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    with temporary_output(path, overwrite=True) as temp:
        with open(temp, "w", encoding="utf-8") as stream:
            stream.write(text)


def _remove_empty(paths) -> None:
    """Remove what this call created (folders only if empty; the lock file)."""
    for path in reversed(list(paths)):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            elif path.name == LOCK_NAME:
                path.unlink()
