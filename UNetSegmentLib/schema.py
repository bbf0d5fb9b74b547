"""Field-by-field validation of what is read from files: checkpoint metadata, state dicts, dataset.json.

Every value is checked for type, range and consistency with its neighbours before anything uses
it, and a failure names the field (`labels[2].color`), what it must be, what it is, and the fix.
A document either validates into plain, typed values or raises a `SchemaError` (for checkpoints a
`MetadataError`, which is a `CheckpointError`); never a TypeError or KeyError from deep inside.
Importable without torch.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from .errors import MetadataError, SchemaError

MAX_LABELS = 256  # labelmaps are written as uint8
MAX_PATCH = 4096
MAX_CHANNELS = 64
MAX_INFO_CHARS = 4096  # a dataset's licence / reference text travels into model cards
SAMPLERS = ("sliding_window", "topk")
NORMALIZATION_SCHEMES = ("ct", "zscore")


# Free text keeps tabs and line breaks but not the other control characters (a NUL ends the string in VTK
# and Qt) nor the invisible bidirectional marks, overrides and isolates, which make text read differently
# on screen than it is stored. Names (labels, fields, paths) must be printable throughout.
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def without_unsafe_characters(text: str) -> str:
    """Free text (a licence, a reference) with the characters that `Checker.string` refuses in text removed."""
    return _UNSAFE_IN_TEXT.sub("", text)


def _first_unsafe_character(value: str, multiline: bool) -> Optional[str]:
    if multiline:
        found = _UNSAFE_IN_TEXT.search(value)
        return found.group() if found else None
    return None if value.isprintable() else next(c for c in value if not c.isprintable())


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})" if not isinstance(value, (str, type(None))) else text


class Checker:
    """Raises `error_class` naming `source`, the field, the expectation and the value."""

    def __init__(self, source: str, error_class=SchemaError, fix: str = ""):
        self.source = source
        self.error_class = error_class
        self.fix = fix

    def fail(self, field: str, expectation: str, value: Any = None, fix: Optional[str] = None, shown: bool = True):
        got = f", got {_show(value)}" if shown else ""
        raise self.error_class(f"{self.source}: '{field}' must be {expectation}{got}.", fix or self.fix,
                               field=field)

    def mapping(self, field: str, value: Any, fix: Optional[str] = None) -> dict:
        if not isinstance(value, dict):
            self.fail(field, "an object ({...})", value, fix)
        return value

    def sequence(self, field: str, value: Any, length: Optional[int] = None, fix: Optional[str] = None,
                 minimum: int = 0, maximum: Optional[int] = None) -> list:
        if not isinstance(value, (list, tuple)):
            what = f"a list of {length} values" if length is not None else "a list"
            self.fail(field, what, value, fix)
        if length is not None and len(value) != length:
            self.fail(field, f"a list of {length} values", value, fix)
        if len(value) < minimum or (maximum is not None and len(value) > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
            self.fail(field, f"a list of {bound} entries", value, fix)
        return list(value)

    def integer(self, field: str, value: Any, low: Optional[int] = None, high: Optional[int] = None,
                fix: Optional[str] = None) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, "an integer", value, fix)
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(field, f"an integer in {low if low is not None else '-inf'}..{high if high is not None else 'inf'}",
                      value, fix)
        return int(value)

    def number(self, field: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
               positive: bool = False, fix: Optional[str] = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            self.fail(field, "a finite number", value, fix)
        value = float(value)
        if positive and not value > 0:
            self.fail(field, "a positive number", value, fix)
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(field, f"a number in {low}..{high}", value, fix)
        return value

    def boolean(self, field: str, value: Any, fix: Optional[str] = None) -> bool:
        if not isinstance(value, bool):
            self.fail(field, "true or false", value, fix)
        return value

    def string(self, field: str, value: Any, choices: Optional[tuple] = None, non_empty: bool = False,
               fix: Optional[str] = None, multiline: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(field, "a text string", value, fix)
        unsafe = _first_unsafe_character(value, multiline)
        if unsafe is not None:
            self.fail(field, f"text without non-printing characters (found U+{ord(unsafe):04X})", value,
                      "Remove the character: it would show differently than it is stored.")
        if non_empty and not value.strip():
            self.fail(field, "a non-empty text string", value, fix)
        if choices is not None and value not in choices:
            self.fail(field, "one of " + ", ".join(repr(c) for c in choices), value, fix)
        return value


# --- checkpoint metadata ------------------------------------------------------------------------------

_REEXPORT = "Retrain or re-export the model with this version of UNetSegment."


TERMINOLOGY_KEYS = ("category", "type", "modifier", "region")


def _terminology(check: "Checker", field: str, value: Any) -> Optional[dict]:
    """Optional standard codes of a label, DICOM style: {key: [scheme, code, meaning]}, e.g.
    {"type": ["SCT", "5366008", "Hippocampus"]}; Slicer shows them as the segment's terminology."""
    if value is None:
        return None
    value = check.mapping(field, value)
    codes = {}
    for key, code in value.items():
        if key not in TERMINOLOGY_KEYS:
            check.fail(field, f"made of {', '.join(TERMINOLOGY_KEYS)}", key)
        triple = check.sequence(f"{field}.{key}", code, length=3)
        codes[key] = [check.string(f"{field}.{key}[{i}]", part, non_empty=True) for i, part in enumerate(triple)]
    return codes


