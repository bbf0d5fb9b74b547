"""Fine-tuning in a worker process, for the Slicer panel (issue 17): the client side.

The worker is `python -m UNetSegmentLib finetune MODEL DATASET --output NEW --budget-s N --json`; it
speaks the JSON-lines protocol of `worker.py` (hello, progress with "loss", result, error). This job
reuses `worker.WorkerJob`'s polling, cancel (terminate, then kill; the worker removes its temp files
on SIGTERM, so a cancelled run writes no model) and clean-up; only the command and the result differ.
Importable without torch.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from .worker import _LIBRARY_PARENT, TEMP_PREFIX, WorkerJob, _new_process_group, worker_command


class FineTuneJob(WorkerJob):
    """`poll()` from the GUI timer; `progress` (with `loss`), `result` (the worker's result dict) and `error`."""

    def __init__(self, model_path, dataset_dir, output=None, budget_s: float = 600.0, device: str = "auto",
                 max_iterations: Optional[int] = None, python=None, temp_root=None, env: Optional[dict] = None):
        super().__init__(None, model_path, device=device, python=python, temp_root=temp_root, env=env)
        self.dataset_dir = str(dataset_dir)
        self.output = None if output is None else str(output)
        self.budget_s = float(budget_s)
        self.max_iterations = max_iterations
        self.loss: Optional[float] = None

    def command(self) -> list:
        command = worker_command(self.python)[:-1] + ["finetune", self.model_path, self.dataset_dir,
                                                      "--budget-s", repr(self.budget_s),
                                                      "--device", str(self.options["device"]), "--json"]
        if self.output:
            command += ["--output", self.output]
        if self.max_iterations:
            command += ["--max-iterations", str(int(self.max_iterations))]
        return command

    def start(self) -> "FineTuneJob":
        self._started_at = time.perf_counter()
        self.folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.temp_root))
        try:
            env = dict(os.environ if self.env is None else self.env)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_LIBRARY_PARENT, env.get("PYTHONPATH")) if p)
            env.setdefault("PYTHONUNBUFFERED", "1")
            self._stdout = open(self.folder / "worker.jsonl", "wb")
            self._stderr = open(self.folder / "worker.log", "wb")
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._stdout,
                                            stderr=self._stderr, env=env, cwd=str(self.folder),
                                            **_new_process_group())
        except BaseException:
            self._cleanup()
            raise
        return self

    def _handle(self, line: str) -> None:
        super()._handle(line)
        event = self._events[-1] if self._events else None
        if isinstance(event, dict) and event.get("event") == "progress" and event.get("loss") is not None:
            self.loss = float(event["loss"])

    def _load_result(self, event: dict) -> dict:
        result = {key: value for key, value in event.items() if key != "event"}
        result["wall_seconds"] = time.perf_counter() - self._started_at
        return result


def model_to_select(result: Optional[dict], parent_path) -> str:
    """The tuned model when it is not worse on the held-out cases; otherwise the parent stays selected."""
    if result and result.get("improved") and result.get("output"):
        return str(result["output"])
    return str(parent_path)
