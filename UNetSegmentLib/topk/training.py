"""End-to-end training of backbone + global branch + scorer + refiner.

Each step sees one whole volume: the global branch segments it coarsely and scores the candidate
windows, a Gumbel top-k (straight-through) picks k windows plus `random_patches` random ones, the
backbone segments them, and the aggregated volume is scored. Loss, as in the paper:
DiceCE(aggregated) + DiceCE(coarse, downsampled label) + DiceCE(patches) - w_e * entropy(scores),
plus our ranking term (see docs/topk_design.md) that teaches the scorer where the coarse output is
wrong, which the straight-through signal alone learns slowly on short budgets.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..losses import DiceCELoss
from ..progress import CancelToken, ProgressCallback, ProgressTracker
from .model import TopKSegmenter, pad_to_patch, window_slices, window_starts, window_sums
from .selection import (check_k, gather_windows, gumbel_topk_straight_through, rank_target, score_entropy,
                        temperature_at)


# The project's Dice + cross-entropy (nnU-Net's objective), shared with sliding-window training.
dice_ce_loss = DiceCELoss()


def _resize_labels(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def topk_training_step(model: TopKSegmenter, image: torch.Tensor, label: torch.Tensor, k: int,
                       temperature: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Loss terms for one (1, C, *S) image and its (1, *S) label; "total" is what to minimise."""
    settings = model.settings
    image, _ = pad_to_patch(image, settings.patch_size)
    label, _ = pad_to_patch(label[:, None].float(), settings.patch_size)
    label = label[:, 0].long()
    full_shape = tuple(image.shape[2:])
    starts = window_starts(full_shape, settings.patch_size, settings.overlap)
    k = check_k(k, len(starts))

    _, coarse_logits, score_map = model.global_pass(image)
    coarse_loss = dice_ce_loss(coarse_logits, _resize_labels(label, coarse_logits.shape[2:]))
    scores, raw_scores = model.ranking_scores(score_map, coarse_logits, starts, full_shape)
    chosen, selection = gumbel_topk_straight_through(scores, k, temperature, generator)
    chosen = [int(i) for i in chosen]

    regions = [window_slices(s, settings.patch_size) for s in starts]
    # One-hot rows in the forward pass; their straight-through gradient reaches the scores.
    picked = gather_windows(selection, image[0], torch.tensor(chosen, device=image.device), regions)

    has_foreground = window_sums((label[0] > 0), starts, settings.patch_size) > 0
    extra = _random_windows(has_foreground, chosen, settings.random_patches, generator)
    if extra:
        picked = torch.cat([picked, torch.stack([image[0][(slice(None), *regions[i])] for i in extra])])
    used = chosen + extra
    coarse_up = model.upsample_logits(coarse_logits, full_shape)[0]
    crops = torch.stack([coarse_up[(slice(None), *regions[i])] for i in used])
    patch_logits = model.patch_logits(picked, crops)
    patch_labels = torch.stack([label[0][regions[i]] for i in used])
    local_loss = dice_ce_loss(patch_logits, patch_labels)
    aggregated, _ = model.blend(list(patch_logits.unbind(0)), [starts[i] for i in used], full_shape, coarse_up)
    aggregated_loss = dice_ce_loss(aggregated[None], label)
    entropy = score_entropy(scores)

    # Ranking target: how wrong the coarse output is inside each candidate (detached).
    with torch.no_grad():
        voxel_error = F.cross_entropy(coarse_up[None], label, reduction="none")[0]
        error = window_sums(voxel_error, starts, settings.patch_size).to(voxel_error.dtype)
        error = error / math.prod(settings.patch_size)
        target = rank_target(error)
    rank_loss = -(target * torch.log_softmax(raw_scores, dim=0)).sum()

    total = (aggregated_loss + coarse_loss + local_loss - settings.entropy_weight * entropy
             + settings.rank_weight * rank_loss)
    return {"total": total, "aggregated": aggregated_loss, "coarse": coarse_loss, "local": local_loss,
            "entropy": entropy, "rank": rank_loss}


def _random_windows(has_foreground: torch.Tensor, exclude: Sequence[int], count: int,
                    generator: torch.Generator) -> list[int]:
    """`count` windows not already chosen, alternating foreground-containing and background ones, so
    the backbone also learns from patches the scorer would not pick."""
    picked: list[int] = []
    remaining = [i for i in range(len(has_foreground)) if i not in exclude]
    for n in range(count):
        if not remaining:
            break
        want_foreground = n % 2 == 0
        pool = [i for i in remaining if bool(has_foreground[i]) == want_foreground] or remaining
        index = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        picked.append(index)
        remaining.remove(index)
    return picked


@dataclass
class TopKFitResult:
    losses: list[float] = field(default_factory=list)  # total loss per step
    seconds: float = 0.0
    steps: int = 0


