"""The No-More-Sliding-Window model: a coarse global branch that segments the whole volume at low
resolution and scores every sliding-window candidate patch, plus any registered backbone that runs
only on the chosen patches, whose outputs are refined with the coarse context and blended back.

Design choice for the score: registered backbones expose no decoder features, and hooking a module
found by name would tie us to one architecture. So the global branch is its own small registered
network, and the scorer is a small learned conv head over [coarse logits, coarse image]; the score of
a candidate pools that map over the candidate's footprint (see docs/topk_design.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from .selection import check_k, deterministic_topk

# Added to the score of a candidate whose coarse prediction is all background: such patches are
# picked only once every candidate with coarse foreground is taken. Order among them is kept.
BACKGROUND_PENALTY = 1.0e4


@dataclass
class TopKSettings:
    """What `metadata.topk` stores: everything needed to rebuild the model around its backbone."""

    k: int = 5
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    overlap: float = 0.5
    coarse_size: list[int] = field(default_factory=lambda: [48, 48, 48])
    sigma_scale: float = 0.125
    temperature_start: float = 1.0
    temperature_end: float = 2.0 / 3.0
    random_patches: int = 1
    global_architecture: Optional[str] = None  # None: same architecture as the backbone
    global_kwargs: dict[str, Any] = field(default_factory=lambda: {"features": 8, "levels": 3})
    scorer_channels: int = 16
    refine_channels: int = 16
    mask_background: bool = True
    entropy_weight: float = 1.0e-5
    rank_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TopKSettings":
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"Top-k settings contain unknown keys {unknown}.",
                                  "The checkpoint was written by a newer UNetSegment; update UNetSegment.")
        settings = cls(**data)
        settings.patch_size = [int(p) for p in settings.patch_size]
        settings.coarse_size = [int(c) for c in settings.coarse_size]
        return settings


# --- candidate grid: identical to the sliding-window grid (MONAI's convention) -----------------

def window_starts(spatial_shape: Sequence[int], patch_size: Sequence[int],
                  overlap: float) -> list[tuple[int, ...]]:
    """Start corners of the sliding-window grid over an image at least as large as the patch.

    Step is int(patch * (1 - overlap)) (a whole patch when patch == image); the last window on each
    axis is shifted back to end at the border. Order is C-order over the axes.
    """
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}.", "Use 0.5 (half-patch overlap).")
    per_axis = []
    for size, patch in zip(spatial_shape, patch_size):
        if patch > size:
            raise InputError(f"patch {tuple(patch_size)} is larger than image {tuple(spatial_shape)}.",
                             "Pad the image to the patch size first (pad_to_patch).")
        step = patch if patch == size else max(int(patch * (1.0 - overlap)), 1)
        count = 1
        while (count - 1) * step + patch < size:
            count += 1
        per_axis.append([min(i * step, size - patch) for i in range(count)])
    starts: list[tuple[int, ...]] = [()]
    for axis in per_axis:
        starts = [s + (a,) for s in starts for a in axis]
    return starts


def window_slices(start: Sequence[int], patch_size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch_size))


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125,
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """Separable Gaussian centred on the patch (sigma = sigma_scale * size), floored at 1e-3 like
    MONAI's, so that blending equals the sliding window's exactly."""
    weights = None
    for size in patch_size:
        sigma = sigma_scale * size
        x = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        axis = torch.exp(x ** 2 / (-2 * sigma ** 2))
        weights = axis if weights is None else weights.unsqueeze(-1) * axis
    floor = max(float(weights.min()), 1e-3)
    return weights.clamp(min=floor).to(dtype)


def pad_to_patch(image: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad (N, C, *spatial) symmetrically up to the patch size; return the crop that undoes it."""
    spatial = image.shape[2:]
    pads, crop = [], []
    for size, patch in zip(spatial, patch_size):
        missing = max(patch - size, 0)
        before = missing // 2
        pads.append((before, missing - before))
        crop.append(slice(before, before + size))
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]
        image = F.pad(image, flat, mode="constant", value=0.0)
    return image, tuple(crop)


