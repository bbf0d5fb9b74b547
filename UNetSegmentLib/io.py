"""Reading and writing volumes (NRRD incl. Slicer .seg.nrrd, NIfTI, MHA, DICOM series) and datasets.

Every read failure becomes an ImageReadError that names the file and the likely fix, so front ends
never show an ITK stack trace. Headers are checked against the memory budget before any voxel is
decompressed; DICOM series are checked for missing, duplicated and unevenly spaced slices. Writes
go through `publish.temporary_output`: a temp file beside the target, published without replacing
anything unless asked, so a crash, a full disk or Ctrl+C never leaves half a file or loses one.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from . import memory
from .errors import ImageReadError, InputError, OutputError, SchemaError, UNetSegmentWarning, from_os_error
from .publish import temporary_output

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


IRREGULAR_SERIES_FLAG = "--accept-irregular-series"
SLICE_SPACING_TOLERANCE = 0.1  # relative deviation from the median slice distance that counts as uneven


def _slice_positions(files) -> list[float] | None:
    """Distance of each slice along the series normal (None when positions/orientation are absent)."""
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            if normal is None:
                cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(cosines[:3], cosines[3:6])
        except (RuntimeError, ValueError, IndexError):
            return None
        if len(position) != 3:
            return None
        positions.append(float(np.dot(normal, position)))
    return positions


def check_slice_spacing(positions, where: str) -> str | None:
    """A sentence describing missing, duplicated or unevenly spaced slices, or None for a regular series."""
    if positions is None or len(positions) < 3:
        return None
    ordered = np.sort(np.asarray(positions, dtype=float))
    gaps = np.diff(ordered)
    median = float(np.median(gaps))
    duplicates = np.flatnonzero(gaps < 1e-3 * max(median, 1e-3))
    if duplicates.size:
        index = int(duplicates[0])
        return (f"{where} has {duplicates.size} duplicated slice position(s) (e.g. two slices at "
                f"{ordered[index]:.2f} mm along the slice normal)")
    deviation = np.abs(gaps - median) / median
    worst = int(np.argmax(deviation))
    if deviation[worst] <= SLICE_SPACING_TOLERANCE:
        return None
    kind = "a slice is missing" if gaps[worst] > 1.5 * median else "slices are unevenly spaced"
    return (f"{where} has a gap of {gaps[worst]:.2f} mm between the slices at {ordered[worst]:.2f} and "
            f"{ordered[worst + 1]:.2f} mm, where the others are {median:.2f} mm apart ({kind})")


def _read_dicom_series(folder: Path, accept_irregular: bool = False) -> sitk.Image:
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
    problem = check_slice_spacing(_slice_positions(files), f"The DICOM series in {folder}")
    if problem and not accept_irregular:
        raise ImageReadError(f"{problem}; stacked as it is, its geometry would be wrong.",
                             f"Re-export the complete series, or pass {IRREGULAR_SERIES_FLAG} to segment it anyway.")
    if problem:
        warnings.warn(f"{problem}; segmenting it anyway ({IRREGULAR_SERIES_FLAG}).", UNetSegmentWarning, 2)
    if files:
        reader_info = sitk.ImageFileReader()
        reader_info.SetFileName(files[0])
        try:
            reader_info.ReadImageInformation()
            size = list(reader_info.GetSize()[:2]) + [len(files)]
            memory.check_image_header(size, reader_info.GetNumberOfComponents(),
                                      _bytes_per_component(reader_info.GetPixelID()), folder)
        except RuntimeError:
            pass  # the series reader below reports unreadable slices
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


def _bytes_per_component(pixel_id: int) -> int:
    name = sitk.GetPixelIDValueAsString(pixel_id).lower()
    for token, size in (("64-bit", 8), ("32-bit", 4), ("16-bit", 2), ("8-bit", 1), ("double", 8), ("float", 4)):
        if token in name:
            return size * (2 if "complex" in name else 1)
    return 8


def _check_header(reader: sitk.ImageFileReader, path: Path) -> None:
    """Before any voxel is decompressed: complex data, and the size the header claims vs the memory budget."""
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel.lower():
        raise InputError(f"{path} holds complex-valued voxels ({pixel}); UNetSegment segments real intensities.",
                         "Save the magnitude image (e.g. sitk.ComplexToModulus) and segment that.")
    memory.check_image_header(reader.GetSize(), reader.GetNumberOfComponents(),
                              _bytes_per_component(reader.GetPixelID()), path)


def _read_file(path: Path, accept_irregular: bool = False) -> sitk.Image:
    if not path.exists():
        raise ImageReadError(f"{path} does not exist.", "Check the path and file name.")
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise from_os_error(error, "read", path, ImageReadError) from None
    if stat.S_ISDIR(mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise ImageReadError(f"Cannot read the folder {path}: permission denied.", "Check its permissions.")
        return _read_dicom_series(path, accept_irregular)
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise ImageReadError(f"{path} is {kind}, not an image file.", "Save the image to a file and pass that file.")
    if not os.access(path, os.R_OK):
        raise ImageReadError(f"Cannot read {path}: permission denied.", "Check the file's permissions.")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes).", "Re-export or re-download the file.")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        _check_header(reader, path)
        if image_extension(path) in (".nii", ".nii.gz"):
            _check_nifti_complete(path)
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


def read_image(path, accept_irregular_series: bool = False) -> sitk.Image:
    """Read a volume; a Slicer .seg.nrrd is returned as its labelmap.

    A DICOM series with missing, duplicated or unevenly spaced slices is refused unless
    `accept_irregular_series` (then a UNetSegmentWarning names the gap).
    """
    path = Path(path)
    image = _read_file(path, accept_irregular_series)
    if "complex" in image.GetPixelIDTypeAsString().lower():
        raise InputError(f"{path} holds complex-valued voxels; UNetSegment segments real intensities.",
                         "Save the magnitude image (e.g. sitk.ComplexToModulus) and segment that.")
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
    largest = _max_value(image)  # checked before the cast: 65537 must not become 1
    if largest > 2 ** 32 - 1:
        raise InputError(f"{path} holds label value {largest:.0f}, above the largest supported (4294967295).",
                         "Renumber the labels (0 = background, 1, 2, ...).")
    pixel = sitk.sitkUInt8 if largest <= 255 else sitk.sitkUInt16 if largest <= 65535 else sitk.sitkUInt32
    return sitk.Cast(image, pixel) if image.GetPixelID() != pixel else image


def write_image(image: sitk.Image, path, overwrite: bool = False, compress: bool = True, cancel=None) -> Path:
    """Write through a temp file beside the target; never replace an existing file unless `overwrite`.

    `cancel` (a CancelToken) is checked at the publish: after cancel nothing is written.
    """
    path = Path(path)
    extension = image_extension(path)
    if extension not in IMAGE_EXTENSIONS or extension == SEGMENTATION_SUFFIX:
        raise InputError(f"Cannot write {path}: unsupported extension '{extension or path.suffix}'.",
                         "Use .nrrd, .nii.gz, .nii or .mha (or write_segmentation for .seg.nrrd).")
    return _write_atomic(image, path, overwrite, compress, cancel)


def _write_atomic(image: sitk.Image, path: Path, overwrite: bool, compress: bool, cancel=None) -> Path:
    extension = ".nrrd" if image_extension(path) == SEGMENTATION_SUFFIX else image_extension(path)
    with temporary_output(path, overwrite, suffix=extension, cancel=cancel) as temp:
        try:
            sitk.WriteImage(image, str(temp), compress)
        except RuntimeError as error:
            reason = _first_line(error)
            if "No space left" in reason or "Errno 28" in reason:
                reason = "the disk is full"
            raise OutputError(f"Cannot write {path} ({reason}).",
                              "Check that the folder is writable and the disk is not full.") from None
    return path


def write_segmentation(labelmap: sitk.Image, labels, path, overwrite: bool = False, cancel=None) -> Path:
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
    return _write_atomic(segmentation, path, overwrite, compress=True, cancel=cancel)


def write_text(text: str, path, overwrite: bool = False, cancel=None) -> Path:
    """Text (CSV, reports) with the same temp-file and no-silent-overwrite rules as images."""
    path = Path(path)
    with temporary_output(path, overwrite, cancel=cancel) as temp:
        with open(temp, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
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
    licence: Optional[str] = None  # dataset.json's "licence" (Decathlon) or "license" (nnU-Net v2)
    reference: Optional[str] = None


def read_dataset(folder) -> Dataset:
    """A Medical Segmentation Decathlon / nnU-Net (v1, v2) folder: imagesTr/, labelsTr/, dataset.json.

    dataset.json is validated field by field (UNetSegmentLib.schema) before any of it is used.
    """
    from .schema import validate_dataset

    folder = Path(folder)
    manifest = folder / "dataset.json"
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.",
                         "Point to a Decathlon/nnU-Net dataset folder (imagesTr/, labelsTr/, dataset.json).")
    if not manifest.is_file():
        raise InputError(f"{folder} has no dataset.json.",
                         "Point to a Decathlon/nnU-Net dataset folder (imagesTr/, labelsTr/, dataset.json).")
    if manifest.stat().st_size > 64 * 2 ** 20:
        raise InputError(f"{manifest} is {manifest.stat().st_size / 2 ** 20:.0f} MB; a dataset.json is a few KB.",
                         "Point to the right dataset.json.")
    try:
        text = manifest.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SchemaError(f"{manifest} is not UTF-8 text.", "Save dataset.json as UTF-8 JSON.", field="(file)") from None
    except OSError as error:
        raise from_os_error(error, "read", manifest, InputError) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise SchemaError(f"{manifest} is not valid JSON ({str(error)[:200]}).", "Fix or regenerate dataset.json.",
                          field="(file)") from None
    fields = validate_dataset(data, str(manifest))
    labels, channels, ending = fields["labels"], fields["channels"], fields["file_ending"]
    modality = channels[min(channels)]
    cases = []
    for image_entry, label_entry in fields["training"]:
        label_path = (folder / label_entry).resolve()
        case_id = strip_extension(label_path)
        image_path = folder / "imagesTr" / f"{case_id}_0000{image_extension(label_path) or ending}"
        if not image_path.is_file() and image_entry is not None:
            image_path = (folder / image_entry).resolve()  # Decathlon lists 4D images without _0000
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
    return Dataset(folder, fields["name"] or folder.name, cases, labels, modality, channels, fields["licence"],
                   fields["reference"])
