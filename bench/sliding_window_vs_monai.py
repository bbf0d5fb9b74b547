"""Time MONAI's sliding_window_inference against UNetSegment's engine on the same network and volume.

    .venv/bin/python bench/sliding_window_vs_monai.py            # 256x256x128, 3 repeats (minutes)
    .venv/bin/python bench/sliding_window_vs_monai.py --quick    # 128x128x64, 1 repeat (smoke run)

Network: MONAI UNet(spatial_dims=3, in 1, out 2, channels 16..256, strides 2x4, num_res_units=2),
96^3 windows, overlap 0.5, Gaussian blending. Each row gets one warm-up run, then the median of the
repeats. Peak memory: tracemalloc does not see PyTorch's allocations, so a thread samples the
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128x128x64 volume, 1 repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--norm", default="instance", choices=["instance", "batch"],
                        help="UNet normalisation: MONAI's default 'instance', or 'batch' (whole-volume equivalent)")
    args = parser.parse_args(argv)
    shape = (128, 128, 64) if args.quick else (256, 256, 128)
    repeats = args.repeats or (1 if args.quick else 3)
    roi = (96, 96, 96)

    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                   strides=(2, 2, 2, 2), num_res_units=2, norm=args.norm).eval()
    if args.norm == "batch":  # give eval-mode BatchNorm non-trivial statistics
        with torch.no_grad():
            for module in network.modules():
                if isinstance(module, torch.nn.BatchNorm3d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
    volume = torch.randn((1, 1) + shape, generator=torch.Generator().manual_seed(1))
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

    seconds, peak, rise, ours = timed(lambda: predict_logits(network, volume, roi, overlap=0.5), repeats, meter)
    difference = float((ours - reference).abs().max())
    report("ours fp32 sliding (equal output)", seconds, peak, rise, f"   max |diff| vs MONAI {difference:.1e}")
    rows["ours_fp32"] = seconds
    reference_labels = reference[0].argmax(0).numpy()

    options = InferenceOptions(patch_size=roi, overlap=0.5, precision="auto", mode="auto", device="cpu")
    seconds, peak, rise, result = timed(lambda: sliding_window_inference(network, volume[0], options), repeats, meter)
    agreement = float(np.mean(result.labels == reference_labels))
    stats = result.stats
    report("ours auto (labels)", seconds, peak, rise,
           f"   mode {stats['mode']}, {stats['precision']}, batch {stats['batch_size']}, agreement {agreement:.4%}"
           + (f", notes: {'; '.join(stats['fallbacks'])}" if stats["fallbacks"] else ""))
    rows["ours_auto"] = seconds
    meter.close()

    default_s, best_s = rows["monai sw_batch_size=1 (default)"], rows["monai_best"]
    print(f"MONAI best sw_batch_size: {best_batch}")
    print(f"monai_default_s={default_s:.3f} monai_best_s={best_s:.3f} ours_fp32_s={rows['ours_fp32']:.3f} "
          f"ours_auto_s={rows['ours_auto']:.3f} ratio_fp32_vs_default={default_s / rows['ours_fp32']:.3f} "
          f"ratio_fp32_vs_best={best_s / rows['ours_fp32']:.3f} "
          f"ratio_auto_vs_default={default_s / rows['ours_auto']:.3f} "
          f"auto_agreement={agreement:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
