"""Several processes, one job: torchrun / SLURM launch, DDP training helpers, sharded inference.

`train` and `segment` call these hooks and stay single-process when no launcher is detected (every
function below is then a no-op or the identity), so one code path serves a laptop and a cluster.

Decisions, and why:
- The launcher is torchrun (or SLURM's srun): its environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR/PORT, or SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID) says who we are. A plain
  `python` in a SLURM batch script is not an srun step and stays single-process.
- NCCL on CUDA, gloo on the CPU. Every collective has a timeout (UNETSEGMENT_DIST_TIMEOUT_S, default
  1800 s), so a rank that stops answering makes the others fail instead of waiting forever; torchrun
  itself stops the remaining workers as soon as one exits with an error.
- `--batch-size` is per rank (the global batch is N x batch size); gradients are averaged by DDP, so
  one DDP step equals one single-process step on the union of the ranks' batches (exactly for
  per-sample normalisation such as instance norm; batch norm becomes SyncBatchNorm on CUDA).
- Rank 0 keeps the configured seed (a single process samples as before); other ranks get seeds
  derived from (seed, rank, epoch), so ranks never draw identical patch streams.
- Rank 0 alone writes: the checkpoint and the resume state `<output>.resume`, each atomically (temp
  file, fsync, rename). The resume state holds the plain (non-DDP) weights and the optimizer state,
  which are the same on every rank, so it resumes on any number of ranks.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from .errors import CheckpointError, DeviceError, InputError, UNetSegmentError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "UNETSEGMENT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_PORT = "29500"
STATE_FORMAT = "unetsegment-training-state"
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LaunchEnvironment:
    """Who this process is, as the launcher told it (world_size 1: not launched as a group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun" | "slurm" | "none"
    master_addr: Optional[str] = None
    master_port: Optional[str] = None


@dataclass
class DistributedContext:
    """The process group this process belongs to; world_size 1 means the ordinary single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: Any = None
    owns_group: bool = False  # True when setup() created the group (so teardown() destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistributedContext()


def _int(environ, name: str) -> Optional[int]:
    value = environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        raise InputError(f"The launcher variable {name}={value!r} is not a number.",
                         f"Unset {name} or launch with torchrun / srun.") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03' (what `scontrol show hostnames` gives)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise InputError(f"SLURM_JOB_NODELIST '{nodelist}' cannot be parsed.", "Set MASTER_ADDR to the first node.")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_launch(environ=None) -> LaunchEnvironment:
    """torchrun's variables first (also when torchrun runs inside srun), then an srun step's; else none."""
    environ = os.environ if environ is None else environ
    if environ.get("UNETSEGMENT_DISTRIBUTED", "").lower() in ("0", "off", "false", "no"):
        return LaunchEnvironment()
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    if rank is not None and world is not None:
        local = _int(environ, "LOCAL_RANK")
        return LaunchEnvironment(rank, world, rank if local is None else local, "torchrun",
                                 environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"))
    # SLURM_STEP_ID exists only inside an srun step; SLURM_NTASKS alone is also set in the batch script
    world = _int(environ, "SLURM_STEP_NUM_TASKS")
    if environ.get("SLURM_STEP_ID") is not None and world is not None and world > 1:
        rank = _int(environ, "SLURM_PROCID") or 0
        local = _int(environ, "SLURM_LOCALID") or 0
        address = environ.get("MASTER_ADDR")
        if not address:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise InputError("srun started several tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set.",
                                 "export MASTER_ADDR=<first node> in the batch script.")
            address = first_slurm_host(nodelist)
        return LaunchEnvironment(rank, world, local, "slurm", address, environ.get("MASTER_PORT") or DEFAULT_PORT)
    return LaunchEnvironment()


def launched_rank(environ=None) -> int:
    """This process's rank before any group exists (front ends use it to keep bars and logs on rank 0)."""
    return detect_launch(environ).rank


def timeout_seconds(environ=None) -> float:
    environ = os.environ if environ is None else environ
    value = environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds.",
                         f"Unset it (default {DEFAULT_TIMEOUT_S:.0f} s) or pass e.g. {TIMEOUT_ENV}=600.")
    return seconds


