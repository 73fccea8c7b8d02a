"""Peak memory while a block runs: torch's allocator, the driver's view (NVML) and the host's RSS."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

from harness.figure import Figure

SAMPLE_INTERVAL_S = 0.005
MIB = 2**20

# How a block's device memory is read, recorded with each figure (`details.memory_protocol`) and compared by
# the gate, so a figure is never held against one read another way. 1: the tracker as first built (and every
# block whose memory is not torch's: the CPU, llama.cpp). 2: torch's allocator cache is emptied before the
# block, so NVML's peak is the block's own (below).
MEMORY_PROTOCOL_TORCH = 2
MEMORY_PROTOCOL_DEFAULT = 1
PROTOCOL_METRICS = ("peak_nvml_mib",)  # the figures a change of protocol reads differently


class _Sampler(threading.Thread):
    """Polls a reading in the background and keeps its maximum."""

    def __init__(self, read: Any) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.peak = read()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, self.read())


def _anon_rss_reader(processes: NvmlProcesses) -> Any | None:
    """A function reading RssAnon from /proc/PID/status (Linux) of `processes`, summed, in bytes."""
    if not os.path.exists("/proc/self/status"):
        return None
    pids = _pids(processes)

    def anon(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:  # a child that exited since it was listed
            pass
        return 0

    return lambda: sum(anon(pid) for pid in pids())


def _rss_reader(processes: NvmlProcesses) -> Any:
    """A function reading the resident set size of `processes`, summed, in bytes."""
    import psutil

    process = psutil.Process(os.getpid())
    if processes is NvmlProcesses.WORKER:
        return lambda: process.memory_info().rss
    pids = _pids(processes)

    def rss(pid: int) -> int:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0

    return lambda: sum(rss(pid) for pid in pids())


class NvmlProcesses(Enum):
    """Whose memory a reading sums: NVML's per-process device memory, or the host's resident set sizes."""

    WORKER = "the worker process"
    TREE = "the worker process and its descendants"  # an engine that runs processes of its own (vLLM's engine core)


def _pids(processes: NvmlProcesses) -> Any:
    """A function returning the pids whose usage `processes` sums, read anew each call (children come and go)."""
    pid = os.getpid()
    if processes is NvmlProcesses.WORKER:
        return lambda: {pid}
    import psutil

    worker = psutil.Process(pid)

    def tree() -> set[int]:
        try:
            return {pid, *(child.pid for child in worker.children(recursive=True))}
        except psutil.Error:  # a child that exits while it is listed
            return {pid}

    return tree


def nvml_reader(processes: NvmlProcesses = NvmlProcesses.WORKER) -> tuple[Any, str] | None:
    """A function reading the device memory of `processes` through NVML, and its scope.

    The scope is `process` when NVML lists one of those processes (their own usage, summed), else `device`
    (all usage on the GPU: inside containers NVML often cannot see the process's pid).
    """
    from harness.hardware import nvml_handle

    found = nvml_handle()
    if found is None:
        return None
    nvml, handle = found
    pids = _pids(processes)

    def process_usage() -> int:
        wanted = pids()
        used = [int(proc.usedGpuMemory) for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if proc.pid in wanted and proc.usedGpuMemory is not None]
        return sum(used) if used else -1

    if process_usage() >= 0:
        return process_usage, "process"
    return (lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).used)), "device"


@contextmanager
def track_memory(device: str, torch_allocator: bool = True, processes: NvmlProcesses = NvmlProcesses.WORKER,
                 host_processes: NvmlProcesses = NvmlProcesses.WORKER) -> Iterator[dict[str, Any]]:
    """Yield a dict that receives peak memory Figures (MiB) for the block, and the NVML scope used.

    `torch_allocator` False: the block's device memory is not torch's (llama.cpp), so torch is left alone
    (asking it would create a CUDA context of its own, which NVML would then count) and NVML alone reports.
    `processes`: whose usage NVML's reading sums, `host_processes`: whose RSS the host figures sum (an engine's
    runtime says: harness/runtimes.py).
    """
    use_torch = device == "cuda" and torch_allocator
    out: dict[str, Any] = {"protocol": MEMORY_PROTOCOL_TORCH if use_torch else MEMORY_PROTOCOL_DEFAULT}
    samplers = {"peak_rss_mib": _Sampler(_rss_reader(host_processes))}
    anon = _anon_rss_reader(host_processes)
    if anon is not None:
        samplers["peak_anon_rss_mib"] = _Sampler(anon)
    if use_torch:
        import torch

        torch.cuda.synchronize()
        # NVML sees what torch's caching allocator holds, not what it has allocated: blocks cached by earlier
        # work in the process (perplexity, the consistency check, a larger batch size) would count towards
        # this block's peak. On the H200, Llama-2-7B fp16 and bf16 at b32 read 1172 MiB (5.4 %) more through
        # NVML than baselines recorded by an earlier revision whose work before the timed runs differed, while
        # torch's peak allocation agreed to 0.5 MiB.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if device == "cuda":
        reader = nvml_reader(processes)
        if reader is not None:
            samplers["peak_nvml_mib"] = _Sampler(reader[0])
            out["nvml_scope"] = reader[1]
    for sampler in samplers.values():
        sampler.start()
    try:
        yield out
    finally:
        if use_torch:
            import torch

            torch.cuda.synchronize()
            out["peak_vram_mib"] = Figure(torch.cuda.max_memory_allocated() / MIB)
        for name, sampler in samplers.items():
            out[name] = Figure(sampler.stop() / MIB)
