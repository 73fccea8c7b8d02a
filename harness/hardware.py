"""Which machine this is: a GPU-aware hardware key for baselines, and the facts that go with each figure."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

# Library versions recorded with every figure; a missing one is recorded as None.
TRACKED_PACKAGES = (
    "torch", "transformers", "accelerate", "safetensors", "tokenizers", "sentencepiece", "bitsandbytes",
    "llama-cpp-python", "gguf", "gptqmodel", "auto-gptq", "autoawq", "lm-eval", "nvidia-ml-py",
    "pytest", "pytest-benchmark", "numpy",
)
CPU_KEY_PREFIX = "cpu-"  # every CPU's hardware key starts so (hardware_key)


def slug(text: str) -> str:
    """Lower-case `text` and keep runs of letters and digits joined by '-'."""
    text = re.sub(r"\((r|tm)\)", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")


def _cpuinfo_field(*names: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `names`, or None (no such file or line)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(names):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or the platform module elsewhere)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


# The vector instructions that decide a CPU kernel's speed, best first: (tier named in the key, the
# /proc/cpuinfo flag that marks it). Machines sold under one model name differ here (an `AMD EPYC` with
# AVX-512 and one without ran the same cells up to 96 % apart), so the tier is part of a CPU's key.
CPU_ISA_TIERS = (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2"), ("sve", "sve"), ("neon", "asimd"))
# The flags recorded with every CPU figure (machine_info), beside the tier they decide.
CPU_VECTOR_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                    "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (`flags` on x86, `Features` on Arm); empty elsewhere."""
    return frozenset((_cpuinfo_field("flags", "Features") or "").split())


def cpu_vector_isa(flags: frozenset[str] | None = None) -> str | None:
    """The best vector-instruction tier of CPU_ISA_TIERS this CPU has (`amx`, `avx512`, `avx2`, ...), or None
    where its flags cannot be read or it has none of them."""
    flags = cpu_flags() if flags is None else flags
    return next((tier for tier, flag in CPU_ISA_TIERS if flag in flags), None)


@functools.lru_cache(maxsize=1)
def nvml() -> Any | None:
    """The initialised pynvml module, or None where there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library: this machine has no NVIDIA GPU to describe
        return None


def nvml_handle() -> tuple[Any, Any] | None:
    """The initialised NVML module and the handle of this process's first visible GPU, if there is one."""
    lib = nvml()
    if lib is None:
        return None
    try:
        return lib, lib.nvmlDeviceGetHandleByIndex(physical_index(0))
    except lib.NVMLError:
        return None


def short_uuid(uuid: Any) -> str | None:
    """`GPU-c37ffd22-ad69-...` as `c37ffd22`: enough to tell the cards of one hardware key apart."""
    return str(uuid).removeprefix("GPU-")[:8] if uuid else None


def gpu_info(index: int = 0) -> dict[str, Any] | None:
    """Name, memory, driver and compute capability of GPU `index` through NVML, without a CUDA context."""
    lib = nvml()
    if lib is None:
        return None
    try:
        if index >= lib.nvmlDeviceGetCount():
            return None
        handle = lib.nvmlDeviceGetHandleByIndex(physical_index(index))
        name = lib.nvmlDeviceGetName(handle)
        memory = lib.nvmlDeviceGetMemoryInfo(handle)
        major, minor = lib.nvmlDeviceGetCudaComputeCapability(handle)
        info = {
            "name": name.decode() if isinstance(name, bytes) else name,
            "memory_mib": memory.total // 2**20,
            "driver": _decode(lib.nvmlSystemGetDriverVersion()),
            "cuda_driver": lib.nvmlSystemGetCudaDriverVersion_v2(),
            "compute_capability": f"{major}.{minor}",
            "uuid": _decode(lib.nvmlDeviceGetUUID(handle)),
            "count": lib.nvmlDeviceGetCount(),
        }
        try:
            info["max_memory_clock_mhz"] = lib.nvmlDeviceGetMaxClockInfo(handle, lib.NVML_CLOCK_MEM)
            info["memory_bus_width_bits"] = lib.nvmlDeviceGetMemoryBusWidth(handle)
        except lib.NVMLError:
            pass
        return info
    except lib.NVMLError:
        return None


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def physical_index(index: int) -> int:
    """Map a CUDA-visible index to NVML's index when CUDA_VISIBLE_DEVICES lists plain numbers."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts) and index < len(parts):
        return int(parts[index])
    return index


def worker_gpu_env(worker: str | None, gpu_count: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES that pins pytest-xdist worker `gwN` to one GPU (N modulo the GPUs it may use).

    The GPUs it may use are those CUDA_VISIBLE_DEVICES already lists, else all `gpu_count`. Without xdist,
    or with one GPU, nothing changes: a worker process then sees what the session sees.
    """
    visible = [p.strip() for p in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if p.strip()]
    choices = visible or [str(i) for i in range(gpu_count)]
    match = re.fullmatch(r"gw(\d+)", worker or "")
    if match is None or len(choices) <= 1:
        return {}
    return {"CUDA_VISIBLE_DEVICES": choices[int(match.group(1)) % len(choices)]}


