"""Top-k patch sampling vs sliding window, trained with the same budget, measured on the same volumes.

No real labelled data ships with the project, so both models train and are tested on the synthetic
CT phantom (UNetSegmentLib.phantom: liver, spleen, kidneys among organ-like distractors). Both use
the same backbone (architecture, width, depth, patch size).

Budget rule: the same number of backbone patch-updates. Top-k is trained in stages
(UNetSegmentLib.topk.staged); its stage 1 is exactly the sliding-window backbone's training (same
function, sampler, loss, seed, batch size, --budget-s seconds), so it is run once and copied. Top-k
then spends --extra-s more seconds on its global branch + scorer and a Gumbel top-k fine-tune with
the backbone frozen; both figures are printed.

Reported side by side: Dice per label for several inference k, CPU wall time per volume and FLOPs
of whole-volume inference (both at the same patch batch size, the fastest for this backbone).

    python bench/topk_vs_sliding_window.py            # full run, the published figures (~14 min on 2 idle cores)
    python bench/topk_vs_sliding_window.py --quick    # smoke run (~1-2 min)

The last line is machine-readable (for the default inference k, --infer-k):
    sw_s=... topk_s=... speedup=... sw_dice=... topk_dice=... dice_drop=...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from UNetSegmentLib.networks import build_network  # noqa: E402
from UNetSegmentLib.phantom import FIELD_OF_VIEW_MM, LABEL_NAMES, make_case  # noqa: E402
from UNetSegmentLib.topk.inference import topk_inference  # noqa: E402
from UNetSegmentLib.topk.model import TopKSegmenter, TopKSettings  # noqa: E402
from UNetSegmentLib.topk.staged import fit_topk_staged, train_backbone_on_patches  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volumes and budget: a smoke run")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 128, 128], help="volume size z y x")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--coarse", type=int, nargs=3, default=[32, 40, 40], help="global branch input size")
    parser.add_argument("--k", type=int, default=5, help="patches chosen per fine-tune step")
    parser.add_argument("--infer-k", type=int, default=10, help="patches at inference for the last line")
    parser.add_argument("--k-values", type=int, nargs="+", default=[5, 10, 20, 40],
                        help="inference k values reported in the table")
    parser.add_argument("--features", type=int, default=8, help="backbone base width")
    parser.add_argument("--levels", type=int, default=3, help="backbone depth")
    parser.add_argument("--train-cases", type=int, default=6)
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="backbone training seconds (SW model = top-k stage 1)")
    parser.add_argument("--extra-s", type=float, default=150.0,
                        help="top-k stages 2+3 seconds (global branch + scorer, then fine-tune)")
    parser.add_argument("--finetune-share", type=float, default=0.4, help="share of --extra-s for stage 3")
    parser.add_argument("--sw-batch", type=int, default=4,
                        help="patches per backbone training step (batch 2 hits slow conv3d backward paths here)")
    parser.add_argument("--infer-batch", type=int, default=0,
                        help="patches per batch in SW inference (0: the fastest of 1, 2, 4, 8)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.patch, args.coarse = [64, 80, 80], [32, 32, 32], [24, 32, 32]
        args.train_cases, args.test_cases, args.budget_s, args.extra_s = 2, 1, 20.0, 10.0
        args.k_values, args.infer_k = [2, 5], 5
    return args


def phantom_cases(count, first_seed, shape):
    """Phantom volumes resampled (by spacing choice) to exactly `shape` (z, y, x)."""
    spacing = tuple(fov / n for fov, n in zip(FIELD_OF_VIEW_MM, shape[::-1]))  # (x, y, z) mm
    cases = []
    for index in range(count):
        case = make_case(first_seed + index, spacing=spacing)
        assert case.image.shape == tuple(shape), case.image.shape
        cases.append((case.image.astype(np.float32), case.label.astype(np.int64)))
    return cases


def ct_normaliser(cases):
    """nnU-Net CT scheme: clip to the training foreground's 0.5/99.5 percentiles, then z-score."""
    foreground = np.concatenate([image[label > 0] for image, label in cases])
    low, high = np.percentile(foreground, [0.5, 99.5])
    clipped = np.clip(foreground, low, high)
    mean, std = float(clipped.mean()), float(clipped.std())
    return lambda image: ((np.clip(image, low, high) - mean) / std).astype(np.float32)[None]


def sliding_window_predict(network, image, patch, batch):
    """The project's sliding-window engine; until it exists, the top-k model with every candidate
    and the coarse branch off, which the tests prove equal to MONAI's sliding window."""
    try:
        from UNetSegmentLib.inference.sliding_window import InferenceOptions, sliding_window_inference
    except ImportError:
        settings = TopKSettings(k=10 ** 9, patch_size=list(patch), coarse_size=list(patch))
        wrapper = TopKSegmenter(network, torch.nn.Identity(), settings, 3, 1, network.out_channels)
        return topk_inference(wrapper, image, k=10 ** 9, use_coarse=False, patch_batch_size=batch)
    options = InferenceOptions(patch_size=tuple(patch), overlap=0.5)
    for name in ("batch_size", "sw_batch_size"):
        if hasattr(options, name):
            setattr(options, name, batch)
    return sliding_window_inference(network, image, options)


