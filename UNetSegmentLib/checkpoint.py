"""One-file checkpoints: weights plus everything inference needs (ModelMetadata).

Loading never unpickles code: `torch.load(..., weights_only=True)` only accepts tensors and plain
Python containers, so a model file downloaded from anywhere cannot run anything on load.

Layout: {"format": CHECKPOINT_FORMAT, "format_version": 1, "metadata": ModelMetadata.to_dict(),
         "state_dict": network.state_dict()}
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import CheckpointError, DeviceError, InputError, UnknownArchitectureError
from .metadata import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, ModelMetadata

# what torch's weights-only unpickler says when a file asks for a class or function to be called
_CODE_IN_PICKLE = re.compile(r"GLOBAL|[Uu]nsupported global|REDUCE|BUILD|is blocked")
_RETRAIN = "Retrain the model with `python -m UNetSegmentLib train` or pick another checkpoint."


@dataclass
class LoadedModel:
    network: Any  # torch.nn.Module in eval mode, on the requested device
    metadata: ModelMetadata
    path: Path

    @property
    def device(self):
        import torch

        parameter = next(self.network.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")


def resolve_device(device: Union[str, Any] = "auto"):
    """'auto' -> CUDA if available, then Apple MPS, else CPU; an unavailable device -> DeviceError."""
    import torch

    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"'{device}' is not a device name.", "Use 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps'.") \
            from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but PyTorch sees no CUDA GPU.",
                              "Use device 'cpu' (or 'auto'), or install a CUDA build of PyTorch.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"GPU {resolved.index} does not exist ({torch.cuda.device_count()} visible).",
                              "Use 'cuda:0' or another visible GPU index.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("Apple MPS was requested but is not available.", "Use device 'cpu' or 'auto'.")
    if resolved.type not in ("cpu", "cuda", "mps"):  # e.g. xpu: torch parses it, nothing here runs on it
        raise DeviceError(f"Device type '{resolved.type}' is not supported.", "Use 'auto', 'cpu', 'cuda' or 'mps'.")
    return resolved


def build_model(metadata: ModelMetadata):
    """The (untrained) network a checkpoint's metadata describes."""
    if metadata.sampler == "topk":
        from .topk.model import build_topk_model

        return build_topk_model(metadata)
    from .networks import build_network

    return build_network(metadata.architecture, metadata.spatial_dims, metadata.in_channels,
                         metadata.out_channels, **dict(metadata.architecture_kwargs))


def save_checkpoint(path, network, metadata: ModelMetadata, overwrite: bool = False) -> Path:
    """Write weights + metadata through a temp file in the same folder, published without replacing."""
    import torch

    path = Path(path)
    if not isinstance(metadata, ModelMetadata):
        raise InputError(f"metadata must be a ModelMetadata, got {type(metadata).__name__}.",
                         "Describe the model with UNetSegmentLib.metadata.ModelMetadata.")
    metadata.validate("model metadata")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; it was not overwritten.",
                         "Choose another file name or pass overwrite=True (--overwrite).")
    if path.exists() and path.is_dir():
        raise InputError(f"{path} is a folder.", "Give a file name ending in .pt.")
    state_dict = {key: value.detach().to("cpu").clone() for key, value in network.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
               "metadata": metadata.to_dict(), "state_dict": state_dict}
    from .publish import temporary_output  # issue 16: no-replace publish, temp removed on any failure

    with temporary_output(path, overwrite) as temp_name:
        with open(temp_name, "wb") as stream:
            torch.save(payload, stream)
    return path


def _load_payload(path, map_location="cpu") -> dict:
    return validate_payload(load_payload_safely(path, map_location), Path(path))