def window_sums(volume: torch.Tensor, starts: Sequence[Sequence[int]], sizes: Sequence) -> torch.Tensor:
    """Sum of a (*S) volume inside each window, from one summed-area table: O(volume + windows) and
    differentiable. `sizes` is one size for all windows, or one size per window."""
    dims = volume.dim()
    table = volume.to(torch.float64)
    for axis in range(dims):
        table = F.pad(table.cumsum(axis), [0, 0] * (dims - 1 - axis) + [1, 0])
    corners = torch.tensor([list(s) for s in starts], dtype=torch.long, device=table.device)
    extent = torch.tensor(list(sizes), dtype=torch.long, device=table.device)
    extent = extent.expand(len(starts), dims) if extent.dim() == 1 else extent
    total = torch.zeros(len(starts), dtype=torch.float64, device=table.device)
    for mask in range(2 ** dims):  # inclusion-exclusion over the window's corners
        upper = [(mask >> axis) & 1 for axis in range(dims)]
        index = tuple(corners[:, axis] + extent[:, axis] * upper[axis] for axis in range(dims))
        sign = -1.0 if (dims - sum(upper)) % 2 else 1.0
        total = total + sign * table[index]
    return total


def patch_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split into len // batch_size near-equal batches (at least one), so no batch is smaller than
    `batch_size` when there are enough patches: on CPU a batch of one takes PyTorch's slow conv3d
    path, e.g. k=5 with batch 2 runs as 3 + 2, not 2 + 2 + 1."""
    indices = list(indices)
    count = max(1, len(indices) // max(batch_size, 1))
    size, extra = divmod(len(indices), count)
    batches, first = [], 0
    for number in range(count):
        last = first + size + (1 if number < extra else 0)
        batches.append(indices[first:last])
        first = last
    return [batch for batch in batches if batch]


def run_avoiding_batch_of_one(network: nn.Module, batch: torch.Tensor):
    """network(batch); a single CPU sample is run as a duplicated batch of two when no gradient is
    needed. PyTorch sends small batch-1 3D convolutions to its slow native kernel instead of oneDNN;
    the duplicated batch measured ~1-2x faster in total despite twice the arithmetic (and gives the
    same numbers, since nothing normalises across the batch in eval mode)."""
    if batch.shape[0] != 1 or batch.device.type != "cpu" or torch.is_grad_enabled() or network.training:
        return network(batch)
    output = network(batch.expand(2, *batch.shape[1:]).contiguous())
    if isinstance(output, (list, tuple)):
        return type(output)(item[:1] for item in output)
    return output[:1]


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _interpolation(spatial_dims: int) -> str:
    return "trilinear" if spatial_dims == 3 else "bilinear"


def region_means(volume: torch.Tensor, regions: Sequence[tuple[slice, ...]]) -> torch.Tensor:
    """Mean of a (*S) volume over each region (tuples of slices), on the volume's device."""
    starts = [[r.start for r in region] for region in regions]
    sizes = [[r.stop - r.start for r in region] for region in regions]
    sums = window_sums(volume, starts, sizes)
    counts = torch.tensor([math.prod(size) for size in sizes], dtype=sums.dtype, device=sums.device)
    return sums / counts


