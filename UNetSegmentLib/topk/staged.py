"""Staged training of a top-k model: the CPU-friendly alternative to end-to-end training.

An end-to-end step (`training.topk_training_step`) pushes a whole volume through the global branch
and k + 1 patches through the backbone, so in a fixed budget the backbone gets 10-17x fewer updates
than a sliding-window backbone and ends up worse. Staged training keeps the paper's parts and losses
but trains them where each is cheapest (a deviation from the paper, see docs/topk_design.md):

1. backbone: exactly like a sliding-window backbone (foreground-oversampled patches, DiceCE);
2. global branch + scorer: on whole volumes resized to `coarse_size` (coarse DiceCE + rank loss);
3. short joint fine-tune with the backbone frozen: the end-to-end step with the Gumbel top-k
   straight-through relaxation, which now only has to teach the scorer, refiner and global branch.

Every stage stops at its step count or its time budget, whichever comes first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..losses import DiceCELoss
from ..progress import CancelToken, ProgressCallback, ProgressTracker
from .model import TopKSegmenter, pad_to_patch, region_means, window_starts
from .selection import rank_target, temperature_at

dice_ce_loss = DiceCELoss()


@dataclass
class StageResult:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


@dataclass
class StagedFitResult:
    backbone: StageResult
    global_branch: StageResult
    finetune: StageResult
    global_warm_started: bool = False

    @property
    def seconds(self) -> float:
        return self.backbone.seconds + self.global_branch.seconds + self.finetune.seconds

    @property
    def losses(self) -> list[float]:
        return self.backbone.losses + self.global_branch.losses + self.finetune.losses


def _stage_loop(steps: int, time_budget_s: Optional[float], tracker: Optional[ProgressTracker],
                step: Callable[[int, float], torch.Tensor], parameters, learning_rate: float,
                log_name: str = "", log_every: int = 0) -> StageResult:
    """Run `step(index, progress_fraction) -> loss` with AdamW until `steps` or the time budget."""
    parameters = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-5)
    result = StageResult()
    started = time.perf_counter()
    for index in range(steps):
        elapsed = time.perf_counter() - started
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
        if tracker is not None:
            tracker.check_cancel()
        fraction = elapsed / time_budget_s if time_budget_s else index / max(steps - 1, 1)
        loss = step(index, min(fraction, 1.0))
        if not torch.isfinite(loss):
            raise InputError(f"The {log_name or 'training'} loss became {float(loss)} at step {index + 1}.",
                             "Lower the learning rate, or check the images for NaN values.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 12.0)
        optimizer.step()
        result.losses.append(float(loss.detach()))
        if log_every and (index + 1) % log_every == 0:
            print(f"[topk:{log_name}] step {index + 1} loss {np.mean(result.losses[-log_every:]):.4f}", flush=True)
        if tracker is not None:
            tracker.advance()
    result.steps = len(result.losses)
    result.seconds = time.perf_counter() - started
    return result


def train_backbone_on_patches(network: nn.Module, cases: Sequence[tuple[np.ndarray, np.ndarray]],
                              patch_size: Sequence[int], steps: int, batch_size: int = 2,
                              learning_rate: float = 3e-3, seed: int = 0, time_budget_s: Optional[float] = None,
                              augmenter=None, tracker: Optional[ProgressTracker] = None, device="cpu",
                              log_every: int = 0) -> StageResult:
    """Stage 1, also the sliding-window baseline's training: foreground-oversampled patches (nnU-Net's
    1/3), DiceCE. `augmenter(images, labels)` may crop a larger sample to the patch (shared trainer)."""
    from ..sampling import ForegroundPatchSampler

    sample_size = getattr(augmenter, "input_size", patch_size)
    sampler = ForegroundPatchSampler(cases, sample_size, seed=seed)
    network.to(device).train()

    def step(_index, _fraction):
        images, labels = (torch.from_numpy(a) for a in sampler.sample_batch(batch_size))
        if augmenter is not None:
            images, labels = augmenter(images, labels)
        logits = network(images.to(device))
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return dice_ce_loss(logits, labels.to(device))

    result = _stage_loop(steps, time_budget_s, tracker, step, network.parameters(), learning_rate,
                         "backbone", log_every)
    network.eval()
    return result


def _prepared_cases(model: TopKSegmenter, cases, device):
    """Per case: padded image, padded label, coarse image (resized once: the global stage never
    needs the full-resolution image again)."""
    prepared = []
    for image, label in cases:
        image = torch.as_tensor(np.asarray(image, dtype=np.float32))[None]
        label = torch.as_tensor(np.asarray(label).astype(np.int64))[None]
        image, _ = pad_to_patch(image, model.settings.patch_size)
        label, _ = pad_to_patch(label[:, None].float(), model.settings.patch_size)
        prepared.append((image.to(device), label[:, 0].long().to(device)))
    return prepared


def global_branch_step(model: TopKSegmenter, images: torch.Tensor, labels: torch.Tensor,
                       full_shape: Sequence[int]) -> torch.Tensor:
    """Stage 2 loss for a batch of coarse (B, C, *coarse) images and nearest-downsampled (B, *coarse)
    labels of volumes `full_shape` in size: coarse DiceCE, plus the rank loss teaching the scorer to
    order candidates by how wrong the coarse output is inside them. The whole batch goes through the
    global network at once (a batch of one takes the slow conv3d path on CPU), and the rank target
    is measured at coarse resolution, so a step costs about as much as one patch."""
    starts = window_starts(full_shape, model.settings.patch_size, model.settings.overlap)
    coarse_logits = model.global_network(images)
    if isinstance(coarse_logits, (list, tuple)):
        coarse_logits = coarse_logits[0]
    score_maps = model.scorer(torch.cat([coarse_logits, images], dim=1))
    loss = dice_ce_loss(coarse_logits, labels)
    regions = model.coarse_regions(starts, full_shape, coarse_logits.shape[2:])
    voxel_error = F.cross_entropy(coarse_logits.detach(), labels, reduction="none")
    rank_loss = 0.0
    for index in range(images.shape[0]):
        raw_scores = model.candidate_scores(score_maps[index:index + 1], regions)
        target = rank_target(region_means(voxel_error[index].float(), regions))
        rank_loss = rank_loss - (target * torch.log_softmax(raw_scores, dim=0)).sum()
    return loss + model.settings.rank_weight * rank_loss / images.shape[0]


def copy_matching_weights(source: nn.Module, target: nn.Module) -> bool:
    """Load source's weights into target when every tensor has the same name and shape; else
    leave target alone. True when copied."""
    wanted, available = target.state_dict(), source.state_dict()
    if set(wanted) != set(available) or any(wanted[name].shape != available[name].shape for name in wanted):
        return False
    target.load_state_dict(available)
    return True


def _coarse_inputs(model: TopKSegmenter, image: torch.Tensor, label: torch.Tensor):
    """What the global branch sees of a padded volume: the image resized to coarse_size exactly as
    `global_pass` does, and the label downsampled (nearest)."""
    size = tuple(model.settings.coarse_size)
    mode = "trilinear" if model.spatial_dims == 3 else "bilinear"
    coarse_image = F.interpolate(image, size=size, mode=mode, align_corners=False)
    coarse_label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return coarse_image, coarse_label


def fit_topk_staged(model: TopKSegmenter, cases: Sequence[tuple[np.ndarray, np.ndarray]], backbone_steps: int,
                    global_steps: int, finetune_steps: int, learning_rate: float = 3e-3, batch_size: int = 2,
                    k: Optional[int] = None, seed: int = 0, progress: ProgressCallback | None = None,
                    cancel: CancelToken | None = None, flip_axes: Sequence[int] = (),
                    time_budgets_s: Optional[Sequence[Optional[float]]] = None, augmenter=None,
                    warm_start_global: bool = True, device="cpu", log_every: int = 0) -> StagedFitResult:
    """Train in place on normalised (C, *S) images with (*S) labels, stage by stage (module docstring).
    `backbone_steps=0` keeps an already trained backbone. `time_budgets_s` = (backbone, global,
    finetune) seconds, None for no limit. With `warm_start_global` the global network starts from
    the trained backbone's weights when both have the same architecture and width (it then only
    has to adapt to the coarser scale, which a few slow whole-volume steps can do)."""
    from .training import topk_training_step  # the end-to-end step is stage 3 with a frozen backbone

    counts = {"backbone_steps": backbone_steps, "global_steps": global_steps, "finetune_steps": finetune_steps}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be a whole number >= 0, got {value!r}.", f"Pass e.g. {name}=100.")
    if not cases:
        raise InputError("No training cases were given.", "Pass at least one (image, label) pair.")
    for index, (image, label) in enumerate(cases):
        if np.ndim(image) != model.spatial_dims + 1 or tuple(np.shape(image)[1:]) != tuple(np.shape(label)):
            raise InputError(f"case {index}: image {np.shape(image)} and label {np.shape(label)} do not fit "
                             "(channels, *spatial) and (*spatial).",
                             "Give each image a channel axis and a label of the same spatial size.")
        if int(np.max(label)) >= model.out_channels or int(np.min(label)) < 0:
            raise InputError(f"case {index}: label values {int(np.min(label))}..{int(np.max(label))} do not fit "
                             f"{model.out_channels} output channels.", "Check the label map and label list.")
    budgets = list(time_budgets_s) if time_budgets_s is not None else [None, None, None]
    if len(budgets) != 3:
        raise InputError(f"time_budgets_s needs 3 entries (backbone, global, finetune), got {len(budgets)}.",
                         "Pass e.g. (240, 40, 20), or None for no time limit.")
    tracker = ProgressTracker(total=backbone_steps + global_steps + finetune_steps, callback=progress,
                              cancel=cancel, stage="training")
    tracker.check_cancel()
    generator = torch.Generator().manual_seed(seed)
    model.to(device)

    backbone = StageResult()
    if backbone_steps:
        backbone = train_backbone_on_patches(model.backbone, cases, model.settings.patch_size, backbone_steps,
                                             batch_size, learning_rate, seed, budgets[0], augmenter, tracker,
                                             device, log_every)
    warm_started = bool(warm_start_global and copy_matching_weights(model.backbone, model.global_network))
    prepared = _prepared_cases(model, cases, device)

    def random_case():
        image, label = prepared[int(torch.randint(len(prepared), (1,), generator=generator))]
        for axis in flip_axes:  # cheap augmentation: random mirror along the given spatial axes
            if bool(torch.rand((), generator=generator) < 0.5):
                image, label = image.flip(axis + 2), label.flip(axis + 1)
        return image, label

    frozen = [p for p in model.backbone.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        model.train()
        model.backbone.eval()  # frozen: keep any normalisation statistics as trained
        coarse_cases = []
        for image, label in prepared:  # resized once: stage 2 never needs full resolution again
            coarse_image, coarse_label = _coarse_inputs(model, image, label)
            coarse_cases.append((coarse_image, coarse_label, tuple(image.shape[2:])))
        shapes = {case[2] for case in coarse_cases}
        batch = min(len(coarse_cases), 2)  # more updates per second than 4, and still not batch-1 slow

        def global_step(_index, _fraction):
            # volumes of one size per batch (the candidate grid depends on it)
            shape = sorted(shapes)[int(torch.randint(len(shapes), (1,), generator=generator))]
            pool = [case for case in coarse_cases if case[2] == shape]
            picks = torch.randperm(len(pool), generator=generator)[:batch]
            images, labels = [], []
            for pick in picks.tolist():
                image, label, _ = pool[pick]
                for axis in flip_axes:
                    if bool(torch.rand((), generator=generator) < 0.5):
                        image, label = image.flip(axis + 2), label.flip(axis + 1)
                images.append(image)
                labels.append(label)
            return global_branch_step(model, torch.cat(images), torch.cat(labels), shape)

        global_parameters = list(model.global_network.parameters()) + list(model.scorer.parameters())
        global_result = _stage_loop(global_steps, budgets[1], tracker, global_step, global_parameters,
                                    learning_rate, "global", log_every)
        settings = model.settings
        chosen_k = settings.k if k is None else k

        def finetune_step(_index, fraction):
            temperature = temperature_at(round(fraction * 1000), 1001, settings.temperature_start,
                                         settings.temperature_end)
            return topk_training_step(model, *random_case(), chosen_k, temperature, generator)["total"]

        head_parameters = (list(model.global_network.parameters()) + list(model.scorer.parameters())
                           + list(model.refiner.parameters()))
        finetune = _stage_loop(finetune_steps, budgets[2], tracker, finetune_step, head_parameters,
                               learning_rate / 3, "finetune", log_every)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.eval()
    return StagedFitResult(backbone, global_result, finetune, warm_started)
