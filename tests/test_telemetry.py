"""GPU telemetry over the timed repeats: NVML read at the edges only, unsupported readings left out."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from harness.baselines import run_differences
from harness.measure import telemetry
from harness.measure.throughput import measure_generation
from harness.results import CellResult


class FakeNvml:
    """The pynvml calls telemetry makes, on counters that the test advances between the two readings."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1

    class NVMLError(Exception):
        pass

    def __init__(self, unsupported=()):
        self.unsupported = set(unsupported)
        self.calls = 0
        self.state = {"energy": 1_000_000, "sm": 1980, "mem": 3201, "temp": 40, "power_ns": 5_000_000,
                      "thermal_ns": 0, "reasons": 0x1}  # idle at the edges

    def _get(self, name):
        self.calls += 1
        if name in self.unsupported:
            raise self.NVMLError(f"{name} not supported")
        return self.state[name]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self._get("energy")

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return self._get("sm" if clock == self.NVML_CLOCK_SM else "mem")

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._get("temp")

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        value = self._get("power_ns" if policy == self.NVML_PERF_POLICY_POWER else "thermal_ns")
        return SimpleNamespace(violationTime=value, referenceTime=0)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._get("reasons")


@pytest.fixture
def fake(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setattr(telemetry, "nvml_handle", lambda: (nvml, "handle"))
    return nvml


def test_the_timed_region_gets_energy_power_throttle_time_clocks_and_reasons(fake):
    with telemetry.gpu_telemetry("cuda") as out:
        assert out == {}  # filled when the region ends
        fake.state.update(energy=1_450_000, sm=1755, temp=47, power_ns=817_000_000, reasons=0x1 | 0x4)
    assert out["energy_j"] == 450.0
    assert out["mean_power_w"] > 0 and out["window_s"] >= 0
    assert out["power_capped_ms"] == 812.0 and out["thermal_capped_ms"] == 0.0
    assert out["sm_clock_mhz"] == [1980, 1755] and out["memory_clock_mhz"] == [3201, 3201]
    assert out["temperature_c"] == [40, 47]
    assert out["clock_event_reasons"] == ["sw_power_cap"]  # idle at the edges is not a reason


def test_a_reading_the_gpu_does_not_offer_is_left_out(monkeypatch):
    nvml = FakeNvml(unsupported={"energy", "power_ns", "thermal_ns"})
    monkeypatch.setattr(telemetry, "nvml_handle", lambda: (nvml, "handle"))
    with telemetry.gpu_telemetry("cuda") as out:
        pass
    assert not {"energy_j", "mean_power_w", "power_capped_ms", "thermal_capped_ms"} & set(out)
    assert out["sm_clock_mhz"] == [1980, 1980] and out["clock_event_reasons"] == []


def test_off_cuda_nothing_is_read(fake):
    with telemetry.gpu_telemetry("cpu") as out:
        pass
    assert out == {} and fake.calls == 0


def test_the_telemetry_covers_the_timed_repeats_and_not_the_warm_up():
    calls = []

    def generate(n, streamer):
        calls.append("generate")
        if streamer is not None:
            for _ in range(n + 1):
                streamer.put(None)
            streamer.end()

    @contextmanager
    def region():
        calls.append("enter")
        yield
        calls.append("exit")

    measure_generation(generate, "cpu", 1, 8, 4, warmup=2, repeats=3, around_repeats=region)
    assert calls == ["generate"] * 2 + ["enter"] + ["generate"] * 3 + ["exit"]


def cell(**gpu_telemetry):
    return CellResult("fp16", "m", 1, details={"gpu_telemetry": gpu_telemetry})


def test_a_failing_figure_names_how_the_gpu_ran_differently():
    baseline = cell(sm_clock_mhz=[1980, 1980], memory_clock_mhz=[3201, 3201], power_capped_ms=0.0,
                    thermal_capped_ms=0.0, clock_event_reasons=[])
    slower = cell(sm_clock_mhz=[1980, 1500], memory_clock_mhz=[3201, 3150], power_capped_ms=812.0,
                  thermal_capped_ms=0.0, clock_event_reasons=["sw_power_cap"])
    assert run_differences(slower, baseline) == [
        "gpu sm clock 1980/1980 -> 1980/1500 MHz at the timed repeats' edges",  # the memory clock moved < 5 %
        "gpu power_capped_ms 0 -> 812",
        "gpu clock event reasons none -> sw_power_cap",
    ]
    assert run_differences(baseline, baseline) == []
    assert run_differences(slower, CellResult("fp16", "m", 1)) == []  # a baseline recorded before telemetry