def load_payload_safely(path, map_location="cpu") -> Any:
    """torch.load with weights_only=True; every failure becomes a CheckpointError naming the file."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Model file {path} does not exist.", "Check the path, or list models with "
                              "`python -m UNetSegmentLib models`.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model file.", "Point to the .pt checkpoint file.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if _CODE_IN_PICKLE.search(str(error)):
            raise CheckpointError(
                f"{path} was refused: loading it would execute code stored in the file (a pickled object "
                "that is not plain weights).",
                "Only use UNetSegment checkpoints; re-export foreign models as plain state_dict + metadata.") \
                from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is truncated/corrupt (its data cannot be "
                              "unpickled as plain weights).", _RETRAIN) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if _CODE_IN_PICKLE.search(str(error)):
            raise CheckpointError(f"{path} was refused: loading it would execute code stored in the file.",
                                  "Only use UNetSegment checkpoints.") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is truncated/corrupt ({message}).",
                              _RETRAIN) from None
    return payload


def validate_payload(payload: Any, path: Path) -> dict:
    """The checkpoint envelope: format name and version, metadata and non-empty weights present."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a UNetSegment checkpoint (no "
                              f"'format': '{CHECKPOINT_FORMAT}').",
                              "Train a model with UNetSegment, or wrap foreign weights with save_checkpoint.")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this UNetSegment reads "
                              f"up to {CHECKPOINT_FORMAT_VERSION}.", "Update UNetSegment or re-export the model.")
    for key in ("metadata", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks its '{key}'.", _RETRAIN)
    if not isinstance(payload["state_dict"], dict) or not payload["state_dict"]:
        raise CheckpointError(f"{path} holds no weights (empty state_dict).", _RETRAIN)
    from .schema import validate_state_dict  # issue 16: a non-tensor entry is named, not a traceback

    validate_state_dict(payload["state_dict"], path)
    return payload


def _metadata_from_payload(payload: dict, path) -> ModelMetadata:
    metadata = ModelMetadata.from_dict(payload["metadata"], source=str(path))
    from .networks.registry import get_architecture

    try:
        get_architecture(metadata.architecture)
    except UnknownArchitectureError as error:
        raise CheckpointError(f"{path} needs architecture '{metadata.architecture}', which this UNetSegment "
                              f"does not have ({error.problem}).",
                              "Update UNetSegment or retrain with a registered architecture.") from None
    return metadata


def read_checkpoint_metadata(path) -> ModelMetadata:
    """Validate format, metadata and architecture name without torch, without reading the weights.

    Reads only the archive's small pickle record (checkpoint_record.py), so listing models works
    before PyTorch is installed; `load_checkpoint` later reads the same record through torch.
    """
    from .checkpoint_record import read_record

    path = Path(path)
    return _metadata_from_payload(validate_payload(read_record(path), path), path)


def _describe_mismatch(network, state_dict: dict, out_channels: int, path) -> CheckpointError:
    own = network.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = [key for key in own if key in state_dict and tuple(own[key].shape) != tuple(state_dict[key].shape)]
    if not missing and not unexpected and wrong_shape:
        stored = {int(state_dict[key].shape[0]) for key in wrong_shape if state_dict[key].dim() > 0}
        expected = {int(own[key].shape[0]) for key in wrong_shape if own[key].dim() > 0}
        if expected == {out_channels} and len(stored) == 1 and stored != expected:
            return CheckpointError(
                f"{path} lists {out_channels} labels (with background) but its weights predict "
                f"{stored.pop()} classes.", "Fix the label list in the metadata or retrain the model.")
    details = []
    if missing:
        details.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong_shape:
        key = wrong_shape[0]
        details.append(f"{len(wrong_shape)} with another shape (e.g. {key}: stored "
                       f"{tuple(state_dict[key].shape)}, network {tuple(own[key].shape)})")
    return CheckpointError(f"{path}: weights do not match the architecture in its metadata: "
                           f"{'; '.join(details)}.",
                           "The metadata (architecture arguments) and weights disagree; retrain or re-export.")


def load_checkpoint(path, device="cpu", payload: Any = None) -> LoadedModel:
    """Rebuild the network from metadata, load the weights strictly, move to `device`, eval mode.

    `payload` is the already unpickled file (callers that had to look inside it first, e.g. ensembles).
    """
    path = Path(path)
    payload = _load_payload(path) if payload is None else validate_payload(payload, path)
    return load_checkpoint_payload(payload, path, device)


def load_checkpoint_payload(payload: dict, path, device="cpu", source: Optional[str] = None) -> LoadedModel:
    """Build and load one {"metadata", "state_dict"} record (a checkpoint, or one member of an ensemble)."""
    path = Path(source) if source else Path(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict) \
            or not payload["state_dict"]:
        raise CheckpointError(f"{path} holds no weights (empty or missing state_dict).", _RETRAIN)
    metadata = _metadata_from_payload(payload, path)
    target = resolve_device(device)
    from .memory import check_network  # issue 16: refuse e.g. features=4096 before allocating it

    check_network(lambda: build_model(metadata), f"{path}: building its network")
    try:
        network = build_model(metadata)
    except (InputError, CheckpointError) as error:
        raise CheckpointError(f"{path}: the network in its metadata cannot be built ({error.problem}).",
                              _RETRAIN) from None
    except TypeError as error:
        raise CheckpointError(f"{path}: architecture '{metadata.architecture}' rejects the stored arguments "
                              f"({error}).", _RETRAIN) from None
    state_dict = payload["state_dict"]
    own = network.state_dict()
    if set(own) != set(state_dict) or any(tuple(own[k].shape) != tuple(getattr(state_dict[k], "shape", ()))
                                          for k in own):
        raise _describe_mismatch(network, state_dict, metadata.out_channels, path)
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights cannot be loaded ({str(error).splitlines()[0]}).", _RETRAIN) \
            from None
    network.to(target)
    network.eval()
    return LoadedModel(network=network, metadata=metadata, path=path)
