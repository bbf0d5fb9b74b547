"""Fine-tuning in a worker process, for the Slicer panel (issue 17): the client side.

The worker is `python -m UNetSegmentLib finetune MODEL DATASET --output NEW --budget-s N --json`; it
speaks the JSON-lines protocol of `worker.py` (hello, progress with "loss", result, error). A
`worker.CommandJob`: inference's polling, cancel (terminate, then kill; the worker removes its temp
files on SIGTERM, so a cancelled run writes no model) and clean-up; only the command differs.
Importable without torch.
"""

from __future__ import annotations

from typing import Optional

from .worker import CommandJob, worker_command


class FineTuneJob(CommandJob):
    """`poll()` from the GUI timer; `progress` (with `loss`), `result` (the worker's result dict) and `error`."""

    def __init__(self, model_path, dataset_dir, output=None, budget_s: float = 600.0, device: str = "auto",
                 max_iterations: Optional[int] = None, python=None, temp_root=None, env: Optional[dict] = None):
        super().__init__(python=python, temp_root=temp_root, env=env, model_path=model_path, device=device)
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

    def _apply(self, event: dict, check) -> None:
        super()._apply(event, check)
        if event.get("event") == "progress" and event.get("loss") is not None:
            self.loss = check.number("loss", event["loss"])


def model_to_select(result: Optional[dict], parent_path) -> str:
    """The tuned model when it is not worse on the held-out cases; otherwise the parent stays selected."""
    if result and result.get("improved") and result.get("output"):
        return str(result["output"])
    return str(parent_path)
