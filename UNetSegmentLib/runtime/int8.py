"""INT8 post-training quantization (NNCF) and the calibration a checkpoint carries.

`quantize_network` converts a network to OpenVINO (dynamic batch, one window size) and quantizes it
on calibration patches; the result is an IR (xml + bin bytes). `quantize_checkpoint` calibrates on
the model's own training patches, measures Dice of fp32 vs INT8 on its validation cases, and writes
both into the checkpoint: the IR under the payload key `openvino_int8`, the check in the model card
(`training["int8"]`). A model whose INT8 loses more than `DICE_TOLERANCE` mean Dice is not marked
ready, so `precision=auto` keeps it on fp32 (an explicit `int8` request still uses it, with a note).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import InputError
from .options import RuntimeOptions, check_backend, check_threads, openvino_available

INT8_KEY = "openvino_int8"
IR_PARTS = ("xml", "bin")  # the OpenVINO IR files of the calibrated model
DICE_TOLERANCE = 0.005


def int8_card(metadata) -> dict:
    training = getattr(metadata, "training", None)
    card = training.get("int8") if isinstance(training, dict) else None
    return card if isinstance(card, dict) else {}


def is_int8_ready(metadata) -> bool:
    return bool(int8_card(metadata).get("ready"))


def read_int8_model(path) -> Optional[dict]:
    """The calibrated IR a checkpoint file carries ({"xml", "bin", "input_shape", ...}), or None
    (read once per file version: 2D models ask for every slice)."""
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    return _read_int8_model(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_int8_model(path: str, _mtime_ns: int, _size: int) -> Optional[dict]:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the checkpoint loader reports damaged files; here it only means none
        return None
    entry = payload.get(INT8_KEY) if isinstance(payload, dict) else None
    if not isinstance(entry, dict):
        return None
    entry = dict(entry)
    for key in IR_PARTS:  # stored as uint8 tensors (see write_int8); bytes in files of older versions
        value = entry.get(key)
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
            entry[key] = value.numpy().tobytes()
        elif not isinstance(value, bytes):
            return None
    return entry


def model_runtime(model, backend: str = "auto", threads: Optional[int] = None, precision: str = "auto",
                  device=None) -> tuple[RuntimeOptions, str]:
    """(RuntimeOptions, engine precision) for one loaded checkpoint: INT8 when asked for, or with
    `precision=auto` when the model carries a calibration that passed its accuracy check and the
    backend resolves to OpenVINO. Decides only; nothing is converted here."""
    from . import resolve_backend

    check_backend(backend)
    check_threads(threads)
    resolved, _ = resolve_backend(backend, device if device is not None else "cpu")
    int8_model = None
    wants_int8 = precision == "int8" or (precision == "auto" and is_int8_ready(model.metadata))
    if wants_int8 and resolved == "openvino":
        int8_model = read_int8_model(model.path)
    engine_precision = precision
    if precision == "auto" and int8_model is not None:
        engine_precision = "int8"
    return RuntimeOptions(backend=backend, threads=threads, int8_model=int8_model), engine_precision


def quantize_network(network, input_shape: Sequence[int], calibration: Iterable[np.ndarray],
                     subset_size: Optional[int] = None) -> dict:
    """NNCF post-training quantization of `network` for inputs (N, *input_shape).

    `calibration`: arrays shaped (N, *input_shape) (float32, already normalised as the network expects).
    Returns {"xml": bytes, "bin": bytes, "input_shape": [...], "openvino": version, "nncf": version}.
    """
    import nncf
    import openvino as ov

    from .openvino_backend import convert

    items = [np.ascontiguousarray(item, dtype=np.float32) for item in calibration]
    if not items:
        raise InputError("No calibration patches were given.", "Pass at least one patch from the training data.")
    shape = tuple(int(s) for s in input_shape)
    model = convert(network, shape)
    # MIXED: symmetric weights, asymmetric activations (PReLU/LeakyReLU outputs are signed); measured
    # 99.0 % vs 98.6 % argmax agreement with fp32 on the MONAI bench network, for ~7 % more time
    quantized = nncf.quantize(model, nncf.Dataset(items), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=subset_size or len(items), fast_bias_correction=True)
    with tempfile.TemporaryDirectory(prefix="unetsegment-int8-") as folder:
        xml = Path(folder) / "model.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        data = {"xml": xml.read_bytes(), "bin": xml.with_suffix(".bin").read_bytes()}
    data.update(input_shape=list(shape), openvino=str(ov.__version__), nncf=str(nncf.__version__))
    return data


def mean_dice(dice: dict) -> float:
    values = [float(value) for value in dice.values()]
    return float(np.mean(values)) if values else float("nan")


def write_int8(path, int8_model: dict, card: dict) -> Path:
    """Add the INT8 IR and its card to a checkpoint file, atomically (temp file + rename)."""
    import torch

    from ..checkpoint import load_payload_safely, validate_payload

    path = Path(path)
    payload = validate_payload(load_payload_safely(path), path)
    # the IR as uint8 tensors, not bytes: tensors live beside the record in the archive, so the torch-free
    # card reader (checkpoint_record.py) keeps reading a small record of plain types (pickled bytes would be
    # a call to _codecs.encode, which it refuses, and megabytes inside the record)
    payload[INT8_KEY] = {key: (torch.frombuffer(bytearray(value), dtype=torch.uint8) if key in IR_PARTS else value)
                         for key, value in int8_model.items()}
    metadata = dict(payload["metadata"])
    training = dict(metadata.get("training") or {})
    training["int8"] = card
    metadata["training"] = training
    payload["metadata"] = metadata
    from ..publish import temporary_output  # temp beside the target, fsync, rename; removed on any failure

    with temporary_output(path, overwrite=True) as temp:
        torch.save(payload, temp)
    return path


def calibration_batches(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch_size: Sequence[int],
                        count: int, seed: int = 0, batch_size: int = 2) -> list[np.ndarray]:
    """`count` patches (in batches of `batch_size`, shaped (B, 1, *patch)) drawn from the training
    cases as training draws them (a third centred on foreground), seeded."""
    from ..sampling import make_sampler

    sampler = make_sampler("foreground", list(zip(images, labels)), tuple(int(p) for p in patch_size), seed=seed)
    batches = []
    for _ in range(max(1, int(np.ceil(count / batch_size)))):
        images_batch, _ = sampler.sample_batch(batch_size)
        batch = np.asarray(images_batch, dtype=np.float32)
        if batch.ndim == len(patch_size) + 1:
            batch = batch[:, None]
        batches.append(batch)
    return batches


def dice_on_cases(network, images, labels, label_names: dict, patch_size, precision: str,
                  runtime: RuntimeOptions, progress=None, cancel=None) -> dict:
    """Mean Dice per label over cases, with the sliding-window engine on the given runtime/precision."""
    import torch

    from ..inference.sliding_window import InferenceOptions, sliding_window_inference
    from ..training import dice_per_label

    totals: dict = {}
    options = InferenceOptions(patch_size=tuple(int(p) for p in patch_size), precision=precision, runtime=runtime)
    notes = set()
    for image, label in zip(images, labels):
        if cancel is not None:
            cancel.raise_if_cancelled()
        result = sliding_window_inference(network, torch.from_numpy(np.ascontiguousarray(image[None])), options)
        notes.update(result.stats.get("fallbacks") or [])
        for name, score in dice_per_label(np.asarray(result.labels), label, label_names).items():
            totals[name] = totals.get(name, 0.0) + score
        if progress is not None:
            progress()
    if notes:
        raise RuntimeError("; ".join(sorted(notes)))  # the check must run what it claims to run
    return {name: total / len(images) for name, total in totals.items()}


def int8_tools_available() -> bool:
    """OpenVINO runs INT8 and NNCF calibrates it: both are needed to quantize."""
    import importlib.util

    return openvino_available() and importlib.util.find_spec("nncf") is not None


def quantize_checkpoint(model_path, dataset_dir, calibration_patches: int = 64, threads: Optional[int] = None,
                        validation_case_ids: Optional[Sequence[str]] = None, log=print, cancel=None) -> dict:
    """Calibrate, check and store INT8 for one checkpoint; returns the card written into it."""
    from ..checkpoint import load_checkpoint
    from ..training import TrainingConfig, load_training_cases, read_dataset_info, split_folds

    if not openvino_available():
        raise InputError("OpenVINO is not installed, so there is nothing to quantize for.",
                         "Install the pinned openvino and nncf packages (pip install openvino nncf).")
    check_threads(threads)
    started = time.perf_counter()
    model = load_checkpoint(model_path, device="cpu")
    metadata = model.metadata
    if metadata.sampler == "topk":
        raise InputError(f"{Path(model_path).name} is a top-k model; INT8 calibration covers sliding-window models.",
                         "Quantize a sliding-window checkpoint.")
    training = metadata.training if isinstance(metadata.training, dict) else {}
    info = read_dataset_info(str(dataset_dir))
    config = TrainingConfig(dataset_dir=str(dataset_dir), output="unused.pt",
                            target_spacing=tuple(metadata.target_spacing),
                            exclude_cases=tuple(training.get("excluded_cases") or ()))
    cases, _ = load_training_cases(config, info)
    case_ids = [case.case_id for case in info.cases if case.case_id not in set(config.exclude_cases)]
    train_ids, valid_ids = training.get("training_case_ids"), validation_case_ids or training.get("validation_case_ids")
    if train_ids and valid_ids:
        training_index = [case_ids.index(c) for c in train_ids if c in case_ids]
        validation_index = [case_ids.index(c) for c in valid_ids if c in case_ids]
    else:  # older cards: replay the seeded fold split the trainer used
        training_index, validation_index = split_folds(len(cases), int(training.get("folds", 5)),
                                                       int(training.get("fold", 0)), int(training.get("seed", 0)))
        if valid_ids:
            validation_index = [case_ids.index(c) for c in valid_ids if c in case_ids]
    if not training_index or not validation_index:
        raise InputError(f"{dataset_dir} holds none of the model's training or validation cases.",
                         "Pass the dataset folder the model was trained on.")
    from ..preprocessing import normalize

    # exactly what inference feeds the network: the card's normalisation
    normalized = [np.asarray(normalize(case.image, metadata.normalization), dtype=np.float32) for case in cases]
    patch = tuple(int(p) for p in metadata.patch_size)
    log(f"calibrating on {calibration_patches} training patches of {patch} from {len(training_index)} cases")
    batches = calibration_batches([normalized[i] for i in training_index], [cases[i].label for i in training_index],
                                  patch, calibration_patches, seed=int(training.get("seed", 0)))
    int8_model = quantize_network(model.network, (metadata.in_channels,) + patch, batches)
    quantize_s = time.perf_counter() - started
    label_names = {label.value: label.name for label in metadata.labels}
    images = [normalized[i][None] for i in validation_index]
    labels = [cases[i].label for i in validation_index]
    with tempfile.TemporaryDirectory(prefix="unetsegment-int8-cache-") as cache:
        log(f"checking Dice fp32 vs INT8 on {len(images)} validation cases")
        fp32 = dice_on_cases(model.network, images, labels, label_names, patch, "fp32",
                             RuntimeOptions("openvino", threads, cache), cancel=cancel)
        int8 = dice_on_cases(model.network, images, labels, label_names, patch, "int8",
                             RuntimeOptions("openvino", threads, cache, int8_model=int8_model), cancel=cancel)
    change = mean_dice(int8) - mean_dice(fp32)
    card = {"ready": bool(change >= -DICE_TOLERANCE), "tolerance": DICE_TOLERANCE,
            "mean_dice_fp32": round(mean_dice(fp32), 5), "mean_dice_int8": round(mean_dice(int8), 5),
            "mean_dice_change": round(change, 5),
            "dice_fp32": {k: round(v, 5) for k, v in fp32.items()},
            "dice_int8": {k: round(v, 5) for k, v in int8.items()},
            "validation_cases": len(images), "calibration_patches": int(sum(len(b) for b in batches)),
            "input_shape": int8_model["input_shape"], "openvino": int8_model["openvino"],
            "nncf": int8_model["nncf"], "seconds": round(time.perf_counter() - started, 1),
            "quantize_s": round(quantize_s, 1)}
    write_int8(model_path, int8_model, card)
    return card
