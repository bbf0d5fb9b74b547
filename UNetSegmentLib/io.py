"""Reading and writing volumes (NRRD incl. Slicer .seg.nrrd, NIfTI, MHA, DICOM series) and datasets.

Every read failure becomes an ImageReadError that names the file and the likely fix, so front ends
never show an ITK stack trace. Writes are atomic: a crash never leaves half a file behind.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageReadError, InputError

IMAGE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"


def image_extension(path) -> str:
    """The (possibly double) extension SimpleITK chooses its writer by: '.nii.gz', '.seg.nrrd', '.mha'."""
    name = Path(path).name.lower()
    for extension in IMAGE_EXTENSIONS:
        if name.endswith(extension):
            return extension
    return Path(path).suffix.lower()


def strip_extension(path) -> str:
    """File name without its image extension: 'case_01.nii.gz' -> 'case_01'."""
    name = Path(path).name
    extension = image_extension(path)
    return name[: -len(extension)] if extension and name.lower().endswith(extension) else name


def is_image_file(path) -> bool:
    return Path(path).is_file() and image_extension(path) in IMAGE_EXTENSIONS


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    if not series:
        raise ImageReadError(f"{folder} is a folder without a DICOM series.",
                             "Point to an image file, or to a folder holding the slices of one DICOM series.")
    if len(series) > 1:
        raise ImageReadError(f"{folder} holds {len(series)} DICOM series ({', '.join(series[:3])}...); which one "
                             "to segment is ambiguous.", "Put each series in its own folder.")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ImageReadError(f"The DICOM series in {folder} cannot be read ({_first_line(error)}).",
                             "Check that every slice is complete and belongs to the same series.") from None
    if image.GetDimension() == 3 and image.GetSize()[2] != len(files):
        raise ImageReadError(f"The DICOM series in {folder} has {len(files)} files but "
                             f"{image.GetSize()[2]} slices.", "Check the series for missing or extra slices.")
    return image


def _first_line(error: Exception) -> str:
    """The informative part of an ITK exception (drops source paths and object addresses)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")] or lines
    text = " ".join(lines)
    text = re.sub(r"(sitk::|ITK )ERROR: (\w+\(0x[0-9a-fA-F]+\): )?", "", text)
    if "[nrrd]" in text:  # teem chains every caller; only its last link says what is wrong
        text = text.rsplit("[nrrd]", 1)[-1].split(": ", 1)[-1].strip() or text
    return (text or type(error).__name__)[:300]


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a complete NIfTI-1/2 file holds according to its header (None if not NIfTI)."""
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        count = int(np.prod([max(1, d) for d in dims[1:1 + max(0, min(dims[0], 7))]]))
        return max(offset, size) + count * max(1, bitpix) // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """ITK's NIfTI reader silently zero-fills truncated files; refuse them instead."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(540)
            expected = _nifti_expected_bytes(header)
            if expected is None:
                return  # not a NIfTI header; let ITK report what it is
            total = len(header)
            while True:
                chunk = stream.read(1 << 22)
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise ImageReadError(f"{path} is truncated or corrupt ({error}).", "Re-export or re-download the file.") \
            from None
    if total < expected:
        raise ImageReadError(f"{path} is truncated: {total} of {expected} bytes.", "Re-export or re-download the file.")