def setup(device=None, backend: Optional[str] = None, environ=None) -> DistributedContext:
    """Join (or create) the process group the launcher describes; the single-process context otherwise.

    `device` is the resolved torch.device: CUDA selects NCCL and this rank's GPU (cuda:LOCAL_RANK);
    anything else selects gloo. `backend` forces one (segment uses gloo: it only exchanges summaries).
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # created by the caller (tests, notebooks)
        environ = os.environ if environ is None else environ
        local_rank = _int(environ, "LOCAL_RANK")
        context = DistributedContext(dist.get_rank(), dist.get_world_size(),
                                     dist.get_rank() if local_rank is None else local_rank,
                                     dist.get_backend(), device, owns_group=False)
        context.device = _rank_device(device, context)
        _quiet_other_ranks(context)
        return context
    launch = detect_launch(environ)
    if launch.world_size <= 1:
        return DistributedContext(device=device)
    if not dist.is_available():
        raise DeviceError("This PyTorch build has no torch.distributed.", "Install a standard PyTorch build.")
    use_cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
    backend = backend or ("nccl" if use_cuda else "gloo")
    context = DistributedContext(launch.rank, launch.world_size, launch.local_rank, backend, device)
    context.device = _rank_device(device, context)
    if use_cuda and backend == "nccl":
        torch.cuda.set_device(context.device)
    if launch.launcher == "slurm":  # torchrun exports these itself
        os.environ.setdefault("MASTER_ADDR", launch.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", launch.master_port or DEFAULT_PORT)
    timeout = datetime.timedelta(seconds=timeout_seconds(environ))
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise DeviceError(
            f"Rank {launch.rank} of {launch.world_size} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}).",
            "Start every rank with the same rendezvous endpoint, check that the port is open between the "
            "nodes, and that all nodes were started.") from None
    context.owns_group = True
    _quiet_other_ranks(context)
    log.info("process group: %d ranks, backend %s, this is rank %d (local %d) on %s",
             context.world_size, backend, context.rank, context.local_rank, context.device)
    return context


def _rank_device(device, context: DistributedContext):
    """CUDA under a launcher means this rank's own GPU, cuda:LOCAL_RANK."""
    import torch

    if device is None or getattr(device, "type", None) != "cuda" or not context.distributed:
        return device
    count = torch.cuda.device_count()
    if context.local_rank >= count:
        raise DeviceError(f"Local rank {context.local_rank} has no GPU of its own ({count} visible).",
                          f"Start at most {count} processes per node (torchrun --nproc-per-node {count}).")
    return torch.device("cuda", context.local_rank)


def _quiet_other_ranks(context: DistributedContext) -> None:
    """Only rank 0 logs progress: other ranks keep warnings and errors. Every rank writes whole lines:
    the ranks share the launcher's stdout pipe, where a block-buffered stream flushes at arbitrary byte
    counts and an unbuffered one (PYTHONUNBUFFERED, write_through) sends print's text and its newline
    as two writes, so two ranks' lines could tear into each other. Line buffering without write-through
    makes each line one write, and one write of <= PIPE_BUF bytes to a pipe is atomic."""
    if not context.distributed:
        return
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True, write_through=False)
            except (ValueError, OSError):  # a replaced or closed stream: leave it as it is
                pass
    if not context.is_main:
        logging.getLogger(__package__ or "UNetSegmentLib").setLevel(logging.WARNING)


def teardown(context: DistributedContext) -> None:
    if context.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        context.owns_group = False


def peer_failure(error: BaseException, context: DistributedContext, resume_path: Optional[str] = None
                 ) -> Optional[UNetSegmentError]:
    """A collective that failed because another rank died or timed out, as a one-line error; else None."""
    if not context.distributed or isinstance(error, UNetSegmentError):
        return None
    import torch.distributed as dist

    types = tuple(t for t in (getattr(dist, "DistError", None),) if t is not None)
    text = str(error)
    known = isinstance(error, types) if types else False
    if not (known or (isinstance(error, RuntimeError) and re.search(
            r"[Cc]onnection (closed|reset)|[Tt]imed out|timeout|[Gg]loo|NCCL|peer", text))):
        return None
    detail = text.splitlines()[0][:200] if text else type(error).__name__
    fix = "See the output of the rank that failed first (torchrun names it)"
    if resume_path and os.path.exists(resume_path):
        fix += f"; continue from the last completed epoch with --resume {resume_path}"
    return DeviceError(f"Rank {context.rank}: another rank of this job failed or stopped answering ({detail}).",
                       fix + ".")


