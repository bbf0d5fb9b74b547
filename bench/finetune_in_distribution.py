"""What fine-tuning on correct, in-distribution cases costs the parent (issue 17), with and without rehearsal.

    bash .ci/with-venv python bench/finetune_in_distribution.py [--steps 30 150] [--rehearsal 0 0.5]

A clinician whose scans look like the training data corrects a few cases; tuning on them should not
make the model worse on the next case. Parent: the first fold of the shipped hippocampus MRI model.
Tuned on 3 of the held-out cases no fold trained on (their reference labels are the "corrections"),
scored on the 4th held-out case plus --eval-cases of fold 0's own validation cases (never trained on
by fold 0): mean foreground Dice by sliding window, before and after. Each variant (steps x rehearsal
share) starts from the parent with the product's recipe (finetune._tune: RAdam, warm-up, poly decay).

Last line: parent=<Dice> then <steps>s_r<share>[_lr<lr>]=<Dice change> for every variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
MODEL = ROOT / "Resources" / "Models" / "hippocampus_mr"
TUNING_CASES = ("hippocampus_008", "hippocampus_074", "hippocampus_276")
HELD_OUT_CASE = "hippocampus_165"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--dataset", default=str(DATASET))
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 150])
    parser.add_argument("--rehearsal", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--lr", type=float, nargs="+", default=None, help="default: the product's")
    parser.add_argument("--eval-cases", type=int, default=14)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import SimpleITK as sitk
    import torch

    from UNetSegmentLib import finetune, preprocessing
    from UNetSegmentLib.training import resolve_device, validate

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    parent = finetune.resolve_parent(args.model)
    metadata = parent.metadata
    labels = {label.value: label.name for label in metadata.labels}
    dataset = Path(args.dataset)

    def load(case_id: str):
        image = preprocessing.reorient_to_canonical(
            sitk.ReadImage(str(dataset / "imagesTr" / f"{case_id}_0000.nii.gz"), sitk.sitkFloat32))
        label = preprocessing.reorient_to_canonical(sitk.ReadImage(str(dataset / "labelsTr" / f"{case_id}.nii.gz")))
        array = preprocessing.normalize(sitk.GetArrayFromImage(image), metadata.normalization)
        return np.asarray(array, dtype=np.float32), sitk.GetArrayFromImage(label).astype(np.uint8)

    tuning = [load(case_id) for case_id in TUNING_CASES]
    scoring_ids = [HELD_OUT_CASE] + list(metadata.training["validation_case_ids"][: args.eval_cases])
    scoring = [load(case_id) for case_id in scoring_ids]
    replay = finetune.find_rehearsal(parent)
    if replay is None and any(share > 0 for share in args.rehearsal):
        raise SystemExit(f"{parent.checkpoint} has no rehearsal set beside it; only --rehearsal 0 can run")

    def score(network) -> float:
        network.eval()
        dice = validate(network, [s[0] for s in scoring], [s[1] for s in scoring], labels,
                        tuple(metadata.patch_size), 0.5, device)
        return float(np.mean(list(dice.values())))

    base = score(finetune._network(parent, device, deep_supervision=False))
    print(f"parent {parent.checkpoint.name}: mean Dice {base:.4f} on {len(scoring)} cases", flush=True)
    results = [f"parent={base:.4f}"]
    rates = args.lr or [finetune.FineTuneConfig(model="", dataset_dir="").lr]
    for lr in rates:
        for steps in args.steps:
            for share in args.rehearsal:
                config = finetune.FineTuneConfig(model=str(args.model), dataset_dir=".", max_iterations=steps,
                                                 rehearsal=share, device=args.device, lr=lr)
                started = time.perf_counter()
                network, done = finetune._tune(parent, [t[0] for t in tuning], [t[1] for t in tuning], config,
                                               device, 1e9, None, None, "study", replay if share > 0 else None)
                seconds = time.perf_counter() - started
                change = score(network) - base
                print(f"lr {lr:g}, {done} steps, rehearsal {share}: Dice change {change:+.4f} ({seconds:.0f} s)",
                      flush=True)
                results.append(f"{steps}s_r{share:g}" + (f"_lr{lr:g}" if args.lr else "") + f"={change:+.4f}")
    print(" ".join(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
