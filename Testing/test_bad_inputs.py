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

# A fixed memory budget: the guard's verdicts must not depend on this machine's free RAM (issue 16).
os.environ.setdefault("UNETSEGMENT_MEMORY_LIMIT_MB", "4000")

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


def test_logic_cancel_in_the_middle_changes_nothing(module, scene, valid_checkpoint):
    """The user presses Cancel once patches are running (worker process): the scene stays exactly as it was."""
    import time

    volume = _volume_from_image(module, make_corpus.phantom_image((48, 56, 52)))
    manual = _existing_segmentation(scene, volume)
    manual_before = _segments(manual, volume)
    node_count = scene.GetNumberOfNodes()
    job = module.UNetSegmentLogic().startSegmentation(volume, str(valid_checkpoint), device="cpu", overlap=0.9)
    seen = None
    deadline = time.monotonic() + 300
    while not job.poll() and time.monotonic() < deadline:
        progress = job.progress
        if seen is None and progress is not None and getattr(progress, "total", 0) and progress.done >= 1:
            seen = progress
            job.cancel()
        time.sleep(0.01)
    assert seen is not None and seen.done < seen.total, "cancel must land in the middle of the run"
    assert isinstance(job.error, errors.Cancelled), job.error
    assert_clear_message(str(job.error), E("Cancelled", ("cancel",)))
    assert scene.GetNumberOfNodes() == node_count, "the scene changed"
    _assert_segments_kept(manual_before, _segments(manual, volume))
    TRIED["Logic"].add("cancel")


# --- issue 16: faults at the write, no-replace publish, memory, values, signals, generated documents -----


def _hidden_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*"))


def _segment_argv(image, output, model, *extra) -> list:
    return ["segment", image, "--output", output, "--model", model, "--device", "cpu", "--quiet", *extra]


def _assert_one_error_line(code: int, err: str, *words: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Fix:" in lines[0], lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def _inject_errno_at_temp_creation(monkeypatch, folder: Path, code: int) -> None:
    """A read-only (EROFS/EACCES) folder as the kernel reports it; root ignores chmod, so inject it."""
    import tempfile

    from UNetSegmentLib import publish

    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
            raise OSError(code, os.strerror(code), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(publish.tempfile, "mkstemp", mkstemp)


def _inject_full_disk_at_image_write(monkeypatch) -> list:
    """ENOSPC in the middle of the write: half the bytes land in the temp file, then the write fails."""
    real = sitk.WriteImage
    partial = []

    def write(image, name, *args, **kwargs):
        real(image, name, *args, **kwargs)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])
        partial.append(name)
        raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: ITK ERROR: NrrdImageIO: "
                           f"Write: Error writing {name}: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", write)
    return partial


@pytest.mark.parametrize("fault", ["read_only_folder", "full_disk"])
def test_segment_write_fault_is_one_line_and_loses_nothing(fault, command_line, output_folder, valid_checkpoint,
                                                           valid_image, monkeypatch):
    import errno

    if fault == "read_only_folder":
        _inject_errno_at_temp_creation(monkeypatch, output_folder, errno.EROFS)
        words = ("read-only",)
    else:
        partial = _inject_full_disk_at_image_write(monkeypatch)
        words = ("disk is full",)
    before = snapshot(output_folder)
    code, _, err = run_cli(command_line, _segment_argv(valid_image, output_folder / "result.nrrd", valid_checkpoint,
                                                       "--overwrite"))
    _assert_one_error_line(code, err, *words)
    assert_nothing_lost(output_folder, before)
    if fault == "full_disk":
        assert partial and not any(Path(name).exists() for name in partial)
    TRIED["CLI"].add(f"segment_{fault}")


