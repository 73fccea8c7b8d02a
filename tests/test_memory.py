"""Memory tracking: host peaks always; torch is asked only for methods that run on the device through torch."""

import torch

from harness.measure import memory
from harness.methods.gguf import GGUFMethod


def test_host_peaks_are_recorded_on_the_cpu():
    with memory.track_memory("cpu") as out:
        block = bytearray(64 * 2**20)  # 64 MiB touched while tracked
        block[::4096] = b"x" * len(block[::4096])
    assert out["peak_rss_mib"].value > 64
    assert "peak_vram_mib" not in out
    assert out["protocol"] == memory.MEMORY_PROTOCOL_DEFAULT  # the host's reading never changed


def test_an_engine_with_its_own_runtime_never_touches_torch_cuda(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda was called: it would create a CUDA context of its own")

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(memory, "nvml_reader", lambda processes: None)  # no GPU here: NVML would be the only reader
    with memory.track_memory("cuda", torch_allocator=False) as out:
        pass
    assert "peak_vram_mib" not in out and "peak_rss_mib" in out
    assert GGUFMethod.RUNTIME.torch_allocator is False and not GGUFMethod.RUNTIME.torch_in_measured_process
    assert out["protocol"] == memory.MEMORY_PROTOCOL_DEFAULT  # no torch cache to empty: read as before


def test_the_allocators_cache_is_emptied_before_nvml_starts(monkeypatch):
    """NVML counts the blocks torch's allocator caches: they are returned before the tracked block, so its
    NVML peak is its own and not what earlier work in the process left behind."""
    calls = []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20)

    def reader():
        calls.append("nvml")
        return 5 * 2**20

    monkeypatch.setattr(memory, "nvml_reader", lambda processes: (reader, "process"))
    with memory.track_memory("cuda") as out:
        pass
    assert calls.index("empty_cache") < calls.index("reset_peak_memory_stats") < calls.index("nvml")
    assert out["peak_vram_mib"].value == 3 and out["peak_nvml_mib"].value == 5 and out["nvml_scope"] == "process"
    assert out["protocol"] == memory.MEMORY_PROTOCOL_TORCH == 2


def test_host_peaks_over_the_process_tree_count_a_childs_memory():
    """An engine that runs processes of its own (vLLM's engine core) has their memory in its host figures."""
    import subprocess
    import sys

    code = "import sys, time; block = bytearray(96 * 2**20); block[::4096] = b'x' * len(block[::4096]); " \
           "print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with memory.track_memory("cpu") as alone:
            pass
        with memory.track_memory("cpu", host_processes=memory.NvmlProcesses.TREE) as tree:
            pass
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert tree["peak_rss_mib"].value >= alone["peak_rss_mib"].value + 90
    assert tree["peak_anon_rss_mib"].value >= alone["peak_anon_rss_mib"].value + 90