def validate_metadata(data: Any, source: str = "checkpoint") -> dict:
    """Checked, normalised keyword arguments for ModelMetadata (labels as (value, name, color) tuples)."""
    check = Checker(f"{source} metadata", MetadataError, _REEXPORT)
    if not isinstance(data, dict):
        raise MetadataError(f"{source} has no metadata dictionary (found {_show(data)}).",
                            "Use a checkpoint written by UNetSegment (python -m UNetSegmentLib train).",
                            field="metadata")
    required = ("architecture", "architecture_kwargs", "spatial_dims", "in_channels", "labels", "patch_size",
                "target_spacing")
    missing = [key for key in required if key not in data]
    if missing:
        raise MetadataError(f"{source} metadata lacks {', '.join(missing)}.",
                            "The file is incomplete or from another tool; retrain or re-export it.", field=missing[0])
    out: dict[str, Any] = {}
    out["architecture"] = check.string("architecture", data["architecture"], non_empty=True)
    kwargs = check.mapping("architecture_kwargs", data["architecture_kwargs"])
    for key, value in kwargs.items():
        if not isinstance(key, str):
            check.fail("architecture_kwargs", "an object with text keys", key)
        if key in ("features", "levels") and value is not None:
            check.integer(f"architecture_kwargs.{key}", value, 1, 65536 if key == "features" else 12)
    out["architecture_kwargs"] = dict(kwargs)
    out["spatial_dims"] = dims = check.integer(
        "spatial_dims", data["spatial_dims"], fix="Set spatial_dims to 2 (slice-by-slice model) or 3 (volume model); "
        "UNetSegment has no other kind.")
    if dims not in (2, 3):
        check.fail("spatial_dims", "2 or 3", dims, "Set spatial_dims to 2 (slice-by-slice model) or 3 (volume "
                   "model); UNetSegment has no other kind.")
    out["in_channels"] = check.integer("in_channels", data["in_channels"], 1, MAX_CHANNELS)
    labels = check.sequence("labels", data["labels"], minimum=2, maximum=MAX_LABELS,
                            fix="List background (value 0) and at least one foreground label.")
    parsed = []
    for index, item in enumerate(labels):
        field = f"labels[{index}]"
        item = check.mapping(field, item)
        for key in ("value", "name", "color"):
            if key not in item:
                check.fail(f"{field}.{key}", "present", shown=False)
        value = check.integer(f"{field}.value", item["value"], 0, MAX_LABELS - 1)
        name = check.string(f"{field}.name", item["name"], non_empty=True)
        color = check.sequence(f"{field}.color", item["color"], length=3)
        color = tuple(check.number(f"{field}.color[{c}]", component, 0.0, 1.0) for c, component in enumerate(color))
        parsed.append((value, name, color, _terminology(check, f"{field}.terminology", item.get("terminology"))))
    values = sorted(entry[0] for entry in parsed)
    if values != list(range(len(parsed))):
        check.fail("labels", "numbered 0..N-1 without gaps or repeats (0 = background)", values,
                   "Re-export the model with consistent label values.")
    out["labels"] = parsed
    out["patch_size"] = [check.integer(f"patch_size[{i}]", p, 1, MAX_PATCH) for i, p in enumerate(check.sequence(
        "patch_size", data["patch_size"], length=dims, fix=f"Store patch_size as {dims} integers in (z, y, x) order."))]
    out["target_spacing"] = [check.number(f"target_spacing[{i}]", s, positive=True, high=1e4) for i, s in enumerate(
        check.sequence("target_spacing", data["target_spacing"], length=3,
                       fix="Store target_spacing as three positive numbers in mm (x, y, z)."))]
    normalization = data.get("normalization")
    if normalization is None:
        out["normalization"] = {}
    else:
        normalization = check.mapping("normalization", normalization)
        scheme = check.string("normalization.scheme", normalization.get("scheme", "zscore"), NORMALIZATION_SCHEMES)
        parsed_norm: dict[str, Any] = {"scheme": scheme}
        for key in ("clip_low", "clip_high", "mean", "std"):
            value = normalization.get(key)
            if value is None:
                if scheme == "ct":
                    check.fail(f"normalization.{key}", "a number for CT normalisation", value)
                parsed_norm[key] = None
            else:
                parsed_norm[key] = check.number(f"normalization.{key}", value, positive=(key == "std"))
        if scheme == "ct" and parsed_norm["clip_low"] > parsed_norm["clip_high"]:
            check.fail("normalization.clip_low", f"at most clip_high ({parsed_norm['clip_high']})",
                       parsed_norm["clip_low"])
        unknown = sorted(set(normalization) - {"scheme", "clip_low", "clip_high", "mean", "std"})
        if unknown:
            check.fail("normalization", "made of scheme, clip_low, clip_high, mean and std", unknown)
        out["normalization"] = parsed_norm
    out["sampler"] = check.string("sampler", data.get("sampler", "sliding_window"), SAMPLERS)
    topk = data.get("topk")
    out["topk"] = None if topk is None else dict(check.mapping("topk", topk))
    if out["sampler"] == "topk" and out["topk"] is None:
        check.fail("topk", "the top-k settings of a model with sampler 'topk'", topk)
    out["modality"] = check.string("modality", data.get("modality", "MR"))
    out["training"] = dict(check.mapping("training", data.get("training") or {}))
    dice = check.mapping("validation_dice", data.get("validation_dice") or {})
    out["validation_dice"] = {check.string("validation_dice", name): check.number(f"validation_dice.{name}", score)
                              for name, score in dice.items()}
    out["description"] = check.string("description", data.get("description") or "", multiline=True)
    preprocessing = data.get("preprocessing")
    if preprocessing is not None:  # issue 14: an imported model's own recipe (nnU-Net v2)
        from .interop.nnunet_plans import validate_recipe

        def fail(problem: str, fix: str) -> None:
            raise MetadataError(f"{source} metadata: {problem}", fix, field="preprocessing")

        out["preprocessing"] = validate_recipe(check.mapping("preprocessing", preprocessing), fail)
    return out


