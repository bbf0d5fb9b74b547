"""nnU-Net v2 plans and dataset.json -> the project's `nnunet` architecture and a replayable recipe.

Torch- and numpy-free: the schema validates the recipe record of a checkpoint with it, and the
Slicer panel can inspect a results folder before PyTorch is installed.

The recipe record (ModelMetadata.preprocessing, plain JSON types) holds everything nnUNetPredictor
takes from the plans at inference: axis transposes, target spacing, normalisation per channel with
the foreground intensity properties, resampling orders, mirroring axes and the tile step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import CheckpointError, InputError

RECIPE_KIND = "nnunet"
RECIPE_VERSION = 1
CONFIGURATIONS = ("2d", "3d_fullres")
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization")
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape",)
NETWORKS = {"PlainConvUNet": "plain", "ResidualEncoderUNet": "residual"}
READERS = ("SimpleITKIO",)
# Trainers that build the plans' network unchanged (they differ in epochs, augmentation, loss or optimiser).
TRAINER_PATTERN = re.compile(
    r"^nnUNetTrainer(_\d+epochs|_\d+epochs_NoMirroring|NoMirroring|_onlyMirror01|NoDeepSupervision|_DA5|DA5|"
    r"_DASegOrd0|_noDummy2DDA|NoDA|_NoDA|Adam\w*|_Adam\w*|_probabilisticOversampling\w*|BN|_BN|_\d+epochs_BN)?$")


def _fail(source: str, problem: str, fix: str) -> None:
    raise CheckpointError(f"{source}: {problem}", fix)


def is_results_folder(folder) -> bool:
    """An nnU-Net v2 results folder (<Trainer>__<Plans>__<configuration>) has its plans and dataset.json."""
    folder = Path(folder)
    return (folder / "plans.json").is_file() and (folder / "dataset.json").is_file()


def check_results_folder(folder) -> Path:
    """The folder, if it is an nnU-Net v2 results folder; else the one message every front door shows."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder{'' if folder.exists() else ' (it does not exist)'}.",
                         "Pick an nnU-Net v2 results folder: nnUNet_results/DatasetXXX_Name/"
                         "<Trainer>__<Plans>__<configuration>.")
    if not is_results_folder(folder):
        raise InputError(f"{folder} has no plans.json and dataset.json, so it is not an nnU-Net v2 results folder.",
                         "Pick a checkpoint file (.pt), or the folder nnUNet_results/DatasetXXX_Name/"
                         "<Trainer>__<Plans>__<configuration> (it holds fold_0/, fold_1/, ...).")
    return folder


def default_model_name(folder) -> str:
    """`Dataset004_Hippocampus_3d_fullres` for nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres."""
    folder = Path(folder).absolute()
    configuration = folder.name.rsplit("__", 1)[-1]
    dataset = folder.parent.name if folder.parent.name.lower().startswith("dataset") else ""
    name = "_".join(part for part in (dataset, configuration) if part) or "nnunet_model"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "nnunet_model"


