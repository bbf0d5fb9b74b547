"""Training: dataset folder -> preprocessed cases -> patches -> network -> validated checkpoint.

The recipe is nnU-Net's, scaled down: resample every case to the median spacing, normalise with
the CT statistics of the training fold only (so validation stays honest), draw foreground-
oversampled patches, augment, minimise Dice + cross-entropy (deep supervision when the network has
heads) with Adam, cut the learning rate by 5 when the loss plateaus, stop at an epoch cap or when
the learning rate has decayed away, validate on the held-out fold with the sliding-window engine,
and write a checkpoint that carries everything inference needs.

Dataset loading and preprocessing are plain functions (`load_training_cases`, `split_folds`,
`normalize_fold`) so that other trainers (the top-k sampler's) can reuse them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from . import distributed
from .errors import CheckpointError, DeviceError, InputError
from .metadata import LabelInfo, ModelMetadata, Normalization, canonical_modality, label_infos  # noqa: F401 (re-export)
from .progress import CancelToken, ProgressCallback, ProgressTracker

log = logging.getLogger(__name__)

# time_budget_s is measured on one of these clocks (TrainingConfig.budget_clock)
BUDGET_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

# sampler name -> trainer taking (config, progress, cancel); lets e.g. the top-k trainer plug in.
EXTERNAL_TRAINERS: dict[str, Callable[..., "TrainingResult"]] = {}


@dataclass
class TrainingConfig:
    dataset_dir: str
    output: str  # checkpoint path (.pt)
    architecture: str = "unet"
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    patch_size: Sequence[int] = (32, 64, 64)  # array order (z, y, x)
    batch_size: int = 2
    epochs: int = 50
    iterations_per_epoch: int = 50
    fold: int = 0
    folds: int = 5
    seed: int = 0
    sampler: str = "foreground"  # "uniform" | "foreground" (| plug-ins in EXTERNAL_TRAINERS)
    augment: bool = True
    deep_supervision: bool = True
    device: str = "auto"
    lr: float = 3e-4
    weight_decay: float = 3e-5
    lr_patience: int = 10  # epochs without improvement before the learning rate is cut
    lr_factor: float = 0.2
    min_lr: float = 1e-6
    validation_overlap: float = 0.5
    target_spacing: Optional[Sequence[float]] = None  # (x, y, z) mm; default: median of the dataset
    overwrite: bool = False
    description: str = ""
    # case ids never used for training or validation (kept apart for a shipped sample and tests)
    exclude_cases: Sequence[str] = ()
    # "plateau": cut by lr_factor when the epoch loss stalls; "poly": nnU-Net's (1 - progress)^0.9 decay,
    # progress being the larger of the iteration share and the time-budget share
    lr_schedule: str = "plateau"
    time_budget_s: Optional[float] = None  # stop training (then validate and save) after this many seconds
    # the clock the budget is measured on: "wall", or "cpu" (this process's CPU seconds), which keeps
    # budgets comparable between runs when other work shares the machine (benchmarks)
    budget_clock: str = "wall"
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    # torchrun / srun (distributed.py): continue from a resume state; write <output>.resume after every
    # epoch (None: only when several ranks run, where a dying rank must not lose the finished epochs)
    resume: Optional[str] = None
    save_state: Optional[bool] = None


@dataclass
class TrainingResult:
    checkpoint: str
    metadata: ModelMetadata
    epochs: int
    seconds: float
    final_lr: float
    epoch_losses: list[float]
    validation_dice: dict[str, float]


class TrainingCase(NamedTuple):
    image: np.ndarray  # float32 (z, y, x), resampled to the target spacing, not yet normalised
    label: np.ndarray  # uint8 (z, y, x)
    spacing: tuple[float, float, float]  # (x, y, z) mm


def read_dataset_info(dataset_dir: str):
    """Label names, modality and case files (UNetSegmentLib.io.read_dataset)."""
    from .io import read_dataset

    return read_dataset(dataset_dir)


def load_training_cases(config: TrainingConfig, info=None
                        ) -> tuple[list[TrainingCase], tuple[float, float, float]]:
    """Read every case, reorient, resample to the target spacing: (cases, target spacing (x, y, z))."""
    import SimpleITK as sitk

    from . import io, preprocessing

    info = info or read_dataset_info(config.dataset_dir)
    images, labels = [], []
    for case in training_cases_of(info, config):
        image_path, label_path = case.image_path, case.label_path
        image, label = io.read_image(image_path), io.read_labelmap(label_path)
        # issue 16: an RGB/4D image or a label outside dataset.json is named before any cast can hide it
        preprocessing.validate_image(image, what=f"training image {os.path.basename(image_path)}",
                                     allow_constant=True)
        stray = sorted(set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) - set(info.labels))
        if stray:
            raise InputError(f"Label values {stray} in {os.path.basename(label_path)} are not named in dataset.json "
                             f"(its labels are {sorted(info.labels)}).",
                             "Add them to the 'labels' of dataset.json or fix the labelmaps.")
        # a labelmap off its image's grid would be silently resampled and teach wrong boundaries
        preprocessing.validate_same_grid(image, label, what=f"labelmap {os.path.basename(label_path)}")
        image = preprocessing.reorient_to_canonical(image)
        label = preprocessing.reorient_to_canonical(label)
        images.append(image)
        labels.append(label)
    if config.target_spacing is not None:
        target = tuple(float(s) for s in config.target_spacing)
    else:
        target = tuple(float(s) for s in preprocessing.compute_target_spacing([i.GetSpacing() for i in images]))
    cases = []
    for image, label in zip(images, labels):
        image = preprocessing.resample_image(image, target)
        label = preprocessing.resample_image(label, target, is_label=True, reference=image)
        image_array = sitk.GetArrayFromImage(image).astype(np.float32)
        label_array = sitk.GetArrayFromImage(label).astype(np.uint8)
        unknown = set(np.unique(label_array).tolist()) - set(info.labels)
        if unknown:
            raise InputError(f"Label values {sorted(unknown)} are not named in dataset.json.",
                             "Add them to the 'labels' of dataset.json or fix the labelmaps.")
        cases.append(TrainingCase(image_array, label_array, target))
    return cases, target


def training_cases_of(info, config: TrainingConfig) -> list:
    """The dataset's cases less `config.exclude_cases` (an unknown excluded id is an error, not a no-op)."""
    excluded = {str(case_id) for case_id in config.exclude_cases}
    unknown = excluded - {case.case_id for case in info.cases}
    if unknown:
        raise InputError(f"Excluded case ids {sorted(unknown)} are not in {info.folder}.",
                         "Pass ids as listed in labelsTr/ without the extension, e.g. hippocampus_001.")
    return [case for case in info.cases if case.case_id not in excluded]


