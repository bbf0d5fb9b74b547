"""Time MONAI's sliding_window_inference against UNetSegment's engine on the same network and volume.

    .venv/bin/python bench/sliding_window_vs_monai.py            # 256x256x128, 3 repeats (minutes)
    .venv/bin/python bench/sliding_window_vs_monai.py --quick    # 128x128x64, 1 repeat (smoke run)

Network: MONAI UNet(spatial_dims=3, in 1, out 2, channels 16..256, strides 2x4, num_res_units=2),
96^3 windows, overlap 0.5, Gaussian blending. Each row gets one warm-up run, then the median of the
repeats.

Volume and weights: a synthetic two-class volume (smooth random blobs, bright on a noisy background)
and the network trained on it for a short seeded run (`--train-steps`, 64^3 patches), so that the
INT8 row's agreement means something (random weights give near-tied logits). Rows: MONAI at
sw_batch_size 1 (its default), 2 and 4; ours in PyTorch fp32 (equal output); ours `auto` (PyTorch
engine choices: mode and precision); ours on OpenVINO fp32; ours on OpenVINO INT8, post-training
quantized with NNCF on windows of the bench's own volume. Agreement = argmax agreement with MONAI's
fp32 output. The OpenVINO rows run from the converted model (the warm-up run converts and caches it
in a temporary folder; the conversion time is printed).

Peak memory: tracemalloc does not see PyTorch's allocations, so a thread samples the
process's resident set (VmRSS in /proc/self/status) every 5 ms; a row reports the highest RSS seen
while it ran and the rise above the RSS when it started. Freed memory may stay in the allocator's
cache, so "rise" understates rows that reuse memory an earlier row left behind.

The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.inferers import sliding_window_inference as monai_sliding_window  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402

from UNetSegmentLib.inference.devices import cpu_supports_bf16  # noqa: E402
from UNetSegmentLib.inference.sliding_window import (InferenceOptions, is_window_equivalent,  # noqa: E402
                                                     predict_logits, sliding_window_inference)
from UNetSegmentLib.runtime import RuntimeOptions, openvino_available  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import dense_fp32_gflops, network_gflop  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples VmRSS in a background thread; `peak` is the highest value since the last `reset`."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = self.start = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def reset(self):
        self.peak = self.start = rss_bytes()

    def close(self):
        self._stop.set()
        self._thread.join()


def timed(function, repeats: int, meter: PeakRss):
    function()  # warm-up: oneDNN primitive creation, allocator growth
    meter.reset()
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), meter.peak, meter.peak - meter.start, result


def make_volume(shape, seed: int = 1):
    """(image (1, 1, *shape) float32, label (*shape) int64): smooth random blobs (~30 % of the volume)
    at +1 on a 0 background, Gaussian noise of 0.6 on top."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.randn((1, 1) + tuple(s // 8 for s in shape), generator=generator)
    field = torch.nn.functional.interpolate(field, size=shape, mode="trilinear", align_corners=False)[0, 0]
    label = (field > 0.5).long()
    image = label.float() + 0.6 * torch.randn(shape, generator=generator)
    return image[None, None], label


