"""Bad and awkward inputs for UNetSegment, generated on demand (no binaries are committed).

Every case is a small file (or folder) plus what the user must get from it: either a clear
`UNetSegmentError` subclass whose message contains some words, or a normal result. The corpus is
made fresh into a temporary folder by `Testing/test_bad_inputs.py`; run this file to inspect it:

    python Testing/bad_inputs/make_corpus.py /tmp/corpus
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

LABELS = [(0, "background", (0.0, 0.0, 0.0)), (1, "liver", (0.9, 0.4, 0.3)), (2, "spleen", (0.2, 0.5, 0.9))]
PATCH_SIZE = (16, 16, 16)
SMALL_SHAPE = (10, 14, 12)  # (z, y, x): smaller than one patch along z, so padding is exercised too

# every case by name -> kind, known without writing files (tests parametrise over it at collection)
CASE_KINDS = {
    **{name: "image" for name in (
        "nan_voxels", "inf_voxels", "constant", "zero_size", "zero_size_nrrd", "empty_file", "image_2d", "volume_4d",
        "multi_component", "anisotropic", "single_slice", "negative_spacing", "zero_spacing", "non_orthogonal",
        "flipped_axes", "truncated_nrrd", "truncated_nifti_gz", "truncated_nifti", "not_an_image",
        "not_an_image_type", "dicom_mixed_series",
        # issue 16
        "dicom_missing_slice", "dicom_duplicated_slice", "dicom_uneven_spacing", "complex_voxels",
        "huge_header_gzip")},
    **{name: "checkpoint" for name in (
        "ckpt_missing_keys", "ckpt_other_architecture", "ckpt_wrong_label_count", "ckpt_executes_code",
        "ckpt_truncated", "ckpt_bare_state_dict", "ckpt_unknown_architecture", "ckpt_not_a_model",
        "ckpt_2d_model",
        # issue 16: schema violations, a non-tensor weight, a network too large to build
        "ckpt_spatial_dims_4", "ckpt_patch_size_scalar", "ckpt_spacing_strings", "ckpt_non_tensor_weight",
        "ckpt_metadata_list", "ckpt_labels_without_color", "ckpt_spacing_0_01mm")},
    **{name: "dataset" for name in ("train_label_grid_mismatch", "train_unexpected_label_values",
                                    # issue 16
                                    "train_label_257", "train_rgb_image", "train_dataset_json_list",
                                    "train_entry_without_label", "train_channel_names_list",
                                    "train_labels_region_based")},
}


@dataclass(frozen=True)
class Expect:
    """What the user must get: `error` (a class name from UNetSegmentLib.errors) or success (None)."""

    error: Optional[str]
    words: tuple[str, ...] = ()  # each must occur in the message (case-insensitive)
    sees: str = ""  # one line for docs/bad_inputs.md

    @property
    def succeeds(self) -> bool:
        return self.error is None


@dataclass
class CorpusCase:
    name: str
    kind: str  # "image" (segment input), "checkpoint" (--model), "dataset" (train input)
    description: str
    path: Path
    expect: Expect
    image: Optional[sitk.Image] = field(default=None, repr=False)  # in-memory volume, where one exists


# --- images -------------------------------------------------------------------------------------------


def phantom_array(shape=SMALL_SHAPE, seed: int = 0) -> np.ndarray:
    """Noisy background with a bright ellipsoid: something a tiny network produces labels for."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij")
    voxels = rng.normal(0.0, 10.0, shape)
    voxels[sum((grid / 0.6) ** 2 for grid in grids) < 1] += 200.0
    return voxels.astype(np.float32)


def phantom_image(shape=SMALL_SHAPE, spacing=(1.0, 1.0, 1.0), direction=None, seed: int = 0) -> sitk.Image:
    image = sitk.GetImageFromArray(phantom_array(shape, seed))
    image.SetSpacing([float(value) for value in spacing])
    image.SetOrigin((-3.5, 12.0, 40.25))
    if direction is not None:
        image.SetDirection([float(value) for value in np.asarray(direction, dtype=float).ravel()])
    return image


def _write(image: sitk.Image, path: Path, compress: bool = True) -> Path:
    sitk.WriteImage(image, str(path), compress)
    return path


