"""Runtime layer (issue 13): OpenVINO fp32 equals PyTorch on every architecture and inference path;
the compiled-model cache hits, invalidates on changed weights and stays under its cap; a failed
conversion or a missing OpenVINO falls back to PyTorch with a one-line note.

PyTorch is the oracle throughout. Networks are tiny and volumes small so the 20-odd conversions stay
quick; every test keeps its cache in a temporary folder.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from UNetSegmentLib.errors import InputError
from UNetSegmentLib.inference.sliding_window import InferenceOptions, sliding_window_inference
from UNetSegmentLib.networks import build_network, list_architectures
from UNetSegmentLib import runtime
from UNetSegmentLib.runtime import RuntimeOptions, options as runtime_options
from UNetSegmentLib.runtime.cache import ModelCache, entry_key, weights_hash

openvino = pytest.importorskip("openvino")

from UNetSegmentLib.runtime import openvino_backend  # noqa: E402

NAMES = [spec.name for spec in list_architectures()]
PATCH = {2: (16, 16), 3: (16, 16, 16)}
VOLUME = {2: (40, 27), 3: (20, 26, 18)}  # not multiples of the patch: border windows shift back


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Nothing is written to the user's cache folder; each test starts without compiled models in memory."""
    folder = tmp_path / "ov-cache"
    monkeypatch.setenv("UNETSEGMENT_CACHE_DIR", str(folder))
    openvino_backend._COMPILED.clear()
    return folder


def tiny(name, spatial_dims, norm):
    torch.manual_seed(0)
    network = build_network(name, spatial_dims, 1, 3, features=4, levels=3, norm=norm)
    if norm == "batch":  # eval-mode BatchNorm with non-trivial statistics
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in network.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) * 0.2 - 0.1)
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return network.eval()


def volume(spatial_dims, seed=2):
    return torch.randn((1,) + VOLUME[spatial_dims], generator=torch.Generator().manual_seed(seed))


def run(network, image, backend, patch, **extra):
    options = InferenceOptions(patch_size=patch, output="logits", return_probabilities=True,
                               return_uncertainty=True, runtime=RuntimeOptions(backend=backend), **extra)
    return sliding_window_inference(network, image, options)


def has_instance_norm(network):
    return any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in network.modules())


def assert_equal_outputs(result, reference, exact_logits: bool):
    assert result.stats["backend"] == "openvino", result.stats.get("fallbacks")
    assert reference.stats["backend"] == "torch"
    agreement = float(np.mean(result.labels == reference.labels))
    assert agreement >= 0.999, agreement
    if exact_logits:
        assert float((result.logits - reference.logits).abs().max()) <= 1e-3
    # probabilities and entropy are bounded: the same tolerance holds for every network
    assert np.abs(result.probabilities - reference.probabilities).max() <= 1e-3
    assert np.abs(result.uncertainty - reference.uncertainty).max() <= 1e-3


CASES = [(name, dims, "batch") for name in NAMES for dims in (2, 3)] + \
        [(name, 3, "instance") for name in NAMES] + [("unet", 2, "instance")]


@pytest.mark.parametrize("name,spatial_dims,norm", CASES)
def test_openvino_fp32_equals_pytorch_for_every_architecture(name, spatial_dims, norm):
    network = tiny(name, spatial_dims, norm)
    image = volume(spatial_dims)
    reference = run(network, image, "torch", PATCH[spatial_dims])
    result = run(network, image, "openvino", PATCH[spatial_dims])
    assert result.stats["precision"] == "fp32" and result.stats["runtime_cache"] == "miss"
    assert_equal_outputs(result, reference, exact_logits=not has_instance_norm(network))


def test_whole_volume_and_mirroring_tta_run_on_openvino_and_equal_pytorch():
    network = tiny("unet", 3, "batch")
    image = volume(3)
    for extra in ({"mode": "whole"}, {"mirror_axes": (0, 2)}):
        reference = run(network, image, "torch", PATCH[3], **extra)
        result = run(network, image, "openvino", PATCH[3], **extra)
        assert result.stats["mode"] == reference.stats["mode"] == extra.get("mode", "sliding")
        assert_equal_outputs(result, reference, exact_logits=True)


