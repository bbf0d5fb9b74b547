"""Inference in a separate process: the JSON-lines protocol, the worker side and the client side.

Why a process: Slicer's main thread holds Python's GIL while its Qt event loop idles (PythonQt never
releases it), so inference in a `threading.Thread` only runs between timer ticks. A worker process
has its own interpreter; the panel only polls a small file on its timer.

Protocol (worker -> client): one JSON object per line on the worker's stdout, each with "event":
  {"event": "hello", "protocol": 1, "pid": 123}
  {"event": "stage", "stage": "loading model" | "preprocessing" | "inference" | "writing"}
  {"event": "progress", "done": 3, "total": 40, "elapsed_s": 1.2, "remaining_s": 14.8, "stage": "inference"}
  {"event": "note", "text": "..."}                       (e.g. an out-of-memory fallback that was taken)
  {"event": "result", "labelmap": PATH, "uncertainty": PATH|null, "labels": [...], "seconds": 4.2,
   "stats": {...}}
  {"event": "error", "kind": "InputError", "problem": "...", "fix": "..."}
The client redirects stdout (and stderr) to files in the job's temporary folder and reads the new
complete lines on every poll: no pipe can fill up, no reader thread needs the GIL. Cancel
terminates the process, then kills it after a grace period; the temporary folder (input, outputs,
logs) is removed on every path. Importable without torch (the client runs in Slicer's GUI process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import Cancelled, SchemaError, UNetSegmentError
from .schema import Checker

PROTOCOL_VERSION = 1
TERMINATE_GRACE_S = 3.0
TEMP_PREFIX = "unetsegment-job-"
# The client reads what a worker prints, and a library in the worker may print anything: reads, lines and
# the log tail are bounded so that a flood (or one endless line) costs neither memory nor a frozen GUI.
READ_CHUNK_BYTES = 4 << 20  # per poll
MAX_PROTOCOL_LINE_BYTES = 1 << 20  # our events are a few kB; a longer line is not one of ours
LOG_TAIL_BYTES = 64 << 10
_LIBRARY_PARENT = str(Path(__file__).resolve().parent.parent)


# --- worker side ---------------------------------------------------------------------------------


def emit(stream, event: str, **fields: Any) -> None:
    """One protocol line, flushed at once so the client sees it on its next poll."""
    stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    stream.flush()


def run_worker(input_path, model_path, output_path, uncertainty_path=None, sampler="auto", overlap=0.5,
               k=None, device="auto", precision="auto", memory_budget_mb=None, stream=None, backend="auto",
               threads=None) -> int:
    """Segment one image file and write the labelmap; reports every step as a protocol line."""
    stream = sys.stdout if stream is None else stream
    emit(stream, "hello", protocol=PROTOCOL_VERSION, pid=os.getpid())
    try:
        from .io import read_image, write_image
        from .pipeline import segment_image
        from .progress import Progress

        emit(stream, "stage", stage="loading model")
        from .ensemble import load_model
        from .checkpoint import resolve_device

        target = resolve_device(device)
        model = load_model(model_path, device=target)
        emit(stream, "stage", stage="preprocessing")
        image = read_image(input_path)

        def progress(report: Progress) -> None:
            emit(stream, "progress", done=report.done, total=report.total, elapsed_s=round(report.elapsed_s, 3),
                 remaining_s=None if report.remaining_s is None else round(report.remaining_s, 3),
                 stage=report.stage)

        result = segment_image(image, model, sampler=sampler, overlap=overlap, k=k, device=target,
                               precision=precision, memory_budget_mb=memory_budget_mb, backend=backend,
                               threads=threads, return_uncertainty=uncertainty_path is not None, progress=progress)
        emit(stream, "stage", stage="writing")
        for note in (result.stats or {}).get("fallbacks") or []:
            emit(stream, "note", text=str(note))
        write_image(result.labelmap, output_path, overwrite=True, compress=False)
        if uncertainty_path is not None and result.uncertainty is not None:
            write_image(result.uncertainty, uncertainty_path, overwrite=True, compress=False)
        labels = [{"value": label.value, "name": label.name, "color": list(label.color)} for label in result.labels]
        emit(stream, "result", labelmap=str(output_path),
             uncertainty=str(uncertainty_path) if uncertainty_path is not None and result.uncertainty is not None
             else None, labels=labels, seconds=result.seconds, stats=_plain(result.stats))
        return 0
    except UNetSegmentError as error:
        emit(stream, "error", kind=type(error).__name__, problem=error.problem, fix=error.fix)
        raise
    except MemoryError:
        emit(stream, "error", kind="OutOfMemoryError", problem="The inference ran out of memory.",
             fix="Pick device CPU, a smaller overlap, an ROI, or close other programs and try again.")
        raise
    except Exception as error:  # any other failure must still reach the panel as one line
        if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError not caught by the engine
            emit(stream, "error", kind="OutOfMemoryError", problem=f"The GPU ran out of memory ({error}).",
                 fix="Pick device CPU, an ROI, or a smaller overlap and try again.")
        else:
            emit(stream, "error", kind="crash", problem=f"Inference failed: {type(error).__name__}: {error}",
                 fix="See the worker log in the Python console and report the problem.")
        raise


def _plain(value: Any) -> Any:
    """Stats as JSON-safe values (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(value, default=str))