CPU_SHARE_VAR = "QUANTBENCH_CPUS"  # the CPUs a cell's worker process (and what it starts) may run on


def worker_cpu_share(worker: str | None, worker_count: int, cpus: list[int] | None = None) -> list[int] | None:
    """The CPUs of pytest-xdist worker `gwN`: slice N of the session's CPUs cut into `worker_count` slices.

    Workers measure their cells at the same time, one GPU each; on a shared CPU set, one cell's torch.compile
    workers or Python host loop take the cores another cell's timed region runs on. The slices are contiguous,
    disjoint, cover every CPU and differ in size by one at most. Without xdist, with one worker, or with more
    workers than CPUs, there is nothing to split (None): the worker keeps every CPU the session has.
    """
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    match = re.fullmatch(r"gw(\d+)", worker or "")
    if match is None or worker_count <= 1 or worker_count > len(cpus):
        return None
    index = int(match.group(1)) % worker_count
    size, extra = divmod(len(cpus), worker_count)
    start = index * size + min(index, extra)
    return cpus[start:start + size + (index < extra)]


def cpu_share_env(cpus: list[int] | None) -> dict[str, str]:
    """Environment that confines a worker process to `cpus`: the set itself, and thread pools sized to it.

    A pool size the user set (OMP_NUM_THREADS, TORCHINDUCTOR_COMPILE_THREADS) is kept.
    """
    if cpus is None:
        return {}
    env = {CPU_SHARE_VAR: ",".join(map(str, cpus))}
    for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        if name not in os.environ:
            env[name] = str(len(cpus))
    return env


def apply_cpu_share() -> None:
    """Pin this process to the CPUs its parent named in QUANTBENCH_CPUS (a worker, before torch or an engine loads)."""
    value = os.environ.get(CPU_SHARE_VAR, "").strip()
    if not value:
        return
    try:
        os.sched_setaffinity(0, {int(part) for part in value.split(",")})
    except (ValueError, OSError) as exc:
        raise ValueError(f"{CPU_SHARE_VAR}={value!r}: not a list of CPUs this process may use ({exc})") from None


def hardware_key(device: str) -> str:
    """The baseline folder name for `device`: GPU name and memory (`nvidia-h100-80gb-hbm3`), else the CPU.

    The GPU's memory is added in GiB when its name does not already carry it (`nvidia-h200-140gb`), so
    cards that share a name but not a memory size never share baselines. A CPU's key is its model name,
    its vector-instruction tier (cpu_vector_isa; left out where none can be read) and its core count:
    `cpu-amd-epyc-avx2-2c` and `cpu-amd-epyc-avx512-2c` are two kinds of machine under one name.
    """
    if device == "cuda":
        info = gpu_info()
        if info is None:
            raise RuntimeError("a CUDA device was asked for, but NVML sees no GPU")
        key = slug(info["name"])
        if not re.search(r"\d+gb", key):
            key += f"-{round(info['memory_mib'] / 1024)}gb"
        return key
    name = cpu_model()
    name = re.sub(r"\bcpu\b|@.*$|\bprocessor\b", "", name, flags=re.IGNORECASE)
    isa = cpu_vector_isa()
    return CPU_KEY_PREFIX + slug(name) + (f"-{isa}" if isa else "") + f"-{os.cpu_count()}c"


def is_cpu_key(key: str) -> bool:
    """Whether a hardware key names a CPU (`cpu-amd-epyc-avx2-2c`) rather than a GPU."""
    return key.startswith(CPU_KEY_PREFIX)


def machine_info(device: str) -> dict[str, Any]:
    """What a figure was measured on: the hardware key, CPU, GPU (when used), OS and Python."""
    info: dict[str, Any] = {
        "hardware_key": hardware_key(device),
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),  # the CPUs this process may run on (a share under xdist)
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    flags = cpu_flags()
    info["cpu_isa"] = cpu_vector_isa(flags)
    info["cpu_vector_flags"] = [flag for flag in CPU_VECTOR_FLAGS if flag in flags]
    if device == "cuda":
        info["gpu"] = gpu_info()
    return info


def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide a figure."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=4)
def suite_revision(root: Path | None = None) -> str | None:
    """The git commit of this checkout (with `+dirty` when tracked files other than the baseline store have
    local changes), if it is a git checkout.

    The baseline store does not count: `--update-baselines` writes it while the run goes on, and every
    (method, model) after the first would otherwise record `+dirty` for code that had not changed.
    """
    root = root or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)baselines"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Library versions, CUDA/torch build facts and the suite's own revision."""
    env: dict[str, Any] = {"packages": package_versions(), "quantbench_revision": suite_revision()}
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["torch_threads"] = torch.get_num_threads()
        if torch.backends.cudnn.is_available():
            env["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    return env