def _read_file(path: Path) -> sitk.Image:
    if not path.exists():
        raise ImageReadError(f"{path} does not exist.", "Check the path and file name.")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes).", "Re-export or re-download the file.")
    if image_extension(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader.Execute()
    except RuntimeError as error:
        hint = ("The file may be truncated or corrupt; re-export it." if image_extension(path) in IMAGE_EXTENSIONS
                else "Use NRRD (.nrrd, .seg.nrrd), NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) or a DICOM folder.")
        reason = _first_line(error)
        if "No such file or directory" in reason:  # ITK reports a stale errno for incomplete data
            reason = "its image data is incomplete or unreadable"
        if "spacing" in reason.lower():  # ITK refuses zero spacing while reading: the header is wrong
            hint = "Fix the spacing in the file header (every value must be positive), then load it again."
        raise ImageReadError(f"{path} cannot be read as an image ({reason}).", hint) from None


def _segment_layers(image: sitk.Image) -> list[tuple[int, int]]:
    """(layer, label value) of each segment in a Slicer .seg.nrrd, in segment order."""
    segments = []
    index = 0
    while image.HasMetaDataKey(f"Segment{index}_ID"):
        layer_key, value_key = f"Segment{index}_Layer", f"Segment{index}_LabelValue"
        layer = int(image.GetMetaData(layer_key)) if image.HasMetaDataKey(layer_key) else 0
        value = int(image.GetMetaData(value_key)) if image.HasMetaDataKey(value_key) else index + 1
        segments.append((layer, value))
        index += 1
    return segments


def segmentation_to_labelmap(image: sitk.Image) -> sitk.Image:
    """Slicer .seg.nrrd -> one integer labelmap.

    A single-layer file keeps its label values. A multi-layer file (overlapping segments, stored as
    one vector component per layer) gets values 1..N in segment order; later segments win overlaps.
    """
    segments = _segment_layers(image)
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 3:
        array = array[..., None]
    if array.shape[-1] == 1 and all(layer == 0 for layer, _ in segments):
        output = array[..., 0]
        output = output.astype(np.uint8 if output.size == 0 or output.max() <= 255 else np.uint16)
    else:
        output = np.zeros(array.shape[:-1], dtype=np.uint8 if len(segments) <= 255 else np.uint16)
        for number, (layer, value) in enumerate(segments, start=1):
            if layer >= array.shape[-1]:
                raise ImageReadError(f"Segment {number} is on layer {layer}, but the file has "
                                     f"{array.shape[-1]} layers.", "Re-save the segmentation from Slicer.")
            output[array[..., layer] == value] = number
    labelmap = sitk.GetImageFromArray(output)
    labelmap.SetSpacing(image.GetSpacing())
    labelmap.SetOrigin(image.GetOrigin())
    labelmap.SetDirection(image.GetDirection())
    return labelmap


def _max_value(image: sitk.Image) -> float:
    array = sitk.GetArrayViewFromImage(image)
    return float(array.max()) if array.size else 0.0


def _is_segmentation(path: Path, image: sitk.Image) -> bool:
    return path.name.lower().endswith(SEGMENTATION_SUFFIX) or image.HasMetaDataKey("Segment0_ID")


def read_image(path) -> sitk.Image:
    """Read a volume; a Slicer .seg.nrrd is returned as its labelmap."""
    path = Path(path)
    image = _read_file(path)
    if _is_segmentation(path, image):
        return segmentation_to_labelmap(image)
    if image.GetDimension() == 2:  # a single slice: a volume one voxel deep, so geometry stays 3D
        image = sitk.JoinSeries(image)
    if image.GetDimension() == 4:
        if image.GetSize()[3] != 1:
            raise InputError(f"{path} holds {image.GetSize()[3]} volumes (4D); UNetSegment segments one 3D volume.",
                             "Split the series and pass one volume (e.g. one channel or time point).")
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return image


def read_labelmap(path) -> sitk.Image:
    """Read a labelmap with integer voxel values (uint8 where the labels fit)."""
    path = Path(path)
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a labelmap "
                         "has one.", "Export the segmentation as a labelmap (or .seg.nrrd) from Slicer.")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{path} holds non-integer values; it is not a labelmap.",
                             "Pass a labelmap whose voxels are label numbers (0 = background).")
    if array.size and array.min() < 0:
        raise InputError(f"{path} holds negative label values.", "Label values must be 0 (background) or above.")
    pixel = sitk.sitkUInt8 if _max_value(image) <= 255 else sitk.sitkUInt16
    return sitk.Cast(image, pixel) if image.GetPixelID() != pixel else image


def write_image(image: sitk.Image, path, overwrite: bool = False, compress: bool = True) -> Path:
    """Write atomically (temp file beside the target, then os.replace); never overwrite silently."""
    path = Path(path)
    extension = image_extension(path)
    if extension not in IMAGE_EXTENSIONS or extension == SEGMENTATION_SUFFIX:
        raise InputError(f"Cannot write {path}: unsupported extension '{extension or path.suffix}'.",
                         "Use .nrrd, .nii.gz, .nii or .mha (or write_segmentation for .seg.nrrd).")
    return _write_atomic(image, path, overwrite, compress)


