"""Fine-tuning (issue 17) on real hippocampus MRI: a small parent trained here, user cases added through
user_dataset, a short tuning. Checks the lineage card, that the parent is never modified, the held-out /
leave-one-out checks, progress and cancel, the worse-model verdict, refusals, and the CLI (plain and --json)."""

from __future__ import annotations

import contextlib
import hashlib
import io as text_io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from UNetSegmentLib import cli
from UNetSegmentLib.errors import Cancelled, CheckpointError, InputError, UNetSegmentError
from UNetSegmentLib.progress import CancelToken

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/Task04_Hippocampus is not available")
PARENT_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007",
                "hippocampus_011"]
USER_CASES = ["hippocampus_015", "hippocampus_019", "hippocampus_023", "hippocampus_024"]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A small unet trained for a few iterations on 6 real cases (a real training card, real weights)."""
    from UNetSegmentLib.training import TrainingConfig, train

    root = tmp_path_factory.mktemp("parent")
    dataset = root / "base"
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True)
    for case in PARENT_CASES:
        shutil.copy(DATA / "imagesTr" / f"{case}_0000.nii.gz", dataset / "imagesTr")
        shutil.copy(DATA / "labelsTr" / f"{case}.nii.gz", dataset / "labelsTr")
    manifest = json.loads((DATA / "dataset.json").read_text())
    manifest["training"] = [{"image": f"./imagesTr/{c}_0000.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                            for c in PARENT_CASES]
    (dataset / "dataset.json").write_text(json.dumps(manifest))
    output = root / "hippo_small.pt"
    train(TrainingConfig(dataset_dir=str(dataset), output=str(output), architecture_kwargs={"features": 4, "levels": 3},
                         patch_size=(32, 32, 32), epochs=1, iterations_per_epoch=6, folds=3, lr=3e-3,
                         target_spacing=(1.0, 1.0, 1.0), device="cpu", threads=1))
    return output


def user_set(folder: Path, parent: Path, cases=USER_CASES) -> Path:
    from UNetSegmentLib.io import read_image, read_labelmap
    from UNetSegmentLib.user_dataset import add_case

    for case in cases:
        add_case(folder, read_image(DATA / "imagesTr" / f"{case}_0000.nii.gz"),
                 read_labelmap(DATA / "labelsTr" / f"{case}.nii.gz"), parent,
                 segment_names={1: "Anterior", 2: "Posterior"}, case_name=case)
    return folder


@pytest.fixture(scope="module")
def cases(parent, tmp_path_factory) -> Path:
    return user_set(tmp_path_factory.mktemp("user") / "cases", parent)


def config(parent, dataset, output, **overrides):
    from UNetSegmentLib.finetune import FineTuneConfig

    settings = dict(model=str(parent), dataset_dir=str(dataset), output=str(output) if output else None, budget_s=120.0,
                    max_iterations=3, device="cpu", threads=1)
    settings.update(overrides)
    return FineTuneConfig(**settings)


def test_fine_tuning_writes_a_new_model_with_its_lineage_and_never_touches_the_parent(parent, cases, tmp_path):
    import torch

    from UNetSegmentLib.checkpoint import load_checkpoint
    from UNetSegmentLib.finetune import fine_tune

    before = sha256(parent)
    reports = []
    result = fine_tune(config(parent, cases, tmp_path / "tuned.pt"), progress=reports.append)
    assert sha256(parent) == before
    tuned, original = load_checkpoint(result.output), load_checkpoint(parent)
    card = tuned.metadata.training["fine_tuning"]
    assert card["parent"]["sha256"] == before and card["parent"]["path"] == str(parent.resolve())
    assert card["parent"]["validation_dice"] == original.metadata.validation_dice  # the original statistics
    assert card["parent"]["validation_case_ids"] == original.metadata.training["validation_case_ids"]
    # 4 cases: one kept aside (a quarter), never tuned on
    assert card["scheme"] == "holdout" and len(card["held_out"]) == 1 and len(card["tuned_on"]) == 3
    assert sorted(card["held_out"] + card["tuned_on"]) == sorted(USER_CASES)
    assert set(card["case_source_hashes"]) == set(USER_CASES)
    assert card["iterations"] == 3 and result.iterations == 3
    assert card["dice_after"] == tuned.metadata.validation_dice == result.dice_after
    assert set(card["dice_before"]) == {"Anterior", "Posterior"}
    assert card["improved"] == (card["mean_after"] >= card["mean_before"]) == result.improved
    # same architecture, spacing, normalisation and labels; other weights
    for name in ("architecture", "architecture_kwargs", "target_spacing", "patch_size", "normalization", "labels"):
        assert getattr(tuned.metadata, name) == getattr(original.metadata, name), name
    changed = [key for key, value in tuned.network.state_dict().items()
               if not torch.equal(value, original.network.state_dict()[key])]
    assert changed
    training = [r for r in reports if r.stage == "fine-tuning"]
    assert [r.done for r in training] == [1, 2, 3] and all(r.total >= r.done for r in training)
    assert all(r.loss is not None and np.isfinite(r.loss) and r.remaining_s is not None for r in training)


def test_the_held_out_dice_is_the_written_models_dice_on_those_cases(parent, cases, tmp_path):
    """Oracle: the full inference pipeline with each written checkpoint on the held-out case."""
    import SimpleITK as sitk
    import torch

    from UNetSegmentLib.checkpoint import load_checkpoint, save_checkpoint
    from UNetSegmentLib.finetune import fine_tune
    from UNetSegmentLib.io import read_dataset
    from UNetSegmentLib.pipeline import segment_image
    from UNetSegmentLib.training import dice_per_label

    # larger weights than trained ones, so that every label is predicted somewhere: the Dice compared
    # below are not all zero, and a misplaced or re-normalised check would show
    loaded = load_checkpoint(parent)
    with torch.no_grad():
        for parameter in loaded.network.parameters():
            parameter.mul_(3.0)
    noisy = save_checkpoint(tmp_path / "noisy_parent.pt", loaded.network, loaded.metadata)
    result = fine_tune(config(noisy, cases, tmp_path / "tuned.pt", max_iterations=2))
    assert max(result.dice_before.values()) > 0.01 and max(result.dice_after.values()) > 0.01
    case = next(c for c in read_dataset(cases).cases if c.case_id == result.held_out[0])
    image, reference = sitk.ReadImage(str(case.image_path)), sitk.ReadImage(str(case.label_path))
    labels = {0: "background", 1: "Anterior", 2: "Posterior"}
    for path, expected in ((noisy, result.dice_before), (result.output, result.dice_after)):
        predicted = segment_image(image, load_checkpoint(path), device="cpu", overlap=0.5,
                                  sampler="sliding_window").labelmap
        scores = dice_per_label(sitk.GetArrayFromImage(predicted), sitk.GetArrayFromImage(reference), labels)
        for name, score in scores.items():
            assert score == pytest.approx(expected[name], abs=0.02), (path, name)


def test_few_cases_are_checked_leave_one_out(parent, tmp_path):
    from UNetSegmentLib.finetune import fine_tune

    dataset = user_set(tmp_path / "two", parent, USER_CASES[:2])
    stages = set()
    result = fine_tune(config(parent, dataset, tmp_path / "tuned.pt", max_iterations=2),
                       progress=lambda report: stages.add(report.stage))
    assert result.scheme == "leave-one-out"
    assert sorted(result.held_out) == sorted(result.tuned_on) == sorted(USER_CASES[:2])
    assert {"fine-tuning (check 1/2)", "fine-tuning (check 2/2)", "fine-tuning"} <= stages
    with pytest.raises(InputError, match="at least 2 cases"):
        fine_tune(config(parent, user_set(tmp_path / "one", parent, USER_CASES[:1]), tmp_path / "never.pt"))
    assert not (tmp_path / "never.pt").exists()


def test_a_worse_model_is_reported_as_worse(parent, cases, tmp_path, monkeypatch):
    """The verdict compares the two checks; here the check scores the tuned network lower."""
    from UNetSegmentLib import training
    from UNetSegmentLib.finetune import fine_tune

    real = training.validate
    calls = []

    def validate(*args, **kwargs):
        scores = real(*args, **kwargs)
        calls.append(scores)
        return scores if len(calls) == 1 else {name: score - 0.2 for name, score in scores.items()}

    monkeypatch.setattr(training, "validate", validate)
    result = fine_tune(config(parent, cases, tmp_path / "tuned.pt", max_iterations=1))
    assert result.improved is False and "WORSE" in result.message and "hippo_small" in result.message
    assert result.mean_after < result.mean_before
    assert result.output.exists()  # kept for inspection; the panel keeps the parent selected


def test_parent_weight_blends_the_parent_and_the_tuned_weights(parent, cases, tmp_path):
    """Weight-space ensembling: the same seeded tuning, written as is and blended 1:3 with the parent."""
    import torch

    from UNetSegmentLib.checkpoint import load_checkpoint
    from UNetSegmentLib.finetune import fine_tune

    plain = fine_tune(config(parent, cases, tmp_path / "plain.pt", max_iterations=2, parent_weight=0.0))
    blended = fine_tune(config(parent, cases, tmp_path / "blended.pt", max_iterations=2, parent_weight=0.25))
    weights = {name: load_checkpoint(path).network.state_dict() for name, path in
               (("parent", parent), ("plain", plain.output), ("blended", blended.output))}
    moved = 0
    for key, value in weights["blended"].items():
        expected = 0.25 * weights["parent"][key] + 0.75 * weights["plain"][key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        moved += not torch.equal(weights["plain"][key], weights["parent"][key])
    assert moved  # the tuning changed weights, so the blend is not trivially the parent
    assert load_checkpoint(blended.output).metadata.training["fine_tuning"]["parent_weight"] == 0.25
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="parent weight"):
            fine_tune(config(parent, cases, tmp_path / "never.pt", parent_weight=bad))
    with pytest.raises(InputError, match="optimizer 'lion'"):
        fine_tune(config(parent, cases, tmp_path / "never.pt", optimizer="lion"))
    assert not (tmp_path / "never.pt").exists()


def test_cancel_writes_nothing(parent, cases, tmp_path):
    from UNetSegmentLib.finetune import fine_tune

    cancel = CancelToken()

    def progress(report):
        if report.stage == "fine-tuning" and report.done >= 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        fine_tune(config(parent, cases, tmp_path / "tuned.pt", max_iterations=50), progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_problem(parent, cases, tmp_path):
    from dataclasses import replace

    from UNetSegmentLib.finetune import fine_tune
    from UNetSegmentLib.io import read_image, read_labelmap
    from UNetSegmentLib.metadata import LabelInfo
    from UNetSegmentLib.model_store import read_model_metadata
    from UNetSegmentLib.user_dataset import add_case

    before = sha256(parent)
    with pytest.raises(InputError, match="is the input"):
        fine_tune(config(parent, cases, parent, overwrite=True))
    existing = tmp_path / "taken.pt"
    existing.write_bytes(b"the user's file")
    with pytest.raises(UNetSegmentError, match="already exists"):
        fine_tune(config(parent, cases, existing))
    assert existing.read_bytes() == b"the user's file"
    other = replace(read_model_metadata(parent), labels=[LabelInfo(0, "background", (0, 0, 0)),
                                                         LabelInfo(1, "liver", (1, 0, 0))])
    foreign = tmp_path / "liver cases"
    add_case(foreign, read_image(DATA / "imagesTr" / "hippocampus_015_0000.nii.gz"),
             read_labelmap(DATA / "labelsTr" / "hippocampus_015.nii.gz") > 0, other, model_name="liver")
    with pytest.raises(InputError, match="liver"):
        fine_tune(config(parent, foreign, tmp_path / "never.pt"))
    with pytest.raises(CheckpointError):
        fine_tune(config(tmp_path / "missing.pt", cases, tmp_path / "never.pt"))
    assert sha256(parent) == before and not (tmp_path / "never.pt").exists()


def test_an_ensemble_folder_is_tuned_through_its_first_fold(parent, cases, tmp_path, monkeypatch):
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata
    from UNetSegmentLib.finetune import fine_tune

    folder = tmp_path / "hippo_set"
    folder.mkdir()
    shutil.copy(parent, folder / "fold_0.pt")
    shutil.copy(parent, folder / "fold_1.pt")
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(tmp_path / "user models"))
    result = fine_tune(config(folder, cases, None, max_iterations=1))
    assert re.fullmatch(r"hippo_set-ft-\d{8}-\d{6}\.pt", result.output.name)
    assert result.output.parent == tmp_path / "user models"
    card = read_checkpoint_metadata(result.output).training["fine_tuning"]["parent"]
    assert card["path"] == str(folder.resolve()) and "fold_0.pt" in card["member"]
    assert card["sha256"] == sha256(folder / "fold_0.pt")


def run_cli(argv) -> tuple[int, str, str]:
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_finetune_plain_and_json(parent, cases, tmp_path):
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata

    code, out, err = run_cli(["finetune", parent, cases, "--output", tmp_path / "a.pt", "--budget-s", "120",
                              "--max-iterations", "1", "--device", "cpu", "--quiet", "--parent-weight", "0.5",
                              "--optimizer", "radam"])
    assert code == 0, err
    assert "wrote" in out and "mean Dice" in out
    card = read_checkpoint_metadata(tmp_path / "a.pt").training["fine_tuning"]
    assert (card["iterations"], card["parent_weight"], card["optimizer"]) == (1, 0.5, "radam")
    code, out, err = run_cli(["finetune", parent, cases, "--output", tmp_path / "w.pt", "--parent-weight", "1"])
    assert code == 2 and "parent weight" in err and not (tmp_path / "w.pt").exists()

    code, out, err = run_cli(["finetune", parent, cases, "--output", tmp_path / "b.pt", "--max-iterations", "2",
                              "--device", "cpu", "--json"])
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "hello" and events[-1]["event"] == "result"
    steps = [e for e in events if e["event"] == "progress" and e["stage"] == "fine-tuning"]
    assert [e["done"] for e in steps] == [1, 2] and all(isinstance(e["loss"], float) for e in steps)
    assert events[-1]["output"] == str(tmp_path / "b.pt") and isinstance(events[-1]["improved"], bool)

    code, out, err = run_cli(["finetune", parent, tmp_path / "no such set", "--output", tmp_path / "c.pt", "--json"])
    assert code == 2 and err.startswith("error: ") and "Fix:" in err and "Traceback" not in err
    assert json.loads(out.splitlines()[-1])["event"] == "error"
    assert not (tmp_path / "c.pt").exists()


def test_split_and_naming_rules(parent, tmp_path, monkeypatch):
    import datetime

    from UNetSegmentLib.finetune import default_output, resolve_parent, split_cases

    assert split_cases(3, 0.25, 4, seed=0) is None  # too few to keep some aside: leave-one-out
    for count in (4, 5, 8, 12):
        tune, held = split_cases(count, 0.25, 4, seed=0)
        assert len(held) == max(1, round(count * 0.25)) and sorted(tune + held) == list(range(count))
        assert split_cases(count, 0.25, 4, seed=0) == (tune, held)  # seeded
    with pytest.raises(InputError, match="at least 2"):
        split_cases(1, 0.25, 4, seed=0)
    tuned_before = tmp_path / "hippo_small-ft-20261126-220000.pt"
    shutil.copy(parent, tuned_before)
    assert resolve_parent(tuned_before).name == "hippo_small"  # a tuned model's child is named after the root
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(tmp_path / "models"))
    assert default_output("hippo_small", datetime.datetime(2026, 11, 26, 23, 5, 9)) == \
        tmp_path / "models" / "hippo_small-ft-20261126-230509.pt"


def _marked_rehearsal_set(parent: Path, folder: Path, value: float = 5.0) -> Path:
    """A copy of the parent with a rehearsal set beside it whose images are a constant `value`, so its
    patches can be told apart from the user's (z-scored) patches in a batch."""
    import SimpleITK as sitk

    from UNetSegmentLib import rehearsal

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "hippo_small.pt"
    shutil.copy(parent, model)
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labelsTr" / f"{case}.nii.gz")))
              for case in PARENT_CASES[:2]]
    rehearsal.write(rehearsal.path_for(model), [np.full(label.shape, value, np.float32) for label in labels], labels,
                    {"case_ids": PARENT_CASES[:2], "spacing": [1.0, 1.0, 1.0], "label_values": [1, 2],
                     "dataset": "test"})
    return model