def test_evaluate_into_a_full_disk_keeps_the_old_csv(command_line, tmp_path, monkeypatch):
    import builtins
    import errno

    reference = tmp_path / "reference.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.eye(6, dtype=np.uint8)[None].repeat(3, 0)), str(reference))
    output = tmp_path / "metrics.csv"
    output.write_text("earlier metrics\n", encoding="utf-8")
    real_open = builtins.open

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, text):
            self.stream.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(name, mode="r", *args, **kwargs):
        stream = real_open(name, mode, *args, **kwargs)
        return FullDisk(stream) if "w" in mode and Path(name).name.startswith(".metrics.csv") else stream

    monkeypatch.setattr(builtins, "open", fake_open)
    before = snapshot(tmp_path)
    code, _, err = run_cli(command_line, ["evaluate", reference, reference, "--output", output, "--overwrite",
                                          "--no-plot"] if _has_option("evaluate", "--no-plot") else
                           ["evaluate", reference, reference, "--output", output, "--overwrite"])
    monkeypatch.undo()
    _assert_one_error_line(code, err, "disk is full")
    assert_nothing_lost(tmp_path, before)
    TRIED["CLI"].add("evaluate_full_disk")


def _has_option(command: str, option: str) -> bool:
    parser = cli.build_parser()
    sub = next(action for action in parser._actions if getattr(action, "choices", None) and command in action.choices)
    return any(option in action.option_strings for action in sub.choices[command]._actions)


def test_failed_train_write_keeps_the_model_at_a_named_fallback(command_line, corpus, tmp_path, monkeypatch):
    """The whole run is not lost when its checkpoint cannot be written: it goes to a fallback it names."""
    import errno

    import torch

    from UNetSegmentLib.checkpoint import load_checkpoint

    good = tmp_path / "dataset"
    make_corpus._dataset(good, lambda case, image: make_corpus._label(image))
    rescue = tmp_path / "rescued"
    monkeypatch.setenv("UNETSEGMENT_RESCUE_DIR", str(rescue))
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    real_save = torch.save

    def save(payload, stream, *args, **kwargs):
        if str(output_dir) in str(getattr(stream, "name", stream)):
            stream.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(payload, stream, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run_cli(command_line, ["train", good, "--output", output_dir / "model.pt", "--features", "4",
                                          "--levels", "2", "--patch-size", "8", "8", "8", "--epochs", "1",
                                          "--iterations", "1", "--folds", "2", "--no-augment", "--device", "cpu",
                                          "--quiet"])
    monkeypatch.undo()
    line = _assert_one_error_line(code, err, "disk is full", str(rescue))
    assert list(output_dir.iterdir()) == [], "no partial checkpoint or temp file at the failed path"
    rescued = list(rescue.glob("model-*.pt"))
    assert len(rescued) == 1 and str(rescued[0]) in line, (rescued, line)
    assert load_checkpoint(rescued[0]).metadata.labels[1].name == "liver"
    TRIED["CLI"].add("train_write_fails")


def test_file_appearing_at_the_output_during_the_run_is_not_replaced(command_line, tmp_path, valid_checkpoint,
                                                                     valid_image, monkeypatch):
    """The no-overwrite promise holds at the rename, not only at the start."""
    from UNetSegmentLib.commands import segment as segment_command

    output = tmp_path / "result.nrrd"

    def appears(self, report):
        if not output.exists():
            output.write_bytes(b"written by another program meanwhile")

    monkeypatch.setattr(segment_command.ProgressBar, "__call__", appears)
    code, _, err = run_cli(command_line, ["segment", valid_image, "--output", output, "--model", valid_checkpoint,
                                          "--device", "cpu"])
    _assert_one_error_line(code, err, "already exists", "--overwrite")
    assert output.read_bytes() == b"written by another program meanwhile"
    assert _hidden_files(tmp_path) == []
    TRIED["CLI"].add("output_appears_during_run")


def test_dangling_symlink_at_the_output_is_not_replaced(command_line, tmp_path, valid_checkpoint, valid_image):
    link = tmp_path / "result.nrrd"
    link.symlink_to(tmp_path / "elsewhere" / "gone.nrrd")
    code, _, err = run_cli(command_line, _segment_argv(valid_image, link, valid_checkpoint))
    _assert_one_error_line(code, err, "already exists")
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "elsewhere" / "gone.nrrd")
    TRIED["CLI"].add("dangling_symlink_output")