# --- client side ---------------------------------------------------------------------------------


@dataclass
class WorkerProgress:
    done: int
    total: int
    elapsed_s: float
    remaining_s: Optional[float]
    stage: str = "inference"


@dataclass
class WorkerResult:
    """What the Logic imports into the scene; images are read before the temporary folder goes."""

    labelmap: Any  # SimpleITK image on the grid of the image that was sent
    labels: list
    uncertainty: Any = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    wall_seconds: float = 0.0


def worker_command(python: Optional[str] = None) -> list:
    """How a worker is started: the caller's own Python (Slicer's, or the venv's), as a module."""
    return [python or sys.executable, "-m", "UNetSegmentLib", "worker"]


class WorkerJob:
    """One inference in a worker process, driven by `poll()` from the caller's thread.

    `poll()` never blocks: it reads the new protocol lines and, once the process has ended, loads
    the result (or sets `error`) and removes the temporary folder. Attributes read by the GUI:
    `progress`, `stage`, `notes`, `finished`, `result`, `error`.
    """

    what = "inference worker"  # in the message when the process dies without an error event

    def __init__(self, image, model_path, sampler="auto", overlap=0.5, k=None, device="auto", precision="auto",
                 return_uncertainty=False, memory_budget_mb=None, python=None, temp_root=None,
                 env: Optional[dict] = None, backend: str = "auto", threads: Optional[int] = None):
        self.image = image
        self.model_path = str(model_path)
        self.options = dict(sampler=sampler, overlap=overlap, k=k, device=device, precision=precision,
                            memory_budget_mb=memory_budget_mb, backend=backend, threads=threads)
        self.return_uncertainty = bool(return_uncertainty)
        self.python = python
        self.temp_root = temp_root
        self.env = env
        self.progress: Optional[WorkerProgress] = None
        self.stage: Optional[str] = None
        self.notes: list = []
        self.result: Optional[WorkerResult] = None
        self.error: Optional[UNetSegmentError] = None
        self.folder: Optional[Path] = None
        self.process: Optional[subprocess.Popen] = None
        self._offset = 0
        self._pending = b""
        self._skipping_long_line = False
        self._result_event: Optional[dict] = None
        self._error_event: Optional[dict] = None
        self._finished = False
        self._started_at = 0.0
        self._stdout = self._stderr = None

    # lifecycle

    def start(self) -> "WorkerJob":
        """Writes the input into a new temporary folder and starts the worker; cleans up if that fails."""
        return self._launch(self._inference_command)

    def _inference_command(self, folder: Path) -> list:
        import SimpleITK as sitk

        input_path = folder / "input.nrrd"
        sitk.WriteImage(self.image, str(input_path), False)
        command = worker_command(self.python) + [
            "--input", str(input_path), "--model", self.model_path, "--output", str(folder / "labels.nrrd"),
            "--sampler", str(self.options["sampler"]), "--overlap", repr(float(self.options["overlap"])),
            "--device", str(self.options["device"]), "--precision", str(self.options["precision"])]
        if self.options["k"]:
            command += ["--k", str(int(self.options["k"]))]
        if self.options["memory_budget_mb"]:
            command += ["--memory-budget-mb", repr(float(self.options["memory_budget_mb"]))]
        if self.options["backend"] != "auto":
            command += ["--backend", str(self.options["backend"])]
        if self.options["threads"]:
            command += ["--threads", str(int(self.options["threads"]))]
        if self.return_uncertainty:
            command += ["--uncertainty-output", str(folder / "uncertainty.nrrd")]
        return command

    def _launch(self, build_command: Callable[[Path], list]) -> "WorkerJob":
        """A new temporary folder (the worker's cwd and protocol files), then the process; cleans up on failure."""
        self._started_at = time.perf_counter()
        self.folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.temp_root))
        try:
            command = build_command(self.folder)
            env = dict(os.environ if self.env is None else self.env)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_LIBRARY_PARENT, env.get("PYTHONPATH")) if p)
            env.setdefault("PYTHONUNBUFFERED", "1")
            self._stdout = open(self.folder / "worker.jsonl", "wb")
            self._stderr = open(self.folder / "worker.log", "wb")
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._stdout,
                                            stderr=self._stderr, env=env, cwd=str(self.folder),
                                            **_new_process_group())
        except BaseException:
            self._cleanup()
            raise
        return self

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    @property
    def finished(self) -> bool:
        return self._finished

    def poll(self) -> bool:
        """Reads new lines; on exit loads the result and cleans up. True once finished."""
        if self._finished:
            return True
        exit_code = self.process.poll()
        self._read_lines()
        if exit_code is None:
            return False
        self._read_lines(to_end=True)
        self._finish(exit_code)
        return True

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> bool:
        """Blocking variant for scripts and the self-test; True when finished within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def cancel(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """Terminate, kill after `grace_s`, remove every temporary file; the job ends as Cancelled."""
        if self._finished:
            return
        self._stop_process(grace_s)
        self._finished = True
        self.error = Cancelled()
        self._cleanup()

    # internals

    def _stop_process(self, grace_s: float) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _read_lines(self, to_end: bool = False) -> None:
        """The new complete lines, at most READ_CHUNK_BYTES per call unless `to_end` (after the exit)."""
        path = self.folder / "worker.jsonl"
        while True:
            try:
                with open(path, "rb") as stream:
                    available = os.fstat(stream.fileno()).st_size - self._offset
                    stream.seek(self._offset)
                    chunk = stream.read(max(0, min(available, READ_CHUNK_BYTES)))
            except OSError:
                return
            self._offset += len(chunk)
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            for line in lines:
                if self._skipping_long_line:  # the end of a line that was too long: dropped with its start
                    self._skipping_long_line = False
                elif len(line) <= MAX_PROTOCOL_LINE_BYTES:
                    self._handle(line.decode("utf-8", errors="replace"))
            if len(self._pending) > MAX_PROTOCOL_LINE_BYTES:
                self._pending, self._skipping_long_line = b"", True
            if not to_end or len(chunk) < READ_CHUNK_BYTES:
                return

    def _handle(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return  # a stray print from a library: not part of the protocol
        if not isinstance(event, dict):
            return
        try:
            self._apply(event, Checker("worker event", SchemaError))
        except SchemaError:
            return  # a line that looks like an event but whose fields are not: ignored like stray text
        if event.get("event") == "result" and self._result_event is None:
            self._result_event = event
        elif event.get("event") == "error" and self._error_event is None:
            self._error_event = event

    def _apply(self, event: dict, check: Checker) -> None:
        """Updates what the GUI reads from one event; `check` raises SchemaError on malformed fields."""
        kind = event.get("event")
        if kind == "progress":
            remaining = event.get("remaining_s")
            self.progress = WorkerProgress(check.integer("done", event.get("done", 0), 0),
                                           check.integer("total", event.get("total", 0), 0),
                                           check.number("elapsed_s", event.get("elapsed_s", 0.0), low=0.0),
                                           None if remaining is None else check.number("remaining_s", remaining),
                                           str(event.get("stage", "inference")))
        elif kind == "stage":
            self.stage = str(event.get("stage"))
        elif kind == "note":
            self.notes.append(str(event.get("text")))

    def _finish(self, exit_code: int) -> None:
        try:
            result, error = self._result_event, self._error_event
            if exit_code == 0 and result is not None:
                self.result = self._load_result(result)
            elif error is not None:
                self.error = _error_from_event(error)
            else:
                self.error = UNetSegmentError(
                    f"The {self.what} stopped unexpectedly ({describe_exit(exit_code)}){self._log_tail()}.",
                    "This is most often a lack of memory: pick device CPU, set an ROI, or close other "
                    "programs and try again.")
        except UNetSegmentError as error:
            self.error = error
        except Exception as error:  # reading the result failed: still a clear status, never a traceback
            self.error = UNetSegmentError(f"The worker's result could not be read ({error}).",
                                          "Run the segmentation again; report the problem if it persists.")
        finally:
            self._finished = True
            self._cleanup()

    def _load_result(self, event: dict) -> WorkerResult:
        import SimpleITK as sitk

        from .metadata import LabelInfo

        labels = [LabelInfo(int(item["value"]), str(item["name"]), tuple(float(c) for c in item["color"]))
                  for item in event["labels"]]
        uncertainty = sitk.ReadImage(event["uncertainty"]) if event.get("uncertainty") else None
        stats = dict(event.get("stats") or {})
        if self.notes and not stats.get("fallbacks"):
            stats["fallbacks"] = list(self.notes)
        return WorkerResult(labelmap=sitk.ReadImage(event["labelmap"]), labels=labels, uncertainty=uncertainty,
                            seconds=float(event.get("seconds", 0.0)), stats=stats,
                            wall_seconds=time.perf_counter() - self._started_at)

    def _log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.folder / "worker.log", "rb") as stream:
                stream.seek(max(0, stream.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                text = stream.read().decode("utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        tail = " | ".join(line.strip() for line in text[-lines:] if line.strip())
        return f"; its last output: {tail}" if tail else ""

    def _cleanup(self) -> None:
        for stream in (self._stdout, self._stderr):
            if stream is not None:
                stream.close()
        self._stdout = self._stderr = None
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self):  # a job dropped while running must not leave a process or files behind
        try:
            if not self._finished and self.process is not None:
                self.cancel(grace_s=1.0)
        except Exception:
            pass


def run_json_command(failure: str, work: Callable[[Callable], dict], stream=None) -> int:
    """The worker side of a CommandJob: hello, progress events, then one result or error event.

    `work(progress)` returns the result fields; `failure` starts the problem line of an unexpected crash.
    Known errors are re-raised after their event so the CLI boundary still sets the exit status."""
    from .errors import translate

    stream = stream or sys.stdout
    emit(stream, "hello", protocol=PROTOCOL_VERSION, pid=os.getpid())

    def progress(report) -> None:
        emit(stream, "progress", done=report.done, total=report.total, elapsed_s=round(report.elapsed_s, 3),
             remaining_s=None if report.remaining_s is None else round(report.remaining_s, 3),
             stage=report.stage, loss=getattr(report, "loss", None))

    try:
        result = work(progress)
    except Exception as error:  # noqa: BLE001 - reported as a protocol event, then the CLI boundary decides
        known = translate(error)
        if known is not None:
            emit(stream, "error", kind=type(known).__name__, problem=known.problem, fix=known.fix)
            raise known from None
        emit(stream, "error", kind="crash", problem=f"{failure}: {type(error).__name__}: {error}",
             fix="See the worker log and report the problem.")
        raise
    emit(stream, "result", **result)
    return 0


class CommandJob(WorkerJob):
    """A `python -m UNetSegmentLib <command> ... --json` run in a worker process (fine-tuning, importing a
    model): the same polling, cancel and clean-up as inference; `result` is the command's result event."""

    what = "worker"

    def __init__(self, arguments: Sequence = (), python=None, temp_root=None, env: Optional[dict] = None,
                 model_path="", device: str = "auto"):
        super().__init__(None, model_path, device=device, python=python, temp_root=temp_root, env=env)
        self.arguments = [str(argument) for argument in arguments]

    def command(self) -> list:
        return worker_command(self.python)[:-1] + self.arguments + ["--json"]

    def start(self) -> "CommandJob":
        return self._launch(lambda folder: self.command())

    def _load_result(self, event: dict) -> dict:
        result = {key: value for key, value in event.items() if key != "event"}
        result["wall_seconds"] = time.perf_counter() - self._started_at
        return result


def describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        import signal

        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    return f"exit code {exit_code}"


def _error_from_event(event: dict) -> UNetSegmentError:
    from . import errors

    kind = event.get("kind")
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, UNetSegmentError)) or cls is Cancelled:
        cls = UNetSegmentError
    return cls(str(event.get("problem") or "The worker failed."), event.get("fix"))


def _new_process_group() -> dict:
    """Ctrl+C in Slicer's terminal must not reach the worker twice; cancel is ours to send."""
    if sys.platform.startswith("win"):
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    return {"start_new_session": True}


def run_blocking(job: WorkerJob, on_progress: Optional[Callable[[WorkerProgress], None]] = None,
                 interval: float = 0.05) -> WorkerJob:
    """Start (if needed) and wait, forwarding progress; used by scripts and tests."""
    if job.process is None:
        job.start()
    last = None
    while not job.poll():
        if on_progress is not None and job.progress is not None and job.progress != last:
            last = job.progress
            on_progress(job.progress)
        time.sleep(interval)
    return job
