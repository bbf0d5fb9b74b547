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
    # standard codes, DICOM style {"category"|"type"|"modifier"|"region": [scheme, code, meaning]}
    terminology: Optional[dict] = None


# Slicer GenericAnatomyColors entries for common labels; other labels get a distinct fallback colour.
ORGAN_COLORS = {
    "liver": (221, 130, 101), "spleen": (157, 108, 162), "kidney": (185, 102, 83),
    "left kidney": (185, 102, 83), "right kidney": (185, 102, 83), "pancreas": (249, 180, 111),
    "stomach": (216, 132, 105), "gallbladder": (139, 150, 98), "aorta": (224, 97, 76),
    "heart": (206, 110, 84), "lung": (197, 165, 145), "bone": (241, 214, 145), "tumor": (144, 238, 144),
    "prostate": (230, 158, 140), "hippocampus": (220, 216, 20), "bladder": (222, 154, 132),
}
FALLBACK_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
                   (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0)]


def label_infos(labels: dict[int, str]) -> list[LabelInfo]:
    """Label cards for a {value: name} map: known organs get Slicer's colour, others a distinct one."""
    infos = []
    for value in sorted(labels):
        name = labels[value]
        rgb = (0, 0, 0) if value == 0 else ORGAN_COLORS.get(name.lower().replace("_", " "),
                                                            FALLBACK_COLORS[(value - 1) % len(FALLBACK_COLORS)])
        infos.append(LabelInfo(value, name, tuple(c / 255 for c in rgb)))
    return infos


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
    # A foreign recipe replayed exactly at inference instead of the steps above (issue 14): {"kind": "nnunet", ...},
    # see UNetSegmentLib/interop/nnunet_plans.py; None for UNetSegment's own models.
    preprocessing: Optional[dict[str, Any]] = None

    @property
    def out_channels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = [dict(label, color=list(label["color"])) for label in data["labels"]]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "checkpoint") -> "ModelMetadata":
        """Validated field by field (UNetSegmentLib.schema): a bad field is a MetadataError naming it."""
        from .schema import validate_metadata

        fields = validate_metadata(data, source)
        labels = [LabelInfo(*entry) for entry in fields.pop("labels")]
        normalization = Normalization(**fields.pop("normalization"))
        return cls(labels=labels, normalization=normalization, **fields)

    def validate(self, source: str = "checkpoint") -> None:
        from .schema import validate_metadata

        validate_metadata(self.to_dict(), source)
