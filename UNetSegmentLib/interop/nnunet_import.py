"""nnU-Net v2 results folder -> an ordinary UNetSegment checkpoint (one fold) or fold ensemble.

A results folder (`<Trainer>__<Plans>__<configuration>/`) holds dataset.json, plans.json and
fold_*/checkpoint_final.pth (or checkpoint_best.pth). Each fold's weights are mapped onto the
project's `nnunet` architecture configured from the plans, the plans' inference recipe goes into
the metadata (`preprocessing`), and the result is written atomically: a `.pt` file (one checkpoint,
or all folds in one ensemble file) or a folder of `fold_N.pt`. Every check runs before anything is
written.

nnU-Net checkpoints are read with `torch.load(weights_only=True)` and an explicit allow-list of the
plain numpy types nnU-Net stores in its training log (numpy scalars and their dtypes); any other
pickled object is refused, so importing a file never runs code from it.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import CheckpointError, InputError, MetadataError
from ..metadata import LabelInfo, ModelMetadata, Normalization, canonical_modality, label_infos
from ..schema import Checker, validate_state_dict
from . import nnunet_plans

CHECKPOINT_NAMES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
_FOLD = re.compile(r"^fold_(\d+|all)$")


@dataclass
class Fold:
    name: str  # "0", "1", ... or "all"
    path: Path
    payload: dict


MAX_JSON_BYTES = 64 * 2 ** 20  # nnU-Net writes a few KB (plans) to a few MB (dataset.json with file lists)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}; it is not an nnU-Net v2 results folder.",
                              f"Point to the folder that holds {path.name}, plans.json and fold_*/ (e.g. "
                              "nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres).")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {size / 2 ** 20:.0f} MB; nnU-Net's {path.name} is a few KB.",
                                  f"Restore {what} from nnU-Net's output.")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).", f"Restore {what} from nnU-Net's output.") \
            from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.", f"Restore {what} from nnU-Net's output.")
    return data


def _allowed_globals() -> list:
    """The plain (data-only) types nnU-Net checkpoints hold besides tensors and containers."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1 (Slicer may ship either)
    scalar = core.multiarray.scalar
    allowed: list = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                     np.dtype]
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                 "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType"):
        if hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


