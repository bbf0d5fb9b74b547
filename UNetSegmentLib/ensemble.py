"""Fold ensembles: several checkpoints of one recipe whose softmax outputs are averaged, as nnU-Net does.

A model is either one checkpoint file, a folder of fold checkpoints (`fold_0.pt`, `fold_1.pt`, ...),
or one file holding all folds (format "unetsegment-ensemble", written by `save_ensemble`). Folds must
agree on everything that decides what a voxel means or where it lies (labels, spacing, patch size,
architecture, channels, sampler, modality); a disagreeing fold is refused by name before anything
is computed or written. Normalisation statistics may differ (CT statistics come from each fold's own
training cases): the pipeline normalises once per member.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence, Union

from .errors import CheckpointError, InputError
from .metadata import CHECKPOINT_FORMAT_VERSION, ModelMetadata

ENSEMBLE_FORMAT = "unetsegment-ensemble"
MODEL_SUFFIX = ".pt"
# fields every fold must share; each entry: (what the user reads, how to get it from the metadata)
_AGREEMENT = (
    ("labels", lambda m: [(label.value, label.name) for label in m.labels]),
    ("target spacing", lambda m: [round(float(s), 6) for s in m.target_spacing]),
    ("patch size", lambda m: [int(p) for p in m.patch_size]),
    ("architecture", lambda m: (m.architecture, sorted((k, repr(v)) for k, v in m.architecture_kwargs.items()
                                                        if k != "deep_supervision"))),
    ("spatial dims", lambda m: m.spatial_dims),
    ("input channels", lambda m: m.in_channels),
    ("sampler", lambda m: m.sampler),
    ("modality", lambda m: m.modality),
    ("normalisation scheme", lambda m: m.normalization.scheme),
)


@dataclass
class LoadedEnsemble:
    """Members are LoadedModel instances; `metadata` is the shared card (first fold's, folds listed)."""

    members: list
    metadata: ModelMetadata
    path: Path

    @property
    def folds(self) -> list:
        return [member.metadata.training.get("fold") for member in self.members]

    @property
    def device(self):
        return self.members[0].device


def member_name(path: Path, index: int) -> str:
    return path.name if path.suffix == MODEL_SUFFIX else f"member {index} of {path.name}"


def check_agreement(metadatas: Sequence[ModelMetadata], names: Sequence[str]) -> None:
    """CheckpointError naming the first fold that disagrees with the first one, and on what."""
    if not metadatas:
        raise CheckpointError("The model set holds no checkpoints.", "Put fold_*.pt checkpoints in the folder.")
    first, first_name = metadatas[0], names[0]
    for metadata, name in zip(metadatas[1:], names[1:]):
        for what, get in _AGREEMENT:
            mine, theirs = get(metadata), get(first)
            if mine != theirs:
                raise CheckpointError(
                    f"Fold {name} disagrees with {first_name} on its {what} ({mine} vs {theirs}); the folds "
                    "cannot be averaged.",
                    f"Remove {name} from the set, or retrain it with the same recipe as the other folds.")


def ensemble_metadata(metadatas: Sequence[ModelMetadata]) -> ModelMetadata:
    """The card of the set: the first fold's, with the folds and their validation Dice listed."""
    first = metadatas[0]
    folds = [m.training.get("fold") for m in metadatas]
    per_fold = {str(m.training.get("fold", index)): dict(m.validation_dice) for index, m in enumerate(metadatas)}
    names = sorted({name for m in metadatas for name in m.validation_dice})
    mean_dice = {name: round(sum(m.validation_dice.get(name, 0.0) for m in metadatas) / len(metadatas), 4)
                 for name in names}
    training = dict(first.training, ensemble_folds=folds, validation_dice_per_fold=per_fold,
                    seconds_per_fold=[m.training.get("seconds") for m in metadatas])
    return replace(first, training=training, validation_dice=mean_dice)


def is_model_set(path: Union[str, Path]) -> bool:
    """A folder of checkpoints (the single-file form is recognised when it is opened)."""
    return Path(path).is_dir()


def member_paths(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).glob(f"*{MODEL_SUFFIX}") if not p.name.startswith("."))
    if not files:
        raise CheckpointError(f"The model folder {folder} holds no {MODEL_SUFFIX} checkpoints.",
                              "Put fold checkpoints (fold_0.pt, ...) in it, or point to a checkpoint file.")
    return files


