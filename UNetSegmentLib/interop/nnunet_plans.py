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

from ..errors import CheckpointError, InputError, MetadataError
from ..schema import MAX_CHANNELS, MAX_PATCH, Checker

RECIPE_KIND = "nnunet"
RECIPE_VERSION = 1
CONFIGURATIONS = ("2d", "3d_fullres")
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization")
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape",)
NETWORKS = {"PlainConvUNet": "plain", "ResidualEncoderUNet": "residual"}
READERS = ("SimpleITKIO",)
# Bounds far above any planned nnU-Net network (<= 8 stages, <= 512 features, kernels 1/3, strides 1/2): a plans
# file beyond them is damaged or hostile, and is refused before a network is built from it.
MAX_STAGES = 12
MAX_FEATURES = 4096
MAX_KERNEL = 15
MAX_STRIDE = 16
MAX_CONVS = 32
PLANS_FIX = "Copy plans.json again from the nnU-Net results folder, as nnU-Net wrote it."
# Trainers that build the plans' network unchanged (they differ in epochs, augmentation, loss or optimiser).
TRAINER_PATTERN = re.compile(
    r"^nnUNetTrainer(_\d+epochs|_\d+epochs_NoMirroring|NoMirroring|_onlyMirror01|NoDeepSupervision|_DA5|DA5|"
    r"_DASegOrd0|_noDummy2DDA|NoDA|_NoDA|Adam\w*|_Adam\w*|_probabilisticOversampling\w*|BN|_BN|_\d+epochs_BN)?$")


def _fail(source: str, problem: str, fix: str) -> None:
    raise CheckpointError(f"{source}: {problem}", fix)


def _checker(source: str) -> Checker:
    """Field errors name the file and the JSON path (`configurations.3d_fullres.patch_size[1]`)."""
    return Checker(source, MetadataError, PLANS_FIX)


def _optional_mapping(check: Checker, field: str, value: Any) -> dict:
    return {} if value is None else check.mapping(field, value)


def _integers(check: Checker, field: str, value: Any, length: Optional[int], low: int, high: int,
              minimum: int = 0, maximum: Optional[int] = None) -> list[int]:
    items = check.sequence(field, value, length=length, minimum=minimum, maximum=maximum)
    return [check.integer(f"{field}[{index}]", item, low, high) for index, item in enumerate(items)]


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
    """The configuration with `inherits_from` applied (as nnU-Net's PlansManager), every field the importer
    reads checked for type and range; the architecture is checked by `network_kwargs`."""
    check = _checker(source)
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        available = ", ".join(sorted(map(str, configurations))) if isinstance(configurations, dict) else "none"
        _fail(source, f"has no configuration '{name}' (it has: {available}).",
              "Point to the results folder of a 2d or 3d_fullres configuration.")
    seen = []
    config = dict(check.mapping(f"configurations.{name}", configurations[name]))
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if not isinstance(parent, str) or parent in seen or parent not in configurations:
            _fail(source, f"configuration '{name}' inherits from unknown or circular {parent!r}.", PLANS_FIX)
        seen.append(parent)
        merged = dict(check.mapping(f"configurations.{parent}", configurations[parent]))
        merged.update(config)
        config = merged
    where = f"configurations.{name}"
    patch = _integers(check, f"{where}.patch_size", config.get("patch_size"), None, 1, MAX_PATCH, 2, 3)
    spacing = check.sequence(f"{where}.spacing", config.get("spacing"), length=len(patch))
    schemes = check.sequence(f"{where}.normalization_schemes", config.get("normalization_schemes"), minimum=1,
                             maximum=MAX_CHANNELS)
    masks = check.sequence(f"{where}.use_mask_for_norm", config.get("use_mask_for_norm"), length=len(schemes))
    config.update(
        patch_size=patch,
        spacing=[check.number(f"{where}.spacing[{i}]", value, positive=True) for i, value in enumerate(spacing)],
        normalization_schemes=[check.string(f"{where}.normalization_schemes[{i}]", value, NORMALIZATIONS)
                               for i, value in enumerate(schemes)],
        use_mask_for_norm=[check.boolean(f"{where}.use_mask_for_norm[{i}]", value) for i, value in enumerate(masks)])
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        check.string(f"{where}.{key}", config.get(key), RESAMPLING_FUNCTIONS,
                     fix="Import a model planned with nnU-Net's default resampling (resample_data_or_seg_to_shape).")
        arguments = _optional_mapping(check, f"{where}.{key}_kwargs", config.get(f"{key}_kwargs"))
        config[f"{key}_kwargs"] = {
            "order": check.integer(f"{where}.{key}_kwargs.order", arguments.get("order", 3), 0, 5),
            "order_z": check.integer(f"{where}.{key}_kwargs.order_z", arguments.get("order_z", 0), 0, 5),
            "force_separate_z": None if arguments.get("force_separate_z") is None else
            check.boolean(f"{where}.{key}_kwargs.force_separate_z", arguments["force_separate_z"]),
            "separate_z_anisotropy_threshold": check.number(
                f"{where}.{key}_kwargs.separate_z_anisotropy_threshold",
                arguments.get("separate_z_anisotropy_threshold", 3.0), positive=True)}
    if config.get("previous_stage_name") is not None:
        check.string(f"{where}.previous_stage_name", config["previous_stage_name"])
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