def load_nnunet_checkpoint(path: Path) -> dict:
    """The checkpoint as plain data; a file that would run code when unpickled is refused by name."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found or re.search(r"[Uu]nsupported global|REDUCE|BUILD|is blocked", str(error)):
            what = f"a pickled {found.group(1)} object" if found else "a pickled object that is not plain data"
            raise CheckpointError(f"{path} was refused: it holds {what}; loading it would run code from the file.",
                                  "Import only checkpoints written by nnU-Net itself (weights, numbers and plain "
                                  "containers), or re-save the weights alone with torch.save(state_dict).") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt).",
                              "Copy the fold's checkpoint again from the machine that trained it.") from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for damaged files
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first}).",
                              "Copy the fold's checkpoint again from the machine that trained it.") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("network_weights"), dict) \
            or not payload["network_weights"]:
        raise CheckpointError(f"{path} holds no 'network_weights'; it is not an nnU-Net v2 checkpoint.",
                              "Point to nnU-Net's fold_*/checkpoint_final.pth files.")
    validate_state_dict(payload["network_weights"], path, "network_weights",
                        "Copy the fold's checkpoint again from the machine that trained it.")
    return payload


def find_folds(folder: Path, folds: Optional[Sequence[str]], checkpoint: str) -> list[tuple[str, Path]]:
    """(fold name, checkpoint path) for the requested folds (default: every fold folder with the file)."""
    if checkpoint not in CHECKPOINT_NAMES:
        raise InputError(f"Unknown checkpoint kind '{checkpoint}'.", "Use 'final' or 'best'.")
    file_name = CHECKPOINT_NAMES[checkpoint]
    present = {}
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _FOLD.match(child.name)
        if match and child.is_dir():
            present[match.group(1)] = child / file_name
    if folds:
        missing = [f for f in folds if f not in present or not present[f].is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks {', '.join(f'fold_{m}/{file_name}' for m in missing)}.",
                                  "Import the folds that finished training (--folds), or use --checkpoint best.")
        return [(f, present[f]) for f in folds]
    found = [(name, path) for name, path in present.items() if path.is_file()]
    found.sort(key=lambda item: (item[0] == "all", int(item[0]) if item[0].isdigit() else 0))
    if len(found) > 1 and any(name == "all" for name, _ in found):
        found = [item for item in found if item[0] != "all"]  # nnU-Net's predictor skips fold_all by default too
    if not found:
        raise CheckpointError(f"{folder} has no fold_*/{file_name}.",
                              "Point to a results folder whose folds finished training, or use --checkpoint best.")
    return found


def _translate(key: str, encoder: str, levels: int) -> Optional[str]:
    """nnU-Net (dynamic-network-architectures) parameter name -> the `nnunet` architecture's name."""
    rules = [
        (r"decoder\.transpconvs\.(\d+)\.(\w+)$", lambda m: f"decoder.upsamplers.{m[1]}.0.{m[2]}"),
        (r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(\w+)$",
         lambda m: f"decoder.stages.{m[1]}.{m[2]}.{m[3]}.{m[4]}"),
        (r"decoder\.seg_layers\.(\d+)\.(\w+)$", lambda m: f"heads.{levels - 2 - int(m[1])}.0.{m[2]}"),
    ]
    if encoder == "plain":
        rules.append((r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(\w+)$",
                      lambda m: f"encoder.stages.{m[1]}.{m[2]}.{m[3]}.{m[4]}"))
    else:
        def block(m):
            return int(m[2]) + (1 if m[1] == "0" else 0)  # the stem is unit 0 of our first stage
        rules += [
            (r"encoder\.stem\.convs\.0\.(conv|norm)\.(\w+)$", lambda m: f"encoder.stages.0.0.{m[1]}.{m[2]}"),
            (r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.(conv1|conv2)\.(conv|norm)\.(\w+)$",
             lambda m: f"encoder.stages.{m[1]}.{block(m)}.{m[3]}.{m[4]}.{m[5]}"),
            (r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(\d+)\.(conv|norm)\.(\w+)$",
             lambda m: f"encoder.stages.{m[1]}.{block(m)}.shortcut.{m[3]}.{m[4]}.{m[5]}"),
        ]
    for pattern, target in rules:
        match = re.match(pattern, key)
        if match:
            return target(match)
    return None


def convert_weights(weights: dict, network, encoder: str, source: str) -> dict:
    """nnU-Net state_dict -> a state_dict that `network` loads strictly (shapes checked)."""
    import torch

    own = network.state_dict()
    converted = {}
    for key, value in weights.items():
        if key.startswith("decoder.encoder.") or ".all_modules." in key:
            continue  # the same tensors under a second name (nnU-Net registers these modules twice)
        target = _translate(key, encoder, network.levels)
        if target is None or target not in own:
            raise CheckpointError(f"{source}: weight '{key}' has no place in the {encoder} nnU-Net network the "
                                  "plans describe.", "The checkpoint and plans.json come from different models; "
                                  "copy the results folder again as nnU-Net wrote it.")
        converted[target] = value.detach().to("cpu", torch.float32) if value.is_floating_point() else value
    for level in range(network.levels - 1):  # nnU-Net concatenates (upsampled, skip); we concatenate (skip, up)
        key = f"decoder.stages.{level}.0.conv.weight"
        if key in converted:
            weight = converted[key]
            half = weight.shape[1] // 2
            converted[key] = torch.cat([weight[:, half:], weight[:, :half]], dim=1).contiguous()
    missing = sorted(set(own) - set(converted))
    wrong = [k for k in own if k in converted and tuple(own[k].shape) != tuple(converted[k].shape)]
    if missing or wrong:
        detail = f"{len(missing)} missing (e.g. {missing[0]})" if missing else \
            f"{wrong[0]}: stored {tuple(converted[wrong[0]].shape)}, plans {tuple(own[wrong[0]].shape)}"
        raise CheckpointError(f"{source}: weights do not match the network in plans.json ({detail}).",
                              "The checkpoint and plans.json come from different models; copy the results "
                              "folder again as nnU-Net wrote it.")
    return converted


