"""Engine runtimes: what differs between engines for the worker that measures them, declared once per runtime.

A method names its runtime (`Method.RUNTIME`); the worker asks the runtime how to read the block's memory,
how to wait for the device, which exceptions mean out of memory and whether torch may be loaded, and never
branches on the engine. Two runtimes exist: `TORCH`, for the methods torch drives on the device (transformers'
modelling code, torch's allocator and streams), `NATIVE`, for an engine with a CUDA runtime and an
allocator of its own (llama.cpp), which is measured in a process without torch (harness/worker.py's docstring
says why), and `VLLM`, for vLLM (below). A new engine either names one of them or declares its own
`EngineRuntime`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from harness.measure.memory import NvmlProcesses


def _no_errors() -> tuple[type[BaseException], ...]:
    return ()


def _torch_out_of_memory() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,)


@dataclass(frozen=True)
class EngineRuntime:
    """How the worker measures the engines of one runtime: their memory, their device queue, their failures."""

    name: str
    torch_allocator: bool  # the device memory is torch's: its allocator's peak is read, its cache emptied
    torch_synchronizes: bool  # torch's synchronize waits for the engine's device work (False: calls return done)
    torch_in_measured_process: bool  # False: the measured process refuses torch (its prepare process may use it)
    runs_transformers_models: bool  # the engine runs transformers' modelling code (imported before load is timed)
    nvml_processes: NvmlProcesses = NvmlProcesses.WORKER  # whose NVML usage is the device-memory figure
    host_processes: NvmlProcesses = NvmlProcesses.WORKER  # whose resident set sizes the host-memory figures sum
    out_of_memory: Callable[[], tuple[type[BaseException], ...]] = field(default=_no_errors, repr=False)

    def __post_init__(self) -> None:
        if (self.torch_allocator or self.torch_synchronizes) and not self.torch_in_measured_process:
            raise ValueError(f"runtime {self.name!r}: reading torch's allocator or synchronizing through torch "
                             "needs torch in the measured process (torch_in_measured_process=True)")

    def track_memory(self, device: str) -> AbstractContextManager[dict[str, Any]]:
        """The memory tracker of a block run on `device` by this runtime (harness/measure/memory.py)."""
        from harness.measure.memory import track_memory

        return track_memory(device, self.torch_allocator, self.nvml_processes, self.host_processes)

    def sync_device(self, device: str) -> str:
        """The device whose queue timing waits on through torch (harness/measure/throughput.py): none for an
        engine torch does not drive, whose calls return when the work is done (and where a torch sync would
        create a CUDA context of its own)."""
        return device if self.torch_synchronizes else "cpu"

    def out_of_memory_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean the device ran out of memory (none: the engine reports a failed allocation
        as an error of its own, which fails the cell)."""
        return self.out_of_memory()

    def release_cached_memory(self) -> None:
        """Return what the runtime's allocator caches to the device, after an out-of-memory or a measurement.

        Garbage is collected first: a finished measurement's objects that only reference cycles still hold (a
        captured CUDA graph's pool, a static cache) would otherwise stay allocated into the next batch size's
        memory figure (on an H200 the gate's injected-slowdown run, which captures the step up to four times,
        read each b8 peak_vram_mib 64 MiB above its baseline: run S, docs/evidence/nvidia-h200-140gb).
        """
        if self.torch_allocator:
            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def missing_gpu(self) -> str | None:
        """Why a cell on "cuda" cannot run here (no GPU), or None; asked without touching torch when the
        measured process refuses it."""
        if self.torch_in_measured_process:
            import torch

            return None if torch.cuda.is_available() else "no CUDA GPU on this machine"
        from harness.hardware import gpu_info

        return None if gpu_info() is not None else "no CUDA GPU on this machine (NVML sees none)"


TORCH = EngineRuntime(name="torch", torch_allocator=True, torch_synchronizes=True, torch_in_measured_process=True,
                      runs_transformers_models=True, out_of_memory=_torch_out_of_memory)

NATIVE = EngineRuntime(name="native", torch_allocator=False, torch_synchronizes=False,
                       torch_in_measured_process=False, runs_transformers_models=False,
                       nvml_processes=NvmlProcesses.TREE)

# vLLM imports torch and runs it, but reserves its device memory itself (weights, then a KV cache of a set size)
# and may run its engine core in a process of its own: memory is NVML's and the host's over the worker's process
# tree, never torch's allocator of the worker; its calls return once the ids are on the host.
VLLM = EngineRuntime(name="vllm", torch_allocator=False, torch_synchronizes=False, torch_in_measured_process=True,
                     runs_transformers_models=False, nvml_processes=NvmlProcesses.TREE,
                     host_processes=NvmlProcesses.TREE, out_of_memory=_torch_out_of_memory)
