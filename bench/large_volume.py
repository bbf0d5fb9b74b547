"""A CT-sized volume through the whole pipeline, PyTorch vs OpenVINO fp32 side by side.

    .venv/bin/python bench/large_volume.py               # 512x512x300 at 0.8x0.8x1.5 mm (minutes)
    .venv/bin/python bench/large_volume.py --quick       # 256x256x100 (smoke run)

The volume is the synthetic CT phantom (UNetSegmentLib.phantom) resampled onto a 512x512x300 int16
grid at 0.8 x 0.8 x 1.5 mm and written as uncompressed NRRD (~150 MB). Each row runs in its own
process (so its peak RSS, VmHWM, is its own; ru_maxrss would carry the parent's peak over): read -> reorient -> resample to the model's
spacing -> normalise -> inference -> class scores back onto the input grid -> argmax -> write.
The OpenVINO row runs with the model already converted in the cache (the conversion is timed once,
separately, and reported); both rows use the shipped CT model and the same thread count.

The last line is machine-readable: torch_s= openvino_s= speedup= peak_rss_mb= (the faster row's
peak RSS) plus each row's own peak and the labelmap agreement between the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shipped_ct_model() -> Path:
    for name in ("phantom_ct_demo.pt", "default.pt"):
        path = ROOT / "Resources" / "Models" / name
        if path.exists():
            return path
    raise SystemExit("error: the shipped CT model is missing (Resources/Models/phantom_ct_demo.pt).")


def make_volume(path: Path, size, spacing) -> None:
    """Phantom case at its own spacing, resampled (linear) onto the requested grid, int16 NRRD."""
    import numpy as np
    import SimpleITK as sitk

    from UNetSegmentLib import phantom

    image, _ = phantom.make_case(phantom.case_seed(2024, 1001)).to_sitk()
    image = sitk.Cast(image, sitk.sitkFloat32)
    physical = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    origin = [o + (p - n * s) / 2 for o, p, n, s in zip(image.GetOrigin(), physical, size, spacing)]
    reference = sitk.Image([int(n) for n in size], sitk.sitkInt16)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin(origin)
    reference.SetDirection(image.GetDirection())
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampled)
    array += np.random.default_rng(0).normal(0, 8, array.shape).astype(np.float32)  # fresh noise at full res
    out = sitk.GetImageFromArray(np.clip(array, -1024, 3071).astype(np.int16))
    out.CopyInformation(reference)
    sitk.WriteImage(out, str(path), False)


def run_row(args) -> int:
    """One row, in this process: the pipeline as `segment` runs it; prints one JSON line."""
    import torch

    from UNetSegmentLib.ensemble import load_model
    from UNetSegmentLib.io import read_image, write_image
    from UNetSegmentLib.pipeline import segment_image

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    started = time.perf_counter()
    image = read_image(args.input)
    result = segment_image(image, model, sampler="sliding_window", device="cpu", precision="fp32",
                           backend=args.row, threads=args.threads)
    del image
    write_image(result.labelmap, args.output, overwrite=True, compress=False)
    seconds = time.perf_counter() - started
    from UNetSegmentLib.memory import own_peak_rss_mb

    peak_mb = own_peak_rss_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = result.stats
    print(json.dumps({"row": args.row, "seconds": seconds, "peak_rss_mb": peak_mb,
                      "backend": stats.get("backend"), "cache": stats.get("runtime_cache"),
                      "notes": stats.get("fallbacks"), "inference_s": stats.get("inference_s"),
                      "preprocess_s": stats.get("preprocess_s"), "postprocess_s": stats.get("postprocess_s"),
                      "network_grid": stats.get("network_grid_size")}))
    return 0


def child(row: str, volume: Path, output: Path, model: Path, threads: int, env: dict) -> dict:
    command = [sys.executable, __file__, "--row", row, "--input", str(volume), "--output", str(output),
               "--model", str(model), "--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"error: row {row} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256x256x100 volume (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, alternating (median)")
    parser.add_argument("--row", choices=("torch", "openvino"), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped CT model)")
    args = parser.parse_args(argv)
    from UNetSegmentLib.runtime import physical_cores

    args.threads = args.threads or physical_cores()
    args.model = args.model or str(shipped_ct_model())
    if args.row:
        return run_row(args)

    import numpy as np
    import SimpleITK as sitk

    size = (256, 256, 100) if args.quick else (512, 512, 300)
    spacing = (0.8 * 512 / size[0], 0.8 * 512 / size[1], 1.5 * 300 / size[2]) if args.quick else (0.8, 0.8, 1.5)
    with tempfile.TemporaryDirectory(prefix="unetsegment-large-") as work:
        work = Path(work)
        env = dict(os.environ, UNETSEGMENT_CACHE_DIR=str(work / "cache"))
        volume = work / "ct.nrrd"
        started = time.perf_counter()
        make_volume(volume, size, spacing)
        megabytes = volume.stat().st_size / 2 ** 20
        print(f"volume {size} at {tuple(round(s, 3) for s in spacing)} mm, int16, {megabytes:.0f} MB on disk"
              f"  (made in {time.perf_counter() - started:.0f} s); model {Path(args.model).name}; "
              f"{args.threads} threads", flush=True)
        small = work / "small.nrrd"  # convert once, timed: what a first run on a new machine adds
        make_volume(small, (64, 64, 32), (6.4, 6.4, 14.0))
        warm = child("openvino", small, work / "small_out.nrrd", Path(args.model), args.threads, env)
        print(f"first OpenVINO run (conversion into the cache, tiny volume): {warm['seconds']:.1f} s, cache "
              f"{warm['cache']}", flush=True)
        runs = {"torch": [], "openvino": []}
        for _ in range(args.repeats):  # rows alternate, so a busy spell does not hit one row only
            for row in runs:
                runs[row].append(child(row, volume, work / f"{row}.nrrd", Path(args.model), args.threads, env))
        rows = {}
        for row, results in runs.items():
            results.sort(key=lambda item: item["seconds"])
            rows[row] = results[len(results) // 2]
            result = rows[row]
            print(f"{row:<9} {result['seconds']:7.1f} s  (pre {result['preprocess_s']:.1f}, infer "
                  f"{result['inference_s']:.1f}, post {result['postprocess_s']:.1f})  peak RSS "
                  f"{result['peak_rss_mb']:6.0f} MB  backend {result['backend']}, cache {result['cache']}, "
                  f"network grid {result['network_grid']}"
                  + (f", notes: {'; '.join(result['notes'])}" if result["notes"] else ""), flush=True)
        torch_labels = sitk.GetArrayViewFromImage(sitk.ReadImage(str(work / "torch.nrrd")))
        openvino_labels = sitk.GetArrayViewFromImage(sitk.ReadImage(str(work / "openvino.nrrd")))
        agreement = float(np.mean(torch_labels == openvino_labels))
    torch_s, openvino_s = rows["torch"]["seconds"], rows["openvino"]["seconds"]
    faster = "openvino" if openvino_s <= torch_s else "torch"
    print(f"torch_s={torch_s:.2f} openvino_s={openvino_s:.2f} speedup={torch_s / openvino_s:.3f} "
          f"peak_rss_mb={rows[faster]['peak_rss_mb']:.0f} torch_peak_rss_mb={rows['torch']['peak_rss_mb']:.0f} "
          f"openvino_peak_rss_mb={rows['openvino']['peak_rss_mb']:.0f} agreement={agreement:.5f} "
          f"torch_infer_s={rows['torch']['inference_s']:.2f} openvino_infer_s={rows['openvino']['inference_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