def _label_infos(pairs: list[tuple[int, str]]) -> list[LabelInfo]:
    return label_infos({value: name for value, name in pairs})  # Slicer GenericAnatomyColors where known


def _target_spacing_xyz(plans: dict, recipe: dict, source: str) -> list[float]:
    """Plans spacing (transposed array order) -> SimpleITK (x, y, z); 2D configs take z from the median."""
    spacing = list(recipe["spacing"])
    if len(spacing) == 2:
        spacing = [nnunet_plans.median_spacing(plans, source)[0]] + spacing
    backward = recipe["transpose_backward"]
    array_order = [spacing[a] for a in backward]
    return [float(s) for s in reversed(array_order)]


def _checkpoint_fields(payload: dict, folder: Path, path: Path) -> tuple[str, str, list, Any]:
    """Trainer, configuration, mirroring axes and epoch of an nnU-Net checkpoint, type-checked."""
    check = Checker(str(path), MetadataError, "Copy the fold's checkpoint again as nnU-Net wrote it.")
    trainer = check.string("trainer_name", payload.get("trainer_name", ""))
    init_args = payload.get("init_args") if isinstance(payload.get("init_args"), dict) else {}
    configuration = init_args.get("configuration") or folder.name.rsplit("__", 1)[-1]
    check.string("init_args.configuration", configuration, non_empty=True)
    axes = payload.get("inference_allowed_mirroring_axes") or []
    axes = [check.integer(f"inference_allowed_mirroring_axes[{i}]", a, 0, 2)
            for i, a in enumerate(check.sequence("inference_allowed_mirroring_axes", axes, maximum=3))]
    epoch = payload.get("current_epoch")
    if epoch is not None:
        epoch = check.integer("current_epoch", epoch, 0)
    return trainer, configuration, axes, epoch


def _build_with_weights(kwargs: dict, spatial_dims: int, classes: int, weights: dict, path: Path, plans_source: str):
    """The plans' network holding the fold's weights. It is first built on torch's meta device (nothing
    allocated) and matched against the weights, so the real network is never larger than the checkpoint
    already read; a plans file that describes a 60000-feature network fails here, not in the allocator."""
    import torch

    from ..networks import build_network

    def build():
        return build_network("nnunet", spatial_dims, 1, classes, **kwargs)

    try:
        with torch.device("meta"):
            skeleton = build()
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{plans_source}: the network it describes cannot be built "
                              f"({str(error).splitlines()[0] if str(error) else type(error).__name__}).",
                              nnunet_plans.PLANS_FIX) from None
    # refuses any name or shape the plans do not have; the converted tensors then load into the real network
    state = convert_weights(weights, skeleton, kwargs["encoder"], str(path))
    network = build()
    network.load_state_dict(state, strict=True)
    return network.eval()


