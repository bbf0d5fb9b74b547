"""Top-k patch sampling vs sliding window, trained with the same budget, measured on the same volumes.

No real labelled data ships with the project, so both models train and are tested on the synthetic
CT phantom (UNetSegmentLib.phantom: liver, spleen, kidneys among organ-like distractors). Both use
the same backbone (architecture, width, depth, patch size) and the same wall-clock training budget.
Reported side by side: Dice per label, CPU wall time and FLOPs of whole-volume inference.

    python bench/topk_vs_sliding_window.py            # full run (~10-15 min on 2 idle cores)
    python bench/topk_vs_sliding_window.py --quick    # smoke run (~1-2 min)

The last line is machine-readable:
    sw_s=... topk_s=... speedup=... sw_dice=... topk_dice=... dice_drop=...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from UNetSegmentLib.losses import DiceCELoss  # noqa: E402
from UNetSegmentLib.networks import build_network  # noqa: E402
from UNetSegmentLib.phantom import FIELD_OF_VIEW_MM, LABEL_NAMES, make_case  # noqa: E402
from UNetSegmentLib.sampling import ForegroundPatchSampler  # noqa: E402
from UNetSegmentLib.topk.inference import topk_inference  # noqa: E402
from UNetSegmentLib.topk.model import TopKSegmenter, TopKSettings  # noqa: E402
from UNetSegmentLib.topk.training import fit_topk  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volumes and budget: a smoke run")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 128, 128], help="volume size z y x")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--coarse", type=int, nargs=3, default=[32, 40, 40], help="global branch input size")
    parser.add_argument("--k", type=int, default=5, help="patches chosen per training step")
    parser.add_argument("--infer-k", type=int, default=None, help="patches at inference (default: --k)")
    parser.add_argument("--features", type=int, default=8, help="backbone base width")
    parser.add_argument("--levels", type=int, default=3, help="backbone depth")
    parser.add_argument("--train-cases", type=int, default=6)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per model")
    parser.add_argument("--sw-batch", type=int, default=2, help="patches per SW training step")
    parser.add_argument("--infer-batch", type=int, default=0,
                        help="patches per batch in SW inference (0: the fastest of 1, 2, 4, 8)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    args.infer_k = args.k if args.infer_k is None else args.infer_k
    if args.quick:
        args.shape, args.patch, args.coarse = [64, 80, 80], [32, 32, 32], [24, 32, 32]
        args.train_cases, args.test_cases, args.budget_s = 2, 1, 20.0
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


def train_sliding_window_backbone(network, cases, patch, batch, budget_s, lr, seed):
    sampler = ForegroundPatchSampler(cases, patch, seed=seed)
    loss_function = DiceCELoss()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-5)
    network.train()
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < budget_s:
        images, labels = sampler.sample_batch(batch)
        logits = network(torch.from_numpy(images))
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        loss = loss_function(logits, torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    network.eval()
    return steps, time.perf_counter() - started


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
    print(f"[bench] torch {torch.__version__}, {torch.get_num_threads()} threads; volume {args.shape}, "
          f"patch {args.patch}, coarse {args.coarse}, k={args.k} (inference {args.infer_k}), "
          f"budget {args.budget_s:.0f}s per model", flush=True)
    started = time.perf_counter()
    train_raw = phantom_cases(args.train_cases, 1000 + args.seed, args.shape)
    test_raw = phantom_cases(args.test_cases, 5000 + args.seed, args.shape)
    normalise = ct_normaliser(train_raw)
    train = [(normalise(image), label) for image, label in train_raw]
    test = [(normalise(image), label) for image, label in test_raw]
    print(f"[bench] {len(train)} train / {len(test)} test phantom volumes in "
          f"{time.perf_counter() - started:.1f}s", flush=True)

    backbone_kwargs = {"features": args.features, "levels": args.levels}
    torch.manual_seed(args.seed)
    sw_network = build_network("unet", 3, 1, out_channels, **backbone_kwargs)
    sw_steps, sw_train_s = train_sliding_window_backbone(sw_network, train, args.patch, args.sw_batch,
                                                         args.budget_s, args.lr, args.seed)
    print(f"[bench] sliding-window backbone: {sw_steps} steps x {args.sw_batch} patches in {sw_train_s:.0f}s",
          flush=True)

    torch.manual_seed(args.seed)
    settings = TopKSettings(k=args.k, patch_size=list(args.patch), coarse_size=list(args.coarse),
                            global_kwargs={"features": 8, "levels": 3})
    topk_model = TopKSegmenter(build_network("unet", 3, 1, out_channels, **backbone_kwargs),
                               build_network("unet", 3, 1, out_channels, **settings.global_kwargs),
                               settings, 3, 1, out_channels)
    fit = fit_topk(topk_model, train, steps=10 ** 9, learning_rate=args.lr, seed=args.seed,
                   time_budget_s=args.budget_s, log_every=25)
    print(f"[bench] top-k model: {fit.steps} steps x ({args.k} + {settings.random_patches}) patches "
          f"in {fit.seconds:.0f}s", flush=True)

    if args.infer_batch <= 0:
        args.infer_batch, timings = fastest_batch(sw_network, args.patch)
        print(f"[bench] SW inference batch {args.infer_batch} (s/patch by batch: "
              f"{ {b: round(t, 3) for b, t in timings.items()} })", flush=True)
    # warm-up (allocator, thread pool) so neither method pays first-call costs in the timing
    sliding_window_predict(sw_network, test[0][0][:, :args.patch[0], :args.patch[1], :args.patch[2]],
                           args.patch, args.infer_batch)
    topk_inference(topk_model, test[0][0], k=args.infer_k, patch_batch_size=args.infer_k)

    rows = {"sw": {"seconds": 0.0, "dice": []}, "topk": {"seconds": 0.0, "dice": []}}
    coarse_only = []
    for image, truth in test:
        with torch.no_grad():
            began = time.perf_counter()
            sw = sliding_window_predict(sw_network, image, args.patch, args.infer_batch)
            rows["sw"]["seconds"] += time.perf_counter() - began
            began = time.perf_counter()
            topk = topk_inference(topk_model, image, k=args.infer_k, patch_batch_size=args.infer_k)
            rows["topk"]["seconds"] += time.perf_counter() - began
            coarse = topk_inference(topk_model, image, k=1, patch_batch_size=1)
        rows["sw"]["dice"].append(dice_per_label(np.asarray(sw.labels), truth, labels))
        rows["topk"]["dice"].append(dice_per_label(np.asarray(topk.labels), truth, labels))
        coarse_only.append(dice_per_label(np.asarray(coarse.labels), truth, labels))
        rows["topk"]["stats"] = {key: topk.stats[key] for key in ("patches_evaluated", "candidates", "k",
                                                                   "covered_fraction")}
    image = test[0][0]
    with torch.no_grad():
        rows["sw"]["flops"] = count_flops(lambda: sliding_window_predict(sw_network, image, args.patch,
                                                                         args.infer_batch))
        rows["topk"]["flops"] = count_flops(lambda: topk_inference(topk_model, image, k=args.infer_k,
                                                                   patch_batch_size=args.infer_k))

    def mean_dice(per_case):
        return {v: float(np.mean([case[v] for case in per_case])) for v in labels}

    sw_label, topk_label, k1_label = mean_dice(rows["sw"]["dice"]), mean_dice(rows["topk"]["dice"]), \
        mean_dice(coarse_only)
    print(f"\n{'label':<10}{'SW Dice':>10}{'top-k Dice':>12}{'k=1 Dice':>10}")
    for value in labels:
        print(f"{LABEL_NAMES[value]:<10}{sw_label[value]:>10.4f}{topk_label[value]:>12.4f}{k1_label[value]:>10.4f}")
    sw_dice, topk_dice = float(np.mean(list(sw_label.values()))), float(np.mean(list(topk_label.values())))
    print(f"{'mean':<10}{sw_dice:>10.4f}{topk_dice:>12.4f}{float(np.mean(list(k1_label.values()))):>10.4f}")
    stats = rows["topk"]["stats"]
    print(f"\nper volume: SW {rows['sw']['seconds'] / len(test):.2f}s, {stats['candidates']} patches, "
          f"{rows['sw']['flops'] / 1e9:.1f} GFLOPs | top-k {rows['topk']['seconds'] / len(test):.2f}s, "
          f"{stats['patches_evaluated']} patches + coarse pass, {rows['topk']['flops'] / 1e9:.1f} GFLOPs "
          f"({100 * (1 - rows['topk']['flops'] / rows['sw']['flops']):.1f}% fewer), "
          f"{100 * stats['covered_fraction']:.0f}% of voxels covered by patches")
    speedup = rows["sw"]["seconds"] / rows["topk"]["seconds"]
    summary = {"sw_s": rows["sw"]["seconds"], "topk_s": rows["topk"]["seconds"], "speedup": speedup,
               "sw_dice": sw_dice, "topk_dice": topk_dice, "dice_drop": sw_dice - topk_dice,
               "sw_gflops": rows["sw"]["flops"] / 1e9, "topk_gflops": rows["topk"]["flops"] / 1e9,
               "per_label": {LABEL_NAMES[v]: {"sw": sw_label[v], "topk": topk_label[v], "k1": k1_label[v]}
                             for v in labels},
               "train": {"sw_steps": sw_steps, "topk_steps": fit.steps, "budget_s": args.budget_s},
               "args": vars(args), "total_s": time.perf_counter() - started}
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
            json.dump(summary, handle, indent=2)
        os.replace(handle.name, args.json)
    print(f"sw_s={summary['sw_s']:.2f} topk_s={summary['topk_s']:.2f} speedup={speedup:.2f} "
          f"sw_dice={sw_dice:.4f} topk_dice={topk_dice:.4f} dice_drop={sw_dice - topk_dice:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