def test_rehearsal_cases_fill_their_share_of_every_batch_and_the_card_records_them(parent, cases, tmp_path,
                                                                                  monkeypatch):
    from UNetSegmentLib import rehearsal
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata
    from UNetSegmentLib.finetune import fine_tune
    from UNetSegmentLib.sampling import MixedSampler

    model = _marked_rehearsal_set(parent, tmp_path / "with")
    batches = []
    original = MixedSampler.sample_batch

    def recording(self, batch_size):
        images, labels = original(self, batch_size)
        batches.append(images.copy())
        return images, labels

    monkeypatch.setattr(MixedSampler, "sample_batch", recording)
    result = fine_tune(config(model, cases, tmp_path / "tuned.pt", rehearsal=0.5, max_iterations=3))
    assert len(batches) == 3
    for images in batches:  # batch 2, share 0.5: one rehearsal patch, one of the user's
        flat = images.reshape(len(images), -1)
        marked = [bool(np.all(row == 5.0)) for row in flat]
        assert sorted(marked) == [False, True], [row.std() for row in flat]
    card = read_checkpoint_metadata(result.output).training["fine_tuning"]["rehearsal"]
    path = rehearsal.path_for(model)
    assert card["sha256"] == sha256(path) and card["file"] == str(path.resolve())
    assert card["share"] == 0.5 and card["cases"] == 2 and card["case_ids"] == PARENT_CASES[:2]

    # a tuned model has no set beside it: tuning it again rehearses the set its own tuning used
    batches.clear()
    again = fine_tune(config(result.output, cases, tmp_path / "again.pt", rehearsal=0.5, max_iterations=2))
    assert len(batches) == 2
    assert read_checkpoint_metadata(again.output).training["fine_tuning"]["rehearsal"]["sha256"] == sha256(path)
    # ...unless that file changed since: then it tunes without, and says so in its card
    rehearsal.write(path, [np.zeros((4, 4, 4), np.float32)], [np.zeros((4, 4, 4), np.uint8)],
                    {"case_ids": ["x"], "spacing": [1.0, 1.0, 1.0], "label_values": [1, 2]}, overwrite=True)
    batches.clear()
    third = fine_tune(config(result.output, cases, tmp_path / "third.pt", rehearsal=0.5, max_iterations=2))
    assert batches == [] and read_checkpoint_metadata(third.output).training["fine_tuning"]["rehearsal"] is None


