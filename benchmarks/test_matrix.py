"""The benchmark matrix: each test names what it gates; the harness measures it in an isolated worker.

Cells come from benchmarks/matrix.toml (or --matrix): `test_decode[bnb-nf4|llama-2-7b-arch|b8]`.
"""

import pytest

from harness.plugin import record_benchmark


def test_prefill(quantbench, request, qb_cell):
    """Prefill throughput and time to first token at this batch size."""
    quantbench.check(request, qb_cell, ["prefill_tokens_per_s", "ttft_ms"])


def test_decode(quantbench, request, qb_cell, benchmark):
    """End-to-end decode throughput of generate() (exactly new_tokens per row, EOS ignored), what users see,
    and the host's share of a step beside the device's; pytest-benchmark gets each repeat."""
    # pytest-benchmark gets the timings before the gate's verdict: a regressed cell shows in its JSON too
    quantbench.check(request, qb_cell, ["decode_tokens_per_s", "host_overhead_ms_per_token"],
                     measured=lambda result: record_benchmark(benchmark, result))


def test_memory(quantbench, request, qb_cell):
    """Peak device memory (torch allocator and NVML) and host memory while this batch size ran."""
    quantbench.check(request, qb_cell, ["peak_vram_mib", "peak_nvml_mib", "peak_anon_rss_mib", "peak_rss_mib"])


def test_load(quantbench, request, qb_model_cell):
    """Time to load (and quantize) the model onto its device."""
    quantbench.check(request, qb_model_cell, ["load_s"])


def test_quantize(quantbench, request, qb_model_cell):
    """What quantizing cost (wall time, peak memory), for methods that quantize in the suite and did so now."""
    quantbench.check(request, qb_model_cell, ["quantize_s", "quantize_peak_vram_mib", "quantize_peak_anon_rss_mib"])


def test_perplexity(quantbench, request, qb_model_cell):
    """Token-level perplexity on the held-out evaluation ids, protocol recorded with the figure."""
    quantbench.check(request, qb_model_cell, ["ppl"])


def test_divergence(quantbench, request, qb_model_cell):
    """KL divergence, top-1 agreement and perplexity ratio against the suite's unquantized reference."""
    quantbench.check(request, qb_model_cell, ["ppl_ratio", "kld_mean", "kld_p99", "kld_max", "top1_agreement"])


def test_batch_consistency(quantbench, qb_model_cell):
    """Greedy tokens of prompts in a left-padded batch equal those of each prompt run alone."""
    quantbench.check_consistency(qb_model_cell)


@pytest.mark.eval
def test_task_accuracy(quantbench, request, qb_model_cell):
    """lm-eval task metrics on the loaded model (run with `-m "<suite> and eval"`; needs the 'eval' extra)."""
    quantbench.check_tasks(request, qb_model_cell)


@pytest.mark.device_time
def test_device_decode(quantbench, request, qb_cell):
    """Device time of a decode step (CUDA events around captured-graph replays, or the kernels' own
    durations), and the kernels the step launches (exact)."""
    quantbench.check(request, qb_cell, ["decode_device_tokens_per_s", "decode_kernels_per_step"])


@pytest.mark.device_time
def test_device_prefill(quantbench, request, qb_cell):
    """Device time of the prefill forward, timed as the decode step is."""
    quantbench.check(request, qb_cell, ["prefill_device_tokens_per_s"])