def test_topk_runs_both_stages_on_openvino_and_equals_pytorch():
    from UNetSegmentLib.topk.inference import topk_inference
    from UNetSegmentLib.topk.model import TopKSegmenter, TopKSettings

    settings = TopKSettings(k=3, patch_size=[16, 16, 16], coarse_size=[8, 8, 8], scorer_channels=4,
                            refine_channels=4)
    torch.manual_seed(0)
    backbone = tiny("unet", 3, "batch")
    model = TopKSegmenter(backbone, tiny("residual_unet", 3, "batch"), settings, 3, 1, 3).eval()
    with torch.no_grad():  # a refiner that is not the identity, so both branches matter
        model.refiner[-1].weight.normal_(0, 0.1)
    image = volume(3).numpy()
    reference = topk_inference(model, image, return_probabilities=True, return_uncertainty=True)
    result = topk_inference(model, image, return_probabilities=True, return_uncertainty=True,
                            runtime=RuntimeOptions(backend="openvino"))
    assert result.stats["global_network_backend"] == result.stats["backbone_backend"] == "openvino"
    assert result.stats["selected_windows"] == reference.stats["selected_windows"]
    assert np.abs(result.logits - reference.logits).max() <= 1e-3
    assert np.mean(result.labels == reference.labels) >= 0.999
    assert np.abs(result.probabilities - reference.probabilities).max() <= 1e-3
    assert np.abs(result.uncertainty - reference.uncertainty).max() <= 1e-3
    assert model.backbone is backbone  # the runners stood in for one call only


def test_second_run_hits_the_disk_cache_and_changed_weights_invalidate_it(private_cache, monkeypatch):
    network = tiny("unet", 3, "batch")
    image = volume(3)
    first = run(network, image, "openvino", PATCH[3])
    assert first.stats["runtime_cache"] == "miss" and first.stats["runtime_convert_s"] > 0
    assert len(list(private_cache.glob("*.xml"))) == 1 and len(list(private_cache.glob("*.bin"))) == 1

    openvino_backend._COMPILED.clear()  # as a new process would start

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cache hit must not convert")

    monkeypatch.setattr(openvino_backend, "convert", no_conversion)
    second = run(network, image, "openvino", PATCH[3])
    assert second.stats["runtime_cache"] == "hit" and second.stats["runtime_convert_s"] == 0
    assert np.array_equal(second.labels, first.labels)
    monkeypatch.undo()
    monkeypatch.setenv("UNETSEGMENT_CACHE_DIR", str(private_cache))

    with torch.no_grad():  # same module, same file name would be: new weights
        for parameter in network.parameters():
            parameter.mul_(1.5)
    third = run(network, image, "openvino", PATCH[3])
    assert third.stats["runtime_cache"] == "miss"
    assert len(list(private_cache.glob("*.xml"))) == 2
    reference = run(network, image, "torch", PATCH[3])
    assert_equal_outputs(third, reference, exact_logits=True)
    assert not np.allclose(third.logits, first.logits)


def test_cache_key_names_every_input():
    network = tiny("unet", 2, "batch")
    content = weights_hash(network)
    base = entry_key(content, (1, 16, 16), "openvino", "fp32", "2026.4.1")
    assert base == entry_key(weights_hash(tiny("unet", 2, "batch")), (1, 16, 16), "openvino", "fp32", "2026.4.1")
    variants = [entry_key(content, (1, 32, 16), "openvino", "fp32", "2026.4.1"),
                entry_key(content, (1, 16, 16), "torch", "fp32", "2026.4.1"),
                entry_key(content, (1, 16, 16), "openvino", "int8", "2026.4.1"),
                entry_key(content, (1, 16, 16), "openvino", "fp32", "2026.5.0")]
    assert len({base, *variants}) == 5
    with torch.no_grad():
        next(network.parameters())[0].add_(1e-3)
    assert weights_hash(network) != content


