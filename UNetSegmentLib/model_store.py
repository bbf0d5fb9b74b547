"""Where checkpoints live: models shipped with the extension and models the user added.

Shipped models sit in Resources/Models (env UNETSEGMENT_MODELS_DIR overrides, for tests and
installs that keep models elsewhere); user models in a per-user data folder (env
UNETSEGMENT_USER_MODELS_DIR overrides) so that updating the extension never deletes them.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CheckpointError, InputError, UNetSegmentError, translate
from .metadata import ModelMetadata

MODEL_SUFFIX = ".pt"
# The shipped defaults per input modality: the real hippocampus MRI model (a folder of fold
# checkpoints, softmax-averaged) and the synthetic-phantom CT demo model.
MR_MODEL_NAME = "hippocampus_mr"
PHANTOM_CT_MODEL_NAME = "phantom_ct_demo"
DEFAULT_MODEL_NAMES = {"MR": MR_MODEL_NAME, "CT": PHANTOM_CT_MODEL_NAME}
# shipped samples by name: (image, reference labelmap); "mr" is a real scan no fold trained on
SAMPLES = {"mr": ("sample_mr_hippocampus.nii.gz", "sample_mr_hippocampus_reference.nii.gz"),
           "phantom-ct": ("sample_ct.nrrd", "sample_ct_reference.nrrd")}
DEFAULT_SAMPLE = "mr"


@dataclass
class ModelEntry:
    name: str
    path: Path
    metadata: Optional[ModelMetadata]  # None when the file failed validation (see `error`)
    source: str  # "shipped" or "user"
    error: Optional[str] = None


def _resources_dir() -> Path:
    """Resources/ of the repository or of the installed extension (UNetSegmentLib's parent or sibling)."""
    package = Path(__file__).resolve().parent
    candidates = [package.parent / "Resources", package.parent / "UNetSegment" / "Resources",
                  package / "Resources"]
    for candidate in candidates:
        if (candidate / "Models").is_dir() or (candidate / "Samples").is_dir():
            return candidate
    return candidates[0]


def shipped_models_dir() -> Path:
    override = os.environ.get("UNETSEGMENT_MODELS_DIR")
    return Path(override) if override else _resources_dir() / "Models"


def samples_dir() -> Path:
    override = os.environ.get("UNETSEGMENT_SAMPLES_DIR")
    return Path(override) if override else _resources_dir() / "Samples"


def user_models_dir() -> Path:
    override = os.environ.get("UNETSEGMENT_USER_MODELS_DIR")
    if override:
        return Path(override)
    home = Path.home()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", home / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", home / ".local" / "share"))
    return base / "UNetSegment" / "models"


def default_model_path(modality: str = "MR") -> Path:
    """The shipped model for an input of `modality` ('MR' -> the hippocampus ensemble folder, 'CT' -> the
    phantom demo checkpoint); see applicability.modality_of for telling them apart from the intensities."""
    name = DEFAULT_MODEL_NAMES.get(str(modality).upper(), MR_MODEL_NAME)
    folder = shipped_models_dir()
    return folder / name if name == MR_MODEL_NAME else folder / f"{name}{MODEL_SUFFIX}"


def _sample(kind: str) -> tuple[str, str]:
    try:
        return SAMPLES[kind]
    except KeyError:
        raise InputError(f"No shipped sample named '{kind}'.", f"Choose one of: {', '.join(SAMPLES)}.") from None


def sample_image_path(kind: str = DEFAULT_SAMPLE) -> Path:
    return samples_dir() / _sample(kind)[0]


def sample_reference_path(kind: str = DEFAULT_SAMPLE) -> Path:
    return samples_dir() / _sample(kind)[1]


