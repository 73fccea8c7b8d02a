"""Each (method, model) runs in its own process: crashes, hangs and OOM become results, not lost runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


PARENT = """
import json, sys
from harness.isolation import run_isolated
try:
    run_isolated(json.load(open(sys.argv[1])), timeout_s=600, env=json.load(open(sys.argv[2])))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def _alive(pid):
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid, seconds):
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_run_leaves_no_worker_behind(tiny_job, worker_env, tmp_path, stop):
    """Ctrl-C, `timeout` (SIGTERM) or SIGKILL sent to the run alone: its worker, in a session of its own that no
    such signal reaches, must not go on measuring (and holding a device) after the run is gone."""
    pid_file = tmp_path / "worker.pid"
    (tmp_path / "job.json").write_text(json.dumps(tiny_job("isolation_methods:HangWithPidMethod")))
    (tmp_path / "env.json").write_text(json.dumps({**worker_env, "QUANTBENCH_TEST_PID_FILE": str(pid_file)}))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "job.json"), str(tmp_path / "env.json")],
                              env={**os.environ, "PYTHONPATH": worker_env["PYTHONPATH"]}, stdout=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.is_file() or not pid_file.read_text():
            assert parent.poll() is None and time.monotonic() < deadline, "the worker never started its load"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.send_signal(stop)
        parent.wait(timeout=60)
        assert _gone_within(worker, 30), f"worker {worker} outlived its run (stopped with {stop.name})"
        if stop is signal.SIGINT:  # the run saw its interrupt after the worker was killed
            assert parent.stdout.read().strip() == "interrupted"
    finally:
        parent.kill()
        if pid_file.is_file() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