def test_cache_is_size_capped_least_recently_used_first_and_stores_atomically(tmp_path):
    import os

    cache = ModelCache(tmp_path / "c", max_mb=3 / 1024)  # 3 KiB
    for index, key in enumerate(("old", "mid", "new")):
        def save(xml, index=index):
            xml.write_bytes(b"x" * 512)
            xml.with_suffix(".bin").write_bytes(b"b" * 512)

        cache.store(key, save)
        for path in cache.paths(key):
            os.utime(path, (1000 + index, 1000 + index))
    cache.lookup("old")  # used again: now the most recent
    cache.max_bytes = 2048
    removed = cache.prune()
    assert sorted(p.name for p in removed) == ["mid.bin", "mid.xml"]
    assert cache.lookup("old") and cache.lookup("new") and cache.lookup("mid") is None

    def broken(xml):
        xml.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        cache.store("broken", broken)
    assert cache.lookup("broken") is None
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["new.bin", "new.xml", "old.bin", "old.xml"]


def test_a_failed_conversion_falls_back_to_pytorch_with_one_note(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::boom\nsecond line of detail")

    monkeypatch.setattr(openvino_backend, "convert", failing)
    network = tiny("attention_unet", 3, "batch")
    image = volume(3)
    result = run(network, image, "openvino", PATCH[3])
    reference = run(network, image, "torch", PATCH[3])
    assert result.stats["backend"] == "torch"
    notes = [note for note in result.stats["fallbacks"] if "OpenVINO" in note]
    assert notes == ["OpenVINO conversion failed (RuntimeError: unsupported operation aten::boom); used PyTorch"]
    assert np.array_equal(result.labels, reference.labels)


def test_without_openvino_every_path_is_pytorch(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    runtime_options.openvino_available.cache_clear()
    try:
        assert not runtime.openvino_available()
        assert runtime.resolve_backend("auto", torch.device("cpu")) == ("torch", None)
        backend, note = runtime.resolve_backend("openvino", torch.device("cpu"))
        assert backend == "torch" and note == "OpenVINO is not installed; used PyTorch"
        network = tiny("unet", 2, "batch")
        image = volume(2)
        auto = run(network, image, "auto", PATCH[2])
        assert auto.stats["backend"] == "torch" and auto.stats["fallbacks"] == []
        asked = run(network, image, "openvino", PATCH[2], precision="int8")
        assert asked.stats["backend"] == "torch"
        assert "OpenVINO is not installed; used PyTorch" in asked.stats["fallbacks"]
        assert np.array_equal(auto.labels, asked.labels)
    finally:
        monkeypatch.delitem(sys.modules, "openvino")
        runtime_options.openvino_available.cache_clear()


def test_auto_converts_only_runs_big_enough_to_pay_back_or_models_already_converted(monkeypatch):
    network = tiny("unet", 2, "batch")
    image = volume(2)  # 12 windows of 16^2: far below AUTO_MIN_VOXELS
    small = run(network, image, "auto", PATCH[2])
    assert small.stats["backend"] == "torch" and small.stats["fallbacks"] == []
    explicit = run(network, image, "openvino", PATCH[2])  # converts and caches
    assert explicit.stats["backend"] == "openvino"
    openvino_backend._COMPILED.clear()
    again = run(network, image, "auto", PATCH[2])  # already converted: auto takes it
    assert again.stats["backend"] == "openvino" and again.stats["runtime_cache"] == "hit"
    monkeypatch.setattr(runtime, "AUTO_MIN_VOXELS", 1)  # a big run converts under auto
    fresh = tiny("residual_unet", 2, "batch")
    assert run(fresh, image, "auto", PATCH[2]).stats["backend"] == "openvino"


def test_auto_uses_openvino_on_cpu_only_and_bad_settings_are_clear_errors():
    assert runtime.resolve_backend("auto", torch.device("cpu"))[0] == "openvino"
    assert runtime.resolve_backend("auto", torch.device("cuda"))[0] == "torch"
    backend, note = runtime.resolve_backend("openvino", torch.device("cuda"))
    assert backend == "torch" and "CPU only" in note
    with pytest.raises(InputError, match="backend must be one of"):
        runtime.check_backend("onnx")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InputError, match="threads"):
            runtime.check_threads(bad)
    import os

    with pytest.raises(InputError, match="logical CPUs"):  # 100000 threads crashed the process (SIGSEGV)
        runtime.check_threads((os.cpu_count() or 1) + 1)
    assert runtime.check_threads(os.cpu_count() or 1) == (os.cpu_count() or 1)
    assert runtime.suggested_threads(leave_one_core_free=True) == max(1, runtime.physical_cores() - 1)


def test_threads_setting_reaches_pytorch_and_is_restored():
    seen = []

    class Recorder(nn.Module):
        spatial_dims, in_channels, out_channels = 2, 1, 2

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return torch.cat([x, -x], dim=1)

    before = torch.get_num_threads()
    options = InferenceOptions(patch_size=(8, 8), runtime=RuntimeOptions(backend="torch", threads=1))
    sliding_window_inference(Recorder(), np.zeros((1, 8, 8), np.float32), options)
    assert seen and set(seen) == {1} and torch.get_num_threads() == before


def test_int8_runs_a_calibrated_model_and_auto_uses_it_only_when_its_check_passed(tmp_path):
    from UNetSegmentLib.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
    from UNetSegmentLib.metadata import LabelInfo, ModelMetadata
    from UNetSegmentLib.runtime.int8 import model_runtime, quantize_network, write_int8

    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    with torch.no_grad():  # a clear decision: class 1 where the (smoothed) image is positive
        network[0].weight.fill_(1 / 27)
        network[0].bias.zero_()
        network[0].weight[2:].mul_(-1)
        network[2].weight.zero_()
        network[2].weight[0, 2], network[2].weight[1, 0] = 4.0, 4.0
        network[2].bias.zero_()
    rng = np.random.default_rng(0)
    calibration = [rng.normal(0, 1, (2, 1, 8, 8, 8)).astype(np.float32) for _ in range(4)]
    int8_model = quantize_network(network, (1, 8, 8, 8), calibration)
    assert int8_model["input_shape"] == [1, 8, 8, 8] and b"FakeQuantize" in int8_model["xml"]
    image = torch.from_numpy(rng.normal(0, 1, (1, 20, 20, 20)).astype(np.float32))
    fp32 = sliding_window_inference(network, image, InferenceOptions(patch_size=(8, 8, 8)))
    int8 = sliding_window_inference(network, image, InferenceOptions(
        patch_size=(8, 8, 8), precision="int8", runtime=RuntimeOptions("openvino", int8_model=int8_model)))
    assert int8.stats["backend"] == "openvino" and int8.stats["precision"] == "int8"
    assert np.mean(int8.labels == fp32.labels) >= 0.95

    # the card decides what `auto` does; an explicit request uses the carried model either way
    metadata = ModelMetadata(architecture="unet", architecture_kwargs={"features": 4, "levels": 2}, spatial_dims=3,
                             in_channels=1, labels=[LabelInfo(0, "background", (0, 0, 0)),
                                                    LabelInfo(1, "thing", (1, 0, 0))],
                             patch_size=[8, 8, 8], target_spacing=[1.0, 1.0, 1.0])
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_network("unet", 3, 1, 2, features=4, levels=2), metadata)
    plain = load_checkpoint(path)
    assert model_runtime(plain, "auto", None, "auto", torch.device("cpu"))[1] == "auto"
    for ready, expected in ((False, "auto"), (True, "int8")):
        write_int8(path, int8_model, {"ready": ready, "mean_dice_change": -0.001 if ready else -0.02})
        model = load_checkpoint(path)
        assert model.metadata.training["int8"]["ready"] is ready
        options, precision = model_runtime(LoadedModel(model.network, model.metadata, path), "auto", None, "auto",
                                           torch.device("cpu"))
        assert precision == expected and (options.int8_model is not None) == ready
        options, precision = model_runtime(model, "auto", None, "int8", torch.device("cpu"))
        assert precision == "int8" and options.int8_model["xml"] == int8_model["xml"]
        assert model_runtime(model, "torch", None, "auto", torch.device("cpu"))[0].int8_model is None


