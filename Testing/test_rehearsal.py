"""Rehearsal sets (rehearsal.py): the parent's own training cases shipped beside it for fine-tuning.

Round trip, built from a model's real training cases exactly as training preprocessed them, the
shipped set, the mixed sampler, and hostile files: pickles, stray entries, huge headers (refused
before anything is loaded), NaN, unknown label values, another spacing."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from UNetSegmentLib import rehearsal
from UNetSegmentLib.errors import InputError, SchemaError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
SHIPPED_FOLD = ROOT / "Resources" / "Models" / "hippocampus_mr" / "fold_0.pt"
needs_model = pytest.mark.skipif(not SHIPPED_FOLD.is_file(), reason="the shipped hippocampus model is not present")


@pytest.fixture(scope="module")
def metadata():
    from UNetSegmentLib.checkpoint import read_checkpoint_metadata

    if not SHIPPED_FOLD.is_file():
        pytest.skip("the shipped hippocampus model is not present")
    return read_checkpoint_metadata(SHIPPED_FOLD)


def card(**overrides) -> dict:
    values = {"format": rehearsal.FORMAT, "case_ids": ["a", "b"], "spacing": [1.0, 1.0, 1.0], "label_values": [1, 2], "dataset": "test"}
    values.update(overrides)
    return values


def arrays(seed=0, shapes=((9, 11, 7), (6, 5, 8))):
    rng = np.random.default_rng(seed)
    images = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    labels = [rng.integers(0, 3, shape).astype(np.uint8) for shape in shapes]
    return images, labels


def raw_npz(path: Path, entries: dict) -> Path:
    """An .npz written entry by entry, so a test can put anything in it."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in entries.items():
            buffer = io.BytesIO()
            if isinstance(value, bytes):
                buffer.write(value)
            else:
                np.lib.format.write_array(buffer, value, allow_pickle=True)
            archive.writestr(name + ".npy", buffer.getvalue())
    return path


def test_a_written_set_reads_back_as_float32_with_its_card(metadata, tmp_path):
    images, labels = arrays()
    path = rehearsal.write(tmp_path / "m.rehearsal.npz", images, labels, card())
    loaded = rehearsal.read(path, metadata)
    assert loaded.case_ids == ["a", "b"] and loaded.card["format"] == rehearsal.FORMAT
    for original, image, reference, label in zip(images, loaded.images, labels, loaded.labels):
        assert image.dtype == np.float32 and image.shape == original.shape
        np.testing.assert_allclose(image, original, rtol=1e-3, atol=1e-3)  # stored as float16
        np.testing.assert_array_equal(label, reference)
    assert loaded.record()["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InputError, match="already exists"):  # no-overwrite promise
        rehearsal.write(path, images, labels, card())
    assert [p.name for p in tmp_path.iterdir()] == ["m.rehearsal.npz"]  # no temp file left


def test_path_beside_a_checkpoint():
    assert rehearsal.path_for("/m/hippocampus_mr/fold_0.pt") == Path("/m/hippocampus_mr/fold_0.rehearsal.npz")
    assert rehearsal.find_for(Path("/nonexistent/fold_0.pt")) is None


@needs_model
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/Task04_Hippocampus is not available")
def test_built_from_the_models_own_training_cases_as_training_preprocessed_them(metadata, tmp_path):
    import SimpleITK as sitk

    path = rehearsal.from_training_cases(SHIPPED_FOLD, DATA, 3, seed=7, output=tmp_path / "r.npz")
    loaded = rehearsal.read(path, metadata)
    assert len(loaded.images) == 3
    assert set(loaded.case_ids) <= set(metadata.training["training_case_ids"])
    assert not set(loaded.case_ids) & set(metadata.training["validation_case_ids"])
    assert loaded.card["licence"] == "CC-BY-SA 4.0" and loaded.card["normalization"] == "zscore"
    for case_id, image, label in zip(loaded.case_ids, loaded.images, loaded.labels):
        # the cases are at 1 mm already: the voxels in the axis order training uses (direction as close to
        # identity as a permutation allows: "LPS" in ITK DICOMOrient letters), per-case z-score as the model's card says
        def canonical(path):
            return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))

        raw = canonical(DATA / "imagesTr" / f"{case_id}_0000.nii.gz").astype(float)
        reference = canonical(DATA / "labelsTr" / f"{case_id}.nii.gz")
        np.testing.assert_allclose(image, (raw - raw.mean()) / raw.std(), atol=5e-3)
        np.testing.assert_array_equal(label, reference)
    again = rehearsal.from_training_cases(SHIPPED_FOLD, DATA, 3, seed=7, output=tmp_path / "again.npz")
    assert rehearsal.read(again, metadata).case_ids == loaded.case_ids  # seeded


