"""torch.distributed helpers: launcher detection, sharding, seeds, and 2 gloo ranks on the CPU.

The DDP check: after one backward pass the gradients of 2 ranks, each on half of a batch, equal those
of one process on the whole batch. The network is a `unet` with instance norm, which normalises each
sample on its own, and the Dice + CE loss averages per sample, so the equality is exact up to float
rounding. (Batch norm would need SyncBatchNorm, which PyTorch provides for GPUs only.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from UNetSegmentLib import distributed
from UNetSegmentLib.distributed import DistributedContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_launch import launch, report  # noqa: E402

HERE = str(Path(__file__).resolve())


# --- launcher detection and pure helpers ----------------------------------------------------------------

def test_torchrun_variables_are_read():
    launch_env = distributed.detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                            "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (launch_env.rank, launch_env.world_size, launch_env.local_rank, launch_env.launcher) == (3, 8, 1, "torchrun")
    assert (launch_env.master_addr, launch_env.master_port) == ("node7", "29400")


def test_no_launcher_is_one_process_and_can_be_forced_off():
    assert distributed.detect_launch({}).world_size == 1
    assert distributed.detect_launch({"RANK": "1", "WORLD_SIZE": "2", "UNETSEGMENT_DISTRIBUTED": "0"}).world_size == 1


def test_slurm_step_is_detected_but_a_batch_script_is_not():
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[03-04,9]"}
    found = distributed.detect_launch(step)
    assert (found.rank, found.world_size, found.local_rank, found.launcher) == (5, 8, 1, "slurm")
    assert found.master_addr == "gpu03" and found.master_port == distributed.DEFAULT_PORT
    # the batch script itself (no srun step) has SLURM_NTASKS but must stay a single process
    batch = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[03-04]"}
    assert distributed.detect_launch(batch).world_size == 1


def test_first_slurm_host():
    assert distributed.first_slurm_host("node[01-04,07]") == "node01"
    assert distributed.first_slurm_host("a1,b2") == "a1"
    assert distributed.first_slurm_host("solo") == "solo"


def test_sharding_covers_every_item_exactly_once():
    items = list(range(11))
    for world in (1, 2, 3, 4, 16):
        shards = [distributed.shard(items, DistributedContext(rank, world)) for rank in range(world)]
        assert sorted(i for part in shards for i in part) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_seeds_differ_and_rank_zero_keeps_the_seed():
    assert distributed.rank_seed(7, 0) == 7  # a single process samples exactly as before
    seeds = [distributed.rank_seed(7, rank) for rank in range(64)]
    assert len(set(seeds)) == 64
    assert distributed.rank_seed(7, 1) == distributed.rank_seed(7, 1)  # reproducible
    assert distributed.rank_seed(7, 0, epoch=3) not in (7, distributed.rank_seed(7, 0, epoch=4))  # resumes draw anew


def test_single_process_context_is_a_no_op():
    context = distributed.setup(None, environ={})
    assert not context.distributed and context.is_main and not context.owns_group
    assert distributed.all_reduce([1.5, 2.0], context) == [1.5, 2.0]
    assert distributed.gather_by_index({2: "b", 0: "a"}, context) == ["a", "b"]
    network = object()
    assert distributed.wrap_model(network, context) is network


def test_single_process_run_cases_keeps_order_and_raises_the_first_error():
    seen = []
    assert distributed.run_cases([("a", "x"), ("b", "y")], lambda i, a, b: seen.append((i, a, b)),
                                 distributed.SINGLE) == 0
    assert seen == [(1, "a", "x"), (2, "b", "y")]

    def fail(index, *_):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        distributed.run_cases([("a", "x")], fail, distributed.SINGLE)


def test_batch_norm_becomes_sync_batch_norm_on_cuda_only():
    import torch

    from UNetSegmentLib.networks import build_network

    network = build_network("unet", 3, 1, 2, features=4, levels=2, norm="batch")
    converted = distributed.prepare_network(network, "cuda")
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    kept = distributed.prepare_network(build_network("unet", 3, 1, 2, features=4, levels=2, norm="batch"), "cpu")
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in kept.modules())
    instance = build_network("unet", 3, 1, 2, features=4, levels=2)
    assert distributed.prepare_network(instance, "cuda") is instance


def test_resume_state_is_written_atomically_and_checked(tmp_path):
    import torch

    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(network.parameters())
    path = str(tmp_path / "model.pt.resume")
    fingerprint = {"architecture": "unet", "seed": 0}
    distributed.save_training_state(path, network, optimizer, {"epoch": 2}, fingerprint, distributed.SINGLE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt.resume"]  # no temp file left
    payload = distributed.load_training_state(path, fingerprint)
    assert payload["counters"] == {"epoch": 2}
    from UNetSegmentLib.errors import CheckpointError

    with pytest.raises(CheckpointError, match="seed"):
        distributed.load_training_state(path, {"architecture": "unet", "seed": 1})
    (tmp_path / "truncated.resume").write_bytes(Path(path).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable resume state"):
        distributed.load_training_state(str(tmp_path / "truncated.resume"), fingerprint)


# --- 2 gloo ranks ---------------------------------------------------------------------------------------

def test_ddp_gradients_equal_one_process_on_the_union_of_the_batches(tmp_path):
    results = launch(HERE, "gradients", {"out": str(tmp_path)}, timeout=240)
    assert all(r.returncode == 0 for r in results), report(results)
    summary = json.loads((tmp_path / "gradients.json").read_text())
    assert summary["ranks_identical"], summary
    assert summary["parameters"] > 10 and summary["largest_gradient"] > 1e-4  # the comparison is not vacuous
    assert summary["max_difference"] <= 1e-5, summary
    assert summary["second_step_ok"]  # DDP's reduction also completes on the next steps (unused head)


def test_a_rank_that_stops_answering_fails_the_others_within_the_timeout(tmp_path):
    started = time.monotonic()
    results = launch(HERE, "silent_peer", {"out": str(tmp_path)}, timeout=120, UNETSEGMENT_DIST_TIMEOUT_S=3)
    waited = time.monotonic() - started
    outcome = json.loads((tmp_path / "silent_peer.json").read_text())
    assert outcome["raised"], report(results)
    assert "another rank of this job failed or stopped answering" in outcome["message"]
    assert waited < 120  # it ended by itself (the launch would have been killed at 120 s)


def test_an_srun_step_forms_the_group_without_torchrun(tmp_path):
    results = launch(HERE, "group", {"out": str(tmp_path)}, launcher="slurm", timeout=120)
    assert all(r.returncode == 0 for r in results), report(results)
    seen = [json.loads((tmp_path / f"group{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["rank"] for s in seen] == [0, 1] and all(s["world_size"] == 2 for s in seen)
    assert all(s["sum_of_ranks_plus_one"] == 3.0 for s in seen) and all(s["backend"] == "gloo" for s in seen)


# --- worker side ----------------------------------------------------------------------------------------

def _gradients_worker(out: str) -> None:
    import torch

    from UNetSegmentLib.losses import DeepSupervisionLoss, DiceCELoss
    from UNetSegmentLib.networks import build_network

    context = distributed.setup(torch.device("cpu"))
    assert context.distributed and context.world_size == 2

    def fresh_network():
        torch.manual_seed(0)
        return build_network("unet", 3, 1, 3, features=4, levels=3, deep_supervision=True)  # instance norm

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 1, 8, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (4, 8, 16, 16), generator=generator)
    loss_function = DeepSupervisionLoss(DiceCELoss())
    network = fresh_network()
    model = distributed.wrap_model(network, context)
    half = slice(2 * context.rank, 2 * context.rank + 2)
    loss_function(model(images[half]), labels[half]).backward()
    mine = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in network.named_parameters()}
    everyone = distributed.gather_objects({k: v.numpy() for k, v in mine.items()}, context)
    # further steps: DDP must finish its reduction every time (the weight-0 head stays unused)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        loss_function(model(images[half]), labels[half]).backward()
    second_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in network.parameters())
    if context.is_main:
        reference = fresh_network()
        loss_function(reference(images), labels).backward()
        differences, largest = [], 0.0
        for name, p in reference.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            differences.append(float((mine[name] - expected).abs().max()))
            largest = max(largest, float(expected.abs().max()))
        identical = all((everyone[0][k] == everyone[1][k]).all() for k in everyone[0])
        Path(out, "gradients.json").write_text(json.dumps({
            "max_difference": max(differences), "largest_gradient": largest, "parameters": len(differences),
            "ranks_identical": bool(identical), "second_step_ok": bool(second_ok)}))
    distributed.barrier(context)
    distributed.teardown(context)


def _silent_peer_worker(out: str) -> None:
    import torch

    context = distributed.setup(torch.device("cpu"))
    if context.rank == 1:  # alive, but never joins the collective (until rank 0 has given up)
        deadline = time.monotonic() + 100
        while not Path(out, "silent_peer.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        import os

        os._exit(0)
    started = time.monotonic()
    try:
        distributed.all_reduce([1.0], context)
        outcome = {"raised": False, "message": ""}
    except RuntimeError as error:
        failure = distributed.peer_failure(error, context)
        outcome = {"raised": True, "message": str(failure) if failure else repr(error)}
    outcome["seconds"] = time.monotonic() - started
    Path(out, "silent_peer.json").write_text(json.dumps(outcome))
    import os

    os._exit(0)  # do not wait for the silent peer in the group's destructor


def _group_worker(out: str) -> None:
    import torch

    context = distributed.setup(torch.device("cpu"))
    total = distributed.all_reduce([context.rank + 1], context)[0]
    Path(out, f"group{context.rank}.json").write_text(json.dumps({
        "rank": context.rank, "world_size": context.world_size, "backend": context.backend,
        "sum_of_ranks_plus_one": total}))
    distributed.teardown(context)


if __name__ == "__main__":
    scenario, arguments = sys.argv[1], json.loads(sys.argv[2])
    {"gradients": _gradients_worker, "silent_peer": _silent_peer_worker, "group": _group_worker}[scenario](**arguments)


def test_ranks_write_each_line_in_one_write_even_when_python_is_unbuffered(monkeypatch):
    """The ranks share the launcher's stdout pipe. Unbuffered Python (PYTHONUNBUFFERED, as in many job
    environments) sends print's text and its newline as two writes, and two ranks' lines then tore into
    each other; a rank joining a group must make every line a single write to the pipe."""
    import io
    import sys

    class RecordingPipe(io.RawIOBase):
        def __init__(self):
            self.writes = []

        def writable(self):
            return True

        def write(self, data):
            self.writes.append(bytes(data))
            return len(data)

    for name in ("stdout", "stderr"):
        pipe = RecordingPipe()
        stream = io.TextIOWrapper(pipe, write_through=True)  # what PYTHONUNBUFFERED gives: no buffer layer
        monkeypatch.setattr(sys, name, stream)
        print("before", file=stream)
        assert pipe.writes == [b"before", b"\n"]  # the tearing: two writes per line
        pipe.writes.clear()
        distributed._quiet_other_ranks(DistributedContext(1, 2))
        print("wrote case1.nrrd (0.5 s)", file=stream)
        print("wrote case3.nrrd (0.4 s)", file=stream)
        assert pipe.writes == [b"wrote case1.nrrd (0.5 s)\n", b"wrote case3.nrrd (0.4 s)\n"]
