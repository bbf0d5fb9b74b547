"""nnU-Net v2 itself as the oracle for `import-nnunet` (issue 14).

nnU-Net (pinned in the test extra) plans two small generated data sets with its own planner, builds
its own networks through its trainer and writes its own checkpoints (seeded weights): an isotropic
CT set (CTNormalization, two folds: an ensemble) and an anisotropic MR set whose thick axis is the
last array axis (so the plans transpose it, the first stages do not pool along it, z-score uses the
non-zero mask, and resampling is separate-z). nnUNetPredictor and our imported model segment the
same unseen volumes (other sizes and spacings than the training cases, mirroring on): argmax
agreement >= 99.9 % and probabilities within 1e-3. Bad results folders fail with one clear line
and write nothing.

nnU-Net runs in subprocesses (Testing/nnunet_oracle.py) because it reads its folder variables at
import time.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from UNetSegmentLib.cli import main as cli_main
from UNetSegmentLib.ensemble import LoadedEnsemble, load_model
from UNetSegmentLib.errors import CheckpointError
from UNetSegmentLib.interop.nnunet_import import import_results_folder
from UNetSegmentLib.pipeline import segment_image

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from nnunet_folders import build_folders, run_oracle  # noqa: E402
from nnunet_oracle import synthetic_case, write  # noqa: E402

import nnunetv2  # noqa: E402,F401  - the oracle is part of the test extra: a missing install fails here


@pytest.fixture(scope="module")
def ct_models(nnunet_ct_models):
    """Testing/conftest.py builds them once per session (the panel's import test uses them too)."""
    return nnunet_ct_models


@pytest.fixture(scope="module")
def mr_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_mr")
    folders = build_folders(root, "--dataset-id", "902", "--name", "MR", "--shape", "32", "32", "10", "--spacing", "3.0",
                     "0.8", "0.8", "--modality", "MRI", "--body-fraction", "0.55", "--models",
                     "ExperimentPlanner:3d_fullres:0")
    return root, folders[0]


def _predict_both(root: Path, folder: Path, model_file: Path, volumes: dict, folds: list[str], tmp_path: Path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, (array, spacing, origin) in volumes.items():
        write(array, spacing, inputs / f"{name}_0000.nii.gz", origin=origin)
    outputs = tmp_path / "nnunet"
    run_oracle(root, "predict", str(folder), str(inputs), str(outputs), "--folds", *folds, "--probabilities",
            "--sequential")
    model = load_model(model_file)
    for name in volumes:
        image = sitk.ReadImage(str(inputs / f"{name}_0000.nii.gz"))
        ours = segment_image(image, model, device="cpu", precision="fp32", backend="torch", mirror_axes=(0, 1, 2),
                             return_probabilities=True)
        reference = sitk.ReadImage(str(outputs / f"{name}.nii.gz"))
        expected_labels = sitk.GetArrayFromImage(reference)
        expected_probabilities = np.load(outputs / f"{name}.npz")["probabilities"]
        labels = sitk.GetArrayFromImage(ours.labelmap)
        probabilities = np.moveaxis(sitk.GetArrayFromImage(ours.probabilities), -1, 0)
        assert ours.labelmap.GetSize() == image.GetSize()
        assert (ours.stats["backend"], ours.stats["precision"]) == ("torch", "fp32")  # what the CLI line reports
        assert np.allclose(ours.labelmap.GetOrigin(), image.GetOrigin())
        agreement = float((labels == expected_labels).mean())
        difference = float(np.abs(probabilities - expected_probabilities).max())
        assert agreement >= 0.999, (name, agreement, difference)
        assert difference <= 1e-3, (name, agreement, difference)
        assert len(np.unique(expected_labels)) >= 2  # not a trivial (all-background) prediction
    return model


def test_isotropic_ct_two_fold_ensemble_matches_nnunet_predictor(ct_models, tmp_path):
    root, folders = ct_models
    folder = folders[0]
    output = tmp_path / "ct_3d.pt"
    import_results_folder(folder, output)
    rng = np.random.default_rng(11)
    volumes = {"ct_a": (synthetic_case(rng, (30, 40, 44), "CT")[0], (1.2, 1.1, 0.9), (3.0, -2.0, 7.0))}
    model = _predict_both(root, folder, output, volumes, ["0", "1"], tmp_path)
    assert isinstance(model, LoadedEnsemble) and len(model.members) == 2
    card = model.metadata
    assert [label.name for label in card.labels] == ["background", "organ", "lesion"]
    assert card.modality == "CT" and card.preprocessing["normalization_schemes"] == ["CTNormalization"]
    assert card.training["source"] == "nnU-Net v2" and card.training["ensemble_folds"] == [0, 1]


def test_2d_configuration_matches_nnunet_predictor(ct_models, tmp_path):
    root, folders = ct_models
    folder = folders[1]
    output = tmp_path / "ct_2d_folds"  # a folder of fold_N.pt
    import_results_folder(folder, output)
    assert sorted(p.name for p in output.iterdir()) == ["fold_0.pt"]
    rng = np.random.default_rng(12)
    volumes = {"ct_b": (synthetic_case(rng, (9, 37, 41), "CT")[0], (0.9, 1.3, 2.0), (0.0, 0.0, 0.0))}
    model = _predict_both(root, folder, output, volumes, ["0"], tmp_path)
    assert model.metadata.spatial_dims == 2


def test_residual_encoder_preset_matches_nnunet_predictor(ct_models, tmp_path):
    root, folders = ct_models
    folder = folders[2]
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    output = tmp_path / "resenc.pt"
    import_results_folder(folder, output)
    rng = np.random.default_rng(14)
    volumes = {"ct_c": (synthetic_case(rng, (28, 36, 38), "CT")[0], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))}
    model = _predict_both(root, folder, output, volumes, ["0"], tmp_path)
    assert model.metadata.architecture_kwargs["encoder"] == "residual"


def test_anisotropic_mr_matches_nnunet_predictor(mr_model, tmp_path):
    root, folder = mr_model
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["transpose_forward"] != [0, 1, 2]  # the thick axis is moved first by the plans
    config = plans["configurations"]["3d_fullres"]
    assert config["use_mask_for_norm"] == [True]
    strides = config["architecture"]["arch_kwargs"]["strides"]
    assert any(len(set(s)) > 1 for s in strides)  # anisotropic pooling in the first stages
    output = tmp_path / "mr.pt"
    import_results_folder(folder, output)
    rng = np.random.default_rng(13)
    volumes = {"mr_a": (synthetic_case(rng, (40, 36, 12), "MR", 0.55)[0], (3.5, 0.7, 0.75), (1.0, 2.0, 3.0))}
    _predict_both(root, folder, output, volumes, ["0"], tmp_path)


# --- bad results folders: one clear line, nothing written --------------------------------------------

def _copy(folder: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(folder, target)
    return target


def _refused(capsys, folder: Path, output: Path, *extra) -> str:
    code = cli_main(["import-nnunet", str(folder), "--output", str(output), *extra])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error: ") and " Fix: " in error and "\n" not in error, error
    assert not output.exists() and not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]
    return error


def test_bad_results_folders_are_refused_clearly(ct_models, tmp_path, capsys):
    _, folders = ct_models
    source = folders[0]
    out = tmp_path / "out"
    out.mkdir()

    no_plans = _copy(source, tmp_path / "no_plans")
    (no_plans / "plans.json").unlink()
    assert "plans.json" in _refused(capsys, no_plans, out / "a.pt")

    no_checkpoints = _copy(source, tmp_path / "no_checkpoints")
    for checkpoint in no_checkpoints.glob("fold_*/checkpoint_final.pth"):
        checkpoint.unlink()
    assert "checkpoint_final.pth" in _refused(capsys, no_checkpoints, out / "b.pt")

    foreign_network = _copy(source, tmp_path / "foreign_network")
    plans = json.loads((foreign_network / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.primus.PrimusM"
    (foreign_network / "plans.json").write_text(json.dumps(plans))
    assert "PrimusM" in _refused(capsys, foreign_network, out / "c.pt")

    trainer = _copy(source, tmp_path / "trainer")
    for path in trainer.glob("fold_*/checkpoint_final.pth"):
        payload = torch.load(path, weights_only=False)
        payload["trainer_name"] = "nnUNetTrainerMySpecialNet"
        torch.save(payload, path)
    assert "--allow-trainer nnUNetTrainerMySpecialNet" in _refused(capsys, trainer, out / "d.pt")
    assert cli_main(["import-nnunet", str(trainer), "--output", str(out / "d.pt"), "--allow-trainer",
                     "nnUNetTrainerMySpecialNet"]) == 0
    capsys.readouterr()

    pickled = _copy(source, tmp_path / "pickled")
    path = pickled / "fold_1" / "checkpoint_final.pth"
    payload = torch.load(path, weights_only=False)
    payload["logging"] = {"callback": ForeignObject()}
    torch.save(payload, path)
    error = _refused(capsys, pickled, out / "e.pt")
    assert "ForeignObject" in error and "run code" in error
    with pytest.raises(CheckpointError, match="ForeignObject"):
        import_results_folder(pickled, out / "e.pt", folds=["1"])

    disagreeing = _copy(source, tmp_path / "disagreeing")
    path = disagreeing / "fold_1" / "checkpoint_final.pth"
    payload = torch.load(path, weights_only=False)
    payload["inference_allowed_mirroring_axes"] = (0, 1)
    torch.save(payload, path)
    error = _refused(capsys, disagreeing, out / "f")
    assert "Fold 1 disagrees with fold 0" in error

    existing = out / "g.pt"
    existing.write_bytes(b"keep")
    assert "already exists" in _refused_existing(capsys, source, existing)
    assert existing.read_bytes() == b"keep"


def _refused_existing(capsys, folder, output):
    assert cli_main(["import-nnunet", str(folder), "--output", str(output)]) == 2
    return capsys.readouterr().err


class ForeignObject:
    """A pickled class: loading it would import and call code, so the importer must refuse it."""


def test_results_folder_becomes_a_user_model_through_the_worker_protocol(ct_models, tmp_path, monkeypatch):
    """What the panel's Import nnU-Net button runs: `import-nnunet FOLDER --json` in a worker process, into
    the user models folder under <dataset>_<configuration>; a second import is refused, nothing replaced."""
    from UNetSegmentLib.model_store import add_user_model, list_models
    from UNetSegmentLib.errors import InputError
    from UNetSegmentLib.worker import CommandJob

    _, folders = ct_models
    models = tmp_path / "user models"
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(models))
    job = CommandJob(["import-nnunet", folders[0]], temp_root=tmp_path).start()
    assert job.wait(timeout=600) and job.error is None, job.error
    result = job.result
    expected = models / "Dataset901_CT_3d_fullres.pt"
    assert Path(result["output"]) == expected and result["name"] == expected.stem
    assert result["folds"] == ["0", "1"] and result["configuration"] == "3d_fullres"
    entry = next(e for e in list_models() if e.path == expected)
    assert entry.error is None and [label.name for label in entry.metadata.labels[1:]] == result["labels"]
    reference = import_results_folder(folders[0], tmp_path / "direct.pt")
    volume = sitk.GetImageFromArray(np.random.default_rng(5).normal(0, 50, (20, 30, 28)).astype(np.float32))
    ours = segment_image(volume, load_model(expected), device="cpu")
    direct = segment_image(volume, load_model(reference), device="cpu")
    assert np.array_equal(sitk.GetArrayFromImage(ours.labelmap), sitk.GetArrayFromImage(direct.labelmap))
    written = expected.read_bytes()

    again = CommandJob(["import-nnunet", folders[0]], temp_root=tmp_path).start()
    assert again.wait(timeout=600)
    assert isinstance(again.error, InputError) and "already exists" in str(again.error)
    assert expected.read_bytes() == written
    assert not any(p.name.startswith(".") for p in models.iterdir())  # no staging left behind

    entry = add_user_model(folders[1], name="ct_2d")  # the library call takes a results folder too
    assert entry.path == models / "ct_2d.pt" and entry.metadata.spatial_dims == 2
    with pytest.raises(InputError, match="not an nnU-Net v2 results folder"):
        add_user_model(tmp_path)
