"""nnU-Net v2 itself as an oracle: build a small results folder and predict with nnUNetPredictor.

Run as a script in a subprocess (nnunetv2 reads nnUNet_raw / nnUNet_preprocessed / nnUNet_results
when it is imported, so the caller points them at a temporary folder first):

    python Testing/nnunet_oracle.py build ROOT --dataset-id 901 --name Iso --shape 24 32 32 --spacing 1 1 1 \
        --modality CT --cases 6 --folds 0 1 [--configuration 3d_fullres] [--planner ExperimentPlanner] [--iterations 0]
    python Testing/nnunet_oracle.py predict MODEL_FOLDER INPUT_DIR OUTPUT_DIR --folds 0 1 [--no-mirroring]

`build` writes a synthetic raw dataset, runs nnU-Net's fingerprint extractor and planner, builds the
network with nnU-Net's own trainer, gives it seeded weights (or trains `--iterations` real steps
after nnU-Net's own preprocessing) and saves nnU-Net's own checkpoint_final.pth per fold. It prints
the model folder. Used by Testing/test_nnunet_import.py and bench/nnunet_predictor_vs_ours.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def synthetic_case(rng: np.random.Generator, shape, modality: str, body_fraction: float = 0.8):
    """A body (non-zero) inside a zero background, with two blob-shaped structures; returns (image, label)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (y / body_fraction) ** 2 + (x / body_fraction) ** 2 < 1
    label = np.zeros(shape, dtype=np.uint8)
    centre = rng.uniform(-0.3, 0.3, size=3)
    radius = rng.uniform(0.25, 0.4)
    blob1 = ((z - centre[0]) / 0.9) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius ** 2
    blob2 = ((z + centre[0]) / 0.9) ** 2 + (y + 0.4) ** 2 + (x - 0.4 * np.sign(centre[2] + 1e-3)) ** 2 < (radius * 0.6) ** 2
    label[blob1 & body] = 1
    label[blob2 & body & (label == 0)] = 2
    if modality == "CT":
        image = np.where(body, rng.normal(40, 20, shape), -1000.0)
        image[label == 1] += 120
        image[label == 2] -= 60
        image = np.where(body, image, 0.0)  # zero outside the body: nnU-Net crops to it
    else:
        image = np.where(body, rng.normal(300, 40, shape) * (1 + 0.2 * z), 0.0)
        image[label == 1] *= 1.8
        image[label == 2] *= 0.5
    return image.astype(np.float32), label


def write(array, spacing_xyz, path, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin])
    sitk.WriteImage(image, str(path))


def _in_process_pools() -> None:
    """nnU-Net's fingerprint extractor computes each case in a spawned worker process; on a busy 2-core
    machine starting one costs minutes of waiting. Threads run the same nnU-Net code in this process."""
    from multiprocessing.pool import ThreadPool

    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as extractor

    class _Context:
        Pool = ThreadPool

    class _Multiprocessing:
        @staticmethod
        def get_context(_method):
            return _Context

    extractor.multiprocessing = _Multiprocessing


def build(args) -> None:
    raw = Path(os.environ["nnUNet_raw"])
    name = f"Dataset{args.dataset_id:03d}_{args.name}"
    folder = raw / name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for index in range(args.cases):
        shape = tuple(int(s + rng.integers(-2, 3)) for s in args.shape)
        image, label = synthetic_case(rng, shape, args.modality, args.body_fraction)
        write(image, args.spacing, folder / "imagesTr" / f"case_{index:03d}_0000.nii.gz")
        write(label, args.spacing, folder / "labelsTr" / f"case_{index:03d}.nii.gz")
    dataset = {"channel_names": {"0": args.modality}, "labels": {"background": 0, "organ": 1, "lesion": 2},
               "numTraining": args.cases, "file_ending": ".nii.gz", "name": args.name}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    _in_process_pools()
    extract_fingerprints([args.dataset_id], num_processes=1, check_dataset_integrity=False, verbose=False,
                         show_progress_bar=False)
    for spec in args.models:
        planner, configuration, folds = spec.split(":")
        plans_name = plan_experiments([args.dataset_id], planner) or "nnUNetPlans"
        model_folder = _train_or_seed(args, name, plans_name, configuration, [int(f) for f in folds.split(",")])
        print(model_folder, flush=True)