def _write_raw(path: Path, header: str, data: bytes = b"") -> Path:
    path.write_bytes(header.encode("ascii") + data)
    return path


def _truncate(path: Path, keep_fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    return path


def _with_voxels(image: sitk.Image, change: Callable[[np.ndarray], None]) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    change(array)
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    return changed


def _dicom_slice(array2d: np.ndarray, series_uid: str, index: int, study_uid: str) -> sitk.Image:
    image = sitk.GetImageFromArray(array2d.astype(np.int16)[None])
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((0.0, 0.0, 2.0 * index))
    tags = {"0008|0060": "CT", "0010|0010": "Corpus^Phantom", "0010|0020": "CORPUS1", "0020|000d": study_uid,
            "0020|000e": series_uid, "0020|0013": str(index + 1), "0020|0011": series_uid.rsplit(".", 1)[-1],
            "0020|0032": f"0\\0\\{2.0 * index}", "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0016":
            "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{index + 1}"}
    for key, value in tags.items():
        image.SetMetaData(key, value)
    return image


def _mixed_dicom_folder(folder: Path) -> Path:
    """Two CT series (3 slices each) in one folder: which to segment is ambiguous."""
    folder.mkdir()
    study = "1.2.826.0.1.3680043.8.498.1"
    voxels = phantom_array((3, 12, 12))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for series_number in (1, 2):
        series = f"{study}.{series_number}"
        for index in range(3):
            writer.SetFileName(str(folder / f"s{series_number}_{index}.dcm"))
            writer.Execute(_dicom_slice(voxels[index], series, index, study))
    return folder


def _dicom_series_folder(folder: Path, positions: list) -> Path:
    """One CT series whose slices lie at `positions` (mm along z): gaps and duplicates on demand."""
    folder.mkdir()
    study = "1.2.826.0.1.3680043.8.498.7"
    series = f"{study}.{abs(hash(folder.name)) % 1000 + 10}"
    voxels = phantom_array((len(positions), 12, 12))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index, z in enumerate(positions):
        image = _dicom_slice(voxels[index], series, index, study)
        image.SetOrigin((0.0, 0.0, float(z)))
        image.SetMetaData("0020|0032", f"0\\0\\{float(z)}")
        writer.SetFileName(str(folder / f"slice_{index:03d}.dcm"))
        writer.Execute(image)
    return folder


def _huge_gzip_nrrd(path: Path, side: int = 4000) -> Path:
    """A small gzip NRRD whose header claims side^3 float voxels (a decompression bomb)."""
    import zlib

    data = zlib.compressobj(9, zlib.DEFLATED, 31).compress(bytes(1 << 20))  # 1 MB of zeros, gzip-wrapped
    header = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {side} {side} {side}\nencoding: gzip\n"
              "endian: little\nspacings: 1 1 1\n\n")
    path.write_bytes(header.encode("ascii") + data)
    return path