def test_publish_without_overwrite_never_replaces_even_a_racing_file(tmp_path):
    from UNetSegmentLib import publish

    target = tmp_path / "out.txt"
    with pytest.raises(errors.InputError):
        with publish.temporary_output(target) as temp:
            temp.write_text("new result")
            target.write_text("arrived during the write")  # after every early check
    assert target.read_text() == "arrived during the write"
    assert _hidden_files(tmp_path) == [] and publish.live_temp_files() == []
    with publish.temporary_output(target, overwrite=True) as temp:
        temp.write_text("replaced on request")
    assert target.read_text() == "replaced on request"


def test_output_equal_to_input_is_refused_even_with_overwrite(command_line, tmp_path, valid_checkpoint, valid_image):
    image = tmp_path / "ct.nrrd"
    image.write_bytes(valid_image.read_bytes())
    before = snapshot(tmp_path)
    code, _, err = run_cli(command_line, _segment_argv(image, image, valid_checkpoint, "--overwrite"))
    _assert_one_error_line(code, err, "is the input")
    assert_nothing_lost(tmp_path, before)
    TRIED["CLI"].add("output_is_input")


def test_two_inputs_mapping_to_one_output_are_refused_before_work(command_line, tmp_path, valid_checkpoint,
                                                                  valid_image):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = sitk.ReadImage(str(valid_image))
    sitk.WriteImage(image, str(inputs / "a.nrrd"))
    sitk.WriteImage(image, str(inputs / "a.nii.gz"))
    out = tmp_path / "out"
    code, _, err = run_cli(command_line, _segment_argv(inputs, out, valid_checkpoint, "--format", "nrrd"))
    _assert_one_error_line(code, err, "a.nrrd", "a.nii.gz", "would both be written")
    assert not out.exists() or list(out.iterdir()) == []
    TRIED["CLI"].add("two_inputs_one_output")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_fifo_and_device_as_input(kind, command_line, tmp_path, valid_checkpoint):
    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "pipe.nrrd"
        os.mkfifo(path)
    code, _, err = run_cli(command_line, _segment_argv(path, tmp_path / "out.nrrd", valid_checkpoint))
    _assert_one_error_line(code, err, "FIFO" if kind == "fifo" else "device")
    assert not (tmp_path / "out.nrrd").exists()
    TRIED["CLI"].add(kind)


@pytest.mark.parametrize("name,argv_extra,words", [
    ("device_xpu", ["--device", "xpu"], ("xpu", "cpu")),
    ("overlap_0_99", ["--overlap", "0.99"], ("windows", "--yes")),
    ("memory_limit_tiny", ["--memory-limit-mb", "0.01"], ("would need about", "--memory-limit-mb")),
])
def test_segment_option_faults(name, argv_extra, words, command_line, tmp_path, valid_checkpoint):
    image = _larger_image(tmp_path / "larger.nrrd")
    argv = ["segment", image, "--output", tmp_path / "out.nrrd", "--model", valid_checkpoint, "--quiet"]
    argv += argv_extra if "--device" in argv_extra else ["--device", "cpu", *argv_extra]
    code, _, err = run_cli(command_line, argv)
    _assert_one_error_line(code, err, *words)
    assert not (tmp_path / "out.nrrd").exists()
    TRIED["CLI"].add(name)


def test_overlap_0_99_runs_with_yes_in_principle(valid_checkpoint):
    """--yes is only a confirmation: the window count it guards is the engine's own count."""
    import torch

    from UNetSegmentLib.commands.segment import planned_windows
    from UNetSegmentLib.topk.model import window_starts

    for grid in ((24, 28, 26), (64, 80, 40)):
        for overlap in (0.5, 0.75, 0.99):
            padded = tuple(max(s, 16) for s in grid)
            assert planned_windows(grid, (16, 16, 16), overlap) == len(window_starts(padded, (16, 16, 16), overlap))
    del torch