def split_folds(case_count: int, folds: int, fold: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded k-fold split: (training indices, validation indices) of fold `fold`."""
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}.", "Use 5 (the default) or more.")
    if case_count < folds:
        raise InputError(f"{case_count} cases cannot be split into {folds} folds.",
                         f"Pass --folds {max(2, case_count)} or fewer, or add cases.")
    if not 0 <= fold < folds:
        raise InputError(f"--fold {fold} is outside 0..{folds - 1}.", f"Pick a fold from 0 to {folds - 1}.")
    order = np.random.default_rng(seed).permutation(case_count)
    validation = sorted(int(i) for i in np.array_split(order, folds)[fold])
    training = sorted(int(i) for i in order if int(i) not in validation)
    return training, validation


def normalize_fold(cases: Sequence[TrainingCase], training: Sequence[int], modality: str
                   ) -> tuple[Normalization, list[np.ndarray]]:
    """Normalisation from the training cases only (CT statistics for CT), applied to every case."""
    from . import preprocessing

    if modality.upper() == "CT":
        normalization = preprocessing.compute_ct_normalization(
            [cases[i].image for i in training], [cases[i].label for i in training])
    else:
        normalization = Normalization(scheme="zscore")
    return normalization, [np.asarray(preprocessing.normalize(case.image, normalization), dtype=np.float32)
                           for case in cases]


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"'{name}' is not a device name.", "Use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA GPU is available to PyTorch.",
                          "Use --device cpu, or install a CUDA build of PyTorch on a GPU machine.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS was requested but is not available.", "Use --device cpu.")
    return device


def set_training_layout(network, device, training: bool):
    """Channels-last (NDHWC) weights while a 3D network trains on the CPU; the default layout otherwise.

    oneDNN's 3D convolution backward is faster in channels-last (bench/training_memory_format.py), with
    the same gradients up to float rounding. Inference gained nothing from it (docs/inference.md) and GPUs
    were not measured, so validation, checkpoints and everything after training keep the default layout.
    """
    import torch

    is_3d = any(isinstance(module, torch.nn.Conv3d) for module in network.modules())
    if training and is_3d and torch.device(device).type == "cpu":
        return network.to(memory_format=torch.channels_last_3d)
    return network.to(memory_format=torch.contiguous_format) if is_3d else network


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: dict[int, str]) -> dict[str, float]:
    """Dice of each foreground label; 1.0 when a label is absent from both."""
    scores = {}
    for value, name in labels.items():
        if value == 0:
            continue
        predicted, expected = prediction == value, reference == value
        total = int(predicted.sum()) + int(expected.sum())
        scores[name] = 1.0 if total == 0 else 2.0 * float((predicted & expected).sum()) / total
    return scores


def _validate_config(config: TrainingConfig) -> None:
    from .sampling import SAMPLERS

    if config.sampler not in SAMPLERS and config.sampler not in EXTERNAL_TRAINERS:
        raise InputError(f"Unknown sampler '{config.sampler}'.",
                         f"Choose one of: {', '.join(list(SAMPLERS) + list(EXTERNAL_TRAINERS))}.")
    for name in ("batch_size", "epochs", "iterations_per_epoch"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}.", f"Pass a {name} of 1 or more.")
    if len(config.patch_size) not in (2, 3) or any(int(p) < 1 for p in config.patch_size):
        raise InputError(f"Patch size {tuple(config.patch_size)} is invalid.",
                         "Pass three positive numbers in (z, y, x) order, e.g. --patch-size 32 64 64.")
    if config.lr_schedule not in ("plateau", "poly"):
        raise InputError(f"Unknown learning-rate schedule '{config.lr_schedule}'.", "Use plateau or poly.")
    if config.time_budget_s is not None and not config.time_budget_s > 0:
        raise InputError(f"The time budget must be positive, got {config.time_budget_s}.",
                         "Pass a number of seconds, e.g. --time-budget 3600.")
    if config.budget_clock not in BUDGET_CLOCKS:
        raise InputError(f"Unknown budget clock '{config.budget_clock}'.", f"Use one of: {', '.join(BUDGET_CLOCKS)}.")
    if not config.lr > 0:
        raise InputError(f"Learning rate must be positive, got {config.lr}.", "Use the default 3e-4.")
    if os.path.exists(config.output) and not config.overwrite:
        raise CheckpointError(f"{config.output} already exists; it was not overwritten.",
                              "Pass --overwrite to replace it, or choose another --output.")
    folder = os.path.dirname(os.path.abspath(config.output))
    if not os.path.isdir(folder):
        raise InputError(f"The output folder {folder} does not exist.", "Create it or choose another --output.")


def train(config: TrainingConfig, progress: ProgressCallback | None = None,
          cancel: CancelToken | None = None) -> TrainingResult:
    """Train, validate on the held-out fold and write the checkpoint (only if nothing was cancelled).

    Under torchrun / srun every rank calls this: DDP, per-rank patch streams, rank 0 writes (distributed.py).
    """
    if config.sampler in EXTERNAL_TRAINERS:
        distributed.refuse_unsupported(f"Training with --sampler {config.sampler}")
        return EXTERNAL_TRAINERS[config.sampler](config, progress, cancel)
    _validate_config(config)
    context = distributed.setup(resolve_device(config.device))
    try:
        return _train(config, context, progress, cancel)
    except RuntimeError as error:
        failure = distributed.peer_failure(error, context, distributed.state_path(config.output))
        if failure is None:
            raise
        raise failure from None
    finally:
        distributed.teardown(context)


def _train(config: TrainingConfig, context: distributed.DistributedContext, progress: ProgressCallback | None,
           cancel: CancelToken | None) -> TrainingResult:
    import torch

    from .augmentation import Augmenter
    from .checkpoint import save_checkpoint
    from .losses import DeepSupervisionLoss, DiceCELoss
    from .networks import build_network, get_architecture
    from .sampling import make_sampler

    started = time.perf_counter()
    device = context.device  # this rank's GPU under torchrun
    if config.threads:
        torch.set_num_threads(int(config.threads))
    torch.manual_seed(config.seed)
    tracker = ProgressTracker(config.epochs * config.iterations_per_epoch, progress if context.is_main else None,
                              cancel, stage="training")

    info = read_dataset_info(config.dataset_dir)
    cases, target_spacing = load_training_cases(config, info)
    case_ids = [case.case_id for case in training_cases_of(info, config)]
    training, validation = split_folds(len(cases), config.folds, config.fold, config.seed)
    tracker.check_cancel()
    normalization, normalized = normalize_fold(cases, training, info.modality)
    log.info("fold %d/%d: %d training, %d validation cases; spacing %s mm; normalisation %s",
             config.fold, config.folds, len(training), len(validation),
             tuple(round(s, 3) for s in target_spacing), normalization)

    patch_size = tuple(int(p) for p in config.patch_size)
    spatial_dims = len(patch_size)
    fingerprint = {"architecture": config.architecture,  # what a resume state must match
                   "architecture_kwargs": repr(sorted(config.architecture_kwargs.items())),
                   "patch_size": list(patch_size), "fold": config.fold, "folds": config.folds, "seed": config.seed,
                   "training_case_ids": [case_ids[i] for i in training]}
    resumed = distributed.load_training_state(config.resume, fingerprint) if config.resume else None
    start_epoch = int(resumed["counters"]["epoch"]) if resumed else 0
    tracker.total = (config.epochs - start_epoch) * config.iterations_per_epoch
    seed = distributed.rank_seed(config.seed, context.rank, start_epoch)  # ranks (and resumes) draw apart
    augmenter = Augmenter(patch_size, target_spacing, seed=seed) if config.augment else None
    sample_size = augmenter.input_size if augmenter else patch_size
    sampler = make_sampler(config.sampler, [(normalized[i], cases[i].label) for i in training],
                           sample_size, seed=seed)

    deep_supervision = bool(config.deep_supervision and get_architecture(config.architecture).supports_deep_supervision)
    network_kwargs = dict(config.architecture_kwargs)
    network_kwargs["deep_supervision"] = deep_supervision
    from .memory import check_network  # issue 16: e.g. features=4096 refused before it is allocated

    check_network(lambda: build_network(config.architecture, spatial_dims, 1, len(info.labels), **network_kwargs),
                  f"Training {config.architecture}", training=True)
    network = build_network(config.architecture, spatial_dims, 1, len(info.labels), **network_kwargs)
    network = distributed.prepare_network(network, device.type) if context.distributed else network
    # not under DDP: its gradient buckets keep the default strides (it warns and copies every step otherwise)
    network = set_training_layout(network.to(device), device, training=not context.distributed)
    loss_function = DeepSupervisionLoss(DiceCELoss())
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    lr, best_loss, epochs_without_improvement = config.lr, math.inf, 0
    epoch_losses: list[float] = []
    total_iterations = config.epochs * config.iterations_per_epoch
    budget_clock = BUDGET_CLOCKS[config.budget_clock]
    training_started, iteration, out_of_time = budget_clock(), 0, False
    if resumed:  # weights, optimizer, schedule position and spent time of the finished epochs
        counters = distributed.restore_training_state(resumed, network, optimizer)
        lr, best_loss, epochs_without_improvement = counters["lr"], counters["best_loss"], counters["stalled"]
        epoch_losses, iteration = list(counters["epoch_losses"]), int(counters["iteration"])
        training_started -= float(counters["training_seconds"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        log.info("resumed from %s after epoch %d (%d iterations)", config.resume, start_epoch, iteration)
    model = distributed.wrap_model(network, context)  # DDP: gradients averaged over the ranks
    save_state = context.distributed if config.save_state is None else config.save_state
    for epoch in range(start_epoch, config.epochs):
        network.train()
        running, done = 0.0, 0
        for _ in range(config.iterations_per_epoch):
            tracker.check_cancel()
            elapsed = budget_clock() - training_started
            if config.time_budget_s is not None and context.distributed:  # one clock: same stop, same lr
                elapsed = distributed.all_reduce([elapsed], context, op="max")[0]
            if config.time_budget_s is not None and elapsed >= config.time_budget_s:
                out_of_time = True
                break
            if config.lr_schedule == "poly":
                lr = poly_learning_rate(config.lr, iteration, total_iterations, elapsed, config.time_budget_s)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            running += train_step(model, network, optimizer, loss_function, sampler, augmenter, patch_size,
                                  config.batch_size, device, f"in epoch {epoch + 1}")
            done += 1
            iteration += 1
            tracker.advance()
        running, done = distributed.all_reduce([running, done], context)  # mean over every rank's steps
        if done == 0:
            break
        epoch_loss = running / done
        epoch_losses.append(epoch_loss)
        if epoch_loss < best_loss - 1e-4:
            best_loss, epochs_without_improvement = epoch_loss, 0
        else:
            epochs_without_improvement += 1
        if config.lr_schedule == "plateau" and epochs_without_improvement >= config.lr_patience:
            lr *= config.lr_factor
            epochs_without_improvement = 0
            for group in optimizer.param_groups:
                group["lr"] = lr
        log.info("epoch %d/%d: loss %.4f, lr %.2e, %.0f s", epoch + 1, config.epochs, epoch_loss, lr,
                 time.perf_counter() - started)
        if save_state:
            distributed.save_training_state(
                distributed.state_path(config.output), network, optimizer,
                {"epoch": epoch + 1, "iteration": iteration, "lr": lr, "best_loss": best_loss,
                 "stalled": epochs_without_improvement, "epoch_losses": epoch_losses,
                 "training_seconds": budget_clock() - training_started}, fingerprint, context)
        if config.lr_schedule == "plateau" and lr < config.min_lr:
            log.info("learning rate below %.0e: stopping", config.min_lr)
            break
        if out_of_time:
            log.info("time budget of %.0f s reached after %d iterations: stopping", config.time_budget_s, iteration)
            break
    if not epoch_losses:
        raise InputError("Training stopped before its first iteration.", "Raise --time-budget.")

    network = set_training_layout(network, device, training=False).eval()
    validation_dice = validate(network, [normalized[i] for i in validation], [cases[i].label for i in validation],
                               info.labels, patch_size, config.validation_overlap, device,
                               progress if context.is_main else None, cancel, context=context)
    seconds = time.perf_counter() - started
    built_kwargs = getattr(network, "config", {}).get("kwargs", network_kwargs)
    architecture_kwargs = {key: value for key, value in built_kwargs.items()
                           if key not in ("spatial_dims", "in_channels", "out_channels")}
    architecture_kwargs["deep_supervision"] = False  # inference uses the highest-resolution head only
    metadata = ModelMetadata(
        architecture=config.architecture,
        architecture_kwargs=architecture_kwargs,
        spatial_dims=spatial_dims,
        in_channels=1,
        labels=label_infos(info.labels),
        patch_size=list(patch_size),
        target_spacing=[float(s) for s in target_spacing],
        normalization=normalization,
        modality=canonical_modality(info.modality),
        training={
            "dataset": info.name,
            "cases": len(cases), "training_cases": len(training), "validation_cases": len(validation),
            "fold": config.fold, "folds": config.folds, "epochs": len(epoch_losses),
            "iterations_per_epoch": config.iterations_per_epoch, "batch_size": config.batch_size,
            "sampler": config.sampler, "augment": config.augment, "deep_supervision": deep_supervision,
            "seed": config.seed, "lr": config.lr, "final_lr": lr, "final_loss": epoch_losses[-1],
            "lr_schedule": config.lr_schedule, "iterations": iteration,
            **({"time_budget_s": config.time_budget_s, "budget_clock": config.budget_clock}
               if config.time_budget_s is not None else {}),
            "patch_size": list(patch_size), "excluded_cases": sorted(str(c) for c in config.exclude_cases),
            "training_case_ids": [case_ids[i] for i in training],
            "validation_case_ids": [case_ids[i] for i in validation],
            "intensity": intensity_statistics([cases[i].image for i in training]),
            "seconds": round(seconds, 1), "device": str(device), "threads": torch.get_num_threads(),
            **distributed.metadata_fields(context, config.batch_size),
        },
        validation_dice={name: round(score, 4) for name, score in validation_dice.items()},
        description=config.description,
    )
    tracker.check_cancel()
    network.to("cpu")
    if context.is_main:  # issue 16: a failed write keeps the model, at a fallback path the error names
        from .publish import write_with_fallback

        write_with_fallback(lambda path: save_checkpoint(path, network, metadata, overwrite=config.overwrite),
                            config.output)
    distributed.barrier(context)  # the other ranks return once the checkpoint exists
    log.info("wrote %s (validation Dice %s)", config.output, metadata.validation_dice)
    return TrainingResult(config.output, metadata, len(epoch_losses), seconds, lr, epoch_losses, validation_dice)


def train_step(model, network, optimizer, loss_function, sampler, augmenter, patch_size, batch_size: int,
               device, where: str = "") -> float:
    """One optimisation step on a fresh (augmented) batch; shared by `train` and fine-tuning (finetune.py).

    `model` is what runs forward (the DDP wrapper under torchrun), `network` the module whose gradients
    are clipped. Returns the loss.
    """
    import torch

    from .augmentation import center_crop

    images, labels = (torch.from_numpy(a) for a in sampler.sample_batch(batch_size))
    if augmenter is not None:
        images, labels = augmenter(images, labels)
    else:
        images, labels = center_crop(images, labels, patch_size)
    images, labels = images.to(device), labels.to(device)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_function(model(images), labels)
    if not torch.isfinite(loss):
        raise InputError(f"The training loss became {loss.item()} {where}.".replace("  ", " "),
                         "Lower --lr, check the images for NaN values, or normalise them.")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
    optimizer.step()
    return float(loss.item())


def poly_learning_rate(initial: float, iteration: int, total_iterations: int, elapsed_s: float = 0.0,
                       budget_s: Optional[float] = None, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay; with a time budget the schedule follows whichever runs out first."""
    progress = iteration / max(1, total_iterations)
    if budget_s:
        progress = max(progress, elapsed_s / budget_s)
    return initial * max(0.0, 1.0 - min(1.0, progress)) ** exponent


def intensity_statistics(images: Sequence[np.ndarray], samples_per_case: int = 20000) -> dict[str, Any]:
    """Raw-intensity summary of the training images, kept in the card to warn about foreign inputs.

    Per case: the 1st/50th/99th percentiles; the card keeps their ranges over the training set, so an
    input can be compared in units the user recognises (e.g. Hounsfield units for a CT fed to an MR model).
    """
    per_case = []
    for image in images:
        flat = np.asarray(image, dtype=np.float32).ravel()
        if flat.size > samples_per_case:
            flat = flat[:: int(np.ceil(flat.size / samples_per_case))]
        zscored = (flat - flat.mean()) / max(float(flat.std()), 1e-8)
        per_case.append(np.concatenate([np.percentile(flat, (1, 50, 99)), np.percentile(zscored, (1, 50, 99)),
                                        [float((flat < 0).mean())]]))
    if not per_case:
        return {}
    table = np.asarray(per_case, dtype=np.float64)

    def span(column: int) -> list[float]:
        return [round(float(table[:, column].min()), 4), round(float(table[:, column].max()), 4)]

    # raw percentiles (p01/p50/p99), the same after per-case z-scoring (z01/z50/z99: scale-free, the
    # histogram's shape) and the share of negative voxels (CT air and soft tissue; none in magnitude MR)
    return {"cases": len(per_case), "p01": span(0), "p50": span(1), "p99": span(2),
            "z01": span(3), "z50": span(4), "z99": span(5), "negative_fraction": span(6)}


def validate(network, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], label_names: dict[int, str],
             patch_size: Sequence[int], overlap: float, device, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None, context: Optional[distributed.DistributedContext] = None
             ) -> dict[str, float]:
    """Mean Dice per label over the held-out cases, predicted with the sliding-window engine.

    With a multi-rank `context` each rank predicts its share of the cases; the scores are gathered.
    """
    import torch

    from .inference.sliding_window import InferenceOptions, sliding_window_inference

    if not images:
        return {}
    totals: dict[str, float] = {}
    context = context or distributed.SINGLE
    indices = distributed.shard(range(len(images)), context)
    tracker = ProgressTracker(len(indices), progress, cancel, stage="validation")
    options = InferenceOptions(patch_size=tuple(patch_size), overlap=overlap)
    scores: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for index in indices:
            image, label = images[index], labels[index]
            tracker.check_cancel()
            result = sliding_window_inference(network, torch.from_numpy(image[None]).to(device), options,
                                              None, cancel)
            prediction = result.labels
            prediction = prediction.cpu().numpy() if hasattr(prediction, "cpu") else np.asarray(prediction)
            scores[index] = dice_per_label(prediction, label, label_names)
            tracker.advance()
    for case_scores in distributed.gather_by_index(scores, context):  # case order: sums as one process adds
        for name, score in case_scores.items():
            totals[name] = totals.get(name, 0.0) + score
    return {name: total / len(images) for name, total in totals.items()}


def config_from_dict(data: dict[str, Any]) -> TrainingConfig:
    return TrainingConfig(**data)


def config_to_dict(config: TrainingConfig) -> dict[str, Any]:
    data = asdict(config)
    data["patch_size"] = list(config.patch_size)
    return data