@needs_model
def test_the_shipped_set_belongs_to_the_shipped_first_fold(metadata):
    path = rehearsal.find_for(SHIPPED_FOLD)
    assert path is not None, "Resources/Models/hippocampus_mr/fold_0.rehearsal.npz is shipped"
    loaded = rehearsal.read(path, metadata)
    assert set(loaded.case_ids) <= set(metadata.training["training_case_ids"])
    assert set(loaded.card["label_values"]) == {1, 2} and loaded.card["licence"] == "CC-BY-SA 4.0"


@pytest.mark.parametrize("entries, match", [
    ({"card": np.array([object()], dtype=object), "image_0": np.zeros((3, 3, 3), np.float32),
      "label_0": np.zeros((3, 3, 3), np.uint8)}, "'card' must be one JSON text"),
    ({"image_0": np.zeros((3, 3, 3), np.float32), "label_0": np.zeros((3, 3, 3), np.uint8)}, "no 'card'"),
    ({"card": np.array(json.dumps(card(case_ids=["a"]))), "image_0": np.zeros((3, 3, 3), np.float32),
      "label_0": np.zeros((3, 3, 3), np.uint8), "extra": np.zeros(1)}, "entries"),
    ({"card": np.array(json.dumps(card(case_ids=["a"]))), "image_0": np.zeros((3, 3, 3), np.int64),
      "label_0": np.zeros((3, 3, 3), np.uint8)}, "float16/float32"),
    ({"card": np.array(json.dumps(card(case_ids=["a"]))), "image_0": np.zeros((3, 3, 3), np.float32),
      "label_0": np.zeros((3, 4, 3), np.uint8)}, "same shape"),
    ({"card": np.array(json.dumps(card(case_ids=["a"]))), "image_0": np.zeros((3, 3), np.float32),
      "label_0": np.zeros((3, 3), np.uint8)}, "3D"),
    ({"card": np.array("{not json"), "image_0": np.zeros((3, 3, 3), np.float32),
      "label_0": np.zeros((3, 3, 3), np.uint8)}, "not valid JSON"),
    ({"card": np.array(json.dumps(card(case_ids=["a", "b"]))), "image_0": np.zeros((3, 3, 3), np.float32),
      "label_0": np.zeros((3, 3, 3), np.uint8)}, "case_ids"),
    ({"card": np.array(json.dumps(card(case_ids=["a"], format="other/9"))), "image_0": np.zeros((3, 3, 3), np.float32),
      "label_0": np.zeros((3, 3, 3), np.uint8)}, "format"),
    ({"card": np.array(json.dumps(card(case_ids=["a"], label_values=[1, 3]))),
      "image_0": np.zeros((3, 3, 3), np.float32), "label_0": np.zeros((3, 3, 3), np.uint8)}, "label values"),
    ({"card": np.array(json.dumps(card(case_ids=["a"], spacing=[0.5, 1.0, 1.0]))),
      "image_0": np.zeros((3, 3, 3), np.float32), "label_0": np.zeros((3, 3, 3), np.uint8)}, "spacing"),
    ({"card": np.array(json.dumps(card(case_ids=["a"], spacing=[1.0, 1.0]))),
      "image_0": np.zeros((3, 3, 3), np.float32), "label_0": np.zeros((3, 3, 3), np.uint8)}, "spacing"),
    ({"card": np.array(json.dumps(card(case_ids=["a"]))), "image_0": np.full((3, 3, 3), np.nan, np.float32),
      "label_0": np.zeros((3, 3, 3), np.uint8)}, "NaN"),
    ({"card": np.array(json.dumps(card(case_ids=["a"]))), "image_0": np.zeros((3, 3, 3), np.float32),
      "label_0": np.full((3, 3, 3), 9, np.uint8)}, r"values \[9\]"),
])
def test_hostile_files_are_refused_with_the_field_named(metadata, tmp_path, entries, match):
    path = raw_npz(tmp_path / "bad.rehearsal.npz", entries)
    with pytest.raises(InputError, match=match):
        rehearsal.read(path, metadata)