def train_briefly(network, image, label, steps: int, patch: int = 64, seed: int = 0) -> float:
    """A short seeded training run (Adam, cross-entropy, random 64^3 crops, batch 2); returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    network.train()
    loss = torch.zeros(())
    for _ in range(steps):
        corners = [[int(torch.randint(0, s - patch + 1, (1,), generator=generator)) for s in label.shape]
                   for _ in range(2)]
        crops = [tuple(slice(c, c + patch) for c in corner) for corner in corners]
        batch = torch.stack([image[0][(slice(None),) + crop] for crop in crops])
        target = torch.stack([label[crop] for crop in crops])
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(network(batch), target)
        loss.backward()
        optimizer.step()
    network.eval()
    return float(loss.detach())


def calibration_windows(volume, roi, count: int = 16, batch: int = 2):
    """`count` windows of the volume on the sliding grid (spread evenly), in batches, for INT8 calibration."""
    from UNetSegmentLib.inference.gaussian import window_starts

    spatial = tuple(volume.shape[2:])
    padding = []  # as the engine: symmetric zero padding up to the window where the volume is smaller
    for size, window in reversed(list(zip(spatial, roi))):
        extra = max(window - size, 0)
        padding.extend([extra // 2, extra - extra // 2])
    volume = torch.nn.functional.pad(volume, padding)
    starts = window_starts(tuple(volume.shape[2:]), roi, 0.5)
    chosen = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, min(count, len(starts)))]
    windows = [volume[0][(slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, roi))].numpy()
               for start in chosen]
    return [np.stack(windows[i:i + batch]) for i in range(0, len(windows), batch)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128x128x64 volume, 1 repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--norm", default="instance", choices=["instance", "batch"],
                        help="UNet normalisation: MONAI's default 'instance', or 'batch' (whole-volume equivalent)")
    parser.add_argument("--train-steps", type=int, default=None, help="seeded training steps (default 40; 8 quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shape = (128, 128, 64) if args.quick else (256, 256, 128)
    repeats = args.repeats or (1 if args.quick else 3)
    roi = (96, 96, 96)

    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                   strides=(2, 2, 2, 2), num_res_units=2, norm=args.norm).eval()
    volume, label = make_volume(shape)
    steps = args.train_steps if args.train_steps is not None else (8 if args.quick else 40)
    started = time.perf_counter()
    loss = train_briefly(network, volume, label, steps)
    print(f"trained {steps} seeded steps in {time.perf_counter() - started:.0f} s (last loss {loss:.3f})")
    print(f"volume {shape}, roi {roi}, overlap 0.5, gaussian; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, bf16 units: {cpu_supports_bf16()}, "
          f"norm {args.norm} (whole-volume equivalent: {is_window_equivalent(network)}); median of {repeats}")
    meter = PeakRss()
    rows = {}

    def monai(sw_batch_size):
        with torch.no_grad():
            return monai_sliding_window(volume, roi, sw_batch_size, network, overlap=0.5, mode="gaussian",
                                        sigma_scale=0.125)

    def report(name, seconds, peak, rise, extra=""):
        rows[name] = seconds
        print(f"{name:<34} {seconds:8.2f} s   peak RSS {peak / 2 ** 20:7.0f} MB   rise {rise / 2 ** 20:7.0f} MB"
              f"{extra}", flush=True)

    seconds, peak, rise, reference = timed(lambda: monai(1), repeats, meter)
    report("monai sw_batch_size=1 (default)", seconds, peak, rise)
    best_seconds, best_batch = None, None
    for sw_batch_size in (2, 4):
        seconds, peak, rise, _ = timed(lambda: monai(sw_batch_size), repeats, meter)
        report(f"monai sw_batch_size={sw_batch_size}", seconds, peak, rise)
        if best_seconds is None or seconds < best_seconds:
            best_seconds, best_batch = seconds, sw_batch_size
    rows["monai_best"] = best_seconds

    seconds, peak, rise, ours = timed(lambda: predict_logits(network, volume, roi, overlap=0.5, pad_value=0.0),
                                      repeats, meter)
    difference = float((ours - reference).abs().max())
    report("ours fp32 sliding (equal output)", seconds, peak, rise, f"   max |diff| vs MONAI {difference:.1e}")
    rows["ours_fp32"] = seconds
    reference_labels = reference[0].argmax(0).numpy()

    options = InferenceOptions(patch_size=roi, overlap=0.5, precision="auto", mode="auto", device="cpu",
                               pad_value=0.0)  # MONAI pads windows with zeros; ours by default with the minimum
    seconds, peak, rise, result = timed(lambda: sliding_window_inference(network, volume[0], options), repeats, meter)
    agreement = float(np.mean(result.labels == reference_labels))
    stats = result.stats
    report("ours auto (labels)", seconds, peak, rise,
           f"   mode {stats['mode']}, {stats['precision']}, batch {stats['batch_size']}, agreement {agreement:.4%}"
           + (f", notes: {'; '.join(stats['fallbacks'])}" if stats["fallbacks"] else ""))
    rows["ours_auto"] = seconds

    cache = tempfile.TemporaryDirectory(prefix="unetsegment-bench-ov-")
    ov_agreement = int8_agreement = float("nan")
    rows["ov_fp32"] = rows["int8"] = float("nan")
    if openvino_available():
        fp32_runtime = RuntimeOptions(backend="openvino", threads=threads, cache_dir=cache.name)
        ov_options = InferenceOptions(patch_size=roi, overlap=0.5, device="cpu", runtime=fp32_runtime,
                                      pad_value=0.0)
        started = time.perf_counter()
        first = sliding_window_inference(network, volume[0], ov_options)
        print(f"OpenVINO conversion (first run, cached afterwards): {first.stats.get('runtime_convert_s', 0):.1f} s "
              f"of a {time.perf_counter() - started:.1f} s run", flush=True)
        seconds, peak, rise, result = timed(lambda: sliding_window_inference(network, volume[0], ov_options),
                                            repeats, meter)
        ov_agreement = float(np.mean(result.labels == reference_labels))
        report("ours OpenVINO fp32 (sliding)", seconds, peak, rise,
               f"   backend {result.stats['backend']}, agreement {ov_agreement:.4%}")
        rows["ov_fp32"] = seconds

        from UNetSegmentLib.runtime.int8 import quantize_network

        started = time.perf_counter()
        int8_model = quantize_network(network, (1,) + roi, calibration_windows(volume, roi))
        print(f"INT8 post-training quantization (NNCF, 16 windows of this volume): "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        int8_options = InferenceOptions(patch_size=roi, overlap=0.5, device="cpu", precision="int8", pad_value=0.0,
                                        runtime=RuntimeOptions(backend="openvino", threads=threads,
                                                               cache_dir=cache.name, int8_model=int8_model))
        seconds, peak, rise, result = timed(lambda: sliding_window_inference(network, volume[0], int8_options),
                                            repeats, meter)
        int8_agreement = float(np.mean(result.labels == reference_labels))
        report("ours OpenVINO INT8 (sliding)", seconds, peak, rise,
               f"   precision {result.stats['precision']}, agreement {int8_agreement:.4%}"
               + (f", notes: {'; '.join(result.stats['fallbacks'])}" if result.stats["fallbacks"] else ""))
        rows["int8"] = seconds
    else:
        print("OpenVINO is not installed: its rows are skipped (nan)")
    meter.close()
    cache.cleanup()
    label_agreement = float(np.mean(reference_labels == label.numpy()))
    print(f"MONAI fp32 output vs the volume's true labels: {label_agreement:.4%} (the trained network works)")

    default_s, best_s = rows["monai sw_batch_size=1 (default)"], rows["monai_best"]
    print(f"MONAI best sw_batch_size: {best_batch}")
    windows = int(stats.get("windows") or 0)
    if windows:  # how far any fp32 runtime could go: the same FLOPs at this CPU's dense matmul rate
        gflop = network_gflop(network, (1,) + roi) * windows
        ceiling_s = gflop / (dense_fp32_gflops() * threads)
        print(f"roofline: {windows} windows x {gflop / windows:.1f} GFLOP; MONAI best {gflop / best_s:.0f} GFLOPS, "
              f"ours OpenVINO fp32 {gflop / rows['ov_fp32']:.0f}, INT8 {gflop / rows['int8']:.0f} (fp32-equivalent); "
              f"at the dense fp32 matmul rate x {threads} thread(s) the network alone would take {ceiling_s:.2f} s = "
              f"{best_s / ceiling_s:.2f}x MONAI best")
    print(f"monai_default_s={default_s:.3f} monai_best_s={best_s:.3f} ours_fp32_s={rows['ours_fp32']:.3f} "
          f"ours_auto_s={rows['ours_auto']:.3f} ratio_fp32_vs_default={default_s / rows['ours_fp32']:.3f} "
          f"ratio_fp32_vs_best={best_s / rows['ours_fp32']:.3f} "
          f"ratio_auto_vs_default={default_s / rows['ours_auto']:.3f} "
          f"auto_agreement={agreement:.5f} ratio_ov_fp32_vs_best={best_s / rows['ov_fp32']:.3f} "
          f"ov_fp32_agreement={ov_agreement:.5f} ratio_int8_vs_default={default_s / rows['int8']:.3f} "
          f"ratio_int8_vs_best={best_s / rows['int8']:.3f} int8_agreement={int8_agreement:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
