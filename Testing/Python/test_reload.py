"""Reload (developer mode) re-imports the backend too, so edits to UNetSegmentLib take effect. Runs in a
fresh interpreter: reloading replaces classes that the other tests hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = r'''
import json, sys
sys.path[:0] = [HERE, str(__import__("pathlib").Path(HERE).parents[1])]
import slicer, slicer_adapter
slicer_adapter.install()
slicer_adapter.registerModule()
panel = slicer_adapter.createPanel()
import UNetSegmentLib.worker  # imported on the first run; here at once
before = {name: id(sys.modules[name]) for name in ("UNetSegment", "UNetSegmentLib.worker", "UNetSegmentLib.errors")}
panel.onReload()
after = {name: id(sys.modules.get(name)) for name in before}
import UNetSegmentLib.worker  # the reloaded panel imports it again on first use
new = slicer.modules.UNetSegmentWidget
print("RESULT " + json.dumps({"changed": [n for n in before if before[n] != after[n]],
                              "newWidget": new is not panel, "newHasUi": hasattr(new, "ui"),
                              "workerReimported": id(sys.modules["UNetSegmentLib.worker"]) != before["UNetSegmentLib.worker"]}))
'''


def test_reload_reimports_module_and_backend(tmp_path):
    code = SCRIPT.replace("HERE", repr(str(HERE)))
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stdout[-2000:] + process.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert set(out["changed"]) == {"UNetSegment", "UNetSegmentLib.worker", "UNetSegmentLib.errors"}, out
    assert out["newWidget"] and out["newHasUi"] and out["workerReimported"]
