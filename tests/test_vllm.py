"""The vLLM backend: its accuracy protocol against torch's, its timing cross-check, its kernels and its skips.

The tests that run vLLM skip where it is not installed (`tox -e vllm` has it); those that build a
compressed-tensors checkpoint also need llmcompressor's environment (QUANTBENCH_LLMCOMPRESSOR_PYTHON).
"""

import importlib.util
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from harness import embedded
from harness.compressed import PYTHON_VAR, CompressedError, check_compressed, missing_builder
from harness.measure.accuracy import log_softmax
from harness.methods import MethodUnavailable, method_class

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (tox -e vllm)")
VLLM = method_class("vllm")
SMALL = {"kv_cache_gib": 0.25, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def embedded_folder():
    return embedded.build(log=lambda message: None)


def flat(rows: list[list[tuple[int, float]]]) -> SimpleNamespace:
    """vLLM's FlatLogprobs layout of per-position (token, logprob) pairs."""
    starts, ends, ids, values = [], [], [], []
    for row in rows:
        starts.append(len(ids))
        ids += [token for token, _ in row]
        values += [value for _, value in row]
        ends.append(len(ids))
    return SimpleNamespace(start_indices=starts, end_indices=ends, token_ids=ids, logprobs=values)


def test_flat_log_probabilities_become_a_dense_array_and_a_partial_vocabulary_is_refused():
    from harness.methods.vllm import _dense

    rows = [[(0, -1.0), (1, -2.0), (2, -3.0)], [(2, -0.5), (0, -4.0), (1, -5.0), (2, -0.5)]]  # chosen token twice
    assert _dense(flat(rows), 0, 2, 3).tolist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, -0.5]]
    assert _dense(flat(rows), 1, 2, 3).tolist() == [[-4.0, -5.0, -0.5]]
    with pytest.raises(RuntimeError, match="part of the vocabulary"):
        _dense(flat([[(0, -1.0), (1, -2.0)]]), 0, 1, 3)


def test_an_fp8_kv_cache_on_a_head_size_cpu_attention_cannot_store_skips_with_the_reason(embedded_folder):
    head = json.loads((embedded_folder / "config.json").read_text())["head_dim"]
    assert head % 32  # the embedded model's 48: vLLM's CPU attention stores fp8 only for multiples of 32
    method = VLLM({"kv_cache_dtype": "fp8"}, "cpu")
    with pytest.raises(MethodUnavailable, match=f"divisible by 32; this model's head size is {head}"):
        method._check_model(embedded_folder)
    VLLM({"kv_cache_dtype": "fp8"}, "cuda")._check_model(embedded_folder)  # the GPU's attention stores it
    VLLM({}, "cpu")._check_model(embedded_folder)


def test_an_fp8_kv_cache_on_an_x86_cpu_without_avx512_or_amx_skips_with_the_reason(tmp_path, monkeypatch):
    from harness.methods import vllm

    (tmp_path / "config.json").write_text(json.dumps({"head_dim": 64, "hidden_size": 576, "num_attention_heads": 9}))
    monkeypatch.setattr(vllm, "_cpu_fp8_kv_isa", lambda: False)
    with pytest.raises(MethodUnavailable, match="AVX-512 or AMX"):
        VLLM({"kv_cache_dtype": "fp8"}, "cpu")._check_model(tmp_path)
    VLLM({}, "cpu")._check_model(tmp_path)  # a bf16 cache needs neither
    VLLM({"kv_cache_dtype": "fp8"}, "cuda")._check_model(tmp_path)
    monkeypatch.setattr(vllm, "_cpu_fp8_kv_isa", lambda: True)
    VLLM({"kv_cache_dtype": "fp8"}, "cpu")._check_model(tmp_path)  # head size 64 and the ISA: it runs


def test_a_quantized_method_without_an_llmcompressor_environment_skips_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.delenv(PYTHON_VAR, raising=False)
    assert "set QUANTBENCH_LLMCOMPRESSOR_PYTHON" in missing_builder()
    monkeypatch.setenv(PYTHON_VAR, str(tmp_path / "no-python"))
    assert "is not an interpreter" in missing_builder()
    method = VLLM({"quantization": "w4a16"}, "cpu")
    with pytest.raises(MethodUnavailable, match="vllm is not installed" if not HAS_VLLM else "not an interpreter"):
        method.check_available()