def test_argparse_errors_and_negative_seed_have_a_fix(command_line, tmp_path):
    for argv, word in ((["segment"], "required"), (["segmnet"], "invalid choice"),
                       (["train", tmp_path, "--output", tmp_path / "m.pt", "--seed", "-1"], "--seed")):
        err = text_io.StringIO()
        with redirect_stderr(err), redirect_stdout(text_io.StringIO()):
            try:
                code = command_line.main([str(a) for a in argv])
            except SystemExit as exit_:
                code = exit_.code
        _assert_one_error_line(code, err.getvalue(), word)
    TRIED["CLI"].add("argparse_and_seed")


def test_uint32_prediction_label_65537_is_not_scored_as_label_1(command_line, tmp_path):
    reference = np.zeros((4, 6, 6), np.uint8)
    reference[1:3, 1:4, 1:4] = 1
    prediction = reference.astype(np.uint32) * 65537
    sitk.WriteImage(sitk.GetImageFromArray(reference), str(tmp_path / "ref.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(prediction), str(tmp_path / "pred.nrrd"))
    code, _, err = run_cli(command_line, ["evaluate", tmp_path / "pred.nrrd", tmp_path / "ref.nrrd", "--output",
                                          tmp_path / "m.csv"])
    assert code == 0, err
    rows = {int(line.split(",")[1]): float(line.split(",")[2])
            for line in (tmp_path / "m.csv").read_text().splitlines()[1:]}
    assert rows == {1: 0.0, 65537: 0.0}, rows
    TRIED["CLI"].add("uint32_prediction_65537")


def test_bad_checkpoint_in_user_models_is_listed_and_blocks_nothing(command_line, corpus, valid_checkpoint, tmp_path,
                                                                    monkeypatch):
    folder = tmp_path / "user_models"
    folder.mkdir()
    (folder / "good.pt").write_bytes(valid_checkpoint.read_bytes())
    for name in ("ckpt_patch_size_scalar", "ckpt_non_tensor_weight", "ckpt_metadata_list", "ckpt_truncated"):
        (folder / f"bad_{name}.pt").write_bytes(corpus[name].path.read_bytes())
    monkeypatch.setenv("UNETSEGMENT_USER_MODELS_DIR", str(folder))
    code, out, err = run_cli(command_line, ["models"])
    assert code == 0 and "Traceback" not in out + err, err
    good = [line for line in out.splitlines() if line.strip().startswith("good ")]
    assert good and "INVALID" not in good[0], out
    for name in ("ckpt_patch_size_scalar", "ckpt_non_tensor_weight", "ckpt_metadata_list", "ckpt_truncated"):
        line = next(line for line in out.splitlines() if f"bad_{name}" in line)
        assert "INVALID" in line or "unusable" in line.lower(), line
    assert "patch_size" in out and "a tensor" in out
    TRIED["CLI"].add("bad_user_model")


def test_genuine_bug_keeps_its_traceback(command_line, valid_checkpoint, valid_image, tmp_path, monkeypatch):
    """The boundary is not a catch-all: an unexpected exception is a bug and is shown (and logged) as one."""
    from UNetSegmentLib import pipeline

    def broken(*args, **kwargs):
        return {}["a bug"]

    monkeypatch.setattr(pipeline.preprocessing, "normalize", broken)
    code, _, err = run_cli(command_line, _segment_argv(valid_image, tmp_path / "o.nrrd", valid_checkpoint))
    assert code == 1 and "Traceback" in err and "KeyError" in err and "bug" in err, err
    assert not (tmp_path / "o.nrrd").exists() and _hidden_files(tmp_path) == []


def test_irregular_dicom_series_is_accepted_with_the_flag_and_a_warning(command_line, corpus, tmp_path,
                                                                         valid_checkpoint):
    case = corpus["dicom_missing_slice"]
    code, _, err = run_cli(command_line, _segment_argv(case.path, tmp_path / "o.nrrd", valid_checkpoint,
                                                       "--accept-irregular-series"))
    assert code == 0, err
    assert "warning: " in err and "4.00 mm" in err, err
    TRIED["CLI"].add("dicom_accepted_with_flag")


# generated documents: property-based, a few hundred per schema


def _valid_metadata_dict() -> dict:
    return make_corpus._metadata().to_dict()


def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats(allow_nan=True)
               | st.text(max_size=8))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def _mutated(base: dict):
    """A valid document with some fields replaced by arbitrary JSON values, deleted, or nested damage."""
    from hypothesis import strategies as st

    keys = sorted(base)

    def damage(changes):
        document = json_copy(base)
        for key, value, delete in changes:
            if delete:
                document.pop(key, None)
            else:
                document[key] = value
        return document

    return st.lists(st.tuples(st.sampled_from(keys), _json_values(), st.booleans()), min_size=1,
                    max_size=3).map(damage)


def json_copy(value):
    import copy

    return copy.deepcopy(value)


def _check_document_outcome(call, error_classes):
    try:
        return call()
    except error_classes as error:
        message = str(error)
        assert "Fix:" in message and "Traceback" not in message, message
        field = getattr(error, "field", "")
        if field and not field.startswith("("):
            assert field.split("[")[0].split(".")[0] in message, (field, message)
        return None


def test_generated_checkpoint_metadata_is_validated_field_by_field():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from UNetSegmentLib.metadata import ModelMetadata

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(_mutated(_valid_metadata_dict()), _json_values()))
    def check(document):
        metadata = _check_document_outcome(lambda: ModelMetadata.from_dict(document, "generated.pt"),
                                           errors.CheckpointError)
        if metadata is not None:  # what passes is usable: the invariants inference relies on hold
            assert metadata.spatial_dims in (2, 3) and len(metadata.patch_size) == metadata.spatial_dims
            assert all(isinstance(p, int) and p > 0 for p in metadata.patch_size)
            assert len(metadata.target_spacing) == 3 and all(s > 0 for s in metadata.target_spacing)
            assert [label.value for label in metadata.labels] == list(range(len(metadata.labels)))
            assert all(label.name.isprintable() for label in metadata.labels)  # what Slicer will show

    check()
    TRIED["CLI"].add("generated_checkpoint_metadata")