def test_rehearsal_zero_tunes_on_the_users_cases_alone_and_bad_shares_are_refused(parent, cases, tmp_path,
                                                                                   monkeypatch):
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata
    from UNetSegmentLib.finetune import fine_tune
    from UNetSegmentLib.sampling import MixedSampler

    model = _marked_rehearsal_set(parent, tmp_path / "with")
    monkeypatch.setattr(MixedSampler, "sample_batch", lambda *a: pytest.fail("no rehearsal was asked for"))
    result = fine_tune(config(model, cases, tmp_path / "alone.pt", rehearsal=0.0, max_iterations=2))
    assert read_checkpoint_metadata(result.output).training["fine_tuning"]["rehearsal"] is None
    for share in (1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="rehearsal share"):
            fine_tune(config(model, cases, tmp_path / "bad.pt", rehearsal=share))
    assert not (tmp_path / "bad.pt").exists()


def test_cli_rehearsal_share_reaches_the_config_and_is_checked():
    import argparse

    from UNetSegmentLib.commands.finetune import add_arguments, config_from_args
    from UNetSegmentLib.finetune import DEFAULT_REHEARSAL

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["m.pt", "cases", "--rehearsal", "0.25"])).rehearsal == 0.25
    assert config_from_args(parser.parse_args(["m.pt", "cases"])).rehearsal == DEFAULT_REHEARSAL == 0.5
    code, out, err = run_cli(["finetune", "m.pt", "cases", "--rehearsal", "1.5"])
    assert code == 2 and "rehearsal share" in err and "Traceback" not in err
