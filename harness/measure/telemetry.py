"""What the GPU did while a batch size's timed repeats ran: clocks, throttling, power and energy (NVML).

Recorded beside the figures (`details.gpu_telemetry` of each batch cell), not gated: it explains a figure
that moved between runs (a lower SM clock, time held at the power cap) instead of being one. NVML is read
only at the two edges of the timed region, so nothing runs beside the timed work; energy and the
throttle-time counters are cumulative, so their differences cover the whole region. The clocks are
instantaneous readings at the edges. A reading the GPU or driver does not offer is left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness.hardware import nvml_handle

# nvmlClocksEventReason* bits by the names nvidia-smi -q gives them. gpu_idle is left out: the GPU is idle
# at the edges, where the reading is taken, by construction.
CLOCK_EVENT_REASONS = {
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def _read(nvml: Any, handle: Any) -> dict[str, Any]:
    """One reading of every counter this GPU offers, with the host time it was taken at."""
    readers = {
        "energy_mj": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle),
        "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
        "memory_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
        "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        "power_violation_ns": lambda: nvml.nvmlDeviceGetViolationStatus(
            handle, nvml.NVML_PERF_POLICY_POWER).violationTime,
        "thermal_violation_ns": lambda: nvml.nvmlDeviceGetViolationStatus(
            handle, nvml.NVML_PERF_POLICY_THERMAL).violationTime,
        "event_reasons": lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
    }
    reading: dict[str, Any] = {"time_s": time.perf_counter()}
    for name, read in readers.items():
        try:
            reading[name] = int(read())
        except (nvml.NVMLError, AttributeError):  # not supported here, or an nvidia-ml-py without the call
            pass
    return reading


def summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The telemetry of a region from the readings at its two edges."""
    window_s = after["time_s"] - before["time_s"]
    out: dict[str, Any] = {"window_s": round(window_s, 4)}
    both = set(before) & set(after)
    for name in ("sm_clock_mhz", "memory_clock_mhz", "temperature_c"):
        if name in both:
            out[name] = [before[name], after[name]]
    if "energy_mj" in both:
        energy_j = (after["energy_mj"] - before["energy_mj"]) / 1000
        out["energy_j"] = round(energy_j, 3)
        if window_s > 0:
            out["mean_power_w"] = round(energy_j / window_s, 1)
    for name, counter in (("power_capped_ms", "power_violation_ns"), ("thermal_capped_ms", "thermal_violation_ns")):
        if counter in both:
            out[name] = round((after[counter] - before[counter]) / 1e6, 3)
    reasons = before.get("event_reasons", 0) | after.get("event_reasons", 0)
    if "event_reasons" in before or "event_reasons" in after:
        out["clock_event_reasons"] = [name for bit, name in CLOCK_EVENT_REASONS.items() if reasons & bit]
    return out


@contextmanager
def gpu_telemetry(device: str, out: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Yield `out` (or a new dict), which receives the GPU's telemetry over the block when it ends (nothing
    off CUDA or without NVML)."""
    out = {} if out is None else out
    found = nvml_handle() if device == "cuda" else None
    if found is None:
        yield out
        return
    nvml, handle = found
    before = _read(nvml, handle)
    yield out
    out.update(summarize(before, _read(nvml, handle)))