@pytest.mark.parametrize("character", ["\x00", "\n", "\x1b", "\x85", "\u202e", "\u2066", "\u200f"])
def test_label_names_that_would_show_differently_than_stored_are_refused(tmp_path, character):
    """A NUL cuts a segment name short in VTK/Qt; a right-to-left override makes 'liver' read as another
    name on screen. Label names reach Segment Editor from dataset.json and from checkpoint cards."""
    import json

    from UNetSegmentLib.io import read_dataset
    from UNetSegmentLib.metadata import ModelMetadata

    document = _valid_metadata_dict()
    document["labels"][1]["name"] = f"rev{character}lit"
    with pytest.raises(errors.CheckpointError, match=f"U\\+{ord(character):04X}") as refused:
        ModelMetadata.from_dict(document, "hostile.pt")
    assert "labels" in str(refused.value) and "Fix:" in str(refused.value)

    folder = tmp_path / "hostile"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": f"rev{character}lit"},
                                                     "licence": f"CC{character}0"}))
    with pytest.raises(errors.SchemaError, match=f"labels.1.*U\\+{ord(character):04X}.*Remove the character"):
        read_dataset(folder)
    TRIED["CLI"].add("label_name_with_control_or_bidi_character")


def test_generated_dataset_json_is_validated_field_by_field(tmp_path):
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from UNetSegmentLib.io import read_dataset

    base = {"name": "generated", "labels": {"0": "background", "1": "liver"}, "modality": {"0": "CT"},
            "file_ending": ".nii.gz",
            "training": [{"image": "./imagesTr/c0_0000.nii.gz", "label": "./labelsTr/c0.nii.gz"}]}
    folder = tmp_path / "generated"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    text_documents = st.builds(lambda text, cut: text[:cut], st.just(json.dumps(base)), st.integers(0, 200))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(_mutated(base).map(json.dumps), _json_values().map(json.dumps), text_documents,
                     st.binary(max_size=40).map(lambda data: data.decode("latin-1"))))
    def check(text):
        (folder / "dataset.json").write_text(text, encoding="utf-8")
        dataset = _check_document_outcome(lambda: read_dataset(folder), errors.InputError)
        if dataset is not None:
            assert all(name.isprintable() for name in dataset.labels.values())
            assert all(text is None or "\u202e" not in text for text in (dataset.licence, dataset.reference))

    check()
    TRIED["CLI"].add("generated_dataset_json")