def build_members(folder, folds: Optional[Sequence[str]] = None, checkpoint: str = "final",
                  allow_trainers: Sequence[str] = ()) -> list[tuple[Any, ModelMetadata, str]]:
    """(network with imported weights, metadata, fold name) per fold; validates everything, writes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.", "Point to an nnU-Net v2 results folder "
                         "(<Trainer>__<Plans>__<configuration>).")
    dataset_source, plans_source = str(folder / "dataset.json"), str(folder / "plans.json")
    dataset = _read_json(folder / "dataset.json", "dataset.json")
    plans = _read_json(folder / "plans.json", "plans.json")
    fold_files = find_folds(folder, [str(f) for f in folds] if folds else None, checkpoint)
    pairs = nnunet_plans.labels_from_dataset(dataset, dataset_source)
    channels = nnunet_plans.channel_names(dataset, dataset_source)
    if len(channels) != 1:
        raise CheckpointError(f"{dataset_source} lists {len(channels)} input channels; UNetSegment "
                              "segments single-channel volumes.", "Import a single-channel (one modality) model.")
    text = Checker(plans_source, MetadataError, nnunet_plans.PLANS_FIX)
    names = {key: text.string(key, plans.get(key) or "") for key in ("dataset_name", "plans_name")}
    members, first = [], None
    for fold, path in fold_files:
        payload = load_nnunet_checkpoint(path)
        trainer, configuration, mirror_axes, epoch = _checkpoint_fields(payload, folder, path)
        signature = (trainer, configuration, tuple(mirror_axes))
        if first is None:
            first = (fold, signature)
        elif signature != first[1]:
            raise CheckpointError(
                f"Fold {fold} disagrees with fold {first[0]} (trainer, configuration or mirroring: {signature} vs "
                f"{first[1]}); the folds cannot be averaged.",
                f"Import the folds separately (--folds {first[0]} / --folds {fold}), or retrain fold {fold}.")
        nnunet_plans.check_trainer(trainer, tuple(allow_trainers), str(path))
        if configuration not in nnunet_plans.CONFIGURATIONS:
            raise CheckpointError(f"{path} is a '{configuration}' model; the importer supports "
                                  f"{' and '.join(nnunet_plans.CONFIGURATIONS)} (cascades need their first stage).",
                                  "Import the 3d_fullres or 2d results folder of the dataset.")
        config = nnunet_plans.resolve_configuration(plans, configuration, plans_source)
        if config.get("previous_stage_name"):
            raise CheckpointError(f"{path} is a cascade stage ({configuration} after "
                                  f"{config['previous_stage_name']}).", "Import the 3d_fullres configuration.")
        spatial_dims = len(config["patch_size"])
        kwargs = nnunet_plans.network_kwargs(config, spatial_dims, plans_source,
                                             f"configurations.{configuration}.architecture")
        recipe = nnunet_plans.recipe(plans, configuration, config, mirror_axes, plans_source)
        network = _build_with_weights(kwargs, spatial_dims, len(pairs), payload["network_weights"], path,
                                      plans_source)
        scheme = recipe["normalization_schemes"][0]
        properties = recipe["foreground_intensity_properties"].get("0", {})
        normalization = Normalization(scheme="ct", clip_low=properties.get("percentile_00_5"),
                                      clip_high=properties.get("percentile_99_5"), mean=properties.get("mean"),
                                      std=properties.get("std")) if scheme == "CTNormalization" else Normalization()
        metadata = ModelMetadata(
            architecture="nnunet", architecture_kwargs=network.config["kwargs"], spatial_dims=spatial_dims,
            in_channels=1, labels=_label_infos(pairs), patch_size=list(config["patch_size"]),
            target_spacing=_target_spacing_xyz(plans, recipe, plans_source), normalization=normalization,
            modality=canonical_modality(channels[0]),
            training={"source": "nnU-Net v2", "trainer": trainer, "plans": names["plans_name"],
                      "configuration": configuration, "dataset": names["dataset_name"],
                      "fold": int(fold) if fold.isdigit() else fold, "epochs": epoch,
                      "checkpoint": path.name},
            description=f"nnU-Net v2 {configuration} model of {names['dataset_name']} ({trainer}, fold {fold}), "
                        "imported by UNetSegment.",
            preprocessing=recipe)
        metadata.validate(str(path))
        members.append((network, metadata, fold))
    return members


def import_results_folder(folder, output, folds: Optional[Sequence[str]] = None, checkpoint: str = "final",
                          overwrite: bool = False, allow_trainers: Sequence[str] = ()) -> Path:
    """Write the imported model: `output` ending in .pt -> one file (an ensemble file for several folds);
    otherwise a folder of fold_N.pt. Nothing is written when any check fails."""
    from ..checkpoint import save_checkpoint
    from ..ensemble import save_ensemble
    from ..publish import already_exists_error, exists_or_link, publish, publish_folder

    output = Path(output)
    if exists_or_link(output) and not overwrite:
        raise already_exists_error(output)
    members = build_members(folder, folds, checkpoint, allow_trainers)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        files = [save_checkpoint(staging / f"fold_{fold}.pt", network, metadata)
                 for network, metadata, fold in members]
        if output.suffix == ".pt":
            if len(files) == 1:
                publish(files[0], output, overwrite)
            else:
                save_ensemble(files, output, overwrite=overwrite)
        else:
            publish_folder(staging, output, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output