# --- sharding, seeds, collectives -----------------------------------------------------------------------

def shard(items: Sequence, context: DistributedContext) -> list:
    """This rank's share: every world_size-th item from position `rank` (each item on exactly one rank)."""
    return list(items)[context.rank::context.world_size]


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """Rank 0 at the start keeps `seed` (a single process is unchanged); others get a derived 32-bit seed."""
    if rank == 0 and epoch == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed) % 2 ** 63, int(rank), int(epoch)]).generate_state(1)[0])


def _collective_device(context: DistributedContext):
    import torch

    if context.backend == "nccl":
        return context.device
    return torch.device("cpu")


def all_reduce(values: Sequence[float], context: DistributedContext, op: str = "sum") -> list[float]:
    """Element-wise sum or max of `values` over all ranks (the values themselves on one process)."""
    if not context.distributed:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu().tolist()]


def gather_objects(obj: Any, context: DistributedContext) -> list:
    """Every rank's `obj`, in rank order, on every rank (picklable objects: summaries, scores)."""
    if not context.distributed:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_by_index(per_index: dict, context: DistributedContext) -> list:
    """{global index: value} of each rank's shard -> the values of all ranks in global index order."""
    merged: dict = {}
    for part in gather_objects(per_index, context):
        merged.update(part)
    return [merged[index] for index in sorted(merged)]


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        import torch.distributed as dist

        if context.backend == "nccl":
            dist.barrier(device_ids=[context.local_rank])
        else:
            dist.barrier()


# --- the network ----------------------------------------------------------------------------------------

def prepare_network(network, device_type: str):
    """Batch norm computes statistics over the batch, i.e. per rank: on CUDA it becomes SyncBatchNorm
    (statistics over the global batch). PyTorch's SyncBatchNorm is GPU-only, so on the CPU batch norm keeps
    per-rank statistics (a warning says so); instance and group norm are per sample and need nothing."""
    import torch

    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.modules())
    if not has_batch_norm:
        return network
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    log.warning("batch norm on the CPU keeps per-rank batch statistics (SyncBatchNorm needs GPUs); "
                "instance norm (the default) is unaffected")
    return network


def wrap_model(network, context: DistributedContext):
    """DistributedDataParallel around `network` (already on this rank's device); `network` itself otherwise.

    find_unused_parameters: the deep-supervision loss never uses the lowest head (weight 0), so DDP must
    look for parameters without gradients each step (static_graph=True fails on the third step with these
    networks in torch 2.13; the graph walk costs little next to 3D convolutions).
    """
    if not context.distributed:
        return network
    from torch.nn.parallel import DistributedDataParallel

    device = context.device
    on_cuda = getattr(device, "type", None) == "cuda"
    return DistributedDataParallel(network, device_ids=[device.index] if on_cuda else None,
                                   output_device=device.index if on_cuda else None, find_unused_parameters=True)


# --- resume state ---------------------------------------------------------------------------------------

def state_path(output: str) -> str:
    """The resume state beside the checkpoint: 'model.pt' -> 'model.pt.resume' (not *.pt: model lists skip it)."""
    return f"{output}.resume"


def atomic_torch_save(payload: Any, path: str) -> str:
    """torch.save to a temp file in the same folder, fsync, rename: a crash leaves the previous file intact."""
    import torch

    from .publish import temporary_output  # temp beside the target, fsync, rename; removed on any failure

    with temporary_output(path, overwrite=True) as temp:
        torch.save(payload, temp)
    return path


def save_training_state(path: str, network, optimizer, counters: dict, fingerprint: dict,
                        context: DistributedContext) -> None:
    """Rank 0 writes the resume state; every rank then waits, so all agree which epoch is on disk."""
    if context.is_main:
        state_dict = {key: value.detach().to("cpu").clone() for key, value in network.state_dict().items()}
        payload = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "counters": dict(counters),
                   "world_size": context.world_size, "fingerprint": dict(fingerprint),
                   "network": state_dict, "optimizer": optimizer.state_dict()}
        atomic_torch_save(payload, path)
    barrier(context)


