"""Run one (method, model) in its own process: clean peak memory, and crashes, OOM and hangs become results.

The batch sizes of one (method, model) share the worker's single load. Whatever the worker wrote before
it died is kept; the batch sizes it never reached get an error naming what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.results import WORKER_PARENT_VAR, CellResult, WorkerStatus, pool_results

LOG_TAIL_CHARS = 4000
STACK_DUMP_WAIT_S = 2  # a hung worker's time to write its stacks before it is killed


@dataclass
class Outcome:
    """What came back from one worker: results per cell, or why there are none."""

    status: str  # a WorkerStatus
    reason: str | None = None
    results: list[CellResult] = field(default_factory=list)
    log_tail: str = ""
    wall_s: float = 0.0
    prepared: dict[str, Any] | None = None  # a prepare job's record of what it built
    store_error: str | None = None  # the worker measured, but its figures could not become baselines
    notes: list[str] = field(default_factory=list)  # what storing its figures did besides (a file moved aside)

    def result(self, batch_size: int | None) -> CellResult | None:
        """The result of one batch size (None: the per-model figures), if the worker produced it."""
        for result in self.results:
            if result.batch_size == batch_size:
                return result
        return None

    def pool(self, again: Outcome) -> None:
        """Pool each result's repeated figures with the same batch size's from `again`, another process's run
        of the same job; a result either run could not measure stays as this run has it."""
        self.results = pool_results(self.results, again.results)
        self.wall_s += again.wall_s


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _looks_like_oom(log: str) -> bool:
    return any(s in log for s in ("OutOfMemoryError", "CUDA out of memory", "MemoryError", "std::bad_alloc"))


def _dump_stacks(process: subprocess.Popen) -> None:
    """Ask a hung worker for its Python stacks (its faulthandler writes them to the log), then give it a moment."""
    try:
        process.send_signal(signal.SIGUSR1)
        process.wait(timeout=STACK_DUMP_WAIT_S)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the worker and anything it started; a worker that already exited leaves no group to kill."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_isolated(job: dict[str, Any], timeout_s: float, env: dict[str, str] | None = None) -> Outcome:
    """Run `python -m harness.worker` on `job` with a wall-clock limit; never raises for worker failures."""
    with tempfile.TemporaryDirectory(prefix="quantbench-cell-") as tmp:
        job_path, out_path, log_path = Path(tmp, "job.json"), Path(tmp, "out.json"), Path(tmp, "worker.log")
        job_path.write_text(json.dumps(job))
        start = time.perf_counter()
        with open(log_path, "wb") as log:
            # A new session lets a timeout kill the worker and anything it started (compilers, threads). It
            # also keeps the worker out of the terminal's Ctrl-C and out of a signal sent to the run alone
            # (`timeout`, a CI runner's cancel): an interrupted run kills it here, and a run killed outright
            # takes it along through the worker's parent-death signal (harness/worker.py), so
            # no orphan goes on measuring on the device the next run measures on.
            process = subprocess.Popen([sys.executable, "-m", "harness.worker", str(job_path), str(out_path)],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, **(env or {}), WORKER_PARENT_VAR: str(os.getpid())})
            try:
                returncode = process.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _dump_stacks(process)
                _kill_group(process)
                returncode = process.returncode
                timed_out = True
            except BaseException:  # KeyboardInterrupt, SystemExit: the run stops, and its worker with it
                _kill_group(process)
                raise
        wall = time.perf_counter() - start
        log_text = log_path.read_text(errors="replace")
        data = json.loads(out_path.read_text()) if out_path.is_file() else {"status": WorkerStatus.CRASHED,
                                                                              "results": []}

    outcome = Outcome(status=data.get("status", WorkerStatus.CRASHED), reason=data.get("reason"),
                      results=[CellResult.from_dict(r) for r in data.get("results", [])],
                      log_tail=log_text[-LOG_TAIL_CHARS:], wall_s=wall, prepared=data.get("prepared"))
    if timed_out:
        outcome.status = WorkerStatus.TIMEOUT
        outcome.reason = f"worker still running after {timeout_s:g} s (cell_timeout_s) and was killed"
    elif outcome.status == WorkerStatus.RUNNING or (returncode != 0 and outcome.status == WorkerStatus.OK):
        outcome.status = WorkerStatus.CRASHED
        cause = "out of memory" if _looks_like_oom(log_text) else "crashed"
        outcome.reason = f"worker {cause} ({_describe_exit(returncode)})"
    elif outcome.status == WorkerStatus.ERROR and _looks_like_oom(log_text):
        outcome.reason = f"out of memory: {outcome.reason}"
    return outcome
