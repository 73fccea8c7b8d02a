"""The contract every backend keeps with the worker (docs/adding-an-engine.md), run over every registered backend
that can run on this CPU and over the demonstration engine in tests/engines/demo.py.

A backend added to the registry without CPU parameters in ENGINES below fails here until it has them.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from harness import hardware
from harness.config import ModelSpec
from harness.isolation import run_isolated
from harness.matrix import load_matrix
from harness.measure import consistency
from harness.measure.accuracy import as_float32
from harness.measure.throughput import TimingStreamer, measure_generation
from harness.methods import BACKENDS, MethodUnavailable, method_class
from harness.models import ResolvedModel, prompt_ids, resolve
from harness.runtimes import EngineRuntime

DEMO = "demo"
DEMO_CLASS = "engines.demo:DemoMethod"

# Parameters each backend runs with on a CPU, on the synthetic two-layer model: the cheapest real setting.
ENGINES: dict[str, dict[str, Any]] = {
    "torch": {"dtype": "float32"},
    "bnb": {"quant": "int8", "dtype": "bfloat16"},
    "gguf": {"qtype": "q8_0", "n_threads": 1, "token_choice": "host", "perf_tolerance": 1.0},
    "gptq": {"quantizer": "rtn", "group_size": 64, "kernel": "torch", "dtype": "bfloat16"},
    "torchao": {"quant": "int8-weight", "dtype": "float32"},
    "quanto": {"weights": "int8", "dtype": "float32"},
    "vllm": {"dtype": "bfloat16", "kv_cache_gib": 0.25, "max_model_len": 256, "max_num_seqs": 8},
    # CUDA only: on a CPU its cells skip with the reason (tests/test_exllamav2.py runs it against a fake library)
    "exllamav2": {"bits": 4.0, "head_bits": 6, "cache": "fp16", "calibration_samples": 4, "calibration_tokens": 16,
                  "measurement_samples": 2},
    DEMO: {},
}
BACKEND_NAMES = [*BACKENDS, DEMO]
TINY = {"name": "tiny", "source": "synthetic", "arch": "tiny-test", "seed": 0}
PROMPT_TOKENS, NEW_TOKENS = 8, 4


@pytest.fixture(scope="module", autouse=True)
def demo_backend():
    """The demonstration engine in the registry, for this module only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BACKENDS, DEMO, DEMO_CLASS)  # the one registry line an engine needs
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The synthetic model, resolved in a private cache (GGUF conversions land there too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTBENCH_CACHE", str(tmp_path_factory.mktemp("contract-cache")))
        yield resolve(ModelSpec(**TINY), log=lambda message: None)


@dataclass
class Loaded:
    backend: str
    method: Any
    model: Any
    resolved: ResolvedModel

    @property
    def runtime(self) -> EngineRuntime:
        return self.method.RUNTIME


def available(backend: str, device: str = "cpu") -> Any:
    """An instance of the backend's method on `device`, or a skip naming why it cannot run here."""
    method = method_class(backend)(ENGINES[backend], device)
    try:
        method.check_available()
    except MethodUnavailable as exc:
        pytest.skip(f"{backend} cannot run here: {exc}")
    return method


@pytest.fixture(scope="module", params=BACKEND_NAMES)
def engine(request, tiny, demo_backend):
    """The backend's model prepared, loaded and warmed up on the CPU, as the worker does, once per backend."""
    method = available(request.param)
    method.prepared = method.prepare(tiny, 0, lambda message: None)
    model = method.load(tiny.pretrained)
    method.warm_up(model)
    method.verify(model, generated=False)
    return Loaded(request.param, method, model, tiny)


def rows_of(loaded: Loaded, batch_size: int) -> list[list[int]]:
    return prompt_ids(loaded.resolved, None, batch_size, PROMPT_TOKENS, seed=0)


def test_every_registered_backend_is_held_to_the_contract():
    assert set(BACKEND_NAMES) <= set(ENGINES), \
        f"add CPU parameters for {sorted(set(BACKEND_NAMES) - set(ENGINES))} to ENGINES in {__file__}"


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_backend_declares_its_name_marker_runtime_and_parameters(backend):
    cls = method_class(backend)
    assert cls.NAME == backend and cls.MARKER == backend  # the plugin registers one marker per registry name
    assert isinstance(cls.RUNTIME, EngineRuntime)
    for error in cls.RUNTIME.out_of_memory_errors():  # narrow: a broad class would turn every bug into an OOM
        assert issubclass(error, BaseException) and error not in (BaseException, Exception, RuntimeError)
    cls.validate(ENGINES[backend], f"methods.{backend}")
    cls.validate({name: param.default for name, param in cls.PARAMS.items()}, f"methods.{backend}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_backend_whose_runtime_refuses_torch_imports_without_it(backend):
    """The measured process of such a backend refuses torch before it imports the backend's module."""
    if method_class(backend).RUNTIME.torch_in_measured_process:
        pytest.skip(f"{backend}'s runtime lets torch into the measured process")
    available(backend)
    code = f"""
import sys
from harness.worker import refuse_torch
refuse_torch("contract")
from harness.methods import method_class
method = method_class({(BACKENDS[backend])!r})({ENGINES[backend]!r}, "cpu")
method.check_available()
assert "torch" not in sys.modules
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr


def test_logits_are_float32_per_position_over_the_vocabulary(engine):
    ids = rows_of(engine, 1)[0]
    logits = as_float32(engine.method.logits(engine.model, ids))
    assert logits.shape == (len(ids), engine.resolved.vocab_size)
    assert np.isfinite(logits).all()
    consistency.dtype_name(engine.method.logits_dtype(engine.model))  # a dtype the consistency check knows


def test_generate_hands_the_prompt_and_every_new_token_to_the_streamer(engine):
    streamer = TimingStreamer()
    engine.method.generate(engine.model, rows_of(engine, 2), NEW_TOKENS, streamer)
    assert len(streamer.times) >= NEW_TOKENS + 1  # the prompt, then each step's ids


def test_generation_is_timed_and_its_memory_tracked_under_the_backends_runtime(engine):
    rows = rows_of(engine, 2)
    with engine.runtime.track_memory("cpu") as memory:
        timing = measure_generation(lambda n, streamer: engine.method.generate(engine.model, rows, n, streamer),
                                    engine.runtime.sync_device("cpu"), len(rows), PROMPT_TOKENS, NEW_TOKENS,
                                    warmup=1, repeats=2)
    engine.method.verify(engine.model, generated=True)
    figures = timing.figures()
    assert figures["decode_tokens_per_s"].value > 0 and figures["decode_tokens_per_s"].n == 2
    assert memory["peak_rss_mib"].value > 0 and "peak_vram_mib" not in memory


def test_greedy_honours_each_rows_length_and_picks_the_most_likely_token(engine):
    lengths = consistency.prompt_lengths(PROMPT_TOKENS)
    prompts = [row[:length] for row, length in zip(rows_of(engine, len(lengths)), lengths, strict=True)]
    ids, scores = engine.method.greedy(engine.model, prompts, NEW_TOKENS)
    scores = as_float32(scores)
    vocab = engine.resolved.vocab_size
    assert scores.shape == (len(prompts), NEW_TOKENS, vocab)
    assert [len(row) for row in ids] == [NEW_TOKENS] * len(prompts)
    assert all(isinstance(token, int) and 0 <= token < vocab for row in ids for token in row)
    for prompt, row in zip(prompts, ids, strict=True):
        # the first new token of each row is its prompt's most likely next token (ties aside), padding or not
        last = as_float32(engine.method.logits(engine.model, prompt))[-1]
        assert last[row[0]] >= last.max() - 0.05 * last.std()


def test_weights_and_description_are_recorded(engine):
    weights = engine.method.weights_bytes(engine.model)
    assert weights is None or (isinstance(weights, int) and weights > 0)
    described = engine.method.describe(engine.model)
    assert described["backend"] == engine.backend and described["params"] == engine.method.params
    json.dumps(described)  # it goes into the results file


class FakeNvml:
    def nvmlDeviceGetComputeRunningProcesses(self, handle):  # noqa: N802 - NVML's name
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=300 * 2**20)]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_device_memory_is_read_the_way_the_runtime_declares(backend, monkeypatch):
    """On a GPU: torch's allocator for a runtime whose memory is torch's, and never torch for the others."""
    runtime = method_class(backend).RUNTIME

    def forbidden(*args, **kwargs):
        raise AssertionError(f"{runtime.name}: torch.cuda was called for a runtime whose memory is not torch's")

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, (lambda: None) if runtime.torch_allocator else forbidden)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        (lambda: 200 * 2**20) if runtime.torch_allocator else forbidden)
    monkeypatch.setattr(hardware, "nvml_handle", lambda: (FakeNvml(), "handle"))
    with runtime.track_memory("cuda") as memory:
        pass
    assert memory["peak_nvml_mib"].value == 300 and memory["nvml_scope"] == "process"
    assert ("peak_vram_mib" in memory) == runtime.torch_allocator
    runtime.release_cached_memory()


MATRIX = """
[models.tiny]
source = "synthetic"
arch = "tiny-test"
[methods.demo]
backend = "demo"
[methods.demo-one-row]
backend = "demo"
memory_rows = 1
[suites.cpu]
models = ["tiny"]
methods = ["demo", "demo-one-row"]
batch_sizes = [1, 2]
"""


def test_the_worker_measures_the_demo_engine_as_a_cell(tmp_path, tiny_job, worker_env):
    """From a matrix to results: the demo's cells run in worker processes as every backend's do, torch
    refused in the measured one, and its out-of-memory fails only the batch size that ran out."""
    (tmp_path / "matrix.toml").write_text(MATRIX)
    cells = {cell.method.name: cell for cell in load_matrix(tmp_path / "matrix.toml").cells()}
    jobs = {name: {**tiny_job(BACKENDS[cell.method.backend], batch_sizes=cell.batch_sizes),
                   "method": cell.method.to_dict()} for name, cell in cells.items()}
    # the runtime refuses torch in the measured process, so its prepare process makes the model and ids
    prepared = run_isolated({**jobs["demo"], "prepare_only": True, "prepare_method": True}, timeout_s=120,
                            env=worker_env)
    assert prepared.status == "ok", prepared.log_tail
    assert "inputs" in prepared.prepared

    measured = run_isolated({**jobs["demo"], "prepared": prepared.prepared}, timeout_s=120, env=worker_env)
    assert measured.status == "ok", measured.log_tail
    assert "measured without torch" in measured.log_tail
    model_cell = measured.result(None)
    assert model_cell.figures["ppl"].value > 1 and model_cell.details["method"]["runtime"] == "demo"
    assert model_cell.details["weights_bytes"] == 2 * 1024 * 128 * 4  # embedding and head, float32
    assert model_cell.details["batch_consistency"]["consistent"] is True
    for batch_size in (1, 2):
        cell = measured.result(batch_size)
        assert cell.error is None
        assert cell.figures["decode_tokens_per_s"].value > 0 and cell.figures["peak_rss_mib"].value > 0
        assert cell.details["memory_protocol"] == 1

    one_row = run_isolated({**jobs["demo-one-row"], "prepared": prepared.prepared}, timeout_s=120, env=worker_env)
    assert one_row.status == "ok", one_row.log_tail
    assert one_row.result(1).error is None and one_row.result(1).figures["decode_tokens_per_s"].value > 0
    assert "out of memory at batch size 2: demo engine out of memory" in one_row.result(2).error
    # the consistency check batches four prompts: out of memory there is recorded, not a failed cell
    assert "out of memory" in one_row.result(None).details["batch_consistency"]["reason"]