def test_segment_cli_takes_backend_precision_and_threads(tmp_path):
    from UNetSegmentLib.cli import build_parser

    args = build_parser().parse_args(["segment", "in.nrrd", "-o", "out.nrrd", "--backend", "openvino",
                                      "--precision", "int8", "--threads", "2"])
    assert (args.backend, args.precision, args.threads) == ("openvino", "int8", 2)
    assert build_parser().parse_args(["segment", "in.nrrd", "-o", "o.nrrd"]).backend == "auto"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["segment", "in.nrrd", "-o", "o.nrrd", "--backend", "onnx"])
    assert exit_info.value.code == 2


def test_batches_are_split_over_parallel_streams_with_the_same_result():
    """With 2 threads a batch runs one window at a time per single-thread stream, concurrently; a batch smaller
    than the streams (whole-volume mode) uses one request with every thread. Same logits either way."""
    network = tiny("unet", 3, "batch")
    batch = torch.randn((3, 1) + PATCH[3], generator=torch.Generator().manual_seed(3))
    runner = openvino_backend.create_runner(network, (1,) + PATCH[3], "fp32", 2, None, 256.0)
    with torch.no_grad():
        expected = network(batch)
    single = runner(batch[:1])  # one request, both threads
    assert runner.parallel_queue is None  # the multi-stream model is compiled on first use only
    parallel = runner(batch)  # 3 windows, one at a time on the next free of two streams
    assert len(runner.parallel_queue) == 2
    assert runner._models.parallel().input(0).get_partial_shape().is_static  # batch of one, static
    assert parallel.shape == expected.shape
    assert float((parallel - expected).abs().max()) <= 1e-3
    assert float((single - expected[:1]).abs().max()) <= 1e-3
    one_thread = openvino_backend.create_runner(network, (1,) + PATCH[3], "fp32", 1, None, 256.0)
    assert one_thread.parallel_queue is None

    class SilentQueue:  # requests that end without output and without raising
        def set_callback(self, callback):
            pass

        def start_async(self, inputs, userdata=None, share_inputs=False):
            pass

        def wait_all(self):
            pass

    runner.parallel_queue = SilentQueue()
    with pytest.raises(RuntimeError, match=r"no output for window\(s\) \[0, 1, 2\] of 3"):
        runner(batch)  # a hole would otherwise be blended into the volume as zeros, or crash obscurely