def fastest_batch(network, patch, candidates=(1, 2, 4, 8)):
    """Patches per batch with the lowest time per patch for this backbone on this CPU (conv3d speed
    varies a lot with batch size here), so the sliding window is timed at its best."""
    timings = {}
    with torch.no_grad():
        for batch in candidates:
            x = torch.rand(batch, 1, *patch)
            network(x)
            began = time.perf_counter()
            network(x)
            timings[batch] = (time.perf_counter() - began) / batch
    return min(timings, key=timings.get), timings


def dice_per_label(prediction, truth, labels):
    scores = {}
    for value in labels:
        p, t = prediction == value, truth == value
        denominator = p.sum() + t.sum()
        scores[value] = 1.0 if denominator == 0 else float(2 * (p & t).sum() / denominator)
    return scores


def count_flops(function):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    labels = [v for v in sorted(LABEL_NAMES) if v != 0]
    out_channels = len(LABEL_NAMES)
    k_values = sorted(set(args.k_values) | {args.infer_k})
    print(f"[bench] torch {torch.__version__}, {torch.get_num_threads()} threads; volume {args.shape}, "
          f"patch {args.patch}, coarse {args.coarse}, k={args.k} (training), inference k {k_values} "
          f"(default {args.infer_k}), backbone budget {args.budget_s:.0f}s, top-k extra {args.extra_s:.0f}s",
          flush=True)
    started = time.perf_counter()
    train_raw = phantom_cases(args.train_cases, 1000 + args.seed, args.shape)
    test_raw = phantom_cases(args.test_cases, 5000 + args.seed, args.shape)
    normalise = ct_normaliser(train_raw)
    train = [(normalise(image), label) for image, label in train_raw]
    test = [(normalise(image), label) for image, label in test_raw]
    print(f"[bench] {len(train)} train / {len(test)} test phantom volumes in "
          f"{time.perf_counter() - started:.1f}s", flush=True)

    # Budget rule: both models get the same backbone patch-updates. Stage 1 of staged top-k training
    # *is* the sliding-window backbone's training (same function, sampler, loss, seed, steps), so it is
    # run once and copied; top-k then spends `extra_s` on its global branch, scorer and fine-tune.
    backbone_kwargs = {"features": args.features, "levels": args.levels}
    torch.manual_seed(args.seed)
    sw_network = build_network("unet", 3, 1, out_channels, **backbone_kwargs)
    backbone_fit = train_backbone_on_patches(sw_network, train, args.patch, steps=10 ** 9, batch_size=args.sw_batch,
                                             learning_rate=args.lr, seed=args.seed, time_budget_s=args.budget_s)
    print(f"[bench] backbone (shared by SW and top-k stage 1): {backbone_fit.steps} steps x {args.sw_batch} "
          f"patches in {backbone_fit.seconds:.0f}s", flush=True)

    torch.manual_seed(args.seed)
    settings = TopKSettings(k=args.k, patch_size=list(args.patch), coarse_size=list(args.coarse),
                            global_kwargs={"features": 8, "levels": 3})
    topk_model = TopKSegmenter(copy.deepcopy(sw_network),
                               build_network("unet", 3, 1, out_channels, **settings.global_kwargs),
                               settings, 3, 1, out_channels)
    fit = fit_topk_staged(topk_model, train, backbone_steps=0, global_steps=10 ** 9, finetune_steps=10 ** 9,
                          learning_rate=args.lr, seed=args.seed, flip_axes=(),
                          time_budgets_s=(None, args.extra_s * (1 - args.finetune_share),
                                          args.extra_s * args.finetune_share))
    print(f"[bench] top-k stages 2+3: global branch + scorer {fit.global_branch.steps} steps in "
          f"{fit.global_branch.seconds:.0f}s, Gumbel top-k fine-tune (backbone frozen) {fit.finetune.steps} steps "
          f"in {fit.finetune.seconds:.0f}s; global branch warm-started from the backbone: "
          f"{fit.global_warm_started}", flush=True)

    if args.infer_batch <= 0:
        args.infer_batch, timings = fastest_batch(sw_network, args.patch)
        print(f"[bench] inference batch {args.infer_batch} for both (s/patch by batch: "
              f"{ {b: round(t, 3) for b, t in timings.items()} })", flush=True)
    # warm-up (allocator, thread pool) so neither method pays first-call costs in the timing
    sliding_window_predict(sw_network, test[0][0][:, :args.patch[0], :args.patch[1], :args.patch[2]],
                           args.patch, args.infer_batch)
    topk_inference(topk_model, test[0][0], k=args.infer_k, patch_batch_size=args.infer_batch)

    sw_seconds, sw_dice = 0.0, []
    topk_seconds = {k: 0.0 for k in k_values}
    topk_dice = {k: [] for k in k_values}
    topk_stats = {}
    for image, truth in test:
        with torch.no_grad():
            began = time.perf_counter()
            sw = sliding_window_predict(sw_network, image, args.patch, args.infer_batch)
            sw_seconds += time.perf_counter() - began
            sw_dice.append(dice_per_label(np.asarray(sw.labels), truth, labels))
            for k in k_values:
                began = time.perf_counter()
                topk = topk_inference(topk_model, image, k=k, patch_batch_size=args.infer_batch)
                topk_seconds[k] += time.perf_counter() - began
                topk_dice[k].append(dice_per_label(np.asarray(topk.labels), truth, labels))
                topk_stats[k] = {key: topk.stats[key] for key in ("patches_evaluated", "candidates", "k",
                                                                  "covered_fraction")}
        print(f"[bench] test volume done: SW {sw_seconds:.1f}s so far", flush=True)

    image = test[0][0]
    candidates = topk_stats[args.infer_k]["candidates"]
    with torch.no_grad():  # SW = every candidate through the backbone; blending has no FLOPs to count
        sw_flops = candidates * count_flops(lambda: sw_network(torch.zeros(1, 1, *args.patch)))
        topk_flops = {k: count_flops(lambda: topk_inference(topk_model, image, k=k, patch_batch_size=args.infer_batch))
                      for k in k_values}

    def mean_dice(per_case):
        return {v: float(np.mean([case[v] for case in per_case])) for v in labels}

    sw_label = mean_dice(sw_dice)
    topk_label = {k: mean_dice(topk_dice[k]) for k in k_values}
    header = "".join(f"{f'top-k k={k}':>12}" for k in k_values)
    print(f"\n{'label':<10}{'SW':>10}{header}")
    for value in labels:
        row = "".join(f"{topk_label[k][value]:>12.4f}" for k in k_values)
        print(f"{LABEL_NAMES[value]:<10}{sw_label[value]:>10.4f}{row}")
    sw_mean = float(np.mean(list(sw_label.values())))
    topk_mean = {k: float(np.mean(list(topk_label[k].values()))) for k in k_values}
    print(f"{'mean':<10}{sw_mean:>10.4f}" + "".join(f"{topk_mean[k]:>12.4f}" for k in k_values))
    print(f"{'s/volume':<10}{sw_seconds / len(test):>10.2f}"
          + "".join(f"{topk_seconds[k] / len(test):>12.2f}" for k in k_values))
    print(f"{'speedup':<10}{1.0:>10.2f}" + "".join(f"{sw_seconds / topk_seconds[k]:>12.2f}" for k in k_values))
    print(f"{'GFLOPs':<10}{sw_flops / 1e9:>10.1f}" + "".join(f"{topk_flops[k] / 1e9:>12.1f}" for k in k_values))
    print(f"{'covered':<10}{1.0:>10.2f}"
          + "".join(f"{topk_stats[k]['covered_fraction']:>12.2f}" for k in k_values))
    print(f"\nSW evaluates all {candidates} candidate patches; top-k evaluates k patches + one coarse pass "
          f"(inference batch {args.infer_batch} for both); default k={args.infer_k}.")
    k = args.infer_k
    speedup = sw_seconds / topk_seconds[k]
    summary = {"sw_s": sw_seconds, "topk_s": topk_seconds[k], "speedup": speedup, "k": k,
               "sw_dice": sw_mean, "topk_dice": topk_mean[k], "dice_drop": sw_mean - topk_mean[k],
               "sw_gflops": sw_flops / 1e9, "topk_gflops": topk_flops[k] / 1e9,
               "per_k": {str(kk): {"seconds": topk_seconds[kk], "dice": topk_mean[kk], "gflops": topk_flops[kk] / 1e9,
                                   "per_label": {LABEL_NAMES[v]: topk_label[kk][v] for v in labels},
                                   **topk_stats[kk]} for kk in k_values},
               "sw_per_label": {LABEL_NAMES[v]: sw_label[v] for v in labels},
               "train": {"budget_rule": "same backbone patch-updates", "backbone_steps": backbone_fit.steps,
                         "backbone_s": backbone_fit.seconds, "global_steps": fit.global_branch.steps,
                         "global_s": fit.global_branch.seconds, "finetune_steps": fit.finetune.steps,
                         "finetune_s": fit.finetune.seconds},
               "args": vars(args), "total_s": time.perf_counter() - started}
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
            json.dump(summary, handle, indent=2)
        os.replace(handle.name, args.json)
    print(f"sw_s={summary['sw_s']:.2f} topk_s={summary['topk_s']:.2f} speedup={speedup:.2f} "
          f"sw_dice={sw_mean:.4f} topk_dice={topk_mean[k]:.4f} dice_drop={sw_mean - topk_mean[k]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
