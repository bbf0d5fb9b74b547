"""Time per training iteration with 1 process and with N DDP processes (torchrun) on this machine.

    .venv/bin/python bench/ddp_iteration_time.py [--processes 2] [--iterations 20] [--warmup 3]

Each iteration is the trainer's own step (training.train_step: sample a foreground-oversampled batch
from phantom volumes, crop, forward, Dice + CE with deep supervision, backward, clip, Adam), wrapped in
DDP for N processes, so the N-process figure includes the gradient all-reduce (gloo on the CPU).
`--batch-size` is per process, as in `train`: N processes train on N x batch patches per iteration.
The single process gets one thread per logical CPU; each of the N processes gets CPUs / N threads,
so both runs use the same CPU.

Last line (machine-readable): processes, seconds per iteration for 1 and N, patches per second for 1
and N, and the throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(settings: dict) -> None:
    import numpy as np
    import torch

    from UNetSegmentLib import distributed, phantom
    from UNetSegmentLib.losses import DeepSupervisionLoss, DiceCELoss
    from UNetSegmentLib.networks import build_network
    from UNetSegmentLib.sampling import make_sampler
    from UNetSegmentLib.training import train_step

    context = distributed.setup(torch.device("cpu"))
    torch.manual_seed(0)
    cases = []
    for index in range(4):  # small phantom volumes, z-scored (what the trainer feeds the sampler)
        case = phantom.make_case(phantom.case_seed(7, index))
        image = np.asarray(case.image, dtype=np.float32)
        cases.append(((image - image.mean()) / max(float(image.std()), 1e-6), np.asarray(case.label)))
    patch = tuple(settings["patch_size"])
    sampler = make_sampler("foreground", cases, patch, seed=distributed.rank_seed(0, context.rank))
    network = build_network("unet", 3, 1, 4, features=settings["features"], levels=settings["levels"],
                            deep_supervision=True)
    model = distributed.wrap_model(network, context)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-4, weight_decay=3e-5)
    loss_function = DeepSupervisionLoss(DiceCELoss())
    network.train()

    def step():
        train_step(model, network, optimizer, loss_function, sampler, None, patch, settings["batch_size"],
                   torch.device("cpu"))

    for _ in range(settings["warmup"]):
        step()
    distributed.barrier(context)
    started = time.perf_counter()
    for _ in range(settings["iterations"]):
        step()
    distributed.barrier(context)
    seconds = time.perf_counter() - started
    if context.is_main:
        print("RESULT " + json.dumps({"processes": context.world_size, "threads": torch.get_num_threads(),
                                      "seconds_per_iteration": seconds / settings["iterations"],
                                      "patches_per_second": settings["batch_size"] * context.world_size
                                      * settings["iterations"] / seconds}), flush=True)
    distributed.teardown(context)


def run(command: list, env: dict) -> dict:
    completed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
        raise SystemExit(f"run failed: {' '.join(command)}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per process, as train's --batch-size")
    parser.add_argument("--patch-size", type=int, nargs=3, default=[32, 64, 64])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    settings = json.dumps({"iterations": args.iterations, "warmup": args.warmup, "batch_size": args.batch_size,
                           "patch_size": args.patch_size, "features": args.features, "levels": args.levels})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = ROOT
    script = os.path.abspath(__file__)
    cores = os.cpu_count() or 1
    single = run([sys.executable, script, "--worker", settings], dict(env, OMP_NUM_THREADS=str(cores)))
    several = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.processes}", script, "--worker", settings],
                  dict(env, OMP_NUM_THREADS=str(max(1, cores // args.processes))))
    print(f"{cores} CPU cores; unet {args.features}..{args.levels} levels, patch {tuple(args.patch_size)}, "
          f"batch {args.batch_size} per process, {args.iterations} timed iterations after {args.warmup}")
    for result in (single, several):
        print(f"  {result['processes']} process(es) x {result['threads']} thread(s): "
              f"{result['seconds_per_iteration']:.3f} s/iteration, {result['patches_per_second']:.2f} patches/s")
    ratio = several["patches_per_second"] / single["patches_per_second"]
    print(f"processes={args.processes} s_per_it_1={single['seconds_per_iteration']:.4f} "
          f"s_per_it_{args.processes}={several['seconds_per_iteration']:.4f} "
          f"patches_per_s_1={single['patches_per_second']:.3f} "
          f"patches_per_s_{args.processes}={several['patches_per_second']:.3f} throughput_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
