"""Learned top-k patch sampling: relaxation gradients, patch budget, equivalence with sliding window,
determinism, bad input, checkpoint metadata round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from UNetSegmentLib.errors import Cancelled, CheckpointError, InputError
from UNetSegmentLib.progress import CancelToken
from UNetSegmentLib.topk.inference import topk_inference
from UNetSegmentLib.topk.model import (TopKSegmenter, TopKSettings, gaussian_importance, pad_to_patch,
                                       window_starts)
from UNetSegmentLib.topk.selection import (deterministic_topk, gumbel_topk_straight_through,
                                           temperature_at)
from UNetSegmentLib.topk.training import fit_topk, topk_training_step

LABELS = 3


class TinyNet(nn.Module):
    """Stand-in backbone: any (N, in, *S) -> (N, out, *S) module must work."""

    def __init__(self, in_channels=1, out_channels=LABELS, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv3d(4, out_channels, 1))

    def forward(self, x):
        return self.body(x)


class CountingNet(nn.Module):
    """Wraps a backbone and counts how many patches went through it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.patches = 0
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.patches += x.shape[0]
        return self.inner(x)


def make_model(k=2, patch=(8, 8, 8), coarse=(8, 8, 8), seed=0, **extra):
    settings = TopKSettings(k=k, patch_size=list(patch), coarse_size=list(coarse), scorer_channels=4,
                            refine_channels=4, **extra)
    torch.manual_seed(seed)
    return TopKSegmenter(CountingNet(TinyNet(seed=seed)), TinyNet(seed=seed + 1), settings, 3, 1, LABELS)


