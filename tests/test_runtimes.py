"""Engine runtimes: NVML over the worker's process tree, and the capabilities the worker asks of a runtime."""

import gc
import os
import subprocess
import time
import weakref
from types import SimpleNamespace

import psutil
import pytest
import torch

from harness import hardware
from harness.measure import memory
from harness.measure.memory import NvmlProcesses
from harness.runtimes import NATIVE, TORCH, EngineRuntime

MIB = 2**20


class FakeNvml:
    """NVML's process list and device total, as a driver would report them."""

    def __init__(self, usage: dict[int, int | None], device_used: int = 10_000 * MIB) -> None:
        self.usage = usage
        self.device_used = device_used

    def nvmlDeviceGetComputeRunningProcesses(self, handle):  # noqa: N802 - NVML's name
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.usage.items()]

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802 - NVML's name
        return SimpleNamespace(used=self.device_used)


@pytest.fixture
def process_tree():
    """A child of this process with a child of its own, as an engine that starts an engine core would have."""
    child = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(child.pid).children() and time.monotonic() < deadline:
            time.sleep(0.01)
        grandchild = psutil.Process(child.pid).children()[0].pid
        yield child.pid, grandchild
    finally:
        for process in psutil.Process(child.pid).children():
            process.kill()
        child.kill()
        child.wait()


def fake_gpu(monkeypatch, usage, **kwargs):
    nvml = FakeNvml(usage, **kwargs)
    monkeypatch.setattr(hardware, "nvml_handle", lambda: (nvml, "handle"))
    return nvml


def test_the_process_tree_reading_sums_the_worker_and_its_descendants(monkeypatch, process_tree):
    child, grandchild = process_tree
    unrelated = os.getppid()
    fake_gpu(monkeypatch, {os.getpid(): 100 * MIB, child: None, grandchild: 300 * MIB, unrelated: 5000 * MIB})
    read, scope = memory.nvml_reader(NvmlProcesses.TREE)
    assert scope == "process" and read() == 400 * MIB  # not the unrelated process, not the child's unknown
    read, scope = memory.nvml_reader(NvmlProcesses.WORKER)
    assert scope == "process" and read() == 100 * MIB


def test_the_tree_is_listed_anew_at_each_reading(monkeypatch, process_tree):
    """An engine core started after the tracked block began is counted from then on."""
    child, grandchild = process_tree
    nvml = fake_gpu(monkeypatch, {os.getpid(): 100 * MIB})
    read, _ = memory.nvml_reader(NvmlProcesses.TREE)
    assert read() == 100 * MIB
    nvml.usage[grandchild] = 700 * MIB
    assert read() == 800 * MIB


def test_a_tree_nvml_cannot_see_reads_the_whole_device(monkeypatch, process_tree):
    """Inside a container NVML often lists pids of another namespace: the device's total is read instead."""
    fake_gpu(monkeypatch, {999_999: 100 * MIB}, device_used=2048 * MIB)
    read, scope = memory.nvml_reader(NvmlProcesses.TREE)
    assert scope == "device" and read() == 2048 * MIB


def test_the_native_runtime_tracks_the_tree_and_never_touches_torch_cuda(monkeypatch, process_tree):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda was called: it would create a CUDA context of its own")

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    _, grandchild = process_tree
    fake_gpu(monkeypatch, {os.getpid(): 64 * MIB, grandchild: 192 * MIB})
    with NATIVE.track_memory("cuda") as out:
        pass
    assert out["peak_nvml_mib"].value == 256 and out["nvml_scope"] == "process"
    assert "peak_vram_mib" not in out and out["protocol"] == memory.MEMORY_PROTOCOL_DEFAULT
    NATIVE.release_cached_memory()  # nothing of torch's to release
    assert NATIVE.sync_device("cuda") == "cpu"  # its calls return when the work is done


def test_the_torch_runtime_reads_torchs_allocator_and_the_workers_own_usage(monkeypatch, process_tree):
    calls = []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * MIB)
    _, grandchild = process_tree
    fake_gpu(monkeypatch, {os.getpid(): 5 * MIB, grandchild: 1000 * MIB})
    with TORCH.track_memory("cuda") as out:
        pass
    assert out["peak_vram_mib"].value == 3 and out["peak_nvml_mib"].value == 5
    assert out["protocol"] == memory.MEMORY_PROTOCOL_TORCH
    assert TORCH.sync_device("cuda") == "cuda" and TORCH.sync_device("cpu") == "cpu"


def test_releasing_memory_collects_what_only_cycles_still_hold_before_emptying_the_cache(monkeypatch):
    class Graph:  # stands for a captured CUDA graph whose pool a finished measurement's closures kept
        pass

    graph = Graph()
    graph.itself = graph  # a reference cycle: refcounting alone never frees it
    alive = weakref.ref(graph)
    seen = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: seen.append(alive() is None))
    gc.disable()
    try:
        del graph
        assert alive() is not None
        TORCH.release_cached_memory()
    finally:
        gc.enable()
    assert seen == [True]  # collected, then the cache emptied


def test_out_of_memory_is_torchs_error_for_torch_and_nothing_for_a_native_engine():
    assert TORCH.out_of_memory_errors() == (torch.OutOfMemoryError,)
    assert NATIVE.out_of_memory_errors() == ()
    # an engine's own allocation failure is an error of its own, which fails the cell instead of one batch size
    assert not issubclass(torch.OutOfMemoryError, NATIVE.out_of_memory_errors())


def test_a_runtime_that_reads_torch_without_torch_is_refused():
    with pytest.raises(ValueError, match="runtime 'broken'.*torch_in_measured_process=True"):
        EngineRuntime(name="broken", torch_allocator=True, torch_synchronizes=False,
                      torch_in_measured_process=False, runs_transformers_models=False)
