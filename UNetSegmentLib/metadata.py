"""What a checkpoint says about itself, so that inference needs nothing but the file.

Only plain Python types (str, int, float, bool, list, dict, None) go in, so the whole checkpoint
loads with `torch.load(..., weights_only=True)`. Importable without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .errors import CheckpointError

CHECKPOINT_FORMAT = "unetsegment-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


_MR_NAMES = {"MR", "MRI", "T1", "T2", "T1W", "T2W", "FLAIR", "ADC", "DWI", "PD", "T1CE", "T1GD"}


def canonical_modality(name: str) -> str:
    """'MRI', 'T1', 'flair' -> 'MR'; 'ct' -> 'CT'; anything else upper-cased (dataset.json names vary)."""
    text = str(name).strip().upper()
    return "MR" if text in _MR_NAMES or text.startswith("MR") else text


@dataclass
class LabelInfo:
    value: int  # voxel value in the labelmap; 0 is background
    name: str
    color: tuple[float, float, float]  # RGB in 0..1, as Slicer segments use


@dataclass
class Normalization:
    """nnU-Net style intensity normalisation replayed at inference.

    scheme "ct": clip to [clip_low, clip_high] (foreground 0.5/99.5 percentiles of the training set),
    then (x - mean) / std with the training foreground statistics.
    scheme "zscore": per-volume (x - mean(x)) / std(x) (MR and other modalities).
    """

    scheme: str = "zscore"
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    mean: Optional[float] = None
    std: Optional[float] = None


@dataclass
class ModelMetadata:
    architecture: str
    architecture_kwargs: dict[str, Any]
    spatial_dims: int
    in_channels: int
    labels: list[LabelInfo]  # including background (value 0)
    patch_size: list[int]
    target_spacing: list[float]  # mm, in SimpleITK (x, y, z) order; patch_size is in array (z, y, x) order
    normalization: Normalization = field(default_factory=Normalization)
    sampler: str = "sliding_window"  # or "topk" for No-More-Sliding-Window models
    topk: Optional[dict[str, Any]] = None  # top-k settings (k, coarse size, ...) when sampler == "topk"
    modality: str = "MR"
    training: dict[str, Any] = field(default_factory=dict)  # dataset summary, epochs, seconds, fold
    validation_dice: dict[str, float] = field(default_factory=dict)  # label name -> Dice
    description: str = ""

    @property
    def out_channels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = [dict(label, color=list(label["color"])) for label in data["labels"]]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "checkpoint") -> "ModelMetadata":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} has no metadata dictionary.",
                                  "Use a checkpoint written by UNetSegment (python -m UNetSegmentLib train).")
        required = ("architecture", "architecture_kwargs", "spatial_dims", "in_channels", "labels",
                    "patch_size", "target_spacing")
        missing = [key for key in required if key not in data]
        if missing:
            raise CheckpointError(f"{source} metadata lacks {', '.join(missing)}.",
                                  "The file is incomplete or from another tool; retrain or re-export it.")
        try:
            labels = [LabelInfo(int(item["value"]), str(item["name"]), tuple(float(c) for c in item["color"]))
                      for item in data["labels"]]
            normalization = Normalization(**(data.get("normalization") or {}))
            known = {f for f in cls.__dataclass_fields__}
            kwargs = {key: value for key, value in data.items() if key in known}
            kwargs.update(labels=labels, normalization=normalization)
            metadata = cls(**kwargs)
        except (TypeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{source} metadata is malformed ({error}).",
                                  "Retrain or re-export the model with this version of UNetSegment.") from None
        metadata.validate(source)
        return metadata

    def validate(self, source: str = "checkpoint") -> None:
        if self.spatial_dims not in (2, 3):
            raise CheckpointError(f"{source} declares spatial_dims={self.spatial_dims}; only 2 or 3 are valid.")
        if len(self.labels) < 2 or sorted(label.value for label in self.labels) != list(range(len(self.labels))):
            raise CheckpointError(f"{source} label values must be 0..N-1 with background 0 and at least one "
                                  "foreground label.", "Re-export the model with consistent label names.")
        if len(self.patch_size) != self.spatial_dims or len(self.target_spacing) != 3:
            raise CheckpointError(f"{source} patch size {self.patch_size} or target spacing "
                                  f"{self.target_spacing} does not fit a {self.spatial_dims}D model.")
        if self.sampler not in ("sliding_window", "topk"):
            raise CheckpointError(f"{source} names unknown sampler '{self.sampler}'.")