def fit_topk(model: TopKSegmenter, cases: Sequence[tuple[np.ndarray, np.ndarray]], steps: int,
             learning_rate: float = 1e-3, k: Optional[int] = None, seed: int = 0,
             progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
             flip_axes: Sequence[int] = (), log_every: int = 0,
             time_budget_s: Optional[float] = None, device="cpu") -> TopKFitResult:
    """Train in place on normalised (C, *S) images with (*S) integer labels for `steps` steps, or
    until `time_budget_s` seconds have passed (the temperature then anneals over the time budget)."""
    if not cases:
        raise InputError("No training cases were given.", "Pass at least one (image, label) pair.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}.", "Pass e.g. steps=200.")
    tensors = []
    for index, (image, label) in enumerate(cases):
        image = torch.as_tensor(np.asarray(image, dtype=np.float32))
        label = torch.as_tensor(np.asarray(label).astype(np.int64))
        if image.dim() != model.spatial_dims + 1 or tuple(image.shape[1:]) != tuple(label.shape):
            raise InputError(f"case {index}: image {tuple(image.shape)} and label {tuple(label.shape)} do "
                             "not fit (channels, *spatial) and (*spatial).",
                             "Give each image a channel axis and a label of the same spatial size.")
        if int(label.max()) >= model.out_channels or int(label.min()) < 0:
            raise InputError(f"case {index}: label values {int(label.min())}..{int(label.max())} do not fit "
                             f"{model.out_channels} output channels.", "Check the label map and label list.")
        tensors.append((image, label))
    settings = model.settings
    k = settings.k if k is None else k
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-5)
    tracker = ProgressTracker(total=steps, callback=progress, cancel=cancel, stage="training")
    result = TopKFitResult()
    started = time.perf_counter()
    model.to(device).train()
    for step in range(steps):
        tracker.check_cancel()
        image, label = tensors[int(torch.randint(len(tensors), (1,), generator=generator))]
        for axis in flip_axes:  # cheap augmentation: random mirror along the given spatial axes
            if bool(torch.rand((), generator=generator) < 0.5):
                image, label = image.flip(axis + 1), label.flip(axis)
        if time_budget_s is not None:
            elapsed = time.perf_counter() - started
            if elapsed >= time_budget_s:
                break
            step_fraction = round(elapsed / time_budget_s * 1000)
            temperature = temperature_at(step_fraction, 1001, settings.temperature_start, settings.temperature_end)
        else:
            temperature = temperature_at(step, steps, settings.temperature_start, settings.temperature_end)
        terms = topk_training_step(model, image[None].to(device), label[None].to(device), k, temperature,
                                   generator)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        result.losses.append(float(terms["total"].detach()))
        if log_every and (step + 1) % log_every == 0:
            detail = " ".join(f"{name}={float(value.detach()):.3f}" for name, value in terms.items())
            print(f"[topk] step {step + 1}/{steps} T={temperature:.2f} {detail}", flush=True)
        tracker.advance()
    model.eval()
    result.seconds = time.perf_counter() - started
    result.steps = len(result.losses)
    return result


def _coarse_size(shapes: Sequence[Sequence[int]], multiple: int, factor: float = 3.0) -> list[int]:
    """Median volume size / `factor` (the paper's x3 downsampling), rounded up to the global
    network's required multiple: fixed at training time so the global branch sees one input size."""
    median = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    return [int(max(multiple, math.ceil(size / factor / multiple) * multiple)) for size in median]


