"""Every CUDA path of the backend, run on a real GPU and compared with the CPU.

CI has no GPU, so the unit tests only see the CPU side of code that branches on the device
(autocast dtypes, free-memory budgets, NCCL under torchrun, checkpoints saved from GPU tensors).
This script is the check for a machine that has one; it needs the real data beside the repo
(or --dataset) and the shipped models:

    bash .ci/with-venv python bench/cuda_paths.py            # device cuda against cpu
    bash .ci/with-venv python bench/cuda_paths.py --device cpu   # dry run of the same code on the CPU

Each check prints PASS/FAIL with its figures; the last line is machine-readable:
`passed=N failed=M device=... <check>_<figure>=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATASET = os.path.join(os.path.dirname(ROOT), "shared", "data", "Task04_Hippocampus")
SAMPLES = os.path.join(ROOT, "Resources", "Samples")
MODELS = os.path.join(ROOT, "Resources", "Models")

FIGURES: dict[str, object] = {}
RESULTS: list[tuple[str, bool]] = []


def check(function):
    """Run one check; an exception or a failed condition is a FAIL with its traceback, never a crash."""
    name = function.__name__.removeprefix("check_")
    started = time.perf_counter()
    try:
        ok, detail = function()
    except Exception:  # noqa: BLE001 - the report must go on to the next check
        ok, detail = False, traceback.format_exc()
    RESULTS.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - started:.1f} s): {detail}", flush=True)
    return function


def _figure(name, value):
    FIGURES[name] = round(value, 5) if isinstance(value, float) else value
    return value


def _arrays(result):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(result.labelmap)


def _mean_dice(labels, reference):
    from UNetSegmentLib.metrics import dice_per_label

    scores = dice_per_label(labels, reference, [1, 2])
    return sum(scores.values()) / len(scores)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="device under test (default cuda); compared with cpu")
    parser.add_argument("--dataset", default=DATASET, help="Decathlon Task04 folder: a few cases for training")
    parser.add_argument("--cases", type=int, default=10, help="cases copied into the small training set")
    args = parser.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk
    import torch

    from UNetSegmentLib.ensemble import load_model
    from UNetSegmentLib.pipeline import segment_image

    device = args.device
    FIGURES["device"] = (torch.cuda.get_device_name(0).replace(" ", "_")
                         if device.startswith("cuda") and torch.cuda.is_available() else device)
    print(f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}, device under test {device}",
          flush=True)
    work = tempfile.mkdtemp(prefix="cuda_paths_")
    mr_image = sitk.ReadImage(os.path.join(SAMPLES, "sample_mr_hippocampus.nii.gz"))
    mr_reference = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(SAMPLES,
                                                                      "sample_mr_hippocampus_reference.nii.gz")))
    hippocampus = os.path.join(MODELS, "hippocampus_mr")
    cpu_model = load_model(hippocampus, device="cpu")
    gpu_model = load_model(hippocampus, device=device)
    members = len(getattr(cpu_model, "members", [cpu_model]))
    baseline = segment_image(mr_image, cpu_model, device="cpu", precision="fp32", backend="torch",
                             return_probabilities=True, return_uncertainty=True)
    _figure("cpu_fp32_dice", _mean_dice(_arrays(baseline), mr_reference))

    def compare(precision, mirror=()):
        cpu = baseline if not mirror else segment_image(mr_image, cpu_model, device="cpu", precision="fp32",
                                                        backend="torch", mirror_axes=mirror,
                                                        return_probabilities=True, return_uncertainty=True)
        gpu = segment_image(mr_image, gpu_model, device=device, precision=precision, mirror_axes=mirror,
                            return_probabilities=True, return_uncertainty=True)
        labels_cpu, labels_gpu = _arrays(cpu), _arrays(gpu)
        agreement = float((labels_cpu == labels_gpu).mean())
        probability_diff = float(np.abs(sitk.GetArrayFromImage(cpu.probabilities)
                                        - sitk.GetArrayFromImage(gpu.probabilities)).max())
        uncertainty_diff = float(np.abs(sitk.GetArrayFromImage(cpu.uncertainty)
                                        - sitk.GetArrayFromImage(gpu.uncertainty)).max())
        dice_cpu, dice_gpu = _mean_dice(labels_cpu, mr_reference), _mean_dice(labels_gpu, mr_reference)
        return agreement, probability_diff, uncertainty_diff, dice_cpu, dice_gpu, gpu.stats

    @check
    def check_segment_fp32():
        agreement, p_diff, u_diff, dice_cpu, dice_gpu, stats = compare("fp32")
        _figure("fp32_agreement", agreement)
        _figure("fp32_prob_diff", p_diff)
        ok = agreement >= 0.999 and p_diff <= 1e-3 and u_diff <= 1e-3 and abs(dice_gpu - dice_cpu) <= 0.002
        return ok, (f"{members}-fold ensemble on the MR sample: label agreement {agreement:.5f}, "
                    f"max |p diff| {p_diff:.2e}, "
                    f"max |uncertainty diff| {u_diff:.2e}, Dice cpu {dice_cpu:.4f} / {device} {dice_gpu:.4f}; "
                    f"stats {json.dumps({k: v for k, v in stats.items() if k in ('backend', 'precision', 'device')})}")

    for precision in ("fp16", "bf16", "auto"):
        def check_precision(precision=precision):
            agreement, p_diff, u_diff, dice_cpu, dice_gpu, stats = compare(precision)
            _figure(f"{precision}_agreement", agreement)
            _figure(f"{precision}_dice_change", dice_gpu - dice_cpu)
            ok = agreement >= 0.995 and abs(dice_gpu - dice_cpu) <= 0.005 and p_diff <= 0.05
            return ok, (f"vs cpu fp32: label agreement {agreement:.5f}, max |p diff| {p_diff:.2e}, Dice "
                        f"{dice_cpu:.4f} -> {dice_gpu:.4f}; stats precision "
                        f"{stats.get('precision')!r} notes {stats.get('notes', stats.get('note'))!r}")
        check_precision.__name__ = f"check_segment_{precision}"
        check(check_precision)

    @check
    def check_mirror_tta():
        agreement, p_diff, u_diff, dice_cpu, dice_gpu, _ = compare("fp32", mirror=(0, 1, 2))
        _figure("mirror_agreement", agreement)
        ok = agreement >= 0.999 and p_diff <= 1e-3 and u_diff <= 1e-3
        return ok, (f"mirroring on 3 axes: agreement {agreement:.5f}, max |p diff| {p_diff:.2e}, "
                    f"|u diff| {u_diff:.2e}, Dice cpu {dice_cpu:.4f} / {device} {dice_gpu:.4f}")

    @check
    def check_ct_memory_budget():
        ct = sitk.ReadImage(os.path.join(SAMPLES, "sample_ct.nrrd"))
        phantom = os.path.join(MODELS, "phantom_ct_demo.pt")
        cpu = _arrays(segment_image(ct, phantom, device="cpu", precision="fp32", backend="torch"))
        loose = segment_image(ct, phantom, device=device, precision="fp32")
        tight = segment_image(ct, phantom, device=device, precision="fp32", memory_budget_mb=200)
        agree_tight = float((cpu == _arrays(tight)).mean())
        agree_loose = float((cpu == _arrays(loose)).mean())
        _figure("ct_budget_agreement", agree_tight)
        same_windows = tuple(tight.stats["patch_size"]) == tuple(loose.stats["patch_size"])
        return (agree_tight >= 0.999 and agree_loose >= 0.999 and same_windows,
                f"phantom CT model: agreement with cpu {agree_loose:.5f} (free-memory budget, mode "
                f"{loose.stats.get('mode')}, {loose.stats.get('batch_size')} windows a batch), {agree_tight:.5f} "
                f"(200 MB budget: mode {tight.stats.get('mode')}, {tight.stats.get('batch_size')} a batch); "
                f"fallbacks {tight.stats.get('fallbacks')}")

    # a small Decathlon-layout training set of real cases for the training paths
    dataset = os.path.join(work, "Task04_small")
    with open(os.path.join(args.dataset, "dataset.json"), encoding="utf-8") as handle:
        description = json.load(handle)
    chosen = description["training"][: args.cases]
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(dataset, sub))
    for entry in chosen:
        case = os.path.basename(entry["label"])
        shutil.copy(os.path.join(args.dataset, "labelsTr", case), os.path.join(dataset, "labelsTr", case))
        image = case.replace(".nii.gz", "_0000.nii.gz")
        shutil.copy(os.path.join(args.dataset, "imagesTr", image), os.path.join(dataset, "imagesTr", image))
    # the shipped model's segment names, so that fine-tuning accepts the cases as its own
    description.update(training=chosen, numTraining=len(chosen),
                       labels={str(label.value): label.name for label in cpu_model.metadata.labels})
    with open(os.path.join(dataset, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump(description, handle)

    def cli(*arguments, launcher=(), timeout=300):
        command = [sys.executable, *launcher, "-m", "UNetSegmentLib", *arguments]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - started
        lines = [line for line in (completed.stdout + completed.stderr).strip().splitlines()
                 if "Warning" not in line and "warnings.warn" not in line]
        tail = lines[-3:] if completed.returncode == 0 else lines[-25:]  # a failure keeps its traceback
        return completed.returncode, seconds, " | ".join(tail)

    trained = os.path.join(work, "trained.pt")

    @check
    def check_train_cli():
        rc, seconds, tail = cli("train", dataset, "--output", trained, "--device", device, "--epochs", "2",
                                "--iterations", "10", "--patch-size", "40", "56", "40", "--quiet", "--int8", "no")
        if rc != 0:
            return False, f"rc {rc}: {tail}"
        from UNetSegmentLib.checkpoint import load_checkpoint

        loaded = load_checkpoint(trained, device="cpu")  # written from GPU tensors, read on a CPU-only machine
        on_cpu = all(p.device.type == "cpu" for p in loaded.network.parameters())
        finite = all(bool(torch.isfinite(p).all()) for p in loaded.network.parameters())
        _figure("train_s", seconds)
        return on_cpu and finite, (f"20 iterations with deep supervision + augmentation in {seconds:.1f} s; "
                                   f"checkpoint loads on cpu {on_cpu}, finite {finite}; "
                                   f"recorded device {loaded.metadata.training.get('device')!r}")

    @check
    def check_segment_cli_with_gpu_trained_model():
        output = os.path.join(work, "segmented.nii.gz")
        rc, seconds, tail = cli("segment", os.path.join(SAMPLES, "sample_mr_hippocampus.nii.gz"), "--model",
                                trained, "--output", output, "--device", device, "--quiet", "--yes")
        return rc == 0 and os.path.getsize(output) > 0, f"rc {rc} in {seconds:.1f} s: {tail}"

    @check
    def check_topk_train_and_infer():
        topk = os.path.join(work, "topk.pt")
        rc, seconds, tail = cli("train", dataset, "--output", topk, "--device", device, "--epochs", "1",
                                "--iterations", "10", "--patch-size", "40", "56", "40", "--sampler", "topk",
                                "--quiet", "--int8", "no")
        if rc != 0:
            return False, f"train rc {rc}: {tail}"
        cpu = _arrays(segment_image(mr_image, topk, device="cpu", precision="fp32", backend="torch"))
        gpu = _arrays(segment_image(mr_image, topk, device=device, precision="fp32"))
        agreement = float((cpu == gpu).mean())
        _figure("topk_agreement", agreement)
        return agreement >= 0.999, f"top-k model trained in {seconds:.1f} s; cpu vs {device} agreement {agreement:.5f}"

    @check
    def check_finetune():
        from UNetSegmentLib.finetune import FineTuneConfig, file_sha256, fine_tune

        parent = os.path.join(hippocampus, "fold_0.pt")
        before = file_sha256(parent)
        result = fine_tune(FineTuneConfig(model=parent, dataset_dir=dataset, output=os.path.join(work, "ft.pt"),
                                          budget_s=45, device=device))
        unchanged = file_sha256(parent) == before
        _figure("finetune_iterations", result.iterations)
        recorded = result.metadata.training["fine_tuning"]["device"]
        return (unchanged and result.iterations > 0 and recorded.startswith(device.split(":")[0]),
                f"{result.iterations} steps in {result.seconds:.0f} s, held-out Dice {result.mean_before:.4f} -> "
                f"{result.mean_after:.4f}, parent unchanged {unchanged}, recorded device {recorded!r}")

    @check
    def check_torchrun():
        launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1")
        output = os.path.join(work, "ddp.pt")
        rc, seconds, tail = cli("train", dataset, "--output", output, "--device", device, "--epochs", "1",
                                "--iterations", "5", "--patch-size", "40", "56", "40", "--quiet", "--int8", "no",
                                launcher=launcher)
        if rc != 0:
            return False, f"train under torchrun rc {rc}: {tail}"
        folder = os.path.join(work, "ddp_segment")
        os.makedirs(os.path.join(work, "ddp_inputs"))
        for index in range(2):
            shutil.copy(os.path.join(SAMPLES, "sample_mr_hippocampus.nii.gz"),
                        os.path.join(work, "ddp_inputs", f"case{index}_0000.nii.gz"))
        rc2, seconds2, tail2 = cli("segment", os.path.join(work, "ddp_inputs"), "--model", output, "--output",
                                   folder, "--device", device, "--quiet", "--yes", launcher=launcher)
        written = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        backend = "NCCL" if device.startswith("cuda") else "gloo"
        return rc2 == 0 and len(written) == 2, (f"{backend}, 1 rank: train rc {rc} ({seconds:.1f} s), segment rc {rc2} "
                                                f"({seconds2:.1f} s) wrote {written}; {tail2}")

    @check
    def check_speed():
        timings = {}
        for name, model, where in (("cpu", cpu_model, "cpu"), (device, gpu_model, device)):
            segment_image(mr_image, model, device=where, precision="fp32", backend="torch")  # warm-up
            started = time.perf_counter()
            for _ in range(3):
                segment_image(mr_image, model, device=where, precision="fp32", backend="torch")
            timings[name] = (time.perf_counter() - started) / 3
        _figure("sample_cpu_s", timings["cpu"])
        _figure("sample_device_s", timings[device])
        return True, ", ".join(f"{name} {seconds:.3f} s" for name, seconds in timings.items()) + \
            f" per {members}-fold segmentation of the sample (fp32, PyTorch)" + (
                f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB"
                if device.startswith("cuda") else "")

    shutil.rmtree(work, ignore_errors=True)
    passed = sum(ok for _, ok in RESULTS)
    failed = [name for name, ok in RESULTS if not ok]
    print(f"failed: {failed}" if failed else "all checks passed", flush=True)
    print(" ".join([f"passed={passed}", f"failed={len(failed)}"] + [f"{k}={v}" for k, v in FIGURES.items()]))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
