"""Read a checkpoint's record (format, version, metadata) without torch and without its weights.

`torch.save` writes a zip archive: `<name>/data.pkl` is a small pickle of the payload dict whose
tensors are references to separate `<name>/data/<key>` entries. Only data.pkl is read here, with an
unpickler that knows a short allow-list of torch globals and turns each tensor into a `TensorStub`
(shape only). Nothing in the file is ever called, so listing models is safe, fast (no weights are
read) and works before PyTorch is installed (Slicer's panel, issue 12).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError

_RETRAIN = "Retrain the model with `python -m UNetSegmentLib train` or pick another checkpoint."
_MAX_RECORD_BYTES = 64 * 1024 * 1024  # data.pkl holds no tensor data; larger means a foreign file


class TensorStub:
    """Stands for one stored tensor: its shape, never its values."""

    __slots__ = ("shape",)

    def __init__(self, shape=()):
        self.shape = tuple(int(size) for size in shape)

    def dim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"TensorStub{self.shape}"


class _StorageStub:
    def __init__(self, *args: Any) -> None:
        pass


def _rebuild_tensor(storage, storage_offset=0, size=(), *args, **kwargs):
    return TensorStub(size)


def _rebuild_parameter(data, *args, **kwargs):
    return data


_STORAGE_NAMES = {"FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
                  "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage"}
_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}


class _RecordUnpickler(pickle.Unpickler):
    """Plain containers plus the tensor-rebuild calls torch.save emits; everything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_NAMES:
            return _StorageStub
        raise _CodeInPickle(f"{module}.{name}")

    def persistent_load(self, pid):
        return _StorageStub()


class _CodeInPickle(Exception):
    pass


def _record_name(archive: zipfile.ZipFile, path: Path) -> str:
    names = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
    if len(names) != 1:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is truncated/corrupt (no single data.pkl "
                              "record in the archive).", _RETRAIN)
    return names[0]


def read_record(path) -> Any:
    """The unpickled payload with every tensor replaced by a TensorStub; CheckpointError on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Model file {path} does not exist.", "Check the path, or list models with "
                              "`python -m UNetSegmentLib models`.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model file.", "Point to the .pt checkpoint file.")
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(_record_name(archive, path))
            if info.file_size > _MAX_RECORD_BYTES:
                raise CheckpointError(f"{path} is not a UNetSegment checkpoint (its record is "
                                      f"{info.file_size // 2**20} MB).", _RETRAIN)
            data = archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as error:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is truncated/corrupt ({error}).",
                              _RETRAIN) from None
    try:
        return _RecordUnpickler(io.BytesIO(data)).load()
    except _CodeInPickle as error:
        raise CheckpointError(
            f"{path} was refused: loading it would execute code stored in the file (it names {error}, which "
            "is not plain weights).",
            "Only use UNetSegment checkpoints; re-export foreign models as plain state_dict + metadata.") from None
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises many types
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is truncated/corrupt (its record cannot be "
                              f"read: {type(error).__name__}).", _RETRAIN) from None