def channel_names(dataset: dict, source: str = "dataset.json") -> list[str]:
    """Input channel names in channel order ("0", "1", ... keys; "modality" in older files)."""
    key = "modality" if "modality" in dataset and "channel_names" not in dataset else "channel_names"
    check = Checker(source, MetadataError, "Repair dataset.json in the results folder.")
    channels = check.mapping(key, dataset.get(key))
    for name, value in channels.items():
        if not str(name).isdigit() or len(str(name)) > 3:
            check.fail(f"{key}", 'an object keyed by channel number ("0", "1", ...)', name)
        check.string(f"{key}.{name}", value, non_empty=True)
    return [channels[name] for name in sorted(channels, key=int)]


def _last_name(dotted: Any) -> str:
    return str(dotted).rsplit(".", 1)[-1] if dotted is not None else ""


def network_kwargs(config: dict, spatial_dims: int, source: str = "plans.json", where: str = "architecture") -> dict:
    """The `nnunet` architecture's keyword arguments for this configuration; refuses what it cannot express
    and, field by field, what no nnU-Net planner writes (so nothing is built from a damaged file)."""
    architecture = config.get("architecture")
    if not isinstance(architecture, dict):
        _fail(source, "configuration has no 'architecture' (plans from nnU-Net before v2.4 are not supported).",
              "Re-plan the dataset with a current nnU-Net v2, or import a newer results folder.")
    class_name = _last_name(architecture.get("network_class_name"))
    if class_name not in NETWORKS:
        _fail(source, f"network class '{architecture.get('network_class_name')}' is not supported.",
              f"Import a model of nnU-Net's default networks ({', '.join(NETWORKS)}).")
    check = _checker(source)
    field = f"{where}.arch_kwargs"
    kwargs = _optional_mapping(check, field, architecture.get("arch_kwargs"))
    norm_kwargs = _optional_mapping(check, f"{field}.norm_op_kwargs", kwargs.get("norm_op_kwargs"))
    nonlin_kwargs = _optional_mapping(check, f"{field}.nonlin_kwargs", kwargs.get("nonlin_kwargs"))
    expected_conv = f"Conv{spatial_dims}d"
    checks = [
        (_last_name(kwargs.get("conv_op")) == expected_conv, f"conv_op {kwargs.get('conv_op')}"),
        (_last_name(kwargs.get("norm_op")) in (f"InstanceNorm{spatial_dims}d", f"BatchNorm{spatial_dims}d"),
         f"norm_op {kwargs.get('norm_op')}"),
        (norm_kwargs.get("eps", 1e-5) == 1e-5 and norm_kwargs.get("affine", True) is True, "norm_op_kwargs"),
        (kwargs.get("dropout_op") is None, f"dropout_op {kwargs.get('dropout_op')}"),
        (_last_name(kwargs.get("nonlin")) in ("LeakyReLU", "ReLU"), f"nonlin {kwargs.get('nonlin')}"),
        (nonlin_kwargs.get("negative_slope", 0.01) == 0.01, "nonlin_kwargs"),
        (kwargs.get("nonlin_first", False) is False, "nonlin_first"),
        (kwargs.get("block") in (None, "BasicBlockD") or _last_name(kwargs.get("block")) == "BasicBlockD",
         f"block {kwargs.get('block')}"),
        (kwargs.get("bottleneck_channels") is None, "bottleneck_channels"),
        (kwargs.get("squeeze_excitation", False) is False and not kwargs.get("stochastic_depth_p", 0.0),
         "block options"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        _fail(source, f"{class_name} uses settings the importer cannot reproduce ({', '.join(bad)}).",
              "Import a model with nnU-Net's default network settings.")
    per_stage = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
    stages = check.integer(f"{field}.n_stages", kwargs.get("n_stages"), 1, MAX_STAGES)
    features = _integers(check, f"{field}.features_per_stage", kwargs.get("features_per_stage"), stages, 1,
                         MAX_FEATURES)

    def per_axis(name: str, high: int, odd: bool) -> list[list[int]]:
        rows = check.sequence(f"{field}.{name}", kwargs.get(name), length=stages)
        values = [_integers(check, f"{field}.{name}[{i}]", row, spatial_dims, 1, high) for i, row in enumerate(rows)]
        for i, row in enumerate(values):
            if odd and any(value % 2 == 0 for value in row):
                check.fail(f"{field}.{name}[{i}]", "odd integers (nnU-Net pads a kernel symmetrically)", row)
        return values

    result = {
        "features_per_stage": features,
        "kernel_sizes": per_axis("kernel_sizes", MAX_KERNEL, odd=True),
        "strides": per_axis("strides", MAX_STRIDE, odd=False),
        "n_conv_per_stage": _integers(check, f"{field}.{per_stage}", kwargs.get(per_stage), stages, 1, MAX_CONVS),
        "n_conv_per_stage_decoder": _integers(check, f"{field}.n_conv_per_stage_decoder",
                                              kwargs.get("n_conv_per_stage_decoder"), stages - 1, 1, MAX_CONVS),
    }
    if kwargs.get("stem_channels") not in (None, features[0]):
        _fail(source, f"{class_name} uses settings the importer cannot reproduce (stem_channels).",
              "Import a model with nnU-Net's default network settings.")
    result.update(features=features[0], levels=stages,
                  norm="batch" if _last_name(kwargs.get("norm_op")).startswith("BatchNorm") else "instance",
                  act="leaky_relu" if _last_name(kwargs.get("nonlin")) == "LeakyReLU" else "relu",
                  encoder=NETWORKS[class_name],
                  conv_bias=check.boolean(f"{field}.conv_bias", kwargs.get("conv_bias", False)))
    return result


def check_trainer(name: str, allowed: tuple = (), source: str = "checkpoint") -> None:
    if TRAINER_PATTERN.match(str(name)) or name in allowed:
        return
    _fail(source, f"was trained with trainer '{name}', which may build another network than the plans describe.",
          f"If {name} uses the plans' network unchanged, import with --allow-trainer {name}.")


def recipe(plans: dict, configuration: str, config: dict, mirror_axes, source: str = "plans.json") -> dict:
    """The replay record for ModelMetadata.preprocessing, from a `resolve_configuration` result and the
    plans' top-level fields (checked here); `mirror_axes` comes from the checkpoint."""
    check = _checker(source)
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in READERS:
        _fail(source, f"was planned with image reader {reader!r}; only SimpleITKIO models are supported (others "
              "order the array axes differently).", "Import a model planned with nnU-Net's default reader.")
    properties = _optional_mapping(check, "foreground_intensity_properties_per_channel",
                                   plans.get("foreground_intensity_properties_per_channel"))
    intensities = {}
    for channel, values in properties.items():
        field = f"foreground_intensity_properties_per_channel.{channel}"
        values = check.mapping(field, values)
        intensities[str(channel)] = {key: check.number(f"{field}.{key}", values[key])
                                     for key in ("mean", "std", "percentile_00_5", "percentile_99_5") if key in values}
    dims = len(config["patch_size"])
    record = {
        "kind": RECIPE_KIND, "version": RECIPE_VERSION, "configuration": configuration,
        "transpose_forward": _integers(check, "transpose_forward", plans.get("transpose_forward", [0, 1, 2]), 3, 0, 2),
        "transpose_backward": _integers(check, "transpose_backward", plans.get("transpose_backward", [0, 1, 2]), 3, 0,
                                        2),
        "spacing": list(config["spacing"]),
        "normalization_schemes": list(config["normalization_schemes"]),
        "use_mask_for_norm": list(config["use_mask_for_norm"]),
        "foreground_intensity_properties": intensities,
        "resampling_data": dict(config["resampling_fn_data_kwargs"]),
        "resampling_probabilities": dict(config["resampling_fn_probabilities_kwargs"]),
        "mirror_axes": _integers(Checker(f"{source} (the checkpoint's inference_allowed_mirroring_axes)",
                                         MetadataError, "Copy the fold's checkpoint again as nnU-Net wrote it."),
                                 "inference_allowed_mirroring_axes", list(mirror_axes or []), None, 0, dims - 1,
                                 maximum=dims),
        "tile_step_size": 0.5,
    }
    return validate_recipe(record, lambda problem, fix: _fail(source, problem, fix))


def median_spacing(plans: dict, source: str = "plans.json") -> list[float]:
    """The dataset's median spacing (array order): the out-of-plane spacing of a 2d configuration."""
    check = _checker(source)
    values = check.sequence("original_median_spacing_after_transp",
                            plans.get("original_median_spacing_after_transp", [1.0, 1.0, 1.0]), length=3)
    return [check.number(f"original_median_spacing_after_transp[{i}]", v, positive=True) for i, v in enumerate(values)]


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
