"""Start N ranks on 127.0.0.1 for the distributed tests: as torchrun would (its environment), or torchrun itself.

Workers are the test files run as scripts (`python Testing/test_distributed*.py SCENARIO JSON`), so the
code under test sees exactly what a launcher gives it: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_environment(**extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not key.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets for several ranks; also keeps the 2 cores shared fairly
    env.update({key: str(value) for key, value in extra.items()})
    return env


def launch(script: str, scenario: str, arguments: dict, world_size: int = 2, timeout: float = 300,
           launcher: str = "torchrun", **extra_env) -> list[subprocess.CompletedProcess]:
    """Run `script scenario json` as ranks 0..N-1 with torchrun's (or an srun step's) variables; wait for all."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        if launcher == "slurm":  # what srun exports to each task of a step (MASTER_* from the batch script)
            variables = dict(SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=world_size, SLURM_PROCID=rank, SLURM_LOCALID=rank,
                             SLURM_NTASKS=world_size, SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=port)
        else:
            variables = dict(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world_size,
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env = base_environment(**variables, **extra_env)
        processes.append(subprocess.Popen([sys.executable, script, scenario, json.dumps(arguments)], env=env,
                                          cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def torchrun(arguments: list, world_size: int = 2, timeout: float = 300, **extra_env) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` (the real launcher, its own free port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               "--max-restarts=0"] + [str(a) for a in arguments]
    return subprocess.run(command, env=base_environment(**extra_env), cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout)


def report(results) -> str:
    """Every rank's exit status and output, for assertion messages."""
    if isinstance(results, subprocess.CompletedProcess):
        results = [results]
    return "\n".join(f"--- process {i}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
                     for i, r in enumerate(results))