def read_set_metadata(path: Union[str, Path]) -> ModelMetadata:
    """The card of any model path: a folder of folds, an all-folds file or one checkpoint, the folds checked
    for agreement, without torch and without building any network (the model lists use it)."""
    from .checkpoint import read_checkpoint_metadata
    from .checkpoint_record import read_record

    path = Path(path)
    if path.is_dir():
        files = member_paths(path)
        metadatas = [read_checkpoint_metadata(p) for p in files]
        names = [p.name for p in files]
    else:
        record = read_record(path)
        if not (isinstance(record, dict) and record.get("format") == ENSEMBLE_FORMAT):
            return read_checkpoint_metadata(path)
        _, names, metadatas = file_members(record, path)
    check_agreement(metadatas, names)
    return ensemble_metadata(metadatas)


def file_members(document: dict, path: Path) -> tuple[list, list[str], list[ModelMetadata]]:
    """(raw members, their names, their cards) of an all-folds file's document."""
    members = document.get("members")
    if not isinstance(members, list) or not members:
        raise CheckpointError(f"{path} is an ensemble file without members.", "Re-create it with "
                              "`python -m UNetSegmentLib pack-folds FOLD_FOLDER --output FILE`.")
    names = [member_name(path, index) for index in range(len(members))]
    metadatas = [ModelMetadata.from_dict(member.get("metadata") if isinstance(member, dict) else None,
                                         source=name) for member, name in zip(members, names)]
    return members, names, metadatas


def load_model(path: Union[str, Path], device="cpu"):
    """A LoadedModel for one checkpoint, or a LoadedEnsemble for a folder / all-folds file."""
    from .checkpoint import load_checkpoint, load_checkpoint_payload, load_payload_safely, read_checkpoint_metadata

    path = Path(path)
    if path.is_dir():
        files = member_paths(path)
        metadatas = [read_checkpoint_metadata(p) for p in files]  # agree before building any network
        check_agreement(metadatas, [p.name for p in files])
        members = [load_checkpoint(p, device=device) for p in files]
    else:
        payload = load_payload_safely(path)
        if not (isinstance(payload, dict) and payload.get("format") == ENSEMBLE_FORMAT):
            return load_checkpoint(path, device=device, payload=payload)
        raw_members, names, metadatas = file_members(payload, path)
        check_agreement(metadatas, names)
        members = [load_checkpoint_payload(member, path, device, source=name)
                   for member, name in zip(raw_members, names)]
    if len(members) == 1:
        return members[0]
    return LoadedEnsemble(members=members, metadata=ensemble_metadata([m.metadata for m in members]), path=path)


def save_ensemble(checkpoints: Sequence[Union[str, Path]], output: Union[str, Path], overwrite: bool = False) -> Path:
    """Pack fold checkpoints into one file (they are checked for agreement first; nothing is written if not)."""
    import torch

    from .checkpoint import load_payload_safely, validate_payload

    output = Path(output)
    if len(checkpoints) < 2:
        raise InputError("An ensemble needs at least two fold checkpoints.", "Pass two or more .pt files.")
    payloads, metadatas, names = [], [], []
    for checkpoint in checkpoints:
        checkpoint = Path(checkpoint)
        if checkpoint.resolve() == output.resolve():
            raise InputError(f"The output {output} is one of the inputs.", "Choose another --output.")
        payload = validate_payload(load_payload_safely(checkpoint), checkpoint)
        payloads.append(payload)
        metadatas.append(ModelMetadata.from_dict(payload["metadata"], source=str(checkpoint)))
        names.append(checkpoint.name)
    check_agreement(metadatas, names)
    if output.exists() and not overwrite:
        raise InputError(f"{output} already exists; it was not overwritten.", "Pass --overwrite or another --output.")
    document: dict[str, Any] = {"format": ENSEMBLE_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                                "members": [{"metadata": p["metadata"], "state_dict": p["state_dict"]}
                                            for p in payloads]}
    from .publish import temporary_output  # no-replace publish: a file that appeared meanwhile is kept

    with temporary_output(output, overwrite) as temp:
        torch.save(document, temp)
    return output
