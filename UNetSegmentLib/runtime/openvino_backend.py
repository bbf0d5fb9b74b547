"""OpenVINO execution of one network: conversion (dynamic batch), IR cache, compilation, inference.

Only imported when OpenVINO is importable; everything here may raise, and the caller
(`runtime.prepare_runner`) turns any failure into a PyTorch fallback with a one-line note.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from .cache import ModelCache, entry_key, weights_hash
from .subpixel import rewrite_transposed_convolutions

log = logging.getLogger(__name__)

# Part of every fp32 IR's cache key: bump it when `convert` changes what it hands to OpenVINO, so that
# IRs converted by an older recipe are not served (2: transposed convolutions in sub-pixel form).
CONVERSION_RECIPE = "2"

_CORE = None
_CORE_LOCK = threading.Lock()
# network -> {(shape, precision, threads, fingerprint, cache folder, int8 digest): CompiledModels}
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def core():
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino as ov

            _CORE = ov.Core()
        return _CORE


def version() -> str:
    import openvino as ov

    return str(ov.__version__)


def _fingerprint(network: torch.nn.Module) -> tuple:
    """Cheap identity of the current weights: storage and in-place version counter of each tensor
    (any optimiser step or load_state_dict bumps a version), so the in-process memo never serves a
    network whose weights changed since it was compiled."""
    return tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in network.state_dict().items())


def convert(network: torch.nn.Module, input_shape: Sequence[int]):
    """ov.Model of `network` for inputs (N, *input_shape) with a dynamic batch N, first output only.

    Transposed convolutions are converted in sub-pixel form (runtime/subpixel.py): same result, and
    INT8-quantizable on AVX2 CPUs, where OpenVINO runs transposed convolutions in fp32 only.
    """
    import openvino as ov

    shape = tuple(int(s) for s in input_shape)
    was_training = network.training
    network.eval()
    example = torch.zeros((2,) + shape, dtype=torch.float32)
    try:
        traced, _ = rewrite_transposed_convolutions(network)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
            model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, *shape])])
    finally:
        network.train(was_training)
    if len(model.outputs) > 1:  # deep-supervision style outputs: keep the full-resolution logits
        model = ov.Model([model.outputs[0]], model.get_parameters(), "network")
    return model


def int8_digest(int8_model: dict) -> str:
    digest = hashlib.sha256(bytes(int8_model["xml"]))
    digest.update(bytes(int8_model["bin"]))
    return digest.hexdigest()


def compile_config(precision: str, threads: Optional[int], cache: Optional[ModelCache], streams: int = 1) -> dict:
    """`streams` > 1: that many concurrent requests sharing `threads` (one window each, see OpenVINORunner)."""
    config = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT", "NUM_STREAMS": str(int(streams)),
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache is not None:
        config["CACHE_DIR"] = str(cache.compiled_dir)
    return config


class CompiledModels:
    """One network's compiled models: the one-request model, and the multi-stream model, compiled on
    the first batch that uses it (a whole-volume run never does, so it never pays for it)."""

    def __init__(self, single, compile_parallel=None):
        self.single = single
        self._compile_parallel = compile_parallel
        self._parallel = None

    def parallel(self):
        if self._parallel is None and self._compile_parallel is not None:
            compile_parallel, self._compile_parallel = self._compile_parallel, None
            try:
                self._parallel = compile_parallel()
            except RuntimeError as error:  # the one-request model works: keep running on it
                log.warning("OpenVINO multi-stream model not compiled (%s); using one request",
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
        return self._parallel


class OpenVINORunner:
    """Runs batches (N, C, *shape) through a compiled model; returns float32 logits on the batch's device.

    With several threads, a batch of at least as many windows runs one window per single-thread
    stream, concurrently, on a model reshaped to a static batch of one: U-Net layers on small grids
    (instance norm, additions, the deep stages) scale poorly within one request, so one window per
    core does more work per second (nnU-Net model, 2 threads: 1.41 -> 1.20 s per window), and a
    static shape lets the CPU plugin plan each layer once (MONAI UNet, 4 windows of 96^3, 2 threads:
    0.52 s split in two dynamic halves -> 0.48 s one static window at a time). Smaller batches
    (whole-volume mode) use one request with every thread.
    """

    backend = "openvino"

    def __init__(self, models: CompiledModels, precision: str, notes: list, convert_s: float, cache_hit: bool,
                 input_shape: tuple, streams: int = 1):
        self.compiled = models.single
        self.request = models.single.create_infer_request()
        self._models = models
        self.streams = int(streams)  # windows run concurrently once a batch has this many
        self.parallel_queue = None  # one request per stream, created with the multi-stream model on first use
        self.precision = precision
        self.notes = notes
        self.convert_s = convert_s
        self.cache_hit = cache_hit
        self.input_shape = input_shape

    def _parallel_queue(self):
        if self.parallel_queue is None and self.streams > 1:
            import openvino as ov

            parallel = self._models.parallel()
            count = int(parallel.get_property("NUM_STREAMS")) if parallel is not None else 1
            if count > 1:
                self.parallel_queue = ov.AsyncInferQueue(parallel, count)
            else:
                self.streams = 1
        return self.parallel_queue

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        queue = self._parallel_queue() if self.streams > 1 and len(array) >= self.streams else None
        if queue is not None:
            results: list = [None] * len(array)

            def keep(request, index):  # runs on OpenVINO's thread; the request's buffer is reused next
                results[index] = np.array(request.get_output_tensor(0).data, copy=True)

            queue.set_callback(keep)
            for index in range(len(array)):  # each window to the next free stream
                queue.start_async({0: array[index:index + 1]}, userdata=index, share_inputs=True)
            queue.wait_all()
            missing = [index for index, result in enumerate(results) if result is None]
            if missing:  # a request that failed without raising: never blend a hole into the volume
                raise RuntimeError(f"OpenVINO returned no output for window(s) {missing} of {len(results)}")
            output = torch.from_numpy(np.concatenate(results))
        else:
            self.request.infer({0: array}, share_inputs=True, share_outputs=True)
            # the output buffer is reused by the next call: hand out a copy the caller may keep or edit
            output = torch.from_numpy(np.array(self.request.get_output_tensor(0).data, copy=True))
        return output if batch.device.type == "cpu" else output.to(batch.device)


def is_converted(network: torch.nn.Module, input_shape: Sequence[int], precision: str, options) -> bool:
    """True when a runner for this network, shape and precision needs no conversion (memo or disk cache)."""
    shape = tuple(int(s) for s in input_shape)
    memo = _COMPILED.get(network) or {}
    if any(key[0] == shape and key[1] == precision and key[3] == _fingerprint(network) for key in memo):
        return True
    extra = int8_digest(options.int8_model) if precision == "int8" else CONVERSION_RECIPE
    key = entry_key(weights_hash(network), shape, "openvino", "int8" if precision == "int8" else "fp32",
                    version(), extra)
    return ModelCache(options.cache_dir, options.cache_max_mb).lookup(key) is not None


def create_runner(network: torch.nn.Module, input_shape: Sequence[int], precision: str, threads: Optional[int],
                  cache_dir, cache_max_mb: float, int8_model: Optional[dict] = None,
                  on_convert=None) -> OpenVINORunner:
    """Compiled runner, from the in-process memo, the disk cache, or a fresh conversion (in that order).

    `precision`: fp32 | bf16 (a compile hint on the fp32 IR) | int8 (needs `int8_model`).
    `on_convert(seconds or None)` is called before (None) and after a conversion, for progress.
    """
    shape = tuple(int(s) for s in input_shape)
    cache = ModelCache(cache_dir, cache_max_mb)
    extra = int8_digest(int8_model) if precision == "int8" else CONVERSION_RECIPE
    memo_key = (shape, precision, threads, _fingerprint(network), str(cache.folder), extra)
    memo = _COMPILED.setdefault(network, {})
    streams = int(threads) if threads and int(threads) > 1 else 1
    if memo_key in memo:
        return OpenVINORunner(memo[memo_key], precision, [], 0.0, True, shape, streams)
    ir_precision = "int8" if precision == "int8" else "fp32"
    key = entry_key(weights_hash(network), shape, "openvino", ir_precision, version(), extra)
    notes, convert_s = [], 0.0
    path = cache.lookup(key)
    cache_hit = path is not None
    model = None
    if path is None:
        started = time.perf_counter()
        if on_convert is not None:
            on_convert(None)
        if precision == "int8":
            def save(xml_path):
                xml_path.write_bytes(bytes(int8_model["xml"]))
                xml_path.with_suffix(".bin").write_bytes(bytes(int8_model["bin"]))
        else:
            model = convert(network, shape)

            def save(xml_path):
                import openvino as ov

                ov.save_model(model, str(xml_path), compress_to_fp16=False)
        try:
            path = cache.store(key, save)
        except OSError as error:
            notes.append(f"OpenVINO cache {cache.folder} is not writable ({error.strerror or error}); "
                         "the converted model is not kept")
            cache = None
            if model is None:
                import openvino as ov

                model = core().read_model(bytes(int8_model["xml"]), ov.Tensor(np.frombuffer(
                    bytes(int8_model["bin"]), dtype=np.uint8)))
        convert_s = time.perf_counter() - started
        if on_convert is not None:
            on_convert(convert_s)
    config = compile_config(precision, threads, cache)
    source = str(path) if path is not None and cache is not None else model
    try:
        compiled = core().compile_model(source, "CPU", config)
    except RuntimeError:
        if not cache_hit:
            raise
        cache.remove(key)  # a damaged entry: convert again, once
        return create_runner(network, shape, precision, threads, cache_dir, cache_max_mb, int8_model, on_convert)
    parallel_config = compile_config(precision, threads, cache, streams)

    def compile_parallel():  # one window per request: a static batch of one (see OpenVINORunner)
        one_window = core().read_model(source) if isinstance(source, str) else source.clone()
        one_window.reshape([1, *shape])
        return core().compile_model(one_window, "CPU", parallel_config)

    models = CompiledModels(compiled, compile_parallel if streams > 1 else None)
    memo.clear()  # keep one compiled model per network: the newest shape/precision
    memo[memo_key] = models
    return OpenVINORunner(models, precision, notes, convert_s, cache_hit, shape, streams)