# signals at each stage, in a real process

_STAGE_DRIVER = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
stage, seconds = sys.argv[1], float(sys.argv[2])
from UNetSegmentLib import io, preprocessing, pipeline, cli
import SimpleITK as sitk

def announce_then_wait(original, name, after=False):
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs) if after else None
        print("STAGE " + name, flush=True)
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.02)
        return result if after else original(*args, **kwargs)
    return wrapper

if stage == "read":
    io._read_file = announce_then_wait(io._read_file, "read")
elif stage == "preprocess":
    preprocessing.resample_image = announce_then_wait(preprocessing.resample_image, "preprocess")
elif stage == "window":
    from UNetSegmentLib import progress  # after the first batch of windows, before the next
    progress.ProgressTracker.advance = announce_then_wait(progress.ProgressTracker.advance, "window", after=True)
elif stage == "postprocess":
    preprocessing.resample_scores = announce_then_wait(preprocessing.resample_scores, "postprocess")
elif stage == "write":
    sitk.WriteImage = announce_then_wait(sitk.WriteImage, "write", after=True)
sys.argv = ["UNetSegmentLib"] + sys.argv[3:]
import runpy
runpy.run_module("UNetSegmentLib", run_name="__main__")  # the real entry point, as `python -m` runs it
"""


@pytest.mark.parametrize("stage,signal_name", [
    ("read", "SIGINT"), ("preprocess", "SIGTERM"), ("window", "SIGINT"), ("postprocess", "SIGTERM"),
    ("postprocess", "SIGINT"), ("write", "SIGINT"), ("write", "SIGTERM"),
])
def test_signal_at_each_stage_writes_nothing_and_leaves_no_temp(stage, signal_name, tmp_path, valid_checkpoint,
                                                                valid_image):
    import time

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's file\n")
    before = snapshot(folder)
    driver = tmp_path / "driver.py"
    driver.write_text(_STAGE_DRIVER.format(repo=str(REPO_ROOT)), encoding="utf-8")
    argv = [sys.executable, str(driver), stage, "1.5" if stage == "write" else "20", "segment", str(valid_image),
            "--output", str(folder / "result.nrrd"), "--model", str(valid_checkpoint), "--device", "cpu", "--quiet"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    line = process.stdout.readline()
    assert line.strip() == f"STAGE {stage}", (line, process.stderr.read() if process.poll() is not None else "")
    sent = time.monotonic()
    process.send_signal(getattr(signal, signal_name))
    _, err = process.communicate(timeout=60)
    latency = time.monotonic() - sent
    assert process.returncode in (2, 130, 143), (process.returncode, err)
    assert "Traceback" not in err, err
    lines = [text for text in err.splitlines() if text.startswith("error: ")]
    assert len(lines) == 1 and ("cancel" in lines[0].lower() or "sigterm" in lines[0].lower()), err
    assert_nothing_lost(folder, before)
    assert _hidden_files(folder) == []
    SIGNAL_LATENCIES[f"{stage}/{signal_name}"] = round(latency, 2)
    TRIED["CLI"].add(f"signal_{stage}_{signal_name}")


SIGNAL_LATENCIES: dict = {}


# --- the count ----------------------------------------------------------------------------------------


def test_zz_corpus_size_report(capsys):
    """Runs last (file order): says how many corpus cases were tried through each front end."""
    cli_count, logic_count = len(TRIED["CLI"]), len(TRIED["Logic"])
    with capsys.disabled():
        print(f"\nbad-input corpus: {cli_count + logic_count} cases (CLI {cli_count}, Logic {logic_count})")
        if SIGNAL_LATENCIES:
            print("signal -> exit seconds: " + ", ".join(f"{k} {v}" for k, v in SIGNAL_LATENCIES.items()))
    if cli_count and logic_count:  # the whole file ran, not a -k selection
        assert cli_count + logic_count >= MINIMUM_CASES
