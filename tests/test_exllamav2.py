"""The ExLlamaV2 backend on a CPU: its conversion job and cache, its skips, its parameters and its decode loop,
against a fake `exllamav2` module that keeps the library's contract (host ids, a cache that advances by the
ids it is fed, fp16 logits [rows, positions, vocab])."""

import json
import stat
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from harness import exl2
from harness.config import MatrixError
from harness.exl2 import Exl2Error, Exl2Spec, cache_key, conversion_job, exl2_folder, packed_bits
from harness.matrix import load_matrix
from harness.measure.throughput import TimingStreamer
from harness.methods import MethodUnavailable, method_class
from harness.methods import exllamav2 as backend

EXL2 = method_class("exllamav2")
VOCAB = 11
ROOT = Path(__file__).resolve().parents[1]


# ---- a fake exllamav2 ------------------------------------------------------------------------------------

class FakeConfig:
    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.vocab_size = VOCAB
        self.max_input_len = 2048
        self.no_flash_attn = self.no_xformers = self.no_sdpa = False

    def arch_compat_overrides(self):
        pass


class FakeModel:
    """Next id = (7 x id + position) mod VOCAB, as fp16 one-hot logits; asserts what ExLlamaV2's forward asserts."""

    def __init__(self, config):
        self.config = config
        self.calls = []

    def load(self):
        pass

    def is_quant(self):
        return True

    def forward(self, input_ids, cache=None, last_id_only=False):
        assert input_ids.device.type == "cpu", "ExLlamaV2's embedding table is in host memory"
        batch, length = input_ids.shape
        past = 0 if cache is None else cache.current_seq_len
        if cache is not None:
            assert batch <= cache.batch_size and past + length <= cache.max_seq_len
            cache.current_seq_len += length
        self.calls.append((batch, length, past))
        positions = torch.arange(past, past + length)
        nxt = (7 * input_ids + positions) % VOCAB
        logits = torch.nn.functional.one_hot(nxt, VOCAB).to(torch.float16)
        return logits[:, -1:] if last_id_only else logits


class FakeCache:
    def __init__(self, model, batch_size=1, max_seq_len=-1):
        self.model, self.batch_size, self.max_seq_len = model, batch_size, max_seq_len
        self.current_seq_len = 0

    def footprint(self):
        return [self.batch_size * self.max_seq_len]


class FakeCacheQ8(FakeCache):
    pass


class FakeCacheQ4(FakeCache):
    pass


@pytest.fixture
def fake_library(monkeypatch):
    module = types.ModuleType("exllamav2")
    module.ExLlamaV2Config, module.ExLlamaV2 = FakeConfig, FakeModel
    module.ExLlamaV2Cache, module.ExLlamaV2Cache_Q8, module.ExLlamaV2Cache_Q4 = FakeCache, FakeCacheQ8, FakeCacheQ4
    version = types.ModuleType("exllamav2.version")
    version.__version__ = "0.3.2"
    monkeypatch.setitem(sys.modules, "exllamav2", module)
    monkeypatch.setitem(sys.modules, "exllamav2.version", version)
    return module


@pytest.fixture
def loaded(fake_library, tmp_path):
    def make(**params):
        method = EXL2({"cache": "fp16", **params}, "cuda")
        method.prepared = {"checkpoint": str(tmp_path), "produced": {"stored_tensor_bytes": 1234}}
        return method, method.load(str(tmp_path))
    return make


# ---- conversion -------------------------------------------------------------------------------------------

def source_folder(folder: Path, scale: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "max_position_embeddings": 64}))
    save_file({"w": torch.ones(2, 2) * scale}, str(folder / "model-00000.safetensors"))
    (folder / "model.safetensors.index.json").write_text("{}")
    return folder


def test_the_conversion_job_holds_every_key_the_converter_reads(tmp_path):
    spec = Exl2Spec(bits=4, head_bits=6, calibration_samples=8, calibration_tokens=16, measurement_samples=3)
    job = conversion_job(tmp_path / "src", tmp_path / "work", tmp_path / "out", spec, tmp_path / "ids.json")
    assert job == {"in_dir": str(tmp_path / "src"), "work_dir": str(tmp_path / "work"),
                   "out_dir": str(tmp_path / "out"), "bits": 4.0, "head_bits": 6, "calibration": "ids",
                   "ids_file": str(tmp_path / "ids.json"), "length": 16, "measurement_length": 16,
                   "measurement_rows": 3}
    converter = (ROOT / "harness" / "exl2_convert.py").read_text()
    for name in job:
        assert f'spec["{name}"]' in converter, f"the converter never reads {name}"


