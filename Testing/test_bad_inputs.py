"""Every bad or awkward input ends well, through the CLI and through the Slicer Logic (issue 7).

"Ends well" means: a `UNetSegmentError` subclass whose message names the problem and the fix (no
traceback as the message), or a normal result on the input's own grid; and in both cases nothing
the user already had is lost: files in the output folder keep their hashes, no temp file is left,
the MRML scene keeps its node count and an existing segmentation keeps its segments and voxels.

The corpus is generated into a temporary folder by `Testing/bad_inputs/make_corpus.py`.
"""

from __future__ import annotations

import hashlib
import io as text_io
import os
import re
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

TESTING = Path(__file__).resolve().parent
REPO_ROOT = TESTING.parent
for folder in (REPO_ROOT, TESTING / "Python", TESTING / "bad_inputs"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import make_corpus  # noqa: E402
import slicer_adapter  # noqa: E402  (the same adapter Testing/Python/conftest.py installs)

slicer_adapter.install()

import slicer  # noqa: E402

from UNetSegmentLib import cli, errors  # noqa: E402

TRIED = {"CLI": set(), "Logic": set()}
MINIMUM_CASES = 25
LARGER_SHAPE = (24, 28, 26)  # (z, y, x): 18 windows of 16^3 at 1 mm (the tiny model's spacing)


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_input_corpus")


@pytest.fixture(scope="session")
def valid_checkpoint(corpus_root) -> Path:
    return make_corpus.make_tiny_checkpoint(corpus_root / "valid_model.pt")


@pytest.fixture(scope="session")
def corpus(corpus_root, valid_checkpoint) -> dict:
    return make_corpus.make_corpus(corpus_root, valid_checkpoint)


@pytest.fixture(scope="session")
def valid_image(corpus_root) -> Path:
    path = corpus_root / "valid_image.nrrd"
    sitk.WriteImage(make_corpus.phantom_image(), str(path), True)
    return path


@pytest.fixture(scope="session")
def module():
    return slicer_adapter.loadModule()


@pytest.fixture()
def scene():
    scene = slicer.mrmlScene
    scene.Clear(0)
    scene.ClearUndoStack()
    yield scene
    scene.Clear(0)
    scene.ClearUndoStack()


@pytest.fixture()
def command_line():
    """`UNetSegmentLib.cli`, run in-process (the subprocess test below proves the real process)."""
    assert {"segment", "train"} <= set(cli.COMMANDS), "segment/train are not command_line in cli.COMMANDS"
    return cli


@pytest.fixture()
def output_folder(tmp_path, valid_checkpoint) -> Path:
    """What the user already has: an earlier result at the output path, and an unrelated file."""
    folder = tmp_path / "results"
    folder.mkdir()
    earlier = sitk.GetImageFromArray(np.arange(60, dtype=np.uint8).reshape(3, 4, 5) % 3)
    sitk.WriteImage(earlier, str(folder / "result.nrrd"), True)
    (folder / "notes.txt").write_text("the user's notes\n", encoding="utf-8")
    (folder / "model.pt").write_bytes(valid_checkpoint.read_bytes())
    return folder


# --- helpers ------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (hidden temp files included)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_cli(command_line, argv: list[str]) -> tuple[int, str, str]:
    out, err = text_io.StringIO(), text_io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = command_line.main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


def raised_by_command(command_line, argv: list[str]) -> BaseException | None:
    """The exception the subcommand raises (cli.main turns it into a message), to check its class."""
    args = command_line.build_parser().parse_args([str(arg) for arg in argv])
    out, err = text_io.StringIO(), text_io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            args.run(args)
    except Exception as error:  # noqa: BLE001 - the test inspects whatever came out
        return error
    return None


def assert_clear_message(message: str, expect: make_corpus.Expect) -> None:
    """Problem and fix in the user's words, with the expected words, and no traceback."""
    assert "Traceback" not in message and 'File "' not in message, message
    assert "np.float" not in message and not re.search(r"0x[0-9a-fA-F]{6,}", message), \
        f"internal representation shown: {message}"
    if expect.error == "Cancelled":  # the user's own choice: nothing to fix, only confirm it
        assert "cancel" in message.lower(), message
        return
    assert "Fix:" in message, f"no fix offered: {message}"
    problem, fix = message.split("Fix:", 1)
    assert len(problem.strip()) > 15 and len(fix.strip()) > 10, message
    for word in expect.words:
        assert word.lower() in message.lower(), f"{word!r} missing from: {message}"


def assert_error_class(error, expect: make_corpus.Expect) -> None:
    expected_class = getattr(errors, expect.error)
    assert isinstance(error, expected_class), f"expected {expect.error}, got {type(error).__name__}: {error}"


def assert_labelmap_on_grid(labelmap_path: Path, input_path: Path) -> None:
    from UNetSegmentLib.io import read_image

    labelmap, reference = sitk.ReadImage(str(labelmap_path)), read_image(input_path)
    assert labelmap.GetSize() == reference.GetSize()
    np.testing.assert_allclose(labelmap.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(labelmap.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labelmap.GetDirection(), reference.GetDirection(), atol=1e-5)
    values = set(np.unique(sitk.GetArrayViewFromImage(labelmap)).tolist())
    assert values <= {0, 1, 2}, values


def assert_nothing_lost(folder: Path, before: dict[str, str], changed: set[str] = frozenset()) -> None:
    after = snapshot(folder)
    leftovers = [name for name in after if name not in before]
    assert not leftovers, f"partial/temp files left behind: {leftovers}"
    for name, digest in before.items():
        assert name in after, f"{name} was deleted"
        if name not in changed:
            assert after[name] == digest, f"{name} was modified"


def cases_of(kind: str) -> list[str]:
    """Case names, known before the corpus is written (parametrisation happens at collection)."""
    return [name for name, case_kind in make_corpus.CASE_KINDS.items() if case_kind == kind]


def test_corpus_matches_generator(corpus, corpus_root):
    assert {name: case.kind for name, case in corpus.items()} == make_corpus.CASE_KINDS
    for case in corpus.values():
        assert case.path.exists(), case.path
    assert not make_corpus.code_marker(corpus_root).exists()


# --- CLI ----------------------------------------------------------------------------------------------


def check_cli_case(command_line, case, argv, folder: Path, output: Path, input_path: Path, marker: Path):
    before = snapshot(folder)
    code, out, err = run_cli(command_line, argv)
    assert not marker.exists(), "code stored in a checkpoint was executed"
    if case.expect.succeeds:
        assert code == 0, err
        assert_nothing_lost(folder, before, changed={output.name})
        assert_labelmap_on_grid(output, input_path)
    else:
        assert code == 2, (code, out, err)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        assert_clear_message(lines[0], case.expect)
        assert_nothing_lost(folder, before)
        assert_error_class(raised_by_command(command_line, argv), case.expect)
        assert_nothing_lost(folder, before)
        assert not marker.exists(), "code stored in a checkpoint was executed"


@pytest.mark.parametrize("name", cases_of("image"))
def test_cli_image_case(name, corpus, corpus_root, command_line, output_folder, valid_checkpoint):
    case = corpus[name]
    output = output_folder / "result.nrrd"  # exists: --overwrite must not cost it on failure
    argv = ["segment", case.path, "--output", output, "--model", valid_checkpoint, "--device", "cpu", "--quiet",
            "--overwrite"]
    check_cli_case(command_line, case, argv, output_folder, output, case.path, make_corpus.code_marker(corpus_root))
    TRIED["CLI"].add(name)


@pytest.mark.parametrize("name", cases_of("checkpoint"))
def test_cli_checkpoint_case(name, corpus, corpus_root, command_line, output_folder, valid_image):
    case = corpus[name]
    output = output_folder / "result.nrrd"
    argv = ["segment", valid_image, "--output", output, "--model", case.path, "--device", "cpu", "--quiet",
            "--overwrite"]
    check_cli_case(command_line, case, argv, output_folder, output, valid_image,
                   make_corpus.code_marker(corpus_root))
    TRIED["CLI"].add(name)


@pytest.mark.parametrize("name", cases_of("dataset"))
def test_cli_training_case(name, corpus, corpus_root, command_line, output_folder):
    case = corpus[name]
    output = output_folder / "model.pt"  # an earlier model the failed training must not replace
    argv = ["train", case.path, "--output", output, "--features", "4", "--levels", "2", "--patch-size", "8", "8",
            "8", "--batch-size", "2", "--epochs", "1", "--iterations", "1", "--folds", "2", "--no-augment",
            "--device", "cpu", "--quiet", "--overwrite"]
    check_cli_case(command_line, case, argv, output_folder, output, case.path, make_corpus.code_marker(corpus_root))
    TRIED["CLI"].add(name)


def _larger_image(path: Path, shape=LARGER_SHAPE) -> Path:
    sitk.WriteImage(make_corpus.phantom_image(shape), str(path), True)
    return path


def test_cli_cancel_in_the_middle_writes_nothing(command_line, output_folder, valid_checkpoint, tmp_path,
                                                  monkeypatch):
    """Ctrl+C (SIGINT) during inference: the engine stops between patches; nothing is written."""
    from UNetSegmentLib.commands import segment as segment_command

    reports = []

    def interrupt_on_first_report(self, report):
        reports.append(report)
        if len(reports) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl+C delivers; the CLI's handler sets its CancelToken

    monkeypatch.setattr(segment_command.ProgressBar, "__call__", interrupt_on_first_report)
    image = _larger_image(tmp_path / "larger.nrrd")
    before = snapshot(output_folder)
    argv = ["segment", image, "--output", output_folder / "result.nrrd", "--model", valid_checkpoint,
            "--device", "cpu", "--overwrite", "--overlap", "0.75"]  # 48 windows: several batches
    code, _, err = run_cli(command_line, argv)
    assert code == 2 and "error: " in err and "cancel" in err.lower(), err
    assert 1 <= len(reports) and reports[0].done < reports[0].total, "cancel must land in the middle of the run"
    assert_nothing_lost(output_folder, before)
    TRIED["CLI"].add("cancel")


def test_cli_refuses_to_overwrite_without_flag(command_line, output_folder, valid_checkpoint, valid_image):
    before = snapshot(output_folder)
    argv = ["segment", valid_image, "--output", output_folder / "result.nrrd", "--model", valid_checkpoint,
            "--device", "cpu", "--quiet"]
    code, _, err = run_cli(command_line, argv)
    expect = make_corpus.Expect("InputError", ("already exists", "--overwrite"))
    assert code == 2
    assert_clear_message(err.strip().splitlines()[-1], expect)
    assert_error_class(raised_by_command(command_line, argv), expect)
    assert_nothing_lost(output_folder, before)
    TRIED["CLI"].add("existing_output")


@pytest.mark.parametrize("name,output_name,words", [
    ("output_not_an_image_name", "result.txt", ("not an image file name",)),
    ("output_is_a_folder", "subfolder.nrrd", ("folder",)),
])
def test_cli_bad_output_path(name, output_name, words, command_line, output_folder, valid_checkpoint,
                             valid_image):
    if name == "output_is_a_folder":
        (output_folder / output_name).mkdir()
    before = snapshot(output_folder)
    argv = ["segment", valid_image, "--output", output_folder / output_name, "--model", valid_checkpoint,
            "--device", "cpu", "--quiet", "--overwrite"]
    code, _, err = run_cli(command_line, argv)
    assert code == 2, err
    expect = make_corpus.Expect("InputError", words)
    assert_clear_message(err.strip().splitlines()[-1], expect)
    assert_error_class(raised_by_command(command_line, argv), expect)
    assert_nothing_lost(output_folder, before)
    TRIED["CLI"].add(name)


def test_cli_unavailable_gpu_is_a_clear_device_error(command_line, output_folder, valid_checkpoint,
                                                      valid_image):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present; the unavailable-device case cannot occur")
    before = snapshot(output_folder)
    argv = ["segment", valid_image, "--output", output_folder / "result.nrrd", "--model", valid_checkpoint,
            "--device", "cuda", "--quiet", "--overwrite"]
    code, _, err = run_cli(command_line, argv)
    expect = make_corpus.Expect("DeviceError", ("CUDA", "cpu"))
    assert code == 2
    assert_clear_message(err.strip().splitlines()[-1], expect)
    assert_error_class(raised_by_command(command_line, argv), expect)
    assert_nothing_lost(output_folder, before)
    TRIED["CLI"].add("unavailable_gpu")


def _subprocess_cli(argv: list) -> subprocess.CompletedProcess:
    """The real process, as the user starts it: `python -m UNetSegmentLib ...`."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "UNetSegmentLib", *[str(arg) for arg in argv]],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT), env=environment)


@pytest.mark.parametrize("name,kind", [("truncated_nifti_gz", "image"), ("ckpt_executes_code", "checkpoint")])
def test_real_process_exit_code_and_message(name, kind, corpus, corpus_root, output_folder, valid_checkpoint,
                                            valid_image):
    case = corpus[name]
    image, model = (case.path, valid_checkpoint) if kind == "image" else (valid_image, case.path)
    before = snapshot(output_folder)
    completed = _subprocess_cli(["segment", image, "--output", output_folder / "result.nrrd", "--model", model,
                                 "--device", "cpu", "--quiet", "--overwrite"])
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith("error: ") or "\nerror: " in completed.stderr, completed.stderr
    assert_clear_message(completed.stderr.strip().splitlines()[-1], case.expect)
    assert_nothing_lost(output_folder, before)
    assert not make_corpus.code_marker(corpus_root).exists()


def test_unsafe_loading_of_the_code_checkpoint_would_really_run_code(tmp_path):
    """The corpus's code-running pickle is a real attack: only weights_only=True keeps it from running."""
    import pickle

    import torch

    marker = tmp_path / "ran.txt"
    attack = tmp_path / "attack.pt"
    torch.save({"metadata": make_corpus.RunsCodeWhenUnpickled(marker)}, attack)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(attack, weights_only=True)
    assert not marker.exists()
    torch.load(attack, weights_only=False)  # what a careless loader would do
    assert marker.exists()


# --- out of memory ------------------------------------------------------------------------------------


def _minimum_budget_mb(image: sitk.Image, checkpoint: Path) -> float:
    """The smallest budget the engine says it needs, read from its OutOfMemoryError for a 1 KB budget."""
    from UNetSegmentLib.pipeline import segment_image

    with pytest.raises(errors.OutOfMemoryError) as raised:
        segment_image(image, checkpoint, device="cpu", memory_budget_mb=0.001)
    found = re.search(r"needs at least ([0-9.]+) MB", str(raised.value))
    assert found, f"the error gives no figure to act on: {raised.value}"
    return float(found.group(1)) * 1.05  # the figure is rounded to 3 significant digits


def test_small_memory_budget_takes_a_smaller_batch_and_reports_it(valid_checkpoint, command_line,
                                                                 output_folder, tmp_path):
    """'Huge volume beyond the budget': a small volume with a smaller budget; the run steps down, says so."""
    from UNetSegmentLib.io import read_image
    from UNetSegmentLib.pipeline import segment_image

    path = _larger_image(tmp_path / "larger.nrrd", (20, 24, 22))
    budget = _minimum_budget_mb(read_image(path), valid_checkpoint)  # the figure the error says is enough
    roomy = segment_image(read_image(path), valid_checkpoint, device="cpu")
    assert not any("batch size" in note for note in roomy.stats.get("fallbacks") or [])
    before = snapshot(output_folder)
    code, _, err = run_cli(command_line, ["segment", path, "--output", output_folder / "result.nrrd", "--model",
                                            valid_checkpoint, "--device", "cpu", "--quiet", "--overwrite",
                                            "--memory-budget-mb", budget])
    assert code == 0, err
    reported = re.search(r"note: batch size (\d+) -> (\d+) to fit memory", err)  # told to the user
    assert reported, err
    assert int(reported.group(1)) == roomy.stats["batch_size"] > int(reported.group(2)) > 0, (err, roomy.stats)
    assert_nothing_lost(output_folder, before, changed={"result.nrrd"})
    assert_labelmap_on_grid(output_folder / "result.nrrd", path)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(output_folder / "result.nrrd")))
    agreement = np.mean(written == sitk.GetArrayFromImage(roomy.labelmap))
    assert agreement > 0.999, agreement  # same windows and weights: only float rounding may differ
    TRIED["CLI"].add("memory_budget_fallback")


