"""`train` on 2 gloo ranks (CPU): per-rank patch streams, reduced loss, sharded validation, rank 0 writes,
resume on another number of ranks, and a dying rank that fails the job but leaves the last state intact.

The ranks are real processes started with torchrun's environment (distributed_launch.py); each records
what it saw (sampler seeds, its first batch, every file it opened for writing in the output folder, its
log records) in a JSON file that the tests read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_launch import launch, report, torchrun  # noqa: E402

HERE = str(Path(__file__).resolve())
EPOCHS, ITERATIONS, BATCH = 2, 2, 2


def tiny_config(dataset, output, **changes):
    from UNetSegmentLib.training import TrainingConfig

    options = dict(dataset_dir=str(dataset), output=str(output), architecture="unet",
                   architecture_kwargs={"features": 4, "levels": 3}, patch_size=(8, 16, 16), batch_size=BATCH,
                   epochs=EPOCHS, iterations_per_epoch=ITERATIONS, folds=2, fold=0, seed=0, device="cpu",
                   augment=False)
    options.update(changes)
    return TrainingConfig(**options)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from UNetSegmentLib import phantom

    folder = tmp_path_factory.mktemp("phantom")
    phantom.write_dataset(str(folder), cases=4, seed=11, spacing=(5.0, 5.0, 6.0))  # 2 training, 2 validation
    return folder


@pytest.fixture(scope="module")
def two_ranks(dataset, tmp_path_factory):
    """One 2-rank training run shared by the tests below: (output folder, record of rank 0, of rank 1)."""
    work = tmp_path_factory.mktemp("ddp")
    output, records = work / "out", work / "records"
    output.mkdir()
    records.mkdir()
    results = launch(HERE, "train", {"dataset": str(dataset), "output": str(output / "model.pt"),
                                     "records": str(records)}, timeout=600)
    assert all(r.returncode == 0 for r in results), report(results)
    ranks = [json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in zip(ranks, results):  # launch() returns the ranks in order
        rank["stderr"] = result.stderr
    return output, ranks[0], ranks[1]


def test_ranks_draw_different_patch_streams(two_ranks):
    _, first, second = two_ranks
    assert first["seeds"] == [0]  # rank 0 keeps the configured seed: one process would sample the same
    assert second["seeds"] != first["seeds"]
    assert first["digests"][0] != second["digests"][0]


def test_only_rank_zero_writes_and_logs(two_ranks):
    output, first, second = two_ranks
    assert second["written"] == []
    # every write goes through a temp file beside its target (".model.pt.<random>.tmp"), then a rename
    assert {name[1:].rsplit(".", 2)[0] for name in first["written"]} == {"model.pt", "model.pt.resume"}
    assert sorted(p.name for p in output.iterdir()) == ["model.pt", "model.pt.resume"]
    assert first["info_records"] > 0 and second["info_records"] == 0


def test_ddp_gradients_keep_the_bucket_layout(two_ranks):
    # single-process CPU training runs channels-last; under DDP that would make every step copy gradients
    _, first, second = two_ranks
    assert "Grad strides do not match" not in first["stderr"] + second["stderr"]


def test_loss_and_validation_agree_on_every_rank(two_ranks):
    output, first, second = two_ranks
    assert first["epoch_losses"] == second["epoch_losses"] and len(first["epoch_losses"]) == EPOCHS
    assert first["validation_dice"] == second["validation_dice"]
    from UNetSegmentLib.checkpoint import load_checkpoint

    training = load_checkpoint(str(output / "model.pt")).metadata.training
    assert training["ranks"] == 2 and training["global_batch_size"] == 2 * BATCH
    assert training["iterations"] == EPOCHS * ITERATIONS


def test_resume_on_one_process_continues_the_two_rank_run(two_ranks, dataset, tmp_path):
    import torch

    from UNetSegmentLib import distributed
    from UNetSegmentLib.checkpoint import load_checkpoint
    from UNetSegmentLib.training import train

    output, first, _ = two_ranks
    state = output / "model.pt.resume"
    # no epoch left: the weights are the state's, validated by one process over all validation cases,
    # which must give what the 2 ranks' sharded and gathered validation gave
    same = train(tiny_config(dataset, tmp_path / "same.pt", resume=str(state)))
    assert same.validation_dice == pytest.approx(first["validation_dice"], abs=1e-12)
    stored = torch.load(state, weights_only=True)["network"]
    reloaded = load_checkpoint(str(tmp_path / "same.pt")).network.state_dict()
    assert all(torch.equal(reloaded[key], stored[key]) for key in reloaded)
    assert same.epoch_losses == first["epoch_losses"]
    # one more epoch on one rank
    longer = train(tiny_config(dataset, tmp_path / "longer.pt", resume=str(state), epochs=EPOCHS + 1))
    assert longer.epochs == EPOCHS + 1 and longer.epoch_losses[:EPOCHS] == first["epoch_losses"]
    assert load_checkpoint(str(tmp_path / "longer.pt")).metadata.training["iterations"] == (EPOCHS + 1) * ITERATIONS
    assert not (tmp_path / "longer.pt.resume").exists()  # one process writes no state unless asked
    from UNetSegmentLib.errors import CheckpointError

    with pytest.raises(CheckpointError, match="architecture_kwargs"):
        train(tiny_config(dataset, tmp_path / "other.pt", resume=str(state),
                          architecture_kwargs={"features": 8, "levels": 3}))
    assert distributed.detect_launch().world_size == 1


def test_a_dying_rank_fails_the_job_and_keeps_the_last_state(dataset, tmp_path):
    import torch

    output = tmp_path / "model.pt"
    result = torchrun([HERE, "train", json.dumps({"dataset": str(dataset), "output": str(output),
                                                  "records": str(tmp_path), "epochs": 3,
                                                  "die_after_batches": EPOCHS * ITERATIONS})], timeout=600)
    assert result.returncode != 0, report(result)
    assert not output.exists()  # no final checkpoint from a failed job
    state = torch.load(tmp_path / "model.pt.resume", weights_only=True)  # intact and loadable
    assert state["counters"]["epoch"] == EPOCHS and state["world_size"] == 2


# --- worker side ----------------------------------------------------------------------------------------

def _train_worker(dataset: str, output: str, records: str, epochs: int = EPOCHS, die_after_batches: int = 0):
    from UNetSegmentLib import sampling
    from UNetSegmentLib.training import train

    rank = int(os.environ["RANK"])
    record = {"rank": rank, "seeds": [], "digests": [], "written": []}
    make_sampler = sampling.make_sampler

    def recording_sampler(name, cases, patch_size, seed=0):
        sampler = make_sampler(name, cases, patch_size, seed=seed)
        record["seeds"].append(int(seed))
        sample_batch, calls = sampler.sample_batch, [0]

        def recorded_batch(batch_size):
            calls[0] += 1
            if die_after_batches and rank == 1 and calls[0] > die_after_batches:
                os._exit(3)  # a rank dies in the middle of an epoch
            images, labels = sample_batch(batch_size)
            if calls[0] == 1:
                record["digests"].append(hashlib.sha1(images.tobytes()).hexdigest())
            return images, labels

        sampler.sample_batch = recorded_batch
        return sampler

    sampling.make_sampler = recording_sampler
    folder = os.path.dirname(os.path.abspath(output))

    def audit(event, arguments):  # any open for writing, whichever code path does it
        if event == "open" and isinstance(arguments[0], (str, bytes, os.PathLike)):
            path, mode, flags = arguments
            writing = any(c in str(mode or "") for c in "wax+") or bool(
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and os.path.dirname(os.path.abspath(os.fsdecode(path))) == folder:
                record["written"].append(os.path.basename(os.fsdecode(path)))

    sys.addaudithook(audit)
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda log_record: messages.append(log_record.getMessage())
    library = logging.getLogger("UNetSegmentLib")
    library.addHandler(handler)
    library.setLevel(logging.INFO)  # train's setup() quiets every rank but 0
    result = train(tiny_config(dataset, output, epochs=epochs))
    record.update(info_records=len(messages), epoch_losses=result.epoch_losses,
                  validation_dice=result.validation_dice)
    Path(records, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    scenario, arguments = sys.argv[1], json.loads(sys.argv[2])
    {"train": _train_worker}[scenario](**arguments)