def phantom(shape=(16, 20, 20), seed=0):
    """A bright blob (label 1) and a dark blob (label 2) in noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    label = np.zeros(shape, np.int64)
    centres = [(4, 5, 6), (11, 14, 13)]
    for value, centre in enumerate(centres, start=1):
        distance = sum((g - c) ** 2 for g, c in zip(grid, centre))
        label[distance < 9] = value
    image = rng.normal(0, 0.3, shape).astype(np.float32)
    image[label == 1] += 2.0
    image[label == 2] -= 2.0
    return image[None], label


# --- selection ----------------------------------------------------------------------------------

def test_gumbel_topk_picks_distinct_one_hot_rows_and_passes_gradient_to_every_score():
    scores = torch.randn(10, requires_grad=True)
    values = torch.randn(10)
    indices, selection = gumbel_topk_straight_through(scores, 4, 0.7, torch.Generator().manual_seed(1))
    assert len(set(indices.tolist())) == 4
    assert torch.allclose(selection.detach(), torch.nn.functional.one_hot(indices, 10).float(), atol=1e-6)
    (selection @ values).pow(2).sum().backward()
    assert scores.grad is not None
    assert int((scores.grad.abs() > 0).sum()) == 10


def test_deterministic_topk_breaks_ties_by_index_and_temperature_anneals():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert deterministic_topk(scores, 2).tolist() == [1, 2]
    assert deterministic_topk(scores, 99).tolist() == [1, 2, 4, 0, 3]
    assert temperature_at(0, 10, 1.0, 0.5) == pytest.approx(1.0)
    assert temperature_at(9, 10, 1.0, 0.5) == pytest.approx(0.5)
    assert 0.5 < temperature_at(5, 10, 1.0, 0.5) < 1.0


# --- training -----------------------------------------------------------------------------------

def test_training_step_gradients_reach_scorer_through_the_relaxation_alone():
    image, label = phantom()
    model = make_model(k=2, rank_weight=0.0, entropy_weight=0.0, mask_background=False)
    terms = topk_training_step(model, torch.from_numpy(image)[None], torch.from_numpy(label)[None], 2, 0.7,
                               torch.Generator().manual_seed(0))
    terms["total"].backward()
    for name, module in (("scorer", model.scorer), ("backbone", model.backbone),
                         ("global", model.global_network)):
        norm = sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
        assert norm > 0, f"no gradient reached the {name}"


def test_fit_lowers_the_loss_and_cancel_stops_training():
    image, label = phantom()
    model = make_model(k=2)
    result = fit_topk(model, [(image, label)], steps=30, learning_rate=1e-2, seed=0)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        fit_topk(model, [(image, label)], steps=3, cancel=token)
    with pytest.raises(InputError):
        fit_topk(model, [(image, label[:-1])], steps=1)


# --- inference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_inference_evaluates_exactly_k_patches(k):
    image, _ = phantom()
    model = make_model(k=5)
    result = topk_inference(model, image, k=k)
    candidates = len(window_starts(image.shape[1:], [8, 8, 8], 0.5))
    assert model.backbone.patches == k
    assert result.stats["patches_evaluated"] == k
    assert result.stats["candidates"] == candidates
    assert result.labels.shape == image.shape[1:]


def test_all_patches_without_coarse_branch_equals_monai_sliding_window():
    monai_inferers = pytest.importorskip("monai.inferers")
    image, _ = phantom(shape=(13, 20, 17))
    model = make_model(patch=(8, 8, 8))
    result = topk_inference(model, image, k=10 ** 6, use_coarse=False, return_probabilities=True)
    assert result.stats["k"] == result.stats["candidates"] == model.backbone.patches
    with torch.no_grad():
        expected = monai_inferers.sliding_window_inference(
            torch.from_numpy(image)[None], (8, 8, 8), 1, model.backbone.inner, overlap=0.5, mode="gaussian",
            sigma_scale=0.125)
    np.testing.assert_allclose(result.logits, expected[0].numpy(), atol=1e-5, rtol=0)


def test_all_patches_without_coarse_branch_equals_project_sliding_window():
    engine = pytest.importorskip("UNetSegmentLib.inference.sliding_window")
    image, _ = phantom(shape=(13, 20, 17))
    model = make_model(patch=(8, 8, 8))
    result = topk_inference(model, image, k=10 ** 6, use_coarse=False)
    options = engine.InferenceOptions(patch_size=(8, 8, 8), overlap=0.5)
    if hasattr(options, "output"):
        options.output = "logits"  # the engine keeps only labels unless asked
    expected = engine.sliding_window_inference(model.backbone.inner, image, options)
    np.testing.assert_allclose(np.asarray(result.logits), np.asarray(expected.logits), atol=1e-5, rtol=0)


def test_window_grid_and_gaussian_match_monai():
    monai_utils = pytest.importorskip("monai.data.utils")
    from monai.inferers.utils import _get_scan_interval

    for shape, patch in [((13, 20, 17), (8, 8, 8)), ((64, 80, 80), (48, 48, 48)), ((8, 9, 30), (8, 8, 8))]:
        interval = _get_scan_interval(shape, patch, 3, (0.5,) * 3)
        slices = monai_utils.dense_patch_slices(shape, patch, interval)
        expected = [tuple(s.start for s in window) for window in slices]
        assert window_starts(shape, patch, 0.5) == expected
    expected_map = monai_utils.compute_importance_map((8, 6, 10), mode="gaussian", sigma_scale=0.125)
    assert torch.allclose(gaussian_importance((8, 6, 10), 0.125), expected_map, atol=1e-7)


def test_inference_is_deterministic_and_handles_images_smaller_than_a_patch():
    image, _ = phantom()
    model = make_model(k=2)
    first = topk_inference(model, image, return_probabilities=True, return_uncertainty=True)
    torch.manual_seed(123)  # global RNG state must not matter
    second = topk_inference(model, image, return_probabilities=True, return_uncertainty=True)
    assert np.array_equal(first.logits, second.logits)
    assert first.stats["selected_windows"] == second.stats["selected_windows"]
    assert np.allclose(first.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert first.uncertainty.min() >= 0 and first.uncertainty.max() <= 1 + 1e-6
    small = topk_inference(model, image[:, :5, :7, :6])
    assert small.labels.shape == (5, 7, 6)


def test_uncovered_voxels_take_the_coarse_prediction():
    image, _ = phantom()
    model = make_model(k=1)
    result = topk_inference(model, image)
    padded, _ = pad_to_patch(torch.from_numpy(image)[None], [8, 8, 8])
    with torch.no_grad():
        _, coarse_logits, _ = model.global_pass(padded)
        coarse = model.upsample_logits(coarse_logits, padded.shape[2:])[0].numpy()
    (start,) = result.stats["selected_windows"]
    outside = np.ones(image.shape[1:], bool)
    outside[tuple(slice(s, s + 8) for s in start)] = False
    np.testing.assert_allclose(result.logits[:, outside], coarse[:, outside], atol=1e-6)
    assert 0 < result.stats["covered_fraction"] < 1


def test_candidates_with_coarse_background_rank_last():
    image, _ = phantom()
    model = make_model(k=1)
    with torch.no_grad():
        model.global_network.body[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        model.global_network.body[-1].weight.zero_()
        model.global_network.body[-1].bias[0] = 5.0  # coarse says background everywhere ...
    padded = torch.from_numpy(image)[None]
    starts = window_starts(padded.shape[2:], [8, 8, 8], 0.5)
    with torch.no_grad():
        _, coarse_logits, score_map = model.global_pass(padded)
        coarse_logits[0, 1, :2, :2, :2] = 10.0  # ... except one corner
        scores, raw = model.ranking_scores(score_map, coarse_logits, starts, padded.shape[2:])
    best = int(deterministic_topk(scores, 1))
    assert starts[best] == (0, 0, 0)
    assert float(scores[best]) == pytest.approx(float(raw[best]))
    assert all(float(scores[i]) < -1000 for i in range(len(starts)) if starts[i][0] > 4)


def test_bad_input_names_the_problem():
    image, _ = phantom()
    model = make_model()
    with pytest.raises(InputError, match="k must be at least 1"):
        topk_inference(model, image, k=0)
    with pytest.raises(InputError, match="whole number"):
        topk_inference(model, image, k=2.5)
    with pytest.raises(InputError, match="channels"):
        topk_inference(model, np.concatenate([image, image]))
    with pytest.raises(InputError, match="shape"):
        topk_inference(model, image[0])
    bad = image.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        topk_inference(model, bad)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        topk_inference(model, image, cancel=token)
    clamped = topk_inference(model, image, k=10 ** 6)
    assert clamped.stats["k"] == clamped.stats["candidates"] == clamped.stats["patches_evaluated"]


# --- checkpoint metadata ------------------------------------------------------------------------

def test_build_topk_model_from_metadata_round_trips_weights():
    pytest.importorskip("UNetSegmentLib.networks.unet")
    from UNetSegmentLib.metadata import LabelInfo, ModelMetadata
    from UNetSegmentLib.topk.model import build_topk_model

    settings = TopKSettings(k=2, patch_size=[16, 16, 16], coarse_size=[16, 16, 16],
                            global_kwargs={"features": 4, "levels": 2})
    metadata = ModelMetadata(
        architecture="unet", architecture_kwargs={"features": 4, "levels": 3}, spatial_dims=3, in_channels=1,
        labels=[LabelInfo(i, f"l{i}", (0.0, 0.0, 0.0)) for i in range(LABELS)], patch_size=[16, 16, 16],
        target_spacing=[1.0, 1.0, 1.0], sampler="topk", topk=settings.to_dict())
    model = build_topk_model(ModelMetadata.from_dict(metadata.to_dict()))
    again = build_topk_model(metadata)
    again.load_state_dict(model.state_dict())
    image = np.random.default_rng(0).normal(size=(1, 20, 24, 16)).astype(np.float32)
    assert np.array_equal(topk_inference(model, image).logits, topk_inference(again, image).logits)
    metadata.sampler = "sliding_window"
    with pytest.raises(CheckpointError):
        build_topk_model(metadata)


def test_window_sums_match_direct_sums():
    volume = torch.rand(9, 11, 7, dtype=torch.float64)
    starts = window_starts(volume.shape, (4, 5, 3), 0.5)
    from UNetSegmentLib.topk.model import window_sums

    expected = torch.stack([volume[tuple(slice(s, s + p) for s, p in zip(start, (4, 5, 3)))].sum()
                            for start in starts])
    assert torch.allclose(window_sums(volume, starts, (4, 5, 3)), expected)


def test_train_topk_writes_a_topk_checkpoint_from_a_dataset_folder(tmp_path):
    pytest.importorskip("UNetSegmentLib.checkpoint")
    pytest.importorskip("UNetSegmentLib.preprocessing")
    pytest.importorskip("UNetSegmentLib.io")
    from UNetSegmentLib import phantom, training
    from UNetSegmentLib.topk.model import build_topk_model
    from UNetSegmentLib.topk.training import register, train_topk

    dataset = tmp_path / "Dataset"
    phantom.write_dataset(str(dataset), cases=2, seed=0)
    config = training.TrainingConfig(
        dataset_dir=str(dataset), output=str(tmp_path / "topk.pt"), architecture="unet",
        architecture_kwargs={"features": 4, "levels": 2}, patch_size=(16, 16, 16), epochs=1,
        iterations_per_epoch=2, folds=2, target_spacing=(8.0, 8.0, 8.0), sampler="topk", device="cpu")
    result = train_topk(config, settings={"k": 2, "global_kwargs": {"features": 4, "levels": 2}})
    assert (tmp_path / "topk.pt").is_file()
    assert result.metadata.sampler == "topk" and result.metadata.topk["k"] == 2
    assert set(result.validation_dice) == {"liver", "spleen", "kidney"}
    model = build_topk_model(result.metadata)
    assert model.settings.coarse_size == result.metadata.topk["coarse_size"]
    from UNetSegmentLib.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "topk.pt")
    image = np.random.default_rng(0).normal(size=(1, 20, 24, 28)).astype(np.float32)
    segmented = topk_inference(loaded.network, image, k=1)
    assert segmented.stats["patches_evaluated"] == 1 and segmented.labels.shape == (20, 24, 28)
    assert result.metadata.training["training_mode"] == "staged"
    register()
    assert training.EXTERNAL_TRAINERS["topk"] is train_topk
    config.overwrite = True
    with pytest.raises(InputError, match="training_mode"):
        train_topk(config, settings={"training_mode": "joint"})


# --- staged training and inference speed-ups ------------------------------------------------------

def test_patch_batches_leave_no_batch_of_one_and_inference_uses_them():
    from UNetSegmentLib.topk.model import patch_batches

    assert patch_batches(range(5), 2) == [[0, 1, 2], [3, 4]]
    assert patch_batches(range(1), 4) == [[0]]
    assert sum(patch_batches(range(11), 4), []) == list(range(11))
    image, _ = phantom()
    model = make_model(k=5)
    topk_inference(model, image, k=5, patch_batch_size=2)
    assert model.backbone.patches == 5 and model.backbone.calls == 2


def test_blend_into_equals_whole_volume_blend():
    model = make_model()
    full = (16, 20, 20)
    starts = [(0, 0, 0), (4, 8, 4), (8, 12, 12)]
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randn(LABELS, 8, 8, 8, generator=generator) for _ in starts]
    fallback = torch.randn(LABELS, *full, generator=generator)
    expected, covered = model.blend(outputs, starts, full, fallback)
    result, covered_voxels = model.blend_into(outputs, starts, fallback.clone())
    assert torch.allclose(result, expected, atol=1e-6)
    assert covered_voxels == int(covered.sum())


def test_channel_argmax_matches_torch_argmax_including_ties():
    from UNetSegmentLib.topk.inference import channel_argmax

    logits = torch.randn(4, 6, 7, 5, generator=torch.Generator().manual_seed(0))
    logits[2, :3] = logits[1, :3]  # ties go to the first channel, like argmax
    assert torch.equal(channel_argmax(logits).long(), logits.argmax(dim=0))


def test_staged_training_trains_each_stage_and_freezes_the_backbone_after_stage_one():
    from UNetSegmentLib.topk.staged import fit_topk_staged

    image, label = phantom()
    model = make_model(k=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fit = fit_topk_staged(model, [(image, label)], backbone_steps=0, global_steps=8, finetune_steps=2,
                          learning_rate=1e-2, seed=0)
    assert (fit.backbone.steps, fit.global_branch.steps, fit.finetune.steps) == (0, 8, 2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert not any(name.startswith("backbone.") for name in changed)
    for part in ("global_network.", "scorer.", "refiner."):  # refiner is trained only by the Gumbel stage
        assert any(name.startswith(part) for name in changed), part
    assert all(p.requires_grad for p in model.parameters())
    assert np.mean(fit.global_branch.losses[-3:]) < np.mean(fit.global_branch.losses[:3])

    fit = fit_topk_staged(model, [(image, label)], backbone_steps=3, global_steps=0, finetune_steps=0,
                          batch_size=2, seed=0)
    assert fit.backbone.steps == 3
    assert not torch.equal(model.backbone.inner.body[0].weight, before["backbone.inner.body.0.weight"])
    with pytest.raises(InputError, match="global_steps"):
        fit_topk_staged(model, [(image, label)], backbone_steps=0, global_steps=-1, finetune_steps=0)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        fit_topk_staged(model, [(image, label)], backbone_steps=1, global_steps=1, finetune_steps=1, cancel=token)


def test_global_branch_trains_on_a_volume_that_fits_one_window():
    """Real hippocampus crops (~35x50x35) fit one 40x56x40 window: a single rank candidate must give a
    finite loss (its sample std is NaN), so that `train --sampler topk` works on them."""
    from UNetSegmentLib.topk.staged import fit_topk_staged, global_branch_step

    image, label = phantom(shape=(8, 8, 8))
    model = make_model(k=1, patch=(8, 8, 8), coarse=(8, 8, 8))
    images = torch.from_numpy(image)[None]
    labels = torch.from_numpy(label)[None]
    assert len(window_starts((8, 8, 8), (8, 8, 8), model.settings.overlap)) == 1
    loss = global_branch_step(model, images, labels, (8, 8, 8))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.global_network.parameters())
    fit = fit_topk_staged(model, [(image, label)], backbone_steps=0, global_steps=3, finetune_steps=1, seed=0)
    assert fit.global_branch.steps == 3 and all(np.isfinite(fit.global_branch.losses))


def test_batch_of_one_is_run_as_two_on_cpu_without_changing_the_result():
    from UNetSegmentLib.topk.model import run_avoiding_batch_of_one

    network = CountingNet(TinyNet()).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        output = run_avoiding_batch_of_one(network, x)
        assert network.patches == 2 and output.shape == (1, LABELS, 8, 8, 8)
        assert torch.allclose(output, network.inner(x), atol=1e-6)
    run_avoiding_batch_of_one(network, x)  # gradients wanted: run as given
    assert network.patches == 3


def test_global_branch_is_warm_started_from_a_matching_backbone_only():
    from UNetSegmentLib.topk.staged import copy_matching_weights, fit_topk_staged

    source, target = TinyNet(seed=1), TinyNet(seed=2)
    assert copy_matching_weights(source, target)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    assert not copy_matching_weights(TinyNet(out_channels=2), target)
    image, label = phantom()
    model = make_model(k=2)
    fit = fit_topk_staged(model, [(image, label)], backbone_steps=0, global_steps=0, finetune_steps=0)
    assert not fit.global_warm_started  # CountingNet wraps the backbone: names differ, nothing copied
