"""nnU-Net v2 results folders made by nnU-Net itself (Testing/nnunet_oracle.py in a subprocess: nnU-Net
reads its folder variables at import time), for the import oracle tests and the panel's import test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

# isotropic CT set: 3d_fullres with folds 0 and 1 (an ensemble), 2d fold 0, residual-encoder M fold 0
CT_BUILD = ("--dataset-id", "901", "--name", "CT", "--shape", "24", "32", "32", "--spacing", "1", "1", "1",
            "--modality", "CT", "--models", "ExperimentPlanner:3d_fullres:0,1", "ExperimentPlanner:2d:0",
            "nnUNetPlannerResEncM:3d_fullres:0")


def run_oracle(root: Path, *args) -> str:
    env = dict(os.environ, **{key: str(root / key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
               OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(HERE / "nnunet_oracle.py"), *args], env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def build_folders(root: Path, *args) -> list[Path]:
    """The results folders nnU-Net wrote under `root`, in the order of --models."""
    output = run_oracle(root, "build", str(root), *args)
    return [Path(line) for line in output.splitlines() if line.startswith(str(root))]
