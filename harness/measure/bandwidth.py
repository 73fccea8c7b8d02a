"""Memory bandwidth the device delivers, measured: the ceiling that decode's roofline figure divides by.

One device-to-device copy of `size_mib` reads and writes that many bytes; its time is taken with CUDA events
on a GPU (the host clock on the CPU), after warm-up copies, over repeats. The figure is the median of
`2 * bytes / seconds`, the copy's read and write traffic together, as `cudaMemcpy` bandwidth tests count it.
A data sheet's bandwidth is a peak that copies do not reach, so a roofline share over the measured figure says
how far a kernel is from what the card actually delivers.

The result is stored beside the hardware's baselines (`baselines/<key>/hardware/memory-bandwidth.json`) and
`quantbench report` divides by it when present.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.cache import atomic_write_text

SCHEMA_VERSION = 1
FILE = Path("hardware") / "memory-bandwidth.json"


class BandwidthError(ValueError):
    """A stored bandwidth file that cannot be used; the message names the file and field."""


def measure_bandwidth(device: str = "cuda", size_mib: int = 2048, warmup: int = 3,
                      repeats: int = 20) -> dict[str, Any]:
    """Copy `size_mib` MiB device to device `warmup + repeats` times; the median and spread of the timed ones."""
    import torch

    if size_mib < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"size_mib >= 1, warmup >= 0 and repeats >= 1 are required (got {size_mib}, {warmup}, "
                         f"{repeats})")
    nbytes = size_mib * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    seconds: list[float] = []
    for i in range(warmup + repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            stop.record()
            stop.synchronize()
            elapsed = start.elapsed_time(stop) / 1e3
        else:
            started = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - started
        if i >= warmup:
            seconds.append(elapsed)
    if not torch.equal(dst, src):
        raise RuntimeError("the bandwidth copy did not reproduce its source")
    rates = [2 * nbytes / s for s in seconds]
    median = statistics.median(rates)
    return {
        "bytes_per_s": median,
        "spread": (max(rates) - min(rates)) / 2 / median,
        "samples_bytes_per_s": rates,
        "bytes_per_copy": nbytes,
        "warmup": warmup,
        "protocol": "device-to-device copy (torch copy_), read + write bytes over the copy's time; "
                    + ("CUDA events" if device == "cuda" else "host clock") + f"; median of {repeats} after {warmup} "
                    "warm-up copies",
    }


def write_bandwidth(root: Path, hardware_key: str, measured: dict[str, Any], hardware: dict[str, Any],
                    versions: dict[str, Any]) -> Path:
    """Store a measurement under `root/<hardware_key>/hardware/`, atomically (an older one is replaced)."""
    path = Path(root) / hardware_key / FILE
    document = {"schema_version": SCHEMA_VERSION, "hardware_key": hardware_key,
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "hardware": hardware, "versions": versions, **measured}
    atomic_write_text(path, json.dumps(document, sort_keys=True, indent=2, allow_nan=False) + "\n")
    return path


def read_bandwidth(root: Path, hardware_key: str) -> tuple[float, str] | None:
    """The stored measurement of `hardware_key` as (bytes/s, where it comes from), or None when there is none."""
    path = Path(root) / hardware_key / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BandwidthError(f"{path}: not valid JSON ({exc}); measure again with quantbench bandwidth --write") \
            from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise BandwidthError(f"{path}: field 'schema_version' must be {SCHEMA_VERSION}")
    value = data.get("bytes_per_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BandwidthError(f"{path}: field 'bytes_per_s' must be a positive number, got {value!r}")
    return float(value), f"measured copy ({value / 1e9:.0f} GB/s, {path})"