def resolve_configuration(plans: dict, name: str, source: str = "plans.json") -> dict:
    """The configuration dict with `inherits_from` applied (as nnU-Net's PlansManager)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        available = ", ".join(sorted(configurations)) if isinstance(configurations, dict) else "none"
        _fail(source, f"has no configuration '{name}' (it has: {available}).",
              "Point to the results folder of a 2d or 3d_fullres configuration.")
    seen = []
    config = dict(configurations[name])
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configurations:
            _fail(source, f"configuration '{name}' inherits from unknown or circular '{parent}'.",
                  "Repair plans.json (copy it again from nnUNet_preprocessed).")
        seen.append(parent)
        merged = dict(configurations[parent])
        merged.update(config)
        config = merged
    return config


def labels_from_dataset(dataset: dict, source: str = "dataset.json") -> list[tuple[int, str]]:
    """(value, name) of every output channel, background first; ignore labels dropped, regions refused."""
    labels = dataset.get("labels") if isinstance(dataset, dict) else None
    if not isinstance(labels, dict) or not labels:
        _fail(source, "has no 'labels' mapping.", 'It must hold e.g. "labels": {"background": 0, "liver": 1}.')
    pairs = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            _fail(source, f"label '{name}' is a region ({list(value)}): region-based nnU-Net models are not "
                  "supported.", "Import a model trained on plain labels (one output channel per label).")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(source, f"label '{name}' has value {value!r}; nnU-Net label values are integers >= 0.",
                  "Repair dataset.json in the results folder.")
        if str(name).lower() == "ignore":
            continue  # nnU-Net has no output channel for its ignore label
        pairs.append((int(value), str(name)))
    pairs.sort()
    if [value for value, _ in pairs] != list(range(len(pairs))) or len(pairs) < 2:
        _fail(source, f"label values {[v for v, _ in pairs]} are not 0..N-1 with a background 0 and a foreground "
              "label.", "nnU-Net requires consecutive labels; repair dataset.json.")
    return pairs


def channel_names(dataset: dict) -> list[str]:
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    return [str(channels[key]) for key in sorted(channels, key=lambda k: int(k))] if isinstance(channels, dict) else []


def _last_name(dotted: Any) -> str:
    return str(dotted).rsplit(".", 1)[-1] if dotted is not None else ""


def network_kwargs(config: dict, spatial_dims: int, source: str = "plans.json") -> dict:
    """The `nnunet` architecture's keyword arguments for this configuration; refuses what it cannot express."""
    architecture = config.get("architecture")
    if not isinstance(architecture, dict):
        _fail(source, "configuration has no 'architecture' (plans from nnU-Net before v2.4 are not supported).",
              "Re-plan the dataset with a current nnU-Net v2, or import a newer results folder.")
    class_name = _last_name(architecture.get("network_class_name"))
    if class_name not in NETWORKS:
        _fail(source, f"network class '{architecture.get('network_class_name')}' is not supported.",
              f"Import a model of nnU-Net's default networks ({', '.join(NETWORKS)}).")
    kwargs = architecture.get("arch_kwargs") or {}
    expected_conv = f"Conv{spatial_dims}d"
    checks = [
        (_last_name(kwargs.get("conv_op")) == expected_conv, f"conv_op {kwargs.get('conv_op')}"),
        (_last_name(kwargs.get("norm_op")) in (f"InstanceNorm{spatial_dims}d", f"BatchNorm{spatial_dims}d"),
         f"norm_op {kwargs.get('norm_op')}"),
        (abs(float((kwargs.get("norm_op_kwargs") or {}).get("eps", 1e-5)) - 1e-5) < 1e-12
         and (kwargs.get("norm_op_kwargs") or {}).get("affine", True) is True, "norm_op_kwargs"),
        (kwargs.get("dropout_op") is None, f"dropout_op {kwargs.get('dropout_op')}"),
        (_last_name(kwargs.get("nonlin")) in ("LeakyReLU", "ReLU"), f"nonlin {kwargs.get('nonlin')}"),
        (float((kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 0.01)) == 0.01, "nonlin_kwargs"),
        (not kwargs.get("nonlin_first", False), "nonlin_first"),
        (kwargs.get("block") in (None, "BasicBlockD") or _last_name(kwargs.get("block")) == "BasicBlockD",
         f"block {kwargs.get('block')}"),
        (kwargs.get("bottleneck_channels") is None, "bottleneck_channels"),
        (kwargs.get("stem_channels") in (None, (kwargs.get("features_per_stage") or [None])[0]), "stem_channels"),
        (not kwargs.get("squeeze_excitation", False) and not kwargs.get("stochastic_depth_p", 0.0), "block options"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        _fail(source, f"{class_name} uses settings the importer cannot reproduce ({', '.join(bad)}).",
              "Import a model with nnU-Net's default network settings.")
    per_stage = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
    try:
        stages = int(kwargs["n_stages"])
        result = {
            "features_per_stage": [int(f) for f in kwargs["features_per_stage"]],
            "kernel_sizes": [[int(k) for k in ks] for ks in kwargs["kernel_sizes"]],
            "strides": [[int(s) for s in ss] for ss in kwargs["strides"]],
            "n_conv_per_stage": [int(n) for n in kwargs[per_stage]],
            "n_conv_per_stage_decoder": [int(n) for n in kwargs["n_conv_per_stage_decoder"]],
        }
    except (KeyError, TypeError, ValueError) as error:
        _fail(source, f"architecture arguments are incomplete ({error}).", "Repair plans.json.")
    if any(len(v) != stages for k, v in result.items() if k != "n_conv_per_stage_decoder") or \
            len(result["n_conv_per_stage_decoder"]) != stages - 1:
        _fail(source, f"architecture lists do not all have {stages} stages.", "Repair plans.json.")
    result.update(features=result["features_per_stage"][0], levels=stages,
                  norm="batch" if _last_name(kwargs.get("norm_op")).startswith("BatchNorm") else "instance",
                  act="leaky_relu" if _last_name(kwargs.get("nonlin")) == "LeakyReLU" else "relu",
                  encoder=NETWORKS[class_name], conv_bias=bool(kwargs.get("conv_bias", False)))
    return result


def check_trainer(name: str, allowed: tuple = (), source: str = "checkpoint") -> None:
    if TRAINER_PATTERN.match(str(name)) or name in allowed:
        return
    _fail(source, f"was trained with trainer '{name}', which may build another network than the plans describe.",
          f"If {name} uses the plans' network unchanged, import with --allow-trainer {name}.")


def recipe(plans: dict, configuration: str, config: dict, mirror_axes, source: str = "plans.json") -> dict:
    """The replay record for ModelMetadata.preprocessing."""
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in READERS:
        _fail(source, f"was planned with image reader '{reader}'; only SimpleITKIO models are supported (others "
              "order the array axes differently).", "Import a model planned with nnU-Net's default reader.")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key) not in RESAMPLING_FUNCTIONS:
            _fail(source, f"uses {key} '{config.get(key)}', which is not supported.",
                  "Import a model planned with nnU-Net's default resampling (resample_data_or_seg_to_shape).")

    def resampling(kwargs: Any) -> dict:
        kwargs = kwargs or {}
        return {"order": int(kwargs.get("order", 3)), "order_z": int(kwargs.get("order_z", 0)),
                "force_separate_z": kwargs.get("force_separate_z"),
                "separate_z_anisotropy_threshold": float(kwargs.get("separate_z_anisotropy_threshold", 3.0))}

    properties = plans.get("foreground_intensity_properties_per_channel") or {}
    record = {
        "kind": RECIPE_KIND, "version": RECIPE_VERSION, "configuration": configuration,
        "transpose_forward": [int(a) for a in plans.get("transpose_forward", [0, 1, 2])],
        "transpose_backward": [int(a) for a in plans.get("transpose_backward", [0, 1, 2])],
        "spacing": [float(s) for s in config["spacing"]],
        "normalization_schemes": [str(s) for s in config["normalization_schemes"]],
        "use_mask_for_norm": [bool(u) for u in config["use_mask_for_norm"]],
        "foreground_intensity_properties": {
            str(channel): {key: float(values[key]) for key in ("mean", "std", "percentile_00_5", "percentile_99_5")
                           if key in values} for channel, values in properties.items()},
        "resampling_data": resampling(config.get("resampling_fn_data_kwargs")),
        "resampling_probabilities": resampling(config.get("resampling_fn_probabilities_kwargs")),
        "mirror_axes": [int(a) for a in (mirror_axes or [])],
        "tile_step_size": 0.5,
    }
    return validate_recipe(record, lambda problem, fix: _fail(source, problem, fix))


def validate_recipe(record: Any, fail: Callable[[str, str], None]) -> dict:
    """The recipe record checked field by field; `fail(problem, fix)` must raise."""
    fix = "Re-import the nnU-Net results folder with `python -m UNetSegmentLib import-nnunet`."
    if not isinstance(record, dict) or record.get("kind") != RECIPE_KIND:
        fail(f"preprocessing kind {record.get('kind') if isinstance(record, dict) else record!r} is unknown "
             f"(supported: '{RECIPE_KIND}').", fix)
    if record.get("version") != RECIPE_VERSION:
        fail(f"nnU-Net recipe version {record.get('version')!r} is not {RECIPE_VERSION}.", "Update UNetSegment.")

    def axes(key: str, length: Optional[int] = None) -> list:
        value = record.get(key)
        if not isinstance(value, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in value) \
                or (length is not None and sorted(value) != list(range(length))):
            fail(f"preprocessing.{key} must be {'a permutation of 0..' + str(length - 1) if length else 'axes'}, "
                 f"got {value!r}.", fix)
        return value

    axes("transpose_forward", 3)
    axes("transpose_backward", 3)
    mirror = axes("mirror_axes")
    spacing = record.get("spacing")
    if not isinstance(spacing, list) or len(spacing) not in (2, 3) or \
            not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing):
        fail(f"preprocessing.spacing must be 2 or 3 positive numbers, got {spacing!r}.", fix)
    if any(a < 0 or a >= len(spacing) for a in mirror):
        fail(f"preprocessing.mirror_axes {mirror} do not fit a {len(spacing)}D model.", fix)
    schemes = record.get("normalization_schemes")
    masks = record.get("use_mask_for_norm")
    if not isinstance(schemes, list) or not schemes or any(s not in NORMALIZATIONS for s in schemes):
        fail(f"preprocessing.normalization_schemes {schemes!r} must name supported schemes "
             f"({', '.join(NORMALIZATIONS)}).", fix)
    if not isinstance(masks, list) or len(masks) != len(schemes) or not all(isinstance(m, bool) for m in masks):
        fail(f"preprocessing.use_mask_for_norm {masks!r} must be one true/false per channel.", fix)
    properties = record.get("foreground_intensity_properties")
    if not isinstance(properties, dict):
        fail("preprocessing.foreground_intensity_properties must be an object.", fix)
    for channel, scheme in enumerate(schemes):
        if scheme == "CTNormalization":
            values = properties.get(str(channel)) if isinstance(properties, dict) else None
            keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
            if not isinstance(values, dict) or not all(isinstance(values.get(k), (int, float))
                                                       and not isinstance(values.get(k), bool) for k in keys):
                fail(f"CT normalisation of channel {channel} lacks its foreground intensity properties "
                     f"({', '.join(keys)}).", fix)
    for key in ("resampling_data", "resampling_probabilities"):
        value = record.get(key)
        ok = isinstance(value, dict) and all(isinstance(value.get(k), int) and 0 <= value.get(k) <= 5
                                             for k in ("order", "order_z")) \
            and value.get("force_separate_z") in (None, True, False) \
            and isinstance(value.get("separate_z_anisotropy_threshold"), (int, float))
        if not ok:
            fail(f"preprocessing.{key} must hold order, order_z (0..5), force_separate_z and "
                 f"separate_z_anisotropy_threshold, got {value!r}.", fix)
    step = record.get("tile_step_size")
    if not isinstance(step, (int, float)) or not 0 < step <= 1:
        fail(f"preprocessing.tile_step_size must be in (0, 1], got {step!r}.", fix)
    return dict(record)
