"""The worker process (`python -m UNetSegmentLib worker`) and its client `WorkerJob`: the JSON-lines
protocol, the result equal to an in-process run, errors as one line with a fix, cancel and crash
leave no process and no temporary file."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent / "Python"))
from scene_helpers import make_tiny_checkpoint  # noqa: E402

from UNetSegmentLib.errors import Cancelled, CheckpointError, UNetSegmentError  # noqa: E402
from UNetSegmentLib.pipeline import segment_image  # noqa: E402
from UNetSegmentLib.worker import CommandJob, WorkerJob, run_worker  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("worker_models") / "tiny.pt")


def _image(shape=(24, 26, 22), seed=0):
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(0, 50, shape).astype(np.float32))
    image.SetSpacing((1.2, 0.8, 1.5))
    image.SetOrigin((10.0, -3.0, 4.0))
    return image


def test_worker_command_streams_protocol_and_matches_in_process_run(tmp_path, tiny):
    image = _image()
    sitk.WriteImage(image, str(tmp_path / "in.nrrd"))
    process = subprocess.run([sys.executable, "-m", "UNetSegmentLib", "worker", "--input", str(tmp_path / "in.nrrd"),
                              "--model", str(tiny), "--output", str(tmp_path / "out.nrrd"), "--device", "cpu",
                              "--uncertainty-output", str(tmp_path / "u.nrrd")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    events = [json.loads(line) for line in process.stdout.splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "hello" and events[0]["protocol"] == 1 and kinds[-1] == "result"
    assert "stage" in kinds and "progress" in kinds
    progress = [event for event in events if event["event"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] > 0
    result = events[-1]
    assert [label["name"] for label in result["labels"]] == ["background", "liver", "spleen"]
    expected = segment_image(image, tiny, device="cpu")
    written = sitk.ReadImage(result["labelmap"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected.labelmap))
    assert written.GetOrigin() == image.GetOrigin() and written.GetSpacing() == image.GetSpacing()
    assert Path(result["uncertainty"]).is_file()


def test_worker_reports_errors_as_one_line_with_fix(tmp_path):
    sitk.WriteImage(_image(), str(tmp_path / "in.nrrd"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    process = subprocess.run([sys.executable, "-m", "UNetSegmentLib", "worker", "--input", str(tmp_path / "in.nrrd"),
                              "--model", str(tmp_path / "notes.pt"), "--output", str(tmp_path / "out.nrrd")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert process.returncode == 2
    error = json.loads(process.stdout.splitlines()[-1])
    assert error["event"] == "error" and error["kind"] == "CheckpointError" and error["fix"]
    assert not (tmp_path / "out.nrrd").exists()


def test_fallback_notes_become_note_events(tmp_path, tiny):
    sitk.WriteImage(_image((40, 40, 40)), str(tmp_path / "in.nrrd"))
    stream = io.StringIO()
    run_worker(tmp_path / "in.nrrd", tiny, tmp_path / "out.nrrd", device="cpu", memory_budget_mb=5, stream=stream)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    notes = [event["text"] for event in events if event["event"] == "note"]
    assert notes and notes == events[-1]["stats"]["fallbacks"]


def test_job_result_error_and_cleanup(tmp_path, tiny):
    job = WorkerJob(_image(), tiny, device="cpu", temp_root=tmp_path).start()
    assert job.wait(timeout=300) and job.error is None, job.error
    assert sitk.GetArrayFromImage(job.result.labelmap).max() > 0 and job.result.seconds > 0
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "models").mkdir()
    bad = tmp_path / "models" / "bad.pt"
    bad.write_bytes(b"\x00" * 32)
    job = WorkerJob(_image(), bad, device="cpu", temp_root=tmp_path).start()
    assert job.wait(timeout=300)
    assert isinstance(job.error, CheckpointError) and "Fix:" in str(job.error)
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def _long_job(tmp_path, tiny):
    job = WorkerJob(_image((64, 64, 64)), tiny, overlap=0.85, device="cpu", temp_root=tmp_path).start()
    deadline = time.monotonic() + 120
    while job.progress is None and not job.poll() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job.finished, "the run ended before it could be interrupted"
    return job


def test_cancel_kills_worker_within_grace_and_removes_files(tmp_path, tiny):
    job = _long_job(tmp_path, tiny)
    pid = job.pid
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 5.0
    assert job.process.returncode is not None and not os.path.exists(f"/proc/{pid}")
    assert isinstance(job.error, Cancelled) and job.finished and job.result is None
    assert list(tmp_path.iterdir()) == []


def test_worker_that_ignores_terminate_is_killed(tmp_path, tiny):
    job = _long_job(tmp_path, tiny)
    os.kill(job.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    started = time.monotonic()
    job.cancel(grace_s=1.0)
    assert 0.9 < time.monotonic() - started < 5.0 and job.process.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []


def test_crashed_worker_is_reported_not_raised(tmp_path, tiny):
    job = _long_job(tmp_path, tiny)
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(timeout=10)
    assert isinstance(job.error, UNetSegmentError) and "SIGKILL" in str(job.error) and "Fix:" in str(job.error)
    assert list(tmp_path.iterdir()) == []


class _ScriptJob(CommandJob):
    """The real client (files, polling, clean-up) reading a stand-in worker that prints what `script` prints."""

    def __init__(self, script: str, temp_root):
        super().__init__([], temp_root=temp_root)
        self.script = script

    def command(self) -> list:
        return [sys.executable, "-c", self.script]


HOSTILE_OUTPUT = r'''
import json, sys
out = sys.stdout
out.write(json.dumps({"event": "progress", "done": 3, "total": 9, "elapsed_s": 1.0, "remaining_s": 2.0}) + "\n")
out.write('{"event": "progress", "done": "many", "total": 9, "elapsed_s": 1.0}\n')
out.write('{"event": "progress", "done": Infinity, "total": 9, "elapsed_s": 1.0}\n')
out.write('{"event": "progress", "done": 4, "total": 9, "elapsed_s": NaN}\n')
out.write('{"event": "progress", "done": [1], "total": {}, "elapsed_s": 1.0}\n')
out.write('{"event": "note", "text": "' + "x" * (3 << 20) + '"}\n')  # one line longer than any event of ours
out.write("a library's chatter\n" * 200000)
out.write('{"event": "note", "text": "kept"}\n')
out.write(json.dumps({"event": "result", "answer": 42}) + "\n")
out.flush()
sys.stderr.write("noise\n" * 2000000 + "the last words\n")
'''


def test_hostile_worker_output_is_bounded_and_malformed_events_are_ignored(tmp_path):
    job = _ScriptJob(HOSTILE_OUTPUT, tmp_path).start()
    assert job.wait(timeout=60)
    assert job.error is None and job.result["answer"] == 42
    assert (job.progress.done, job.progress.total, job.progress.remaining_s) == (3, 9, 2.0)
    assert job.notes == ["kept"]  # the 3 MiB "note" was dropped whole, not half-parsed
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_floods_its_log_and_dies_reports_only_the_tail(tmp_path):
    job = _ScriptJob("import sys; sys.stderr.write('noise\\n' * 3000000 + 'the last words\\n'); sys.exit(3)",
                     tmp_path).start()
    import tracemalloc

    tracemalloc.start()
    try:
        assert job.wait(timeout=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading the 18 MB log took {peak / 2 ** 20:.1f} MiB"  # the tail only
    message = str(job.error)
    assert "the last words" in message and "exit code 3" in message and len(message) < 2000, message[:300]
    assert list(tmp_path.iterdir()) == []
