"""nnU-Net v2's own predictor vs UNetSegment on the same imported nnU-Net model, CPU, file to file.

Builds an nnU-Net v2 results folder with nnU-Net's planner, trainer-built network and checkpoint
format (seeded weights; Testing/nnunet_oracle.py) on a generated CT-like data set, imports it with
`python -m UNetSegmentLib import-nnunet`, and times both whole commands on the same volume:

    nnUNetv2_predict_from_modelfolder -i IN -o OUT -m MODEL -f FOLDS -device cpu   (mirroring on, step 0.5)
    python -m UNetSegmentLib segment IN/case_0000.nii.gz --model MODEL.pt --mirror --device cpu --precision fp32

(same mirroring axes as the plans ask, fp32 network). Median of --repeats runs each; agreement is the
fraction of voxels with the same label. A roofline line compares both runtimes' convolution rate with
this CPU's dense fp32 matmul rate (how much faster any fp32 runtime could be). Last line:

    nnunet_s=... ours_s=... speedup=... agreement=...

Usage: python bench/nnunet_predictor_vs_ours.py [--train-shape 48 96 96] [--size 64 128 128] [--folds 0]
       [--repeats 1] [--threads N] [--backend auto|torch|openvino] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
from nnunet_oracle import synthetic_case, write  # noqa: E402


CPU_SECONDS: list[float] = []  # user + system CPU of each command (with its worker processes), for busy machines


def run(command: list[str], env: dict) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-2000:]}")
    return seconds


def roofline(model_file: Path, threads, backend: str) -> str:
    """One network patch timed on PyTorch and on our runtime, against this CPU's dense fp32 matmul rate.

    Both tools spend nearly all their time in the same convolutions (same FLOPs): when our runtime already
    runs them near the matmul rate, no fp32 runtime can widen the speedup further on this CPU.
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from roofline import dense_fp32_gflops, network_gflop
    from UNetSegmentLib.ensemble import load_model
    from UNetSegmentLib.runtime import RuntimeOptions, prepare_runner

    if threads:
        torch.set_num_threads(int(threads))
    model = load_model(model_file, device=torch.device("cpu"))
    network = (model.members[0] if hasattr(model, "members") else model).network.eval()
    patch = tuple(int(p) for p in model.metadata.patch_size)
    batch = torch.randn((2, 1) + patch, generator=torch.Generator().manual_seed(0))
    gflop = network_gflop(network, (1,) + patch)

    def cpu_seconds_per_patch(call, inputs, repeats=2) -> float:
        call(inputs)  # warm-up (allocation, kernel choice)
        started = time.process_time()
        for _ in range(repeats):
            call(inputs)
        return (time.process_time() - started) / (repeats * len(inputs))

    with torch.no_grad():
        torch_s = cpu_seconds_per_patch(lambda x: network(x), batch[:1])  # nnUNetPredictor runs one window at a time
        runner = prepare_runner(network, (1,) + patch, torch.device("cpu"), precision="fp32",
                                options=RuntimeOptions(backend=backend, threads=threads))
        ours_s = cpu_seconds_per_patch(runner, batch)
    peak = dense_fp32_gflops()
    return (f"roofline (CPU s per patch {patch}, {gflop:.1f} GFLOP): PyTorch {torch_s:.2f} s = {gflop / torch_s:.0f} "
            f"GFLOPS, ours ({runner.backend} {runner.precision}) {ours_s:.2f} s = {gflop / ours_s:.0f} GFLOPS; dense "
            f"fp32 matmul on this CPU {peak:.0f} GFLOPS, so an fp32 runtime at that rate would be at most "
            f"{torch_s * peak / gflop:.2f}x PyTorch per patch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-shape", type=int, nargs=3, default=(48, 96, 96), help="z y x of training cases")
    parser.add_argument("--size", type=int, nargs=3, default=(64, 128, 128), help="z y x of the volume segmented")
    parser.add_argument("--folds", nargs="+", default=["0"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: all cores)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"),
                        help="our runtime (auto: OpenVINO on CPU when installed, as `segment` does)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--keep", default=None, help="keep the work folder here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_shape, args.size = (24, 32, 32), (30, 40, 44)

    work = Path(args.keep or tempfile.mkdtemp(prefix="nnunet_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{key: str(work / key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    python = sys.executable
    try:
        build = subprocess.run([python, str(ROOT / "Testing" / "nnunet_oracle.py"), "build", str(work), "--dataset-id",
                                "950", "--name", "Bench", "--shape", *map(str, args.train_shape), "--spacing", "1", "1",
                                "1", "--modality", "CT", "--cases", "6", "--models",
                                f"ExperimentPlanner:3d_fullres:{','.join(args.folds)}"],
                               env=env, capture_output=True, text=True)
        if build.returncode != 0:
            raise SystemExit(build.stdout[-2000:] + build.stderr[-2000:])
        folder = Path([line for line in build.stdout.splitlines() if line.startswith(str(work))][-1])
        imported = work / "imported.pt"
        run([python, "-m", "UNetSegmentLib", "import-nnunet", str(folder), "--output", str(imported), "--overwrite",
             "--folds", *args.folds], env)

        inputs = work / "input"
        inputs.mkdir(exist_ok=True)
        image, _ = synthetic_case(np.random.default_rng(7), tuple(args.size), "CT")
        write(image, (0.9, 0.95, 1.1), inputs / "case_0000.nii.gz", origin=(10.0, -5.0, 3.0))

        nnunet_out, ours_out = work / "nnunet_out", work / "ours_out"
        predictor = shutil.which("nnUNetv2_predict_from_modelfolder", path=str(Path(python).parent)) or \
            "nnUNetv2_predict_from_modelfolder"
        nnunet_times, ours_times, cpu_pairs = [], [], []
        for _ in range(args.repeats):
            shutil.rmtree(nnunet_out, ignore_errors=True)
            shutil.rmtree(ours_out, ignore_errors=True)
            nnunet_cpu_index = len(CPU_SECONDS)
            nnunet_times.append(run([predictor, "-i", str(inputs), "-o", str(nnunet_out), "-m", str(folder),
                                     "-f", *args.folds, "-device", "cpu"], env))
            command = [python, "-m", "UNetSegmentLib", "segment", str(inputs / "case_0000.nii.gz"), "--model",
                       str(imported), "--output", str(ours_out / "case.nii.gz"), "--mirror", "--device", "cpu",
                       "--precision", "fp32", "--backend", args.backend, "--quiet", "--overwrite"]
            if args.threads:
                command += ["--threads", str(args.threads)]
            ours_times.append(run(command, env))
            cpu_pairs.append((CPU_SECONDS[nnunet_cpu_index], CPU_SECONDS[-1]))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet_out / "case.nii.gz")))
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(ours_out / "case.nii.gz")))
        agreement = float((theirs == ours).mean())
        nnunet_s, ours_s = statistics.median(nnunet_times), statistics.median(ours_times)
        print(f"volume {tuple(args.size)}, training cases {tuple(args.train_shape)}, folds {args.folds}, our backend "
              f"{args.backend}; "
              f"nnU-Net runs {[round(t, 2) for t in nnunet_times]}, ours {[round(t, 2) for t in ours_times]}; "
              f"CPU s (nnU-Net, ours) {[(round(a, 1), round(b, 1)) for a, b in cpu_pairs]}; "
              f"labels nnU-Net {np.bincount(theirs.ravel()).tolist()} ours {np.bincount(ours.ravel()).tolist()}")
        print(roofline(imported, args.threads, args.backend))
        print(f"nnunet_s={nnunet_s:.2f} ours_s={ours_s:.2f} speedup={nnunet_s / ours_s:.2f} agreement={agreement:.5f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