def _train_or_seed(args, name: str, plans_name: str, configuration: str, folds: list) -> Path:
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans_file = Path(nnUNet_preprocessed) / name / f"{plans_name}.json"
    if args.iterations:
        preprocess([args.dataset_id], plans_name, configurations=(configuration,), num_processes=(1,),
                   verbose=False, show_progress_bar=False)
    dataset_json = json.loads((Path(nnUNet_preprocessed) / name / "dataset.json").read_text())
    model_folder = None
    for fold in folds:
        plans = json.loads(plans_file.read_text())
        plans["continue_training"] = False
        torch.manual_seed(args.seed + fold)
        trainer = nnUNetTrainer(plans, configuration, fold, dataset_json, device=torch.device("cpu"))
        trainer.num_epochs = 1
        trainer.num_iterations_per_epoch = max(1, args.iterations)
        trainer.num_val_iterations_per_epoch = 1
        if args.iterations:
            trainer.run_training()
        else:
            # nnUNetTrainer.initialize() without its data set loader (no preprocessed data is needed here)
            from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

            trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager,
                                                                      trainer.configuration_manager, dataset_json)
            trainer.network = trainer.build_network_architecture(
                trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
                trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision)
            trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
            trainer.was_initialized = True
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            generator = torch.Generator().manual_seed(args.seed * 100 + fold)
            with torch.no_grad():  # seeded weights, with decisive norms so that predictions are not ties
                for key, value in trainer.network.state_dict().items():
                    if value.dtype.is_floating_point:
                        value.copy_(torch.randn(value.shape, generator=generator) * (0.3 if value.dim() > 1 else 0.5)
                                    + (1.0 if key.endswith("norm.weight") else 0.0))
            trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        model_folder = Path(trainer.output_folder_base)
    # nnU-Net copies plans.json and dataset.json next to the folds when training starts; do the same
    (model_folder / "plans.json").write_text(plans_file.read_text())
    (model_folder / "dataset.json").write_text(json.dumps(dataset_json))
    return model_folder


def predict(args) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not args.no_mirroring,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.model, use_folds=tuple(args.folds),
                                                   checkpoint_name="checkpoint_final.pth")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    if args.sequential:  # nnU-Net's own in-process path (no worker processes); the bench uses the real command
        predictor.predict_from_files_sequential(args.input, args.output, save_probabilities=args.probabilities,
                                                overwrite=True)
    else:
        predictor.predict_from_files(args.input, args.output, save_probabilities=args.probabilities, overwrite=True,
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("root")
    b.add_argument("--dataset-id", type=int, default=901)
    b.add_argument("--name", default="Tiny")
    b.add_argument("--shape", type=int, nargs=3, default=(24, 32, 32), help="z y x of the training cases")
    b.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="x y z in mm")
    b.add_argument("--modality", default="CT")
    b.add_argument("--body-fraction", type=float, default=0.8)
    b.add_argument("--cases", type=int, default=6)
    b.add_argument("--models", nargs="+", default=["ExperimentPlanner:3d_fullres:0"],
                   help="PLANNER:CONFIGURATION:FOLD[,FOLD...] per model folder to make")
    b.add_argument("--iterations", type=int, default=0)
    b.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("predict")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--folds", type=int, nargs="+", default=[0])
    p.add_argument("--no-mirroring", action="store_true")
    p.add_argument("--probabilities", action="store_true")
    p.add_argument("--sequential", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build":
        root = Path(args.root)
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ.setdefault(key, str(root / key))
            Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
        build(args)
    else:
        predict(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