def test_the_cache_key_changes_with_the_weights_the_bits_the_ids_and_the_versions(tmp_path):
    src = source_folder(tmp_path / "src")
    spec, windows, versions = Exl2Spec(), [[1, 2], [3, 4]], {"exllamav2": "0.3.2", "torch": "2.11.0"}
    key = cache_key(src, spec, windows, versions)
    assert key == cache_key(src, spec, windows, versions)
    assert key != cache_key(src, Exl2Spec(bits=5.0), windows, versions)
    assert key != cache_key(src, Exl2Spec(head_bits=8), windows, versions)
    assert key != cache_key(src, spec, [[1, 2], [3, 5]], versions)
    assert key != cache_key(src, spec, windows, {**versions, "exllamav2": "0.3.1"})
    other = source_folder(tmp_path / "other", scale=2.0)
    assert key["source"] != cache_key(other, spec, windows, versions)["source"]


FAKE_CONVERTER = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
job = json.loads(Path(sys.argv[2]).read_text())
Path(job["work_dir"], "runs").open("a").write("run\\n")
if json.loads(Path(job["ids_file"]).read_text())[0][0] < 0:
    print(" ## Measurement/inference error (2)")
    sys.exit(1)
out = Path(job["out_dir"])
config = json.loads(Path(job["in_dir"], "config.json").read_text())
config["quantization_config"] = {"quant_method": "exl2", "bits": job["bits"], "head_bits": job["head_bits"]}
(out / "config.json").write_text(json.dumps(config))
(out / "model.safetensors.index.json").write_text("{}")  # compile_model copies the source's
tensors = {}
for key, inputs, outputs, bits in (("model.layers.0.mlp.up_proj", 64, 32, 4), ("lm_head", 64, 16, 6)):
    tensors[key + ".q_weight"] = torch.zeros(inputs * bits // 32, outputs, dtype=torch.int32)
    tensors[key + ".q_scale"] = torch.zeros(2, outputs // 8, dtype=torch.int32)
    tensors[key + ".q_scale_max"] = torch.zeros(2, dtype=torch.float16)
    tensors[key + ".q_groups"] = torch.zeros(4, dtype=torch.int16)
    tensors[key + ".q_invperm"] = torch.zeros(inputs, dtype=torch.int32)
save_file(tensors, str(out / "output.safetensors"))
print("a line ExLlamaV2 prints")
print(json.dumps({"exllamav2": "0.3.2", "bits": job["bits"]}))
"""


@pytest.fixture
def fake_python(tmp_path):
    """An 'interpreter' that runs the fake converter instead of harness/exl2_convert.py, as the real one would."""
    script = tmp_path / "fake_convert.py"
    script.write_text(FAKE_CONVERTER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return str(python)


def test_the_folder_is_converted_once_then_found_in_the_cache(tmp_path, monkeypatch, fake_python):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    src = source_folder(tmp_path / "src")
    spec = Exl2Spec(calibration_samples=2, calibration_tokens=4, measurement_samples=1)
    windows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    folder, sidecar = exl2_folder(src, spec, windows, log=lambda m: None, python=fake_python)
    assert sidecar["fresh"] and sidecar["converter"] == {"exllamav2": "0.3.2", "bits": 4.0}
    assert sidecar["quantization_config"]["quant_method"] == "exl2"
    assert not (folder / "model.safetensors.index.json").exists()  # the source's index names other shards
    produced = sidecar["produced"]
    decoder_bytes = (64 * 4 // 32 * 32 + 2 * 4) * 4 + 2 * 2 + 4 * 2 + 64 * 4
    assert produced["decoder_bits_per_weight"] == pytest.approx(8 * decoder_bytes / (64 * 32))
    assert produced["decoder_linear_layers"] == 1 and produced["head_bits_per_weight"] > 6
    again, cached = exl2_folder(src, spec, windows, log=lambda m: None, python=fake_python)
    assert again == folder and not cached["fresh"] and cached["produced"] == produced
    other, rebuilt = exl2_folder(src, Exl2Spec(bits=3.0, calibration_samples=2, calibration_tokens=4,
                                               measurement_samples=1), windows, log=lambda m: None,
                                 python=fake_python)
    assert other != folder and rebuilt["fresh"]


def test_a_failed_conversion_says_what_exllamav2_printed_and_leaves_no_folder(tmp_path, monkeypatch, fake_python):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    src = source_folder(tmp_path / "src")
    spec = Exl2Spec(calibration_samples=1, calibration_tokens=2, measurement_samples=1)
    with pytest.raises(Exl2Error, match=r"exited with status 1(.|\n)*## Measurement/inference error \(2\)"):
        exl2_folder(src, spec, [[-1, 2]], log=lambda m: None, python=fake_python)
    assert not [p for p in (tmp_path / "cache" / "exl2").iterdir() if p.is_dir()]


def test_calibration_rows_of_another_shape_than_the_spec_are_refused(tmp_path):
    src = source_folder(tmp_path / "src")
    with pytest.raises(Exl2Error, match="expected 2 rows of 4 ids"):
        exl2_folder(src, Exl2Spec(calibration_samples=2, calibration_tokens=4, measurement_samples=1), [[1, 2]])


def test_packed_bits_refuses_a_folder_without_exl2_layers(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(tmp_path / "output.safetensors"))
    with pytest.raises(Exl2Error, match="no EXL2 linear layer"):
        packed_bits(tmp_path)


# ---- parameters, skips ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "message"), [
    ({"bits": 9.0}, r"methods\.e\.bits: ExLlamaV2 targets 2 to 8 bits per weight, got 9\.0"),
    ({"bits": 1.5}, r"methods\.e\.bits: .* got 1\.5"),
    ({"head_bits": 7}, r"methods\.e\.head_bits: expected one of 2, 3, 4, 5, 6, 8, got 7"),
    ({"cache": "q6"}, r"methods\.e\.cache: expected one of fp16, q8, q4, got 'q6'"),
    ({"bits": "4"}, r"methods\.e\.bits: expected float, got '4'"),
    ({"measurement_samples": 200}, r"methods\.e\.measurement_samples: expected 1 to calibration_samples \(128\)"),
    ({"kv_cache": "q4"}, r"methods\.e\.kv_cache: unknown parameter of backend 'exllamav2'"),
])
def test_bad_parameters_are_refused_naming_the_field(params, message):
    with pytest.raises(MatrixError, match=message):
        EXL2.validate(params, "methods.e")


def test_good_parameters_pass():
    EXL2.validate({"bits": 4, "head_bits": 8, "cache": "q4"}, "methods.e")  # an int where a float is asked
    EXL2.validate({}, "methods.e")


def test_without_the_library_its_cells_skip_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(backend, "importable", lambda module: False)
    with pytest.raises(MethodUnavailable, match="exllamav2 is not installed .*'exllamav2' extra"):
        EXL2({}, "cuda").check_available()


def test_on_a_cpu_its_cells_skip_because_its_kernels_are_cuda_only(monkeypatch):
    monkeypatch.setattr(backend, "importable", lambda module: True)
    with pytest.raises(MethodUnavailable, match="CUDA GPUs only"):
        EXL2({}, "cpu").check_available()


def test_without_a_gpu_a_cuda_cell_skips_with_the_reason(monkeypatch):
    monkeypatch.setattr(backend, "importable", lambda module: True)
    monkeypatch.setattr("harness.methods.base.importable", lambda module: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MethodUnavailable, match="no CUDA GPU"):
        EXL2({}, "cuda").check_available()


def test_without_nvcc_a_cuda_cell_skips_naming_the_toolkit(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(backend, "importable", lambda module: True)
    monkeypatch.setattr("harness.methods.base.importable", lambda module: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(MethodUnavailable, match="nvcc"):
        EXL2({}, "cuda").check_available()


# ---- loading and decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("cache", "expected"), [("fp16", FakeCache), ("q8", FakeCacheQ8), ("q4", FakeCacheQ4)])
def test_the_cache_parameter_picks_exllamav2s_cache_class(loaded, cache, expected):
    method, model = loaded(cache=cache)
    made = method.cache(model, 2, 10)
    assert type(made) is expected and made.batch_size == 2 and made.max_seq_len == 10
    made.current_seq_len = 7
    assert method.cache(model, 2, 8) is made and made.current_seq_len == 0  # reused, emptied
    assert method.cache(model, 2, 20) is not made  # too short: a new one
    assert backend.CACHE_TYPES[cache] == ("ExLlamaV2Cache" if cache == "fp16" else f"ExLlamaV2Cache_{cache.upper()}")


def expected_ids(row: list[int], new_tokens: int) -> list[int]:
    ids, last, position = [], row[-1], len(row) - 1
    for _ in range(new_tokens):
        last = (7 * last + position) % VOCAB
        ids.append(last)
        position += 1
    return ids


def test_generate_decodes_exactly_n_greedy_tokens_per_row_and_hands_each_step_over(loaded):
    method, model = loaded()
    rows = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    handed = []

    class Recorder(TimingStreamer):
        def put(self, value):
            super().put(value)
            handed.append(value)

    streamer = Recorder()
    method.generate(model, rows, 4, streamer)
    assert len(streamer.times) == 5 and handed[0] == rows
    assert torch.cat(handed[1:], dim=1).tolist() == [expected_ids(row, 4) for row in rows]
    # one prefill of the whole prompt, then one id per row per step, each after the last
    assert model.model.calls == [(2, 5, 0), (2, 1, 5), (2, 1, 6), (2, 1, 7)]
    assert model.timed_rows[2] == (rows, 4)
    method.generate(model, rows, 4, None)  # warm-up calls have no streamer
    assert model.model.calls[-4] == (2, 5, 0)  # the cache was emptied


def test_generate_refuses_rows_of_different_lengths(loaded):
    method, model = loaded()
    with pytest.raises(ValueError, match="rows of one length"):
        method.generate(model, [[1, 2, 3], [1, 2]], 2, None)


def test_batch_consistency_is_not_checked_and_says_why(loaded):
    method, model = loaded()
    with pytest.raises(NotImplementedError, match="one length"):
        method.greedy(model, [[1, 2], [1, 2, 3]], 2)


@pytest.mark.parametrize("cache", ["fp16", "q8", "q4"])
def test_logits_are_one_row_per_position_and_a_quantized_cache_is_read_token_by_token(loaded, cache):
    method, model = loaded(cache=cache)
    ids = [1, 5, 2, 9]
    logits = method.logits(model, ids)
    assert logits.dtype == torch.float32 and logits.shape == (4, VOCAB)
    assert logits.argmax(-1).tolist() == [(7 * t + p) % VOCAB for p, t in enumerate(ids)]
    calls = model.model.calls
    assert calls == ([(1, 4, 0)] if cache == "fp16" else [(1, 1, p) for p in range(4)])
    assert method.describe(model)["accuracy_through"].startswith("one forward" if cache == "fp16" else "token by")


def test_device_time_is_the_kernels_own_durations_with_the_reason(loaded, monkeypatch):
    from harness.measure import device

    method, model = loaded()
    assert method.engine_timing(model, 2, 5) is None  # no timed call of that batch size yet
    rows = [[1, 2, 3, 4], [4, 3, 2, 1]]
    method.generate(model, rows, 6, None)
    sessions = []

    def fake_profile(run, repeats, cuda):
        sessions.append(repeats)
        for _ in range(repeats):
            run()
        return 0.002, 17, ("exl2_gemm",)

    monkeypatch.setattr(device, "profile_kernels", fake_profile)
    timing = method.engine_timing(model, 2, 5)
    assert timing.how is device.How.PROFILER and timing.steps == 5 and timing.prompt_tokens == 4
    assert timing.burst_s == (0.002 * 5,) * device.PROFILER_SESSIONS
    assert timing.prefill_s == (0.002,) * device.PROFILER_SESSIONS and timing.kernels_per_step == 17
    assert "own CUDA stream" in timing.details()["not_captured"]
    assert sessions == [1] + [1, min(device.PROFILED_STEPS, 5)] * device.PROFILER_SESSIONS


def test_the_description_records_the_library_the_cache_and_the_bits_produced(loaded):
    method, model = loaded(cache="q8")
    method.prepared["produced"] = {"decoder_bits_per_weight": 4.06, "stored_tensor_bytes": 99}
    method.generate(model, [[1, 2]], 3, None)
    described = method.describe(model)
    assert described["exllamav2"] == "0.3.2" and described["cache_type"] == "ExLlamaV2Cache_Q8"
    assert described["produced"]["decoder_bits_per_weight"] == 4.06 and described["caches"]["1"]["bytes"] == 5
    assert method.weights_bytes(model) == 99
    json.dumps(described)


# ---- the matrix -------------------------------------------------------------------------------------------

def test_the_exl2_methods_are_in_the_gpu_suite_only():
    matrix = load_matrix(ROOT / "benchmarks" / "matrix.toml")
    names = {"exl2-4.0bpw": "fp16", "exl2-4.0bpw-q8cache": "q8", "exl2-4.0bpw-q4cache": "q4"}
    cells = [cell for cell in matrix.cells() if cell.method.name in names]
    assert cells and {cell.suite.name for cell in cells} == {"gpu"}
    for cell in cells:
        assert cell.method.backend == "exllamav2" and cell.method.param("cache") == names[cell.method.name]


def test_the_converter_module_imports_nothing_from_quantbench():
    source = (ROOT / "harness" / "exl2_convert.py").read_text()
    assert "harness" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))
    assert exl2.CONVERTER.name == "exl2_convert.py"