def validate_state_dict(state_dict: Any, source: str = "checkpoint", field: str = "state_dict",
                        fix: str = _REEXPORT) -> None:
    """Every entry a tensor under a text key (a non-tensor would fail deep inside load_state_dict)."""
    check = Checker(str(source), MetadataError, fix)
    check.mapping(field, state_dict)
    for key, value in state_dict.items():
        if not isinstance(key, str):
            check.fail(field, "keyed by parameter names (text)", key)
        shape = getattr(value, "shape", None)
        try:
            valid = shape is not None and hasattr(value, "dim") and all(int(size) >= 0 for size in shape) and not isinstance(value, (str, bytes))
        except (TypeError, ValueError):
            valid = False
        if not valid:
            check.fail(f"{field}[{key!r}]", "a tensor", value)


# --- dataset.json -------------------------------------------------------------------------------------

_LABELS_FIX = 'Use "labels": {"0": "background", "1": "liver"} (or nnU-Net v2\'s {"background": 0, "liver": 1}).'
_CHANNELS_FIX = 'Use e.g. "channel_names": {"0": "CT"} (nnU-Net v2) or "modality": {"0": "MR"} (Decathlon).'


def _digit_key(text: Any) -> bool:
    return isinstance(text, str) and text.strip().isdigit()


def validate_user_record(data: Any, source: str = "dataset.json", key: str = "unetsegment") -> dict:
    """The UNetSegment record of a user training set's dataset.json: {'label_set' {int: str} | None,
    'modality' | None, 'model' | None, 'cases' {case id: {...}}}. The file is the user's to edit."""
    fix = f"Fix the \"{key}\" record in dataset.json, or choose an empty folder for a new training set."
    check = Checker(str(source), SchemaError, fix)
    record = check.mapping(key, data.get(key, {}) if isinstance(data, dict) else {})
    out: dict[str, Any] = {"label_set": None}
    if record.get("label_set") is not None:
        label_set = {}
        for value, name in check.mapping(f"{key}.label_set", record["label_set"]).items():
            if not _digit_key(value) or int(value) >= MAX_LABELS:
                check.fail(f"{key}.label_set.{value}", f"keyed by label values 0..{MAX_LABELS - 1}", value)
            label_set[int(value)] = check.string(f"{key}.label_set.{value}", name, non_empty=True)
        out["label_set"] = label_set
    for field in ("modality", "model"):
        out[field] = None if record.get(field) is None else check.string(f"{key}.{field}", record[field])
    cases = check.mapping(f"{key}.cases", record.get("cases") or {})
    for case_id, case in cases.items():
        check.mapping(f"{key}.cases.{case_id}", case)
        if case.get("source_hash") is not None:
            check.string(f"{key}.cases.{case_id}.source_hash", case["source_hash"])
    out["cases"] = dict(cases)
    return out