def load_training_state(path: str, fingerprint: dict) -> dict:
    """Read a resume state (weights-only unpickling) and check it belongs to this training setup."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"Resume state {path} does not exist.",
                              "Pass the <output>.resume file a previous run wrote (train writes it after every epoch).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, foreign or code-carrying files
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable resume state ({detail}).",
                              "Use the .resume file written beside the checkpoint, or train from scratch.") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a UNetSegment resume state.",
                              "Pass the <output>.resume file, not a checkpoint (.pt).")
    if payload.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer UNetSegment.", "Update UNetSegment.")
    stored = payload.get("fingerprint", {})
    for key, value in fingerprint.items():
        if stored.get(key) != value:
            raise CheckpointError(f"{path} was written for another training setup ({key}: {stored.get(key)!r} "
                                  f"there, {value!r} now).",
                                  "Resume with the same dataset, fold, seed, architecture and patch size.")
    return payload


def restore_training_state(payload: dict, network, optimizer) -> dict:
    """Load weights and optimizer state (identical on every rank, hence any rank count); the counters."""
    network.load_state_dict(payload["network"], strict=True)
    optimizer.load_state_dict(payload["optimizer"])
    return dict(payload["counters"])


def metadata_fields(context: DistributedContext, batch_size: int) -> dict:
    """What the checkpoint card records about a multi-rank run (nothing for one process)."""
    if not context.distributed:
        return {}
    return {"ranks": context.world_size, "global_batch_size": batch_size * context.world_size,
            "backend": context.backend}


def refuse_unsupported(what: str, context_or_launch=None) -> None:
    """Trainers without DDP support must not run N copies that overwrite each other's output."""
    launch = context_or_launch or detect_launch()
    if launch.world_size > 1:
        raise InputError(f"{what} does not run under torchrun / srun with several processes yet.",
                         "Launch it as one process (python -m UNetSegmentLib train ...).")


# --- sharded inference ----------------------------------------------------------------------------------

@dataclass
class CaseOutcome:
    index: int
    name: str
    rank: int
    seconds: float
    error: Optional[str] = None


def run_cases(pairs: Sequence[tuple], work: Callable[..., Any], context: DistributedContext) -> int:
    """Run `work(index, *pair)` for every pair (1-based index); the exit status.

    One process: in order, the first error propagates (unchanged behaviour). Several: each rank takes its
    shard, a failing case is reported and the rank goes on; rank 0 prints the summary, every rank returns
    the same status (2 if any case failed anywhere).
    """
    from .errors import Cancelled, translate

    if not context.distributed:
        for index, pair in enumerate(pairs, start=1):
            work(index, *pair)
        return 0
    barrier(context)  # every rank has checked its outputs before any rank writes one
    started = time.perf_counter()
    outcomes = []
    for index, pair in shard(list(enumerate(pairs, start=1)), context):
        case_started = time.perf_counter()
        name = os.path.basename(str(pair[0]))
        try:
            work(index, *pair)
            outcomes.append(CaseOutcome(index, name, context.rank, time.perf_counter() - case_started))
        except Cancelled:
            raise
        except Exception as error:  # noqa: BLE001 - one bad case must not stop the rank
            known = translate(error)
            if known is None:
                traceback.print_exc(file=sys.stderr)
            message = str(known) if known is not None else f"{type(error).__name__}: {error}"
            print(f"error: [rank {context.rank}] {name}: {message}", file=sys.stderr)
            outcomes.append(CaseOutcome(index, name, context.rank, time.perf_counter() - case_started, message))
    everything = sorted((o for part in gather_objects(outcomes, context) for o in part), key=lambda o: o.index)
    failed = [o for o in everything if o.error]
    if context.is_main:
        print(summary_line(everything, context.world_size, time.perf_counter() - started))
        for outcome in failed:
            print(f"error: {outcome.name} (rank {outcome.rank}) failed: {outcome.error}", file=sys.stderr)
    return 2 if failed else 0


def summary_line(outcomes: Sequence[CaseOutcome], world_size: int, seconds: float) -> str:
    failed = sum(1 for o in outcomes if o.error)
    return (f"segmented {len(outcomes)} cases on {world_size} ranks in {seconds:.1f} s: "
            f"{len(outcomes) - failed} written, {failed} failed")