def train_topk(config: Any, progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
               settings: Optional[dict[str, Any]] = None):
    """`python -m UNetSegmentLib train --sampler topk`: the shared dataset loading, fold split and
    normalisation, then top-k training, validation with top-k inference, and a checkpoint whose
    metadata says sampler="topk" (rebuilt by `build_topk_model`). `settings` overrides TopKSettings
    fields (k, coarse_size, ...) and may set training_mode: "staged" (default, see staged.py: the
    backbone trains on epochs x iterations patch batches like the sliding-window trainer, then the
    global branch and scorer, then a short Gumbel top-k fine-tune) or "end_to_end" (the paper: one
    whole volume per step). deep_supervision does not apply. Returns the shared TrainingResult."""
    from .. import training as shared
    from ..checkpoint import save_checkpoint
    from ..metadata import ModelMetadata
    from ..networks import build_network
    from .inference import topk_inference
    from .model import TopKSettings

    started = time.perf_counter()
    for name in ("epochs", "iterations_per_epoch"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}.", f"Pass a {name} of 1 or more.")
    if os.path.exists(config.output) and not config.overwrite:
        from ..errors import CheckpointError
        raise CheckpointError(f"{config.output} already exists; it was not overwritten.",
                              "Pass --overwrite to replace it, or choose another --output.")
    device = shared.resolve_device(config.device)
    torch.manual_seed(config.seed)
    info = shared.read_dataset_info(config.dataset_dir)
    cases, target_spacing = shared.load_training_cases(config, info)
    training, validation = shared.split_folds(len(cases), config.folds, config.fold, config.seed)
    if cancel is not None:
        cancel.raise_if_cancelled()
    normalization, normalized = shared.normalize_fold(cases, training, info.modality)

    patch_size = [int(p) for p in config.patch_size]
    spatial_dims = len(patch_size)
    out_channels = len(info.labels)
    backbone_kwargs = dict(config.architecture_kwargs)
    backbone_kwargs["deep_supervision"] = False  # the patch loss uses the full-resolution head only
    backbone = build_network(config.architecture, spatial_dims, 1, out_channels, **backbone_kwargs)
    options = dict(settings or {})
    mode = options.pop("training_mode", "staged")
    if mode not in ("staged", "end_to_end"):
        raise InputError(f"Unknown top-k training_mode '{mode}'.", "Use 'staged' (default) or 'end_to_end'.")
    global_kwargs = options.pop("global_kwargs", TopKSettings().global_kwargs)
    global_architecture = options.pop("global_architecture", None)
    global_network = build_network(global_architecture or config.architecture, spatial_dims, 1, out_channels,
                                   **global_kwargs)
    if "coarse_size" not in options:
        multiple = int(getattr(global_network, "required_multiple", 1))
        options["coarse_size"] = _coarse_size([cases[i].image.shape for i in training], multiple)
    topk_settings = TopKSettings(patch_size=patch_size, global_architecture=global_architecture,
                                 global_kwargs=dict(global_kwargs), **options)
    model = TopKSegmenter(backbone, global_network, topk_settings, spatial_dims, 1, out_channels)

    steps = config.epochs * config.iterations_per_epoch
    training_cases = [(normalized[i][None], cases[i].label) for i in training]
    flip_axes = range(spatial_dims) if config.augment else ()
    if mode == "end_to_end":  # the paper's objective: every step one whole volume through everything
        fit = fit_topk(model, training_cases, steps=steps, learning_rate=config.lr, seed=config.seed,
                       progress=progress, cancel=cancel, flip_axes=flip_axes, device=device)
    else:  # staged: the backbone gets exactly the sliding-window trainer's patch updates
        from ..augmentation import Augmenter
        from .staged import fit_topk_staged

        augmenter = Augmenter(patch_size, target_spacing, seed=config.seed) if config.augment else None
        fit = fit_topk_staged(model, training_cases, backbone_steps=steps, global_steps=steps,
                              finetune_steps=max(1, steps // 5), learning_rate=config.lr,
                              batch_size=config.batch_size, seed=config.seed, progress=progress, cancel=cancel,
                              flip_axes=flip_axes, augmenter=augmenter, device=device)
    validation_dice: dict[str, float] = {}
    for index in validation:
        result = topk_inference(model, normalized[index][None], progress=None, cancel=cancel, device=device)
        for name, score in shared.dice_per_label(result.labels, cases[index].label, info.labels).items():
            validation_dice[name] = validation_dice.get(name, 0.0) + score / len(validation)
    seconds = time.perf_counter() - started
    architecture_kwargs = dict(getattr(backbone, "config", {}).get("kwargs", backbone_kwargs))
    for key in ("spatial_dims", "in_channels", "out_channels"):  # passed positionally when rebuilt
        architecture_kwargs.pop(key, None)
    topk_settings.global_kwargs = {key: value for key, value in
                                   getattr(global_network, "config", {}).get("kwargs", global_kwargs).items()
                                   if key not in ("spatial_dims", "in_channels", "out_channels")}
    metadata = ModelMetadata(
        architecture=config.architecture, architecture_kwargs=architecture_kwargs, spatial_dims=spatial_dims,
        in_channels=1, labels=shared.label_infos(info.labels), patch_size=patch_size,
        target_spacing=[float(s) for s in target_spacing], normalization=normalization, sampler="topk",
        topk=topk_settings.to_dict(), modality=info.modality,
        training={"dataset": os.path.basename(os.path.normpath(config.dataset_dir)), "cases": len(cases),
                  "training_cases": len(training), "validation_cases": len(validation), "fold": config.fold,
                  "folds": config.folds, "steps": len(fit.losses), "sampler": "topk", "seed": config.seed,
                  "training_mode": mode,
                  "lr": config.lr, "final_loss": fit.losses[-1] if fit.losses else None,
                  "seconds": round(seconds, 1), "device": str(device)},
        validation_dice={name: round(score, 4) for name, score in validation_dice.items()},
        description=config.description)
    if cancel is not None:
        cancel.raise_if_cancelled()
    model.to("cpu")
    from ..publish import write_with_fallback  # issue 16: a failed write keeps the model at a named path

    write_with_fallback(lambda path: save_checkpoint(path, model, metadata, overwrite=config.overwrite),
                        config.output)
    return shared.TrainingResult(config.output, metadata, config.epochs, seconds, config.lr,
                                 fit.losses, validation_dice)


def register() -> None:
    """Plug `train_topk` into the shared trainer, so `train(config)` with sampler="topk" runs it."""
    from .. import training as shared

    shared.EXTERNAL_TRAINERS["topk"] = train_topk