def validate_dataset(data: Any, source: str = "dataset.json") -> dict:
    """{'name', 'labels' {int: str}, 'channels' {int: str}, 'file_ending', 'training' [(image|None, label)],
    'licence', 'reference'}; the last two are informational, so a value that is not text reads as None."""
    check = Checker(str(source), SchemaError, "Fix dataset.json (see the Medical Segmentation Decathlon layout).")
    if not isinstance(data, dict):
        raise SchemaError(f"{source} must hold a JSON object, not {_show(data)}.",
                          'Write it as {"labels": {...}, "training": [...], ...}.', field="(top level)")
    out: dict[str, Any] = {}
    name = data.get("name")
    out["name"] = None if name is None else check.string("name", name)
    for key, spellings in (("licence", ("licence", "license")), ("reference", ("reference",))):
        value = next((data[spelling] for spelling in spellings if isinstance(data.get(spelling), str)), None)
        out[key] = None if value is None else without_unsafe_characters(value)[:MAX_INFO_CHARS]
    if "labels" not in data:
        check.fail("labels", "present", shown=False, fix=_LABELS_FIX)
    raw = check.mapping("labels", data["labels"], _LABELS_FIX)
    if not raw:
        check.fail("labels", "a non-empty object", raw, _LABELS_FIX)
    labels: dict[int, str] = {}
    if all(_digit_key(key) for key in raw):  # Decathlon / nnU-Net v1: {"0": "background"}
        for key, label_name in raw.items():
            labels[int(key)] = check.string(f"labels.{key}", label_name, non_empty=True, fix=_LABELS_FIX)
    else:  # nnU-Net v2: {"background": 0}
        for label_name, value in raw.items():
            if isinstance(value, (list, tuple)):
                check.fail(f"labels.{label_name}", "a single label value (region-based labels are not supported)",
                           value, "Give each label one value, e.g. \"liver\": 1.")
            value = check.integer(f"labels.{label_name}", value, 0, MAX_LABELS - 1, _LABELS_FIX)
            if value in labels:
                check.fail(f"labels.{label_name}", f"a value not used by '{labels[value]}'", value, _LABELS_FIX)
            labels[value] = str(label_name)
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2 or len(labels) > MAX_LABELS:
        check.fail("labels", f"numbered 0..N-1 with background 0, at least one foreground label and at most "
                   f"{MAX_LABELS} labels", sorted(labels), "Number the labels 0 (background), 1, 2, ... in dataset.json.")
    out["labels"] = labels
    channels_field = "channel_names" if data.get("channel_names") is not None else "modality"
    raw_channels = data.get(channels_field)
    if raw_channels is None:
        raw_channels = {"0": "MR"}
    raw_channels = check.mapping(channels_field, raw_channels, _CHANNELS_FIX)
    if not raw_channels:
        check.fail(channels_field, "a non-empty object", raw_channels, _CHANNELS_FIX)
    channels: dict[int, str] = {}
    for key, channel in raw_channels.items():
        if not _digit_key(key):
            check.fail(f"{channels_field}.{key}", "keyed by channel numbers (\"0\", \"1\", ...)", key, _CHANNELS_FIX)
        channels[int(key)] = check.string(f"{channels_field}.{key}", channel, non_empty=True, fix=_CHANNELS_FIX)
    out["channels"] = channels
    ending = data.get("file_ending", ".nii.gz")
    ending = check.string("file_ending", ending, fix='Use e.g. "file_ending": ".nii.gz".')
    if not ending.startswith(".") or "/" in ending or "\\" in ending:
        check.fail("file_ending", "a file extension starting with '.'", ending, 'Use e.g. "file_ending": ".nii.gz".')
    out["file_ending"] = ending
    training = data.get("training")
    entries = [] if training is None else check.sequence("training", training,
                                                         fix='Use "training": [{"image": ..., "label": ...}, ...].')
    parsed = []
    for index, entry in enumerate(entries):
        field = f"training[{index}]"
        entry = check.mapping(field, entry, 'Each training entry is {"image": "./imagesTr/x.nii.gz", '
                                            '"label": "./labelsTr/x.nii.gz"}.')
        if "label" not in entry:
            check.fail(f"{field}.label", "present (the case's labelmap path)", shown=False,
                       fix='Add "label": "./labelsTr/<case>.nii.gz" to every training entry.')
        label = check.string(f"{field}.label", entry["label"], non_empty=True)
        image = entry.get("image")
        image = None if image is None else check.string(f"{field}.image", image, non_empty=True)
        parsed.append((image, label))
    out["training"] = parsed
    return out