class TopKSegmenter(nn.Module):
    """Backbone + global branch + scorer + patch refiner. Works with any module mapping
    (N, in, *patch) -> (N, out, *patch) logits as backbone and (N, in, *coarse) -> (N, out, *coarse)
    as global network."""

    def __init__(self, backbone: nn.Module, global_network: nn.Module, settings: TopKSettings,
                 spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if len(settings.patch_size) != spatial_dims or len(settings.coarse_size) != spatial_dims:
            raise InputError(f"patch_size {settings.patch_size} and coarse_size {settings.coarse_size} "
                             f"must both have {spatial_dims} entries.",
                             "Give one size per spatial axis.")
        check_k(settings.k, 10 ** 9)
        self.backbone = backbone
        self.global_network = global_network
        self.settings = settings
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        conv = _conv(spatial_dims)
        self.scorer = nn.Sequential(
            conv(out_channels + in_channels, settings.scorer_channels, 3, padding=1),
            nn.LeakyReLU(0.01),
            conv(settings.scorer_channels, 1, 1))
        self.refiner = nn.Sequential(
            conv(2 * out_channels, settings.refine_channels, 3, padding=1),
            nn.LeakyReLU(0.01),
            conv(settings.refine_channels, out_channels, 1))
        # Starts as the identity on the backbone's logits; learns how much coarse context to add.
        nn.init.zeros_(self.refiner[-1].weight)
        nn.init.zeros_(self.refiner[-1].bias)

    # --- global branch ------------------------------------------------------------------------
    def global_pass(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, *S) image -> (coarse image, coarse logits, score map) at `coarse_size`."""
        coarse_image = F.interpolate(image, size=tuple(self.settings.coarse_size),
                                     mode=_interpolation(self.spatial_dims), align_corners=False)
        coarse_logits = run_avoiding_batch_of_one(self.global_network, coarse_image)
        if isinstance(coarse_logits, (list, tuple)):  # deep-supervision networks in train mode
            coarse_logits = coarse_logits[0]
        score_map = self.scorer(torch.cat([coarse_logits, coarse_image], dim=1))
        return coarse_image, coarse_logits, score_map

    def coarse_regions(self, starts: Sequence[Sequence[int]], full_shape: Sequence[int],
                       coarse_shape: Sequence[int]) -> list[tuple[slice, ...]]:
        """Each candidate's footprint in the coarse grid (at least one coarse voxel per axis)."""
        regions = []
        for start in starts:
            region = []
            for begin, size, full, coarse in zip(start, self.settings.patch_size, full_shape, coarse_shape):
                ratio = coarse / full
                low = min(int(math.floor(begin * ratio)), coarse - 1)
                high = max(min(int(math.ceil((begin + size) * ratio)), coarse), low + 1)
                region.append(slice(low, high))
            regions.append(tuple(region))
        return regions

    def candidate_scores(self, score_map: torch.Tensor, regions: Sequence[tuple[slice, ...]]) -> torch.Tensor:
        """Learned score per candidate: mean of the score map over its coarse footprint."""
        return region_means(score_map[0, 0], regions).to(score_map.dtype)

    def coarse_background(self, coarse_logits: torch.Tensor,
                          regions: Sequence[tuple[slice, ...]]) -> torch.Tensor:
        """True for candidates where the coarse prediction is background everywhere (the rule that
        decides the coarse output suffices there); all False when mask_background is off."""
        if not self.settings.mask_background:
            return torch.zeros(len(regions), dtype=torch.bool, device=coarse_logits.device)
        foreground = (coarse_logits[0].detach().argmax(dim=0) != 0)
        starts = [[r.start for r in region] for region in regions]
        sizes = [[r.stop - r.start for r in region] for region in regions]
        return window_sums(foreground, starts, sizes) == 0

    def ranking_scores(self, score_map: torch.Tensor, coarse_logits: torch.Tensor,
                       starts: Sequence[Sequence[int]], full_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores used for selection, raw learned scores): raw minus BACKGROUND_PENALTY where the
        coarse prediction is all background."""
        regions = self.coarse_regions(starts, full_shape, score_map.shape[2:])
        raw = self.candidate_scores(score_map, regions)
        background = self.coarse_background(coarse_logits, regions)
        return raw - BACKGROUND_PENALTY * background.to(raw.dtype), raw

    def upsample_logits(self, coarse_logits: torch.Tensor, full_shape: Sequence[int]) -> torch.Tensor:
        return F.interpolate(coarse_logits, size=tuple(full_shape), mode=_interpolation(self.spatial_dims),
                             align_corners=False)

    # --- local branch -------------------------------------------------------------------------
    def patch_logits(self, patches: torch.Tensor, coarse_crops: Optional[torch.Tensor]) -> torch.Tensor:
        """Backbone on (N, C, *patch); refined with the matching crops of the upsampled coarse logits
        unless `coarse_crops` is None (coarse branch ignored)."""
        logits = self.backbone(patches)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        if coarse_crops is None:
            return logits
        return logits + self.refiner(torch.cat([logits, coarse_crops], dim=1))

    def blend(self, patch_outputs: Sequence[torch.Tensor], starts: Sequence[Sequence[int]],
              full_shape: Sequence[int], fallback: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian-blend (C, *patch) outputs at `starts`; voxels no patch covers take `fallback`
        (C, *full). Returns (logits (C, *full), covered mask)."""
        reference = patch_outputs[0]
        weights = gaussian_importance(self.settings.patch_size, self.settings.sigma_scale,
                                      reference.device, reference.dtype)
        total = torch.zeros((self.out_channels, *full_shape), device=reference.device, dtype=reference.dtype)
        weight_sum = torch.zeros(tuple(full_shape), device=reference.device, dtype=reference.dtype)
        for output, start in zip(patch_outputs, starts):
            region = window_slices(start, self.settings.patch_size)
            total[(slice(None), *region)] += output * weights
            weight_sum[region] += weights
        covered = weight_sum > 0
        blended = total / weight_sum.clamp_min(torch.finfo(reference.dtype).tiny)
        if fallback is None:
            return blended, covered
        return torch.where(covered, blended, fallback), covered

    # --- whole-volume inference ---------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: torch.Tensor, k: Optional[int] = None, use_coarse: bool = True,
                patch_batch_size: int = 2, tracker=None) -> tuple[torch.Tensor, dict[str, Any]]:
        """(1, C, *S) image (already at least patch-sized) -> ((C, *S) logits, stats).

        Deterministic: plain top-k on the scores, no noise. With use_coarse=False the global branch
        is not run, the first k candidates in grid order are used and nothing is refined, so k = all
        candidates reproduces the sliding window exactly.
        """
        full_shape = tuple(image.shape[2:])
        starts = window_starts(full_shape, self.settings.patch_size, self.settings.overlap)
        k = check_k(self.settings.k if k is None else k, len(starts))
        coarse_up = None
        if use_coarse:
            _, coarse_logits, score_map = self.global_pass(image)
            scores, _ = self.ranking_scores(score_map, coarse_logits, starts, full_shape)
            chosen = sorted(int(i) for i in deterministic_topk(scores, k))
            coarse_up = self.upsample_logits(coarse_logits, full_shape)[0]
        else:
            chosen = list(range(k))
        if tracker is not None:
            tracker.total = len(chosen)
        outputs = []
        for batch in patch_batches(chosen, patch_batch_size):
            if tracker is not None:
                tracker.check_cancel()
            batch_starts = [starts[i] for i in batch]
            regions = [window_slices(s, self.settings.patch_size) for s in batch_starts]
            patches = torch.stack([image[0][(slice(None), *r)] for r in regions])
            crops = None
            if coarse_up is not None:
                crops = torch.stack([coarse_up[(slice(None), *r)] for r in regions])
            outputs.extend(self.patch_logits(patches, crops).unbind(0))
            if tracker is not None:
                tracker.advance(len(regions))
        chosen_starts = [starts[i] for i in chosen]
        if coarse_up is None:
            logits, covered = self.blend(outputs, chosen_starts, full_shape, None)
            covered_voxels = int(covered.sum())
        else:
            logits, covered_voxels = self.blend_into(outputs, chosen_starts, coarse_up)
        stats = {"patches_evaluated": len(chosen), "candidates": len(starts), "k": k,
                 "selected_windows": [list(s) for s in chosen_starts],
                 "covered_fraction": covered_voxels / math.prod(full_shape), "used_coarse": use_coarse}
        return logits, stats

    def blend_into(self, patch_outputs: Sequence[torch.Tensor], starts: Sequence[Sequence[int]],
                   base: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Inference-only `blend`: Gaussian-blend the patches into `base` (C, *full; modified in place)
        inside the bounding box of the windows only, so the per-volume cost does not scale with the
        whole volume. Returns (base, number of voxels covered by a patch)."""
        patch = self.settings.patch_size
        low = [min(s[axis] for s in starts) for axis in range(self.spatial_dims)]
        high = [max(s[axis] for s in starts) + patch[axis] for axis in range(self.spatial_dims)]
        box = tuple(slice(a, b) for a, b in zip(low, high))
        reference = patch_outputs[0]
        weights = gaussian_importance(patch, self.settings.sigma_scale, reference.device, reference.dtype)
        total = torch.zeros((self.out_channels, *(b - a for a, b in zip(low, high))), device=reference.device,
                            dtype=reference.dtype)
        weight_sum = torch.zeros(total.shape[1:], device=reference.device, dtype=reference.dtype)
        for output, start in zip(patch_outputs, starts):
            region = tuple(slice(s - a, s - a + p) for s, a, p in zip(start, low, patch))
            total[(slice(None), *region)] += output * weights
            weight_sum[region] += weights
        covered = weight_sum > 0
        blended = total / weight_sum.clamp_min(torch.finfo(reference.dtype).tiny)
        target = base[(slice(None), *box)]
        target.copy_(torch.where(covered, blended, target))
        return base, int(covered.sum())


def build_topk_model(metadata) -> TopKSegmenter:
    """Rebuild the top-k model described by a checkpoint's `ModelMetadata` (weights not loaded)."""
    from ..networks import build_network

    if getattr(metadata, "sampler", None) != "topk":
        raise CheckpointError(f"Model sampler is '{getattr(metadata, 'sampler', None)}', not 'topk'.",
                              "Load it with the sliding-window engine instead.")
    settings = TopKSettings.from_dict(metadata.topk)
    if list(settings.patch_size) != list(metadata.patch_size):
        settings.patch_size = [int(p) for p in metadata.patch_size]
    backbone = build_network(metadata.architecture, metadata.spatial_dims, metadata.in_channels,
                             metadata.out_channels, **dict(metadata.architecture_kwargs))
    global_network = build_network(settings.global_architecture or metadata.architecture,
                                   metadata.spatial_dims, metadata.in_channels, metadata.out_channels,
                                   **dict(settings.global_kwargs))
    return TopKSegmenter(backbone, global_network, settings, metadata.spatial_dims,
                         metadata.in_channels, metadata.out_channels)
