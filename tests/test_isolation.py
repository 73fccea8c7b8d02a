"""Each (method, model) runs in its own process: crashes, hangs and OOM become results, not lost runs."""

from harness.isolation import run_isolated


def test_a_healthy_cell_returns_per_model_and_per_batch_results(tiny_job, worker_env):
    outcome = run_isolated(tiny_job(batch_sizes=(1, 2)), timeout_s=120, env=worker_env)
    assert outcome.status == "ok", outcome.log_tail
    assert outcome.result(None).figures["ppl"].value > 1
    for batch_size in (1, 2):
        figures = outcome.result(batch_size).figures
        assert figures["decode_tokens_per_s"].value > 0
        assert figures["decode_tokens_per_s"].n == 2
        assert figures["peak_rss_mib"].value > 0
        assert 0 < figures["peak_anon_rss_mib"].value < figures["peak_rss_mib"].value
        assert outcome.result(batch_size).details["memory_protocol"] == 1  # how the memory was read
        assert "gpu_telemetry" not in outcome.result(batch_size).details  # a CPU cell: no GPU to read


def test_a_crashing_cell_fails_with_the_signal(tiny_job, worker_env):
    outcome = run_isolated(tiny_job("isolation_methods:CrashMethod"), timeout_s=120, env=worker_env)
    assert outcome.status == "crashed"
    assert "SIGSEGV" in outcome.reason
    assert outcome.results == []
    # the log names the Python line the native crash happened under
    assert "Segmentation fault" in outcome.log_tail
    assert 'isolation_methods.py", line 14 in load' in outcome.log_tail


def test_a_hanging_cell_is_killed_at_its_timeout(tiny_job, worker_env):
    outcome = run_isolated(tiny_job("isolation_methods:HangMethod"), timeout_s=15, env=worker_env)
    assert outcome.status == "timeout"
    assert "15 s" in outcome.reason
    assert outcome.wall_s < 60
    assert 'isolation_methods.py", line 21 in load' in outcome.log_tail  # where it hung


def test_out_of_memory_fails_only_the_batch_sizes_that_ran_out(tiny_job, worker_env):
    outcome = run_isolated(tiny_job("isolation_methods:OomAtBatch2Method", batch_sizes=(1, 2)), timeout_s=120,
                           env=worker_env)
    assert outcome.status == "ok", outcome.log_tail
    assert outcome.result(1).error is None
    assert outcome.result(1).figures["decode_tokens_per_s"].value > 0
    assert "out of memory at batch size 2" in outcome.result(2).error


def test_an_unavailable_method_is_skipped_with_the_reason(tiny_job, worker_env):
    outcome = run_isolated(tiny_job("isolation_methods:UnavailableMethod"), timeout_s=120, env=worker_env)
    assert outcome.status == "skipped"
    assert "a_library_that_is_not_installed is not installed" in outcome.reason


def test_prepare_runs_in_its_own_process_and_hands_its_record_to_the_measured_one(tiny_job, worker_env):
    job = tiny_job("isolation_methods:PreparingMethod")
    prepared = run_isolated({**job, "prepare_only": True, "prepare_method": True}, timeout_s=120, env=worker_env)
    assert prepared.status == "ok", prepared.log_tail
    assert prepared.results == []
    assert prepared.prepared["quantize_s"] == 1.5 and prepared.prepared["peak_mib"] > 0
    # kernels are compiled after prepare's figures were taken, with the prepared record in hand
    assert prepared.prepared["kernels"] == {"kernel_warm_s": 0.25, "saw_checkpoint": True}
    measured = run_isolated({**job, "prepared": prepared.prepared}, timeout_s=120, env=worker_env)
    assert measured.status == "ok", measured.log_tail
    cell = measured.result(None)
    assert cell.figures["quantize_s"].value == 1.5
    assert cell.figures["quantize_peak_anon_rss_mib"].value == prepared.prepared["peak_mib"]
    assert cell.details["quantization"]["kernels"]["kernel_warm_s"] == 0.25


def test_the_gpu_paths_of_an_engine_without_torch_never_import_it():
    """What a torch-free measured process runs on a GPU runner (device facts, NVML memory tracking, the host
    clock) works with torch refused, and an import of torch is refused with the reason."""
    import subprocess
    import sys

    code = """
import sys
from harness.worker import refuse_torch
refuse_torch("GGUFMethod")
from harness.hardware import environment, machine_info
from harness.measure.memory import track_memory
from harness.measure.throughput import timed
with track_memory("cuda", False) as memory, timed("cpu") as seconds:
    sum(range(1000))
env = environment()
info = machine_info("cpu")
assert "torch" not in sys.modules and seconds[0] > 0 and "peak_rss_mib" in memory and "torch_cuda" not in env
try:
    import torch  # noqa: F401
except ImportError as exc:
    print("refused:", exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: import of 'torch' refused: GGUFMethod is measured in a process without torch" in done.stdout