def _entries(folder: Path, source: str) -> list[ModelEntry]:
    from .ensemble import read_set_metadata

    entries = []
    if not folder.is_dir():
        return entries
    for path in sorted(folder.glob(f"*{MODEL_SUFFIX}")):
        if path.name.startswith("."):
            continue  # temp files of an atomic write in progress
        try:
            entries.append(ModelEntry(path.stem, path, read_set_metadata(path), source))  # checkpoint or all-folds file
        except (CheckpointError, UNetSegmentError, OSError, MemoryError, ValueError, TypeError) as error:
            # issue 16: one unusable file is listed with its reason and never blocks the others
            reason = error if isinstance(error, UNetSegmentError) else translate(error) or error
            entries.append(ModelEntry(path.stem, path, None, source, str(reason)))
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not any(path.glob(f"*{MODEL_SUFFIX}")):
            continue
        try:  # a folder of fold checkpoints is one model (an ensemble)
            entries.append(ModelEntry(path.name, path, read_set_metadata(path), source))
        except CheckpointError as error:
            entries.append(ModelEntry(path.name, path, None, source, str(error)))
    return entries


def list_models() -> list[ModelEntry]:
    """Shipped models first, then the user's; invalid files are listed with their error, not hidden."""
    return _entries(shipped_models_dir(), "shipped") + _entries(user_models_dir(), "user")


def find_model(name_or_path) -> Path:
    """A checkpoint path from a path or from the name of a shipped/user model."""
    path = Path(name_or_path)
    if path.suffix == MODEL_SUFFIX or path.exists() or os.sep in str(name_or_path):
        return path
    for entry in list_models():
        if entry.name == str(name_or_path):
            return entry.path
    names = ", ".join(entry.name for entry in list_models()) or "none"
    raise InputError(f"No model named '{name_or_path}'.",
                     f"Pass a .pt file or one of the available models: {names}.")


def add_user_model(path, overwrite: bool = False, name: Optional[str] = None) -> ModelEntry:
    """Validate a checkpoint fully (weights included), then copy it atomically into user_models_dir().

    An nnU-Net v2 results folder is imported instead (interop.nnunet_import): all its folds become one
    ordinary model file there, named <dataset>_<configuration> unless `name` is given."""
    from .checkpoint import load_checkpoint

    source = Path(path)
    if source.is_dir():
        return _import_nnunet_folder(source, overwrite, name)
    loaded = load_checkpoint(source, device="cpu")  # raises CheckpointError with the reason
    target = user_model_target(name or source.stem, overwrite)
    from .publish import temporary_output  # issue 16: read-only/full folder -> OutputError, no temp left

    with temporary_output(target, overwrite) as temp_name:
        shutil.copyfile(source, temp_name)
    return ModelEntry(target.stem, target, loaded.metadata, "user")


def user_model_target(stem: str, overwrite: bool = False) -> Path:
    """Where a user model named `stem` goes; refuses a bad name, or an existing one without overwrite."""
    if not stem or any(ch in stem for ch in '/\\:') or stem.startswith("."):
        raise InputError(f"'{stem}' cannot be used as a model name.", "Use letters, digits, '-' and '_'.")
    target = user_models_dir() / f"{stem}{MODEL_SUFFIX}"
    if os.path.lexists(target) and not overwrite:
        raise InputError(f"A user model named '{stem}' already exists ({target}).",
                         "Pick another name or allow overwriting.")
    return target


def _import_nnunet_folder(folder: Path, overwrite: bool, name: Optional[str]) -> ModelEntry:
    from .interop.nnunet_import import import_results_folder
    from .interop.nnunet_plans import check_results_folder, default_model_name

    check_results_folder(folder)
    target = import_results_folder(folder, user_model_target(name or default_model_name(folder), overwrite),
                                   overwrite=overwrite)
    return ModelEntry(target.stem, target, read_model_metadata(target), "user")


def read_model_metadata(path) -> ModelMetadata:
    """The card of a checkpoint file, an all-folds file or a folder of fold checkpoints, read without torch."""
    from .ensemble import read_set_metadata

    return read_set_metadata(path)
