"""The gguf backend: conversion, quantization, cache, logits against the HF model, batched decoding."""

import json
import os
import statistics
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the 'gguf' extra)")
pytest.importorskip("gguf", reason="the gguf package is not installed (the 'gguf' extra)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import embedded  # noqa: E402
from harness.config import AccuracyConfig, MatrixError  # noqa: E402
from harness.gguf import GGUFError, check_gguf, gguf_file, read_sidecar  # noqa: E402
from harness.measure.accuracy import perplexity  # noqa: E402
from harness.measure.throughput import TimingStreamer  # noqa: E402
from harness.methods.gguf import GGUFMethod  # noqa: E402

QTYPES = ("f16", "q8_0", "q4_0", "q4_K_M", "q5_K_M")


@pytest.fixture(scope="module")
def embedded_folder():
    return embedded.build(log=lambda message: None)  # the default cache: trained once per machine


@pytest.fixture(scope="module")
def cache(tmp_path_factory, embedded_folder):
    """A private QUANTBENCH_CACHE for GGUF files and the synthetic model (the embedded one is already built)."""
    root = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTBENCH_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny_folder(cache):
    from harness.models import synthetic_folder

    return synthetic_folder("tiny-test", 0, log=lambda message: None)


def load(folder, **params):
    method = GGUFMethod({"perf_tolerance": 1.0, **params}, "cpu")
    return method, method.load(str(folder))


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def random_ids(vocab, n=160, seed=0):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("qtype", QTYPES)
def test_each_qtype_converts_loads_and_gives_logits(tiny_folder, qtype):
    method, model = load(tiny_folder, qtype=qtype)
    logits = method.logits(model, random_ids(1024, n=40))
    assert logits.shape == (40, 1024) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    info = method.describe(model)
    assert info["qtype"] == qtype and info["vocab"] == "placeholder" and "CPU :" in info["system_info"]
    assert info["tokenizer_parity"]["status"] == "not compared"
    assert info["n_gpu_layers"] == 0 and info["file_size_bytes"] == read_sidecar(model.path)["size"]
    assert info["convert_s"] > 0 and (info["quantize_s"] > 0) == (qtype != "f16")


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_f16_logits_match_the_hf_fp32_model(which, tiny_folder, embedded_folder):
    """Validates the conversion, the q/k permutation above all: f16 weights change logits only slightly."""
    folder = tiny_folder if which == "tiny" else embedded_folder
    method, model = load(folder, qtype="f16")
    ids = random_ids(model.n_vocab)
    ours, reference = method.logits(model, ids), hf_logits(folder, ids)
    assert np.abs(ours - reference).max() < 0.005 * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_without_the_permutation_logits_diverge(which, tiny_folder, embedded_folder, tmp_path, monkeypatch):
    """The check above can fail: the same conversion without llama.cpp's q/k permutation is off."""
    import harness.gguf as conversion

    folder = tiny_folder if which == "tiny" else embedded_folder
    monkeypatch.setattr(conversion, "permute", lambda weights, n_head, n_head_kv: weights)
    unpermuted = tmp_path / "unpermuted.gguf"
    conversion.convert_to_gguf(folder, unpermuted, log=lambda message: None)
    method, model = load(folder, file=str(unpermuted))
    ids = random_ids(model.n_vocab)
    ours, reference = method.logits(model, ids), hf_logits(folder, ids)
    assert np.abs(ours - reference).max() > 0.01 * np.abs(reference).max()


def test_q8_0_perplexity_is_close_to_hf_fp32(embedded_folder):
    from transformers import AutoTokenizer

    from harness.models import heldout_ids

    ids = heldout_ids(AutoTokenizer.from_pretrained(embedded_folder))[:1024]
    accuracy = AccuracyConfig(context_tokens=256, stride=128, max_eval_tokens=1024)
    reference = perplexity(lambda window: hf_logits(embedded_folder, window), ids, accuracy).ppl
    method, model = load(embedded_folder, qtype="q8_0")
    ours = perplexity(lambda window: method.logits(model, window), ids, accuracy).ppl
    assert abs(ours / reference - 1) < 0.03, (ours, reference)


def test_tokenizer_parity_is_recorded(embedded_folder):
    method, model = load(embedded_folder, qtype="q8_0")
    parity = method.describe(model)["tokenizer_parity"]
    assert parity["status"] == "match", parity
    assert parity["hf_tokens"] == parity["llama_cpp_tokens"] > 100


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_batched_rows_equal_rows_generated_alone(embedded_folder, qtype):
    method, model = load(embedded_folder, qtype=qtype)
    rows = [random_ids(model.n_vocab, n=24, seed=seed) for seed in range(4)]
    streamer = TimingStreamer()
    method.generate(model, rows, 12, streamer)
    batched = model.last_tokens
    assert batched.shape == (4, 12) and len(streamer.times) == 12 + 1
    for i, row in enumerate(rows):
        method.generate(model, [row], 12, None)
        assert model.last_tokens.shape == (1, 12)
        assert model.last_tokens[0].tolist() == batched[i].tolist(), f"row {i}"


def test_tokens_chosen_on_the_device_equal_the_host_argmax(embedded_folder):
    """llama.cpp's backend greedy sampler (token_choice "device") picks what numpy's argmax of the logits
    picks, and what the logits-returning path (batch consistency) picks, also across a prefill that is split
    into several llama_decode calls (a prompt longer than n_batch); switching kinds of context keeps that."""
    rows = [random_ids(4096, n=n, seed=seed) for seed, n in enumerate((24, 40, 300))]
    chosen = {}
    for choice in ("device", "host"):
        method, model = load(embedded_folder, qtype="q8_0", token_choice=choice, n_batch=128, n_ubatch=128)
        rows = [[i % model.n_vocab for i in row] for row in rows]
        method.generate(model, rows, 10, None)
        assert model.sampled is (choice == "device") and len(model.samplers) == (model.n_seq_max if
                                                                                 choice == "device" else 0)
        chosen[choice] = model.last_tokens.tolist()
        scored, scores = method.greedy(model, rows, 10)
        assert not model.sampled and model.samplers == []  # the logits path left the sampled context
        assert scored == chosen[choice] and np.asarray(scores).argmax(axis=2).tolist() == scored
        method.generate(model, rows, 10, None)  # back to a sampled context, with the same result
        assert model.last_tokens.tolist() == chosen[choice]
        assert method.describe(model)["token_choice"] == choice
    assert chosen["device"] == chosen["host"]


@pytest.mark.parametrize("which", ["embedded", "tiny"])
def test_a_row_mixup_fails_batch_consistency_even_at_the_gpu_tolerance(which, embedded_folder, tiny_folder):
    """llama.cpp on CUDA is batch-variant (harness/methods/gguf.py), so its consistency tolerance is wider there.
    A batching bug still fails under it: feeding each row its neighbour's token moves the logits by several
    standard deviations, on the trained model and on random weights alike; the clean run passes."""
    from harness.measure import consistency
    from harness.methods.gguf import CUDA_CONSISTENCY_TOLERANCE

    assert GGUFMethod({}, "cuda").consistency_tolerance() == CUDA_CONSISTENCY_TOLERANCE
    assert GGUFMethod({}, "cpu").consistency_tolerance() == consistency.LOGIT_TOLERANCE
    method, model = load(embedded_folder if which == "embedded" else tiny_folder, qtype="q8_0")
    prompts = [random_ids(model.n_vocab, n=n, seed=seed) for seed, n in enumerate(consistency.prompt_lengths(64))]

    def check():
        return consistency.check(lambda rows, n: method.greedy(model, rows, n), prompts, 16,
                                 logit_tolerance=CUDA_CONSISTENCY_TOLERANCE)

    assert check()["consistent"]
    run = method._run

    def mixed_up(model, n_outputs):
        k = model.batch.n_tokens
        if 1 < k == n_outputs <= len(prompts):  # a decode step of several rows: each gets its neighbour's token
            model.tokens[:k] = np.roll(model.tokens[:k].copy(), 1)
        return run(model, n_outputs)

    method._run = mixed_up
    report = check()
    assert not report["consistent"]
    gaps = [row["relative_gap"] for row in report["rows"] if not row["consistent"]]
    assert gaps and min(gaps) > CUDA_CONSISTENCY_TOLERANCE, report["rows"]


def test_perf_counters_are_recorded_and_checked(embedded_folder):
    method, model = load(embedded_folder, qtype="q4_K_M")
    method.generate(model, [random_ids(model.n_vocab, n=32)] * 2, 16, None)
    perf = model.last_perf
    assert perf["n_p_eval"] >= 2 * 32 and perf["llama_decode_ms"] > 0 and perf["host_decode_ms"] > 0
    assert method.describe(model)["perf_check"]["mean_relative_difference"] == perf["relative_difference"]
    method.verify(model, generated=True)  # perf_tolerance 1.0 here
    method.params["perf_tolerance"] = 1e-9
    method.generate(model, [random_ids(model.n_vocab, n=32)], 16, None)
    with pytest.raises(RuntimeError, match=r"llama.cpp's own decode time \(.* ms, llama_perf_context\) and "
                                           r"the suite's \(.* ms\) differ: median relative difference"):
        method.verify(model, generated=True)


def test_engine_timing_reads_llama_cpps_own_timer_over_the_timed_calls(embedded_folder):
    method, model = load(embedded_folder, qtype="q4_0")
    assert method.engine_timing(model, 2, 3) is None  # nothing generated yet: no engine figure
    for rows in (1, 2, 2, 2):
        method.generate(model, [random_ids(model.n_vocab, n=24)] * rows, 8, None)
    method.generate(model, [random_ids(model.n_vocab, n=24)] * 2, 1, None)  # a 1-token call has no decode
    timing = method.engine_timing(model, 2, 3)
    calls = [c for c in model.perf_history if c["batch_size"] == 2 and c["new_tokens"] > 1]
    assert timing.how.value == "engine_timer" and timing.steps == 7 and timing.prompt_tokens == 24
    assert timing.burst_s == tuple(c["llama_decode_ms"] / 1000 for c in calls)
    figures = timing.figures(decode_s=(0.5,), decode_steps=7)
    assert figures["decode_device_tokens_per_s"].value == pytest.approx(
        statistics.median(2 * 7 / (c["llama_decode_ms"] / 1000) for c in calls))
    assert figures["prefill_device_tokens_per_s"].value > 0 and "host_overhead_ms_per_token" in figures
    assert method.engine_timing(model, 2, 4) is None  # three timed calls of two rows, not four
    assert timing.details()["flash_attn"] == "auto" and "llama_perf_context" in timing.details()["timer"]


@pytest.mark.parametrize("flash_attn", ["on", "off", "auto"])
def test_the_flash_attention_setting_reaches_llama_cpp_and_keeps_the_tokens(embedded_folder, flash_attn, monkeypatch):
    import llama_cpp

    asked = []
    init = llama_cpp.llama_init_from_model

    def recording(model, params):
        asked.append(params.flash_attn_type)
        return init(model, params)

    monkeypatch.setattr(llama_cpp, "llama_init_from_model", recording)
    method, model = load(embedded_folder, qtype="q8_0", flash_attn=flash_attn)
    ids = [random_ids(model.n_vocab, n=24)]
    method.generate(model, ids, 8, None)
    wanted = {"on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
              "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
    assert asked and set(asked) == {wanted}
    reference, reference_model = load(embedded_folder, qtype="q8_0", flash_attn="off")
    reference.generate(reference_model, ids, 8, None)
    assert model.last_tokens.tolist() == reference_model.last_tokens.tolist()
    assert method.describe(model)["flash_attn"] == flash_attn
    with pytest.raises(MatrixError, match="flash_attn"):
        GGUFMethod.validate({"flash_attn": True}, "methods.gguf-x")


def test_cache_is_reused_and_a_truncated_file_rebuilt(tiny_folder):
    logs = []
    path = gguf_file(tiny_folder, "q4_0", log=logs.append)
    mtime = path.stat().st_mtime_ns
    logs.clear()
    assert gguf_file(tiny_folder, "q4_0", log=logs.append) == path
    assert path.stat().st_mtime_ns == mtime and any("cached" in line for line in logs)
    assert not any("quantizing" in line for line in logs)

    size = path.stat().st_size
    os.truncate(path, size // 2)
    logs.clear()
    assert gguf_file(tiny_folder, "q4_0", log=logs.append) == path
    assert any("unusable" in line and "size" in line for line in logs), logs
    assert path.stat().st_size == size and read_sidecar(path)["size"] == size
    check_gguf(path)


def test_bad_inputs_name_the_thing(tiny_folder, tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(GGUFError, match="missing.gguf"):
        load(tiny_folder, file=str(missing))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GGUFError, match="weights.gguf.* is not a GGUF file"):
        load(tiny_folder, file=str(not_gguf))
    with pytest.raises(MatrixError, match=r"methods\.bad\.qtype: expected one of .*q4_K_M.*got 'q3_K'"):
        GGUFMethod.validate({"qtype": "q3_K"}, "matrix.toml: methods.bad")
    with pytest.raises(GGUFError, match="unknown GGUF qtype 'q3_K'; supported: f16, q8_0"):
        gguf_file(tiny_folder, "q3_K")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported.*supported: llama, mistral"):
        load(gpt2, qtype="q8_0")


def test_end_to_end_through_the_worker(tiny_job, cache):
    from harness.isolation import run_isolated

    job = tiny_job(method_class="harness.methods.gguf:GGUFMethod", batch_sizes=(1, 4))
    job["method"] = {"name": "gguf-q8_0", "backend": "gguf",
                     "params": {"qtype": "q8_0", "n_threads": 1, "perf_tolerance": 1.0}}
    env = {"QUANTBENCH_CACHE": str(cache)}
    refused = run_isolated(job, timeout_s=120, env=env)
    assert refused.status == "error" and "run the job with prepare_only and prepare_method first" in refused.reason
    prepared = run_isolated({**job, "prepare_only": True, "prepare_method": True}, timeout_s=120, env=env)
    assert prepared.status == "ok", prepared.reason or prepared.log_tail
    inputs = prepared.prepared["inputs"]
    assert len(inputs["prompt_ids"]) == 4 and len(inputs["eval_ids"]) == job["accuracy"]["max_eval_tokens"]
    outcome = run_isolated({**job, "prepared": prepared.prepared}, timeout_s=120, env=env)
    assert outcome.status == "ok", outcome.reason or outcome.log_tail
    assert "torch refused" in outcome.log_tail  # the measured process ran with torch imports refused
    per_model = outcome.result(None)
    assert "inputs" not in per_model.details["quantization"]
    assert per_model.figures["ppl"].value > 1
    assert per_model.details["method"]["perf_check"] is not None
    assert per_model.details["batch_consistency"]["consistent"] is True  # greedy(): rows of different lengths
    for batch_size in (1, 4):
        cell = outcome.result(batch_size)
        assert cell.error is None and cell.figures["decode_tokens_per_s"].value > 0
        assert cell.details["method"]["n_seq_max"] >= batch_size
        assert cell.details["measured_at"] >= per_model.details["measured_at"]  # ISO times, stamped in order
    assert Path(per_model.details["method"]["file"]).is_relative_to(cache)


def test_prepare_builds_the_file_and_load_only_reads_it(tiny_folder, monkeypatch):
    from types import SimpleNamespace

    import harness.methods.gguf as backend

    method = GGUFMethod({"qtype": "q4_0"}, "cpu")
    method.prepared = method.prepare(SimpleNamespace(pretrained=str(tiny_folder)), 0, lambda message: None)
    assert method.prepared["file"].endswith("q4_0.gguf") and method.prepared["quantize_s"] > 0
    monkeypatch.setattr(backend, "gguf_file", lambda *args, **kwargs: pytest.fail("load converted again"))
    model = method.load(str(tiny_folder))
    assert str(model.path) == method.prepared["file"]
    assert method.describe(model)["qtype"] == "q4_0"