def make_image_cases(folder: Path) -> list[CorpusCase]:
    """Volumes handed to `segment` (and, where a volume exists in memory, to the Slicer Logic)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = phantom_image()
    cases: list[CorpusCase] = []

    def add(name, description, path, expect, image=None):
        cases.append(CorpusCase(name, "image", description, path, expect, image))

    nan = _with_voxels(base, lambda a: a.__setitem__((slice(2, 4), 3, slice(None)), np.nan))
    add("nan_voxels", "NaN voxels", _write(nan, folder / "nan_voxels.nrrd"),
        Expect("InputError", ("nan",), "contains NaN or infinite values; replace them"), nan)
    inf = _with_voxels(base, lambda a: a.__setitem__((5, 5, slice(4, 6)), (np.inf, -np.inf)))
    add("inf_voxels", "+inf and -inf voxels (MetaImage; ITK's NIfTI drops inf)",
        _write(inf, folder / "inf_voxels.mha"),
        Expect("InputError", ("infinite",), "contains NaN or infinite values; replace them"), inf)
    constant = _with_voxels(base, lambda a: a.fill(7.0))
    add("constant", "all-constant volume", _write(constant, folder / "constant.nrrd"),
        Expect("InputError", ("constant",), "is constant; nothing to segment, check the volume"), constant)
    add("zero_size", "zero-size volume (4 x 4 x 0 voxels)",
        _write_raw(folder / "zero_size.mha", "ObjectType = Image\nNDims = 3\nDimSize = 4 4 0\n"
                   "ElementSpacing = 1 1 1\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"),
        Expect("InputError", ("empty",), "is empty (size (4, 4, 0)); pass a volume with voxels"))
    add("zero_size_nrrd", "zero-size NRRD (header says 4 x 4 x 0)",
        _write_raw(folder / "zero_size.nrrd", "NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 0\n"
                   "encoding: raw\nendian: little\n\n"),
        Expect("ImageReadError", ("size is zero",), "cannot be read as an image (axis 2 size is zero!)"))
    add("empty_file", "0-byte file named .nrrd", _write_raw(folder / "empty_file.nrrd", ""),
        Expect("ImageReadError", ("empty", "0 bytes"), "is empty (0 bytes); re-export it"))
    flat = sitk.GetImageFromArray(phantom_array((1,) + SMALL_SHAPE[1:])[0])
    flat.SetSpacing((0.7, 0.7))
    add("image_2d", "2D image given to a 3D model", _write(flat, folder / "image_2d.nrrd"),
        Expect(None, sees="segmented as a one-slice volume; output on the input grid"))
    four_d = sitk.JoinSeries([base, base])
    add("volume_4d", "4D volume (2 time points)", _write(four_d, folder / "volume_4d.nrrd"),
        Expect("InputError", ("4D",), "holds 2 volumes (4D); split the series"))
    rgb = sitk.Compose([sitk.Cast(base, sitk.sitkUInt8)] * 3)
    add("multi_component", "3-component (RGB) volume", _write(rgb, folder / "multi_component.nrrd"),
        Expect("InputError", ("components",), "has 3 components per voxel; pass a scalar volume"), rgb)
    anisotropic = phantom_image((6, 20, 20), spacing=(0.5, 0.5, 10.0))
    add("anisotropic", "extreme anisotropy 0.5 x 0.5 x 10 mm", _write(anisotropic, folder / "anisotropic.nrrd"),
        Expect(None, sees="segmented (in-plane B-spline, nearest across slices); output on the input grid"),
        anisotropic)
    single = phantom_image((1, 14, 12))
    add("single_slice", "single slice (3D, 1 slice)", _write(single, folder / "single_slice.nii.gz"),
        Expect(None, sees="segmented; output on the input grid"), single)
    add("negative_spacing", "negative spacing (-1 1 1 in the header)",
        _write_raw(folder / "negative_spacing.mha", "ObjectType = Image\nNDims = 3\nDimSize = 12 14 10\n"
                   "ElementSpacing = -1 1 1\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n",
                   phantom_array().tobytes()),
        Expect(None, sees="read as a flipped axis (as ITK and Slicer do); segmented on the input grid"))
    add("zero_spacing", "zero spacing (0 1 1 in the header)",
        _write_raw(folder / "zero_spacing.mha", "ObjectType = Image\nNDims = 3\nDimSize = 12 14 10\n"
                   "ElementSpacing = 0 1 1\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n",
                   phantom_array().tobytes()),
        Expect("ImageReadError", ("spacing",), "cannot be read (zero-valued spacing); fix the spacing in the header"))
    sheared = phantom_image()
    shear = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sheared.SetDirection((shear / np.linalg.norm(shear, axis=0)).ravel().tolist())
    add("non_orthogonal", "non-orthogonal (sheared) direction matrix",
        _write(sheared, folder / "non_orthogonal.nrrd"),
        Expect("GeometryError", ("orthogonal",), "direction matrix is not orthogonal; resample onto a regular grid"),
        sheared)
    flipped = phantom_image(direction=[[0, 0, -1], [-1, 0, 0], [0, 1, 0]])
    add("flipped_axes", "permuted and flipped axes", _write(flipped, folder / "flipped_axes.nrrd"),
        Expect(None, sees="reoriented for the network; output in the input's own axis order"), flipped)
    add("truncated_nrrd", "truncated NRRD (half the bytes)",
        _truncate(_write(base, folder / "truncated.nrrd", compress=False)),
        Expect("ImageReadError", ("cannot be read",), "cannot be read (incomplete data); re-export it"))
    add("truncated_nifti_gz", "truncated NIfTI (.nii.gz)", _truncate(_write(base, folder / "truncated.nii.gz")),
        Expect("ImageReadError", ("truncated",), "is truncated or corrupt; re-export or re-download it"))
    add("truncated_nifti", "truncated NIfTI (.nii)", _truncate(_write(base, folder / "truncated.nii", False), 0.7),
        Expect("ImageReadError", ("truncated",), "is truncated: N of M bytes; re-export or re-download it"))
    garbage = folder / "not_an_image.nrrd"
    garbage.write_text("Patient notes, not an image.\n" * 20, encoding="utf-8")
    add("not_an_image", "text file named .nrrd", garbage,
        Expect("ImageReadError", ("cannot be read",), "cannot be read as an image; re-export it"))
    document = folder / "report.pdf"
    document.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    add("not_an_image_type", "PDF file (not an image format)", document,
        Expect("ImageReadError", ("cannot be read",), "cannot be read as an image; use NRRD, NIfTI, MHA or DICOM"))
    add("dicom_mixed_series", "DICOM folder with two series", _mixed_dicom_folder(folder / "dicom_mixed"),
        Expect("ImageReadError", ("series",), "holds 2 DICOM series; put each series in its own folder"))
    add("dicom_missing_slice", "DICOM series with one slice missing (z = 0, 2, 6, 8, 10 mm)",
        _dicom_series_folder(folder / "dicom_missing", [0.0, 2.0, 6.0, 8.0, 10.0]),
        Expect("ImageReadError", ("missing", "4.00 mm", "--accept-irregular-series"),
               "has a gap of 4.00 mm between the slices at 2.00 and 6.00 mm ... (a slice is missing); pass "
               "--accept-irregular-series to segment it anyway"))
    add("dicom_duplicated_slice", "DICOM series with a slice stored twice",
        _dicom_series_folder(folder / "dicom_duplicated", [0.0, 2.0, 2.0, 4.0, 6.0]),
        Expect("ImageReadError", ("duplicated",), "has 1 duplicated slice position(s); re-export the series"))
    add("dicom_uneven_spacing", "DICOM series with unevenly spaced slices (2, 2, 3, 2 mm)",
        _dicom_series_folder(folder / "dicom_uneven", [0.0, 2.0, 4.0, 7.0, 9.0]),
        Expect("ImageReadError", ("unevenly spaced",), "has a gap of 3.00 mm ... (slices are unevenly spaced)"))
    complex_image = sitk.RealAndImaginaryToComplex(base, base)
    add("complex_voxels", "complex-valued volume (NIfTI complex64)", _write(complex_image, folder / "complex.nii.gz"),
        Expect("InputError", ("complex",), "holds complex-valued voxels; save the magnitude image"))
    add("huge_header_gzip", "1 KB gzip NRRD whose header claims 4000^3 voxels",
        _huge_gzip_nrrd(folder / "huge_header.nrrd"),
        Expect("MemoryBudgetError", ("4000x4000x4000", "--memory-limit-mb"),
               "declares 4000x4000x4000 voxels and would need about 477 GB, more than the budget"))
    return cases


# --- checkpoints --------------------------------------------------------------------------------------


def _metadata(spatial_dims: int = 3, labels=LABELS, architecture: str = "unet"):
    from UNetSegmentLib.metadata import LabelInfo, ModelMetadata, Normalization

    return ModelMetadata(
        architecture=architecture, architecture_kwargs={"features": 4, "levels": 3}, spatial_dims=spatial_dims,
        in_channels=1, labels=[LabelInfo(value, name, color) for value, name, color in labels],
        patch_size=list(PATCH_SIZE[:spatial_dims]), target_spacing=[1.0, 1.0, 1.0],
        normalization=Normalization("zscore"), description="bad-input corpus model")


def make_tiny_checkpoint(path: Path, spatial_dims: int = 3, seed: int = 0) -> Path:
    """A real, untrained, deterministic 3-label U-Net (features 4, levels 3)."""
    import torch

    from UNetSegmentLib.checkpoint import build_model, save_checkpoint

    torch.manual_seed(seed)
    metadata = _metadata(spatial_dims)
    network = build_model(metadata)
    with torch.no_grad():  # larger weights than the default init, so that foreground labels occur
        for parameter in network.parameters():
            parameter.mul_(3.0)
    return save_checkpoint(path, network, metadata, overwrite=True)


class RunsCodeWhenUnpickled:
    """Pickles as a call to exec(): a plain `pickle.load` would write `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code from a checkpoint ran')",)


def make_checkpoint_cases(folder: Path, valid_checkpoint: Path, marker: Path) -> list[CorpusCase]:
    """Model files given with a valid image; `marker` must never appear (nothing from a file runs)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    payload = torch.load(valid_checkpoint, map_location="cpu", weights_only=True)
    cases: list[CorpusCase] = []

    def save(name: str, content) -> Path:
        path = folder / name
        torch.save(content, path)
        return path

    def add(name, description, path, expect):
        cases.append(CorpusCase(name, "checkpoint", description, path, expect))

    weights = dict(payload["state_dict"])
    dropped = sorted(weights)[len(weights) // 2]
    del weights[dropped]
    add("ckpt_missing_keys", "checkpoint with missing weight keys",
        save("missing_keys.pt", dict(payload, state_dict=weights)),
        Expect("CheckpointError", ("missing",), "weights do not match the architecture: 1 missing; retrain"))
    other = dict(payload, metadata=_metadata(architecture="residual_unet").to_dict())
    add("ckpt_other_architecture", "U-Net weights labelled as another architecture",
        save("other_architecture.pt", other),
        Expect("CheckpointError", ("do not match",), "weights do not match the architecture in its metadata"))
    four_labels = LABELS + [(3, "kidney", (0.1, 0.8, 0.1))]
    add("ckpt_wrong_label_count", "metadata lists 4 labels, weights predict 3",
        save("wrong_label_count.pt", dict(payload, metadata=_metadata(labels=four_labels).to_dict())),
        Expect("CheckpointError", ("labels", "3 classes"), "lists 4 labels but its weights predict 3 classes"))
    add("ckpt_executes_code", "pickle that runs code when loaded",
        save("executes_code.pt", dict(payload, metadata=RunsCodeWhenUnpickled(marker))),
        Expect("CheckpointError", ("execute code",), "refused: loading it would execute code; nothing ran"))
    data = Path(valid_checkpoint).read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    add("ckpt_truncated", "truncated checkpoint", folder / "truncated.pt",
        Expect("CheckpointError", ("truncated",), "is not a PyTorch checkpoint or is truncated/corrupt"))
    add("ckpt_bare_state_dict", "bare state_dict (no UNetSegment metadata)",
        save("bare_state_dict.pt", payload["state_dict"]),
        Expect("CheckpointError", ("not a UNetSegment checkpoint",), "is a PyTorch file but not a UNetSegment "
               "checkpoint"))
    unknown = dict(payload, metadata=dict(payload["metadata"], architecture="swin_unetr"))
    add("ckpt_unknown_architecture", "checkpoint naming an unknown architecture",
        save("unknown_architecture.pt", unknown),
        Expect("CheckpointError", ("swin_unetr",), "needs architecture 'swin_unetr', which this UNetSegment lacks"))
    text = folder / "notes.pt"
    text.write_text("not a model\n", encoding="utf-8")
    add("ckpt_not_a_model", "text file named .pt", text,
        Expect("CheckpointError", ("not a PyTorch checkpoint",), "is not a PyTorch checkpoint; pick another"))
    add("ckpt_2d_model", "3D image given to a 2D model", make_tiny_checkpoint(folder / "model_2d.pt", 2),
        Expect(None, sees="segmented slice by slice; output on the input grid"))
    metadata = payload["metadata"]

    def with_metadata(name, **changes):
        return save(name, dict(payload, metadata=dict(metadata, **changes)))

    add("ckpt_spatial_dims_4", "metadata says spatial_dims 4", with_metadata("dims4.pt", spatial_dims=4),
        Expect("CheckpointError", ("spatial_dims", "2 or 3"), "'spatial_dims' must be 2 or 3, got 4; set it to 2 or 3"))
    add("ckpt_patch_size_scalar", "patch_size 32 instead of a list", with_metadata("patch32.pt", patch_size=32),
        Expect("CheckpointError", ("patch_size",), "'patch_size' must be a list of 3 values, got 32"))
    add("ckpt_spacing_strings", "target_spacing as strings", with_metadata("spacing_text.pt",
                                                                          target_spacing=["1", "1", "1"]),
        Expect("CheckpointError", ("target_spacing[0]",), "'target_spacing[0]' must be a finite number, got '1'"))
    add("ckpt_non_tensor_weight", "a list where a weight tensor belongs",
        save("non_tensor.pt", dict(payload, state_dict=dict(payload["state_dict"], **{dropped: [1.0, 2.0]}))),
        Expect("CheckpointError", ("state_dict", "a tensor"), "'state_dict[<key>]' must be a tensor, got a list"))
    add("ckpt_metadata_list", "metadata stored as a JSON-like list", save("metadata_list.pt", dict(payload,
                                                                                                 metadata=[1, 2])),
        Expect("CheckpointError", ("no metadata dictionary",), "has no metadata dictionary (found [1, 2])"))
    add("ckpt_labels_without_color", "a label entry without its colour",
        with_metadata("label_no_color.pt", labels=[{k: v for k, v in label.items() if k != "color"}
                                                    for label in metadata["labels"]]),
        Expect("CheckpointError", ("labels[0].color",), "'labels[0].color' must be present"))
    add("ckpt_spacing_0_01mm", "target spacing 0.01 mm (a 1000x larger network grid)",
        with_metadata("spacing_0_01.pt", target_spacing=[0.01, 0.01, 0.01]),
        Expect("MemoryBudgetError", ("would need about", "--memory-limit-mb"),
               "Segmenting this image (network grid 1200x1400x1000 ...) would need about 100 GB; raise the budget"))
    return cases


# --- training datasets --------------------------------------------------------------------------------


def _dataset(folder: Path, label_for: Callable[[int, sitk.Image], sitk.Image],
             image_for: Optional[Callable[[int, sitk.Image], sitk.Image]] = None,
             manifest_change: Optional[Callable[[dict], object]] = None) -> Path:
    """Decathlon-style folder with three small cases; `label_for(case, image)` makes each labelmap."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for case in range(3):
        image = phantom_image((8, 12, 12), seed=case)
        _write(image_for(case, image) if image_for else image, folder / "imagesTr" / f"case{case}_0000.nii.gz")
        _write(label_for(case, image), folder / "labelsTr" / f"case{case}.nii.gz")
        training.append({"image": f"./imagesTr/case{case}_0000.nii.gz", "label": f"./labelsTr/case{case}.nii.gz"})
    manifest = {"name": folder.name, "labels": {"0": "background", "1": "liver"}, "modality": {"0": "MR"},
                "training": training, "file_ending": ".nii.gz"}
    if manifest_change is not None:
        manifest = manifest_change(manifest)
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return folder


def _label(image: sitk.Image, value: int = 1) -> sitk.Image:
    array = (sitk.GetArrayFromImage(image) > 100).astype(np.uint8) * value
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(image)
    return label


def make_dataset_cases(folder: Path) -> list[CorpusCase]:
    """Training sets given to `train`: labelmaps off the image grid, undeclared label values."""
    folder.mkdir(parents=True, exist_ok=True)

    def shifted(case: int, image: sitk.Image) -> sitk.Image:
        label = _label(image)
        if case == 1:
            label.SetSpacing((1.0, 1.0, 2.0))  # same voxels, twice as deep: a different grid
        return label

    def extra_value(case: int, image: sitk.Image) -> sitk.Image:
        return _label(image, 5 if case == 2 else 1)

    def label_257(case: int, image: sitk.Image) -> sitk.Image:
        label = sitk.Cast(_label(image), sitk.sitkUInt16)
        return label * 257 if case == 1 else label  # 257 would wrap to 1 in a uint8 cast

    def rgb(case: int, image: sitk.Image) -> sitk.Image:
        if case != 2:
            return image
        scaled = sitk.Cast(sitk.RescaleIntensity(image, 0, 255), sitk.sitkUInt8)
        colour = sitk.Compose([scaled] * 3)
        colour.CopyInformation(image)
        return colour

    def drop_label(manifest: dict) -> dict:
        manifest["training"][1].pop("label")
        return manifest

    def channels_list(manifest: dict) -> dict:
        manifest.pop("modality")
        manifest["channel_names"] = ["CT"]
        return manifest

    def region_labels(manifest: dict) -> dict:
        manifest["labels"] = {"background": 0, "liver": [1, 2]}
        return manifest

    return [
        CorpusCase("train_label_257", "dataset", "label value 257 (uint16) where dataset.json names 0 and 1",
                   _dataset(folder / "label_257", label_257),
                   Expect("InputError", ("257", "case1"), "label values [257] in case1.nii.gz are not named in "
                                                          "dataset.json (never wrapped to 1)")),
        CorpusCase("train_rgb_image", "dataset", "an RGB image among the training images",
                   _dataset(folder / "rgb_image", lambda case, image: _label(image), rgb),
                   Expect("InputError", ("3 components", "case2"), "training image case2_0000.nii.gz has 3 components "
                                                                     "per voxel")),
        CorpusCase("train_dataset_json_list", "dataset", "dataset.json holding a JSON list",
                   _dataset(folder / "json_list", lambda case, image: _label(image), manifest_change=lambda m: [m]),
                   Expect("InputError", ("JSON object",), "dataset.json must hold a JSON object, not a list")),
        CorpusCase("train_entry_without_label", "dataset", "a training entry without \"label\"",
                   _dataset(folder / "entry_without_label", lambda case, image: _label(image),
                            manifest_change=drop_label),
                   Expect("InputError", ("training[1].label",), "'training[1].label' must be present")),
        CorpusCase("train_channel_names_list", "dataset", "channel_names as a list instead of an object",
                   _dataset(folder / "channel_names_list", lambda case, image: _label(image),
                            manifest_change=channels_list),
                   Expect("InputError", ("channel_names",), "'channel_names' must be an object ({...}), got ['CT']")),
        CorpusCase("train_labels_region_based", "dataset", "nnU-Net v2 region-based labels ([1, 2])",
                   _dataset(folder / "labels_region_based", lambda case, image: _label(image),
                            manifest_change=region_labels),
                   Expect("InputError", ("labels.liver", "region"), "'labels.liver' must be a single label value")),
        CorpusCase("train_label_grid_mismatch", "dataset", "training labelmap on another grid than its image",
                   _dataset(folder / "label_grid_mismatch", shifted),
                   Expect("GeometryError", ("labelmap",), "labelmap spacing differs from the image's; resample it")),
        CorpusCase("train_unexpected_label_values", "dataset", "label value 5 not named in dataset.json",
                   _dataset(folder / "unexpected_label_values", extra_value),
                   Expect("InputError", ("5",), "label values [5] are not named in dataset.json; add or fix")),
    ]


def make_corpus(folder, valid_checkpoint: Optional[Path] = None) -> dict[str, CorpusCase]:
    """Every file case of the corpus, by name; `code_marker(folder)` must never come to exist."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if valid_checkpoint is None:
        valid_checkpoint = make_tiny_checkpoint(folder / "valid_model.pt")
    cases = make_image_cases(folder / "images")
    cases += make_checkpoint_cases(folder / "checkpoints", Path(valid_checkpoint), code_marker(folder))
    cases += make_dataset_cases(folder / "datasets")
    made = {case.name: case for case in cases}
    if {name: case.kind for name, case in made.items()} != CASE_KINDS:
        raise RuntimeError("make_corpus.CASE_KINDS is out of step with the cases the generator writes.")
    return made


def code_marker(folder) -> Path:
    return Path(folder) / "code_ran.txt"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bad_input_corpus")
    for case in make_corpus(target).values():
        outcome = "succeeds" if case.expect.succeeds else case.expect.error
        print(f"{case.name:32s} {outcome:16s} {case.path}")