def test_windows_are_cut_into_equal_batches(monkeypatch):
    """8 windows with batches of at most 5 run as 4 + 4 (as many calls as 5 + 3, evenly split over streams)."""
    seen = []

    class Recorder(nn.Module):
        spatial_dims, in_channels, out_channels = 2, 1, 2

        def forward(self, x):
            seen.append(len(x))
            return torch.cat([x, -x], dim=1)

    options = InferenceOptions(patch_size=(8, 8), overlap=0.5, batch_size=5, mode="sliding",
                               runtime=RuntimeOptions(backend="torch"))
    result = sliding_window_inference(Recorder(), np.zeros((1, 20, 12), np.float32), options)  # 4 x 2 windows
    assert result.stats["windows"] == 8
    assert seen[-2:] == [4, 4]


def test_fp32_on_cuda_switches_tf32_off_for_the_call_and_restores_it():
    """cuDNN runs fp32 convolutions in TF32 by default on recent GPUs (H200: probabilities 1.5e-3 off
    the CPU's); the runner's fp32 must be IEEE fp32 there, without changing the caller's settings."""
    from UNetSegmentLib.runtime import ieee_fp32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        with ieee_fp32(torch.device("cuda")):
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.allow_tf32 and matmul.allow_tf32
        with pytest.raises(ValueError):
            with ieee_fp32(torch.device("cuda", 0)):
                raise ValueError("a failed forward pass")
        assert cudnn.allow_tf32 and matmul.allow_tf32
        with ieee_fp32(torch.device("cpu")):
            assert cudnn.allow_tf32  # nothing to do off CUDA
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