def _write_atomic(image: sitk.Image, path: Path, overwrite: bool, compress: bool) -> Path:
    if path.is_dir():
        raise InputError(f"{path} is a folder.", "Give a file name such as segmentation.nrrd.")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; it was not overwritten.",
                         "Choose another output path or pass --overwrite (overwrite=True).")
    path.parent.mkdir(parents=True, exist_ok=True)
    extension = ".nrrd" if image_extension(path) == SEGMENTATION_SUFFIX else image_extension(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{strip_extension(path)}.tmp", suffix=extension, dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, temp_name, compress)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except RuntimeError as error:
        raise InputError(f"Cannot write {path} ({_first_line(error)}).",
                         "Check that the folder is writable and the disk is not full.") from None
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def write_segmentation(labelmap: sitk.Image, labels, path, overwrite: bool = False) -> Path:
    """Write a labelmap as a Slicer .seg.nrrd so segment names and colours survive (labels: LabelInfo list)."""
    path = Path(path)
    if not path.name.lower().endswith(SEGMENTATION_SUFFIX):
        raise InputError(f"{path} does not end in {SEGMENTATION_SUFFIX}.", "Use write_image for other formats.")
    array = sitk.GetArrayViewFromImage(labelmap)
    segmentation = sitk.Image(labelmap)
    segmentation.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    segmentation.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    segmentation.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    index = 0
    for label in labels:
        if label.value == 0:
            continue
        present = np.argwhere(array == label.value)
        if present.size:  # extent in (x, y, z) index order: x0 x1 y0 y1 z0 z1
            low, high = present.min(axis=0)[::-1], present.max(axis=0)[::-1]
            extent = " ".join(f"{a} {b}" for a, b in zip(low, high))
        else:
            extent = "0 -1 0 -1 0 -1"
        prefix = f"Segment{index}_"
        for key, value in (("ID", f"Segment_{label.value}"), ("Name", label.name),
                           ("Color", " ".join(f"{c:.6g}" for c in label.color)), ("LabelValue", str(label.value)),
                           ("Layer", "0"), ("Extent", extent), ("Tags", "")):
            segmentation.SetMetaData(prefix + key, value)
        index += 1
    return _write_atomic(segmentation, path, overwrite, compress=True)


def write_text(text: str, path, overwrite: bool = False) -> Path:
    """Atomic text write (CSV, reports) with the same no-silent-overwrite rule as images."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; it was not overwritten.",
                         "Choose another output path or pass --overwrite.")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def find_images(folder) -> list[Path]:
    """Image files and DICOM series sub-folders directly inside `folder`, sorted by name."""
    folder = Path(folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if is_image_file(entry):
            found.append(entry)
        elif entry.is_dir() and any(child.suffix.lower() in (".dcm", "") for child in entry.iterdir()
                                    if child.is_file()):
            found.append(entry)
    return found


@dataclass
class DatasetCase:
    case_id: str
    image_path: Path
    label_path: Path


@dataclass
class Dataset:
    folder: Path
    name: str
    cases: list[DatasetCase]
    labels: dict[int, str]  # value -> name, background 0 included
    modality: str  # "CT", "MR", ... (the first channel's)
    channels: dict[int, str] = field(default_factory=dict)


def _parse_labels(raw, manifest: Path) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{manifest} has no 'labels' dictionary.",
                         'Add e.g. "labels": {"0": "background", "1": "liver"}.')
    try:
        if all(str(key).lstrip("-").isdigit() for key in raw):  # Decathlon / nnU-Net v1
            labels = {int(key): str(name) for key, name in raw.items()}
        else:  # nnU-Net v2: {"background": 0, "liver": 1}
            labels = {int(value): str(name) for name, value in raw.items()}
    except (TypeError, ValueError):
        raise InputError(f"{manifest} labels {raw} are not name/number pairs.",
                         'Use {"0": "background", "1": "liver"} or {"background": 0, "liver": 1}.') from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise InputError(f"{manifest} labels {labels} are not 0..N-1 with a foreground label.",
                         "Number the labels 0 (background), 1, 2, ... in dataset.json.")
    return labels


def read_dataset(folder) -> Dataset:
    """A Medical Segmentation Decathlon / nnU-Net (v1, v2) folder: imagesTr/, labelsTr/, dataset.json."""
    folder = Path(folder)
    manifest = folder / "dataset.json"
    if not manifest.is_file():
        raise InputError(f"{folder} has no dataset.json.",
                         "Point to a Decathlon/nnU-Net dataset folder (imagesTr/, labelsTr/, dataset.json).")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{manifest} cannot be read ({error}).", "Fix or regenerate dataset.json.") from None
    labels = _parse_labels(data.get("labels"), manifest)
    raw_channels = data.get("channel_names") or data.get("modality") or {"0": "MR"}
    channels = {int(key): str(value) for key, value in raw_channels.items()}
    modality = channels[min(channels)]
    ending = data.get("file_ending", ".nii.gz")
    cases = []
    for entry in data.get("training") or []:
        label_path = (folder / entry["label"]).resolve()
        case_id = strip_extension(label_path)
        image_path = folder / "imagesTr" / f"{case_id}_0000{image_extension(label_path) or ending}"
        if not image_path.is_file() and "image" in entry:
            image_path = (folder / entry["image"]).resolve()  # Decathlon lists 4D images without _0000
        cases.append(DatasetCase(case_id, Path(image_path), label_path))
    if not cases:  # nnU-Net v2 need not list its cases
        labels_dir = folder / "labelsTr"
        for label_path in sorted(labels_dir.iterdir()) if labels_dir.is_dir() else []:
            if label_path.name.endswith(ending) and not label_path.name.startswith("."):
                case_id = label_path.name[: -len(ending)]
                cases.append(DatasetCase(case_id, folder / "imagesTr" / f"{case_id}_0000{ending}", label_path))
    if not cases:
        raise InputError(f"{folder} lists no training cases.", "Add image/label pairs to imagesTr/ and labelsTr/.")
    missing = [str(path) for case in cases for path in (case.image_path, case.label_path) if not path.is_file()]
    if missing:
        raise InputError(f"{len(missing)} dataset files are missing, e.g. {missing[0]}.",
                         "Check imagesTr/ and labelsTr/ against dataset.json.")
    return Dataset(folder, str(data.get("name", folder.name)), cases, labels, modality, channels)
