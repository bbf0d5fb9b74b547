"""Where checkpoints live: models shipped with the extension and models the user added.

Shipped models sit in Resources/Models (env UNETSEGMENT_MODELS_DIR overrides, for tests and
installs that keep models elsewhere); user models in a per-user data folder (env
UNETSEGMENT_USER_MODELS_DIR overrides) so that updating the extension never deletes them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CheckpointError, InputError
from .metadata import ModelMetadata

MODEL_SUFFIX = ".pt"
DEFAULT_MODEL_NAME = "default"
SAMPLE_IMAGE_NAME = "sample_ct.nrrd"
SAMPLE_REFERENCE_NAME = "sample_ct_reference.nrrd"


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


def default_model_path() -> Path:
    return shipped_models_dir() / f"{DEFAULT_MODEL_NAME}{MODEL_SUFFIX}"


def sample_image_path() -> Path:
    return samples_dir() / SAMPLE_IMAGE_NAME


def sample_reference_path() -> Path:
    return samples_dir() / SAMPLE_REFERENCE_NAME


def _entries(folder: Path, source: str) -> list[ModelEntry]:
    from .checkpoint import read_checkpoint_metadata
    from .ensemble import read_set_metadata

    entries = []
    if not folder.is_dir():
        return entries
    for path in sorted(folder.glob(f"*{MODEL_SUFFIX}")):
        if path.name.startswith("."):
            continue  # temp files of an atomic write in progress
        try:
            entries.append(ModelEntry(path.stem, path, read_checkpoint_metadata(path), source))
        except CheckpointError as error:
            entries.append(ModelEntry(path.stem, path, None, source, str(error)))
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
    """Validate a checkpoint fully (weights included), then copy it atomically into user_models_dir()."""
    from .checkpoint import load_checkpoint

    source = Path(path)
    loaded = load_checkpoint(source, device="cpu")  # raises CheckpointError with the reason
    stem = name or source.stem
    if not stem or any(ch in stem for ch in '/\\:'):
        raise InputError(f"'{stem}' cannot be used as a model name.", "Use letters, digits, '-' and '_'.")
    folder = user_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}{MODEL_SUFFIX}"
    if target.exists() and not overwrite:
        raise InputError(f"A user model named '{stem}' already exists ({target}).",
                         "Pick another name or allow overwriting.")
    handle, temp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        shutil.copyfile(source, temp_name)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return ModelEntry(stem, target, loaded.metadata, "user")


def read_model_metadata(path) -> ModelMetadata:
    """The card of a checkpoint file or of a folder of fold checkpoints, read without torch."""
    path = Path(path)
    if path.is_dir():
        from .ensemble import read_set_metadata

        return read_set_metadata(path)
    from .checkpoint import read_checkpoint_metadata

    return read_checkpoint_metadata(path)