def test_a_folder_that_is_not_compressed_tensors_is_refused_naming_its_config(embedded_folder, tmp_path):
    with pytest.raises(CompressedError, match=r"config.json: quantization_config.quant_method is None"):
        check_compressed(embedded_folder)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CompressedError, match=f"{tmp_path / 'config.json'}: not a readable model config"):
        check_compressed(tmp_path)


@pytest.fixture(scope="module")
def engine(embedded_folder):
    if not HAS_VLLM:
        pytest.skip("vllm is not installed (tox -e vllm)")
    method = VLLM({**SMALL, "dtype": "bfloat16"}, "cpu")
    model = method.load(str(embedded_folder))
    method.verify(model, generated=False)
    return method, model


@needs_vllm
def test_vllm_log_probabilities_are_torchs_distribution_on_the_same_ids(engine, embedded_folder):
    """The accuracy columns compare figure for figure: vLLM's log-probabilities of the ids the torch rows
    score are the bf16 torch model's log-softmax, to bf16 rounding, and pick the same token almost always."""
    import torch
    from transformers import AutoModelForCausalLM

    method, model = engine
    ids = [int(i) for i in np.random.default_rng(0).integers(3, model.vocab, 200)]
    ours = method.logits(model, ids)
    assert ours.shape == (len(ids), model.vocab) and ours.dtype == np.float32
    np.testing.assert_allclose(np.exp(ours).sum(axis=1), 1.0, atol=1e-3)  # log-probabilities, not raw logits
    hf = AutoModelForCausalLM.from_pretrained(embedded_folder, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        theirs = log_softmax(hf(torch.tensor([ids])).logits[0].float().numpy())
    assert np.abs(ours - theirs).max() < 0.25  # bf16 models that round differently, not another distribution
    assert np.mean(ours.argmax(axis=1) == theirs.argmax(axis=1)) > 0.95
    assert np.allclose(log_softmax(ours), ours, atol=1e-5)  # the suite's log-softmax leaves them unchanged


@needs_vllm
def test_generate_and_greedy_agree_and_vllms_own_timing_cross_checks_the_suites(engine):
    method, model = engine
    rows = [list(range(5, 69)), list(range(100, 164))]
    streamer = SimpleNamespace(times=[], put=lambda ids: streamer.times.append(ids))
    method.generate(model, rows, 8, streamer)
    assert streamer.times[0] == rows and streamer.times[1:] == list(range(1, 9))  # prompt, then each token
    perf = model.last_perf
    assert perf["batch_size"] == 2 and perf["vllm_decode_ms"] > 0 and perf["host_decode_ms"] > 0
    ids, scores = method.greedy(model, rows, 8)
    assert [len(row) for row in ids] == [8, 8] and scores.shape == (2, 8, model.vocab)
    assert all(scores[r, s].argmax() == ids[r][s] for r in range(2) for s in range(8))
    model.perf_unverified = [{**perf, "relative_difference": 0.5}]
    with pytest.raises(RuntimeError, match="vLLM's own decode time"):
        method.verify(model, generated=True)
    described = method.describe(model)
    assert described["linear_kernels"] == {"UnquantizedLinearMethod": 4 * 4}  # qkv, o, gate_up, down per layer
    assert "community build" in described["vllm_distribution"] or described["vllm_distribution"] == "vllm"


@needs_vllm
@pytest.mark.skipif(not os.environ.get(PYTHON_VAR), reason=f"no llmcompressor environment ({PYTHON_VAR})")
def test_a_w4a16_checkpoint_is_built_once_and_every_layer_runs_vllms_int4_kernel(embedded_folder, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    method = VLLM({**SMALL, "quantization": "w4a16", "group_size": 64, "kernel": "CPUWNA16LinearKernel"}, "cpu")
    resolved = SimpleNamespace(pretrained=str(embedded_folder))
    built = method.prepare(resolved, 0, lambda message: None)
    assert built["fresh"] and built["scheme"] == "w4a16" and built["llmcompressor"].startswith("0.14")
    again = method.prepare(resolved, 0, lambda message: None)
    assert not again["fresh"] and again["checkpoint"] == built["checkpoint"]
    method.prepared = again
    model = method.load(str(embedded_folder))
    method.verify(model, generated=False)
    assert model.layers["kernels"] == {"CPUWNA16LinearKernel": 16} and not model.layers["unquantized"]
    wrong = VLLM({**method.params, "kernel": "MarlinLinearKernel"}, "cpu")
    with pytest.raises(RuntimeError, match="kernel 'MarlinLinearKernel' was asked for"):
        wrong.verify(model, generated=False)