def test_a_huge_header_is_refused_before_anything_is_loaded(metadata, tmp_path):
    """A header that claims 2^40 voxels with no data behind it: the bound fires on the header alone."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1 << 14, 1 << 13, 1 << 13)})
    label_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(label_header, {"descr": "|u1", "fortran_order": False,
                                                        "shape": (1 << 14, 1 << 13, 1 << 13)})
    path = raw_npz(tmp_path / "huge.rehearsal.npz", {
        "card": np.array(json.dumps(card(case_ids=["a"]))),
        "image_0": header.getvalue(), "label_0": label_header.getvalue()})
    with pytest.raises(InputError, match="voxels in all"):
        rehearsal.read(path, metadata)
    images, labels = arrays()
    small = rehearsal.write(tmp_path / "ok.rehearsal.npz", images, labels, card())
    with pytest.raises(InputError, match="voxels in all"):
        rehearsal.read(small, metadata, max_voxels=100)


def test_a_file_that_is_not_a_zip_is_refused(metadata, tmp_path):
    path = tmp_path / "text.rehearsal.npz"
    path.write_text("hello")
    with pytest.raises(SchemaError, match="not a readable rehearsal set"):
        rehearsal.read(path, metadata)
    with pytest.raises(InputError, match="cannot be read"):
        rehearsal.read(tmp_path / "missing.rehearsal.npz", metadata)


def test_the_mixed_sampler_draws_its_share_from_each_source():
    from UNetSegmentLib.sampling import MixedSampler, make_sampler

    shape = (12, 12, 12)
    primary = make_sampler("uniform", [(np.zeros(shape, np.float32), np.zeros(shape, np.uint8))], (8, 8, 8), seed=1)
    secondary = make_sampler("uniform", [(np.ones(shape, np.float32), np.ones(shape, np.uint8))], (8, 8, 8), seed=2)
    half = MixedSampler(primary, secondary, 0.5, seed=3)
    for _ in range(20):
        images, labels = half.sample_batch(2)
        assert images.shape == (2, 1, 8, 8, 8) and sorted(images.reshape(2, -1).mean(axis=1)) == [0.0, 1.0]
    quarter = MixedSampler(primary, secondary, 0.25, seed=3)
    drawn = np.concatenate([quarter.sample_batch(4)[0].reshape(4, -1).mean(axis=1) for _ in range(400)])
    assert 0.2 < drawn.mean() < 0.3  # a quarter on average
    assert all(MixedSampler(primary, secondary, 0.9, seed=0).sample_batch(2)[0][:, 0].reshape(2, -1).mean(axis=1)
               .min() == 0.0 for _ in range(10))  # always at least one patch of the primary source
    assert MixedSampler(primary, secondary, 0.0, seed=0).sample_batch(3)[0].max() == 0.0
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        MixedSampler(primary, secondary, 1.0)