def test_impossible_memory_budget_is_a_clear_out_of_memory_error(valid_checkpoint, command_line,
                                                                 output_folder, valid_image):
    from UNetSegmentLib.pipeline import segment_image

    expect = make_corpus.Expect("OutOfMemoryError", ("memory",))
    with pytest.raises(errors.OutOfMemoryError) as raised:
        segment_image(make_corpus.phantom_image(), valid_checkpoint, device="cpu", memory_budget_mb=0.001)
    assert_clear_message(str(raised.value), expect)
    assert "0.001 MB" in str(raised.value) and not re.search(r"\b0 MB", str(raised.value)), raised.value
    before = snapshot(output_folder)
    argv = ["segment", valid_image, "--output", output_folder / "result.nrrd", "--model", valid_checkpoint,
            "--device", "cpu", "--quiet", "--overwrite", "--memory-budget-mb", "0.001"]
    code, _, err = run_cli(command_line, argv)
    assert code == 2, err
    assert_clear_message(err.strip().splitlines()[-1], expect)
    assert_error_class(raised_by_command(command_line, argv), expect)
    assert_nothing_lost(output_folder, before)
    TRIED["CLI"].add("memory_budget_impossible")


def test_out_of_memory_in_the_middle_falls_back_and_reports_it(valid_checkpoint):
    """The network runs out of memory mid-run on large batches (as a full GPU does): retried smaller."""
    import torch

    from UNetSegmentLib.checkpoint import LoadedModel, load_checkpoint
    from UNetSegmentLib.pipeline import segment_image

    loaded = load_checkpoint(valid_checkpoint, device="cpu")

    class RunsOutOfMemoryOnce(torch.nn.Module):
        """Fails on the second batch of patches: after the run has accumulated part of its result."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.out_channels = getattr(inner, "out_channels", 3)
            self.batches = 0
            self.failed_batch_size = None

        def forward(self, batch):
            if batch.shape[0] > 1:  # patches (the engine's memory probe is a single input)
                self.batches += 1
                if self.batches == 2:
                    self.failed_batch_size = self.largest
                    raise torch.OutOfMemoryError("simulated: out of memory while computing a batch")
                self.largest = batch.shape[0]
            return self.inner(batch)

    flaky = RunsOutOfMemoryOnce(loaded.network).eval()
    image = make_corpus.phantom_image(LARGER_SHAPE)  # 18 windows: more than one batch
    result = segment_image(image, LoadedModel(flaky, loaded.metadata, loaded.path), device="cpu")
    notes = result.stats.get("fallbacks") or []
    assert flaky.failed_batch_size, "the simulated failure never happened: the run used a single batch"
    assert any(f"batch {flaky.failed_batch_size} ran out of memory" in note for note in notes), notes
    assert result.stats["batch_size"] < flaky.failed_batch_size, result.stats
    reference = segment_image(image, loaded, device="cpu")
    agreement = np.mean(sitk.GetArrayFromImage(result.labelmap) == sitk.GetArrayFromImage(reference.labelmap))
    assert agreement > 0.999, agreement  # the failed plan's partial sums were not mixed in


# --- Slicer Logic -------------------------------------------------------------------------------------


def _existing_segmentation(scene, volume):
    """The user's own work: a hand-drawn 'liver' segment that no failed run may touch."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = node.GetSegmentation().AddEmptySegment("", "liver", (1.0, 1.0, 0.0))
    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape[:3], np.uint8)
    mask[: max(1, mask.shape[0] // 2), 1:4, 2:6] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, segment_id, volume)
    return node


def _segments(node, volume) -> dict:
    segmentation = node.GetSegmentation()
    found = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)
        found[segment_id] = (segment.GetName(), tuple(segment.GetColor()), np.array(voxels, copy=True))
    return found


def _assert_segments_kept(before: dict, after: dict) -> None:
    for segment_id, (name, color, voxels) in before.items():
        assert segment_id in after, f"segment {name} was removed"
        assert after[segment_id][:2] == (name, color)
        np.testing.assert_array_equal(after[segment_id][2], voxels, err_msg=name)


def _volume_from_image(module, image: sitk.Image):
    return module.UNetSegmentLogic().addVolumeFromImage(image, "corpus volume")


def _ijk_to_ras(spacing=(1.0, 1.0, 1.0), columns=None) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = (np.eye(3) if columns is None else np.asarray(columns, dtype=float)) * np.asarray(spacing)
    matrix[:3, 3] = (5.0, -3.0, 12.0)
    return matrix


def _volume_from_matrix(scene, voxels: np.ndarray, ijk_to_ras: np.ndarray, vector: bool = False):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", "corpus")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, voxels)
    return node


def _add_empty_volume(scene):
    return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")


def _add_transformed_volume(scene):
    volume = _volume_from_matrix(scene, make_corpus.phantom_array(), _ijk_to_ras())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume


# Logic cases whose input is a volume node: from a corpus image where one exists in memory, or built
# directly where no file can hold it (zero spacing, a transform) -- name -> (maker, expect)
E = make_corpus.Expect
LOGIC_VOLUME_CASES = {
    "nan_voxels": ("corpus", None),
    "inf_voxels": ("corpus", None),
    "constant": ("corpus", None),
    "non_orthogonal": ("corpus", None),
    "anisotropic": ("corpus", None),
    "single_slice": ("corpus", None),
    "flipped_axes": ("corpus", None),
    "multi_component": (lambda scene: _volume_from_matrix(
        scene, np.repeat(make_corpus.phantom_array()[..., None], 3, axis=-1), _ijk_to_ras(), vector=True),
        E("InputError", ("3 components",))),
    "zero_spacing": (lambda scene: _volume_from_matrix(scene, make_corpus.phantom_array(),
                                                       _ijk_to_ras(spacing=(1.0, 0.0, 1.0))),
                     E("GeometryError", ("spacing",))),
    "negative_spacing": (lambda scene: _volume_from_matrix(scene, make_corpus.phantom_array(),
                                                           _ijk_to_ras(spacing=(-1.0, 1.0, 2.0))), E(None)),
    "sheared_ijk_to_ras": (lambda scene: _volume_from_matrix(
        scene, make_corpus.phantom_array(), _ijk_to_ras(columns=[[1, 0.4, 0], [0, 1, 0], [0, 0, 1]])),
        E("GeometryError", ("orthogonal",))),
    "image_2d": (lambda scene: _volume_from_matrix(scene, make_corpus.phantom_array((1, 16, 14)),
                                                   _ijk_to_ras(spacing=(0.7, 0.7, 1.0))), E(None)),
    "empty_volume_node": (_add_empty_volume, E("InputError", ("no voxels",))),
    "volume_under_transform": (_add_transformed_volume, E("InputError", ("transform",))),
}


def _run_logic_case(module, scene, volume, model_path, expect, corpus_root=None, **options):
    """Segment into the user's existing segmentation (replace on!) and check nothing was lost on failure."""
    reference = volume if volume.GetImageData() is not None else None
    manual = _existing_segmentation(scene, reference) if reference is not None else None
    manual_before = _segments(manual, reference) if manual is not None else {}
    node_count = scene.GetNumberOfNodes()
    logic = module.UNetSegmentLogic()
    if expect.succeeds:
        result = logic.segment(volume, str(model_path), outputSegmentation=manual, replaceExisting=False,
                               device="cpu", **options)
        assert result is manual and scene.GetNumberOfNodes() == node_count
        after = _segments(manual, reference)
        _assert_segments_kept(manual_before, after)  # the new 'liver' got its own name
        names = [name for name, _, _ in after.values()]
        assert "liver (UNetSegment 2)" in names and "spleen" in names, names
        return
    with pytest.raises(errors.UNetSegmentError) as raised:
        logic.segment(volume, str(model_path), outputSegmentation=manual, replaceExisting=True, device="cpu",
                      **options)
    assert_error_class(raised.value, expect)
    assert_clear_message(str(raised.value), expect)
    assert scene.GetNumberOfNodes() == node_count, "the scene changed"
    if manual is not None:
        _assert_segments_kept(manual_before, _segments(manual, reference))
        assert len(_segments(manual, reference)) == len(manual_before)
    if corpus_root is not None:
        assert not make_corpus.code_marker(corpus_root).exists()


@pytest.mark.parametrize("name", list(LOGIC_VOLUME_CASES))
def test_logic_volume_case(name, module, scene, corpus, valid_checkpoint):
    maker, expect = LOGIC_VOLUME_CASES[name]
    if maker == "corpus":
        case = corpus[name]
        volume, expect = _volume_from_image(module, case.image), case.expect
    else:
        volume = maker(scene)
    _run_logic_case(module, scene, volume, valid_checkpoint, expect)
    TRIED["Logic"].add(name)


@pytest.mark.parametrize("name", cases_of("checkpoint"))
def test_logic_checkpoint_case(name, module, scene, corpus, corpus_root):
    case = corpus[name]
    volume = _volume_from_image(module, make_corpus.phantom_image())
    _run_logic_case(module, scene, volume, case.path, case.expect, corpus_root)
    TRIED["Logic"].add(name)


@pytest.mark.parametrize("name,model,expect", [
    ("no_model_selected", "", E("InputError", ("no model",))),
    ("missing_model_file", "gone/model.pt", E("CheckpointError", ("does not exist",))),
])
def test_logic_model_choice_case(name, model, expect, module, scene, tmp_path):
    volume = _volume_from_image(module, make_corpus.phantom_image())
    _run_logic_case(module, scene, volume, model and tmp_path / model, expect)
    TRIED["Logic"].add(name)


def test_logic_cancel_in_the_middle_changes_nothing(module, scene, valid_checkpoint, monkeypatch):
    """The user presses Cancel while patches are running: the scene stays exactly as it was."""
    original = module.SegmentationJob._onProgress
    reports = []

    def cancel_on_first_report(self, progress):
        reports.append(progress)
        original(self, progress)
        self.cancel()

    monkeypatch.setattr(module.SegmentationJob, "_onProgress", cancel_on_first_report)
    volume = _volume_from_image(module, make_corpus.phantom_image(LARGER_SHAPE))
    _run_logic_case(module, scene, volume, valid_checkpoint, E("Cancelled", ("cancel",)), overlap=0.75)
    assert reports and reports[0].done < reports[0].total, "cancel must land in the middle of the run"
    TRIED["Logic"].add("cancel")


# --- the count ----------------------------------------------------------------------------------------


def test_zz_corpus_size_report(capsys):
    """Runs last (file order): says how many corpus cases were tried through each front end."""
    cli_count, logic_count = len(TRIED["CLI"]), len(TRIED["Logic"])
    with capsys.disabled():
        print(f"\nbad-input corpus: {cli_count + logic_count} cases (CLI {cli_count}, Logic {logic_count})")
    if cli_count and logic_count:  # the whole file ran, not a -k selection
        assert cli_count + logic_count >= MINIMUM_CASES
